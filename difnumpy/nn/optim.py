"""Optimizers and training utilities on plain dicts of arrays.

- :class:`Adam` / :class:`AdamW`: bias-corrected Adam (Kingma & Ba 2015, arXiv 1412.6980, Algorithm 1),
  AdamW with decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2).
  The element-wise update runs in the kernel backend's ``adam_update`` (NumPy twin or Numba kernel).
- :func:`clip_grad_norm`: clipping by the global L2 norm over all gradient arrays (Pascanu et al. 2013).
- :class:`EMA`: exponential moving average of the parameters (as used for sampling in DDPM, Ho et al. 2020,
  Appendix B: decay 0.9999).
- :func:`lr_at` / :func:`warmup_schedule`: linear learning-rate warmup, then constant.

Parameters are a ``dict[str, array]`` (the model's ``.params``) and are updated **in place** by the
kernels of a backend (:mod:`difnumpy.kernels.api`): NumPy arrays on "numpy" and "cpu", device arrays on
"cuda", where the moments and the EMA stay on the device too. Optimizer state (first/second moments,
step count) is plain arrays and ints: ``state_dict()`` gives NumPy copies, so it can be saved to an
``.npz`` without pickle (see :mod:`difnumpy.checkpoint`).
"""
from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Callable, Mapping

import numpy as np

from difnumpy.kernels import backend_name, get_backend

__all__ = ["Adam", "AdamW", "EMA", "clip_grad_norm", "global_norm", "lr_at", "warmup_schedule"]


def _check_float(value, name: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return x


def _check_int(value, name: str, *, lo: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return int(value)


def _is_array(a, kern: ModuleType) -> bool:
    return isinstance(a, np.ndarray) or kern.is_array(a)


def _check_params(params, kern: ModuleType, name: str = "params") -> dict:
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict of str -> ndarray, got {type(params).__name__}")
    if len(params) == 0:
        raise ValueError(f"{name} must not be empty")
    for k, p in params.items():
        if not isinstance(k, str):
            raise TypeError(f"{name} keys must be str, got {type(k).__name__}")
        if not kern.is_array(p):
            raise TypeError(f"{name}[{k!r}] must be a native array of backend {backend_name(kern)!r} "
                            f"(a numpy ndarray on the host backends), got {type(p).__name__}")
        if np.dtype(p.dtype) not in (np.float32, np.float64):
            raise TypeError(f"{name}[{k!r}] must have dtype float32 or float64, got {p.dtype}")
        if isinstance(p, np.ndarray) and (not p.flags.c_contiguous or not p.flags.writeable):
            raise ValueError(f"{name}[{k!r}] must be a writeable C-contiguous array (it is updated in place)")
    return params


def _check_grads(grads, params, kern: ModuleType) -> None:
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a dict of str -> ndarray, got {type(grads).__name__}")
    missing = sorted(set(params) - set(grads))
    extra = sorted(set(grads) - set(params))
    if missing or extra:
        raise ValueError(f"grads must have exactly the keys of params; missing {missing[:5]}, unexpected {extra[:5]}")
    for k, p in params.items():
        g = grads[k]
        if not _is_array(g, kern):
            raise TypeError(f"grads[{k!r}] must be a numpy ndarray, got {type(g).__name__}")
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"grads[{k!r}] must have the shape of params[{k!r}] {tuple(p.shape)}, "
                             f"got {tuple(g.shape)}")


def _host_copy(kern: ModuleType, a) -> np.ndarray:
    """A NumPy copy of a native array (one copy, also on the host backends)."""
    h = kern.to_host(a)
    return h.copy() if h is a else h


# --------------------------------------------------------------------------------------------------
# Adam / AdamW
# --------------------------------------------------------------------------------------------------

class Adam:
    """Bias-corrected Adam on a dict of arrays, updated in place.

    Parameters
    ----------
    params : dict[str, ndarray], float32 or float64, C-contiguous
        The model's parameters (e.g. ``model.params``). The arrays are updated in place by :meth:`step`.
    lr : float, default 1e-3
        Learning rate :math:`\\eta` (may be changed between steps through the ``lr`` attribute).
    betas : (float, float), default (0.9, 0.999)
        Decay rates :math:`(\\beta_1, \\beta_2)` of the first and second moment estimates, in [0, 1).
    eps : float, default 1e-8
        :math:`\\epsilon` added to the denominator.
    weight_decay : float, default 0.0
        L2 penalty :math:`\\lambda` added to the gradient (``g + lambda * theta``, classic Adam).
        Use :class:`AdamW` for decoupled weight decay.
    backend : {"cpu", "numpy", "cuda"}, default "cpu"
        Kernel backend whose ``adam_update`` performs the element-wise update; ``params`` must be its
        native arrays (device arrays on "cuda").

    Attributes
    ----------
    m, v : dict[str, array]
        First and second moment estimates (same keys, shapes and dtypes as ``params``; native arrays).
    step_count : int
        Number of steps taken.

    Notes
    -----
    Kingma & Ba 2015 (arXiv 1412.6980), Algorithm 1, for step :math:`t = 1, 2, \\dots`:
    :math:`m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t`, :math:`v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2`,
    :math:`\\theta_t = \\theta_{t-1} - \\eta\\, \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)` with
    :math:`\\hat m_t = m_t / (1-\\beta_1^t)`, :math:`\\hat v_t = v_t / (1-\\beta_2^t)`.
    """

    decoupled = False

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, backend: str = "cpu"):
        self.lr = _check_float(lr, "lr", lo=0.0)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self.betas = (_check_float(b1, "betas[0]", lo=0.0, hi=1.0, hi_open=True),
                      _check_float(b2, "betas[1]", lo=0.0, hi=1.0, hi_open=True))
        self.eps = _check_float(eps, "eps", lo=0.0)
        self.weight_decay = _check_float(weight_decay, "weight_decay", lo=0.0)
        self._kernels = get_backend(backend)
        self.backend = backend_name(self._kernels)
        self.params = _check_params(params, self._kernels)
        self.m = {k: self._kernels.zeros(tuple(p.shape), p.dtype) for k, p in self.params.items()}
        self.v = {k: self._kernels.zeros(tuple(p.shape), p.dtype) for k, p in self.params.items()}
        self.step_count = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, backend={self.backend!r}, step_count={self.step_count})")

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Apply one update with ``grads`` (same keys and shapes as ``params``), in place.

        Gradients of another float dtype are cast to the parameter's dtype; ``grads`` is not modified.
        """
        kern = self._kernels
        _check_grads(grads, self.params, kern)
        self.lr = _check_float(self.lr, "lr", lo=0.0)
        t = self.step_count + 1
        b1, b2 = self.betas
        decoupled_wd = self.weight_decay if self.decoupled else 0.0
        gs = []
        for k, p in self.params.items():
            g = kern.asarray(grads[k], p.dtype)
            if self.weight_decay != 0.0 and not self.decoupled:
                g = kern.axpy_(kern.copy(g), p, self.weight_decay)  # L2 penalty g + wd p (a new array)
            gs.append(g)
        many = getattr(kern, "adam_update_many", None)  # one call for all arrays (the same bits), if the backend has it
        if many is not None:
            many(list(self.params.values()), gs, list(self.m.values()), list(self.v.values()), self.lr, b1, b2,
                 self.eps, decoupled_wd, t)
        else:
            for (k, p), g in zip(self.params.items(), gs):
                kern.adam_update(p, g, self.m[k], self.v[k], self.lr, b1, b2, self.eps, decoupled_wd, t)
        self.step_count = t

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer state as a flat dict of NumPy arrays and scalars (copies, also on "cuda").

        Keys: ``"step"`` (int), ``"lr"``, ``"beta1"``, ``"beta2"``, ``"eps"``, ``"weight_decay"`` (float),
        ``"m/<key>"`` and ``"v/<key>"`` (ndarray) for every parameter key.
        """
        d: dict = {"step": int(self.step_count), "lr": float(self.lr), "beta1": self.betas[0],
                   "beta2": self.betas[1], "eps": self.eps, "weight_decay": self.weight_decay}
        for k in self.params:
            d[f"m/{k}"] = _host_copy(self._kernels, self.m[k])
            d[f"v/{k}"] = _host_copy(self._kernels, self.v[k])
        return d

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the state from :meth:`state_dict` output (values are copied in place).

        Raises
        ------
        ValueError
            If keys are missing or unexpected, or an array's shape does not match its parameter.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        scalar_keys = ("step", "lr", "beta1", "beta2", "eps", "weight_decay")
        expected = set(scalar_keys) | {f"m/{k}" for k in self.params} | {f"v/{k}" for k in self.params}
        missing = sorted(expected - set(state))
        extra = sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"optimizer state does not match the parameters: missing keys {missing[:5]}, "
                             f"unexpected keys {extra[:5]}")
        for k, p in self.params.items():
            for prefix in ("m", "v"):
                a = np.asarray(state[f"{prefix}/{k}"])
                if a.shape != tuple(p.shape):
                    raise ValueError(f"optimizer state {prefix}/{k} has shape {a.shape}, "
                                     f"parameter {k!r} has shape {tuple(p.shape)}")
                if not np.issubdtype(a.dtype, np.floating):
                    raise ValueError(f"optimizer state {prefix}/{k} must be a float array, got dtype {a.dtype}")
        step = _check_int(np.asarray(state["step"]).item(), "state['step']")
        lr = _check_float(np.asarray(state["lr"]).item(), "state['lr']", lo=0.0)
        b1 = _check_float(np.asarray(state["beta1"]).item(), "state['beta1']", lo=0.0, hi=1.0, hi_open=True)
        b2 = _check_float(np.asarray(state["beta2"]).item(), "state['beta2']", lo=0.0, hi=1.0, hi_open=True)
        eps = _check_float(np.asarray(state["eps"]).item(), "state['eps']", lo=0.0)
        wd = _check_float(np.asarray(state["weight_decay"]).item(), "state['weight_decay']", lo=0.0)
        for k in self.params:
            self._kernels.copy_into(self.m[k], np.asarray(state[f"m/{k}"], dtype=self.m[k].dtype))
            self._kernels.copy_into(self.v[k], np.asarray(state[f"v/{k}"], dtype=self.v[k].dtype))
        self.step_count, self.lr, self.betas, self.eps, self.weight_decay = step, lr, (b1, b2), eps, wd


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2).

    Same arguments as :class:`Adam`, but ``weight_decay`` (default 0.01) is applied directly to the
    parameters, :math:`\\theta \\leftarrow \\theta - \\eta\\lambda\\theta`, before the Adam step, instead
    of being added to the gradient.
    """

    decoupled = True

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, backend: str = "cpu"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend)


# --------------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------------

def global_norm(arrays: Mapping[str, np.ndarray], *, backend: str | ModuleType = "numpy") -> float:
    """Global L2 norm :math:`\\sqrt{\\sum_k \\lVert a_k \\rVert_2^2}` over all arrays, accumulated in float64
    (each array's sum of squares by the backend's ``sumsq``, in the dict's order)."""
    kern = get_backend(backend)
    total = 0.0
    for k, a in arrays.items():
        if not _is_array(a, kern):
            raise TypeError(f"grads[{k!r}] must be a numpy ndarray, got {type(a).__name__}")
        total += kern.sumsq(kern.asarray(a))
    return math.sqrt(total)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float | None, *,
                   backend: str | ModuleType = "numpy") -> float:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    Parameters
    ----------
    grads : dict[str, ndarray], float32 or float64
        Gradients, modified in place.
    max_norm : float > 0, or None
        Largest allowed global norm. ``None`` (or ``inf``) only measures the norm.
    backend : {"numpy", "cpu", "cuda"}, the kernels (and native arrays) of ``grads``

    Returns
    -------
    float
        The global norm **before** clipping. If it is not finite (NaN/inf gradients) the gradients are
        left untouched and the non-finite value is returned, for the caller to act on.

    Notes
    -----
    Pascanu, Mikolov, Bengio 2013 (arXiv 1211.5063), Algorithm 1:
    :math:`g \\leftarrow g \\cdot \\min(1, c / (\\lVert g \\rVert + 10^{-6}))` with
    :math:`\\lVert g \\rVert^2 = \\sum_k \\lVert g_k \\rVert_2^2` over all arrays.
    """
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a dict of str -> ndarray, got {type(grads).__name__}")
    if max_norm is not None:
        if isinstance(max_norm, (bool, np.bool_)) or not isinstance(max_norm, (numbers.Real, np.floating, np.integer)):
            raise TypeError(f"max_norm must be a positive number or None, got {type(max_norm).__name__}")
        max_norm = float(max_norm)
        if math.isnan(max_norm) or max_norm <= 0.0:
            raise ValueError(f"max_norm must be > 0 (or None / inf for no clipping), got {max_norm!r}")
        if math.isinf(max_norm):
            max_norm = None
    kern = get_backend(backend)
    total = global_norm(grads, backend=kern)
    if max_norm is None or not math.isfinite(total) or total <= max_norm:
        return total
    scale = max_norm / (total + 1e-6)
    for a in grads.values():
        kern.scale_(a, scale)
    return total


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------

def ema_decay_at(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The EMA decay of update number ``num_updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``
    with warm-up, else ``decay``."""
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class EMA:
    """Exponential moving average of parameters: :math:`\\bar\\theta \\leftarrow d\\,\\bar\\theta + (1-d)\\,\\theta`.

    Parameters
    ----------
    params : dict[str, ndarray], float32 or float64
        Parameters to track; the EMA starts as a copy of them (``copy=True``) or, with ``copy=False``,
        uses these arrays themselves as its storage (updated in place, e.g. the params of an EMA model).
    decay : float in [0, 1], default 0.999
        Decay :math:`d` (DDPM used 0.9999, Ho et al. 2020, Appendix B).
    copy : bool, default True
    warmup : bool, default True
        Use ``d_n = min(decay, (1 + n) / (10 + n))`` at the n-th update (n = 0, 1, ...), as diffusers'
        ``EMAModel`` does: early on the average forgets the random initialisation quickly instead of
        holding ``decay ** n`` of it (0.999 ** 400 = 0.67 after 400 steps without warm-up).
    backend : {"numpy", "cpu", "cuda"}, default "numpy"
        The kernels of the update (``ema_update``); ``params`` are its native arrays.

    Attributes
    ----------
    params : dict[str, array]
        The EMA arrays (same keys, shapes and dtypes as the tracked parameters; native arrays).
    num_updates : int
    """

    def __init__(self, params: Mapping[str, np.ndarray], decay: float = 0.999, copy: bool = True,
                 warmup: bool = True, backend: str | ModuleType = "numpy"):
        self.decay = _check_float(decay, "decay", lo=0.0, hi=1.0)
        self.warmup = bool(warmup)
        self._kernels = kern = get_backend(backend)
        if copy:
            if not isinstance(params, Mapping):
                raise TypeError(f"params must be a dict of str -> ndarray, got {type(params).__name__}")
            for k, p in params.items():
                if not _is_array(p, kern) or np.dtype(p.dtype) not in (np.float32, np.float64):
                    raise TypeError(f"params[{k!r}] must be a float32/float64 ndarray")
            self.params = {k: kern.copy(kern.asarray(p)) for k, p in params.items()}
        else:
            self.params = _check_params(params, kern)  # the caller's dict itself, updated in place
        self.num_updates = 0

    def update(self, params: Mapping[str, np.ndarray]) -> None:
        """One EMA step towards ``params`` (same keys and shapes), in place on :attr:`params`."""
        if not isinstance(params, Mapping) or set(params) != set(self.params):
            raise ValueError("params must be a dict with exactly the keys the EMA tracks")
        d = self.current_decay()
        for k, e in self.params.items():
            p = params[k]
            if tuple(p.shape) != tuple(e.shape):
                raise ValueError(f"params[{k!r}] has shape {tuple(p.shape)}, the EMA holds {tuple(e.shape)}")
            self._kernels.ema_update(e, self._kernels.asarray(p, e.dtype), d)
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return ema_decay_at(self.decay, self.num_updates, self.warmup)

    def copy_to(self, params: Mapping[str, np.ndarray]) -> None:
        """Copy the EMA values into ``params`` (in place)."""
        for k, e in self.params.items():
            if isinstance(params[k], np.ndarray):
                params[k][...] = self._kernels.to_host(e)
            else:
                self._kernels.copy_into(params[k], e)

    def state_dict(self) -> dict:
        """``decay``, ``num_updates`` and ``params/<key>`` (NumPy copies, also on "cuda")."""
        d: dict = {"decay": self.decay, "num_updates": self.num_updates}
        d.update({f"params/{k}": _host_copy(self._kernels, e) for k, e in self.params.items()})
        return d

    def load_state_dict(self, state: Mapping) -> None:
        expected = {"decay", "num_updates"} | {f"params/{k}" for k in self.params}
        if set(state) != expected:
            raise ValueError(f"EMA state does not match: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        for k, e in self.params.items():
            a = np.asarray(state[f"params/{k}"])
            if a.shape != tuple(e.shape):
                raise ValueError(f"EMA state params/{k} has shape {a.shape}, expected {tuple(e.shape)}")
        self.decay = _check_float(np.asarray(state["decay"]).item(), "state['decay']", lo=0.0, hi=1.0)
        self.num_updates = _check_int(np.asarray(state["num_updates"]).item(), "state['num_updates']")
        for k, e in self.params.items():
            self._kernels.copy_into(e, np.asarray(state[f"params/{k}"], dtype=e.dtype))


# --------------------------------------------------------------------------------------------------
# Learning-rate warmup
# --------------------------------------------------------------------------------------------------

def lr_at(step: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate for the ``step``-th update (1-based): linear warmup over ``warmup_steps``, then constant.

    ``lr = base_lr * min(1, step / warmup_steps)`` (``base_lr`` when ``warmup_steps == 0``); so the
    first update uses ``base_lr / warmup_steps`` and update ``warmup_steps`` reaches ``base_lr``.
    ``step=0`` (before any update) gives 0 during warmup.
    """
    step = _check_int(step, "step", lo=0)
    base_lr = _check_float(base_lr, "base_lr", lo=0.0)
    warmup_steps = _check_int(warmup_steps, "warmup_steps", lo=0)
    if warmup_steps == 0 or step >= warmup_steps:
        return base_lr
    return base_lr * step / warmup_steps


def warmup_schedule(base_lr: float, warmup_steps: int = 0) -> Callable[[int], float]:
    """Return ``lr_at(step)``: the function :func:`lr_at` with ``base_lr`` and ``warmup_steps`` bound."""
    base_lr = _check_float(base_lr, "base_lr", lo=0.0)
    warmup_steps = _check_int(warmup_steps, "warmup_steps", lo=0)

    def schedule(step: int) -> float:
        return lr_at(step, base_lr, warmup_steps)

    schedule.base_lr = base_lr  # type: ignore[attr-defined]
    schedule.warmup_steps = warmup_steps  # type: ignore[attr-defined]
    return schedule
