"""Elementwise and small reduction kernels: the forward process, the sampler update, SiLU, in-place
sums, per-channel bias, sums of squares and the MSE loss (twins in :mod:`difnumpy.kernels.reference`).

They are memory bound and run on one thread: a plain loop that LLVM vectorises streams at the
machine's copy bandwidth (benchmarks/bench_forward.py), while numba's parallel pool measured slower
on the shared 2-core machine at every size up to 1e7 elements (thread start-up and synchronisation
cost more than a second core's bandwidth adds). Serial loops also make every result independent of
the thread count. Reductions accumulate in float64 (``fastmath`` reassociation lets LLVM keep several
float64 accumulators in vector lanes: a fixed order for given code, whatever the thread count). They
never call BLAS: a multi-threaded BLAS call leaves OpenBLAS workers spinning into the next U-Net pass.

Kernels that divide are compiled with ``error_model="numpy"`` (IEEE results, no ZeroDivisionError
check): numba's default Python error model puts a branch on every division, which kept LLVM from
vectorising the sigmoid loop (4x slower, measured). The NumPy twins give the same IEEE results.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from difnumpy.kernels import reference as _ref

_FLOATS = (np.float32, np.float64)
_BLOCK = 2048  # elements per sigmoid block: the scratch buffers stay in L1


def _check_float(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")


def _check_same_shape(name, a, ref_name, ref):
    if np.shape(a) != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {np.shape(a)}")


def _flat_operand(b, dtype):
    """``b`` as a flat C-contiguous array of ``dtype`` (a copy only when needed)."""
    return np.ascontiguousarray(b, dtype=dtype).reshape(-1)


# ==== the forward process and the sampler update ====


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


# ==== the sigmoid (shared with the fused GroupNorm+SiLU) ====
# For float32 the sigmoid uses a vectorisable exp (2**k * poly(f), |rel. error| < 3e-7) because
# numba's math.exp is a scalar libm call here (no SVML): ~4x faster. float64 uses math.exp.
# The exponent k is clamped to [-126, 128]: k = 128 builds +inf (exponent bits 255), so that
# sigmoid(y) = 1 / (1 + inf) = 0 for y < -88.4, as the twin gives (with k <= 126, sigmoid(y) stayed
# at ~1e-38 and y * sigmoid(y) was -3.5 instead of -0 at y = -3e38).

_LOG2E32 = np.float32(1.4426950408889634)
_E_HI = np.float32(128.0)
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


# NOTE: groupnorm.py's kernels inline this function. numba's cache checks only the source file of the
# function it compiled, so after editing it (or the constants above) touch groupnorm.py too.
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _silu_fwd_kernel(x, out, fast):
    n = x.shape[0]
    ibuf = np.empty(_BLOCK, np.int32)
    fbuf = np.empty(_BLOCK, x.dtype)
    sb = np.empty(_BLOCK, x.dtype)
    for s0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s0)
        xs = x[s0:s0 + m]
        o = out[s0:s0 + m]
        _sigmoid_seg(xs, sb, ibuf, fbuf, fast)
        for i in range(m):
            o[i] = xs[i] * sb[i]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _silu_bwd_kernel(dout, x, dx, fast):
    n = x.shape[0]
    one = x.dtype.type(1.0)
    ibuf = np.empty(_BLOCK, np.int32)
    fbuf = np.empty(_BLOCK, x.dtype)
    sb = np.empty(_BLOCK, x.dtype)
    for s0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s0)
        xs = x[s0:s0 + m]
        ds = dout[s0:s0 + m]
        o = dx[s0:s0 + m]
        _sigmoid_seg(xs, sb, ibuf, fbuf, fast)
        for i in range(m):
            sv = sb[i]
            o[i] = ds[i] * (sv * (one + xs[i] * (one - sv)))


def silu_forward(x: np.ndarray) -> np.ndarray:
    """SiLU ``x * sigmoid(x)`` (Elfwing et al. 2018), numba twin of :func:`reference.silu_forward`.

    x : ndarray, any shape, float32 or float64 -> ndarray of its shape and dtype (C-contiguous).
    """
    _check_float("x", x)
    xf = np.ascontiguousarray(x)
    out = np.empty(xf.shape, xf.dtype)
    _silu_fwd_kernel(xf.reshape(-1), out.reshape(-1), xf.dtype == np.float32)
    return out


def silu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Gradient of SiLU, ``dout * s * (1 + x (1 - s))``, ``s = sigmoid(x)`` (twin: :func:`reference.silu_backward`).

    dout, x : ndarray, one shape, float32 or float64 (dout is cast to x's dtype) -> dx, x's shape and dtype.
    """
    _check_float("x", x)
    _check_same_shape("dout", dout, "x", x)
    xf = np.ascontiguousarray(x)
    dx = np.empty(xf.shape, xf.dtype)
    _silu_bwd_kernel(_flat_operand(dout, xf.dtype), xf.reshape(-1), dx.reshape(-1), xf.dtype == np.float32)
    return dx


# ==== in-place sums and scalings ====


@numba.njit(cache=True, nogil=True)
def _add_kernel(a, b):
    for i in range(a.shape[0]):
        a[i] += b[i]


@numba.njit(cache=True, nogil=True)
def _blend_kernel(x, known, mask):
    one = x.dtype.type(1.0)  # not the int 1: int - float32 is float64 in numba
    for i in range(x.shape[0]):
        x[i] = (one - mask[i]) * x[i] + mask[i] * known[i]


@numba.njit(cache=True, nogil=True)
def _axpy_kernel(y, x, s):
    for i in range(y.shape[0]):
        y[i] += s * x[i]


@numba.njit(cache=True, nogil=True)
def _scale_kernel(a, s):
    for i in range(a.shape[0]):
        a[i] *= s


def _inplace_target(name, a):
    """True when ``a`` can be updated through a flat view (C-contiguous float array)."""
    _check_float(name, a)
    return a.flags.c_contiguous and a.flags.writeable


def add_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a += b`` in place (``b`` of ``a``'s shape, cast to its dtype); returns ``a``. Twin: :func:`reference.add_`."""
    _check_same_shape("b", b, "a", a)
    if not _inplace_target("a", a):
        return _ref.add_(a, b)  # a strided view: NumPy's in-place add (the same values)
    _add_kernel(a.reshape(-1), _flat_operand(b, a.dtype))
    return a


def axpy_(y: np.ndarray, x: np.ndarray, s: float) -> np.ndarray:
    """``y += s * x`` in place, ``s`` rounded to ``y``'s dtype first; returns ``y``. Twin: :func:`reference.axpy_`."""
    _check_same_shape("x", x, "y", y)
    if not _inplace_target("y", y):
        return _ref.axpy_(y, x, s)
    _axpy_kernel(y.reshape(-1), _flat_operand(x, y.dtype), y.dtype.type(s))
    return y


def blend_(x: np.ndarray, known: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x = (1 - mask) x + mask known`` in place; returns ``x``. Twin: :func:`reference.blend_`."""
    _check_same_shape("known", known, "x", x)
    _check_same_shape("mask", mask, "x", x)
    if not _inplace_target("x", x):
        return _ref.blend_(x, known, mask)
    _blend_kernel(x.reshape(-1), _flat_operand(known, x.dtype), _flat_operand(mask, x.dtype))
    return x


def scale_(a: np.ndarray, s: float) -> np.ndarray:
    """``a *= s`` in place, ``s`` rounded to ``a``'s dtype first; returns ``a``. Twin: :func:`reference.scale_`."""
    if not _inplace_target("a", a):
        return _ref.scale_(a, s)
    _scale_kernel(a.reshape(-1), a.dtype.type(s))
    return a


@numba.njit(cache=True, nogil=True)
def _add_channel_bias_kernel(h, t):
    N, C, L = h.shape
    for n in range(N):
        for c in range(C):
            v = t[n, c]
            row = h[n, c]
            for l in range(L):
                row[l] += v


def add_channel_bias_(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``h[n, c, :, :] += t[n, c]`` in place; ``h`` (N, C, H, W), ``t`` (N, C); returns ``h``.

    Twin: :func:`reference.add_channel_bias_` (the U-Net's time embedding added to a ResBlock).
    """
    _check_float("h", h)
    if h.ndim != 4:
        raise ValueError(f"h must have shape (N, C, H, W), got {h.shape}")
    _check_same_shape("t", t, "h[:, :, 0, 0]", h[:, :, 0, 0])
    if not _inplace_target("h", h):
        return _ref.add_channel_bias_(h, t)
    N, C, H, W = h.shape
    _add_channel_bias_kernel(h.reshape(N, C, H * W), np.ascontiguousarray(t, dtype=h.dtype))
    return h


# ==== reductions (float64 accumulation) ====


@numba.njit(cache=True, nogil=True)
def _sum_rows(parts, n, out):
    """out[:n] = parts[0, :n] + parts[1, :n] + ... in part order (the fixed parts of a summed gradient),
    each sum rounded to ``out``'s dtype at the end; parts (P, >= n) of any float dtype."""
    P = parts.shape[0]
    for i in range(n):
        s = parts[0, i]
        for p in range(1, P):
            s += parts[p, i]
        out[i] = s


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _bias_grad(dout, out):
    """out[f] = sum over n, h, w of dout[n, f, h, w]: float64 per (n, f) plane, then over n in order."""
    N, F = dout.shape[0], dout.shape[1]
    L = dout.shape[2] * dout.shape[3]
    d = dout.reshape(N, F, L)
    for f in range(F):
        t = 0.0
        for n in range(N):
            row = d[n, f]
            s = 0.0
            for l in range(L):
                s += np.float64(row[l])
            t += s
        out[f] = t


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _sum_hw_kernel(h, out):
    N, C, L = h.shape
    for n in range(N):
        for c in range(C):
            row = h[n, c]
            s = 0.0
            for l in range(L):
                s += np.float64(row[l])
            out[n, c] = s


@numba.njit(cache=True, nogil=True)
def _embedding_fwd_kernel(table, idx, out):
    for n in range(idx.shape[0]):
        out[n, :] = table[idx[n], :]


@numba.njit(cache=True, nogil=True)
def _embedding_bwd_kernel(dout, idx, acc):
    for n in range(idx.shape[0]):  # in sample order: the same bits with any thread count
        r = idx[n]
        for d in range(dout.shape[1]):
            acc[r, d] += np.float64(dout[n, d])


def embedding_forward(table: np.ndarray, idx) -> np.ndarray:
    """``out[n] = table[idx[n]]``, (R, D) -> (N, D). Twin: :func:`reference.embedding_forward`."""
    _check_float("table", table)
    if table.ndim != 2:
        raise ValueError(f"table must have shape (R, D), got {table.shape}")
    idx = _ref._check_idx(idx, table.shape[0])
    table = np.ascontiguousarray(table)
    out = np.empty((idx.shape[0], table.shape[1]), table.dtype)
    _embedding_fwd_kernel(table, idx, out)
    return out


def embedding_backward(dout: np.ndarray, idx, num_rows: int) -> np.ndarray:
    """``dtable[r] = sum_{idx[n] = r} dout[n]`` (float64 sums, sample order).

    Twin: :func:`reference.embedding_backward`.
    """
    _check_float("dout", dout)
    if dout.ndim != 2:
        raise ValueError(f"dout must have shape (N, D), got {dout.shape}")
    idx = _ref._check_idx(idx, int(num_rows))
    if idx.shape[0] != dout.shape[0]:
        raise ValueError(f"idx must have dout's {dout.shape[0]} rows, got {idx.shape[0]}")
    acc = np.zeros((int(num_rows), dout.shape[1]), np.float64)
    _embedding_bwd_kernel(np.ascontiguousarray(dout), idx, acc)
    return acc.astype(dout.dtype)


def sum_hw(h: np.ndarray) -> np.ndarray:
    """``h`` (N, C, H, W) summed over H and W: (N, C), float64 accumulation, ``h``'s dtype.

    Twin: :func:`reference.sum_hw` (the gradient of :func:`add_channel_bias_` with respect to ``t``).
    """
    _check_float("h", h)
    if h.ndim != 4:
        raise ValueError(f"h must have shape (N, C, H, W), got {h.shape}")
    h = np.ascontiguousarray(h)
    N, C, H, W = h.shape
    out = np.empty((N, C), h.dtype)
    _sum_hw_kernel(h.reshape(N, C, H * W), out)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sumsq_kernel(a):
    s = 0.0
    for i in range(a.shape[0]):
        v = np.float64(a[i])
        s += v * v
    return s


def sumsq(a: np.ndarray) -> float:
    """``sum(a**2)`` over all elements, accumulated in float64 (a Python float). Twin: :func:`reference.sumsq`."""
    _check_float("a", a)
    return float(_sumsq_kernel(np.ascontiguousarray(a).reshape(-1)))


@numba.njit(cache=True, nogil=True)
def _sub_kernel(p, t, d):
    for i in range(p.shape[0]):
        d[i] = p[i] - t[i]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sumsq_scale_kernel(d, scale):
    # returns sum(d**2) in float64 and scales d in place; the one rounding of d * scale is exact IEEE
    # (fastmath only reorders the float64 sum), so dpred equals the twin's bit for bit
    s = 0.0
    for i in range(d.shape[0]):
        v = d[i]
        vv = np.float64(v)
        s += vv * vv
        d[i] = v * scale
    return s


def mse_loss(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error and its gradient (Ho et al. 2020, eq. 14); twin: :func:`reference.mse_loss`.

    Parameters
    ----------
    pred, target : ndarray, one shape, float32 or float64 (target is cast to pred's dtype)

    Returns
    -------
    loss : float, ``mean((pred - target)**2)`` accumulated in float64
    dpred : ndarray, shape and dtype of ``pred``, ``(pred - target) * (2 / pred.size)``
    """
    _check_float("pred", pred)
    _check_same_shape("target", target, "pred", pred)
    p = np.ascontiguousarray(pred)
    dp = np.empty(p.shape, p.dtype)
    n = p.size
    d = dp.reshape(-1)
    _sub_kernel(p.reshape(-1), _flat_operand(target, p.dtype), d)
    s = _sumsq_scale_kernel(d, p.dtype.type(2.0 / n) if n else p.dtype.type(0.0))
    return (s / n if n else float("nan")), dp
