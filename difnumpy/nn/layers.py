"""Neural-network layers as pure forward/backward function pairs (cs231n style).

Every layer is a pair ``name_forward(x, *params, **hp) -> (out, cache)`` and
``name_backward(dout, cache) -> (dx, *dparams)``; no layer keeps hidden state between calls
(ARCHITECTURE.md, convention 1). Images are NCHW, conv weights ``(F, C, KH, KW)``, linear weights
``(out_features, in_features)`` (PyTorch layout). Activations are float32 or float64; parameters
must have the activation's dtype and outputs keep it.

Every layer computes through a kernel backend (:func:`difnumpy.kernels.get_backend`, the API of
:mod:`difnumpy.kernels.api`): ``backend="numpy"`` (the NumPy twins, the default here), ``"cpu"`` (numba)
or ``"cuda"``. Inputs may be NumPy arrays or the backend's native arrays (device arrays on cuda); the
outputs and caches hold native arrays, so a whole graph stays on its backend. The backward pass uses
the backend of its forward pass (it is kept in the cache).
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Sequence

import numpy as np

from difnumpy.kernels import get_backend
from difnumpy.kernels.reference import _sigmoid

__all__ = [
    "conv2d_forward", "conv2d_backward",
    "linear_forward", "linear_backward",
    "group_norm_forward", "group_norm_backward",
    "silu_forward", "silu_backward",
    "group_norm_silu_forward", "group_norm_silu_backward",
    "upsample_nearest_forward", "upsample_nearest_backward",
    "concat_forward", "concat_backward",
    "embedding_forward", "embedding_backward",
    "timestep_embedding",
    "mse_loss",
    "sigmoid",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

_kernels = get_backend  # a backend name, or an already resolved kernel module


def _check_float_array(name: str, a, ndim: int | None = None, kern: ModuleType | None = None):
    """Return ``a`` as a C-contiguous float32/float64 native array of ``kern`` (NumPy arrays are
    accepted on every backend and copied up on cuda), else raise TypeError/ValueError."""
    native = kern is not None and not isinstance(a, np.ndarray) and kern.is_array(a)
    if not (isinstance(a, np.ndarray) or native):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if np.dtype(a.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    return kern.asarray(a) if kern is not None else np.ascontiguousarray(a)


def _check_param(name: str, a, shape: tuple, dtype: np.dtype, kern: ModuleType | None = None):
    """Check a parameter array's shape and that its dtype matches the activation's."""
    a = _check_float_array(name, a, None, kern)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if np.dtype(a.dtype) != dtype:
        raise TypeError(f"{name} must have the input's dtype {dtype}, got {a.dtype}")
    return a


def _check_int(name: str, v, minimum: int) -> int:
    """Return ``v`` as an int >= ``minimum`` (bools and floats are refused)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _check_eps(eps) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite float > 0, got {eps}")
    return float(eps)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid ``1 / (1 + exp(-x))``, computed as ``0.5 + 0.5 * tanh(x / 2)`` (no overflow).

    Parameters
    ----------
    x : ndarray, any shape, float32 or float64

    Returns
    -------
    ndarray, shape and dtype of ``x``
    """
    return _sigmoid(x)


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------

def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, padding: int = 0, *,
                   backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """2-D convolution (cross-correlation), NCHW, zero padding.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``x``
    b : ndarray, shape (F,), dtype of ``x``
    stride : int >= 1
    padding : int >= 0, zeros added on all four sides
    backend : {"numpy", "cpu", "cuda"}, the kernels that compute it

    Returns
    -------
    out : ndarray, shape (N, F, Ho, Wo), dtype of ``x``, ``Ho = (H + 2*padding - KH)//stride + 1``
    cache : tuple, for :func:`conv2d_backward`

    Notes
    -----
    ``out[n, f, i, j] = b[f] + sum_{c,u,v} w[f, c, u, v] * xpad[n, c, stride*i + u, stride*j + v]``.
    """
    kern = _kernels(backend)
    x = _check_float_array("x", x, 4, kern)
    w = _check_float_array("w", w, 4, kern)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have the input's dtype {x.dtype}, got {w.dtype}")
    F, C, KH, KW = w.shape
    if C != x.shape[1]:
        raise ValueError(f"w has {C} input channels but x has {x.shape[1]} (x shape {tuple(x.shape)}, "
                         f"w shape {tuple(w.shape)})")
    b = _check_param("b", b, (F,), x.dtype, kern)
    stride = _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    H, W = x.shape[2], x.shape[3]
    if H + 2 * padding < KH or W + 2 * padding < KW:
        raise ValueError(f"kernel {KH}x{KW} is larger than the padded input {H + 2 * padding}x{W + 2 * padding} "
                         f"(x shape {tuple(x.shape)}, padding {padding})")
    return _conv2d(x, w, b, stride, padding, kern)


def _conv2d(x, w, b, stride: int, padding: int, kern):
    """:func:`conv2d_forward` on arguments already checked (native arrays of ``kern``, one dtype)."""
    return kern.conv2d_forward(x, w, b, stride, padding), _conv2d_cache(x, w, stride, padding, kern)


def _conv2d_cache(x, w, stride: int, padding: int, kern) -> tuple:
    """The cache of :func:`conv2d_forward` (also built by fused kernels that ran the layer)."""
    return (x, w, stride, padding, kern)


def conv2d_backward(dout: np.ndarray, cache: tuple,
                    input_grad: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Backward pass of :func:`conv2d_forward`.

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), dtype of the forward input
    cache : tuple from :func:`conv2d_forward`
    input_grad : bool, compute ``dx`` (``False`` skips that work and returns ``None`` for it,
        e.g. for a network's first layer)

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), or None if not ``input_grad``
    dw : ndarray, shape (F, C, KH, KW)
    db : ndarray, shape (F,)
    """
    x, w, stride, padding, kern = cache
    dout = kern.asarray(dout, x.dtype)
    dx = kern.conv2d_backward_input(dout, w, tuple(x.shape), stride, padding) if input_grad else None
    dw, db = kern.conv2d_backward_weight(dout, x, tuple(w.shape), stride, padding)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------

def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, *,
                   backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """Affine layer ``out = x @ w.T + b``.

    Parameters
    ----------
    x : ndarray, shape (N, D), float32 or float64
    w : ndarray, shape (M, D), dtype of ``x`` (PyTorch layout: out_features x in_features)
    b : ndarray, shape (M,), dtype of ``x``
    backend : {"numpy", "cpu", "cuda"}

    Returns
    -------
    out : ndarray, shape (N, M), dtype of ``x``
    cache : tuple, for :func:`linear_backward`
    """
    kern = _kernels(backend)
    x = _check_float_array("x", x, 2, kern)
    w = _check_float_array("w", w, 2, kern)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have the input's dtype {x.dtype}, got {w.dtype}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w has {w.shape[1]} input features but x has {x.shape[1]} "
                         f"(x shape {tuple(x.shape)}, w shape {tuple(w.shape)})")
    b = _check_param("b", b, (w.shape[0],), x.dtype, kern)
    return _linear(x, w, b, kern)


def _linear(x, w, b, kern):
    """:func:`linear_forward` on arguments already checked."""
    return kern.linear_forward(x, w, b), (x, w, kern)


def linear_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`linear_forward`.

    Returns
    -------
    dx : ndarray, shape (N, D)
    dw : ndarray, shape (M, D)
    db : ndarray, shape (M,)
    """
    x, w, kern = cache
    return kern.linear_backward(kern.asarray(dout, x.dtype), x, w)


# --------------------------------------------------------------------------------------------
# group norm, SiLU, and the fused pair
# --------------------------------------------------------------------------------------------

def _gn_checks(x, gamma, beta, groups, eps, kern):
    x = _check_float_array("x", x, 4, kern)
    C = x.shape[1]
    gamma = _check_param("gamma", gamma, (C,), x.dtype, kern)
    beta = _check_param("beta", beta, (C,), x.dtype, kern)
    groups = _check_int("groups", groups, 1)
    if C % groups != 0:
        raise ValueError(f"groups must divide the number of channels {C}, got groups={groups}")
    return x, gamma, beta, groups, _check_eps(eps)


def group_norm_silu_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int,
                            eps: float = 1e-5, *, silu: bool = True,
                            backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """GroupNorm with per-channel affine followed by SiLU, fused in one kernel.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    gamma, beta : ndarray, shape (C,), dtype of ``x``
    groups : int dividing C
    eps : float > 0
    silu : bool, apply SiLU after the affine (``False`` gives a plain GroupNorm)
    backend : {"numpy", "cpu", "cuda"}

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of ``x``
    cache : tuple, for :func:`group_norm_silu_backward`

    Notes
    -----
    Wu & He 2018, eq. (1)-(3): ``y = gamma * (x - mean_g) / sqrt(var_g + eps) + beta`` with the
    (biased) statistics of each group of ``C / groups`` channels of each sample;
    then ``out = y * sigmoid(y)`` (SiLU, Elfwing et al. 2018).
    """
    kern = _kernels(backend)
    x, gamma, beta, groups, eps = _gn_checks(x, gamma, beta, groups, eps, kern)
    return _gn_silu(x, gamma, beta, groups, eps, bool(silu), kern)


def _gn_silu(x, gamma, beta, groups: int, eps: float, silu: bool, kern):
    """:func:`group_norm_silu_forward` on arguments already checked."""
    out, mean, rstd = kern.group_norm_silu_forward(x, gamma, beta, groups, eps, silu)
    return out, _gn_silu_cache(x, gamma, beta, mean, rstd, groups, silu, kern)


def _gn_silu_cache(x, gamma, beta, mean, rstd, groups: int, silu: bool, kern) -> tuple:
    """The cache of :func:`group_norm_silu_forward` (also built by fused kernels that ran the layer)."""
    return (x, gamma, beta, mean, rstd, groups, silu, kern)


def group_norm_silu_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`group_norm_silu_forward`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma, dbeta : ndarray, shape (C,)
    """
    x, gamma, beta, mean, rstd, groups, silu, kern = cache
    dout = kern.asarray(dout, x.dtype)
    return kern.group_norm_silu_backward(dout, x, gamma, beta, mean, rstd, groups, silu)


def group_norm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, eps: float = 1e-5, *,
                       backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """GroupNorm with per-channel affine (Wu & He 2018, eq. (1)-(3)); see :func:`group_norm_silu_forward`.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    gamma, beta : ndarray, shape (C,), dtype of ``x``
    groups : int dividing C
    eps : float > 0

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of ``x``
    cache : tuple, for :func:`group_norm_backward`
    """
    return group_norm_silu_forward(x, gamma, beta, groups, eps, silu=False, backend=backend)


def group_norm_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`group_norm_forward`: returns ``(dx, dgamma, dbeta)``."""
    return group_norm_silu_backward(dout, cache)


def silu_forward(x: np.ndarray, *, backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """SiLU (swish) ``out = x * sigmoid(x)`` (Elfwing et al. 2018).

    Parameters
    ----------
    x : ndarray, any shape, float32 or float64
    backend : {"numpy", "cpu", "cuda"}

    Returns
    -------
    out : ndarray, shape and dtype of ``x``
    cache : tuple, for :func:`silu_backward`
    """
    kern = _kernels(backend)
    return _silu(_check_float_array("x", x, None, kern), kern)


def _silu(x, kern):
    """:func:`silu_forward` on an array already checked."""
    return kern.silu_forward(x), (x, kern)


def silu_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """Backward of :func:`silu_forward`: ``dx = dout * s * (1 + x * (1 - s))``, ``s = sigmoid(x)``."""
    x, kern = cache
    return kern.silu_backward(kern.asarray(dout, x.dtype), x)


# --------------------------------------------------------------------------------------------
# upsample, concat
# --------------------------------------------------------------------------------------------

def upsample_nearest_forward(x: np.ndarray, backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """Nearest-neighbour upsampling by 2: ``out[n, c, i, j] = x[n, c, i // 2, j // 2]``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    backend : {"numpy", "cpu", "cuda"}, the kernels that compute it

    Returns
    -------
    out : ndarray, shape (N, C, 2H, 2W), dtype of ``x``, C-contiguous
    cache : tuple, for :func:`upsample_nearest_backward`
    """
    kern = _kernels(backend)
    return _upsample(_check_float_array("x", x, 4, kern), kern)


def _upsample(x, kern):
    """:func:`upsample_nearest_forward` on an array already checked."""
    return kern.upsample_nearest2x_forward(x), (kern,)


def upsample_nearest_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """Backward of :func:`upsample_nearest_forward`: each input pixel sums its 2x2 block of ``dout``."""
    kern, = cache
    return kern.upsample_nearest2x_backward(dout)


def concat_forward(xs: Sequence[np.ndarray], backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """Concatenate NCHW arrays along the channel axis.

    Parameters
    ----------
    xs : sequence of ndarray, shapes (N, C_k, H, W), one float dtype
    backend : {"numpy", "cpu", "cuda"} ("cuda" takes exactly two arrays, the U-Net's case)

    Returns
    -------
    out : ndarray, shape (N, sum C_k, H, W)
    cache : tuple, for :func:`concat_backward`
    """
    if isinstance(xs, np.ndarray) or not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise TypeError("xs must be a non-empty list or tuple of arrays")
    kern = _kernels(backend)
    xs = [_check_float_array(f"xs[{k}]", a, 4, kern) for k, a in enumerate(xs)]
    first = xs[0]
    for k, a in enumerate(xs[1:], start=1):
        if a.dtype != first.dtype:
            raise TypeError(f"xs[{k}] has dtype {a.dtype}, xs[0] has {first.dtype}")
        if a.shape[0] != first.shape[0] or a.shape[2:] != first.shape[2:]:
            raise ValueError(f"xs[{k}] has shape {tuple(a.shape)}, incompatible with xs[0] shape "
                             f"{tuple(first.shape)} (all but the channel axis must agree)")
    return _concat(xs, kern)


def _concat(xs, kern):
    """:func:`concat_forward` on arrays already checked."""
    return kern.concat_channels(xs), (tuple(a.shape[1] for a in xs), kern)


def concat_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, ...]:
    """Backward of :func:`concat_forward`: ``dout`` split back into one gradient per input."""
    channels, kern = cache
    return kern.split_channels(dout, channels)


# --------------------------------------------------------------------------------------------
# embedding table
# --------------------------------------------------------------------------------------------

def embedding_forward(table: np.ndarray, idx, *, backend: str | ModuleType = "numpy") -> tuple[np.ndarray, tuple]:
    """Look up rows of an embedding table: ``out[n] = table[idx[n]]`` (PyTorch's ``nn.Embedding``).

    Parameters
    ----------
    table : ndarray, shape (R, D), float32 or float64
    idx : array_like of int, shape (N,), values in [0, R) (host integers on every backend)
    backend : {"numpy", "cpu", "cuda"}

    Returns
    -------
    out : ndarray, shape (N, D), dtype of ``table``
    cache : tuple, for :func:`embedding_backward`
    """
    kern = _kernels(backend)
    table = _check_float_array("table", table, 2, kern)
    idx = np.asarray(idx)
    if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
        raise TypeError(f"idx must be a 1-D integer array, got dtype {idx.dtype} shape {idx.shape}")
    return kern.embedding_forward(table, idx), (idx, int(table.shape[0]), kern)


def embedding_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """Backward of :func:`embedding_forward`: ``dtable[r] = sum_{n: idx[n] = r} dout[n]``, shape (R, D)."""
    idx, rows, kern = cache
    return kern.embedding_backward(kern.asarray(dout), idx, rows)


# --------------------------------------------------------------------------------------------
# timestep embedding, loss
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _sinusoid_freqs(half: int, max_period: float) -> np.ndarray:
    """``f_k = max_period ** (-k / half)``, k = 0 .. half-1 (float64, read-only; cached per shape)."""
    f = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
    f.flags.writeable = False
    return f


def timestep_embedding(t, dim: int, max_period: float = 10000.0, dtype=np.float64) -> np.ndarray:
    """Sinusoidal timestep embedding (Transformer positional encoding, Vaswani et al. 2017, sec. 3.5).

    Parameters
    ----------
    t : array_like, shape (N,), ints (or reals) >= 0
    dim : int, even, >= 2
    max_period : float > 1
    dtype : float32 or float64, dtype of the result (computed in float64, then cast)

    Returns
    -------
    emb : ndarray, shape (N, dim), ``emb[:, :dim/2] = sin(t * f)``, ``emb[:, dim/2:] = cos(t * f)``

    Notes
    -----
    ``f_k = max_period ** (-k / (dim/2))`` for ``k = 0 .. dim/2 - 1``, i.e. the frequencies of
    ``PE(pos, 2k) = sin(pos / 10000^(2k/d))``, with the sines and cosines in two halves
    (as in Ho et al. 2020's DDPM U-Net). No parameters, and no gradient w.r.t. ``t`` is needed.
    """
    dim = _check_int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    if not (np.isfinite(max_period) and max_period > 1):
        raise ValueError(f"max_period must be a finite number > 1, got {max_period}")
    t = np.asarray(t)
    kind = t.dtype.kind  # "b" (bool), "i"/"u" (integers), "f" (reals), ...
    if kind not in "iuf":
        raise TypeError(f"t must hold integers (or reals), got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"t must be 1-D (N,), got shape {t.shape}")
    t64 = t.astype(np.float64)
    # min/max instead of elementwise masks: this runs once per U-Net pass (~10 us less at batch 1)
    if t64.size and not (t64.min() >= 0 and (kind != "f" or np.isfinite(t64.max()))):
        raise ValueError(f"t must be finite and >= 0, got min {t64.min()}, max {t64.max()}")
    half = dim // 2
    args = t64[:, None] * _sinusoid_freqs(half, float(max_period))[None, :]
    emb = np.empty((t64.shape[0], dim), np.float64)
    np.sin(args, out=emb[:, :half])
    np.cos(args, out=emb[:, half:])
    return emb.astype(dtype, copy=False)


def mse_loss(pred: np.ndarray, target: np.ndarray, *,
             backend: str | ModuleType = "numpy") -> tuple[float, np.ndarray]:
    """Mean squared error and its gradient.

    Parameters
    ----------
    pred : ndarray, any shape, float32 or float64
    target : ndarray, shape of ``pred`` (cast to its dtype)
    backend : {"numpy", "cpu", "cuda"}

    Returns
    -------
    loss : float, ``mean((pred - target)**2)`` (accumulated in float64)
    dpred : ndarray, shape and dtype of ``pred``, ``2 * (pred - target) / pred.size``

    Notes
    -----
    The simplified DDPM objective, Ho et al. 2020 eq. (14), is this loss with
    ``pred = eps_theta(x_t, t)`` and ``target = eps``.
    """
    kern = _kernels(backend)
    pred = _check_float_array("pred", pred, None, kern)
    if not (isinstance(target, np.ndarray) or kern.is_array(target)):
        target = np.asarray(target)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if pred.size == 0:
        raise ValueError("pred must not be empty")
    return kern.mse_loss(pred, kern.asarray(target, pred.dtype))
