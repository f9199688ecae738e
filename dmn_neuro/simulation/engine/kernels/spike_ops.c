/*
 * Event-driven CPU kernels for projections whose presynaptic side is a binary
 * spike train and whose weight matrix is sparse (dmn_neuro.kernels).
 *
 * Layout: row-major, float32, int64 sizes. A weight W [n_post, n_pre] is handed
 * in as the CSR of W^T grouped by presynaptic neuron k:
 *     edges of k: e in [ptr[k], ptr[k+1]), postsynaptic index idx[e], value val[e],
 * with idx ascending inside each k (the order torch.nonzero gives).
 *
 * spike_fwd reproduces the float rounding of a K-blocked GEMM (what MKL's sgemm
 * does): inside a block of kb presynaptic inputs the sum runs in ascending k
 * starting from zero; the block sums are added in block order. For binary spikes
 * s * w is exact, and adding an exact zero (an inactive input or a zero weight)
 * leaves a sum unchanged, so summing only the active inputs' nonzero weights in
 * that order gives the GEMM's result bit for bit. The block size is found at run
 * time by comparison with torch.mm (dmn_neuro.kernels.gemm_block_size).
 *
 * Only additions are used in spike_fwd (no multiply, nothing to contract into
 * an FMA). The gradient kernels need no particular rounding.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16

/* out[r, j] = sum over active k (S[r, k] != 0) of W[j, k]; S [M, K], out [M, N].
 * part: scratch of N floats (used only when K > kb). */
/* Nonzero test for 8 consecutive floats at once (spikes are 0.0f or 1.0f, and
 * most are 0): OR of the bit patterns, which the compiler vectorises. */
static inline int any8(const float *s)
{
    const uint32_t *u = (const uint32_t *)s;
    return (u[0] | u[1] | u[2] | u[3] | u[4] | u[5] | u[6] | u[7]) != 0;
}

static inline void scatter_active(const float *s, int64_t k0, int64_t k1, const int64_t *ptr, const int64_t *idx,
                                  const float *val, float *o, int *any)
{
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
        if (!any8(s + k)) continue;
        for (int64_t q = k; q < k + 8; ++q) {
            if (s[q] == 0.0f) continue;
            *any = 1;
            for (int64_t e = ptr[q]; e < ptr[q + 1]; ++e) o[idx[e]] += val[e];
        }
    }
    for (; k < k1; ++k) {
        if (s[k] == 0.0f) continue;
        *any = 1;
        for (int64_t e = ptr[k]; e < ptr[k + 1]; ++e) o[idx[e]] += val[e];
    }
}

/* out[r, j] = sum over active k (S[r, k] != 0) of W[j, k]; S [M, K], out [M, N].
 * part: scratch of N floats (used only when K > kb). */
void spike_fwd(const float *S, int64_t M, int64_t K, const int64_t *ptr, const int64_t *idx,
               const float *val, int64_t N, int64_t kb, float *out, float *part)
{
    for (int64_t r = 0; r < M; ++r) {
        const float *s = S + r * K;
        float *o = out + r * N;
        memset(o, 0, (size_t)N * sizeof(float));
        if (K <= kb) {
            int any = 0;
            scatter_active(s, 0, K, ptr, idx, val, o, &any);
            continue;
        }
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
            int64_t k1 = k0 + kb < K ? k0 + kb : K;
            int any = 0;
            memset(part, 0, (size_t)N * sizeof(float));
            scatter_active(s, k0, k1, ptr, idx, val, part, &any);
            if (!any) continue; /* o + 0 == o */
            if (k0 == 0) {
                memcpy(o, part, (size_t)N * sizeof(float));
            } else {
                for (int64_t j = 0; j < N; ++j) o[j] += part[j];
            }
        }
    }
}

/* Input gradient: out[r, k] = sum over edges e of k of G[r, idx[e]] * val[e];
 * G [M, N] (gradient w.r.t. the postsynaptic current), out [M, K].
 * Rows are processed LANES at a time from a transposed copy so that the inner
 * loop is a contiguous multiply-add over LANES rows.
 * gt: scratch of N * LANES floats; ot: scratch of K * LANES floats. */
void spike_dgrad(const float *G, int64_t M, int64_t N, const int64_t *ptr, const int64_t *idx,
                 const float *val, int64_t K, float *out, float *gt, float *ot)
{
    for (int64_t r0 = 0; r0 < M; r0 += LANES) {
        int64_t R = M - r0 < LANES ? M - r0 : LANES;
        if (R < LANES) memset(gt, 0, (size_t)N * LANES * sizeof(float));
        for (int64_t i = 0; i < R; ++i) {
            const float *g = G + (r0 + i) * N;
            for (int64_t j = 0; j < N; ++j) gt[j * LANES + i] = g[j];
        }
        for (int64_t k = 0; k < K; ++k) {
            float acc[LANES] = {0};
            for (int64_t e = ptr[k]; e < ptr[k + 1]; ++e) {
                const float v = val[e];
                const float *g = gt + idx[e] * LANES;
                for (int i = 0; i < LANES; ++i) acc[i] += v * g[i];
            }
            memcpy(ot + k * LANES, acc, sizeof acc);
        }
        for (int64_t i = 0; i < R; ++i) {
            float *o = out + (r0 + i) * K;
            for (int64_t k = 0; k < K; ++k) o[k] = ot[k * LANES + i];
        }
    }
}

/* Weight gradient on given edges only: acc[e] += sum over rows r with S[r, k]
 * of G[r, idx[e]], for every edge e of presynaptic k; S [M, K] binary spikes as
 * bytes (torch.bool), G [M, N]. */
void spike_wgrad(const float *G, int64_t M, int64_t N, const uint8_t *S, int64_t K, const int64_t *ptr,
                 const int64_t *idx, float *acc)
{
    for (int64_t r = 0; r < M; ++r) {
        const uint8_t *s = S + r * K;
        const float *g = G + r * N;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            uint64_t word;
            memcpy(&word, s + k, 8);
            if (!word) continue; /* 8 silent inputs */
            for (int64_t q = k; q < k + 8; ++q) {
                if (!s[q]) continue;
                for (int64_t e = ptr[q]; e < ptr[q + 1]; ++e) acc[e] += g[idx[e]];
            }
        }
        for (; k < K; ++k) {
            if (!s[k]) continue;
            for (int64_t e = ptr[k]; e < ptr[k + 1]; ++e) acc[e] += g[idx[e]];
        }
    }
}

/* spike_wgrad with the spikes given as the float reset mask KEEP = 1 - S
 * (0.0f where a neuron spiked, 1.0f elsewhere), as the LIF backward has it. */
void spike_wgrad_keep(const float *G, int64_t M, int64_t N, const float *KEEP, int64_t K, const int64_t *ptr,
                      const int64_t *idx, float *acc)
{
    for (int64_t r = 0; r < M; ++r) {
        const float *m = KEEP + r * K;
        const uint32_t *u = (const uint32_t *)m;
        const float *g = G + r * N;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            /* all eight are 1.0f (no spike) iff the AND of their bits is 1.0f's */
            if ((u[k] & u[k + 1] & u[k + 2] & u[k + 3] & u[k + 4] & u[k + 5] & u[k + 6] & u[k + 7]) == 0x3f800000u)
                continue;
            for (int64_t q = k; q < k + 8; ++q) {
                if (m[q] != 0.0f) continue;
                for (int64_t e = ptr[q]; e < ptr[q + 1]; ++e) acc[e] += g[idx[e]];
            }
        }
        for (; k < K; ++k) {
            if (m[k] != 0.0f) continue;
            for (int64_t e = ptr[k]; e < ptr[k + 1]; ++e) acc[e] += g[idx[e]];
        }
    }
}

/* One time chunk of the LIF backward pass, elementwise, for one population:
 * V [R, n] pre-reset membranes (R = steps * batch rows), theta [n], G [R, n]
 * dL/ds or NULL. With x = v - theta and the surrogate derivative
 *   fast_sigmoid (kind 0): sigma'(x) = 1 / (slope |x| + 1)^2
 *   atan         (kind 1): sigma'(x) = (slope / 2) / (1 + (pi/2 slope x)^2)
 * (the formulas of dmn_neuro.neurons.surrogate_derivative; the spike condition
 * v > theta and zero reset of dmn_neuro.semantics, which dmn_neuro.engine checks)
 * writes A = G * sigma'(x) (0 without G), KEEP = (x <= 0) (1 - s, float) and,
 * if SD is not NULL, SD = sigma'(x); subtracts the column sums of A from
 * gtheta [n]. */
void lif_bwd_chunk(const float *V, int64_t R, int64_t n, const float *theta, const float *G, int kind, float slope,
                   float *A, float *KEEP, float *SD, float *gtheta)
{
    const float c = kind == 0 ? slope : (float)(3.14159265358979323846 / 2.0) * slope;
    const float num = kind == 0 ? 1.0f : slope / 2.0f;
    for (int64_t r = 0; r < R; ++r) {
        const float *v = V + r * n;
        float *a = A + r * n, *keep = KEEP + r * n;
        const float *g = G ? G + r * n : NULL;
        float *sd = SD ? SD + r * n : NULL;
        for (int64_t j = 0; j < n; ++j) {
            const float x = v[j] - theta[j];
            keep[j] = x <= 0.0f ? 1.0f : 0.0f;
            float d;
            if (kind == 0) {
                const float q = c * (x < 0.0f ? -x : x) + 1.0f;
                d = q * q;
            } else {
                const float q = c * x;
                d = 1.0f + q * q;
            }
            const float s = num / d;
            if (sd) sd[j] = s;
            a[j] = g ? g[j] * s : 0.0f;
        }
        for (int64_t j = 0; j < n; ++j) gtheta[j] -= a[j];
    }
}
