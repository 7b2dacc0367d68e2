"""The U-Net's ResBlock forward in one compiled call and its backward in two (optional hooks of the cpu backend).

``resblock_forward`` computes exactly the U-Net's unfused graph (:meth:`difnumpy.nn.unet.UNet._res_forward`):
``h = Conv3x3(SiLU(GN(x))) + tp``, ``h = Conv3x3(SiLU(GN(h)))``, ``out = h + (Conv1x1(x) if a skip conv else x)``
with the same kernels in the same order on the same arguments, so the result is the same bits (tested). Why
fused: a pass otherwise makes ~8 Python -> numba calls per ResBlock, and when two threads run a batch
share each (:func:`._threads.run_shares`) every call re-takes the GIL; the hand-offs, not the arithmetic,
made two threads only ~1.2x one at batch 16, 8x8 (measured). The kernels run serially here, so the U-Net
uses the hook inside batch shares and for calls too small to share out (:data:`._threads.SPLIT_MIN_FLOPS`).
``resblock_backward`` does the same for :meth:`~difnumpy.nn.unet.UNet._res_backward` (the reductions after the
weight-gradient and GroupNorm kernels are numba helpers that the unfused calls use too, so again the same bits).
"""
from __future__ import annotations

import numba
import numpy as np

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu import conv as _conv
from difnumpy.kernels.cpu.conv import (_conv1x1_bwd_weight_finish, _conv1x1_bwd_weight_kernel, _conv1x1_fwd_kernel,
                                       _flipped)
from difnumpy.kernels.cpu.elementwise import _add_channel_bias_kernel, _add_kernel, _sum_hw_kernel, _sum_rows
from difnumpy.kernels.cpu.groupnorm import _gn_bwd_kernel, _gn_fwd_kernel, _repeated
from difnumpy.kernels.cpu.winograd import (_WINO_PAD, _wino_bwd_weight_kernel, _wino_conv, _wino_filters,
                                           _wino_geometry, _wino_plan, _wino_weight_grad_finish)


@numba.njit(cache=True, nogil=True)
def _resblock_fwd_kernel(x, ge1, be1, Ub1, b1, tp, ge2, be2, Ub2, b2, ws, bs, skip, groups, eps, fast,
                         four, th, tw, G1, nb1, G2, nb2, h, mean, rstd, h1, h2, mean2, rstd2, out):
    # h, mean, rstd, h1, h2, mean2, rstd2: the activations a training pass keeps (see resblock_forward)
    N, C, H, W = x.shape
    F = b1.shape[0]
    _gn_fwd_kernel(x, ge1, be1, groups, eps, True, fast, h, mean, rstd, 0, 1)
    _wino_conv(h, Ub1, F, b1, four, th, tw, G1, nb1, h1, 0, 1)
    _add_channel_bias_kernel(h1.reshape(N, F, H * W), tp)
    _gn_fwd_kernel(h1, ge2, be2, groups, eps, True, fast, h2, mean2, rstd2, 0, 1)
    _wino_conv(h2, Ub2, F, b2, four, th, tw, G2, nb2, out, 0, 1)
    if skip:
        s = np.empty((N, F, H, W), x.dtype)
        _conv1x1_fwd_kernel(x, ws, bs, s, 0, 1)
        _add_kernel(out.reshape(-1), s.reshape(-1))
    else:
        _add_kernel(out.reshape(-1), x.reshape(-1))


def resblock_forward(x, gamma1, beta1, w1, b1, tp, gamma2, beta2, w2, b2, skip_w, skip_b, groups, eps, keep=False):
    """One ResBlock of the U-Net; the serial composition of this backend's kernels.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64, C-contiguous
    gamma1, beta1 : (C,); w1 : (F, C, 3, 3); b1 : (F,); tp : (N, F), the time-embedding projection
    gamma2, beta2 : (F,); w2 : (F, F, 3, 3); b2 : (F,)
    skip_w : (F, C, 1, 1) or None (then C == F and the skip is x itself); skip_b : (F,) or None
    groups : int dividing C and F; eps : float
    keep : bool, also return the activations a training pass keeps for the backward pass
    All arrays of ``x``'s dtype (the U-Net checks them once per pass; here they are trusted).

    Returns
    -------
    out : ndarray (N, F, H, W): ``conv2(silu(gn2(conv1(silu(gn1(x))) + tp))) + skip(x)``, the same bits as
    the unfused calls of ``group_norm_silu_forward``, ``conv2d_forward``, ``add_channel_bias_`` and ``add_``;
    or None where the unfused calls are faster (outside a batch share, with a conv big enough to be shared
    out over the threads): the caller then runs them.
    With ``keep``: ``(out, (h, mean1, rstd1, h1, h2, mean2, rstd2))``: GN1+SiLU's output and statistics,
    conv1's output plus ``tp``, GN2+SiLU's output and statistics (what the unfused layers' caches hold).
    """
    N, C, H, W = x.shape
    F = w1.shape[0]
    if not _fused(N, C, F, H, W):
        return None
    dt = x.dtype
    four, th, tw, G1, nb1 = _wino_plan(N, C, F, H, W, dt.itemsize)  # the unfused convs' plans
    _, _, _, G2, nb2 = _wino_plan(N, F, F, H, W, dt.itemsize)
    Ub1 = _wino_filters(w1, four)
    Ub2 = _wino_filters(w2, four)
    ge1, be1 = _repeated(gamma1, beta1, H * W, dt)
    ge2, be2 = _repeated(gamma2, beta2, H * W, dt)
    skip = skip_w is not None
    ws = np.ascontiguousarray(skip_w.reshape(F, C)) if skip else np.zeros((0, 0), dt)
    bs = skip_b if skip else np.zeros(0, dt)
    acts = (np.empty_like(x), np.empty((N, groups), dt), np.empty((N, groups), dt), np.empty((N, F, H, W), dt),
            np.empty((N, F, H, W), dt), np.empty((N, groups), dt), np.empty((N, groups), dt))
    out = np.empty((N, F, H, W), dt)
    _resblock_fwd_kernel(x, ge1, be1, Ub1, b1, np.ascontiguousarray(tp, dtype=dt), ge2, be2, Ub2, b2, ws, bs, skip,
                         int(groups), float(eps), dt == np.float32, four, th, tw, G1, nb1, G2, nb2, *acts, out)
    return (out, acts) if keep else out


def _fused(N: int, C: int, F: int, H: int, W: int) -> bool:
    """Whether to fuse a ResBlock of this size: inside a batch share (its kernels run serially there anyway),
    or when none of its convs is big enough to be shared out over the threads. Never where the unfused
    calls would not take the Winograd path (``conv.USE_WINOGRAD`` off, or fewer than ``conv._WINO_MIN_C``
    channels): the fused kernels are Winograd's, and the two ways must give the same bits."""
    if not (_conv.USE_WINOGRAD and min(C, F) >= _conv._WINO_MIN_C):
        return False
    if _threads._nthreads() == 1 or _threads._in_share():
        return True
    return 32.0 * N * ((H + 1) // 2) * ((W + 1) // 2) * max(C, F) * F < _threads.SPLIT_MIN_FLOPS


# ---- backward ----

@numba.njit(cache=True, nogil=True, inline="always")
def _conv_gn_bwd(d, xc, Ubf, Cin, zC, four, fth, ftw, Gi, nbi, th, tw, Gw, dU, dw, db, xg, g, ge, be, m, r, groups,
                 fast, dh, dx, dgp, dbp, dgamma, dbeta):
    """Conv3x3(SiLU(GN(xg))) backward, xc = SiLU(GN(xg)) (Cin channels): the conv's input gradient ``dh``
    (a forward conv with the flipped filters ``Ubf``, planned ``four, fth, ftw, Gi, nbi``), its weight and
    bias gradients (F(2x2): ``th, tw, Gw``), then GroupNorm+SiLU's backward into ``dx`` and its gamma / beta
    gradients (part sums as the unfused calls make them)."""
    F = d.shape[1]
    _wino_conv(d, Ubf, Cin, zC, four, fth, ftw, Gi, nbi, dh, 0, 1)
    _wino_bwd_weight_kernel(d, xc, th, tw, Gw, dU, 0, 1)
    _wino_weight_grad_finish(d, dU, F * Cin, dw, db)
    _gn_bwd_kernel(dh, xg, g, ge, be, m, r, groups, True, fast, dx, dgp, dbp, 0, 1)
    _sum_rows(dgp, Cin, dgamma)
    _sum_rows(dbp, Cin, dbeta)


@numba.njit(cache=True, nogil=True)
def _res_bwd_a(dout, x, h1, h2, g2, ge2, be2, m2, r2, Ub2f, zF, four, fth, ftw, Gi2, nbi2, th, tw, Gw2, dU2, dw2, db2,
               skip, wst, zC, dws_parts, dbs_parts, dws, dbs, groups, fast,
               dx_skip, dh, dh_gn, dgp2, dbp2, dgamma2, dbeta2, dtp):
    """From the block's output gradient to dtp (the time-embedding projection's gradient): the skip conv's
    gradients (if any), conv2's and GroupNorm2+SiLU's backward, the sum over H, W."""
    N, F, H, W = dout.shape
    if skip:
        _conv1x1_fwd_kernel(dout, wst, zC, dx_skip, 0, 1)
        _conv1x1_bwd_weight_kernel(dout, x, dws_parts, dbs_parts, 0, 1)
        _conv1x1_bwd_weight_finish(dws_parts, dbs_parts, dws, dbs)
    _conv_gn_bwd(dout, h2, Ub2f, F, zF, four, fth, ftw, Gi2, nbi2, th, tw, Gw2, dU2, dw2, db2, h1, g2, ge2, be2, m2,
                 r2, groups, fast, dh, dh_gn, dgp2, dbp2, dgamma2, dbeta2)
    _sum_hw_kernel(dh_gn.reshape(N, F, H * W), dtp)


@numba.njit(cache=True, nogil=True)
def _res_bwd_b(dh_gn, h0, x, Ub1f, zC, four, fth, ftw, Gi1, nbi1, th, tw, Gw1, dU1, dw1, db1, g1, ge1, be1, m1, r1,
               groups, fast, dh1, dx, dgp1, dbp1, dgamma1, dbeta1, dx_skip):
    """From dtp's block gradient to the block input's: conv1's and GroupNorm1+SiLU's backward, plus the skip
    path's gradient."""
    _conv_gn_bwd(dh_gn, h0, Ub1f, x.shape[1], zC, four, fth, ftw, Gi1, nbi1, th, tw, Gw1, dU1, dw1, db1, x, g1, ge1,
                 be1, m1, r1, groups, fast, dh1, dx, dgp1, dbp1, dgamma1, dbeta1)
    _add_kernel(dx.reshape(-1), dx_skip.reshape(-1))


def resblock_backward(dout, x, h0, h1, h2, m1, r1, m2, r2, gamma1, beta1, w1, gamma2, beta2, w2, skip_w, groups,
                      temb_backward):
    """The backward pass of :func:`resblock_forward` (``keep=True``) in two compiled calls, or None.

    Parameters
    ----------
    dout : (N, F, H, W), the gradient of the block's output
    x, h0, h1, h2, m1, r1, m2, r2 : the block input and the activations ``resblock_forward(..., keep=True)``
        returns (the unfused layers' caches hold the same arrays)
    gamma1, beta1, w1, gamma2, beta2, w2, skip_w : the block's parameters (``skip_w`` None: identity skip)
    groups : int
    temb_backward : callable ``dtp (N, F) -> dtemb_act``, the time-embedding projection's backward (run
        between the two compiled calls; it keeps its own weight gradients)

    Returns
    -------
    ``(dx, dtemb_act, grads)`` with ``grads`` a dict of the suffixes ``conv1.w, conv1.b, norm1.gamma,
    norm1.beta, conv2.w, conv2.b, norm2.gamma, norm2.beta[, skip.w, skip.b]``: the same bits as the unfused
    layers' backward passes (the same kernels and reductions); or None where the unfused calls are faster
    (see :func:`resblock_forward`).
    """
    N, C, H, W = x.shape
    F = w1.shape[0]
    if not _fused(N, C, F, H, W):
        return None
    dt = x.dtype
    isz = dt.itemsize
    th, tw = (H + 1) // 2, (W + 1) // 2
    fast = dt == np.float32
    dout = np.ascontiguousarray(dout, dtype=dt)
    skip = skip_w is not None
    G2, _, P2 = _wino_geometry(N, F, F, th, tw, isz)  # conv2's weight gradient (F(2x2))
    Gw1, _, P1 = _wino_geometry(N, C, F, th, tw, isz)  # conv1's weight gradient
    four, fth, ftw, Gi2, nbi2 = _wino_plan(N, F, F, H, W, isz)  # conv2's input gradient, a forward F -> F
    _, _, _, Gi1, nbi1 = _wino_plan(N, F, C, H, W, isz)  # conv1's input gradient: a forward F -> C
    ge1, be1 = _repeated(gamma1, beta1, H * W, dt)
    ge2, be2 = _repeated(gamma2, beta2, H * W, dt)
    g1 = np.ascontiguousarray(gamma1, dtype=dt)
    g2 = np.ascontiguousarray(gamma2, dtype=dt)
    if skip:
        wst = np.ascontiguousarray(_flipped(skip_w).reshape(C, F))
        Ps = _threads._parts(N)
        dws_parts = np.empty((Ps, F, C), dt)
        dbs_parts = np.zeros((Ps, F), np.float64)
        dws, dbs = np.empty((F, C, 1, 1), dt), np.empty(F, dt)
        dx_skip = np.empty((N, C, H, W), dt)
    else:
        wst = np.zeros((0, 0), dt)
        dws_parts, dbs_parts = np.zeros((1, 0, 0), dt), np.zeros((1, 0), np.float64)
        dws, dbs = np.zeros((0, 0, 1, 1), dt), np.zeros(0, dt)
        dx_skip = dout
    dU2 = np.empty((P2, 16, F * F + _WINO_PAD), dt)
    dw2, db2 = np.empty((F, F, 3, 3), dt), np.empty(F, dt)
    dh, dh_gn = np.empty((N, F, H, W), dt), np.empty((N, F, H, W), dt)
    dgp2, dbp2 = np.empty((N, F), np.float64), np.empty((N, F), np.float64)
    dgamma2, dbeta2, dtp = np.empty(F, dt), np.empty(F, dt), np.empty((N, F), dt)
    _res_bwd_a(dout, x, h1, h2, g2, ge2, be2, np.ascontiguousarray(m2, dtype=dt), np.ascontiguousarray(r2, dtype=dt),
               _wino_filters(w2, four, True), np.zeros(F, dt), four, fth, ftw, Gi2, nbi2, th, tw, G2, dU2, dw2, db2,
               skip, wst, np.zeros(C, dt), dws_parts, dbs_parts, dws, dbs, int(groups), fast,
               dx_skip, dh, dh_gn, dgp2, dbp2, dgamma2, dbeta2, dtp)
    dtemb_act = temb_backward(dtp)
    dU1 = np.empty((P1, 16, F * C + _WINO_PAD), dt)
    dw1, db1 = np.empty((F, C, 3, 3), dt), np.empty(F, dt)
    dh1, dx = np.empty((N, C, H, W), dt), np.empty((N, C, H, W), dt)
    dgp1, dbp1 = np.empty((N, C), np.float64), np.empty((N, C), np.float64)
    dgamma1, dbeta1 = np.empty(C, dt), np.empty(C, dt)
    _res_bwd_b(dh_gn, h0, x, _wino_filters(w1, four, True), np.zeros(C, dt), four, fth, ftw, Gi1, nbi1, th, tw, Gw1,
               dU1, dw1, db1, g1, ge1, be1, np.ascontiguousarray(m1, dtype=dt), np.ascontiguousarray(r1, dtype=dt),
               int(groups), fast, dh1, dx, dgp1, dbp1, dgamma1, dbeta1, dx_skip)
    grads = {"conv1.w": dw1, "conv1.b": db1, "norm1.gamma": dgamma1, "norm1.beta": dbeta1,
             "conv2.w": dw2, "conv2.b": db2, "norm2.gamma": dgamma2, "norm2.beta": dbeta2}
    if skip:
        grads["skip.w"], grads["skip.b"] = dws, dbs
    return dx, dtemb_act, grads
