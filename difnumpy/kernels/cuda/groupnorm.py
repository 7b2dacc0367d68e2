"""GroupNorm with per-channel affine, optionally fused with SiLU: forward and backward.

Twins: :func:`difnumpy.kernels.reference.group_norm_silu_forward` and ``group_norm_silu_backward``
(Wu & He 2018, eq. 1-3). Statistics are computed in the input's dtype with block tree reductions
(the twins accumulate in float64: float32 agrees to float32 rounding).
"""
from __future__ import annotations

import math

import numpy as np

from difnumpy.kernels.cuda import _runtime
from difnumpy.kernels.cuda._device import block_sum_d, silu_d, silu_grad_d
from difnumpy.kernels.cuda._runtime import (RED, _check, _check_int, _ret, asarray, cuda, grid1d, is_array,
                                            kernel, numba)

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@kernel(lambda t: (t.a4, t.a1, t.a1, t.i, t.s, t.b, t.a4, t.a2, t.a2))
def build_gn_fwd(dt):
    """One block per (n, g): two-pass statistics (the mean, then the centred second moment)."""
    nt = numba.from_dtype(dt)
    CAST, ZERO, ONE, HALF = dt.type, dt.type(0.0), dt.type(1.0), dt.type(0.5)

    def gn_fwd_k(x, gamma, beta, groups, eps, silu, out, mean, rstd):
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
        mu = block_sum_d(sh, acc, tid, RED) / CAST(M)
        acc = ZERO
        for i in range(tid, M, RED):
            c = c0 + i // HW
            r = i % HW
            d = x[n, c, r // W, r % W] - mu
            acc += d * d
        var = block_sum_d(sh, acc, tid, RED) / CAST(M)
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
                y = silu_d(y, HALF)
            out[n, c, hh, ww] = y
    return gn_fwd_k


_BWD_ARGS = lambda t: (t.a4, t.a4, t.a1, t.a1, t.a2, t.a2, t.i, t.b, t.a3)  # noqa: E731


@kernel(_BWD_ARGS)
def build_gn_bwd_part(dt):
    """One block per (n, c): ``part[n, c] = (sum_hw dy * xhat, sum_hw dy)``."""
    nt = numba.from_dtype(dt)
    ZERO, ONE, HALF = dt.type(0.0), dt.type(1.0), dt.type(0.5)

    def gn_bwd_part_k(dout, x, gamma, beta, mean, rstd, groups, silu, part):
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
                dy = dy * silu_grad_d(xh * ga + be, ONE, HALF)
            s1 += dy * xh
            s2 += dy
        sh = cuda.shared.array(RED, nt)
        t1 = block_sum_d(sh, s1, tid, RED)
        t2 = block_sum_d(sh, s2, tid, RED)
        if tid == 0:
            part[n, c, 0] = t1
            part[n, c, 1] = t2
    return gn_bwd_part_k


@kernel(_BWD_ARGS)
def build_gn_bwd_part_direct(dt):
    """One thread per (n, c), serial sums over H*W: the same ``part`` as :func:`build_gn_bwd_part`."""
    ZERO, ONE, HALF = dt.type(0.0), dt.type(1.0), dt.type(0.5)

    def gn_bwd_part_direct_k(dout, x, gamma, beta, mean, rstd, groups, silu, part):
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
                        dy = dy * silu_grad_d(xh * gamma[c] + beta[c], ONE, HALF)
                    s1 += dy * xh
                    s2 += dy
            part[n, c, 0] = s1
            part[n, c, 1] = s2
    return gn_bwd_part_direct_k


@kernel(lambda t: (t.a3, t.a1, t.i, t.i, t.a3))
def build_gn_bwd_group(dt):
    """``gstat[n, g] = (mean_group(dy * gamma), mean_group(dy * gamma * xhat))``."""
    CAST, ZERO = dt.type, dt.type(0.0)

    def gn_bwd_group_k(part, gamma, groups, HW, gstat):
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
    return gn_bwd_group_k


@kernel(lambda t: (t.a3, t.a1, t.a1))
def build_gn_bwd_param(dt):
    """``dgamma[c] = sum_n part[n, c, 0]``, ``dbeta[c] = sum_n part[n, c, 1]``."""
    ZERO = dt.type(0.0)

    def gn_bwd_param_k(part, dgamma, dbeta):
        for c in range(cuda.grid(1), part.shape[1], cuda.gridsize(1)):
            a = ZERO
            bb = ZERO
            for n in range(part.shape[0]):
                a += part[n, c, 0]
                bb += part[n, c, 1]
            dgamma[c] = a
            dbeta[c] = bb
    return gn_bwd_param_k


@kernel(lambda t: (t.a4, t.a4, t.a1, t.a1, t.a2, t.a2, t.i, t.b, t.a3, t.a4))
def build_gn_bwd_dx(dt):
    """``dx = rstd (dy gamma - mean(g) - xhat mean(g xhat))``, one thread per element."""
    ONE, HALF = dt.type(1.0), dt.type(0.5)

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
                dy = dy * silu_grad_d(xh * gamma[c] + beta[c], ONE, HALF)
            dx[n, c, hh, ww] = rstd[n, g] * (dy * gamma[c] - gstat[n, g, 0] - xh * gstat[n, g, 1])
    return gn_bwd_dx_k


# ------------------------------------------------------------------------------------------------
# host wrappers
# ------------------------------------------------------------------------------------------------

def _groups(x, groups, C: int) -> int:
    if int(np.prod(x.shape)) == 0:
        raise ValueError(f"x must not be empty (a group's statistics need elements), got shape {tuple(x.shape)}")
    groups = _check_int("groups", groups, 1)
    if C % groups:
        raise ValueError(f"groups must divide the number of channels {C}, got groups={groups}")
    return groups


def group_norm_silu_forward(x, gamma, beta, groups, eps, silu):
    """CUDA twin of :func:`difnumpy.kernels.reference.group_norm_silu_forward`: ``(out, mean, rstd)``.

    One block per (sample, group); two-pass statistics in the input's dtype (block tree reductions).
    """
    _check("x", x, 4)
    N, C, H, W = (int(s) for s in x.shape)
    _check("gamma", gamma, 1, x.dtype, (C,))
    _check("beta", beta, 1, x.dtype, (C,))
    groups = _groups(x, groups, C)
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    dt = np.dtype(x.dtype)
    out = cuda.device_array((N, C, H, W), dtype=dt)
    mean = cuda.device_array((N, groups), dtype=dt)
    rstd = cuda.device_array((N, groups), dtype=dt)
    build_gn_fwd(dt)[N * groups, RED](asarray(x), asarray(gamma), asarray(beta), groups, dt.type(eps),
                                      bool(silu), out, mean, rstd)
    return _ret(is_array(x), out, mean, rstd)


def group_norm_silu_backward(dout, x, gamma, beta, mean, rstd, groups, silu):
    """CUDA twin of :func:`difnumpy.kernels.reference.group_norm_silu_backward`: ``(dx, dgamma, dbeta)``.

    Per-(sample, channel) sums (block-reduced with ``USE_BLOCK_REDUCTIONS``), then per-group means,
    the parameter gradients and one thread per element of ``dx``.
    """
    _check("dout", dout, 4)
    _check("x", x, 4, dout.dtype, dout.shape)
    N, C, H, W = (int(s) for s in x.shape)
    _check("gamma", gamma, 1, dout.dtype, (C,))
    _check("beta", beta, 1, dout.dtype, (C,))
    groups = _groups(x, groups, C)
    _check("mean", mean, 2, dout.dtype, (N, groups))
    _check("rstd", rstd, 2, dout.dtype, (N, groups))
    dt = np.dtype(dout.dtype)
    d_do, d_x, d_g, d_b = asarray(dout), asarray(x), asarray(gamma), asarray(beta)
    d_m, d_r = asarray(mean), asarray(rstd)
    silu = bool(silu)
    part = cuda.device_array((N, C, 2), dtype=dt)
    gstat = cuda.device_array((N, groups, 2), dtype=dt)
    dx = cuda.device_array((N, C, H, W), dtype=dt)
    dgamma = cuda.device_array((C,), dtype=dt)
    dbeta = cuda.device_array((C,), dtype=dt)
    if _runtime.USE_BLOCK_REDUCTIONS:
        build_gn_bwd_part(dt)[N * C, RED](d_do, d_x, d_g, d_b, d_m, d_r, groups, silu, part)
    else:
        build_gn_bwd_part_direct(dt)[grid1d(N * C)](d_do, d_x, d_g, d_b, d_m, d_r, groups, silu, part)
    build_gn_bwd_group(dt)[grid1d(N * groups)](part, d_g, groups, H * W, gstat)
    build_gn_bwd_param(dt)[grid1d(C)](part, dgamma, dbeta)
    build_gn_bwd_dx(dt)[grid1d(N * C * H * W)](d_do, d_x, d_g, d_b, d_m, d_r, groups, silu, gstat, dx)
    return _ret(is_array(dout), dx, dgamma, dbeta)
