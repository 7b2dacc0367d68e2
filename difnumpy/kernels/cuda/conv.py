"""2-D convolution (cross-correlation, NCHW): forward, input gradient, weight and bias gradients.

Twins: :func:`difnumpy.kernels.reference.conv2d_forward`, ``conv2d_backward_input``,
``conv2d_backward_weight``. Kernels up to 3x3 with stride <= 2 take the shared-memory tiled forward
kernel and (with ``USE_BLOCK_REDUCTIONS``) the block-reduced weight gradient; larger ones direct kernels.
"""
from __future__ import annotations

import numpy as np

from difnumpy.kernels.cuda import _runtime
from difnumpy.kernels.cuda._device import block_sum_d
from difnumpy.kernels.cuda._runtime import (CONV_CB, CONV_FB, CONV_TS, KMAX, MAX_GRID_Z, RED, SMAX, _check,
                                            _check_int, _ret, asarray, cuda, grid1d, is_array, kernel, numba)

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@kernel(lambda t: (t.a4, t.a4, t.a1, t.i, t.i, t.i, t.a4))
def build_conv_fwd_tiled(dt):
    """One block: a TS x TS tile of output pixels, FB filters, one sample (``n0 + blockIdx.z``).

    The input patch the tile reads (CB channels at a time) and the matching weights are staged in shared
    memory; every thread keeps FB accumulators, reusing each staged input value FB times.
    """
    nt = numba.from_dtype(dt)
    ZERO = dt.type(0.0)
    TS, FB, CB = CONV_TS, CONV_FB, CONV_CB
    PMAX = (TS - 1) * SMAX + KMAX

    def conv_fwd_tiled_k(x, w, b, stride, pad, n0, out):
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        F, KH, KW = w.shape[0], w.shape[2], w.shape[3]
        Ho, Wo = out.shape[2], out.shape[3]
        tiles_w = (Wo + TS - 1) // TS
        oy0 = (cuda.blockIdx.x // tiles_w) * TS
        ox0 = (cuda.blockIdx.x % tiles_w) * TS
        f0 = cuda.blockIdx.y * FB
        n = n0 + cuda.blockIdx.z
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * TS + tx
        sx = cuda.shared.array((CB, PMAX, PMAX), nt)
        sw = cuda.shared.array((FB, CB, KMAX, KMAX), nt)
        acc = cuda.local.array(FB, nt)
        for k in range(FB):
            acc[k] = ZERO
        ph = (TS - 1) * stride + KH
        pw = (TS - 1) * stride + KW
        iy0 = oy0 * stride - pad
        ix0 = ox0 * stride - pad
        for c0 in range(0, C, CB):
            for idx in range(tid, CB * ph * pw, TS * TS):
                cc = idx // (ph * pw)
                r = idx - cc * ph * pw
                py = r // pw
                px = r - py * pw
                iy = iy0 + py
                ix = ix0 + px
                val = ZERO
                if c0 + cc < C and iy >= 0 and iy < H and ix >= 0 and ix < W:
                    val = x[n, c0 + cc, iy, ix]
                sx[cc, py, px] = val
            for idx in range(tid, FB * CB * KH * KW, TS * TS):
                k = idx // (CB * KH * KW)
                r = idx - k * CB * KH * KW
                cc = r // (KH * KW)
                r = r - cc * KH * KW
                u = r // KW
                v = r - u * KW
                val = ZERO
                if f0 + k < F and c0 + cc < C:
                    val = w[f0 + k, c0 + cc, u, v]
                sw[k, cc, u, v] = val
            cuda.syncthreads()
            for cc in range(CB):
                for u in range(KH):
                    for v in range(KW):
                        xv = sx[cc, ty * stride + u, tx * stride + v]
                        for k in range(FB):
                            acc[k] += xv * sw[k, cc, u, v]
            cuda.syncthreads()
        oy = oy0 + ty
        ox = ox0 + tx
        if oy < Ho and ox < Wo:
            for k in range(FB):
                if f0 + k < F:
                    out[n, f0 + k, oy, ox] = acc[k] + b[f0 + k]
    return conv_fwd_tiled_k


@kernel(lambda t: (t.a4, t.a4, t.a1, t.i, t.i, t.a4))
def build_conv_fwd_direct(dt):
    """One thread per output element, any kernel size and stride."""
    def conv_fwd_direct_k(x, w, b, stride, pad, out):
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        F, KH, KW = w.shape[0], w.shape[2], w.shape[3]
        Ho, Wo = out.shape[2], out.shape[3]
        for i in range(cuda.grid(1), x.shape[0] * F * Ho * Wo, cuda.gridsize(1)):
            ox = i % Wo
            r = i // Wo
            oy = r % Ho
            r = r // Ho
            f = r % F
            n = r // F
            acc = b[f]
            for c in range(C):
                for u in range(KH):
                    iy = oy * stride - pad + u
                    if iy >= 0 and iy < H:
                        for v in range(KW):
                            ix = ox * stride - pad + v
                            if ix >= 0 and ix < W:
                                acc += w[f, c, u, v] * x[n, c, iy, ix]
            out[n, f, oy, ox] = acc
    return conv_fwd_direct_k


@kernel(lambda t: (t.a4, t.a4, t.i, t.i, t.a4))
def build_conv_bwd_input(dt):
    """Gather form of col2im: one thread per input pixel, no atomics (deterministic)."""
    ZERO = dt.type(0.0)

    def conv_bwd_input_k(dout, w, stride, pad, dx):
        C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
        F, KH, KW = w.shape[0], w.shape[2], w.shape[3]
        Ho, Wo = dout.shape[2], dout.shape[3]
        for i in range(cuda.grid(1), dx.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            acc = ZERO
            for u in range(KH):
                sy = yy + pad - u
                if sy >= 0 and sy % stride == 0 and sy // stride < Ho:
                    oy = sy // stride
                    for v in range(KW):
                        sx_ = xx + pad - v
                        if sx_ >= 0 and sx_ % stride == 0 and sx_ // stride < Wo:
                            ox = sx_ // stride
                            for f in range(F):
                                acc += dout[n, f, oy, ox] * w[f, c, u, v]
            dx[n, c, yy, xx] = acc
    return conv_bwd_input_k


@kernel(lambda t: (t.a4, t.a4, t.i, t.i, t.a4, t.a1))
def build_conv_bwd_weight(dt):
    """One block per (c, f), KH, KW <= KMAX: its RED threads stride over the N*Ho*Wo output pixels with
    KH*KW (+1 for the bias) partial sums each, then a shared-memory tree reduction."""
    nt = numba.from_dtype(dt)
    ZERO = dt.type(0.0)
    KK1 = KMAX * KMAX + 1

    def conv_bwd_weight_k(dout, x, stride, pad, dw, db):
        c = cuda.blockIdx.x
        f = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        H, W = x.shape[2], x.shape[3]
        KH, KW = dw.shape[2], dw.shape[3]
        Ho, Wo = dout.shape[2], dout.shape[3]
        part = cuda.local.array(KK1, nt)
        for k in range(KK1):
            part[k] = ZERO
        HoWo = Ho * Wo
        for p in range(tid, dout.shape[0] * HoWo, RED):
            n = p // HoWo
            r = p - n * HoWo
            oy = r // Wo
            ox = r - oy * Wo
            d = dout[n, f, oy, ox]
            part[KK1 - 1] += d
            for u in range(KH):
                iy = oy * stride - pad + u
                if iy >= 0 and iy < H:
                    for v in range(KW):
                        ix = ox * stride - pad + v
                        if ix >= 0 and ix < W:
                            part[u * KW + v] += d * x[n, c, iy, ix]
        sh = cuda.shared.array((KK1, RED), nt)
        for k in range(KK1):
            sh[k, tid] = part[k]
        cuda.syncthreads()
        s = RED // 2
        while s > 0:
            if tid < s:
                for k in range(KK1):
                    sh[k, tid] += sh[k, tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            for u in range(KH):
                for v in range(KW):
                    dw[f, c, u, v] = sh[u * KW + v, 0]
            if c == 0:
                db[f] = sh[KK1 - 1, 0]
    return conv_bwd_weight_k


@kernel(lambda t: (t.a4, t.a4, t.i, t.i, t.a4))
def build_conv_bwd_weight_direct(dt):
    """One thread per weight, serial sums over N*Ho*Wo."""
    ZERO = dt.type(0.0)

    def conv_bwd_weight_direct_k(dout, x, stride, pad, dw):
        F, C, KH, KW = dw.shape[0], dw.shape[1], dw.shape[2], dw.shape[3]
        H, W = x.shape[2], x.shape[3]
        Ho, Wo = dout.shape[2], dout.shape[3]
        for i in range(cuda.grid(1), F * C * KH * KW, cuda.gridsize(1)):
            v = i % KW
            r = i // KW
            u = r % KH
            r = r // KH
            c = r % C
            f = r // C
            acc = ZERO
            for n in range(dout.shape[0]):
                for oy in range(Ho):
                    iy = oy * stride - pad + u
                    if iy >= 0 and iy < H:
                        for ox in range(Wo):
                            ix = ox * stride - pad + v
                            if ix >= 0 and ix < W:
                                acc += dout[n, f, oy, ox] * x[n, c, iy, ix]
            dw[f, c, u, v] = acc
    return conv_bwd_weight_direct_k


@kernel(lambda t: (t.a4, t.a1))
def build_sum_nhw(dt):
    """``db[f] = sum_{n,h,w} dout[n, f, h, w]``: one block per f, a shared-memory tree sum."""
    nt = numba.from_dtype(dt)
    ZERO = dt.type(0.0)

    def sum_nhw_k(dout, db):
        f = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        HW = dout.shape[2] * dout.shape[3]
        acc = ZERO
        for p in range(tid, dout.shape[0] * HW, RED):
            n = p // HW
            r = p - n * HW
            acc += dout[n, f, r // dout.shape[3], r % dout.shape[3]]
        sh = cuda.shared.array(RED, nt)
        tot = block_sum_d(sh, acc, tid, RED)
        if tid == 0:
            db[f] = tot
    return sum_nhw_k


@kernel(lambda t: (t.a4, t.a1))
def build_sum_nhw_direct(dt):
    """``db[f] = sum_{n,h,w} dout[n, f, h, w]``: one thread per f."""
    ZERO = dt.type(0.0)

    def sum_nhw_direct_k(dout, db):
        for f in range(cuda.grid(1), dout.shape[1], cuda.gridsize(1)):
            acc = ZERO
            for n in range(dout.shape[0]):
                for yy in range(dout.shape[2]):
                    for xx in range(dout.shape[3]):
                        acc += dout[n, f, yy, xx]
            db[f] = acc
    return sum_nhw_direct_k


# ------------------------------------------------------------------------------------------------
# host wrappers
# ------------------------------------------------------------------------------------------------

def _geometry(stride, padding):
    return _check_int("stride", stride, 1), _check_int("padding", padding, 0)


def _out_hw(H, W, KH, KW, stride, padding, what):
    Ho, Wo = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"kernel {KH}x{KW} is larger than the padded input ({what} {H}x{W}, padding {padding})")
    return Ho, Wo


def _shape4(name, shape):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of 4 ints, got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{name} must be 4 positive ints, got {shape}")
    return shape


def conv2d_forward(x, w, b, stride, padding):
    """CUDA twin of :func:`difnumpy.kernels.reference.conv2d_forward` (shared-memory tiled, NCHW).

    Kernels up to 3x3 with stride <= 2 take the tiled kernel (TS x TS output tile per block, input
    patch and weights staged in shared memory, FB filters per thread); larger ones a direct kernel.
    """
    _check("x", x, 4)
    _check("w", w, 4, x.dtype)
    stride, padding = _geometry(stride, padding)
    N, C, H, W = (int(s) for s in x.shape)
    F, Cw, KH, KW = (int(s) for s in w.shape)
    if Cw != C:
        raise ValueError(f"w has {Cw} input channels but x has {C}")
    _check("b", b, 1, x.dtype, (F,))
    Ho, Wo = _out_hw(H, W, KH, KW, stride, padding, "x")
    dt = np.dtype(x.dtype)
    d_x, d_w, d_b = asarray(x), asarray(w), asarray(b)
    out = cuda.device_array((N, F, Ho, Wo), dtype=dt)
    if N * F == 0:
        return _ret(is_array(x), out)
    if KH <= KMAX and KW <= KMAX and stride <= SMAX:
        tiles = ((Ho + CONV_TS - 1) // CONV_TS) * ((Wo + CONV_TS - 1) // CONV_TS)
        for n0 in range(0, N, MAX_GRID_Z):
            grid = (tiles, (F + CONV_FB - 1) // CONV_FB, min(MAX_GRID_Z, N - n0))
            build_conv_fwd_tiled(dt)[grid, (CONV_TS, CONV_TS)](d_x, d_w, d_b, stride, padding, n0, out)
    else:
        build_conv_fwd_direct(dt)[grid1d(N * F * Ho * Wo)](d_x, d_w, d_b, stride, padding, out)
    return _ret(is_array(x), out)


def conv2d_backward_input(dout, w, x_shape, stride, padding):
    """CUDA twin of :func:`difnumpy.kernels.reference.conv2d_backward_input` (gather form, no atomics)."""
    _check("dout", dout, 4)
    _check("w", w, 4, dout.dtype)
    stride, padding = _geometry(stride, padding)
    N, C, H, W = _shape4("x_shape", x_shape)
    F, Cw, KH, KW = (int(s) for s in w.shape)
    if Cw != C:
        raise ValueError(f"w has {Cw} input channels but x_shape has {C}")
    want = (N, F) + _out_hw(H, W, KH, KW, stride, padding, "x_shape")
    if tuple(dout.shape) != want:
        raise ValueError(f"dout must have shape {want} (from x_shape, w, stride, padding), got {tuple(dout.shape)}")
    dt = np.dtype(dout.dtype)
    dx = cuda.device_array((N, C, H, W), dtype=dt)
    build_conv_bwd_input(dt)[grid1d(N * C * H * W)](asarray(dout), asarray(w), stride, padding, dx)
    return _ret(is_array(dout), dx)


def conv2d_backward_weight(dout, x, w_shape, stride, padding):
    """CUDA twin of :func:`difnumpy.kernels.reference.conv2d_backward_weight`: ``(dw, db)``.

    With ``USE_BLOCK_REDUCTIONS`` (the default on a GPU) one block per (input channel, filter) reduces
    over the N*Ho*Wo output pixels in shared memory (kernels up to 3x3); otherwise one thread per weight.
    """
    _check("dout", dout, 4)
    _check("x", x, 4, dout.dtype)
    stride, padding = _geometry(stride, padding)
    F, C, KH, KW = _shape4("w_shape", w_shape)
    N, Cx, H, W = (int(s) for s in x.shape)
    if Cx != C:
        raise ValueError(f"w_shape has {C} input channels but x has {Cx}")
    want = (N, F) + _out_hw(H, W, KH, KW, stride, padding, "x")
    if tuple(dout.shape) != want:
        raise ValueError(f"dout must have shape {want} (from x, w_shape, stride, padding), got {tuple(dout.shape)}")
    dt = np.dtype(dout.dtype)
    d_do, d_x = asarray(dout), asarray(x)
    dw = cuda.device_array((F, C, KH, KW), dtype=dt)
    db = cuda.device_array((F,), dtype=dt)
    block = _runtime.USE_BLOCK_REDUCTIONS
    if block and KH <= KMAX and KW <= KMAX:
        build_conv_bwd_weight(dt)[(C, F), RED](d_do, d_x, stride, padding, dw, db)
    else:
        build_conv_bwd_weight_direct(dt)[grid1d(F * C * KH * KW)](d_do, d_x, stride, padding, dw)
        if block:
            build_sum_nhw(dt)[F, RED](d_do, db)
        else:
            build_sum_nhw_direct(dt)[grid1d(F)](d_do, db)
    return _ret(is_array(dout), dw, db)
