"""Layout ops of the U-Net graph: nearest-neighbour 2x upsampling, channel concatenation and split.

Twins: :func:`difnumpy.kernels.reference.upsample_nearest2x_forward` / ``_backward``,
``concat_channels`` and ``split_channels``. Concatenation and split copy one part per launch, so any
number of parts is supported.
"""
from __future__ import annotations

import numpy as np

from difnumpy.kernels.cuda._runtime import _check, _check_int, _ret, asarray, cuda, grid1d, is_array, kernel


@kernel(lambda t: (t.a4, t.a4))
def build_up2_fwd(dt):
    """``out[n, c, y, x] = x[n, c, y // 2, x // 2]``."""
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
    return up2_fwd_k


@kernel(lambda t: (t.a4, t.a4))
def build_up2_bwd(dt):
    """``dx[n, c, y, x]`` = the sum of the 2x2 block of ``dout`` it was copied to."""
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
    return up2_bwd_k


@kernel(lambda t: (t.a4, t.a4, t.i))
def build_put_channels(dt):
    """``out[:, c0:c0 + C] = part`` (``C`` the channels of ``part``)."""
    def put_channels_k(part, out, c0):
        C, H, W = part.shape[1], part.shape[2], part.shape[3]
        for i in range(cuda.grid(1), part.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            out[n, c0 + c, yy, xx] = part[n, c, yy, xx]
    return put_channels_k


@kernel(lambda t: (t.a4, t.a4, t.i))
def build_take_channels(dt):
    """``part = src[:, c0:c0 + C]`` (``C`` the channels of ``part``)."""
    def take_channels_k(src, part, c0):
        C, H, W = part.shape[1], part.shape[2], part.shape[3]
        for i in range(cuda.grid(1), part.shape[0] * C * H * W, cuda.gridsize(1)):
            xx = i % W
            r = i // W
            yy = r % H
            r = r // H
            c = r % C
            n = r // C
            part[n, c, yy, xx] = src[n, c0 + c, yy, xx]
    return take_channels_k


def _size(a) -> int:
    return int(np.prod(a.shape))


def upsample_nearest2x_forward(x):
    """CUDA twin of :func:`difnumpy.kernels.reference.upsample_nearest2x_forward`."""
    _check("x", x, 4)
    N, C, H, W = (int(s) for s in x.shape)
    dt = np.dtype(x.dtype)
    out = cuda.device_array((N, C, 2 * H, 2 * W), dtype=dt)
    if _size(out):
        build_up2_fwd(dt)[grid1d(_size(out))](asarray(x), out)
    return _ret(is_array(x), out)


def upsample_nearest2x_backward(dout):
    """CUDA twin of :func:`difnumpy.kernels.reference.upsample_nearest2x_backward`."""
    _check("dout", dout, 4)
    N, C, H2, W2 = (int(s) for s in dout.shape)
    if H2 % 2 or W2 % 2:
        raise ValueError(f"dout must have even H and W, got shape {tuple(dout.shape)}")
    dt = np.dtype(dout.dtype)
    dx = cuda.device_array((N, C, H2 // 2, W2 // 2), dtype=dt)
    if _size(dx):
        build_up2_bwd(dt)[grid1d(_size(dx))](asarray(dout), dx)
    return _ret(is_array(dout), dx)


def concat_channels(xs):
    """CUDA twin of :func:`difnumpy.kernels.reference.concat_channels` (NCHW arrays of one dtype)."""
    if isinstance(xs, np.ndarray) or is_array(xs) or not hasattr(xs, "__len__") or len(xs) == 0:
        raise TypeError(f"xs must be a non-empty sequence of arrays, got {type(xs).__name__}")
    _check("xs[0]", xs[0], 4)
    n, rest = int(xs[0].shape[0]), tuple(int(v) for v in xs[0].shape[2:])
    for k, a in enumerate(xs[1:], 1):
        _check(f"xs[{k}]", a, 4, xs[0].dtype)
        if int(a.shape[0]) != n or tuple(int(v) for v in a.shape[2:]) != rest:
            raise ValueError(f"xs[{k}] has shape {tuple(a.shape)}, incompatible with xs[0] shape {tuple(xs[0].shape)}")
    dt = np.dtype(xs[0].dtype)
    out = cuda.device_array((n, sum(int(a.shape[1]) for a in xs)) + rest, dtype=dt)
    c0 = 0
    for a in xs:
        if _size(a):
            build_put_channels(dt)[grid1d(_size(a))](asarray(a), out, c0)
        c0 += int(a.shape[1])
    return _ret(is_array(xs[0]), out)


def split_channels(dout, channels):
    """CUDA twin of :func:`difnumpy.kernels.reference.split_channels`: one array per entry of ``channels``."""
    _check("dout", dout, 4)
    if not hasattr(channels, "__len__") or len(channels) == 0:
        raise TypeError(f"channels must be a non-empty sequence of ints, got {channels!r}")
    counts = [_check_int(f"channels[{k}]", c, 0) for k, c in enumerate(channels)]
    if sum(counts) != int(dout.shape[1]):
        raise ValueError(f"channels {tuple(counts)} do not add up to dout's {int(dout.shape[1])}")
    dt = np.dtype(dout.dtype)
    n, rest = int(dout.shape[0]), tuple(int(v) for v in dout.shape[2:])
    d_do = asarray(dout)
    parts, c0 = [], 0
    for c in counts:
        part = cuda.device_array((n, c) + rest, dtype=dt)
        if _size(part):
            build_take_channels(dt)[grid1d(_size(part))](d_do, part, c0)
        parts.append(part)
        c0 += c
    return tuple(p if is_array(dout) else p.copy_to_host() for p in parts)
