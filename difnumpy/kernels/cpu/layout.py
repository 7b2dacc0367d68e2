"""Layout kernels: channel concat / split and nearest 2x upsampling (twins in :mod:`difnumpy.kernels.reference`).

Memory bound, one thread (no result depends on the thread count). NumPy's strided copies for these
took 0.5-1.4 ms each at the 8x8 U-Net's sizes, 3-10x these loops.
"""
from __future__ import annotations

import numba
import numpy as np


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
