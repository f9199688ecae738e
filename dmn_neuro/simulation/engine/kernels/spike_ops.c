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
#include <math.h>
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

/* ------------------------------------------------------------------------
 * The steps of a recurrent group (KC <-> APL) in one call per time chunk.
 *
 * An edge inside the group is a dense W [n_post, n_pre] with n_pre == 1 or
 * n_post == 1 (the only shapes handled here; dmn_neuro.engine checks):
 *   "outer" (inner dimension 1):  c[b, j] = x[b] * w[j]          (one product)
 *   "dot"   (outer dimension 1):  c[b]    = sum_k x[b, k] * w[k]  (a reduction)
 * The dot is summed in the order of the GEMM it replaces, chosen per row:
 *   DOT_LANES4: h = (n - 1) % 4 + 1 leading products summed in order into lane 0,
 *               then four lanes over the rest (lane l takes k = h + 4i + l),
 *               combined as (lane0 + lane2) + (lane1 + lane3);
 *   DOT_SEQ:    one running sum in ascending k.
 * (products rounded, then added: no FMA). Which order reproduces torch.mm is
 * measured at run time, row by row (dmn_neuro.engine.kernels.dot_orders).
 * Compiled without contraction (-ffp-contract=off): every product and sum is
 * rounded as the torch ops it replaces round it.
 */
#define DOT_LANES4 0
#define DOT_SEQ 1

static float dot_ordered(const float *x, const float *w, int64_t n, int order)
{
    if (n <= 0) return 0.0f;
    if (order == DOT_SEQ) {
        float acc = x[0] * w[0];
        for (int64_t k = 1; k < n; ++k) {
            const float p = x[k] * w[k];
            acc = acc + p;
        }
        return acc;
    }
    const int64_t h = (n - 1) % 4 + 1;
    float lane[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float s = x[0] * w[0];
    for (int64_t k = 1; k < h; ++k) {
        const float p = x[k] * w[k];
        s = s + p;
    }
    if (h == n) return s;
    lane[0] = s;
    for (int64_t k = h; k < n; k += 4) {
        for (int l = 0; l < 4; ++l) {
            const float p = x[k + l] * w[k + l];
            lane[l] = lane[l] + p;
        }
    }
    const float a = lane[0] + lane[2], b = lane[1] + lane[3];
    return a + b;
}

/* out[r] = dot(X[r, :], w) in order orders[r]; X [M, n]. (Measuring the orders.) */
void dot_rows(const float *X, int64_t M, int64_t n, const float *w, const int32_t *orders, float *out)
{
    for (int64_t r = 0; r < M; ++r) out[r] = dot_ordered(X + r * n, w, n, orders[r]);
}

/* One edge contribution c [B, n_post] of x [B, n_pre] through W (see above),
 * written as out = c, or out = base + c when base is given (base may be out). */
static void edge_apply(const float *x, int64_t B, int64_t n_pre, int64_t n_post, const float *w, int dot,
                       const int32_t *orders, const float *base, float *out)
{
    if (dot) { /* n_post == 1 */
        for (int64_t b = 0; b < B; ++b) {
            const float c = dot_ordered(x + b * n_pre, w, n_pre, orders[b]);
            out[b] = base ? base[b] + c : c;
        }
        return;
    }
    for (int64_t b = 0; b < B; ++b) { /* n_pre == 1 */
        const float xb = x[b];
        float *ob = out + b * n_post;
        if (base) {
            const float *bb = base + b * n_post;
            for (int64_t j = 0; j < n_post; ++j) {
                const float c = xb * w[j];
                ob[j] = bb[j] + c;
            }
        } else {
            for (int64_t j = 0; j < n_post; ++j) ob[j] = xb * w[j];
        }
    }
}

/* One LIF step of B rows of n neurons: v = m * beta, v = v + I, s = v > theta, m = v - v * s. */
static void lif_rows(const float *restrict I, float *restrict V, float *restrict S, float *restrict m, float beta,
                     const float *restrict theta, int64_t B, int64_t n)
{
    for (int64_t b = 0; b < B; ++b) {
        const float *Ib = I + b * n;
        float *v = V + b * n, *s = S + b * n, *mb = m + b * n;
        for (int64_t j = 0; j < n; ++j) {
            float vv = mb[j] * beta;
            vv = vv + Ib[j];
            const float sp = vv > theta[j] ? 1.0f : 0.0f;
            const float vs = vv * sp;
            v[j] = vv;
            s[j] = sp;
            mb[j] = vv - vs;
        }
    }
}

/* Forward of a group of P populations over L steps of a chunk.
 * Per population p: ext[p] [L, B, n_p] external current (or NULL: zeros),
 * V[p], S[p] [L, B, n_p] written (pre-reset membrane, spikes as 0/1 floats),
 * vr[p] [B, n_p] post-reset membrane in/out, s0[p] [B, n_p] spikes before the
 * first step (read), beta[p], theta[p] [n_p].
 * Edge e (in projection order): post[e], pre[e], fdot[e] (1: dot, 0: outer),
 * w[e] (n_pre floats for a dot, n_post for an outer), orders[e] [B].
 * cur: scratch of max_n * B floats.
 * Per step, as _GroupScan's torch loop: I = ext + c_e1 (+ c_e2 ...) in edge order,
 * v = vr * beta, v = v + I, s = v > theta, vr = v - v * s. The currents of
 * step t read only the spikes of step t - 1, so each population is updated
 * as soon as its current is known. */
void group_fwd_chunk(int64_t P, int64_t L, int64_t B, const int64_t *n, const float *const *ext, float *const *V,
                     float *const *S, float *const *vr, const float *const *s0, const float *beta,
                     const float *const *theta, int64_t E, const int64_t *post, const int64_t *pre,
                     const int32_t *fdot, const float *const *w, const int32_t *const *orders, float *cur)
{
    for (int64_t t = 0; t < L; ++t) {
        for (int64_t p = 0; p < P; ++p) {
            const int64_t np = n[p], rows = B * np;
            const float *x = ext[p] ? ext[p] + t * rows : NULL;
            int have = 0;
            for (int64_t e = 0; e < E; ++e) {
                if (post[e] != p) continue;
                const int64_t q = pre[e];
                const float *sp = t ? S[q] + (t - 1) * B * n[q] : s0[q];
                /* I = ext + c_e1, then I = I + c_e2 ... */
                edge_apply(sp, B, n[q], np, w[e], fdot[e], orders[e], have ? cur : x, cur);
                have = 1;
            }
            const float *I = have ? cur : x;
            if (!I) {
                memset(cur, 0, (size_t)rows * sizeof(float));
                I = cur;
            }
            lif_rows(I, V[p] + t * rows, S[p] + t * rows, vr[p], beta[p], theta[p], B, np);
        }
    }
}

/* The reverse steps of a group over one time chunk (the per-step loop of
 * _GroupScan.backward). Per population p: A[p] [L + 1, B, n_p] dL/dv of the
 * chunk's steps (rows 0..L-1 hold the part from outside the group; row L is
 * the step after the chunk, final), KEEP[p], SD[p] [L, B, n_p] (1 - s and
 * sigma'), beta[p]; R[p] [L, B, n_p] is written with the recurrent part of
 * dL/dv (zero where none). Step L-1 is skipped when it is the last step of the
 * scan (skip_last). Edges as in group_fwd_chunk, run backwards: the outgoing
 * edges e of q (pre[e] == q) give r = sum_e A[post[e]][t+1] W_e (an outer
 * for a dot edge, a dot for an outer edge; bwd_orders[e] [B]), then
 *     R[q][t] = r * SD[q][t],   A[q][t] = A[q][t] + R[q][t],
 *     A[q][t] = fma(beta_q * KEEP[q][t], A[q][t+1], A[q][t])
 * (torch's addcmul_ rounds once). The torch loop does the second line for all
 * populations before the third; both read only row t+1 of A, so doing them
 * element by element in one pass gives the same numbers.
 * cur: scratch of max_n * B floats. */
static void bwd_rows(float *restrict a, const float *restrict an, const float *restrict keep,
                     const float *restrict sd, const float *restrict c, float *restrict r, float beta, int64_t rows)
{
    if (c) {
        for (int64_t i = 0; i < rows; ++i) {
            const float ri = c[i] * sd[i];
            r[i] = ri;
            a[i] = fmaf(beta * keep[i], an[i], a[i] + ri);
        }
    } else {
        for (int64_t i = 0; i < rows; ++i) a[i] = fmaf(beta * keep[i], an[i], a[i]);
    }
}

void group_bwd_chunk(int64_t P, int64_t L, int64_t B, const int64_t *n, float *const *A, const float *const *KEEP,
                     const float *const *SD, const float *beta, float *const *R, int skip_last, int64_t E,
                     const int64_t *post, const int64_t *pre, const int32_t *fdot, const float *const *w,
                     const int32_t *const *bwd_orders, float *cur)
{
    for (int64_t p = 0; p < P; ++p) memset(R[p], 0, (size_t)(L * B * n[p]) * sizeof(float));
    for (int64_t t = L - 1; t >= 0; --t) {
        if (skip_last && t == L - 1) continue;
        for (int64_t q = 0; q < P; ++q) {
            const int64_t nq = n[q], rows = B * nq;
            int have = 0;
            for (int64_t e = 0; e < E; ++e) {
                if (pre[e] != q) continue;
                const int64_t p = post[e];
                const float *an = A[p] + (t + 1) * B * n[p];
                /* gradient of a dot edge (n_post 1) is an outer, of an outer edge a dot */
                /* r = c_e1, then r = r + c_e2 ... */
                edge_apply(an, B, n[p], nq, w[e], !fdot[e], bwd_orders[e], have ? cur : NULL, cur);
                have = 1;
            }
            float *a = A[q] + t * rows;
            bwd_rows(a, a + rows, KEEP[q] + t * rows, SD[q] + t * rows, have ? cur : NULL, R[q] + t * rows, beta[q],
                     rows);
        }
    }
}
