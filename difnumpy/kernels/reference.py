"""NumPy twins of every compute kernel.

These functions *define* what the Numba (:mod:`difnumpy.kernels.cpu`) and CUDA
(:mod:`difnumpy.kernels.cuda`) kernels must compute: each compiled kernel has a twin here with the same
signature, and a test asserting that they agree. Together they are the backend API
(:data:`difnumpy.kernels.api.BACKEND_API`); the pure-NumPy backend (``backend="numpy"``) runs them
directly. They are written for clarity first.
"""
from __future__ import annotations

import math

import numpy as np

# ==== section: arrays ====
# The native arrays of this backend are C-contiguous numpy.ndarrays.


def is_array(a) -> bool:
    """True for a native array of this backend (a ``numpy.ndarray``)."""
    return isinstance(a, np.ndarray)


def asarray(a, dtype=None) -> np.ndarray:
    """``a`` as a C-contiguous ndarray of ``dtype`` (``a`` itself when it already is one)."""
    return np.ascontiguousarray(a, dtype=dtype)


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (the array itself: this backend's arrays are host arrays)."""
    return np.asarray(a)


def zeros(shape, dtype) -> np.ndarray:
    """A native array of zeros, shape ``shape``, dtype ``dtype``."""
    return np.zeros(shape, dtype=dtype)


def copy(a) -> np.ndarray:
    """A new C-contiguous array equal to ``a``."""
    return np.array(a, order="C", copy=True)


def copy_into(dst: np.ndarray, src) -> np.ndarray:
    """``dst[...] = src`` (``src`` of ``dst``'s shape, cast to its dtype); returns ``dst``."""
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"src must have the shape of dst {dst.shape}, got {src.shape}")
    dst[...] = src
    return dst


# ==== end section: arrays ====

# ==== section: diffusion ====


def q_sample(x0, noise, sqrt_ab, sqrt_1m_ab, out=None):
    """Forward process, DDPM eq. 4: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

    Parameters
    ----------
    x0, noise : ndarray, shape (N, M), float32 or float64
    sqrt_ab, sqrt_1m_ab : ndarray, shape (N,), float64
        Per-sample coefficients; cast to the dtype of ``x0`` before use.
    out : ndarray, shape (N, M), dtype of x0, optional

    Returns
    -------
    x_t : ndarray, shape (N, M), dtype of x0
    """
    a = sqrt_ab.astype(x0.dtype)[:, None]
    b = sqrt_1m_ab.astype(x0.dtype)[:, None]
    if out is None:
        out = np.empty_like(x0)
    np.multiply(a, x0, out=out)
    out += b * noise
    return out


def sampler_update(x_t, model_output, noise, coef, clip_lo, clip_hi):
    """One fused reverse step shared by DDPM and DDIM.

    ``x0 = clip(A x_t + B model_output, clip_lo, clip_hi)`` then ``x_prev = C x0 + D x_t + E noise``,
    with per-sample ``(A, B, C, D, E) = coef[n]``. Every step of DDPM (eq. 7, 11) and DDIM (eq. 12)
    for every prediction type reduces to this form; :mod:`difnumpy.samplers` derives the coefficients.

    Parameters
    ----------
    x_t, model_output, noise : ndarray, shape (N, M), float32 or float64 (one dtype)
    coef : ndarray, shape (N, 5), float64
    clip_lo, clip_hi : ndarray, shape (N,), float64 (``-inf``/``inf`` for no clipping)

    Returns
    -------
    x_prev, x0_pred : ndarray, shape (N, M), dtype of x_t
    """
    c = coef.astype(x_t.dtype)
    A, B, C, D, E = (c[:, k:k + 1] for k in range(5))
    x0 = A * x_t + B * model_output
    x0 = np.minimum(np.maximum(x0, clip_lo.astype(x_t.dtype)[:, None]), clip_hi.astype(x_t.dtype)[:, None])
    x_prev = C * x0 + D * x_t + E * noise
    return x_prev.astype(x_t.dtype, copy=False), x0.astype(x_t.dtype, copy=False)


# ==== end section: diffusion ====

# ==== section: nn ====
#
# Conventions shared by every backend (see the kernel API in the team spec):
# - NCHW activations, conv weights (F, C, KH, KW); zero padding ``padding`` on all four sides;
#   Ho = (H + 2*padding - KH) // stride + 1 (rows/columns that the last window does not reach are
#   simply not used, as in PyTorch).
# - float32 or float64 in, the same dtype out. Reductions (GroupNorm statistics, dgamma, dbeta,
#   db) accumulate in float64 and are cast back to the input dtype.


def _conv_windows(x: np.ndarray, kh: int, kw: int, stride: int, padding: int) -> np.ndarray:
    """Strided view of the padded input: shape (N, C, Ho, Wo, KH, KW) (no copy beyond the pad)."""
    if padding > 0:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return win[:, :, ::stride, ::stride]


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """2-D cross-correlation (a "convolution" in deep-learning usage), NCHW.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``x``
    b : ndarray, shape (F,), dtype of ``x``
    stride : int >= 1
    padding : int >= 0 (zeros, same on all sides)

    Returns
    -------
    out : ndarray, shape (N, F, Ho, Wo), dtype of ``x``, C-contiguous.

    Notes
    -----
    ``out[n, f, i, j] = b[f] + sum_{c, u, v} w[f, c, u, v] * xp[n, c, i*stride + u, j*stride + v]``
    with ``xp`` the zero-padded input (im2col as a strided view, then one tensordot = one GEMM).
    """
    F, C, KH, KW = w.shape
    win = _conv_windows(x, KH, KW, stride, padding)            # (N, C, Ho, Wo, KH, KW)
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))   # (N, Ho, Wo, F)
    out = out.transpose(0, 3, 1, 2) + b.reshape(1, F, 1, 1)
    return np.ascontiguousarray(out, dtype=x.dtype)


def conv2d_backward_input(dout: np.ndarray, w: np.ndarray, x_shape: tuple, stride: int,
                          padding: int) -> np.ndarray:
    """Gradient of :func:`conv2d_forward` with respect to its input ``x``.

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``dout``
    x_shape : tuple (N, C, H, W), the shape of the forward input
    stride, padding : as in the forward pass

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``dout``.

    Notes
    -----
    ``dxp[n, c, i*stride + u, j*stride + v] += sum_f dout[n, f, i, j] * w[f, c, u, v]`` (col2im),
    accumulated tap by tap over the padded input, then the padding is cropped off.
    """
    N, C, H, W = (int(s) for s in x_shape)
    F, _, KH, KW = w.shape
    Ho, Wo = dout.shape[2], dout.shape[3]
    dxp = np.zeros((N, C, H + 2 * padding, W + 2 * padding), dtype=dout.dtype)
    for u in range(KH):
        for v in range(KW):
            # (N, F, Ho, Wo) x (F, C) -> (N, Ho, Wo, C) -> (N, C, Ho, Wo)
            contrib = np.tensordot(dout, w[:, :, u, v], axes=([1], [0])).transpose(0, 3, 1, 2)
            dxp[:, :, u:u + stride * (Ho - 1) + 1:stride, v:v + stride * (Wo - 1) + 1:stride] += contrib
    dx = dxp[:, :, padding:padding + H, padding:padding + W]
    return np.ascontiguousarray(dx)


def conv2d_backward_weight(dout: np.ndarray, x: np.ndarray, w_shape: tuple, stride: int,
                           padding: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d_forward` with respect to ``w`` and ``b``.

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), float32 or float64
    x : ndarray, shape (N, C, H, W), the forward input, dtype of ``dout``
    w_shape : tuple (F, C, KH, KW)
    stride, padding : as in the forward pass

    Returns
    -------
    dw : ndarray, shape (F, C, KH, KW), dtype of ``dout``
    db : ndarray, shape (F,), dtype of ``dout``

    Notes
    -----
    ``dw[f, c, u, v] = sum_{n, i, j} dout[n, f, i, j] * xp[n, c, i*stride + u, j*stride + v]``,
    ``db[f] = sum_{n, i, j} dout[n, f, i, j]``.
    """
    F, C, KH, KW = (int(s) for s in w_shape)
    win = _conv_windows(x, KH, KW, stride, padding)               # (N, C, Ho, Wo, KH, KW)
    dw = np.tensordot(dout, win, axes=([0, 2, 3], [0, 2, 3]))     # (F, C, KH, KW)
    db = dout.sum(axis=(0, 2, 3), dtype=np.float64)
    return np.ascontiguousarray(dw, dtype=dout.dtype), db.astype(dout.dtype)


def group_norm_silu_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int,
                            eps: float, silu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GroupNorm with per-channel affine, optionally followed by SiLU (fused).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    gamma, beta : ndarray, shape (C,), dtype of ``x``
    groups : int dividing C
    eps : float
    silu : bool, apply ``y * sigmoid(y)`` after the affine

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of ``x``
    mean : ndarray, shape (N, groups), dtype of ``x``
    rstd : ndarray, shape (N, groups), dtype of ``x``, ``1 / sqrt(var + eps)`` (biased variance)

    Notes
    -----
    Wu & He 2018, eq. (1)-(3): for the channels of group g,
    ``y = (x - mean_g) * rstd_g * gamma[c] + beta[c]``; then ``out = y * sigmoid(y)`` if ``silu``
    (Elfwing et al. 2018; Hendrycks & Gimpel's SiLU). Statistics accumulate in float64.
    """
    N, C, H, W = x.shape
    xg = x.reshape(N, groups, -1)
    mean64 = xg.mean(axis=2, dtype=np.float64)
    var64 = xg.var(axis=2, dtype=np.float64)
    mean = mean64.astype(x.dtype)
    rstd = (1.0 / np.sqrt(var64 + eps)).astype(x.dtype)
    xhat = ((xg - mean[:, :, None]) * rstd[:, :, None]).reshape(N, C, H, W)
    y = xhat * gamma.reshape(1, C, 1, 1) + beta.reshape(1, C, 1, 1)
    if silu:
        y = y * _sigmoid(y)
    return np.ascontiguousarray(y, dtype=x.dtype), mean, rstd


def group_norm_silu_backward(dout: np.ndarray, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                             mean: np.ndarray, rstd: np.ndarray, groups: int,
                             silu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`group_norm_silu_forward`.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H, W), dtype of ``x``
    x : ndarray, shape (N, C, H, W), the forward input
    gamma, beta : ndarray, shape (C,)
    mean, rstd : ndarray, shape (N, groups), as returned by the forward pass
    groups : int
    silu : bool, as in the forward pass

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``x``
    dgamma, dbeta : ndarray, shape (C,), dtype of ``x``

    Notes
    -----
    With ``xhat = (x - mean) * rstd`` and ``y = gamma * xhat + beta``:
    ``dy = dout * s * (1 + y * (1 - s))``, ``s = sigmoid(y)`` (or ``dy = dout`` without SiLU);
    ``dgamma = sum_{n,h,w} dy * xhat``, ``dbeta = sum_{n,h,w} dy``; with ``g = dy * gamma`` and
    means over the M = (C/groups)*H*W elements of a group,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``.
    """
    N, C, H, W = x.shape
    xg = x.reshape(N, groups, -1)
    xhat = ((xg - mean[:, :, None]) * rstd[:, :, None]).reshape(N, C, H, W)
    if silu:
        y = xhat * gamma.reshape(1, C, 1, 1) + beta.reshape(1, C, 1, 1)
        s = _sigmoid(y)
        dy = dout * (s * (1.0 + y * (1.0 - s)))
    else:
        dy = dout
    dgamma = (dy * xhat).sum(axis=(0, 2, 3), dtype=np.float64).astype(x.dtype)
    dbeta = dy.sum(axis=(0, 2, 3), dtype=np.float64).astype(x.dtype)
    g = (dy * gamma.reshape(1, C, 1, 1)).reshape(N, groups, -1)
    xhat_g = xhat.reshape(N, groups, -1)
    mean_g = g.mean(axis=2, dtype=np.float64).astype(x.dtype)[:, :, None]
    mean_gx = (g * xhat_g).mean(axis=2, dtype=np.float64).astype(x.dtype)[:, :, None]
    dx = rstd[:, :, None] * (g - mean_g - xhat_g * mean_gx)
    return np.ascontiguousarray(dx.reshape(N, C, H, W), dtype=x.dtype), dgamma, dbeta


def concat_channels(xs) -> np.ndarray:
    """Concatenate NCHW arrays along the channel axis.

    Parameters
    ----------
    xs : sequence of ndarray, shapes (N, C_k, H, W), one dtype

    Returns
    -------
    out : ndarray, shape (N, sum C_k, H, W), C-contiguous
    """
    return np.concatenate(xs, axis=1)


def split_channels(dout: np.ndarray, channels) -> tuple:
    """Inverse of :func:`concat_channels`: ``dout`` (N, sum C_k, H, W) -> one C-contiguous array per C_k."""
    splits = np.cumsum(channels)[:-1]
    return tuple(np.ascontiguousarray(d) for d in np.split(dout, splits, axis=1))


def _sigmoid(y: np.ndarray) -> np.ndarray:
    """Logistic sigmoid ``1 / (1 + exp(-y)) = 0.5 + 0.5 * tanh(y / 2)`` (no overflow), dtype of ``y``."""
    return 0.5 + 0.5 * np.tanh(0.5 * y)

# ==== end section: nn ====

# ==== section: optim ====

def _check_adam_args(param, grad, m, v, step):
    """Shared argument checks of ``adam_update`` (same rules for every backend)."""
    for name, a in (("param", param), ("grad", grad), ("m", m), ("v", v)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy ndarray, got {type(a).__name__}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
        if a.dtype != param.dtype:
            raise TypeError(f"{name} must have the dtype of param ({param.dtype}), got {a.dtype}")
        if a.shape != param.shape:
            raise ValueError(f"{name} must have the shape of param {param.shape}, got {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    if int(step) < 1:
        raise ValueError(f"step must be the 1-based step count (>= 1), got {step}")


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One bias-corrected Adam / AdamW step, in place on ``param``, ``m`` and ``v``.

    Parameters
    ----------
    param : ndarray, any shape, float32 or float64, C-contiguous
        Parameters, updated in place.
    grad : ndarray, shape of ``param``, dtype of ``param``
        Gradient of the loss with respect to ``param``.
    m, v : ndarray, shape of ``param``, dtype of ``param``
        First and second moment estimates, updated in place.
    lr, beta1, beta2, eps, weight_decay : float
        Learning rate, moment decay rates, denominator epsilon and decoupled weight decay.
    step : int
        1-based step count *after* increment (the first update uses ``step=1``).

    Returns
    -------
    None

    Notes
    -----
    Kingma & Ba 2015 (arXiv 1412.6980), Algorithm 1, with decoupled weight decay
    (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2):

    .. math::
        \\theta \\leftarrow \\theta - \\eta\\lambda\\theta, \\quad
        m \\leftarrow \\beta_1 m + (1-\\beta_1) g, \\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2, \\\\
        \\theta \\leftarrow \\theta - \\frac{\\eta}{1-\\beta_1^t}\\,
            \\frac{m}{\\sqrt{v/(1-\\beta_2^t)} + \\epsilon}.

    The per-element arithmetic is done in float64 and rounded to the arrays' dtype when stored, in
    exactly this order on every backend (so the NumPy and Numba twins agree bit for bit). The update
    uses the new moments before they are rounded. :math:`\\sqrt{v/(1-\\beta_2^t)}` is computed as
    :math:`\\sqrt{v} \\cdot (1-\\beta_2^t)^{-1/2}` (as PyTorch's Adam does), a division less per element
    (the Numba kernel 0.86 -> 0.63 ms for 410k parameters, one thread).
    """
    _check_adam_args(param, grad, m, v, step)
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    step_size = lr / (1.0 - beta1 ** int(step))
    rs = 1.0 / math.sqrt(1.0 - beta2 ** int(step))  # sqrt(v / (1 - beta2^t)) = sqrt(v) * rs: a division less
    p = param.astype(np.float64)
    g = grad.astype(np.float64)
    if wd != 0.0:
        p = p - (lr * wd) * p
    m_new = beta1 * m.astype(np.float64) + (1.0 - beta1) * g
    v_new = beta2 * v.astype(np.float64) + (1.0 - beta2) * (g * g)
    p = p - step_size * m_new / (np.sqrt(v_new) * rs + eps)
    param[...] = p
    m[...] = m_new
    v[...] = v_new


# ==== end section: optim ====

# ==== section: graph ====
# The small ops of the U-Net graph and the training step: linear, SiLU, in-place sums, reductions.


def upsample_nearest2x_forward(x: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upsampling by 2: ``out[n, c, i, j] = x[n, c, i // 2, j // 2]``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64

    Returns
    -------
    out : ndarray, shape (N, C, 2H, 2W), dtype of ``x``, C-contiguous
    """
    N, C, H, W = x.shape
    out = np.empty((N, C, H, 2, W, 2), dtype=x.dtype)
    out[...] = x[:, :, :, None, :, None]
    return out.reshape(N, C, 2 * H, 2 * W)


def upsample_nearest2x_backward(dout: np.ndarray) -> np.ndarray:
    """Backward of :func:`upsample_nearest2x_forward`: each input pixel sums its 2x2 block of ``dout``.

    Parameters
    ----------
    dout : ndarray, shape (N, C, 2H, 2W), float32 or float64

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``dout``
    """
    N, C, H2, W2 = dout.shape
    return np.ascontiguousarray(dout.reshape(N, C, H2 // 2, 2, W2 // 2, 2).sum(axis=(3, 5)), dtype=dout.dtype)


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Affine map ``out = x @ w.T + b``.

    Parameters
    ----------
    x : ndarray, shape (N, D), float32 or float64
    w : ndarray, shape (M, D), dtype of ``x`` (PyTorch layout)
    b : ndarray, shape (M,), dtype of ``x``

    Returns
    -------
    out : ndarray, shape (N, M), dtype of ``x``
    """
    return np.ascontiguousarray(np.matmul(x, w.T) + b, dtype=x.dtype)


def linear_backward(dout: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`linear_forward`: ``dx = dout @ w``, ``dw = dout.T @ x``, ``db = sum_n dout``.

    Parameters
    ----------
    dout : ndarray, shape (N, M); x : ndarray, shape (N, D); w : ndarray, shape (M, D); one dtype

    Returns
    -------
    dx : ndarray, shape (N, D); dw : ndarray, shape (M, D); db : ndarray, shape (M,)
    """
    dx = np.ascontiguousarray(np.matmul(dout, w), dtype=dout.dtype)
    dw = np.ascontiguousarray(np.matmul(dout.T, x), dtype=dout.dtype)
    db = dout.sum(axis=0, dtype=np.float64).astype(dout.dtype)
    return dx, dw, db


def mse_loss(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error and its gradient (Ho et al. 2020, eq. 14, with ``pred = eps_theta``).

    Parameters
    ----------
    pred, target : ndarray, one shape, float32 or float64 (target is cast to pred's dtype)

    Returns
    -------
    loss : float, ``mean((pred - target)**2)`` accumulated in float64
    dpred : ndarray, shape and dtype of ``pred``, ``(pred - target) * (2 / pred.size)``
    """
    diff = pred - target.astype(pred.dtype, copy=False)
    loss = float(np.mean(np.square(diff, dtype=np.float64)))
    return loss, diff * pred.dtype.type(2.0 / pred.size)


def ema_update(ema: np.ndarray, param: np.ndarray, decay: float) -> None:
    """Exponential moving average, in place on ``ema``: ``ema = decay * ema + (1 - decay) * param``.

    Parameters
    ----------
    ema : ndarray, any shape, float32 or float64, C-contiguous (updated in place)
    param : ndarray, shape of ``ema``
    decay : float in [0, 1]

    Notes
    -----
    The DDPM EMA of the weights (Ho et al. 2020, Appendix B); rounded in ``ema``'s dtype in the order
    ``ema *= decay; ema += (1 - decay) * param`` (as :class:`difnumpy.nn.optim.EMA`).
    """
    ema *= np.asarray(decay, dtype=ema.dtype)
    ema += np.asarray(1.0 - decay, dtype=ema.dtype) * param.astype(ema.dtype, copy=False)


def silu_forward(x: np.ndarray) -> np.ndarray:
    """SiLU ``x * sigmoid(x)`` (Elfwing et al. 2018), shape and dtype of ``x``."""
    return x * _sigmoid(x)


def silu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Gradient of :func:`silu_forward`: ``dout * s * (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    s = _sigmoid(x)
    return dout * (s * (1.0 + x * (1.0 - s)))


def add_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a += b`` in place (same shape and dtype); returns ``a``."""
    a += b
    return a


def axpy_(y: np.ndarray, x: np.ndarray, s: float) -> np.ndarray:
    """``y += s * x`` in place, ``s`` cast to ``y``'s dtype first; returns ``y``."""
    y += np.asarray(s, dtype=y.dtype) * x
    return y


def scale_(a: np.ndarray, s: float) -> np.ndarray:
    """``a *= s`` in place, ``s`` cast to ``a``'s dtype first; returns ``a``."""
    a *= np.asarray(s, dtype=a.dtype)
    return a


def add_channel_bias_(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``h[n, c, :, :] += t[n, c]`` in place; ``h`` (N, C, H, W), ``t`` (N, C), one dtype; returns ``h``.

    The U-Net adds each ResBlock's projected time embedding this way (Ho et al. 2020, appendix B).
    """
    h += t[:, :, None, None]
    return h


def blend_(x: np.ndarray, known: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x = (1 - mask) * x + mask * known`` in place, one shape and dtype; returns ``x``.

    With ``mask`` in {0, 1} each element is exactly ``x`` or ``known``: the inpainting merge of RePaint
    (Lugmayr et al. 2022, eq. 8), known region from ``known``, the rest from ``x``.
    """
    x *= 1 - mask
    x += mask * known
    return x


def sum_hw(h: np.ndarray) -> np.ndarray:
    """``h`` (N, C, H, W) summed over H and W: shape (N, C), accumulated in float64, dtype of ``h``.

    The gradient of :func:`add_channel_bias_` with respect to ``t``.
    """
    N, C = h.shape[:2]
    return h.reshape(N, C, -1).sum(axis=2, dtype=np.float64).astype(h.dtype)


def _check_idx(idx, num_rows: int) -> np.ndarray:
    """Host int64 indices in [0, num_rows), shape (N,) (shared by every backend's embedding)."""
    a = np.asarray(idx)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
        raise TypeError(f"idx must be a 1-D integer array, got dtype {a.dtype} shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= num_rows):
        raise ValueError(f"idx must lie in [0, {num_rows - 1}], got values in [{int(a.min())}, {int(a.max())}]")
    return np.ascontiguousarray(a, dtype=np.int64)


def embedding_forward(table: np.ndarray, idx) -> np.ndarray:
    """Rows of an embedding table: ``out[n] = table[idx[n]]``.

    Parameters
    ----------
    table : ndarray, shape (R, D), float32 or float64
    idx : array_like of int, shape (N,), values in [0, R) (a host array on every backend)

    Returns
    -------
    out : ndarray, shape (N, D), dtype of ``table``
    """
    return np.ascontiguousarray(table[_check_idx(idx, table.shape[0])])


def embedding_backward(dout: np.ndarray, idx, num_rows: int) -> np.ndarray:
    """Gradient of :func:`embedding_forward` w.r.t. the table: ``dtable[r] = sum_{n: idx[n] = r} dout[n]``.

    Parameters
    ----------
    dout : ndarray, shape (N, D); idx : int array (N,); num_rows : int, R

    Returns
    -------
    dtable : ndarray, shape (R, D), dtype of ``dout`` (summed in float64, in sample order)
    """
    idx = _check_idx(idx, int(num_rows))
    out = np.zeros((int(num_rows), dout.shape[1]), dtype=np.float64)
    np.add.at(out, idx, dout.astype(np.float64))
    return out.astype(dout.dtype)


def sumsq(a: np.ndarray) -> float:
    """``sum(a**2)`` over all elements, accumulated in float64 (a Python float)."""
    flat = a.astype(np.float64, copy=False).reshape(-1)
    # einsum, not np.dot: a multi-threaded BLAS call here leaves OpenBLAS workers spinning into the
    # next U-Net pass (the training step ran at 1230 instead of 2250 img/s at 8x8, measured)
    return float(np.einsum("i,i->", flat, flat))


# ==== end section: graph ====
