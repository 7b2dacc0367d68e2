"""The U-Net's ResBlock forward in one compiled call (an optional hook of the cpu backend).

``resblock_forward`` computes exactly the U-Net's unfused graph (:meth:`difnumpy.nn.unet.UNet._res_forward`):
``h = Conv3x3(SiLU(GN(x))) + tp``, ``h = Conv3x3(SiLU(GN(h)))``, ``out = h + (Conv1x1(x) if a skip conv else x)``
with the same kernels in the same order on the same arguments, so the result is the same bits (tested). Why
fused: a pass otherwise makes ~8 Python -> numba calls per ResBlock, and when two threads run a batch
share each (:func:`._threads.run_shares`) every call re-takes the GIL; the hand-offs, not the arithmetic,
made two threads only ~1.2x one at batch 16, 8x8 (measured). The kernels run serially here, so the U-Net
uses the hook inside batch shares and for calls too small to share out (:data:`._threads.SPLIT_MIN_FLOPS`).
"""
from __future__ import annotations

import numba
import numpy as np

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu.conv import _conv1x1_fwd_kernel
from difnumpy.kernels.cpu.elementwise import _add_channel_bias_kernel, _add_kernel
from difnumpy.kernels.cpu.groupnorm import _gn_fwd_kernel, _repeated
from difnumpy.kernels.cpu.winograd import _wino_bands, _wino_chunk, _wino_filters, _wino_fwd_kernel


@numba.njit(cache=True, nogil=True)
def _resblock_fwd_kernel(x, ge1, be1, Ub1, b1, tp, ge2, be2, Ub2, b2, ws, bs, skip, groups, eps, fast,
                         th, tw, G1, nb1, G2, nb2, h, mean, rstd, h1, h2, mean2, rstd2, out):
    # h, mean, rstd, h1, h2, mean2, rstd2: the activations a training pass keeps (see resblock_forward)
    N, C, H, W = x.shape
    F = b1.shape[0]
    _gn_fwd_kernel(x, ge1, be1, groups, eps, True, fast, h, mean, rstd, 0, 1)
    _wino_fwd_kernel(h, Ub1, F, b1, th, tw, G1, nb1, h1, 0, 1)
    _add_channel_bias_kernel(h1.reshape(N, F, H * W), tp)
    _gn_fwd_kernel(h1, ge2, be2, groups, eps, True, fast, h2, mean2, rstd2, 0, 1)
    _wino_fwd_kernel(h2, Ub2, F, b2, th, tw, G2, nb2, out, 0, 1)
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
    th, tw = (H + 1) // 2, (W + 1) // 2
    G1 = _wino_chunk(th * tw, N, C, F, dt.itemsize)
    G2 = _wino_chunk(th * tw, N, F, F, dt.itemsize)
    nb1 = _wino_bands(th, tw, C, F, dt.itemsize) if G1 == 1 else 1
    nb2 = _wino_bands(th, tw, F, F, dt.itemsize) if G2 == 1 else 1
    Ub1 = _wino_filters(w1)
    Ub2 = _wino_filters(w2)
    ge1, be1 = _repeated(gamma1, beta1, H * W, dt)
    ge2, be2 = _repeated(gamma2, beta2, H * W, dt)
    skip = skip_w is not None
    ws = np.ascontiguousarray(skip_w.reshape(F, C)) if skip else np.zeros((0, 0), dt)
    bs = skip_b if skip else np.zeros(0, dt)
    acts = (np.empty_like(x), np.empty((N, groups), dt), np.empty((N, groups), dt), np.empty((N, F, H, W), dt),
            np.empty((N, F, H, W), dt), np.empty((N, groups), dt), np.empty((N, groups), dt))
    out = np.empty((N, F, H, W), dt)
    _resblock_fwd_kernel(x, ge1, be1, Ub1, b1, np.ascontiguousarray(tp, dtype=dt), ge2, be2, Ub2, b2, ws, bs, skip,
                         int(groups), float(eps), dt == np.float32, th, tw, G1, nb1, G2, nb2, *acts, out)
    return (out, acts) if keep else out


def _fused(N: int, C: int, F: int, H: int, W: int) -> bool:
    """Whether to fuse a ResBlock of this size: inside a batch share (its kernels run serially there anyway),
    or when none of its convs is big enough to be shared out over the threads."""
    if _threads._nthreads() == 1 or _threads._in_share():
        return True
    return 32.0 * N * ((H + 1) // 2) * ((W + 1) // 2) * max(C, F) * F < _threads.SPLIT_MIN_FLOPS
