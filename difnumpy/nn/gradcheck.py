"""Numerical gradients by central differences, for checking hand-written backward passes.

In the style of cs231n's ``gradient_check.py``: perturb one coordinate of an input by ``+-h``,
re-evaluate, and take ``(f(x + h) - f(x - h)) / (2h)``, an O(h^2)-accurate derivative.
Run these checks in float64 (ARCHITECTURE.md, convention 7): with ``h = 1e-5`` the truncation error is
about ``h^2 |f'''|`` and the rounding error about ``1e-16 |f| / h``, both ~1e-10, so a correct
backward agrees to a relative error well below 1e-6 while a wrong one is off by O(1).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

__all__ = [
    "rel_error",
    "eval_numerical_gradient",
    "eval_numerical_gradient_array",
    "eval_numerical_gradient_at",
]


def rel_error(x, y, floor: float = 1e-12) -> float:
    """Relative error between two arrays, measured on the scale of the arrays as a whole.

    Parameters
    ----------
    x, y : array_like, same shape
    floor : float, lower bound on the denominator (two all-zero arrays give 0.0, not NaN)

    Returns
    -------
    float
        ``max |x - y| / max(max |x| + max |y|, floor)``.

    Notes
    -----
    cs231n's ``max(|x - y| / (|x| + |y|))`` is taken element by element, which is dominated by
    coordinates whose true gradient is ~0 (where any difference scheme has only absolute
    accuracy). This version divides by the arrays' scale instead, so a correct gradient scores
    ~1e-10 and a wrong one O(1).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.size == 0:
        return 0.0
    num = float(np.max(np.abs(x - y)))
    den = max(float(np.max(np.abs(x))) + float(np.max(np.abs(y))), floor)
    return num / den


def _check_x(x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise TypeError("x must be a float64 numpy.ndarray (numerical gradients need float64), "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    if not x.flags.writeable:
        raise ValueError("x must be writeable (it is perturbed in place and restored)")
    return x


def eval_numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Numerical gradient of a scalar function at ``x`` (every coordinate).

    Parameters
    ----------
    f : callable, ``f(x) -> float``; it must read ``x`` (which is perturbed in place, then restored)
    x : ndarray, float64, any shape
    h : float, step

    Returns
    -------
    grad : ndarray, shape of ``x``, float64
    """
    return eval_numerical_gradient_at(f, x, np.ndindex(x.shape), h=h, _full=True)


def eval_numerical_gradient_at(f: Callable[[np.ndarray], float], x: np.ndarray, indices: Iterable,
                               h: float = 1e-5, _full: bool = False) -> np.ndarray:
    """Numerical partial derivatives of a scalar ``f`` at ``x`` for chosen coordinates only.

    Parameters
    ----------
    f : callable, ``f(x) -> float``
    x : ndarray, float64 (perturbed in place, then restored)
    indices : iterable of index tuples (or flat ints) into ``x``
    h : float, step

    Returns
    -------
    ndarray, float64: shape of ``x`` (full gradient) when called via
    :func:`eval_numerical_gradient`, else shape (len(indices),), one entry per index, in order.
    """
    x = _check_x(x)
    out = []
    grad = np.zeros_like(x) if _full else None
    for ix in indices:
        if isinstance(ix, (int, np.integer)):
            ix = np.unravel_index(int(ix), x.shape)
        old = x[ix]
        x[ix] = old + h
        fp = float(f(x))
        x[ix] = old - h
        fm = float(f(x))
        x[ix] = old
        d = (fp - fm) / (2.0 * h)
        if _full:
            grad[ix] = d
        else:
            out.append(d)
    return grad if _full else np.asarray(out, dtype=np.float64)


def eval_numerical_gradient_array(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, df: np.ndarray,
                                  h: float = 1e-5) -> np.ndarray:
    """Numerical gradient of ``sum(f(x) * df)`` at ``x``: the vector-Jacobian product ``J^T df``.

    Parameters
    ----------
    f : callable, ``f(x) -> ndarray`` of the shape of ``df``
    x : ndarray, float64 (perturbed in place, then restored)
    df : ndarray, the upstream gradient
    h : float, step

    Returns
    -------
    grad : ndarray, shape of ``x``, float64
    """
    df = np.asarray(df, dtype=np.float64)
    return eval_numerical_gradient(lambda z: float(np.sum(np.asarray(f(z), dtype=np.float64) * df)), x, h=h)
