"""Elementwise kernels and small reductions: the diffusion updates, SiLU, in-place sums, the MSE loss.

Twins in :mod:`difnumpy.kernels.reference` (q_sample, sampler_update, silu_forward, silu_backward,
add_, axpy_, blend_, scale_, add_channel_bias_, sum_hw, sumsq, mse_loss). Reductions accumulate per thread in
the arrays' dtype (no float64 in float32 kernels); whole-array sums add one partial per block in float64
on the host (the only copy down: one small array).
"""
from __future__ import annotations

import numpy as np

from difnumpy.kernels.cuda._device import block_sum_d, silu_d, silu_grad_d
from difnumpy.kernels.reference import _check_idx as _idx_check
from difnumpy.kernels.cuda._runtime import (RED, _back, _check, _coef, _flat, _ret, asarray, cuda, grid1d,
                                            grid_reduce, is_array, kernel, numba, to_host)

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@kernel(lambda t: (t.a2, t.a2, t.a1, t.a1, t.a2))
def build_q_sample(dt):
    """``out[n] = a[n] x0[n] + b[n] noise[n]`` (DDPM eq. 4)."""
    def q_sample_k(x0, noise, a, b, out):
        M = x0.shape[1]
        for i in range(cuda.grid(1), x0.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            j = i - n * M
            out[n, j] = a[n] * x0[n, j] + b[n] * noise[n, j]
    return q_sample_k


@kernel(lambda t: (t.a2, t.a2, t.a2, t.a2, t.a1, t.a1, t.a2, t.a2))
def build_sampler_update(dt):
    """The fused reverse step: ``x0 = clip(A x + B mo, lo, hi)``, ``x_prev = C x0 + D x + E z``."""
    def sampler_k(x, mo, z, coef, lo, hi, x_prev, x0_pred):
        M = x.shape[1]
        for i in range(cuda.grid(1), x.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            j = i - n * M
            xv = x[n, j]
            x0 = coef[n, 0] * xv + coef[n, 1] * mo[n, j]
            x0 = min(max(x0, lo[n]), hi[n])
            x_prev[n, j] = coef[n, 2] * x0 + coef[n, 3] * xv + coef[n, 4] * z[n, j]
            x0_pred[n, j] = x0
    return sampler_k


@kernel(lambda t: (t.a1, t.a1))
def build_silu(dt):
    """``out = x sigmoid(x)``."""
    HALF = dt.type(0.5)

    def silu_k(x, out):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            out[i] = silu_d(x[i], HALF)
    return silu_k


@kernel(lambda t: (t.a1, t.a1, t.a1))
def build_silu_bwd(dt):
    """``dx = dout s (1 + x (1 - s))``, ``s = sigmoid(x)``."""
    ONE, HALF = dt.type(1.0), dt.type(0.5)

    def silu_bwd_k(dout, x, dx):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            dx[i] = dout[i] * silu_grad_d(x[i], ONE, HALF)
    return silu_bwd_k


@kernel(lambda t: (t.a1, t.a1))
def build_add(dt):
    """``a += b``."""
    def add_k(a, b):
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[i] = a[i] + b[i]
    return add_k


@kernel(lambda t: (t.a1, t.a1, t.a1))
def build_blend(dt):
    """``x = (1 - mask) x + mask known``."""
    ONE = dt.type(1.0)

    def blend_k(x, known, mask):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            x[i] = (ONE - mask[i]) * x[i] + mask[i] * known[i]
    return blend_k


@kernel(lambda t: (t.a1, t.a1, t.s))
def build_axpy(dt):
    """``y += s x``."""
    def axpy_k(y, x, s):
        for i in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
            y[i] = y[i] + s * x[i]
    return axpy_k


@kernel(lambda t: (t.a1, t.s))
def build_scale(dt):
    """``a *= s``."""
    def scale_k(a, s):
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[i] = a[i] * s
    return scale_k


@kernel(lambda t: (t.a4, t.a2))
def build_add_channel_bias(dt):
    """``h[n, c, :, :] += t[n, c]``."""
    def add_bias_k(h, t):
        C, H, W = h.shape[1], h.shape[2], h.shape[3]
        for i in range(cuda.grid(1), h.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            h[n, c, yy, xx] += t[n, c]
    return add_bias_k


@kernel(lambda t: (t.a4, t.a2))
def build_sum_hw(dt):
    """``out[n, c] = sum_hw h[n, c]``: one thread per (n, c)."""
    ZERO = dt.type(0.0)

    def sum_hw_k(h, out):
        C, H, W = h.shape[1], h.shape[2], h.shape[3]
        for i in range(cuda.grid(1), h.shape[0] * C, cuda.gridsize(1)):
            n = i // C
            c = i - n * C
            acc = ZERO
            for yy in range(H):
                for xx in range(W):
                    acc += h[n, c, yy, xx]
            out[n, c] = acc
    return sum_hw_k


@kernel(lambda t: (t.a2, numba.int64[::1], t.a2))
def build_embedding_fwd(dt):
    """``out[n, d] = table[idx[n], d]``: one thread per output."""
    def embedding_fwd_k(table, idx, out):
        D = out.shape[1]
        for i in range(cuda.grid(1), out.shape[0] * D, cuda.gridsize(1)):
            n = i // D
            out[n, i - n * D] = table[idx[n], i - n * D]
    return embedding_fwd_k


@kernel(lambda t: (t.a2, numba.int64[::1], t.a2))
def build_embedding_bwd(dt):
    """``dtable[r, d] = sum_{idx[n] = r} dout[n, d]``: one thread per (r, d), samples in order (no atomics)."""
    ZERO = dt.type(0.0)

    def embedding_bwd_k(dout, idx, dtable):
        D = dtable.shape[1]
        for i in range(cuda.grid(1), dtable.shape[0] * D, cuda.gridsize(1)):
            r = i // D
            d = i - r * D
            acc = ZERO
            for n in range(idx.shape[0]):
                if idx[n] == r:
                    acc += dout[n, d]
            dtable[r, d] = acc
    return embedding_bwd_k


@kernel(lambda t: (t.a1, t.a1))
def build_sumsq(dt):
    """``partial[block] = sum a[i]**2`` over the block's elements (launched with ``grid_reduce``)."""
    ZERO = dt.type(0.0)
    nt = numba.from_dtype(dt)

    def sumsq_k(a, partial):
        tid = cuda.threadIdx.x
        acc = ZERO
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            acc += a[i] * a[i]
        sh = cuda.shared.array(RED, nt)
        tot = block_sum_d(sh, acc, tid, RED)
        if tid == 0:
            partial[cuda.blockIdx.x] = tot
    return sumsq_k


@kernel(lambda t: (t.a1, t.a1, t.s, t.a1, t.a1))
def build_mse(dt):
    """``dpred = (pred - target) scale`` and per-block partial sums of ``(pred - target)**2``."""
    ZERO = dt.type(0.0)
    nt = numba.from_dtype(dt)

    def mse_k(pred, target, scale, dpred, partial):
        tid = cuda.threadIdx.x
        acc = ZERO
        for i in range(cuda.grid(1), pred.shape[0], cuda.gridsize(1)):
            d = pred[i] - target[i]
            dpred[i] = d * scale
            acc += d * d
        sh = cuda.shared.array(RED, nt)
        tot = block_sum_d(sh, acc, tid, RED)
        if tid == 0:
            partial[cuda.blockIdx.x] = tot
    return mse_k


# ------------------------------------------------------------------------------------------------
# host wrappers
# ------------------------------------------------------------------------------------------------

def _size(a) -> int:
    return int(np.prod(a.shape))


def q_sample(x0, noise, sqrt_ab, sqrt_1m_ab, out=None):
    """CUDA twin of :func:`difnumpy.kernels.reference.q_sample` (DDPM eq. 4), shapes (N, M)."""
    _check("x0", x0, 2)
    _check("noise", noise, 2, x0.dtype, x0.shape)
    if out is not None:
        _check("out", out, 2, x0.dtype, x0.shape)
    dt, n = np.dtype(x0.dtype), int(x0.shape[0])
    a, b = _coef("sqrt_ab", sqrt_ab, dt, (n,)), _coef("sqrt_1m_ab", sqrt_1m_ab, dt, (n,))
    d_out = out if out is not None and is_array(out) else cuda.device_array(tuple(x0.shape), dtype=dt)
    if _size(x0):
        build_q_sample(dt)[grid1d(_size(x0))](asarray(x0), asarray(noise), a, b, d_out)
    if out is not None:
        _back(out, d_out)
        return out
    return _ret(is_array(x0), d_out)


def sampler_update(x_t, model_output, noise, coef, clip_lo, clip_hi):
    """CUDA twin of :func:`difnumpy.kernels.reference.sampler_update` (the fused DDPM / DDIM step)."""
    _check("x_t", x_t, 2)
    _check("model_output", model_output, 2, x_t.dtype, x_t.shape)
    _check("noise", noise, 2, x_t.dtype, x_t.shape)
    dt, n = np.dtype(x_t.dtype), int(x_t.shape[0])
    c = _coef("coef", coef, dt, (n, 5))
    lo, hi = _coef("clip_lo", clip_lo, dt, (n,)), _coef("clip_hi", clip_hi, dt, (n,))
    d_xp = cuda.device_array(tuple(x_t.shape), dtype=dt)
    d_x0 = cuda.device_array(tuple(x_t.shape), dtype=dt)
    if _size(x_t):
        build_sampler_update(dt)[grid1d(_size(x_t))](asarray(x_t), asarray(model_output), asarray(noise), c,
                                                     lo, hi, d_xp, d_x0)
    return _ret(is_array(x_t), d_xp, d_x0)


def silu_forward(x):
    """CUDA twin of :func:`difnumpy.kernels.reference.silu_forward`: ``x * sigmoid(x)``, any shape."""
    _check("x", x)
    dt = np.dtype(x.dtype)
    out = cuda.device_array(tuple(x.shape), dtype=dt)
    if _size(x):
        build_silu(dt)[grid1d(_size(x))](_flat(asarray(x)), _flat(out))
    return _ret(is_array(x), out)


def silu_backward(dout, x):
    """CUDA twin of :func:`difnumpy.kernels.reference.silu_backward`: ``dout * s (1 + x (1 - s))``."""
    _check("dout", dout)
    _check("x", x, None, dout.dtype, dout.shape)
    dt = np.dtype(dout.dtype)
    dx = cuda.device_array(tuple(x.shape), dtype=dt)
    if _size(x):
        build_silu_bwd(dt)[grid1d(_size(x))](_flat(asarray(dout)), _flat(asarray(x)), _flat(dx))
    return _ret(is_array(dout), dx)


def add_(a, b):
    """CUDA twin of :func:`difnumpy.kernels.reference.add_`: ``a += b`` in place; returns ``a``."""
    _check("a", a)
    _check("b", b, None, a.dtype, a.shape)
    d_a = asarray(a)
    if _size(a):
        build_add(a.dtype)[grid1d(_size(a))](_flat(d_a), _flat(asarray(b)))
    _back(a, d_a)
    return a


def blend_(x, known, mask):
    """CUDA twin of :func:`difnumpy.kernels.reference.blend_`: ``x = (1 - mask) x + mask known``; returns ``x``."""
    _check("x", x)
    _check("known", known, None, x.dtype, x.shape)
    _check("mask", mask, None, x.dtype, x.shape)
    d_x = asarray(x)
    if _size(x):
        build_blend(x.dtype)[grid1d(_size(x))](_flat(d_x), _flat(asarray(known)), _flat(asarray(mask)))
    _back(x, d_x)
    return x


def axpy_(y, x, s):
    """CUDA twin of :func:`difnumpy.kernels.reference.axpy_`: ``y += s * x`` in place (``s`` cast to
    ``y``'s dtype); returns ``y``."""
    _check("y", y)
    _check("x", x, None, y.dtype, y.shape)
    dt = np.dtype(y.dtype)
    d_y = asarray(y)
    if _size(y):
        build_axpy(dt)[grid1d(_size(y))](_flat(d_y), _flat(asarray(x)), dt.type(float(s)))
    _back(y, d_y)
    return y


def scale_(a, s):
    """CUDA twin of :func:`difnumpy.kernels.reference.scale_`: ``a *= s`` in place; returns ``a``."""
    _check("a", a)
    dt = np.dtype(a.dtype)
    d_a = asarray(a)
    if _size(a):
        build_scale(dt)[grid1d(_size(a))](_flat(d_a), dt.type(float(s)))
    _back(a, d_a)
    return a


def add_channel_bias_(h, t):
    """CUDA twin of :func:`difnumpy.kernels.reference.add_channel_bias_`: ``h[n, c] += t[n, c]``."""
    _check("h", h, 4)
    _check("t", t, 2, h.dtype, tuple(h.shape[:2]))
    d_h = asarray(h)
    if _size(h):
        build_add_channel_bias(h.dtype)[grid1d(_size(h))](d_h, asarray(t))
    _back(h, d_h)
    return h


def sum_hw(h):
    """CUDA twin of :func:`difnumpy.kernels.reference.sum_hw`: (N, C, H, W) -> (N, C).

    Sums in ``h``'s dtype (the twin accumulates in float64): float32 agrees to float32 rounding.
    """
    _check("h", h, 4)
    dt = np.dtype(h.dtype)
    out = cuda.device_array(tuple(int(s) for s in h.shape[:2]), dtype=dt)
    if _size(out):
        build_sum_hw(dt)[grid1d(_size(out))](asarray(h), out)
    return _ret(is_array(h), out)


def embedding_forward(table, idx):
    """CUDA twin of :func:`difnumpy.kernels.reference.embedding_forward`: ``table[idx]``, (N, D)."""
    _check("table", table, 2)
    idx = _idx_check(idx, int(table.shape[0]))
    dt = np.dtype(table.dtype)
    out = cuda.device_array((int(idx.shape[0]), int(table.shape[1])), dtype=dt)
    if _size(out):
        build_embedding_fwd(dt)[grid1d(_size(out))](asarray(table), cuda.to_device(idx), out)
    return _ret(is_array(table), out)


def embedding_backward(dout, idx, num_rows):
    """CUDA twin of :func:`difnumpy.kernels.reference.embedding_backward` (sums in ``dout``'s dtype)."""
    _check("dout", dout, 2)
    idx = _idx_check(idx, int(num_rows))
    if idx.shape[0] != int(dout.shape[0]):
        raise ValueError(f"idx must have dout's {int(dout.shape[0])} rows, got {idx.shape[0]}")
    dt = np.dtype(dout.dtype)
    out = cuda.device_array((int(num_rows), int(dout.shape[1])), dtype=dt)
    if _size(out):
        build_embedding_bwd(dt)[grid1d(_size(out))](asarray(dout), cuda.to_device(idx), out)
    return _ret(is_array(dout), out)


def _partial_sums(k, n, dt, *args) -> float:
    """Launch the per-block reduction ``k`` over ``n`` elements; the partials summed in float64."""
    blocks, threads = grid_reduce(n)
    partial = cuda.device_array((blocks,), dtype=dt)
    k[blocks, threads](*args, partial)
    return float(partial.copy_to_host().astype(np.float64).sum())


def sumsq(a) -> float:
    """CUDA twin of :func:`difnumpy.kernels.reference.sumsq`: ``sum(a**2)``, a Python float.

    Per-thread sums in ``a``'s dtype, one partial per block added in float64 on the host.
    """
    _check("a", a)
    n = _size(a)
    if n == 0:
        return 0.0
    return _partial_sums(build_sumsq(a.dtype), n, np.dtype(a.dtype), _flat(asarray(a)))


def mse_loss(pred, target):
    """CUDA twin of :func:`difnumpy.kernels.reference.mse_loss`: ``(loss: float, dpred)`` (DDPM eq. 14).

    ``target`` is cast to ``pred``'s dtype (through the host if it is a device array of another dtype).
    """
    _check("pred", pred)
    _check("target", target, None, None, pred.shape)
    n = _size(pred)
    if n == 0:
        raise ValueError("pred must not be empty")
    dt = np.dtype(pred.dtype)
    d_t = asarray(target) if np.dtype(target.dtype) == dt else asarray(to_host(target), dt)
    dpred = cuda.device_array(tuple(pred.shape), dtype=dt)
    tot = _partial_sums(build_mse(dt), n, dt, _flat(asarray(pred)), _flat(d_t), dt.type(2.0 / n), _flat(dpred))
    return tot / n, _ret(is_array(pred), dpred)
