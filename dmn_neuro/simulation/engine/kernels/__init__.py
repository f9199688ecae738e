"""Event-driven CPU kernels for binary spikes through sparse weights.

The C source next to this file (``spike_ops.c``) is compiled on first use with
the system C compiler (``$CC``, else ``cc``/``gcc``) into the kernel cache
(``$DMN_NEURO_KERNEL_CACHE``, else ``$DMN_NEURO_CACHE/kernels``, else
``~/.cache/dmn-neuro/kernels``) and loaded with :mod:`ctypes`. Without a
compiler, with ``DMN_NEURO_KERNELS=0``, with a cache directory that is not ours,
or on anything but float32 CPU tensors, callers fall back to plain torch (same
results; see :mod:`dmn_neuro.simulation.engine`).

Loading a shared library runs its code, so the cache is guarded:

* the file name ``spike_ops-<hash>.so`` carries the sha256 of the C source, the
  compiler (path and ``--version``), the flags and the CPU;
* the cache directory is private: created with mode 0700, tightened to 0700 if
  it is ours and looser, refused (torch fallback, one warning) if another user
  owns it or it is not a directory;
* each build records the sha256 of the library in ``spike_ops-<hash>.so.sha256``
  (written atomically, like the library); before loading, the library's sha256
  is recomputed from the open file and compared with it. A missing or different
  record means the library is rebuilt, never loaded.

Why: in the fused engine a feed-forward projection is one GEMM over all
``T*B`` rows. The presynaptic side is binary and sparse (PN ~10 %, KC ~0.2 %
active per step) and the FlyWire weight matrices are sparse (PN->KC 3 %,
KC->MBON 6 % nonzero), so a dense GEMM spends almost all of its time adding
zeros. These kernels touch only active inputs and existing synapses:

* :func:`spike_matmul` -- ``S @ W^T`` with the float rounding of the dense
  GEMM, bit for bit (so spikes stay identical to the snnTorch reference). The
  GEMM's summation order (its K-block size) is measured against ``torch.mm``
  once per shape (:func:`gemm_block_size`); shapes where no order reproduces
  it are left to ``torch.mm``.
* :func:`spike_matmul_input_grad` -- ``G @ W`` through the nonzeros of ``W``.
* :func:`spike_weight_grad` -- ``G^T @ S`` only on given edges (the synapse
  mask: the gradient off the mask is discarded by the masked weight anyway).
* :func:`group_forward_chunk` / :func:`group_backward_chunk` -- the steps of a
  recurrent group (KC <-> APL) over a time chunk in one call, rounded as the
  torch loop they replace (:mod:`dmn_neuro.simulation.engine.group_kernel`);
  :func:`dot_orders` measures in which order ``torch.mm`` sums a reduction
  into one neuron, so that the C sum is the same.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("spike_ops.c")
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
#: ISO C without contraction: every product and sum is rounded on its own, as the
#: torch ops the kernels replace round it (clang contracts by default otherwise)
_COMMON_FLAGS = ["-std=c99", "-ffp-contract=off", "-shared", "-fPIC"]
#: candidate K-block sizes of the dense GEMM, tried in this order after K itself
#: (no blocking) and before K split into equal parts (the first one that
#: reproduces ``torch.mm`` bit for bit wins)
_BLOCK_CANDIDATES = (192, 128, 256, 384, 512, 96, 64, 320, 448, 768, 1024, 2048, 4096)
_PROBE_ROWS = 1024  # enough rows for a multithreaded GEMM to split them as it would at T*B rows

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_load_error: Optional[str] = None
_block_cache: Dict[Tuple[int, int, int], Optional[int]] = {}


class CSR(NamedTuple):
    """Edges of a ``[n_post, n_pre]`` matrix grouped by presynaptic neuron ``k``:
    ``ptr [n_pre + 1]``, postsynaptic ``idx [nnz]`` and ``pre [nnz]`` (int64),
    ``val [nnz]`` (float32, or ``None`` for a bare mask)."""

    ptr: torch.Tensor
    idx: torch.Tensor
    pre: torch.Tensor
    val: Optional[torch.Tensor]
    n_post: int
    n_pre: int


def enabled() -> bool:
    return os.environ.get("DMN_NEURO_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    env = os.environ.get("DMN_NEURO_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("DMN_NEURO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "dmn-neuro") / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if os.path.exists(cc) else None)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


_compiler_ids: Dict[str, str] = {}


def _compiler_id(cc: str) -> str:
    """The compiler's resolved path and first ``--version`` line (part of the library's name)."""
    if cc not in _compiler_ids:
        try:
            res = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
            version = (res.stdout.strip().splitlines() or [""])[0]
        except (OSError, subprocess.SubprocessError):
            version = ""
        _compiler_ids[cc] = f"{os.path.realpath(cc)}\0{version}"
    return _compiler_ids[cc]


def _euid() -> Optional[int]:
    """Our effective uid (``None`` where the OS has none: no ownership checks there)."""
    return os.geteuid() if hasattr(os, "geteuid") else None


def _private_cache_dir() -> Path:
    """The kernel cache, created 0700 or tightened to 0700; OSError if it cannot be ours alone."""
    d = cache_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"kernel cache {d} is not a directory")
    if _euid() is not None and st.st_uid != _euid():
        raise OSError(f"kernel cache {d} belongs to another user (uid {st.st_uid}); not loading code from it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(d, 0o700)
        logger.info("kernel cache %s was mode %o; tightened to 700", d, stat.S_IMODE(st.st_mode))
    return d


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    for block in iter(lambda: os.read(fd, 1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(cc: str, flags, target: Path) -> None:
    """Build ``target`` and its sha256 record; both appear atomically (record first)."""
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=str(target.parent))
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, *_COMMON_FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            raise OSError((res.stderr.strip().splitlines() or ["compiler failed"])[-1])
        rfd = os.open(tmp, os.O_RDONLY)
        try:
            digest = _sha256_fd(rfd)
        finally:
            os.close(rfd)
        # record first: a loader that sees the new record with an older library rebuilds, never loads
        _write_atomic(_sidecar(target), (digest + "\n").encode())
        os.replace(tmp, target)  # atomic: a concurrent loader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_verified(target: Path) -> Optional[ctypes.CDLL]:
    """Load ``target`` if its sha256 equals its record, else ``None`` (rebuild it).

    The hash is taken from an open descriptor and, where ``/proc/self/fd`` exists,
    the library is loaded through that same descriptor, so the bytes checked are
    the bytes loaded.
    """
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a symbolic link planted under the name
        logger.warning("kernel library %s cannot be opened (%s); rebuilding", target, exc)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (_euid() is not None and st.st_uid != _euid()):
            logger.warning("kernel library %s is not a regular file of ours; rebuilding", target)
            return None
        try:
            recorded = _sidecar(target).read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            logger.info("kernel library %s has no sha256 record; rebuilding", target)
            return None
        if _sha256_fd(fd) != recorded:
            logger.warning("kernel library %s does not match its recorded sha256; rebuilding", target)
            return None
        via_fd = Path(f"/proc/self/fd/{fd}")
        return ctypes.CDLL(str(via_fd) if via_fd.exists() else str(target))
    finally:
        os.close(fd)


def library_path(cc: str, flags) -> Path:
    """Where the library built by ``cc`` with ``flags`` lives in the cache (see the module docstring)."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), _compiler_id(cc).encode(),
                                     " ".join([*flags, *_COMMON_FLAGS]).encode(), platform.machine().encode(),
                                     _cpu_signature().encode()])).hexdigest()[:24]
    return cache_dir() / f"spike_ops-{key}.so"


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.spike_fwd.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p]
    lib.spike_dgrad.argtypes = [p, i64, i64, p, p, p, i64, p, p, p]
    lib.spike_wgrad.argtypes = [p, i64, i64, p, i64, p, p, p]
    lib.spike_wgrad_keep.argtypes = [p, i64, i64, p, i64, p, p, p]
    lib.lif_bwd_chunk.argtypes = [p, i64, i64, p, p, ctypes.c_int, ctypes.c_float, p, p, p, p]
    lib.dot_rows.argtypes = [p, i64, i64, p, p, p]
    lib.group_fwd_chunk.argtypes = [i64, i64, i64, p, p, p, p, p, p, p, p, i64, p, p, p, p, p, p]
    lib.group_bwd_chunk.argtypes = [i64, i64, i64, p, p, p, p, p, p, ctypes.c_int, i64, p, p, p, p, p, p]
    for f in (lib.spike_fwd, lib.spike_dgrad, lib.spike_wgrad, lib.spike_wgrad_keep, lib.lif_bwd_chunk, lib.dot_rows,
              lib.group_fwd_chunk, lib.group_bwd_chunk):
        f.restype = None


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or ``None`` (disabled, or no working compiler)."""
    global _lib, _load_error
    if not enabled():
        return None
    if _lib is not None or _load_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        cc = _compiler()
        if cc is None:
            _load_error = "no C compiler found (set $CC)"
        else:
            try:
                _private_cache_dir()
            except OSError as exc:
                _load_error = str(exc)
        if _load_error is None:
            errors = []
            for flags in _FLAG_SETS:
                target = library_path(cc, flags)
                try:
                    lib = _load_verified(target)
                    if lib is None:
                        _compile(cc, flags, target)
                        lib = _load_verified(target)
                    if lib is None:
                        raise OSError(f"{target} changed between build and load")
                    _declare(lib)
                    _lib = lib
                    break
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"{' '.join(flags)}: {exc}")
            else:
                _load_error = "; ".join(errors)
        if _load_error is not None:
            logger.warning("dmn_neuro.simulation.engine.kernels unavailable (%s); using torch instead", _load_error)
    return _lib


def load_error() -> Optional[str]:
    """Why the kernels are not available (``None`` when they are)."""
    if not enabled():
        return "disabled by DMN_NEURO_KERNELS"
    library()
    return _load_error


def available() -> bool:
    return library() is not None


def _reset_for_tests() -> None:
    """Forget the loaded library and the measured block sizes."""
    global _lib, _load_error
    with _lock:
        _lib, _load_error = None, None
        _block_cache.clear()
        _dot_cache.clear()


# ---------------------------------------------------------------------------
def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{what}: need a contiguous {dtype} CPU tensor, got {t.dtype} on {t.device}")


def csr_by_pre(weight: torch.Tensor, values: bool = True) -> CSR:
    """The nonzeros of ``weight [n_post, n_pre]`` grouped by presynaptic neuron
    (ascending postsynaptic index inside a group); ``values=False`` for a mask."""
    wt = weight.detach().t()
    nz = wt != 0
    n_pre, n_post = wt.shape
    ptr = torch.zeros(n_pre + 1, dtype=torch.int64)
    torch.cumsum(nz.sum(1), 0, out=ptr[1:])
    pre, idx = nz.nonzero(as_tuple=True)
    val = wt[pre, idx].to(torch.float32).contiguous() if values else None
    return CSR(ptr, idx.contiguous(), pre.contiguous(), val, int(n_post), int(n_pre))


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("dmn_neuro.simulation.engine.kernels are not available")
    return lib


def _rows(x: torch.Tensor, what: str, n_in: int, side: str, n_out: int, out: Optional[torch.Tensor]):
    """Check ``x [M, n_in]`` and ``out [M, n_out]`` (allocated if ``None``)."""
    _check(x, torch.float32, what)
    M, n = x.shape
    if n != n_in:
        raise ValueError(f"{what} has {n} columns, weight has {n_in} {side} neurons")
    if out is None:
        out = torch.empty(M, n_out, dtype=torch.float32)
    _check(out, torch.float32, "out")
    if tuple(out.shape) != (M, n_out):
        raise ValueError(f"out has shape {list(out.shape)}, expected {[M, n_out]}")
    return M, out


def spike_matmul(spikes: torch.Tensor, csr: CSR, block: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``spikes [M, n_pre] @ W^T -> [M, n_post]`` for binary float32 spikes, summed
    as a GEMM with K-block ``block`` sums (see :func:`gemm_block_size`)."""
    lib = _require()
    M, out = _rows(spikes, "spikes", csr.n_pre, "presynaptic", csr.n_post, out)
    part = torch.empty(csr.n_post, dtype=torch.float32)
    lib.spike_fwd(_ptr(spikes), M, csr.n_pre, _ptr(csr.ptr), _ptr(csr.idx), _ptr(csr.val), csr.n_post, int(block),
                  _ptr(out), _ptr(part))
    return out


def spike_matmul_input_grad(grad: torch.Tensor, csr: CSR, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad [M, n_post] @ W -> [M, n_pre]`` through the nonzeros of ``W``."""
    lib = _require()
    M, out = _rows(grad, "grad", csr.n_post, "postsynaptic", csr.n_pre, out)
    gt = torch.empty(csr.n_post * 16, dtype=torch.float32)
    ot = torch.empty(csr.n_pre * 16, dtype=torch.float32)
    lib.spike_dgrad(_ptr(grad), M, csr.n_post, _ptr(csr.ptr), _ptr(csr.idx), _ptr(csr.val), csr.n_pre, _ptr(out),
                    _ptr(gt), _ptr(ot))
    return out


def spike_weight_grad(grad: torch.Tensor, spikes: torch.Tensor, edges: CSR,
                      acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(grad^T @ S)[idx[e], pre[e]]`` for every edge: ``grad [M, n_post]``
    float32; ``spikes [M, n_pre]`` either ``S`` as bool, or the float32 reset
    mask ``1 - S`` that the LIF backward already has. Returns (or adds into)
    ``acc [nnz]``."""
    lib = _require()
    _check(grad, torch.float32, "grad")
    if spikes.dtype == torch.float32:
        fn, what = lib.spike_wgrad_keep, "keep mask"
    else:
        fn, what = lib.spike_wgrad, "spikes"
        _check(spikes, torch.bool, "spikes")
    _check(spikes, spikes.dtype, what)
    M, N = grad.shape
    if spikes.shape != (M, edges.n_pre) or N != edges.n_post:
        raise ValueError(f"shapes do not match: grad {list(grad.shape)}, {what} {list(spikes.shape)}, "
                         f"edges {[edges.n_post, edges.n_pre]}")
    if acc is None:
        acc = torch.zeros(edges.idx.numel(), dtype=torch.float32)
    _check(acc, torch.float32, "acc")
    fn(_ptr(grad), M, N, _ptr(spikes), edges.n_pre, _ptr(edges.ptr), _ptr(edges.idx), _ptr(acc))
    return acc


SURROGATE_KINDS = {"fast_sigmoid": 0, "atan": 1}


def lif_backward_chunk(v: torch.Tensor, theta: torch.Tensor, g: Optional[torch.Tensor], surrogate: str, slope: float,
                       a: torch.Tensor, keep: torch.Tensor, sd: Optional[torch.Tensor], g_theta: torch.Tensor) -> None:
    """The elementwise part of the LIF backward over a chunk ``[..., n]`` in one
    pass: ``a = g * sigma'(v - theta)`` (0 without ``g``), ``keep = (v <= theta)``
    as float, ``sd = sigma'(v - theta)`` (if given), ``g_theta -= a`` summed over
    all rows. All float32 CPU and contiguous; ``a``, ``keep``, ``sd`` are written."""
    lib = _require()
    n = theta.shape[0]
    for t, what in ((v, "v"), (theta, "theta"), (a, "a"), (keep, "keep"), (g_theta, "g_theta"), (g, "g"), (sd, "sd")):
        if t is not None:
            _check(t, torch.float32, what)
            if t.shape[-1] != n or (t.ndim > 1 and t.shape != v.shape):
                raise ValueError(f"{what}: shape {list(t.shape)} does not match v {list(v.shape)} / theta [{n}]")
    lib.lif_bwd_chunk(_ptr(v), v.numel() // n, n, _ptr(theta), _ptr(g) if g is not None else None,
                      SURROGATE_KINDS[surrogate], float(slope), _ptr(a), _ptr(keep), _ptr(sd) if sd is not None else None,
                      _ptr(g_theta))


def gemm_block_size(n_pre: int, n_post: int) -> Optional[int]:
    """The K-block size with which :func:`spike_matmul` reproduces
    ``torch.mm(spikes, weight.t())`` bit for bit for this shape (float32 CPU,
    current thread count), or ``None`` if no candidate does (then use torch.mm).

    Measured once per shape on random binary spikes and random sparse weights:
    the summation order of a GEMM does not depend on the data, and a wrong
    order shows up as rounding differences in almost every output.
    """
    key = (int(n_pre), int(n_post), torch.get_num_threads())
    if key in _block_cache:
        return _block_cache[key]
    if library() is None:
        return None
    g = torch.Generator().manual_seed(12345)
    S = (torch.rand(_PROBE_ROWS, n_pre, generator=g) < 0.4).float()
    W = torch.randn(n_post, n_pre, generator=g) * (torch.rand(n_post, n_pre, generator=g) < 0.5)
    dense = torch.mm(S, W.t())
    csr = csr_by_pre(W)
    found = None
    # fixed block sizes, and K split into n nearly equal blocks (MKL halves K <= 384 on this CPU)
    split = [-(-n_pre // n) for n in range(2, 17)] + [n_pre // n for n in range(2, 17)]
    candidates = list(dict.fromkeys([n_pre] + [b for b in (*_BLOCK_CANDIDATES, *split) if 0 < b < n_pre]))
    for block in candidates:
        if torch.equal(spike_matmul(S, csr, block), dense):
            found = block
            break
    _block_cache[key] = found
    if found is None:
        logger.info("dmn_neuro.simulation.engine.kernels: no summation order reproduces torch.mm for %d -> %d; using torch.mm",
                    n_pre, n_post)
    return found


# ---------------------------------------------------------------------------
# the steps of a recurrent group (KC <-> APL), see spike_ops.c
# ---------------------------------------------------------------------------
#: summation orders of a one-column GEMM that spike_ops.c reproduces (DOT_* there)
DOT_ORDERS = {"lanes4": 0, "sequential": 1}
_dot_cache: Dict[Tuple[int, int, bool, int], Optional[torch.Tensor]] = {}


def _ptrs(ts) -> ctypes.Array:
    """An array of the data pointers of ``ts`` (``None`` stays a NULL pointer)."""
    return (ctypes.c_void_p * max(1, len(ts)))(*[None if t is None else t.data_ptr() for t in ts])


def _i64s(xs) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(xs)))(*[int(x) for x in xs])


def dot_orders(rows: int, n: int, transposed: bool) -> Optional[torch.Tensor]:
    """For each of ``rows`` rows, the summation order (``int32`` codes of
    :data:`DOT_ORDERS`) in which ``torch.mm(X [rows, n], w [n, 1])`` sums, or
    ``None`` when some row sums in an order spike_ops.c does not reproduce.

    ``transposed``: ``w`` is the transpose of a ``[1, n]`` weight (the forward
    of a projection into one neuron), else a contiguous ``[n, 1]`` weight (its
    backward); ``torch.mm`` takes different kernels for the two. Probed with
    float ``X`` (the product's rounding counts too), once per shape and thread
    count, with ``X`` at four
    16-byte aligned offsets: MKL's order depends on the alignment of ``X``, so
    the caller must hand in rows at 16-byte aligned addresses (the scan's
    step views are, when ``rows * n`` is a multiple of 4).
    """
    key = (int(rows), int(n), bool(transposed), torch.get_num_threads())
    if key in _dot_cache:
        return _dot_cache[key]
    lib = library()
    if lib is None:
        return None
    g = torch.Generator().manual_seed(2024)
    found = torch.full((rows,), -1, dtype=torch.int32)
    ok = torch.ones(rows, dtype=torch.bool)
    for trial in range(4):
        w = torch.randn(1, n, generator=g).t() if transposed else torch.randn(n, 1, generator=g)
        base = torch.rand(rows * n + 12, generator=g) * 2 - 1
        X = base[4 * trial:4 * trial + rows * n].view(rows, n)
        want = torch.mm(X, w)[:, 0]
        Xc, wc = X.contiguous(), w.reshape(-1).contiguous()
        match = torch.zeros(rows, dtype=torch.int32)
        for code in sorted(DOT_ORDERS.values(), reverse=True):  # first in DOT_ORDERS wins
            orders = torch.full((rows,), code, dtype=torch.int32)
            got = torch.empty(rows, dtype=torch.float32)
            lib.dot_rows(_ptr(Xc), rows, n, _ptr(wc), _ptr(orders), _ptr(got))
            hit = got.view(torch.int32) == want.view(torch.int32)
            match = torch.where(hit, torch.full_like(match, code + 1), match)
        ok &= (match > 0) & ((found < 0) | (found == match - 1))
        found = torch.where(match > 0, match - 1, found)
    result = found if bool(ok.all()) else None
    _dot_cache[key] = result
    if result is None:
        logger.info("dmn_neuro.simulation.engine.kernels: no summation order reproduces torch.mm for %d rows x %d "
                    "(%s); the recurrent group is stepped in torch", rows, n, "forward" if transposed else "backward")
    return result


def group_forward_chunk(steps: int, rows: int, sizes, ext, V, S, vr, s0, beta, theta, edges) -> None:
    """``steps`` forward steps of a recurrent group (``group_fwd_chunk`` in
    spike_ops.c; all tensors float32, contiguous, prepared by
    :mod:`dmn_neuro.simulation.engine.group_kernel`)."""
    lib = _require()
    cur = torch.empty(max(sizes) * rows, dtype=torch.float32)
    lib.group_fwd_chunk(len(sizes), steps, rows, _i64s(sizes), _ptrs(ext), _ptrs(V), _ptrs(S), _ptrs(vr), _ptrs(s0),
                        (ctypes.c_float * len(beta))(*beta), _ptrs(theta), len(edges.post), _i64s(edges.post),
                        _i64s(edges.pre), _ptr(edges.dot), _ptrs(edges.w), _ptrs(edges.fwd_orders), _ptr(cur))


def group_backward_chunk(steps: int, rows: int, sizes, A, keep, sd, beta, R, skip_last: bool, edges) -> None:
    """The reverse steps of a recurrent group over one chunk (``group_bwd_chunk``)."""
    lib = _require()
    cur = torch.empty(max(sizes) * rows, dtype=torch.float32)
    lib.group_bwd_chunk(len(sizes), steps, rows, _i64s(sizes), _ptrs(A), _ptrs(keep), _ptrs(sd),
                        (ctypes.c_float * len(beta))(*beta), _ptrs(R), int(bool(skip_last)), len(edges.post),
                        _i64s(edges.post), _i64s(edges.pre), _ptr(edges.dot), _ptrs(edges.w), _ptrs(edges.bwd_orders),
                        _ptr(cur))
