"""Fused GroupNorm (+ affine) and optional SiLU, forward and backward (twins in :mod:`difnumpy.kernels.reference`).

One fused pass per (image, group) (the group's data stays in L1/L2): statistics in float64
(two-pass), normalise+affine+SiLU in one sweep; the backward recomputes the SiLU derivative and makes
two sweeps. The float32 sigmoid is the vectorisable one of :mod:`.elementwise`.

Threads: the (image, group) blocks are split over the threads (:func:`._threads._run_split`) only
from :data:`_GN_PARALLEL_MIN` elements up. Every block is computed whole by one thread, and dgamma /
dbeta are summed per image (float64 rows (N, C)) and then over the images in image order, so no
result depends on the thread count.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu.elementwise import _sigmoid_seg, _sum_rows

_GN_PARALLEL_MIN = 1 << 18  # elements (~0.4 ms of work); below this a second thread's wake-up (~0.1 ms on
# the 2-core VM) costs about what it saves: 96 channels at 28x28 (75k elements) ran slower on two


def _gn_threads(size):
    """Threads for a GroupNorm call on ``size`` elements (read here, so tests can patch the threshold)."""
    return _threads._nthreads() if size >= _GN_PARALLEL_MIN else 1


def _repeated(gamma, beta, HW, dtype):
    """gamma and beta (C,) each repeated HW times (laid out like one image), once per pass (see
    :func:`._threads.derived`: the parameters do not change during a pass) and shared by the threads."""
    dtype = np.dtype(dtype)
    return (_threads.derived(("gn", HW, dtype.str), gamma, lambda: np.repeat(np.asarray(gamma, dtype=dtype), HW)),
            _threads.derived(("gn", HW, dtype.str), beta, lambda: np.repeat(np.asarray(beta, dtype=dtype), HW)))


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
    # the (image, group) block ng is the contiguous slice ng*M:(ng+1)*M of the flat arrays (one view per
    # block: views of views per block cost 20-40 % of the kernel at 8x8 and 4x4, measured)
    xf = x.reshape(N * C * HW)
    of = out.reshape(N * C * HW)
    for ng in range(t * NG // nthreads, (t + 1) * NG // nthreads):
        n = ng // groups
        g = ng - n * groups
        xg = xf[ng * M:(ng + 1) * M]
        og = of[ng * M:(ng + 1) * M]
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
    One task per (image, group), split over the threads; statistics in float64, two-pass.
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
    ge, be = _repeated(gamma, beta, H * W, x.dtype)
    _threads._run_split(_gn_fwd_kernel, _gn_threads(x.size), False, x, ge, be, groups, float(eps), bool(silu),
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
    one = x.dtype.type(1.0)
    xf = x.reshape(N * C * HW)  # flat views, as in _gn_fwd_kernel
    df = dout.reshape(N * C * HW)
    dxf = dx.reshape(N * C * HW)
    for ng in range(t * NG // nthreads, (t + 1) * NG // nthreads):
        n = ng // groups
        g = ng - n * groups
        c0 = g * cg
        xg = xf[ng * M:(ng + 1) * M]
        dg = df[ng * M:(ng + 1) * M]
        dxg = dxf[ng * M:(ng + 1) * M]
        gg = ge[g * M:(g + 1) * M]
        bg = be[g * M:(g + 1) * M]
        mu = mean[n, g]
        r = rstd[n, g]
        # sweep 1: dy = dL/d(GN output) into dx (through the SiLU when fused)
        if silu:
            for l in range(M):
                v = (xg[l] - mu) * r
                xh[l] = v
                yb[l] = v * gg[l] + bg[l]
            _sigmoid_seg(yb, sb, ibuf, fbuf, fast)
            for l in range(M):
                sv = sb[l]
                dxg[l] = dg[l] * (sv * (one + yb[l] * (one - sv)))  # literal 1 would widen to float64
        else:
            for l in range(M):
                xh[l] = (xg[l] - mu) * r
                dxg[l] = dg[l]
        # per-channel sums of dy and dy * xhat (flat offsets: no per-row views; 2-D indexing measured 1.5x slower)
        sg = 0.0
        sgx = 0.0
        for cc in range(cg):
            s1 = 0.0
            s2 = 0.0
            o = cc * HW
            for l in range(HW):
                dyv = dxg[o + l]
                s1 += dyv
                s2 += dyv * xh[o + l]
            db_parts[n, c0 + cc] = s1
            dg_parts[n, c0 + cc] = s2
            gc = gamma[c0 + cc]
            sg += gc * s1
            sgx += gc * s2
        # the group means rounded to x's dtype: float64 scalars here would widen the whole sweep (1.8x slower)
        mg = x.dtype.type(sg / M)
        mgx = x.dtype.type(sgx / M)
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
    ge, be = _repeated(gamma, beta, H * W, dt)
    gamma = np.ascontiguousarray(gamma, dtype=dt)
    _threads._run_split(_gn_bwd_kernel, _gn_threads(x.size), False, dout, x, gamma, ge, be,
                        np.ascontiguousarray(mean, dtype=dt), np.ascontiguousarray(rstd, dtype=dt), groups,
                        bool(silu), dt == np.float32, dx, dg_parts, db_parts)
    dgamma = np.empty(C, dt)
    dbeta = np.empty(C, dt)
    _sum_rows(dg_parts, C, dgamma)  # per-image rows summed in image order
    _sum_rows(db_parts, C, dbeta)
    return dx, dgamma, dbeta
