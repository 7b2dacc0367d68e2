"""``numba.cuda`` kernels: the GPU backend (``backend="cuda"``).

Every public kernel here has a NumPy twin with the same signature in :mod:`difnumpy.kernels.reference`
(q_sample, sampler_update, conv2d_forward, conv2d_backward_input, conv2d_backward_weight,
group_norm_silu_forward/backward, adam_update, and the ``cuda-extras`` section: upsample_nearest2x
forward/backward, linear forward/backward, mse_loss, ema_update) and a test asserting that they agree
(``tests/test_cuda.py``, run under numba's CUDA simulator in CI).

Transfers (DESIGN.md, convention 6): every host wrapper accepts NumPy arrays *or* device arrays.
NumPy in -> copied up, computed, copied down, NumPy out. Device arrays in -> the result stays on the
device (a device array is returned; in-place kernels update the device arrays), so loops such as
:func:`sample_device` and :class:`DeviceUNet` copy inputs up once and results down once, and
:class:`DeviceTrainStep` (what ``Trainer(backend="cuda")`` runs) keeps parameters, Adam's moments and
the EMA on the device across steps.

Noise is drawn on the device from ``numba.cuda.random`` xoroshiro128p states seeded from the user's
``np.random.Generator`` (``seed = rng.integers(2**63)``): the same seed gives the same draws on the same
launch configuration, but not the same numbers as the CPU backends (which draw with NumPy).

All CUDA-specific code of the package lives in this file; importing it where numba-cuda or a GPU is
missing raises a RuntimeError that says why (``get_backend("cuda")`` passes it on). Set
``NUMBA_ENABLE_CUDASIM=1`` *before numba is imported* to run every kernel on numba's CUDA simulator
(slow: one Python thread per CUDA thread; launch sizes are reduced then, the maths is the same).
Set ``DIFNUMPY_CUDA_COMPILE_ONLY=1`` to import the module without a GPU for ``numba.cuda.compile_ptx``
inspection only (kernels cannot be launched then).

Kernels are specialised per dtype (float32 / float64): every constant is a NumPy scalar of the kernel's
dtype, and float scalars are passed in that dtype, so float32 kernels compile to float32 PTX
(no ``.f64`` instructions; checked by a test with ``numba.cuda.compile_ptx``).
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np


# ------------------------------------------------------------------------------------------------
# availability: a clear error instead of a crash
# ------------------------------------------------------------------------------------------------

def _probe():
    """Return ``(numba, numba.cuda, simulator, reason)``; reason is None when kernels can run."""
    try:
        import numba
        from numba import cuda
    except Exception as e:  # ImportError, or a broken CUDA installation
        return None, None, False, (f"numba.cuda cannot be imported ({type(e).__name__}: {e}); "
                                   f"install the GPU extra: pip install 'difnumpy[cuda]'")
    sim = bool(getattr(numba.config, "ENABLE_CUDASIM", False))
    try:
        ok = bool(cuda.is_available())
    except Exception as e:  # pragma: no cover (driver errors)
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "numba.cuda.is_available() is False"
    if not ok:
        return numba, cuda, sim, (f"no usable NVIDIA GPU / CUDA driver was found ({why}). To run the CUDA "
                                  f"kernels without a GPU, set NUMBA_ENABLE_CUDASIM=1 before numba is imported")
    return numba, cuda, sim, None


numba, cuda, SIMULATOR, _REASON = _probe()
_COMPILE_ONLY = os.environ.get("DIFNUMPY_CUDA_COMPILE_ONLY") == "1" and cuda is not None
if _REASON is not None and not _COMPILE_ONLY:
    raise RuntimeError(f"backend='cuda' is not usable: {_REASON}")

from numba.cuda.random import (create_xoroshiro128p_states, xoroshiro128p_normal_float32,  # noqa: E402
                               xoroshiro128p_normal_float64)

__all__ = [
    "SIMULATOR", "cuda_available", "to_device", "to_host", "is_device_array",
    "q_sample", "sampler_update", "sampler_update_random", "randn",
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
    "group_norm_silu_forward", "group_norm_silu_backward", "adam_update",
    "upsample_nearest2x_forward", "upsample_nearest2x_backward", "linear_forward", "linear_backward",
    "mse_loss", "ema_update", "DeviceUNet", "sample_device", "DeviceRandom", "DeviceTrainStep",
]


def cuda_available() -> bool:
    """True when the kernels of this module can be launched (a GPU, or the simulator). Never raises."""
    return _REASON is None


# ------------------------------------------------------------------------------------------------
# launch configuration (smaller under the simulator, where every CUDA thread is a Python thread)
# ------------------------------------------------------------------------------------------------

_TPB = 16 if SIMULATOR else 256            # threads per block of 1-D (grid-stride) kernels
_MAX_BLOCKS = 2 if SIMULATOR else 2048     # grid-stride loops: at most this many blocks
_RED = 8 if SIMULATOR else 128             # threads per block of reduction kernels (power of two)
_CONV_TS = 4 if SIMULATOR else 16          # output tile (TS x TS threads) of the tiled convolution
_CONV_FB = 4 if SIMULATOR else 8           # filters per block (register blocking)
_CONV_CB = 4                               # input channels staged in shared memory at a time
_KMAX = 3                                  # tiled / block-reduced kernels: KH, KW <= 3 ...
_SMAX = 2                                  # ... and stride <= 2; larger ones take the direct kernels
_MAX_GRID_Z = 65535
#: Block-reduction kernels (one block per output, shared-memory tree sums) for the weight gradient of
#: the convolution and GroupNorm's backward statistics. Under the simulator, where every block is a set
#: of Python threads meeting at barriers, the grid-stride "direct" kernels (one thread per output, serial
#: sums) are much faster; the tests run both kinds against the NumPy twins.
USE_BLOCK_REDUCTIONS = not SIMULATOR


def _grid1d(n: int) -> tuple[int, int]:
    return max(1, min((n + _TPB - 1) // _TPB, _MAX_BLOCKS)), _TPB


# ------------------------------------------------------------------------------------------------
# scalar maths, written once: compiled as numba.njit(inline="always") for the CPU and as
# cuda.jit(device=True) for the kernels. Constants are arguments, so they keep the caller's dtype.
# ------------------------------------------------------------------------------------------------

def _sigmoid_s(y, half):
    """``sigmoid(y) = 1/2 + tanh(y/2)/2`` (no overflow), in the dtype of ``y`` and ``half``."""
    return half + half * math.tanh(half * y)


def _silu_s(y, half):
    """SiLU ``y * sigmoid(y)`` (Elfwing et al. 2018)."""
    return y * (half + half * math.tanh(half * y))


def _silu_grad_s(y, one, half):
    """``d/dy [y sigmoid(y)] = s (1 + y (1 - s))``, ``s = sigmoid(y)``."""
    s = half + half * math.tanh(half * y)
    return s * (one + y * (one - s))


def _sampler_s(x, mo, z, a, b, c, d, e, lo, hi):
    """The fused reverse step: ``x0 = clip(a x + b mo, lo, hi)``, ``x_prev = c x0 + d x + e z``."""
    x0 = a * x + b * mo
    x0 = min(max(x0, lo), hi)
    return c * x0 + d * x + e * z, x0


def _adam_s(p, g, m, v, lr_wd, beta1, one_m_beta1, beta2, one_m_beta2, step_size, bc2, eps):
    """AdamW element update (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019, Alg. 2)."""
    p = p - lr_wd * p
    m = beta1 * m + one_m_beta1 * g
    v = beta2 * v + one_m_beta2 * (g * g)
    p = p - step_size * m / (math.sqrt(v / bc2) + eps)
    return p, m, v


def _ema_s(e, p, decay, one_m_decay):
    """``decay * e + (1 - decay) * p``."""
    return decay * e + one_m_decay * p


_SCALAR_FUNCS = {"sigmoid": _sigmoid_s, "silu": _silu_s, "silu_grad": _silu_grad_s, "sampler": _sampler_s,
                 "adam": _adam_s, "ema": _ema_s}
#: CPU (njit, inline="always") compilations of the scalar maths (tested against the NumPy twins).
scalar_cpu = SimpleNamespace(**{k: numba.njit(inline="always", cache=True)(f) for k, f in _SCALAR_FUNCS.items()})
#: CUDA device-function compilations of the same scalar maths.
scalar_dev = SimpleNamespace(**{k: cuda.jit(device=True)(f) for k, f in _SCALAR_FUNCS.items()})
_sigmoid_d, _silu_d, _silu_grad_d = scalar_dev.sigmoid, scalar_dev.silu, scalar_dev.silu_grad
_sampler_d, _adam_d, _ema_d = scalar_dev.sampler, scalar_dev.adam, scalar_dev.ema


@cuda.jit(device=True)
def _block_sum(sh, val, tid, nthreads):
    """Sum of ``val`` over the ``nthreads`` (a power of two) threads of the block; all threads get it."""
    sh[tid] = val
    cuda.syncthreads()
    s = nthreads // 2
    while s > 0:
        if tid < s:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


# ------------------------------------------------------------------------------------------------
# the kernels, built once per dtype
# ------------------------------------------------------------------------------------------------

_KERNELS: dict = {}


def _k(dtype) -> SimpleNamespace:
    """The kernels specialised for ``dtype`` (float32 or float64), compiled lazily on first launch."""
    dt = np.dtype(dtype)
    ns = _KERNELS.get(dt)
    if ns is None:
        ns = _KERNELS[dt] = _build(dt)
    return ns


def _build(dt: np.dtype) -> SimpleNamespace:  # noqa: C901 (one closure per kernel)
    nt = numba.from_dtype(dt)
    CAST = dt.type
    ZERO, ONE, HALF = dt.type(0.0), dt.type(1.0), dt.type(0.5)
    normal = xoroshiro128p_normal_float32 if dt == np.float32 else xoroshiro128p_normal_float64
    TS, FB, CB, KMAX, RED = _CONV_TS, _CONV_FB, _CONV_CB, _KMAX, _RED
    PMAX = (TS - 1) * _SMAX + KMAX
    KK1 = KMAX * KMAX + 1

    # ---- diffusion ------------------------------------------------------------------------------

    @cuda.jit
    def q_sample_k(x0, noise, a, b, out):
        M = x0.shape[1]
        for i in range(cuda.grid(1), x0.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            j = i - n * M
            out[n, j] = a[n] * x0[n, j] + b[n] * noise[n, j]

    @cuda.jit
    def sampler_k(x, mo, z, coef, lo, hi, x_prev, x0_pred):
        M = x.shape[1]
        for i in range(cuda.grid(1), x.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            j = i - n * M
            xp, x0 = _sampler_d(x[n, j], mo[n, j], z[n, j], coef[n, 0], coef[n, 1], coef[n, 2], coef[n, 3],
                                coef[n, 4], lo[n], hi[n])
            x_prev[n, j] = xp
            x0_pred[n, j] = x0

    @cuda.jit
    def sampler_rng_k(x, mo, states, coef, lo, hi, x_prev, x0_pred):
        M = x.shape[1]
        tid = cuda.grid(1)
        for i in range(tid, x.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            j = i - n * M
            z = normal(states, tid)
            xp, x0 = _sampler_d(x[n, j], mo[n, j], z, coef[n, 0], coef[n, 1], coef[n, 2], coef[n, 3],
                                coef[n, 4], lo[n], hi[n])
            x_prev[n, j] = xp
            x0_pred[n, j] = x0

    @cuda.jit
    def randn_k(states, out):
        tid = cuda.grid(1)
        for i in range(tid, out.shape[0], cuda.gridsize(1)):
            out[i] = normal(states, tid)

    # ---- convolution ----------------------------------------------------------------------------

    @cuda.jit
    def conv_fwd_tiled_k(x, w, b, stride, pad, n0, out):
        # One block: a TS x TS tile of output pixels, FB filters, one sample. The input patch the tile
        # reads (CB channels at a time) and the matching weights are staged in shared memory; every
        # thread keeps FB accumulators, reusing each staged input value FB times.
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

    @cuda.jit
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

    @cuda.jit
    def conv_bwd_input_k(dout, w, stride, pad, dx):
        # gather form of col2im: one thread per input pixel, no atomics (deterministic)
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

    @cuda.jit
    def conv_bwd_weight_k(dout, x, stride, pad, dw, db):
        # one block per (c, f): its RED threads stride over the N*Ho*Wo output pixels with KH*KW (+1 for
        # the bias) partial sums each, then a shared-memory tree reduction
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

    @cuda.jit
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

    @cuda.jit
    def sum_nhw_k(dout, db):
        # db[f] = sum over n, h, w of dout[n, f, h, w]; one block per f
        f = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        HW = dout.shape[2] * dout.shape[3]
        acc = ZERO
        for p in range(tid, dout.shape[0] * HW, RED):
            n = p // HW
            r = p - n * HW
            acc += dout[n, f, r // dout.shape[3], r % dout.shape[3]]
        sh = cuda.shared.array(RED, nt)
        tot = _block_sum(sh, acc, tid, RED)
        if tid == 0:
            db[f] = tot

    @cuda.jit
    def sum_nhw_direct_k(dout, db):
        for f in range(cuda.grid(1), dout.shape[1], cuda.gridsize(1)):
            acc = ZERO
            for n in range(dout.shape[0]):
                for yy in range(dout.shape[2]):
                    for xx in range(dout.shape[3]):
                        acc += dout[n, f, yy, xx]
            db[f] = acc

    # ---- group norm + SiLU ----------------------------------------------------------------------

    @cuda.jit
    def gn_fwd_k(x, gamma, beta, groups, eps, silu, out, mean, rstd):
        # one block per (n, g): two-pass statistics (mean, then the centred second moment)
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        n = cuda.blockIdx.x // groups
        g = cuda.blockIdx.x - n * groups
        tid = cuda.threadIdx.x
        cpg = C // groups
        HW = H * W
        M = cpg * HW
        c0 = g * cpg
        sh = cuda.shared.array(RED, nt)
        acc = ZERO
        for i in range(tid, M, RED):
            c = c0 + i // HW
            r = i % HW
            acc += x[n, c, r // W, r % W]
        mu = _block_sum(sh, acc, tid, RED) / CAST(M)
        acc = ZERO
        for i in range(tid, M, RED):
            c = c0 + i // HW
            r = i % HW
            d = x[n, c, r // W, r % W] - mu
            acc += d * d
        var = _block_sum(sh, acc, tid, RED) / CAST(M)
        rs = ONE / math.sqrt(var + eps)
        if tid == 0:
            mean[n, g] = mu
            rstd[n, g] = rs
        for i in range(tid, M, RED):
            c = c0 + i // HW
            r = i % HW
            hh = r // W
            ww = r % W
            y = (x[n, c, hh, ww] - mu) * rs * gamma[c] + beta[c]
            if silu:
                y = _silu_d(y, HALF)
            out[n, c, hh, ww] = y

    @cuda.jit
    def gn_bwd_part_k(dout, x, gamma, beta, mean, rstd, groups, silu, part):
        # one block per (n, c): part[n, c] = (sum_hw dy * xhat, sum_hw dy)
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        n = cuda.blockIdx.x // C
        c = cuda.blockIdx.x - n * C
        g = c // (C // groups)
        tid = cuda.threadIdx.x
        mu = mean[n, g]
        rs = rstd[n, g]
        ga = gamma[c]
        be = beta[c]
        s1 = ZERO
        s2 = ZERO
        for i in range(tid, H * W, RED):
            hh = i // W
            ww = i % W
            xh = (x[n, c, hh, ww] - mu) * rs
            dy = dout[n, c, hh, ww]
            if silu:
                dy = dy * _silu_grad_d(xh * ga + be, ONE, HALF)
            s1 += dy * xh
            s2 += dy
        sh = cuda.shared.array(RED, nt)
        t1 = _block_sum(sh, s1, tid, RED)
        t2 = _block_sum(sh, s2, tid, RED)
        if tid == 0:
            part[n, c, 0] = t1
            part[n, c, 1] = t2

    @cuda.jit
    def gn_bwd_part_direct_k(dout, x, gamma, beta, mean, rstd, groups, silu, part):
        # one thread per (n, c), serial sums over H*W
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        for i in range(cuda.grid(1), x.shape[0] * C, cuda.gridsize(1)):
            n = i // C
            c = i - n * C
            g = c // (C // groups)
            mu = mean[n, g]
            rs = rstd[n, g]
            s1 = ZERO
            s2 = ZERO
            for hh in range(H):
                for ww in range(W):
                    xh = (x[n, c, hh, ww] - mu) * rs
                    dy = dout[n, c, hh, ww]
                    if silu:
                        dy = dy * _silu_grad_d(xh * gamma[c] + beta[c], ONE, HALF)
                    s1 += dy * xh
                    s2 += dy
            part[n, c, 0] = s1
            part[n, c, 1] = s2

    @cuda.jit
    def gn_bwd_group_k(part, gamma, groups, HW, gstat):
        # gstat[n, g] = (mean_group(dy * gamma), mean_group(dy * gamma * xhat))
        N, C = part.shape[0], part.shape[1]
        cpg = C // groups
        for i in range(cuda.grid(1), N * groups, cuda.gridsize(1)):
            n = i // groups
            g = i - n * groups
            a = ZERO
            bx = ZERO
            for c in range(g * cpg, (g + 1) * cpg):
                a += gamma[c] * part[n, c, 1]
                bx += gamma[c] * part[n, c, 0]
            M = CAST(cpg * HW)
            gstat[n, g, 0] = a / M
            gstat[n, g, 1] = bx / M

    @cuda.jit
    def gn_bwd_param_k(part, dgamma, dbeta):
        for c in range(cuda.grid(1), part.shape[1], cuda.gridsize(1)):
            a = ZERO
            bb = ZERO
            for n in range(part.shape[0]):
                a += part[n, c, 0]
                bb += part[n, c, 1]
            dgamma[c] = a
            dbeta[c] = bb

    @cuda.jit
    def gn_bwd_dx_k(dout, x, gamma, beta, mean, rstd, groups, silu, gstat, dx):
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        cpg = C // groups
        for i in range(cuda.grid(1), x.shape[0] * C * H * W, cuda.gridsize(1)):
            ww = i % W
            r = i // W
            hh = r % H
            r = r // H
            c = r % C
            n = r // C
            g = c // cpg
            xh = (x[n, c, hh, ww] - mean[n, g]) * rstd[n, g]
            dy = dout[n, c, hh, ww]
            if silu:
                dy = dy * _silu_grad_d(xh * gamma[c] + beta[c], ONE, HALF)
            dx[n, c, hh, ww] = rstd[n, g] * (dy * gamma[c] - gstat[n, g, 0] - xh * gstat[n, g, 1])

    # ---- optimizer, EMA -------------------------------------------------------------------------

    @cuda.jit
    def adam_k(p, g, m, v, lr_wd, b1, omb1, b2, omb2, step_size, bc2, eps):
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            pn, mn, vn = _adam_d(p[i], g[i], m[i], v[i], lr_wd, b1, omb1, b2, omb2, step_size, bc2, eps)
            p[i] = pn
            m[i] = mn
            v[i] = vn

    @cuda.jit
    def ema_k(e, p, decay, omd):
        for i in range(cuda.grid(1), e.shape[0], cuda.gridsize(1)):
            e[i] = _ema_d(e[i], p[i], decay, omd)

    # ---- extras: upsample, linear, loss, elementwise helpers ------------------------------------

    @cuda.jit
    def up2_fwd_k(x, out):
        C, H2, W2 = out.shape[1], out.shape[2], out.shape[3]
        for i in range(cuda.grid(1), out.shape[0] * C * H2 * W2, cuda.gridsize(1)):
            xx = i % W2
            r = i // W2
            yy = r % H2
            r = r // H2
            c = r % C
            n = r // C
            out[n, c, yy, xx] = x[n, c, yy // 2, xx // 2]

    @cuda.jit
    def up2_bwd_k(dout, dx):
        C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
        for i in range(cuda.grid(1), dx.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            dx[n, c, yy, xx] = (dout[n, c, 2 * yy, 2 * xx] + dout[n, c, 2 * yy, 2 * xx + 1]
                                + dout[n, c, 2 * yy + 1, 2 * xx] + dout[n, c, 2 * yy + 1, 2 * xx + 1])

    @cuda.jit
    def linear_fwd_k(x, w, b, out):
        D = x.shape[1]
        M = w.shape[0]
        for i in range(cuda.grid(1), x.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            m = i - n * M
            acc = b[m]
            for d in range(D):
                acc += x[n, d] * w[m, d]
            out[n, m] = acc

    @cuda.jit
    def matmul_nn_k(a, b, out):
        # out (P, Q) = a (P, R) @ b (R, Q)
        R = a.shape[1]
        Q = b.shape[1]
        for i in range(cuda.grid(1), a.shape[0] * Q, cuda.gridsize(1)):
            p = i // Q
            q = i - p * Q
            acc = ZERO
            for r in range(R):
                acc += a[p, r] * b[r, q]
            out[p, q] = acc

    @cuda.jit
    def matmul_tn_k(a, b, out):
        # out (P, Q) = a.T @ b with a (R, P), b (R, Q)
        R = a.shape[0]
        Q = b.shape[1]
        for i in range(cuda.grid(1), a.shape[1] * Q, cuda.gridsize(1)):
            p = i // Q
            q = i - p * Q
            acc = ZERO
            for r in range(R):
                acc += a[r, p] * b[r, q]
            out[p, q] = acc

    @cuda.jit
    def colsum_k(a, out):
        for j in range(cuda.grid(1), a.shape[1], cuda.gridsize(1)):
            acc = ZERO
            for i in range(a.shape[0]):
                acc += a[i, j]
            out[j] = acc

    @cuda.jit
    def mse_k(pred, target, scale, dpred, partial):
        tid = cuda.threadIdx.x
        acc = ZERO
        for i in range(cuda.grid(1), pred.shape[0], cuda.gridsize(1)):
            d = pred[i] - target[i]
            dpred[i] = d * scale
            acc += d * d
        sh = cuda.shared.array(RED, nt)
        tot = _block_sum(sh, acc, tid, RED)
        if tid == 0:
            partial[cuda.blockIdx.x] = tot

    @cuda.jit
    def sumsq_k(a, partial):
        tid = cuda.threadIdx.x
        acc = ZERO
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            acc += a[i] * a[i]
        sh = cuda.shared.array(RED, nt)
        tot = _block_sum(sh, acc, tid, RED)
        if tid == 0:
            partial[cuda.blockIdx.x] = tot

    @cuda.jit
    def scale_k(a, s):
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[i] = a[i] * s

    @cuda.jit
    def add_k(a, b):
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[i] = a[i] + b[i]

    @cuda.jit
    def axpy_k(a, b, s):
        # a += s * b (Adam's L2 penalty g + wd * p, in the arrays' dtype like the CPU Adam)
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[i] = a[i] + s * b[i]

    @cuda.jit
    def add_bias_k(h, t):
        # h[n, c, :, :] += t[n, c]
        C, H, W = h.shape[1], h.shape[2], h.shape[3]
        for i in range(cuda.grid(1), h.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            h[n, c, yy, xx] += t[n, c]

    @cuda.jit
    def silu_k(x, out):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            out[i] = _silu_d(x[i], HALF)

    @cuda.jit
    def silu_bwd_k(dout, x, dx):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            dx[i] = dout[i] * _silu_grad_d(x[i], ONE, HALF)

    @cuda.jit
    def concat_k(a, b, out):
        Ca, C, H, W = a.shape[1], out.shape[1], out.shape[2], out.shape[3]
        for i in range(cuda.grid(1), out.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            if c < Ca:
                out[n, c, yy, xx] = a[n, c, yy, xx]
            else:
                out[n, c, yy, xx] = b[n, c - Ca, yy, xx]

    @cuda.jit
    def split_k(d, da, db):
        Ca, C, H, W = da.shape[1], d.shape[1], d.shape[2], d.shape[3]
        for i in range(cuda.grid(1), d.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            if c < Ca:
                da[n, c, yy, xx] = d[n, c, yy, xx]
            else:
                db[n, c - Ca, yy, xx] = d[n, c, yy, xx]

    @cuda.jit
    def sum_hw_k(h, out):
        # out[n, c] = sum_hw h[n, c]
        C, H, W = h.shape[1], h.shape[2], h.shape[3]
        for i in range(cuda.grid(1), h.shape[0] * C, cuda.gridsize(1)):
            n = i // C
            c = i - n * C
            acc = ZERO
            for yy in range(H):
                for xx in range(W):
                    acc += h[n, c, yy, xx]
            out[n, c] = acc

    return SimpleNamespace(**{k: v for k, v in locals().items() if k.endswith("_k")})


# ------------------------------------------------------------------------------------------------
# host <-> device helpers and argument checks
# ------------------------------------------------------------------------------------------------

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def is_device_array(a) -> bool:
    """True for a numba device array (or the simulator's stand-in)."""
    return cuda.devicearray.is_cuda_ndarray(a)


def to_device(a, dtype=None):
    """``a`` as a C-contiguous device array (device arrays are returned as they are)."""
    if is_device_array(a):
        return a
    if not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)   # pragma: no cover (CuPy / PyTorch tensors on a real GPU)
    return cuda.to_device(np.ascontiguousarray(a, dtype=dtype))


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (copied down if it is a device array)."""
    return a.copy_to_host() if is_device_array(a) else np.asarray(a)


def _check(name: str, a, ndim: int | None = None, dtype=None):
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise TypeError(f"{name} must be a numpy ndarray or a numba.cuda device array, got {type(a).__name__}")
    if np.dtype(a.dtype) not in _FLOATS:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (that of the first array), got {a.dtype}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if is_device_array(a) and not a.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous")
    return a


def _coef(a, dtype):
    """Small per-sample coefficient arrays (host float64 in the API) as device arrays of ``dtype``."""
    if is_device_array(a):
        return a if np.dtype(a.dtype) == np.dtype(dtype) else to_device(a.copy_to_host(), dtype)
    return cuda.to_device(np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(dtype)))


def _ret(on_device: bool, *arrays):
    out = tuple(a if on_device else a.copy_to_host() for a in arrays)
    return out if len(out) > 1 else out[0]


def _flat(d):
    return d.reshape(int(np.prod(d.shape)))


# ------------------------------------------------------------------------------------------------
# device random numbers
# ------------------------------------------------------------------------------------------------

class DeviceRandom:
    """xoroshiro128p states on the device, seeded from a NumPy Generator (``rng.integers(2**63)``).

    Parameters
    ----------
    rng : numpy.random.Generator, int or None
    n_states : int, number of independent streams (one per thread of the kernels that draw)
    """

    def __init__(self, rng=None, n_states: int | None = None):
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.seed = int(gen.integers(2 ** 63))
        self.n_states = int(n_states or _MAX_BLOCKS * _TPB)
        self.states = create_xoroshiro128p_states(self.n_states, seed=self.seed)

    def launch(self, n: int) -> tuple[int, int]:
        """A launch config whose threads all have a state (grid-stride over ``n`` elements)."""
        blocks = max(1, min((n + _TPB - 1) // _TPB, self.n_states // _TPB))
        return blocks, _TPB


def randn(shape, dtype=np.float32, rng=None, *, states: DeviceRandom | None = None):
    """Standard normal draws on the device, shape ``shape`` (a device array).

    Parameters
    ----------
    shape : tuple of int
    dtype : float32 or float64
    rng : numpy.random.Generator or int seed, seeds the device generator (ignored with ``states``)
    states : DeviceRandom, reuse a generator across calls
    """
    dt = np.dtype(dtype)
    if dt not in _FLOATS:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    states = states or DeviceRandom(rng)
    out = cuda.device_array(tuple(int(s) for s in shape), dtype=dt)
    flat = _flat(out)
    blocks, tpb = states.launch(flat.shape[0])
    _k(dt).randn_k[blocks, tpb](states.states, flat)
    return out


# ------------------------------------------------------------------------------------------------
# diffusion kernels
# ------------------------------------------------------------------------------------------------

def q_sample(x0, noise, sqrt_ab, sqrt_1m_ab, out=None):
    """CUDA twin of :func:`difnumpy.kernels.reference.q_sample` (DDPM eq. 4), shapes (N, M)."""
    _check("x0", x0, 2)
    _check("noise", noise, 2, x0.dtype)
    if tuple(noise.shape) != tuple(x0.shape):
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    dev = is_device_array(x0)
    dt = np.dtype(x0.dtype)
    d_x0, d_e = to_device(x0), to_device(noise)
    d_out = cuda.device_array(tuple(x0.shape), dtype=dt) if out is None or not is_device_array(out) else out
    _k(dt).q_sample_k[_grid1d(int(np.prod(x0.shape)))](d_x0, d_e, _coef(sqrt_ab, dt), _coef(sqrt_1m_ab, dt),
                                                       d_out)
    if out is not None and not is_device_array(out):
        d_out.copy_to_host(out)
        return out
    return _ret(dev, d_out)


def sampler_update(x_t, model_output, noise, coef, clip_lo, clip_hi):
    """CUDA twin of :func:`difnumpy.kernels.reference.sampler_update` (the fused DDPM / DDIM step)."""
    _check("x_t", x_t, 2)
    _check("model_output", model_output, 2, x_t.dtype)
    _check("noise", noise, 2, x_t.dtype)
    dev = is_device_array(x_t)
    dt = np.dtype(x_t.dtype)
    d_x = to_device(x_t)
    d_xp = cuda.device_array(tuple(x_t.shape), dtype=dt)
    d_x0 = cuda.device_array(tuple(x_t.shape), dtype=dt)
    _k(dt).sampler_k[_grid1d(int(np.prod(x_t.shape)))](d_x, to_device(model_output), to_device(noise),
                                                       _coef(coef, dt), _coef(clip_lo, dt), _coef(clip_hi, dt),
                                                       d_xp, d_x0)
    return _ret(dev, d_xp, d_x0)


def sampler_update_random(x_t, model_output, states: DeviceRandom, coef, clip_lo, clip_hi):
    """:func:`sampler_update` with the noise drawn on the device from ``states`` (no noise array).

    Returns device arrays when ``x_t`` is a device array, NumPy arrays otherwise.
    """
    _check("x_t", x_t, 2)
    _check("model_output", model_output, 2, x_t.dtype)
    dev = is_device_array(x_t)
    dt = np.dtype(x_t.dtype)
    d_xp = cuda.device_array(tuple(x_t.shape), dtype=dt)
    d_x0 = cuda.device_array(tuple(x_t.shape), dtype=dt)
    blocks, tpb = states.launch(int(np.prod(x_t.shape)))
    _k(dt).sampler_rng_k[blocks, tpb](to_device(x_t), to_device(model_output), states.states, _coef(coef, dt),
                                      _coef(clip_lo, dt), _coef(clip_hi, dt), d_xp, d_x0)
    return _ret(dev, d_xp, d_x0)


# ------------------------------------------------------------------------------------------------
# convolution
# ------------------------------------------------------------------------------------------------

def _conv_args(x, w, name_x="x"):
    _check(name_x, x, 4)
    _check("w", w, 4, x.dtype)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w has {w.shape[1]} input channels but {name_x} has {x.shape[1]}")


def conv2d_forward(x, w, b, stride, padding):
    """CUDA twin of :func:`difnumpy.kernels.reference.conv2d_forward` (shared-memory tiled, NCHW).

    Kernels up to 3x3 with stride <= 2 take the tiled kernel (TS x TS output tile per block, input
    patch and weights staged in shared memory, FB filters per thread); larger ones a direct kernel.
    """
    _conv_args(x, w)
    _check("b", b, 1, x.dtype)
    stride, padding = int(stride), int(padding)
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    N, C, H, W = (int(s) for s in x.shape)
    F, _, KH, KW = (int(s) for s in w.shape)
    Ho, Wo = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"kernel {KH}x{KW} is larger than the padded input (x shape {tuple(x.shape)})")
    dev = is_device_array(x)
    dt = np.dtype(x.dtype)
    ks = _k(dt)
    d_x, d_w, d_b = to_device(x), to_device(w), to_device(b)
    out = cuda.device_array((N, F, Ho, Wo), dtype=dt)
    if KH <= _KMAX and KW <= _KMAX and stride <= _SMAX:
        tiles = ((Ho + _CONV_TS - 1) // _CONV_TS) * ((Wo + _CONV_TS - 1) // _CONV_TS)
        for n0 in range(0, N, _MAX_GRID_Z):
            grid = (tiles, (F + _CONV_FB - 1) // _CONV_FB, min(_MAX_GRID_Z, N - n0))
            ks.conv_fwd_tiled_k[grid, (_CONV_TS, _CONV_TS)](d_x, d_w, d_b, stride, padding, n0, out)
    else:
        ks.conv_fwd_direct_k[_grid1d(N * F * Ho * Wo)](d_x, d_w, d_b, stride, padding, out)
    return _ret(dev, out)


def conv2d_backward_input(dout, w, x_shape, stride, padding):
    """CUDA twin of :func:`difnumpy.kernels.reference.conv2d_backward_input` (gather form, no atomics)."""
    _check("dout", dout, 4)
    _check("w", w, 4, dout.dtype)
    N, C, H, W = (int(s) for s in x_shape)
    dev = is_device_array(dout)
    dt = np.dtype(dout.dtype)
    dx = cuda.device_array((N, C, H, W), dtype=dt)
    _k(dt).conv_bwd_input_k[_grid1d(N * C * H * W)](to_device(dout), to_device(w), int(stride), int(padding), dx)
    return _ret(dev, dx)


def conv2d_backward_weight(dout, x, w_shape, stride, padding):
    """CUDA twin of :func:`difnumpy.kernels.reference.conv2d_backward_weight`: ``(dw, db)``.

    One block per (input channel, filter) reduces over the N*Ho*Wo output pixels in shared memory.
    """
    _check("dout", dout, 4)
    _check("x", x, 4, dout.dtype)
    F, C, KH, KW = (int(s) for s in w_shape)
    dev = is_device_array(dout)
    dt = np.dtype(dout.dtype)
    ks = _k(dt)
    d_do, d_x = to_device(dout), to_device(x)
    dw = cuda.device_array((F, C, KH, KW), dtype=dt)
    db = cuda.device_array((F,), dtype=dt)
    if KH <= _KMAX and KW <= _KMAX and USE_BLOCK_REDUCTIONS:
        ks.conv_bwd_weight_k[(C, F), _RED](d_do, d_x, int(stride), int(padding), dw, db)
    else:
        ks.conv_bwd_weight_direct_k[_grid1d(F * C * KH * KW)](d_do, d_x, int(stride), int(padding), dw)
        ks.sum_nhw_direct_k[_grid1d(F)](d_do, db)
    return _ret(dev, dw, db)


# ------------------------------------------------------------------------------------------------
# group norm + SiLU
# ------------------------------------------------------------------------------------------------

def group_norm_silu_forward(x, gamma, beta, groups, eps, silu):
    """CUDA twin of :func:`difnumpy.kernels.reference.group_norm_silu_forward`: ``(out, mean, rstd)``.

    One block per (sample, group); two-pass statistics in the input's dtype (block tree reductions).
    """
    _check("x", x, 4)
    _check("gamma", gamma, 1, x.dtype)
    _check("beta", beta, 1, x.dtype)
    N, C, H, W = (int(s) for s in x.shape)
    groups = int(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"groups must divide the number of channels {C}, got groups={groups}")
    dev = is_device_array(x)
    dt = np.dtype(x.dtype)
    out = cuda.device_array((N, C, H, W), dtype=dt)
    mean = cuda.device_array((N, groups), dtype=dt)
    rstd = cuda.device_array((N, groups), dtype=dt)
    _k(dt).gn_fwd_k[N * groups, _RED](to_device(x), to_device(gamma), to_device(beta), groups, dt.type(eps),
                                      bool(silu), out, mean, rstd)
    return _ret(dev, out, mean, rstd)


def group_norm_silu_backward(dout, x, gamma, beta, mean, rstd, groups, silu):
    """CUDA twin of :func:`difnumpy.kernels.reference.group_norm_silu_backward`: ``(dx, dgamma, dbeta)``."""
    _check("dout", dout, 4)
    _check("x", x, 4, dout.dtype)
    N, C, H, W = (int(s) for s in x.shape)
    groups = int(groups)
    dev = is_device_array(dout)
    dt = np.dtype(dout.dtype)
    ks = _k(dt)
    d_do, d_x, d_g, d_b = to_device(dout), to_device(x), to_device(gamma), to_device(beta)
    d_m, d_r = to_device(mean), to_device(rstd)
    silu = bool(silu)
    part = cuda.device_array((N, C, 2), dtype=dt)
    gstat = cuda.device_array((N, groups, 2), dtype=dt)
    dx = cuda.device_array((N, C, H, W), dtype=dt)
    dgamma = cuda.device_array((C,), dtype=dt)
    dbeta = cuda.device_array((C,), dtype=dt)
    if USE_BLOCK_REDUCTIONS:
        ks.gn_bwd_part_k[N * C, _RED](d_do, d_x, d_g, d_b, d_m, d_r, groups, silu, part)
    else:
        ks.gn_bwd_part_direct_k[_grid1d(N * C)](d_do, d_x, d_g, d_b, d_m, d_r, groups, silu, part)
    ks.gn_bwd_group_k[_grid1d(N * groups)](part, d_g, groups, H * W, gstat)
    ks.gn_bwd_param_k[_grid1d(C)](part, dgamma, dbeta)
    ks.gn_bwd_dx_k[_grid1d(N * C * H * W)](d_do, d_x, d_g, d_b, d_m, d_r, groups, silu, gstat, dx)
    return _ret(dev, dx, dgamma, dbeta)


# ------------------------------------------------------------------------------------------------
# optimizer, EMA
# ------------------------------------------------------------------------------------------------

def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """CUDA twin of :func:`difnumpy.kernels.reference.adam_update` (in place on param, m, v).

    The element arithmetic runs in the arrays' dtype (the NumPy twin uses float64 and rounds once),
    so float32 results agree with the twin to float32 rounding, not bit for bit.
    """
    names = ("param", "grad", "m", "v")
    arrays = (param, grad, m, v)
    for name, a in zip(names, arrays):
        _check(name, a, None, param.dtype)
        if tuple(a.shape) != tuple(param.shape):
            raise ValueError(f"{name} must have the shape of param {tuple(param.shape)}, got {tuple(a.shape)}")
    if int(step) < 1:
        raise ValueError(f"step must be the 1-based step count (>= 1), got {step}")
    dt = np.dtype(param.dtype)
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    step_size = lr / (1.0 - beta1 ** int(step))
    bc2 = 1.0 - beta2 ** int(step)
    d = [to_device(a) for a in arrays]
    scal = [dt.type(s) for s in (lr * wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, step_size, bc2, eps)]
    n = int(np.prod(param.shape))
    if n:
        _k(dt).adam_k[_grid1d(n)](*[_flat(a) for a in d], *scal)
    for host, dev_a in ((param, d[0]), (m, d[2]), (v, d[3])):
        if not is_device_array(host):
            dev_a.copy_to_host(host)


def ema_update(ema, param, decay):
    """CUDA twin of :func:`difnumpy.kernels.reference.ema_update` (in place on ``ema``)."""
    _check("ema", ema)
    _check("param", param)
    if tuple(ema.shape) != tuple(param.shape):
        raise ValueError(f"param must have the shape of ema {tuple(ema.shape)}, got {tuple(param.shape)}")
    dt = np.dtype(ema.dtype)
    d_e, d_p = to_device(ema), to_device(param, dt)
    if np.dtype(d_p.dtype) != dt:
        d_p = to_device(to_host(param).astype(dt))
    n = int(np.prod(ema.shape))
    if n:
        _k(dt).ema_k[_grid1d(n)](_flat(d_e), _flat(d_p), dt.type(decay), dt.type(1.0 - float(decay)))
    if not is_device_array(ema):
        d_e.copy_to_host(ema)


# ------------------------------------------------------------------------------------------------
# extras: upsample, linear, MSE
# ------------------------------------------------------------------------------------------------

def concat_channels(xs):
    """CUDA twin of :func:`difnumpy.kernels.reference.concat_channels` for two arrays (the U-Net's skips)."""
    if len(xs) != 2:
        raise ValueError(f"concat_channels on cuda takes 2 arrays, got {len(xs)}")
    a, b = xs
    _check("xs[0]", a, 4)
    _check("xs[1]", b, 4, a.dtype)
    if a.shape[0] != b.shape[0] or tuple(a.shape[2:]) != tuple(b.shape[2:]):
        raise ValueError(f"xs[1] has shape {tuple(b.shape)}, incompatible with xs[0] shape {tuple(a.shape)}")
    dt = np.dtype(a.dtype)
    out = cuda.device_array((int(a.shape[0]), int(a.shape[1] + b.shape[1])) + tuple(int(v) for v in a.shape[2:]),
                            dtype=dt)
    _k(dt).concat_k[_grid1d(out.size)](to_device(a), to_device(b), out)
    return _ret(is_device_array(a), out)


def split_channels(dout, channels):
    """CUDA twin of :func:`difnumpy.kernels.reference.split_channels` for two parts."""
    if len(channels) != 2:
        raise ValueError(f"split_channels on cuda takes 2 channel counts, got {len(channels)}")
    _check("dout", dout, 4)
    ca, cb = (int(c) for c in channels)
    if ca + cb != int(dout.shape[1]):
        raise ValueError(f"channels {tuple(channels)} do not add up to dout's {int(dout.shape[1])}")
    dt = np.dtype(dout.dtype)
    rest = tuple(int(v) for v in dout.shape[2:])
    da = cuda.device_array((int(dout.shape[0]), ca) + rest, dtype=dt)
    db = cuda.device_array((int(dout.shape[0]), cb) + rest, dtype=dt)
    _k(dt).split_k[_grid1d(dout.size)](to_device(dout), da, db)
    return _ret(is_device_array(dout), da, db)


def upsample_nearest2x_forward(x):
    """CUDA twin of :func:`difnumpy.kernels.reference.upsample_nearest2x_forward`."""
    _check("x", x, 4)
    N, C, H, W = (int(s) for s in x.shape)
    dt = np.dtype(x.dtype)
    out = cuda.device_array((N, C, 2 * H, 2 * W), dtype=dt)
    _k(dt).up2_fwd_k[_grid1d(out.size)](to_device(x), out)
    return _ret(is_device_array(x), out)


def upsample_nearest2x_backward(dout):
    """CUDA twin of :func:`difnumpy.kernels.reference.upsample_nearest2x_backward`."""
    _check("dout", dout, 4)
    N, C, H2, W2 = (int(s) for s in dout.shape)
    if H2 % 2 or W2 % 2:
        raise ValueError(f"dout must have even H and W, got shape {tuple(dout.shape)}")
    dt = np.dtype(dout.dtype)
    dx = cuda.device_array((N, C, H2 // 2, W2 // 2), dtype=dt)
    _k(dt).up2_bwd_k[_grid1d(dx.size)](to_device(dout), dx)
    return _ret(is_device_array(dout), dx)


def linear_forward(x, w, b):
    """CUDA twin of :func:`difnumpy.kernels.reference.linear_forward`: ``x @ w.T + b``."""
    _check("x", x, 2)
    _check("w", w, 2, x.dtype)
    _check("b", b, 1, x.dtype)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w has {w.shape[1]} input features but x has {x.shape[1]}")
    dt = np.dtype(x.dtype)
    out = cuda.device_array((int(x.shape[0]), int(w.shape[0])), dtype=dt)
    _k(dt).linear_fwd_k[_grid1d(out.size)](to_device(x), to_device(w), to_device(b), out)
    return _ret(is_device_array(x), out)


def linear_backward(dout, x, w):
    """CUDA twin of :func:`difnumpy.kernels.reference.linear_backward`: ``(dx, dw, db)``."""
    _check("dout", dout, 2)
    _check("x", x, 2, dout.dtype)
    _check("w", w, 2, dout.dtype)
    dt = np.dtype(dout.dtype)
    ks = _k(dt)
    d_do, d_x, d_w = to_device(dout), to_device(x), to_device(w)
    N, M = (int(s) for s in dout.shape)
    D = int(x.shape[1])
    dx = cuda.device_array((N, D), dtype=dt)
    dw = cuda.device_array((M, D), dtype=dt)
    db = cuda.device_array((M,), dtype=dt)
    ks.matmul_nn_k[_grid1d(N * D)](d_do, d_w, dx)
    ks.matmul_tn_k[_grid1d(M * D)](d_do, d_x, dw)
    ks.colsum_k[_grid1d(M)](d_do, db)
    return _ret(is_device_array(dout), dx, dw, db)


def mse_loss(pred, target):
    """CUDA twin of :func:`difnumpy.kernels.reference.mse_loss`: ``(loss: float, dpred)``.

    Per-thread partial sums in the input dtype, one partial per block summed in float64 on the host
    (the only copy down: one small array).
    """
    _check("pred", pred)
    _check("target", target)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    n = int(np.prod(pred.shape))
    if n == 0:
        raise ValueError("pred must not be empty")
    dt = np.dtype(pred.dtype)
    d_p = to_device(pred)
    d_t = to_device(target) if np.dtype(target.dtype) == dt else to_device(to_host(target).astype(dt))
    dpred = cuda.device_array(tuple(pred.shape), dtype=dt)
    blocks = max(1, min((n + _RED - 1) // _RED, _MAX_BLOCKS))
    partial = cuda.device_array((blocks,), dtype=dt)
    _k(dt).mse_k[blocks, _RED](_flat(d_p), _flat(d_t), dt.type(2.0 / n), _flat(dpred), partial)
    loss = float(partial.copy_to_host().astype(np.float64).sum()) / n
    return loss, _ret(is_device_array(pred), dpred)


def _sumsq(a) -> float:
    """``sum(a**2)`` of a device array (float64 on the host from per-block partials)."""
    dt = np.dtype(a.dtype)
    n = int(a.size)
    blocks = max(1, min((n + _RED - 1) // _RED, _MAX_BLOCKS))
    partial = cuda.device_array((blocks,), dtype=dt)
    _k(dt).sumsq_k[blocks, _RED](_flat(a), partial)
    return float(partial.copy_to_host().astype(np.float64).sum())


# ------------------------------------------------------------------------------------------------
# device-resident U-Net (difnumpy.nn.unet.UNet's graph, every activation on the device)
# ------------------------------------------------------------------------------------------------

def _silu(x):
    dt = np.dtype(x.dtype)
    out = cuda.device_array(tuple(x.shape), dtype=dt)
    _k(dt).silu_k[_grid1d(x.size)](_flat(x), _flat(out))
    return out


def _silu_bwd(dout, x):
    dt = np.dtype(x.dtype)
    dx = cuda.device_array(tuple(x.shape), dtype=dt)
    _k(dt).silu_bwd_k[_grid1d(x.size)](_flat(dout), _flat(x), _flat(dx))
    return dx


def _iadd(a, b):
    _k(a.dtype).add_k[_grid1d(a.size)](_flat(a), _flat(b))
    return a


class DeviceUNet:
    """A :class:`difnumpy.nn.unet.UNet` run on the GPU with parameters and activations on the device.

    Parameters
    ----------
    model : UNet
        Its parameters are copied up once (``upload``); its architecture (plan) is reused.

    Notes
    -----
    The graph is the U-Net's (module docstring of :mod:`difnumpy.nn.unet`), op for op: the same kernels
    as ``UNet(backend="cuda")`` but no host round trip between them. ``__call__(x, t)`` accepts a host
    or device ``x`` and returns a device array; ``forward``/``backward`` keep device caches and return
    device gradients; :meth:`download` copies the (updated) parameters back into ``model.params``.
    """

    def __init__(self, model):
        for attr in ("params", "_down", "_mid", "_up", "groups", "base_channels", "dtype"):
            if not hasattr(model, attr):
                raise TypeError(f"model must be a difnumpy UNet (missing .{attr}), got {type(model).__name__}")
        self.model = model
        self.dtype = np.dtype(model.dtype)
        self.params: dict = {}
        self.upload()

    def upload(self) -> None:
        """Copy ``model.params`` to the device.

        Existing device arrays are overwritten in place (their identity is kept, so references to them,
        e.g. a :class:`DeviceTrainStep`'s, stay valid); missing ones are allocated.
        """
        for k, v in self.model.params.items():
            host = np.ascontiguousarray(v, dtype=self.dtype)
            d = self.params.get(k)
            if d is not None and tuple(d.shape) == host.shape:
                d.copy_to_device(host)
            else:
                self.params[k] = cuda.to_device(host)

    def download(self) -> None:
        """Copy the device parameters into ``model.params`` (in place)."""
        for k, d in self.params.items():
            d.copy_to_host(self.model.params[k])

    def _temb(self, t, n):
        from difnumpy.nn.layers import timestep_embedding
        t = np.asarray(t)
        if t.ndim == 0:
            t = np.full(n, t)
        if t.shape != (n,):
            raise ValueError(f"t must be an int or have shape (N,) = ({n},), got shape {t.shape}")
        return cuda.to_device(timestep_embedding(t, self.model.base_channels, dtype=self.dtype))

    def _res(self, key, has_skip, x, temb_act, keep):
        P, g, eps = self.params, self.model.groups, _gn_eps()
        h, m1, r1 = group_norm_silu_forward(x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], g, eps, True)
        a1 = h
        h = conv2d_forward(h, P[key + ".conv1.w"], P[key + ".conv1.b"], 1, 1)
        tp = linear_forward(temb_act, P[key + ".temb.w"], P[key + ".temb.b"])
        _k(self.dtype).add_bias_k[_grid1d(h.size)](h, tp)
        h1 = h
        h, m2, r2 = group_norm_silu_forward(h, P[key + ".norm2.gamma"], P[key + ".norm2.beta"], g, eps, True)
        a2 = h
        h = conv2d_forward(h, P[key + ".conv2.w"], P[key + ".conv2.b"], 1, 1)
        if has_skip:
            _iadd(h, conv2d_forward(x, P[key + ".skip.w"], P[key + ".skip.b"], 1, 0))
        else:
            _iadd(h, x)
        return h, ((x, m1, r1, a1, h1, m2, r2, a2, has_skip) if keep else None)

    def forward(self, x, t, keep: bool = True):
        """Forward pass on the device: ``(out, cache)`` (``cache`` None unless ``keep``)."""
        _check("x", x, 4)
        n = int(x.shape[0])
        x = to_device(x, self.dtype) if not is_device_array(x) else x
        if np.dtype(x.dtype) != self.dtype:
            raise TypeError(f"x must have the model's dtype {self.dtype}, got {x.dtype}")
        P, M = self.params, self.model
        e0 = self._temb(t, n)
        e1 = linear_forward(e0, P["time.lin1.w"], P["time.lin1.b"])
        s1 = _silu(e1)
        e2 = linear_forward(s1, P["time.lin2.w"], P["time.lin2.b"])
        temb_act = _silu(e2)
        h = conv2d_forward(x, P["stem.w"], P["stem.b"], 1, 1)
        skips, down_c, up_c = [], [], []
        hin = x
        for op in M._down:
            if op[0] == "res":
                h, c = self._res(op[1], op[2], h, temb_act, keep)
                skips.append(h)
            else:
                c = h
                h = conv2d_forward(h, P[op[1] + ".w"], P[op[1] + ".b"], 2, 1)
            down_c.append(c)
        h, mid_c = self._res(M._mid[0], M._mid[1], h, temb_act, keep)
        for op in M._up:
            if op[0] == "res":
                s = skips.pop()
                cat = concat_channels([h, s])
                ca = int(h.shape[1])
                h, c = self._res(op[1], op[2], cat, temb_act, keep)
                up_c.append((ca, c))
            else:
                u = upsample_nearest2x_forward(h)
                h = conv2d_forward(u, P[op[1] + ".w"], P[op[1] + ".b"], 1, 1)
                up_c.append((None, u))
        hn, mo, ro = group_norm_silu_forward(h, P["out.norm.gamma"], P["out.norm.beta"], M.groups, _gn_eps(), True)
        out = conv2d_forward(hn, P["out.conv.w"], P["out.conv.b"], 1, 1)
        if not keep:
            return out, None
        cache = {"x": hin, "time": (e0, e1, s1, e2, temb_act), "down": down_c, "mid": mid_c, "up": up_c,
                 "out": (h, mo, ro, hn)}
        return out, cache

    def __call__(self, x, t):
        """Inference forward pass: a device array of the shape of ``x``."""
        return self.forward(x, t, keep=False)[0]

    def _res_bwd(self, key, dout, c, g):
        P, G = self.params, self.model.groups
        x, m1, r1, a1, h1, m2, r2, a2, has_skip = c
        if has_skip:
            dxs, g[key + ".skip.w"], g[key + ".skip.b"] = _conv_bwd(dout, x, P[key + ".skip.w"], 1, 0)
        else:
            dxs = dout
        dh, g[key + ".conv2.w"], g[key + ".conv2.b"] = _conv_bwd(dout, a2, P[key + ".conv2.w"], 1, 1)
        dh, g[key + ".norm2.gamma"], g[key + ".norm2.beta"] = group_norm_silu_backward(
            dh, h1, P[key + ".norm2.gamma"], P[key + ".norm2.beta"], m2, r2, G, True)
        dtp = cuda.device_array(tuple(dh.shape[:2]), dtype=self.dtype)
        _k(self.dtype).sum_hw_k[_grid1d(dtp.size)](dh, dtp)
        dta, g[key + ".temb.w"], g[key + ".temb.b"] = linear_backward(dtp, self._temb_act, P[key + ".temb.w"])
        dh, g[key + ".conv1.w"], g[key + ".conv1.b"] = _conv_bwd(dh, a1, P[key + ".conv1.w"], 1, 1)
        dx, g[key + ".norm1.gamma"], g[key + ".norm1.beta"] = group_norm_silu_backward(
            dh, x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], m1, r1, G, True)
        _iadd(dx, dxs)
        return dx, dta

    def backward(self, dout, cache) -> dict:
        """Backward pass on the device: a dict of device gradients with the keys of ``model.params``."""
        P, M = self.params, self.model
        dout = to_device(dout, self.dtype)
        g: dict = {}
        h, mo, ro, hn = cache["out"]
        e0, e1, s1, e2, temb_act = cache["time"]
        self._temb_act = temb_act
        dh, g["out.conv.w"], g["out.conv.b"] = _conv_bwd(dout, hn, P["out.conv.w"], 1, 1)
        dh, g["out.norm.gamma"], g["out.norm.beta"] = group_norm_silu_backward(
            dh, h, P["out.norm.gamma"], P["out.norm.beta"], mo, ro, M.groups, True)
        dtemb = None
        dskips = [None] * M._num_skips
        for op, c in zip(reversed(M._up), reversed(cache["up"])):
            if op[0] == "res":
                ca, c_res = c
                dh, dt_ = self._res_bwd(op[1], dh, c_res, g)
                dtemb = dt_ if dtemb is None else _iadd(dtemb, dt_)
                dh, dskips[op[3]] = split_channels(dh, (ca, int(dh.shape[1]) - ca))
            else:
                u = c[1]
                du, g[op[1] + ".w"], g[op[1] + ".b"] = _conv_bwd(dh, u, P[op[1] + ".w"], 1, 1)
                dh = upsample_nearest2x_backward(du)
        dh, dt_ = self._res_bwd(M._mid[0], dh, cache["mid"], g)
        dtemb = dt_ if dtemb is None else _iadd(dtemb, dt_)
        for op, c in zip(reversed(M._down), reversed(cache["down"])):
            if op[0] == "res":
                _iadd(dh, dskips[op[3]])
                dh, dt_ = self._res_bwd(op[1], dh, c, g)
                _iadd(dtemb, dt_)
            else:
                dh, g[op[1] + ".w"], g[op[1] + ".b"] = _conv_bwd(dh, c, P[op[1] + ".w"], 2, 1)
        x = cache["x"]
        g["stem.w"], g["stem.b"] = conv2d_backward_weight(dh, x, tuple(P["stem.w"].shape), 1, 1)
        de = _silu_bwd(dtemb, e2)
        de, g["time.lin2.w"], g["time.lin2.b"] = linear_backward(de, s1, P["time.lin2.w"])
        de = _silu_bwd(de, e1)
        _, g["time.lin1.w"], g["time.lin1.b"] = linear_backward(de, e0, P["time.lin1.w"])
        self._temb_act = None
        return {k: g[k] for k in P}


def _conv_bwd(dout, x, w, stride, padding):
    dx = conv2d_backward_input(dout, w, tuple(x.shape), stride, padding)
    dw, db = conv2d_backward_weight(dout, x, tuple(w.shape), stride, padding)
    return dx, dw, db


def _gn_eps() -> float:
    from difnumpy.nn.unet import GN_EPS
    return GN_EPS


# ------------------------------------------------------------------------------------------------
# device-resident sampling and training step
# ------------------------------------------------------------------------------------------------

def _ddim_coefficients(schedule, t, prev_t, n, eta, prediction_type, clip_sample, clip_range,
                       final_alpha_cumprod):
    """(coef (N, 5), lo, hi, needs_noise) of one DDIM step, from :func:`difnumpy.samplers.ddim_coefficients`."""
    from difnumpy.samplers import ddim_coefficients
    A, B, C, D, sigma = ddim_coefficients(schedule, np.full(n, t, dtype=np.int64), np.full(n, prev_t, dtype=np.int64),
                                          eta, prediction_type, final_alpha_cumprod)
    lim = float(clip_range) if clip_sample else np.inf
    return np.stack([A, B, C, D, sigma], axis=1), np.full(n, -lim), np.full(n, lim), bool(np.any(sigma > 0))


def _ddpm_coefficients(schedule, t, prev_t, n, prediction_type, clip_sample, clip_range, variance_type):
    """(coef, lo, hi, needs_noise) of one DDPM step, from :func:`difnumpy.samplers.ddpm_coefficients`."""
    from difnumpy.samplers import ddpm_coefficients
    A, B, c1, c2, post_var, beta = ddpm_coefficients(schedule, np.full(n, t, dtype=np.int64),
                                                     np.full(n, prev_t, dtype=np.int64), prediction_type)
    E = np.zeros(n) if prev_t < 0 else np.sqrt(post_var if variance_type == "fixed_small" else beta)
    lim = float(clip_range) if clip_sample else np.inf
    return np.stack([A, B, c1, c2, E], axis=1), np.full(n, -lim), np.full(n, lim), prev_t >= 0


def sample_device(model, schedule, shape, *, method: str = "ddim", num_steps: int | None = None,
                  eta: float = 0.0, spacing: str = "leading", x_T=None, rng=None, dtype=np.float32,
                  prediction_type: str = "epsilon", clip_sample: bool = True, clip_range: float = 1.0,
                  final_alpha_cumprod: float = 1.0, variance_type: str = "fixed_small",
                  return_device: bool = False):
    """DDPM / DDIM sampling with ``x_t`` on the device from the first step to the last.

    Parameters
    ----------
    model : UNet or DeviceUNet
        The noise predictor; a UNet is wrapped in a :class:`DeviceUNet` (parameters copied up once).
    schedule : Schedule
    shape : tuple (N, C, H, W)
    method : {"ddpm", "ddim"}
    num_steps, eta, spacing : as in :func:`difnumpy.samplers.sample`
    x_T : ndarray or device array, optional
        Starting noise; otherwise drawn on the host from ``rng`` exactly as
        :func:`difnumpy.samplers.sample` does (``rng.standard_normal(shape, dtype)``), then copied up once,
        so deterministic DDIM (eta = 0) gives the CPU path's result for the same ``rng``.
    rng : numpy.random.Generator, int or None
        Also seeds the device generator of the step noise (DDPM, or DDIM with eta > 0); that noise differs
        from the CPU path's NumPy draws (same distribution).
    prediction_type, clip_sample, clip_range, final_alpha_cumprod, variance_type :
        As in :func:`difnumpy.samplers.ddim_step` / :func:`~difnumpy.samplers.ddpm_step`
        (variance_type "fixed_small" or "fixed_large"; no dynamic thresholding on the device).
    return_device : bool
        Return the device array instead of copying the samples down.

    Returns
    -------
    x0 : ndarray (or device array), shape ``shape``
    """
    from difnumpy.samplers import METHODS, PREDICTION_TYPES, inference_timesteps
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large' on the device, got {variance_type!r}")
    if method == "ddpm" and eta != 0.0:
        raise ValueError("eta applies to method='ddim' only")
    dmodel = model if isinstance(model, DeviceUNet) else DeviceUNet(model)
    dt = dmodel.dtype
    T = schedule.num_timesteps
    if num_steps is None:
        num_steps = T if method == "ddpm" else min(50, T)
    timesteps = inference_timesteps(T, num_steps, spacing)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if x_T is None:
        x_host = gen.standard_normal(tuple(int(s) for s in shape), dtype=dt)
    else:
        _check("x_T", x_T)
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T.shape {tuple(x_T.shape)}")
        x_host = x_T
    x = to_device(x_host, dt)
    if np.dtype(x.dtype) != dt:
        x = to_device(to_host(x).astype(dt))
    n = int(x.shape[0])
    m = int(np.prod(x.shape[1:]))
    states = None
    for i in range(len(timesteps)):
        t = int(timesteps[i])
        prev_t = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        out = dmodel(x, np.full(n, t, dtype=np.int64))
        if method == "ddim":
            coef, lo, hi, noisy = _ddim_coefficients(schedule, t, prev_t, n, float(eta), prediction_type,
                                                     clip_sample, clip_range, final_alpha_cumprod)
        else:
            coef, lo, hi, noisy = _ddpm_coefficients(schedule, t, prev_t, n, prediction_type, clip_sample,
                                                     clip_range, variance_type)
        x2, o2 = x.reshape(n, m), out.reshape(n, m)
        if noisy:
            if states is None:
                states = DeviceRandom(gen)
            xp, _ = sampler_update_random(x2, o2, states, coef, lo, hi)
        else:
            xp, _ = sampler_update(x2, o2, x2, coef, lo, hi)
        x = xp.reshape(*x.shape)
    return x if return_device else x.copy_to_host()


_SAME = object()  # DeviceTrainStep.step: "use the value given to the constructor"


class DeviceTrainStep:
    """The DDPM training step (Ho et al. 2020, Algorithm 1) with parameters, Adam and EMA on the device.

    The device-resident twin of :meth:`difnumpy.trainer.Trainer.step` (which dispatches here for
    ``backend="cuda"``): the same rng draws, loss target, clipping, Adam / AdamW and EMA update, with
    the host ``optimizer`` and ``ema`` objects as *mirrors*. Their scalars (``lr``, ``step_count``,
    ``betas``, ``eps``, ``weight_decay``, ``decay``, ``num_updates``) are read and written on the host at
    every step (no transfer); their arrays (``m``, ``v``, the EMA parameters) and ``model.params`` hold
    the values of the last :meth:`download` (or :meth:`upload`).

    Parameters
    ----------
    model : difnumpy.nn.unet.UNet
        Its parameters are copied up once (a :class:`DeviceUNet`); :meth:`download` copies them back.
    schedule : Schedule
    lr, betas, eps, weight_decay, decoupled : Adam / AdamW hyperparameters (``decoupled`` selects AdamW);
        used to build the host ``optimizer`` mirror when none is given, ignored otherwise.
    ema_decay : float, decay of the EMA mirror built when ``ema`` is None (ignored otherwise).
    grad_clip : float > 0 or None
        Global-norm clipping bound (Pascanu et al. 2013), as :func:`difnumpy.nn.optim.clip_grad_norm`.
    rng : numpy.random.Generator or int
        Draws ``t`` then ``eps`` on the host exactly as :func:`difnumpy.trainer.loss_and_grads`, so a
        step matches the CPU path for the same rng.
    prediction_type : {"epsilon", "sample", "v_prediction"}, default "epsilon"
        Regression target ``eps``, ``x0`` or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``.
    optimizer : difnumpy.nn.optim.Adam or AdamW, optional
        Host mirror of the optimizer (``params`` with the keys of ``model.params``); by default a new one.
    ema : difnumpy.nn.optim.EMA, optional
        Host mirror of the EMA (its warm-up and counter are used); by default ``EMA(model.params, ema_decay)``.
    error : type, default FloatingPointError
        Exception raised for a non-finite loss or gradient norm (the Trainer passes DivergenceError).

    Attributes
    ----------
    net : DeviceUNet (``net.params``: the device parameters)
    m, v, ema_params : dict[str, device array], shapes of ``model.params``, the model's dtype
        Adam's moments and the EMA parameters on the device.
    host_current : bool
        True while the host mirrors hold the device values (False after a step until :meth:`download`).
    last_loss, last_grad_norm : float or None

    Notes
    -----
    ``step(x0)`` copies up the batch, ``eps``, the per-sample coefficients of ``t`` and the timestep
    embedding, and copies down two small arrays of per-block partial sums (the loss and the squared
    gradient norm, summed in float64 on the host). Parameters, gradients, moments and EMA never cross.
    Every device array keeps its identity for the object's lifetime (:meth:`upload` copies in place).
    """

    def __init__(self, model, schedule, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False, ema_decay=0.999, grad_clip=1.0, rng=None, *, prediction_type: str = "epsilon",
                 optimizer=None, ema=None, error: type = FloatingPointError):
        from difnumpy.nn.optim import EMA, Adam, AdamW
        from difnumpy.samplers import PREDICTION_TYPES
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        try:
            self.net = DeviceUNet(model)
        except TypeError as e:
            raise TypeError(f"the device training step (backend='cuda') trains a difnumpy UNet; {e}. Train other "
                            f"models with backend='cpu' (their own kernels may still run on the GPU)") from None
        self.schedule = schedule
        self.grad_clip, self.prediction_type, self.error = grad_clip, prediction_type, error
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if optimizer is None:
            opt_cls = AdamW if decoupled else Adam
            optimizer = opt_cls(model.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                backend="numpy")
        if ema is None:
            ema = EMA(model.params, ema_decay)
        for name, mirror in (("optimizer", optimizer), ("ema", ema)):
            if set(mirror.params) != set(model.params):
                raise ValueError(f"{name}.params must have the keys of model.params")
        self.optimizer, self.ema = optimizer, ema
        dt = self.net.dtype
        # moments and EMA start from the mirrors (zeros / a copy of the parameters for a new trainer,
        # restored values after load_checkpoint, which calls upload again)
        self.m = {k: cuda.to_device(np.ascontiguousarray(optimizer.m[k], dtype=dt)) for k in self.net.params}
        self.v = {k: cuda.to_device(np.ascontiguousarray(optimizer.v[k], dtype=dt)) for k in self.net.params}
        self.ema_params = {k: cuda.to_device(np.ascontiguousarray(ema.params[k], dtype=dt)) for k in self.net.params}
        self.host_current = True
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self._partial = None  # per-block partial sums of the squared gradient norm (allocated once)

    @property
    def step_count(self) -> int:
        """Number of updates applied (the optimizer mirror's ``step_count``)."""
        return self.optimizer.step_count

    def _target(self, d_x0, d_noise, sab, s1m, prediction_type):
        """The regression target on the device, shape (N, M) (Ho et al. eq. 14; Salimans & Ho Sec. 4)."""
        if prediction_type == "epsilon":
            return d_noise
        if prediction_type == "sample":
            return d_x0
        if prediction_type == "v_prediction":
            # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0: q_sample's kernel a x0 + b eps, (a, b) = (-s1m, sab)
            return q_sample(d_x0, d_noise, -s1m, sab)
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")

    def _global_norm(self, grads: dict) -> float:
        """``sqrt(sum_k ||g_k||^2)``: per-block partials of all arrays into one buffer, one copy down."""
        dt = self.net.dtype
        blocks = [max(1, min((int(g.size) + _RED - 1) // _RED, _MAX_BLOCKS)) for g in grads.values()]
        total = sum(blocks)
        if self._partial is None or self._partial.shape[0] != total:
            self._partial = cuda.device_array((total,), dtype=dt)
        off = 0
        for g, b in zip(grads.values(), blocks):
            _k(dt).sumsq_k[b, _RED](_flat(g), self._partial[off:off + b])
            off += b
        return math.sqrt(float(self._partial.copy_to_host().astype(np.float64).sum()))

    def step(self, x0, lr=None, *, rng=None, grad_clip=_SAME, prediction_type=None) -> float:
        """One training step on a clean batch; returns the loss (before the update).

        Parameters
        ----------
        x0 : ndarray, shape (N, C, H, W), float
            Clean batch, cast to the model's dtype and copied up.
        lr : float, optional
            Learning rate of this update (the Trainer's warmup value); by default ``optimizer.lr``.
        rng, grad_clip, prediction_type : optional
            This step's values instead of the constructor's (the Trainer passes its current ones).

        Returns
        -------
        loss : float
            ``mean((model(x_t, t) - target)**2)``.

        Raises
        ------
        error (FloatingPointError or the constructor's ``error``)
            If the loss or the gradient norm is not finite; nothing is updated then (the rng has advanced).

        Notes
        -----
        Order as :meth:`difnumpy.trainer.Trainer.step`: draw ``t`` then ``eps``; ``x_t`` (DDPM eq. 4);
        forward, MSE, backward; global norm, clip ``g *= c / (norm + 1e-6)`` if ``norm > c``; Adam / AdamW
        (Kingma & Ba Alg. 1; L2 penalty ``g + wd p`` for Adam, decoupled decay for AdamW); EMA with the
        mirror's warm-up decay. Parameters, moments and EMA are updated on the device only.
        """
        opt, ema = self.optimizer, self.ema
        rng = self.rng if rng is None else rng
        grad_clip = self.grad_clip if grad_clip is _SAME else grad_clip
        prediction_type = prediction_type or self.prediction_type
        lr = opt.lr if lr is None else float(lr)
        dt = self.net.dtype
        ks = _k(dt)
        step = opt.step_count + 1
        x0 = np.ascontiguousarray(to_host(x0), dtype=dt)
        n = x0.shape[0]
        t = rng.integers(0, self.schedule.num_timesteps, size=n, dtype=np.int64)
        noise = rng.standard_normal(x0.shape, dtype=dt)
        d_x0 = cuda.to_device(x0.reshape(n, -1))
        d_noise = cuda.to_device(noise.reshape(n, -1))
        sab, s1m = self.schedule.sqrt_alphas_cumprod[t], self.schedule.sqrt_one_minus_alphas_cumprod[t]
        x_t = q_sample(d_x0, d_noise, sab, s1m)
        target = self._target(d_x0, d_noise, sab, s1m, prediction_type)
        out, cache = self.net.forward(x_t.reshape(*x0.shape), t)
        loss, dout = mse_loss(out, target.reshape(*x0.shape))
        if not math.isfinite(loss):
            raise self.error(f"non-finite loss ({loss}) at step {step}; the update was not applied")
        grads = self.net.backward(dout, cache)
        norm = self._global_norm(grads)
        if not math.isfinite(norm):
            raise self.error(f"non-finite gradient norm ({norm}) at step {step}; the update was not applied")
        if grad_clip is not None and norm > grad_clip:
            s = dt.type(grad_clip / (norm + 1e-6))
            for g in grads.values():
                ks.scale_k[_grid1d(g.size)](_flat(g), s)
        b1, b2 = opt.betas
        wd = float(opt.weight_decay)
        decoupled = bool(getattr(opt, "decoupled", False))
        ema_decay = ema.current_decay()  # the host EMA's warm-up, same update count
        for k, p in self.net.params.items():
            g = grads[k]
            if wd != 0.0 and not decoupled:
                ks.axpy_k[_grid1d(g.size)](_flat(g), _flat(p), dt.type(wd))  # L2 penalty, as Adam.step
            adam_update(p, g, self.m[k], self.v[k], lr, b1, b2, opt.eps, wd if decoupled else 0.0, step)
            ema_update(self.ema_params[k], p, ema_decay)
        # the mirrors' scalars follow at once (host values, no transfer); their arrays are now stale
        opt.lr, opt.step_count = lr, step
        ema.num_updates += 1
        self.host_current = False
        self.last_loss, self.last_grad_norm = loss, norm
        return loss

    def download(self, ema_params: dict | None = None) -> None:
        """Copy the device state into the host mirrors: ``model.params``, ``optimizer.m``/``v``, ``ema.params``.

        A no-op when :attr:`host_current` (nothing changed on the device since the last copy), except
        that ``ema_params`` (a dict of host arrays), if given, always receives the EMA parameters.
        """
        if not self.host_current:
            self.net.download()
            for k in self.net.params:
                self.m[k].copy_to_host(self.optimizer.m[k])
                self.v[k].copy_to_host(self.optimizer.v[k])
                self.ema_params[k].copy_to_host(self.ema.params[k])
            self.host_current = True
        if ema_params is not None:
            for k, d in self.ema_params.items():
                d.copy_to_host(ema_params[k])

    def upload(self, params: bool = True, ema: bool = True, optimizer: bool = True) -> None:
        """Copy host mirrors to the device, in place: ``model.params``, ``ema.params``, ``optimizer.m``/``v``.

        Used after the host values were changed (a checkpoint restored, parameters replaced). Uploading
        all three makes :attr:`host_current` True; uploading mirrors that are stale (``host_current``
        False) would discard device updates, which is the caller's decision.
        """
        dt = self.net.dtype
        if params:
            self.net.upload()
        for flag, dev, host in ((ema, self.ema_params, self.ema.params), (optimizer, self.m, self.optimizer.m),
                                (optimizer, self.v, self.optimizer.v)):
            if flag:
                for k, d in dev.items():
                    d.copy_to_device(np.ascontiguousarray(host[k], dtype=dt))
        if params and ema and optimizer:
            self.host_current = True
