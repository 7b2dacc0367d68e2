"""Numba (``numba.njit``) CPU kernels.

Every function here has a NumPy twin with the same signature in :mod:`difnumpy.kernels.reference`,
and a test asserting that they agree. All kernels are compiled with ``cache=True``; the first call
compiles (seconds), later calls and later processes reuse the cached machine code.
"""
from __future__ import annotations

import numba
import numpy as np

# ==== section: diffusion ====
# The elementwise kernels are memory bound and run on one thread: a plain 2-D loop that LLVM
# vectorises streams at the machine's copy bandwidth (benchmarks/bench_forward.py), while numba's
# parallel pool measured slower on the shared 2-core machine at every size up to 1e7 elements
# (thread start-up and synchronisation cost more than a second core's bandwidth adds).


@numba.njit(cache=True)
def _q_sample_into(x0, noise, a, b, out):
    N, M = x0.shape
    for n in range(N):
        an = a[n]
        bn = b[n]
        for j in range(M):
            out[n, j] = an * x0[n, j] + bn * noise[n, j]


def q_sample(x0, noise, sqrt_ab, sqrt_1m_ab, out=None):
    """Numba twin of :func:`difnumpy.kernels.reference.q_sample` (same signature and result)."""
    if out is None:
        out = np.empty_like(x0)
    _q_sample_into(x0, noise, sqrt_ab.astype(x0.dtype), sqrt_1m_ab.astype(x0.dtype), out)
    return out


@numba.njit(cache=True)
def _sampler_update_into(x_t, mo, noise, coef, lo, hi, x_prev, x0_pred):
    N, M = x_t.shape
    for n in range(N):
        A = coef[n, 0]
        B = coef[n, 1]
        C = coef[n, 2]
        D = coef[n, 3]
        E = coef[n, 4]
        low = lo[n]
        high = hi[n]
        for j in range(M):
            x0 = min(max(A * x_t[n, j] + B * mo[n, j], low), high)
            x0_pred[n, j] = x0
            x_prev[n, j] = C * x0 + D * x_t[n, j] + E * noise[n, j]


def sampler_update(x_t, model_output, noise, coef, clip_lo, clip_hi):
    """Numba twin of :func:`difnumpy.kernels.reference.sampler_update` (same signature and result)."""
    dt = x_t.dtype
    x_prev = np.empty_like(x_t)
    x0_pred = np.empty_like(x_t)
    _sampler_update_into(x_t, model_output, noise, coef.astype(dt), clip_lo.astype(dt), clip_hi.astype(dt),
                         x_prev, x0_pred)
    return x_prev, x0_pred


# ==== end section: diffusion ====

# ==== section: nn ====
#
# Convolution and fused GroupNorm+SiLU kernels (twins of the ``nn`` section of reference.py).
#
# Design (measured on the 2-core Xeon (Sapphire Rapids, AVX-512) dev machine, float32, batch 128):
# - 3x3 / stride-1 / pad-1 convs (all but three of the U-Net's convs) use Winograd F(2x2, 3x3) in all
#   three passes (forward, backward-input as a forward with flipped weights, backward-weight): 2.25x
#   fewer multiplies, about 2x faster than the im2col path below (see the Winograd section).
# - Every other conv is "im2col around one GEMM" per chunk of images, with the column matrix kept small
#   (about 1k columns, it stays in L2) instead of one huge (C*KH*KW, N*Ho*Wo) matrix, and the GEMM is
#   BLAS (``np.dot`` inside numba calls scipy's OpenBLAS sgemm/dgemm).
# - 3x3/pad-1/stride-1 ("same") convs use a *wide-row* column matrix: each image is copied once into a
#   padded buffer whose rows are W+p long (the p zero columns between two rows serve as the right pad of
#   one row and the left pad of the next), so every row of the column matrix is ONE contiguous slice of
#   that buffer (a memcpy of H*(W+p) elements) instead of H short, unvectorisable copies of W elements.
#   The GEMM then computes p wasted output columns per row (3.6 % at 28x28, 12.5 % at 8x8) that the
#   bias/crop pass drops. Measured: the classic im2col (H copies of W) cost as much time as the GEMM
#   itself (10.7 ms vs 15 ms at 32->32, 28x28); the wide copy costs ~1/8 of the GEMM.
# - 1x1 convs need no column matrix at all (the image rows *are* the columns); backward-input of 1x1 and
#   of "same" convs is a forward conv with the transposed / flipped weights (a gather, no scatter-add).
# - Other convs (the stride-2 Downsample) use a general im2col / col2im.
# - Threads: NOT numba's parallel layer. The kernels are serial ``nogil`` functions that take a share
#   ``(t, nt)`` of the work (each share owns its buffers); ``_run_split`` runs share 0 in the calling
#   thread and the others on a small ``ThreadPoolExecutor`` (nt = ``numba.get_num_threads()``), with
#   BLAS held to one thread meanwhile (threadpoolctl; set once per kernel call, ~25 us). Why: numba's
#   ``omp`` layer (GNU OpenMP) waits by spinning; on this shared 2-core machine a spinning thread
#   holds a core while its peer is descheduled, and a 0.3 ms GroupNorm took 8-16 ms (50x) with 2
#   threads. OMP_WAIT_POLICY=PASSIVE cures it only if set before the first OpenMP runtime loads
#   (with torch imported first numba binds torch's libgomp), so the kernels wait passively instead
#   (futex-based futures), which costs ~30-60 us per call (~85 us measured later) and never collapses.
#   A whole U-Net pass avoids even that: ``batch_shares`` / ``run_shares`` split the batch over the
#   threads and each runs the whole pass with serial kernels (two hand-offs per pass instead of 30-60).
# - GroupNorm+SiLU is one fused pass per (image, group) (the group's data stays in L1/L2): statistics
#   in float64 (two-pass), normalise+affine+SiLU in one sweep; backward recomputes the SiLU
#   derivative and makes two sweeps. For float32 the sigmoid uses a vectorisable exp
#   (2**k * poly(f), |rel. error| < 3e-7) because numba's math.exp is a scalar libm call here (no
#   SVML): ~4x faster. float64 uses math.exp.
# - Kernels that divide are compiled with ``error_model="numpy"`` (IEEE results, no ZeroDivisionError
#   check): numba's default Python error model puts a branch on every division, which kept LLVM from
#   vectorising the sigmoid loop (4x slower, measured). The NumPy twins give the same IEEE results.

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

try:  # optional: keep BLAS single-threaded inside our own numba-threaded loops
    from threadpoolctl import ThreadpoolController as _TPC
    _TP_CONTROLLER = None
except ImportError:  # pragma: no cover
    _TPC = None
    _TP_CONTROLLER = None

_CHUNK_COLS = 1024  # at most this many columns in the per-chunk column matrix ...
_CHUNK_BYTES = 1 << 19  # ... and at most about this many bytes (K rows): it stays in L2 next to BLAS's packs


_BLAS_HOLD_LOCK = threading.Lock()
_BLAS_HOLD = [0, None]  # [depth, active threadpoolctl limiter]: BLAS's thread count is process-global


class _BlasOneThread:
    """Context manager: BLAS limited to one thread while ``nt > 1`` of our threads run (no-op otherwise).

    Re-entrant: nested scopes (a model step around its kernel calls) set the limit once and restore
    it when the outermost scope exits.
    """

    def __init__(self, nt=2):
        self._on = nt > 1 and _TPC is not None

    def __enter__(self):
        global _TP_CONTROLLER
        if self._on:
            with _BLAS_HOLD_LOCK:
                if _BLAS_HOLD[0] == 0:
                    if _TP_CONTROLLER is None:
                        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot BLAS; load before scanning)
                        _TP_CONTROLLER = _TPC()
                    _BLAS_HOLD[1] = _TP_CONTROLLER.limit(limits=1, user_api="blas")
                _BLAS_HOLD[0] += 1
        return self

    def __exit__(self, *exc):
        if self._on:
            with _BLAS_HOLD_LOCK:
                _BLAS_HOLD[0] -= 1
                if _BLAS_HOLD[0] == 0:
                    limiter, _BLAS_HOLD[1] = _BLAS_HOLD[1], None
                    limiter.restore_original_limits()
        return False


def _step_scope():
    """Context for a whole model call on this backend (used by :class:`difnumpy.nn.unet.UNet`).

    With ``numba.get_num_threads() > 1`` it holds BLAS to one thread for the whole forward or backward
    pass, not only inside each kernel: a multi-threaded BLAS call (the U-Net's small linear layers)
    leaves OpenBLAS's worker threads spinning (sched_yield) for ~0.1 s, and on a loaded 2-core machine
    they took the core that our second share needed (8x8 training step 2.3x slower, measured).
    """
    return _BlasOneThread(_nthreads())


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool(workers):
    """The shared worker pool (created lazily, grown if more workers are asked for)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="difnumpy-nn")
        return _POOL


def _run_split(kernel, nt, blas, *args):
    """Run ``kernel(*args, t, nt)`` for ``t = 0 .. nt-1`` concurrently (share 0 in this thread).

    ``kernel`` is a ``nogil`` numba function; ``blas``: hold BLAS to one thread while the shares run.
    """
    if nt <= 1 or getattr(_SHARE, "active", False):  # inside a batch share: serial (no nested pool use)
        kernel(*args, 0, 1)
        return
    pool = _pool(nt - 1)
    ctx = _BlasOneThread(nt) if blas else contextlib.nullcontext()
    with ctx:
        futs = [pool.submit(kernel, *args, t, nt) for t in range(1, nt)]
        try:
            kernel(*args, 0, nt)
        finally:
            for f in futs:
                f.result()


# ---- whole-pass data parallelism: the batch split over threads ----
# A 2-thread kernel call costs ~85 us of hand-off (waking a sleeping worker on this VM, then the GIL);
# a U-Net pass makes 30-60 such calls. Splitting the *batch* instead, each thread running the whole
# pass on its share with single-threaded kernels, needs 2 hand-offs per pass and no per-kernel barrier:
# measured 19 % (forward) and 18 % (forward+backward) faster at 8x8, 15 % / 9 % at 28x28 (batch 128).
_MIN_SHARE = 4  # images per share at least; smaller batches run as one share (multi-threaded kernels)


def batch_shares(n: int):
    """How a whole model pass over ``n`` images is split over the numba threads.

    Returns ``None`` (run as one pass) or a list of ``(start, stop)`` image ranges, one per thread.
    """
    nt = min(_nthreads(), int(n) // _MIN_SHARE)
    if nt < 2:
        return None
    bounds = [int(n) * i // nt for i in range(nt + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


_SHARE = threading.local()  # .active: this thread is running a batch share (its kernels run serially)


def _one_thread(fn, k, start, stop):
    prev = numba.get_num_threads()  # thread-local in numba: kernels called by fn run serially
    numba.set_num_threads(1)
    _SHARE.active = True
    try:
        return fn(k, start, stop)
    finally:
        _SHARE.active = False
        numba.set_num_threads(prev)


def run_shares(fn, shares):
    """Run ``fn(k, start, stop)`` for every share concurrently (share 0 in this thread); results in order.

    Inside ``fn`` the numba kernels run single-threaded. An exception of any share is re-raised here
    after all shares have finished.
    """
    pool = _pool(len(shares) - 1)
    futs = [pool.submit(_one_thread, fn, k, a, b) for k, (a, b) in enumerate(shares[1:], start=1)]
    try:
        first = _one_thread(fn, 0, *shares[0])
    finally:
        rest = [f.exception() for f in futs]  # wait for all, even if share 0 failed
    for e in rest:
        if e is not None:
            raise e
    return [first] + [f.result() for f in futs]


def _conv_mode(KH, KW, stride, padding):
    """0: 'same' stride-1 conv (wide rows), 1: 1x1 stride-1 pad-0, 2: general im2col, 3: Winograd 3x3."""
    if USE_WINOGRAD and stride == 1 and KH == 3 and KW == 3 and padding == 1:
        return 3
    if stride == 1 and KH == KW and KH == 2 * padding + 1 and padding >= 1:
        return 0
    if stride == 1 and KH == 1 and KW == 1 and padding == 0:
        return 1
    return 2


@numba.njit(cache=True)
def _fill_cols(x, n, g, mode, KH, KW, stride, pad, Ho, Wo, Wr, xp, cols):
    """Write the column block of image ``n`` into ``cols[:, g*Ho*Wr:(g+1)*Ho*Wr]``."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    L = Ho * Wr
    c0 = g * L
    if mode == 1:
        for c in range(C):
            src = x[n, c].ravel()
            dst = cols[c, c0:c0 + L]
            for l in range(L):
                dst[l] = src[l]
        return
    if mode == 0:
        # padded image with shared zero columns: pixel (i, j) at (i + pad) * Wr + pad + j
        for c in range(C):
            for i in range(H):
                o = (i + pad) * Wr + pad
                drow = xp[c, o:o + W]
                srow = x[n, c, i]
                for j in range(W):
                    drow[j] = srow[j]
        for c in range(C):
            for kh in range(KH):
                for kw in range(KW):
                    dst = cols[(c * KH + kh) * KW + kw, c0:c0 + L]
                    s0 = kh * Wr + kw
                    src = xp[c, s0:s0 + L]
                    for l in range(L):
                        dst[l] = src[l]
        return
    # general: zero-padded image (C, Hp, Wp) then strided gather
    Wp = W + 2 * pad
    for c in range(C):
        for i in range(H):
            o = (i + pad) * Wp + pad
            drow = xp[c, o:o + W]
            srow = x[n, c, i]
            for j in range(W):
                drow[j] = srow[j]
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                for i in range(Ho):
                    s0 = (i * stride + kh) * Wp + kw
                    o = c0 + i * Wo
                    dst = cols[(c * KH + kh) * KW + kw, o:o + Wo]
                    src = xp[c, s0:s0 + stride * (Wo - 1) + 1]
                    for j in range(Wo):
                        dst[j] = src[j * stride]


def _xp_len(mode, H, W, pad):
    if mode == 0:
        return (H + 2 * pad) * (W + pad) + 2 * pad
    if mode == 1:
        return 1
    return (H + 2 * pad) * (W + 2 * pad)


@numba.njit(cache=True, nogil=True)
def _conv_fwd_kernel(x, w2, b, mode, KH, KW, stride, pad, Ho, Wo, Wr, G, xplen, out, t, nthreads):
    N, C = x.shape[0], x.shape[1]
    F, K = w2.shape
    L = Ho * Wr
    nchunks = (N + G - 1) // G
    xp = np.zeros((C, xplen), x.dtype)
    colbuf = np.empty(K * G * L, x.dtype)
    tmpbuf = np.empty(F * G * L, x.dtype)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        cols = colbuf[:K * g * L].reshape(K, g * L)
        tmp = tmpbuf[:F * g * L].reshape(F, g * L)
        for gg in range(g):
            _fill_cols(x, n0 + gg, gg, mode, KH, KW, stride, pad, Ho, Wo, Wr, xp, cols)
        np.dot(w2, cols, tmp)
        for gg in range(g):
            for f in range(F):
                bf = b[f]
                for i in range(Ho):
                    s0 = gg * L + i * Wr
                    src = tmp[f, s0:s0 + Wo]
                    dst = out[n0 + gg, f, i]
                    for j in range(Wo):
                        dst[j] = src[j] + bf


# ---- Winograd F(2x2, 3x3) for 3x3 / stride-1 / pad-1 convs (Lavin & Gray 2016, arXiv 1509.09308) ----
#
# Each 2x2 output tile Y of one (image, filter) pair is (Lavin & Gray, Sec. 4.1, eq. 8-10)
#     Y = A^T [ sum_c (G g_fc G^T) ⊙ (B^T d_c B) ] A,   d_c the 4x4 input tile of channel c,
# i.e. 16 GEMMs (one per position k of the 4x4 tile) of the transformed weights U[k] (F, C) with the
# transformed tiles V[k] (C, tiles): 16 multiplies per 2x2 outputs instead of 36, 2.25x fewer flops.
# Layout (measured choices, 2-core AVX-512 machine, float32, batch 128):
# - the input tile transform vectorises over channels: each image is first transposed into a zero-
#   padded HWC buffer with even and odd columns stored apart, so that every step of B^T d B is one
#   contiguous vector loop over (tiles of a row) x channels. Vectorised over the 4-8 tiles of a row
#   instead, it ran 4x slower at 8x8.
# - all inner loops index slices (views) with the loop counter: computed offsets (``a[o + i]``) kept
#   LLVM from vectorising them (numba's negative-index handling), 6-10x slower.
# - the 16 planes lie _WINO_PAD elements more than a power of two apart (L1 set conflicts);
# - the transformed tiles of a chunk (about _WINO_TILES tiles) stay in L2 next to BLAS's packs.
# Exactness: float64 and float32 agree with the direct conv to rounding (tests); F(2x2, 3x3) uses only
# the points 0, +-1 (and 1/2 in G), so it is as accurate as the direct sum.

USE_WINOGRAD = True  # False: 3x3 stride-1 convs use the im2col path (kept for tests and benchmarks)
_WINO_TILES = 256
_WINO_PAD = 48
_WINO_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


@numba.njit(cache=True, inline="always")
def _axpby(a, sa, b, sb, out):
    for i in range(out.size):
        out[i] = sa * a[i] + sb * b[i]


@numba.njit(cache=True, inline="always")
def _sum3(a, b, sb, d, sd, out):
    for i in range(out.size):
        out[i] = a[i] + sb * b[i] + sd * d[i]


@numba.njit(cache=True, nogil=True)
def _wino_input(xn, th, tw, xh, rt, Vf, PV, p0):
    """V[k][p0 + ti*tw + tj, :] = (B^T d B)[k] for every 4x4 tile of image ``xn`` (C, H, W).

    ``xh``: (2*th+2) rows of (2*tw+2) pixels x C, zero border, columns 2J and 2J+1 stored at J and
    tw+1+J; ``rt``: 4 rows scratch; plane k of V starts at ``Vf[k * PV]``, row p at ``p * C``.
    """
    C, H, W = xn.shape
    Wp = 2 * tw + 2
    half = tw + 1
    RC = Wp * C
    L = tw * C
    one = xh.dtype.type(1.0)
    for i in range(H):
        for j in range(W):
            jj = j + 1
            o = (i + 1) * RC + ((jj & 1) * half + (jj >> 1)) * C
            row = xh[o:o + C]
            for c in range(C):
                row[c] = xn[c, i, j]
    for ti in range(th):
        r = 2 * ti * RC
        d0 = xh[r:r + RC]
        d1 = xh[r + RC:r + 2 * RC]
        d2 = xh[r + 2 * RC:r + 3 * RC]
        d3 = xh[r + 3 * RC:r + 4 * RC]
        # B^T d (rows): d0 - d2, d1 + d2, d2 - d1, d1 - d3
        _axpby(d0, one, d2, -one, rt[0:RC])
        _axpby(d1, one, d2, one, rt[RC:2 * RC])
        _axpby(d2, one, d1, -one, rt[2 * RC:3 * RC])
        _axpby(d1, one, d3, -one, rt[3 * RC:4 * RC])
        # (.) B (columns a0..a3 = even[J], odd[J], even[J+1], odd[J+1]): a0 - a2, a1 + a2, a2 - a1, a1 - a3
        o = (p0 + ti * tw) * C
        for q in range(4):
            e = q * RC
            od = e + half * C
            e0 = rt[e:e + L]
            e1 = rt[e + C:e + C + L]
            o0 = rt[od:od + L]
            o1 = rt[od + C:od + C + L]
            k = 4 * q * PV + o
            _axpby(e0, one, e1, -one, Vf[k:k + L])
            _axpby(o0, one, e1, one, Vf[k + PV:k + PV + L])
            _axpby(e1, one, o0, -one, Vf[k + 2 * PV:k + 2 * PV + L])
            _axpby(o0, one, o1, -one, Vf[k + 3 * PV:k + 3 * PV + L])


@numba.njit(cache=True, nogil=True)
def _wino_fwd_kernel(x, Ub, F, b, th, tw, G, out, t, nthreads):
    N, C, H, W = x.shape
    TT = th * tw
    nchunks = (N + G - 1) // G
    PV = G * TT * C + _WINO_PAD
    PM = G * TT * F + _WINO_PAD
    xh = np.zeros((2 * th + 2) * (2 * tw + 2) * C, x.dtype)
    rt = np.empty(4 * (2 * tw + 2) * C, x.dtype)
    Vf = np.empty(16 * PV, x.dtype)
    Mf = np.empty(16 * PM, x.dtype)
    Sf = np.empty(8 * PM, x.dtype)
    one = x.dtype.type(1.0)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        T = g * TT
        FT = F * T
        for gg in range(g):
            _wino_input(x[n0 + gg], th, tw, xh, rt, Vf, PV, gg * TT)
        for k in range(16):
            # M[k] (T, F) = V[k] (T, C) @ U[k]^T (C, F); (F, T) = U @ V^T measured 1.8x slower in OpenBLAS
            np.dot(Vf[k * PV:k * PV + T * C].reshape(T, C), Ub[k, :C * F].reshape(C, F),
                   Mf[k * PM:k * PM + FT].reshape(T, F))
        # A^T M: S_p = m_p + m_{4+p} + m_{8+p}, D_p = m_{4+p} - m_{8+p} - m_{12+p}
        for p in range(4):
            _sum3(Mf[p * PM:p * PM + FT], Mf[(4 + p) * PM:(4 + p) * PM + FT], one,
                  Mf[(8 + p) * PM:(8 + p) * PM + FT], one, Sf[p * PM:p * PM + FT])
            _sum3(Mf[(4 + p) * PM:(4 + p) * PM + FT], Mf[(8 + p) * PM:(8 + p) * PM + FT], -one,
                  Mf[(12 + p) * PM:(12 + p) * PM + FT], -one, Sf[(4 + p) * PM:(4 + p) * PM + FT])
        # (.) A: Y_{a0} = r_0 + r_1 + r_2, Y_{a1} = r_1 - r_2 - r_3 (r = S for a = 0, D for a = 1)
        for a in range(2):
            s = 4 * a * PM
            _sum3(Sf[s:s + FT], Sf[s + PM:s + PM + FT], one, Sf[s + 2 * PM:s + 2 * PM + FT], one,
                  Mf[2 * a * PM:2 * a * PM + FT])
            _sum3(Sf[s + PM:s + PM + FT], Sf[s + 2 * PM:s + 2 * PM + FT], -one,
                  Sf[s + 3 * PM:s + 3 * PM + FT], -one, Mf[(2 * a + 1) * PM:(2 * a + 1) * PM + FT])
        # out[n, f, 2ti + a, 2tj + b] = Y_{ab}[tile, f] + b[f]
        for gg in range(g):
            on = out[n0 + gg]
            for i in range(H):
                s = 2 * (i & 1) * PM + (gg * TT + (i >> 1) * tw) * F
                for j in range(W):
                    o = s + (j & 1) * PM + (j >> 1) * F
                    src = Mf[o:o + F]
                    for f in range(F):
                        on[f, i, j] = src[f] + b[f]


@numba.njit(cache=True, nogil=True)
def _wino_dy_tiles(dn, th, tw, Yf, PM, T, p0):
    """Planes 2a+b of ``Yf`` (each (F, T), PM apart) get dn[f, 2ti + a, 2tj + b] at column p0 + ti*tw + tj.

    A function of its own: inlined in the backward kernel the same loops ran 3x slower (measured).
    """
    F, H, W = dn.shape
    W2 = W >> 1
    TT = th * tw
    zero = dn.dtype.type(0.0)
    for f in range(F):
        src = dn[f]
        s = f * T + p0
        y00 = Yf[s:s + TT]
        y01 = Yf[PM + s:PM + s + TT]
        y10 = Yf[2 * PM + s:2 * PM + s + TT]
        y11 = Yf[3 * PM + s:3 * PM + s + TT]
        for ti in range(H >> 1):
            r0 = src[2 * ti]
            r1 = src[2 * ti + 1]
            o = ti * tw
            for tj in range(W2):
                y00[o + tj] = r0[2 * tj]
                y01[o + tj] = r0[2 * tj + 1]
                y10[o + tj] = r1[2 * tj]
                y11[o + tj] = r1[2 * tj + 1]
        # odd sizes: the last tile column / row reaches outside the image. Kept out of the loop
        # above: the never-taken branch in it made LLVM's code 8x slower at 8x8 (measured).
        if W & 1:
            for i in range(H):
                o = (i >> 1) * tw + tw - 1
                if i & 1:
                    y10[o] = src[i, W - 1]
                    y11[o] = zero
                else:
                    y00[o] = src[i, W - 1]
                    y01[o] = zero
        if H & 1:
            o = (th - 1) * tw
            r0 = src[H - 1]
            for tj in range(W2):
                y00[o + tj] = r0[2 * tj]
                y01[o + tj] = r0[2 * tj + 1]
            y10[o:o + tw] = zero
            y11[o:o + tw] = zero


@numba.njit(cache=True, nogil=True)
def _wino_bwd_weight_kernel(dout, x, th, tw, G, dU_parts, t, nthreads):
    N, C, H, W = x.shape
    F = dout.shape[1]
    TT = th * tw
    nchunks = (N + G - 1) // G
    PV = G * TT * C + _WINO_PAD
    PM = G * TT * F + _WINO_PAD
    xh = np.zeros((2 * th + 2) * (2 * tw + 2) * C, x.dtype)
    rt = np.empty(4 * (2 * tw + 2) * C, x.dtype)
    Vf = np.empty(16 * PV, x.dtype)
    Yf = np.empty(4 * PM, x.dtype)
    Rf = np.empty(8 * PM, x.dtype)
    Zf = np.empty(16 * PM, x.dtype)
    tmp = np.empty((F, C), x.dtype)
    dU = dU_parts[t]  # (16, >= F*C)
    one = x.dtype.type(1.0)
    zero = x.dtype.type(0.0)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        T = g * TT
        FT = F * T
        for gg in range(g):
            _wino_input(x[n0 + gg], th, tw, xh, rt, Vf, PV, gg * TT)
            _wino_dy_tiles(dout[n0 + gg], th, tw, Yf, PM, T, gg * TT)
        # A dY (rows): R_{0b} = y_{0b}, R_{1b} = y_{0b} + y_{1b}, R_{2b} = y_{0b} - y_{1b}, R_{3b} = -y_{1b}
        for bb in range(2):
            y0 = Yf[bb * PM:bb * PM + FT]
            y1 = Yf[(2 + bb) * PM:(2 + bb) * PM + FT]
            _axpby(y0, one, y1, zero, Rf[bb * PM:bb * PM + FT])
            _axpby(y0, one, y1, one, Rf[(2 + bb) * PM:(2 + bb) * PM + FT])
            _axpby(y0, one, y1, -one, Rf[(4 + bb) * PM:(4 + bb) * PM + FT])
            _axpby(y0, zero, y1, -one, Rf[(6 + bb) * PM:(6 + bb) * PM + FT])
        # (.) A^T (columns): Z_{q0} = R_{q0}, Z_{q1} = R_{q0} + R_{q1}, Z_{q2} = R_{q0} - R_{q1}, Z_{q3} = -R_{q1}
        for q in range(4):
            r0 = Rf[2 * q * PM:2 * q * PM + FT]
            r1 = Rf[(2 * q + 1) * PM:(2 * q + 1) * PM + FT]
            k = 4 * q
            _axpby(r0, one, r1, zero, Zf[k * PM:k * PM + FT])
            _axpby(r0, one, r1, one, Zf[(k + 1) * PM:(k + 1) * PM + FT])
            _axpby(r0, one, r1, -one, Zf[(k + 2) * PM:(k + 2) * PM + FT])
            _axpby(r0, zero, r1, -one, Zf[(k + 3) * PM:(k + 3) * PM + FT])
        for k in range(16):
            # dU[k] (F, C) += Z[k] (F, T) @ V[k] (T, C)
            np.dot(Zf[k * PM:k * PM + FT].reshape(F, T), Vf[k * PV:k * PV + T * C].reshape(T, C), tmp)
            dU[k, :F * C] += tmp.ravel()


@numba.njit(cache=True, inline="always")
def _g_rows(g0, g1, g2, h):
    """G (g0, g1, g2)^T: the 4 entries of G g for one column of a 3x3 kernel."""
    return g0, h * (g0 + g1 + g2), h * (g0 - g1 + g2), g2


@numba.njit(cache=True, inline="always")
def _gt_rows(u0, u1, u2, u3, h):
    """G^T (u0, u1, u2, u3)^T: the adjoint of :func:`_g_rows`."""
    return u0 + h * (u1 + u2), h * (u1 - u2), h * (u1 + u2) + u3


@numba.njit(cache=True)
def _wino_weights(w, Ub):
    """Ub[4k + l, c*F + f] = (G w[f, c] G^T)[k, l]: plane k of ``Ub`` (16, >= C*F) is U[k]^T, shape (C, F).

    Planes are padded apart (``Ub.shape[1] > C*F``) and written in order: 16 plane streams a power of
    two apart conflicted in L1 (8x slower).
    """
    F, C = w.shape[0], w.shape[1]
    h = w.dtype.type(0.5)
    wf = w.reshape(F, C * 9)
    for c in range(C):
        for f in range(F):
            g = wf[f, 9 * c:9 * c + 9]
            a0, a1, a2, a3 = _g_rows(g[0], g[3], g[6], h)  # column 0 of G g
            b0, b1, b2, b3 = _g_rows(g[1], g[4], g[7], h)
            c0, c1, c2, c3 = _g_rows(g[2], g[5], g[8], h)
            q = c * F + f
            # row k of (G g) G^T
            Ub[0, q], Ub[1, q], Ub[2, q], Ub[3, q] = _g_rows(a0, b0, c0, h)
            Ub[4, q], Ub[5, q], Ub[6, q], Ub[7, q] = _g_rows(a1, b1, c1, h)
            Ub[8, q], Ub[9, q], Ub[10, q], Ub[11, q] = _g_rows(a2, b2, c2, h)
            Ub[12, q], Ub[13, q], Ub[14, q], Ub[15, q] = _g_rows(a3, b3, c3, h)


@numba.njit(cache=True)
def _wino_weight_grad(dUb, dw):
    """dw[f, c] = G^T dU[f, c] G, the adjoint of :func:`_wino_weights`; plane 4k + l of ``dUb`` is dU[k, l] (F, C)."""
    F, C = dw.shape[0], dw.shape[1]
    h = dw.dtype.type(0.5)
    for f in range(F):
        for c in range(C):
            q = f * C + c
            # column l of G^T dU
            p0, p1, p2 = _gt_rows(dUb[0, q], dUb[4, q], dUb[8, q], dUb[12, q], h)
            q0, q1, q2 = _gt_rows(dUb[1, q], dUb[5, q], dUb[9, q], dUb[13, q], h)
            r0, r1, r2 = _gt_rows(dUb[2, q], dUb[6, q], dUb[10, q], dUb[14, q], h)
            s0, s1, s2 = _gt_rows(dUb[3, q], dUb[7, q], dUb[11, q], dUb[15, q], h)
            dw[f, c, 0, 0], dw[f, c, 0, 1], dw[f, c, 0, 2] = _gt_rows(p0, q0, r0, s0, h)
            dw[f, c, 1, 0], dw[f, c, 1, 1], dw[f, c, 1, 2] = _gt_rows(p1, q1, r1, s1, h)
            dw[f, c, 2, 0], dw[f, c, 2, 1], dw[f, c, 2, 2] = _gt_rows(p2, q2, r2, s2, h)


def _wino_chunk(TT, N, C, F, itemsize):
    """Images per chunk: the chunk's 16 planes of C + F rows take about 1 MiB (they stay in L2)."""
    tiles = max(32, min(2 * _WINO_TILES, (1 << 20) // (16 * itemsize * max(C + F, 1))))
    return max(1, min(N, tiles // TT))


def _wino_forward(x, w, b):
    N, C, H, W = x.shape
    F = w.shape[0]
    th, tw = (H + 1) // 2, (W + 1) // 2
    Ub = np.empty((16, C * F + _WINO_PAD), x.dtype)
    _wino_weights(w, Ub)
    G = _wino_chunk(th * tw, N, C, F, x.itemsize)
    nt = min(_nthreads(), (N + G - 1) // G)
    out = np.empty((N, F, H, W), x.dtype)
    _run_split(_wino_fwd_kernel, nt, True, x, Ub, F, b, th, tw, G, out)
    return out


def _wino_backward_weight(dout, x):
    N, C, H, W = x.shape
    F = dout.shape[1]
    th, tw = (H + 1) // 2, (W + 1) // 2
    G = _wino_chunk(th * tw, N, C, F, x.itemsize)
    nt = min(_nthreads(), (N + G - 1) // G)
    dU_parts = np.zeros((nt, 16, F * C + _WINO_PAD), x.dtype)
    _run_split(_wino_bwd_weight_kernel, nt, True, dout, x, th, tw, G, dU_parts)
    dw = np.empty((F, C, 3, 3), x.dtype)
    _wino_weight_grad(dU_parts.sum(axis=0) if nt > 1 else dU_parts[0], dw)
    # per-plane float32 sums over the contiguous H*W axis, then float64 over N (fast; (0, 2, 3) is not)
    db = dout.reshape(N, F, H * W).sum(axis=2).sum(axis=0, dtype=np.float64)
    return dw, db.astype(x.dtype)


@numba.njit(cache=True, nogil=True)
def _conv1x1_fwd_kernel(x, w2, b, out, t, nthreads):
    """1x1 stride-1 conv: one GEMM per image, ``out[n] (F, HW) = w2 (F, C) @ x[n] (C, HW) + b``.

    No column matrix: the image is its own. Measured 1.2-4x faster than the chunked copy + GEMM
    (batch 128; 4x at 4x4 images, where the copy loops dominated).
    """
    N, C = x.shape[0], x.shape[1]
    F = w2.shape[0]
    L = x.shape[2] * x.shape[3]
    for n in range(t * N // nthreads, (t + 1) * N // nthreads):
        o = out[n].reshape(F, L)
        np.dot(w2, x[n].reshape(C, L), o)
        for f in range(F):
            bf = b[f]
            for l in range(L):
                o[f, l] += bf


@numba.njit(cache=True, nogil=True)
def _conv1x1_bwd_weight_kernel(dout, x, dw_parts, db_parts, t, nthreads):
    """dw (F, C) += dout[n] (F, HW) @ x[n]^T (HW, C) per image; db[f] += sum dout[n, f]."""
    N, C = x.shape[0], x.shape[1]
    F = dout.shape[1]
    L = x.shape[2] * x.shape[3]
    tmp = np.empty((F, C), x.dtype)
    acc = dw_parts[t]
    for n in range(t * N // nthreads, (t + 1) * N // nthreads):
        d = dout[n].reshape(F, L)
        np.dot(d, x[n].reshape(C, L).T, tmp)
        acc += tmp
        for f in range(F):
            s = 0.0
            for l in range(L):
                s += d[f, l]
            db_parts[t, f] += s


def _nthreads():
    return max(1, int(numba.get_num_threads()))


_GN_PARALLEL_MIN = 1 << 16  # elements; below this a second thread's wake-up costs more than it saves


def _gn_threads(size):
    return _nthreads() if size >= _GN_PARALLEL_MIN else 1


def _chunk(L, N, K=1, itemsize=4):
    """Images per chunk: about min(_CHUNK_COLS, _CHUNK_BYTES / (K * itemsize)) columns, >= 128, whole images.

    Measured (float32, 1 thread, batch 128): 32->32 3x3 8x8 2.7 -> 2.3 ms, 64->64 8x8 7.9 -> 6.6 ms,
    96->32 8x8 10.3 -> 7.0 ms going from 1024 to 256-512 columns for K = 288..864 (the GEMM reaches
    85-107 instead of 60-93 GFLOP/s, and the column fill stays in L2).
    """
    cols = max(128, min(_CHUNK_COLS, _CHUNK_BYTES // max(K * itemsize, 1)))
    return max(1, min(N, cols // max(L, 1)))


def _conv_forward_impl(x, w, b, stride, padding):
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    Ho = (H + 2 * padding - KH) // stride + 1
    Wo = (W + 2 * padding - KW) // stride + 1
    mode = _conv_mode(KH, KW, stride, padding)
    if mode == 3:
        return _wino_forward(x, w, b)
    if mode == 1:
        out = np.empty((N, F, Ho, Wo), x.dtype)
        _run_split(_conv1x1_fwd_kernel, min(_nthreads(), N), True, x, np.ascontiguousarray(w.reshape(F, C)), b, out)
        return out
    Wr = W + padding if mode == 0 else Wo
    G = _chunk(Ho * Wr, N, C * KH * KW, x.itemsize)
    nt = min(_nthreads(), (N + G - 1) // G)
    out = np.empty((N, F, Ho, Wo), x.dtype)
    w2 = np.ascontiguousarray(w.reshape(F, C * KH * KW))
    _run_split(_conv_fwd_kernel, nt, True, x, w2, np.ascontiguousarray(b), mode, KH, KW, stride, padding,
               Ho, Wo, Wr, G, _xp_len(mode, H, W, padding), out)
    return out


def _check_conv_args(name, x, w):
    if x.dtype not in (np.float32, np.float64) or w.dtype != x.dtype:
        raise TypeError(f"{name}: arrays must be float32 or float64 of one dtype, got {x.dtype} and {w.dtype}")


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """2-D cross-correlation, NCHW (numba; twin of :func:`difnumpy.kernels.reference.conv2d_forward`).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``x``
    b : ndarray, shape (F,), dtype of ``x``
    stride : int >= 1
    padding : int >= 0

    Returns
    -------
    out : ndarray, shape (N, F, Ho, Wo), dtype of ``x``.

    Notes
    -----
    ``out[n, f, i, j] = b[f] + sum_{c,u,v} w[f, c, u, v] * xp[n, c, i*stride + u, j*stride + v]``,
    computed as im2col (wide rows for "same" convs) + one BLAS GEMM per chunk of images.
    """
    _check_conv_args("conv2d_forward", x, w)
    x = np.ascontiguousarray(x)
    return _conv_forward_impl(x, np.ascontiguousarray(w), np.ascontiguousarray(b, dtype=x.dtype),
                              int(stride), int(padding))


@numba.njit(cache=True)
def _col2im_add(dcols, c0, KH, KW, stride, pad, Ho, Wo, dxp):
    C = dxp.shape[0]
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                src = dcols[(c * KH + kh) * KW + kw]
                for i in range(Ho):
                    row = dxp[c, i * stride + kh, kw:kw + stride * (Wo - 1) + 1]
                    o = c0 + i * Wo
                    s = src[o:o + Wo]
                    for j in range(Wo):
                        row[j * stride] += s[j]


@numba.njit(cache=True, nogil=True)
def _conv_bwd_input_general(dout, w2t, KH, KW, stride, pad, H, W, G, dx, t, nthreads):
    N, F, Ho, Wo = dout.shape
    K = w2t.shape[0]
    C = dx.shape[1]
    L = Ho * Wo
    nchunks = (N + G - 1) // G
    dchbuf = np.empty(F * G * L, dout.dtype)
    dcolbuf = np.empty(K * G * L, dout.dtype)
    dxp = np.empty((C, H + 2 * pad + stride, W + 2 * pad + stride), dout.dtype)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        dch = dchbuf[:F * g * L].reshape(F, g * L)
        dcols = dcolbuf[:K * g * L].reshape(K, g * L)
        for gg in range(g):
            for f in range(F):
                src = dout[n0 + gg, f].ravel()
                dst = dch[f, gg * L:gg * L + L]
                for l in range(L):
                    dst[l] = src[l]
        np.dot(w2t, dch, dcols)
        for gg in range(g):
            dxp[:] = 0
            _col2im_add(dcols, gg * L, KH, KW, stride, pad, Ho, Wo, dxp)
            for c in range(C):
                for i in range(H):
                    drow = dx[n0 + gg, c, i]
                    srow = dxp[c, i + pad, pad:pad + W]
                    for j in range(W):
                        drow[j] = srow[j]


def conv2d_backward_input(dout: np.ndarray, w: np.ndarray, x_shape: tuple, stride: int,
                          padding: int) -> np.ndarray:
    """Gradient of :func:`conv2d_forward` with respect to ``x`` (numba twin of the reference).

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``dout``
    x_shape : tuple (N, C, H, W)
    stride, padding : as in the forward pass

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``dout``.

    Notes
    -----
    ``dxp[n, c, i*stride + u, j*stride + v] += sum_f dout[n, f, i, j] * w[f, c, u, v]``. For "same"
    stride-1 convs and 1x1 convs this is a forward conv of ``dout`` with the weights transposed
    (F <-> C) and flipped (u -> KH-1-u, v -> KW-1-v); otherwise GEMM + col2im.
    """
    _check_conv_args("conv2d_backward_input", dout, w)
    dout = np.ascontiguousarray(dout)
    N, C, H, W = (int(s) for s in x_shape)
    F, _, KH, KW = w.shape
    stride, padding = int(stride), int(padding)
    mode = _conv_mode(KH, KW, stride, padding)
    if mode != 2:
        wt = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        return _conv_forward_impl(dout, wt, np.zeros(C, dout.dtype), 1, padding)
    Ho, Wo = dout.shape[2], dout.shape[3]
    G = _chunk(Ho * Wo, N, max(F, C * KH * KW), dout.itemsize)
    nt = min(_nthreads(), (N + G - 1) // G)
    w2t = np.ascontiguousarray(w.reshape(F, C * KH * KW).T)
    dx = np.empty((N, C, H, W), dout.dtype)
    _run_split(_conv_bwd_input_general, nt, True, dout, w2t, KH, KW, stride, padding, H, W, G, dx)
    return dx


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _conv_bwd_weight_kernel(dout, x, mode, KH, KW, stride, pad, Ho, Wo, Wr, G, xplen,
                            dw_parts, db_parts, t, nthreads):
    N, C = x.shape[0], x.shape[1]
    F = dout.shape[1]
    K = C * KH * KW
    L = Ho * Wr
    nchunks = (N + G - 1) // G
    xp = np.zeros((C, xplen), x.dtype)
    colbuf = np.empty(K * G * L, x.dtype)
    dchbuf = np.empty(F * G * L, x.dtype)
    tmp = np.empty((F, K), x.dtype)
    acc = np.zeros((F, K), x.dtype)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        cols = colbuf[:K * g * L].reshape(K, g * L)
        dch = dchbuf[:F * g * L].reshape(F, g * L)
        for gg in range(g):
            _fill_cols(x, n0 + gg, gg, mode, KH, KW, stride, pad, Ho, Wo, Wr, xp, cols)
            for f in range(F):
                s = 0.0
                for i in range(Ho):
                    o = gg * L + i * Wr
                    src = dout[n0 + gg, f, i]
                    dst = dch[f, o:o + Wr]
                    for j in range(Wo):
                        v = src[j]
                        dst[j] = v
                        s += v
                    for j in range(Wo, Wr):  # wide columns (mode 0) contribute nothing
                        dst[j] = 0
                db_parts[t, f] += s
        np.dot(dch, cols.T, tmp)
        acc += tmp
    dw_parts[t] = acc


def conv2d_backward_weight(dout: np.ndarray, x: np.ndarray, w_shape: tuple, stride: int,
                           padding: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d_forward` with respect to ``w`` and ``b`` (numba twin).

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), float32 or float64
    x : ndarray, shape (N, C, H, W), dtype of ``dout``
    w_shape : tuple (F, C, KH, KW)
    stride, padding : as in the forward pass

    Returns
    -------
    dw : ndarray, shape (F, C, KH, KW), dtype of ``dout``
    db : ndarray, shape (F,), dtype of ``dout`` (accumulated in float64)

    Notes
    -----
    ``dw[f, c, u, v] = sum_{n,i,j} dout[n, f, i, j] * xp[n, c, i*stride + u, j*stride + v]``: per chunk
    of images one GEMM ``dout_chunk (F, L) @ cols.T (L, C*KH*KW)``; ``db[f] = sum_{n,i,j} dout``.
    """
    _check_conv_args("conv2d_backward_weight", dout, x)
    dout = np.ascontiguousarray(dout)
    x = np.ascontiguousarray(x)
    F, C, KH, KW = (int(s) for s in w_shape)
    N, _, H, W = x.shape
    stride, padding = int(stride), int(padding)
    Ho, Wo = dout.shape[2], dout.shape[3]
    mode = _conv_mode(KH, KW, stride, padding)
    if mode == 3:
        return _wino_backward_weight(dout, x)
    if mode == 1:
        nt = min(_nthreads(), N)
        dw_parts = np.zeros((nt, F, C), x.dtype)
        db_parts = np.zeros((nt, F), np.float64)
        _run_split(_conv1x1_bwd_weight_kernel, nt, True, dout, x, dw_parts, db_parts)
        dw = dw_parts.sum(axis=0) if nt > 1 else dw_parts[0]
        return dw.reshape(F, C, 1, 1).astype(x.dtype), db_parts.sum(axis=0).astype(x.dtype)
    Wr = W + padding if mode == 0 else Wo
    G = _chunk(Ho * Wr, N, C * KH * KW, x.itemsize)
    nt = min(_nthreads(), (N + G - 1) // G)
    dw_parts = np.zeros((nt, F, C * KH * KW), x.dtype)
    db_parts = np.zeros((nt, F), np.float64)
    _run_split(_conv_bwd_weight_kernel, nt, True, dout, x, mode, KH, KW, stride, padding, Ho, Wo, Wr, G,
               _xp_len(mode, H, W, padding), dw_parts, db_parts)
    dw = dw_parts.sum(axis=0) if nt > 1 else dw_parts[0]
    return (np.ascontiguousarray(dw.reshape(F, C, KH, KW), dtype=x.dtype),
            db_parts.sum(axis=0).astype(x.dtype))


_LOG2E32 = np.float32(1.4426950408889634)
_LN2_32 = np.float32(0.6931471805599453)
_E_HI = np.float32(126.0)
_E_LO = np.float32(-126.0)
_HALF32 = np.float32(0.5)
_ONE32 = np.float32(1.0)
# Taylor coefficients of 2**f = exp(f ln 2) on |f| <= 1/2 (degree 7: truncation error < 1e-8)
_P1 = np.float32(0.6931471805599453)
_P2 = np.float32(0.6931471805599453 ** 2 / 2)
_P3 = np.float32(0.6931471805599453 ** 3 / 6)
_P4 = np.float32(0.6931471805599453 ** 4 / 24)
_P5 = np.float32(0.6931471805599453 ** 5 / 120)
_P6 = np.float32(0.6931471805599453 ** 6 / 720)
_P7 = np.float32(0.6931471805599453 ** 7 / 5040)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_seg(y, s, ibuf, fbuf, fast):
    """s[:] = sigmoid(y[:]) for 1-D segments; ``fast`` (float32 only) uses a vectorisable exp."""
    n = y.shape[0]
    if fast:
        for i in range(n):
            tt = -y[i] * _LOG2E32
            tt = min(max(tt, _E_LO), _E_HI)
            k = np.floor(tt + _HALF32)
            f = tt - k
            p = _ONE32 + f * (_P1 + f * (_P2 + f * (_P3 + f * (_P4 + f * (_P5 + f * (_P6 + f * _P7))))))
            fbuf[i] = p
            ibuf[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
        e2 = ibuf[:n].view(np.float32)
        for i in range(n):
            s[i] = _ONE32 / (_ONE32 + fbuf[i] * e2[i])
    else:
        for i in range(n):
            s[i] = 1.0 / (1.0 + math.exp(-y[i]))


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _gn_fwd_kernel(x, ge, be, groups, eps, silu, fast, out, mean, rstd, t, nthreads):
    # ge, be: gamma and beta repeated H*W times (laid out like one image), so that every loop runs over
    # a group's whole block (its channels are contiguous): per-channel rows of 16-64 elements (4x4, 8x8
    # images) cost more in loop overhead than in arithmetic.
    N, C, H, W = x.shape
    HW = H * W
    cg = C // groups
    M = cg * HW
    NG = N * groups
    ibuf = np.empty(M, np.int32)
    fbuf = np.empty(M, x.dtype)
    sb = np.empty(M, x.dtype)
    for ng in range(t * NG // nthreads, (t + 1) * NG // nthreads):
        n = ng // groups
        g = ng - n * groups
        xg = x[n].reshape(C * HW)[g * M:(g + 1) * M]
        og = out[n].reshape(C * HW)[g * M:(g + 1) * M]
        gg = ge[g * M:(g + 1) * M]
        bg = be[g * M:(g + 1) * M]
        s = 0.0
        for l in range(M):
            s += xg[l]
        mu = s / M
        v = 0.0
        for l in range(M):
            d = xg[l] - mu
            v += d * d
        r = 1.0 / math.sqrt(v / M + eps)
        mean[n, g] = mu
        rstd[n, g] = r
        mu_t = mean[n, g]  # the dtype-rounded values, as the reference uses them
        r_t = rstd[n, g]
        for l in range(M):
            og[l] = (xg[l] - mu_t) * r_t * gg[l] + bg[l]
        if silu:
            _sigmoid_seg(og, sb, ibuf, fbuf, fast)
            for l in range(M):
                og[l] = og[l] * sb[l]


def group_norm_silu_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int,
                            eps: float, silu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused GroupNorm (+ affine) and optional SiLU, numba twin of the reference.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    gamma, beta : ndarray, shape (C,), dtype of ``x``
    groups : int dividing C
    eps : float
    silu : bool

    Returns
    -------
    out : ndarray, shape (N, C, H, W); mean, rstd : ndarray, shape (N, groups); all dtype of ``x``.

    Notes
    -----
    Wu & He 2018, eq. (1)-(3): ``y = (x - mean_g) * rstd_g * gamma + beta``, ``out = y * sigmoid(y)``.
    One parallel task per (image, group); statistics in float64, two-pass.
    """
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"group_norm_silu_forward: x must be float32 or float64, got {x.dtype}")
    N, C, H, W = x.shape
    groups = int(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"group_norm_silu_forward: groups must divide C={C}, got {groups}")
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    mean = np.empty((N, groups), x.dtype)
    rstd = np.empty((N, groups), x.dtype)
    HW = H * W  # per-channel parameters repeated once per call, shared by the threads' shares
    ge = np.repeat(np.asarray(gamma, dtype=x.dtype), HW)
    be = np.repeat(np.asarray(beta, dtype=x.dtype), HW)
    _run_split(_gn_fwd_kernel, _gn_threads(x.size), False, x, ge, be, groups, float(eps), bool(silu),
               x.dtype == np.float32, out, mean, rstd)
    return out, mean, rstd


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _gn_bwd_kernel(dout, x, gamma, ge, be, mean, rstd, groups, silu, fast, dx, dg_parts, db_parts, t, nthreads):
    # ge, be: as in _gn_fwd_kernel
    N, C, H, W = x.shape
    HW = H * W
    cg = C // groups
    M = cg * HW
    NG = N * groups
    ibuf = np.empty(M, np.int32)
    fbuf = np.empty(M, x.dtype)
    sb = np.empty(M, x.dtype)
    yb = np.empty(M, x.dtype)
    xh = np.empty(M, x.dtype)
    for ng in range(t * NG // nthreads, (t + 1) * NG // nthreads):
        n = ng // groups
        g = ng - n * groups
        c0 = g * cg
        xg = x[n].reshape(C * HW)[g * M:(g + 1) * M]
        dg = dout[n].reshape(C * HW)[g * M:(g + 1) * M]
        dxg = dx[n].reshape(C * HW)[g * M:(g + 1) * M]
        gg = ge[g * M:(g + 1) * M]
        bg = be[g * M:(g + 1) * M]
        mu = mean[n, g]
        r = rstd[n, g]
        for l in range(M):
            xh[l] = (xg[l] - mu) * r
        # sweep 1: dy = dL/d(GN output) into dx (through the SiLU when fused)
        if silu:
            for l in range(M):
                yb[l] = xh[l] * gg[l] + bg[l]
            _sigmoid_seg(yb, sb, ibuf, fbuf, fast)
            for l in range(M):
                sv = sb[l]
                dxg[l] = dg[l] * (sv * (1 + yb[l] * (1 - sv)))
        else:
            for l in range(M):
                dxg[l] = dg[l]
        # per-channel sums of dy and dy * xhat (2-D indexing: no per-row views in the loop)
        dy2 = dxg.reshape(cg, HW)
        xh2 = xh.reshape(cg, HW)
        sg = 0.0
        sgx = 0.0
        for cc in range(cg):
            s1 = 0.0
            s2 = 0.0
            for l in range(HW):
                dyv = dy2[cc, l]
                s1 += dyv
                s2 += dyv * xh2[cc, l]
            db_parts[n, c0 + cc] = s1
            dg_parts[n, c0 + cc] = s2
            gc = gamma[c0 + cc]
            sg += gc * s1
            sgx += gc * s2
        mg = sg / M
        mgx = sgx / M
        # sweep 2: dx = rstd * (gamma * dy - mean(gamma * dy) - xhat * mean(gamma * dy * xhat))
        for l in range(M):
            dxg[l] = r * (dxg[l] * gg[l] - mg - xh[l] * mgx)


def group_norm_silu_backward(dout: np.ndarray, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                             mean: np.ndarray, rstd: np.ndarray, groups: int,
                             silu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`group_norm_silu_forward` (numba twin of the reference).

    Parameters
    ----------
    dout, x : ndarray, shape (N, C, H, W), float32 or float64
    gamma, beta : ndarray, shape (C,)
    mean, rstd : ndarray, shape (N, groups), from the forward pass
    groups : int
    silu : bool

    Returns
    -------
    dx : ndarray, shape (N, C, H, W); dgamma, dbeta : ndarray, shape (C,); all dtype of ``x``.

    Notes
    -----
    ``dy = dout * s * (1 + y * (1 - s))`` (SiLU'), ``dgamma = sum dy * xhat``, ``dbeta = sum dy``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * gamma`` (group means).
    Sweep 1 writes ``dy`` into ``dx`` and accumulates the sums (float64); sweep 2 finishes ``dx``.
    """
    if x.dtype not in (np.float32, np.float64) or dout.dtype != x.dtype:
        raise TypeError(f"group_norm_silu_backward: dout/x must be float32 or float64 of one dtype, "
                        f"got {dout.dtype} and {x.dtype}")
    N, C, H, W = x.shape
    groups = int(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"group_norm_silu_backward: groups must divide C={C}, got {groups}")
    x = np.ascontiguousarray(x)
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(x)
    dg_parts = np.empty((N, C), np.float64)
    db_parts = np.empty((N, C), np.float64)
    dt = x.dtype
    gamma = np.ascontiguousarray(gamma, dtype=dt)
    ge = np.repeat(gamma, H * W)
    be = np.repeat(np.asarray(beta, dtype=dt), H * W)
    _run_split(_gn_bwd_kernel, _gn_threads(x.size), False, dout, x, gamma, ge, be, np.ascontiguousarray(mean, dtype=dt),
               np.ascontiguousarray(rstd, dtype=dt), groups, bool(silu), dt == np.float32, dx, dg_parts, db_parts)
    return dx, dg_parts.sum(axis=0).astype(dt), db_parts.sum(axis=0).astype(dt)

# ---- layout kernels: channel concat / split, nearest 2x upsampling (memory bound, one thread) ----
# NumPy's strided copies for these took 0.5-1.4 ms each at the 8x8 U-Net's sizes, 3-10x these loops.

@numba.njit(cache=True, nogil=True)
def _copy_channels(src, dst, c0):
    """dst[:, c0:c0 + C] = src (C = src.shape[1]); both NCHW, C-contiguous."""
    N, C = src.shape[0], src.shape[1]
    L = C * src.shape[2] * src.shape[3]
    Ld = dst.shape[1] * dst.shape[2] * dst.shape[3]
    o = c0 * src.shape[2] * src.shape[3]
    for n in range(N):
        s = src[n].reshape(L)
        d = dst[n].reshape(Ld)[o:o + L]
        for l in range(L):
            d[l] = s[l]


@numba.njit(cache=True, nogil=True)
def _take_channels(src, c0, dst):
    """dst = src[:, c0:c0 + C] (C = dst.shape[1])."""
    N, C = dst.shape[0], dst.shape[1]
    L = C * dst.shape[2] * dst.shape[3]
    Ls = src.shape[1] * src.shape[2] * src.shape[3]
    o = c0 * dst.shape[2] * dst.shape[3]
    for n in range(N):
        s = src[n].reshape(Ls)[o:o + L]
        d = dst[n].reshape(L)
        for l in range(L):
            d[l] = s[l]


def concat_channels(xs) -> np.ndarray:
    """Numba twin of :func:`difnumpy.kernels.reference.concat_channels`."""
    xs = [np.ascontiguousarray(a) for a in xs]
    first = xs[0]
    out = np.empty((first.shape[0], sum(a.shape[1] for a in xs)) + first.shape[2:], first.dtype)
    c0 = 0
    for a in xs:
        _copy_channels(a, out, c0)
        c0 += a.shape[1]
    return out


def split_channels(dout: np.ndarray, channels) -> tuple:
    """Numba twin of :func:`difnumpy.kernels.reference.split_channels`."""
    dout = np.ascontiguousarray(dout)
    parts, c0 = [], 0
    for c in channels:
        d = np.empty((dout.shape[0], int(c)) + dout.shape[2:], dout.dtype)
        _take_channels(dout, c0, d)
        parts.append(d)
        c0 += int(c)
    return tuple(parts)


@numba.njit(cache=True, nogil=True)
def _up2_fwd(x, out):
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            for i in range(H):
                src = x[n, c, i]
                d0 = out[n, c, 2 * i]
                d1 = out[n, c, 2 * i + 1]
                for j in range(W):
                    v = src[j]
                    d0[2 * j] = v
                    d0[2 * j + 1] = v
                for j in range(2 * W):
                    d1[j] = d0[j]


@numba.njit(cache=True, nogil=True)
def _up2_bwd(dout, dx):
    N, C, H, W = dx.shape
    for n in range(N):
        for c in range(C):
            for i in range(H):
                r0 = dout[n, c, 2 * i]
                r1 = dout[n, c, 2 * i + 1]
                d = dx[n, c, i]
                for j in range(W):
                    d[j] = (r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1])


def upsample_nearest2x_forward(x: np.ndarray) -> np.ndarray:
    """Numba twin of :func:`difnumpy.kernels.reference.upsample_nearest2x_forward`."""
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    out = np.empty((N, C, 2 * H, 2 * W), x.dtype)
    _up2_fwd(x, out)
    return out


def upsample_nearest2x_backward(dout: np.ndarray) -> np.ndarray:
    """Numba twin of :func:`difnumpy.kernels.reference.upsample_nearest2x_backward`."""
    dout = np.ascontiguousarray(dout)
    N, C, H2, W2 = dout.shape
    if H2 % 2 or W2 % 2:
        raise ValueError(f"dout must have even H and W, got shape {dout.shape}")
    dx = np.empty((N, C, H2 // 2, W2 // 2), dout.dtype)
    _up2_bwd(dout, dx)
    return dx


# ==== end section: nn ====

# ==== section: optim ====
from difnumpy.kernels.reference import _check_adam_args  # noqa: E402  (shared argument checks)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _adam_kernel(p, g, m, v, lr, beta1, beta2, eps, wd, step_size, bc2):  # pragma: no cover (compiled)
    # One fused pass over the flat arrays; float64 arithmetic, same order as the NumPy twin.
    decay = lr * wd
    for i in range(p.size):
        pi = np.float64(p[i])
        gi = np.float64(g[i])
        if wd != 0.0:
            pi = pi - decay * pi
        mi = beta1 * np.float64(m[i]) + (1.0 - beta1) * gi
        vi = beta2 * np.float64(v[i]) + (1.0 - beta2) * (gi * gi)
        pi = pi - step_size * mi / (np.sqrt(vi / bc2) + eps)
        p[i] = pi
        m[i] = mi
        v[i] = vi


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One bias-corrected Adam / AdamW step, in place on ``param``, ``m`` and ``v`` (Numba kernel).

    Same signature, arguments and arithmetic as the NumPy twin
    :func:`difnumpy.kernels.reference.adam_update` (Kingma & Ba 2015, Algorithm 1, with decoupled
    weight decay of Loshchilov & Hutter 2019): a single fused pass over the flattened arrays, float64
    arithmetic, rounded to the arrays' dtype when stored. ``step`` is 1-based.
    """
    _check_adam_args(param, grad, m, v, step)
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    step_size = lr / (1.0 - beta1 ** int(step))
    bc2 = 1.0 - beta2 ** int(step)
    _adam_kernel(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                 lr, beta1, beta2, eps, wd, step_size, bc2)


# ==== end section: optim ====
