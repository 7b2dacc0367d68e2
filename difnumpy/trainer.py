"""Training a noise-prediction network: the DDPM loss and a small trainer (Adam, clipping, warmup, EMA).

The loss is DDPM's simplified objective (Ho et al. 2020, eq. 14, Algorithm 1): draw ``t ~ U{0, ..., T-1}``
and ``eps ~ N(0, I)``, form ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (eq. 4) and regress the
network output onto the target with a mean squared error. The target is ``eps`` ("epsilon"), ``x0``
("sample") or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` ("v_prediction", Salimans & Ho 2022, Sec. 4).

A model is anything with the U-Net's training API (:class:`difnumpy.nn.unet.UNet`): ``.params``
(dict of arrays), ``.forward(x, t) -> (out, cache)``, ``.backward(dout, cache) -> grads`` (dict with the
params' keys), ``.config`` (a dict such that ``type(model)(**config)`` rebuilds it) and ``__call__``.

One step, written once for every backend: the arrays (batch, noise, parameters, gradients, Adam's
moments, the EMA) are the backend's native arrays and every operation is a call of the backend API
(:mod:`difnumpy.kernels.api`), so on "cuda" the whole step runs on the device; ``t`` and ``eps`` are
drawn on the host from the trainer's rng on every backend (the same draws, so the backends agree).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from difnumpy._validation import PREDICTION_TYPES, as_generator, check_choice
from difnumpy.distributed import SINGLE, GradientAllreduce, World
from difnumpy.kernels import BACKENDS, check_backend, get_backend
from difnumpy.nn.optim import EMA, Adam, AdamW, clip_grad_norm, lr_at
from difnumpy.schedules import Schedule

__all__ = ["PREDICTION_TYPES", "OPTIMIZERS", "DivergenceError", "loss_and_grads", "Trainer"]

#: Allowed optimizer names of :class:`Trainer`.
OPTIMIZERS = ("adam", "adamw")


class DivergenceError(FloatingPointError):
    """Raised by :meth:`Trainer.step` when the loss or the gradient norm is not finite.

    The step is refused: parameters, optimizer state, EMA and step count are left as they were.
    """


def _model_params(model) -> dict:
    params = getattr(model, "params", None)
    if not isinstance(params, dict) or not params:
        raise TypeError(f"model must have a non-empty .params dict of arrays, got {type(model).__name__}")
    return params


def _model_dtype(model) -> np.dtype:
    return np.dtype(next(iter(_model_params(model).values())).dtype)


def _model_backend(model) -> str:
    """The backend whose native arrays the model's params are ("cpu" for models that do not say)."""
    backend = getattr(model, "backend", None)
    if backend is None:
        backend = (getattr(model, "config", None) or {}).get("backend", "cpu")
    return backend if backend in BACKENDS else "cpu"


def _check_x0(x0, name: str = "x0") -> np.ndarray:
    if not isinstance(x0, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(x0).__name__}")
    if not np.issubdtype(x0.dtype, np.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x0.dtype}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1 and at least 2 dims, got {x0.shape}")
    if not np.all(np.isfinite(x0)):
        raise ValueError(f"{name} contains NaN or inf")
    return x0


def drop_labels(class_labels: np.ndarray, num_classes: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Replace each label by K (= ``num_classes``, "no class") with probability ``p`` (one uniform draw
    per sample from ``rng``): the label dropout of classifier-free guidance (Ho & Salimans 2022, Alg. 1)."""
    if p <= 0.0:
        return class_labels
    return np.where(rng.random(class_labels.shape[0]) < p, num_classes, class_labels).astype(np.int64)


def loss_and_grads(model, schedule: Schedule, x0: np.ndarray, rng: np.random.Generator,
                   prediction_type: str = "epsilon", class_labels=None,
                   label_dropout: float = 0.0, part: tuple[int, int] | None = None) -> tuple[float, dict]:
    """The simplified DDPM loss on a batch and its gradients with respect to ``model.params``.

    Parameters
    ----------
    model : UNet-like
        ``.forward(x, t) -> (out, cache)`` and ``.backward(dout, cache) -> grads``.
    schedule : Schedule
    x0 : ndarray, shape (N, C, H, W) (any (N, ...) the model takes), float
        Clean batch; cast to the model's parameter dtype.
    rng : numpy.random.Generator
        Draws ``t`` (``rng.integers(0, T, size=N)``) then ``eps`` (``rng.standard_normal(x0.shape, dtype)``),
        in that order.
    prediction_type : {"epsilon", "sample", "v_prediction"}
        Regression target: ``eps``, ``x0`` or ``v``.
    class_labels : int array (N,) in [0, K], optional
        For a class-conditional model (``model.num_classes = K``); each is replaced by K with probability
        ``label_dropout``, drawn from ``rng`` after ``t`` and ``eps`` (:func:`drop_labels`).
    label_dropout : float in [0, 1]
    part : (start, stop), optional
        Data parallelism: every draw is made for the whole batch (so each rank's stream is a one-process
        run's), then only images ``start:stop`` go through the model; the loss and gradients are those of
        the mean over that slice (:class:`difnumpy.distributed.GradientAllreduce` combines the ranks').

    Returns
    -------
    loss : float
        ``mean((model(x_t, t) - target)**2)`` over all elements, accumulated in float64.
    grads : dict[str, ndarray]
        Gradient of ``loss`` for every parameter (keys and shapes of ``model.params``).

    Notes
    -----
    Ho et al. 2020, Algorithm 1 and eq. 14:
    :math:`L = \\mathbb{E}_{t, x_0, \\epsilon} \\lVert \\epsilon - \\epsilon_\\theta(\\sqrt{\\bar\\alpha_t} x_0 +
    \\sqrt{1-\\bar\\alpha_t}\\epsilon, t) \\rVert^2`, with ``t`` uniform on {0, ..., T-1} (0-indexed).
    The gradient of the mean is ``dL/dout = 2 (out - target) / out.size``.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a difnumpy Schedule, got {type(schedule).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    kern = get_backend(_model_backend(model))
    dtype = _model_dtype(model)
    x0 = np.ascontiguousarray(_check_x0(x0), dtype=dtype)
    n = x0.shape[0]
    t = rng.integers(0, schedule.num_timesteps, size=n, dtype=np.int64)
    noise = rng.standard_normal(x0.shape, dtype=dtype)
    y = None
    if class_labels is not None:
        K = getattr(model, "num_classes", None)
        if K is None:
            raise ValueError("class_labels given, but the model is not class-conditional (num_classes is None)")
        y = np.asarray(class_labels)
        if y.dtype == bool or not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
            raise ValueError(f"class_labels must be an int array of shape ({n},), got {y.dtype} {y.shape}")
        if y.min() < 0 or y.max() > K:
            raise ValueError(f"class_labels must lie in [0, {K}], got values in [{int(y.min())}, {int(y.max())}]")
        y = drop_labels(y.astype(np.int64), K, label_dropout, rng)
    if part is not None:  # this rank's slice of the global batch (every draw above was for all of it)
        a, b = part
        x0, t, noise = x0[a:b], t[a:b], noise[a:b]
        y = None if y is None else y[a:b]
        n = b - a
    sab, s1m = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    d_x0, d_eps = kern.asarray(x0.reshape(n, -1)), kern.asarray(noise.reshape(n, -1))
    x_t = kern.q_sample(d_x0, d_eps, sab, s1m).reshape(x0.shape)  # DDPM eq. 4
    if prediction_type == "epsilon":
        target = d_eps
    elif prediction_type == "sample":
        target = d_x0
    else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0: q_sample's a x0 + b eps with (a, b) = (-s1m, sab)
        target = kern.q_sample(d_x0, d_eps, -s1m, sab)
    out, cache = model.forward(x_t, t) if y is None else model.forward(x_t, t, class_labels=y)
    if tuple(getattr(out, "shape", ())) != x0.shape:
        raise ValueError(f"model output must have the shape of x0 {x0.shape}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    loss, dout = kern.mse_loss(out, target.reshape(x0.shape))
    grads = model.backward(dout, cache)
    return loss, grads


def _clone_model(model):
    """A new model of the same class and config whose params are copies of ``model.params``."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"model must have a .config dict (type(model)(**config) rebuilds it), "
                        f"got {type(model).__name__}")
    clone = type(model)(**config)
    src, dst = _model_params(model), _model_params(clone)
    if set(src) != set(dst):
        raise ValueError("type(model)(**model.config) does not rebuild the same parameter keys")
    kern = get_backend(_model_backend(model))
    for k, p in src.items():
        if tuple(dst[k].shape) != tuple(p.shape) or dst[k].dtype != p.dtype:
            raise ValueError(f"type(model)(**model.config) rebuilds params[{k!r}] as {tuple(dst[k].shape)} "
                             f"{dst[k].dtype}, the model has {tuple(p.shape)} {p.dtype}")
        kern.copy_into(dst[k], p)
    return clone


class Trainer:
    """Trains a model with the DDPM loss: Adam/AdamW, global-norm clipping, linear warmup and an EMA.

    Parameters
    ----------
    model : UNet-like
        Trained in place (its ``.params`` arrays are updated; with ``backend="cuda"`` on the device, see Notes).
    schedule : Schedule
    lr : float, default 2e-4
        Base learning rate (DDPM used 2e-4 for CIFAR10, Ho et al. 2020, Appendix B).
    ema_decay : float in [0, 1], default 0.999
    rng : numpy.random.Generator, int or None
        Source of timesteps and noise (an int seeds a new Generator; None: a fresh OS-seeded one).
    prediction_type : {"epsilon", "sample", "v_prediction"}, default "epsilon"
    weight_decay : float >= 0, default 0.0
        L2 penalty for ``optimizer="adam"``, decoupled decay for ``optimizer="adamw"``.
    grad_clip : float > 0 or None, default 1.0
        Global gradient-norm bound (None: no clipping).
    warmup_steps : int >= 0, default 0
        Linear learning-rate warmup length (:func:`difnumpy.nn.optim.lr_at`).
    world : difnumpy.distributed.World, optional
        Data parallelism over MPI ranks (:func:`difnumpy.distributed.get_world`): every rank draws the
        whole batch's t and eps, computes its slice of B/N images, and one Allreduce of all gradients
        makes the step identical on every rank (and equal to a one-process step up to float rounding).
        The default is one process.
    label_dropout : float in [0, 1], default 0.0
        Probability of replacing each class label by "no class" (K) in a step: trains the conditional
        and the unconditional model at once, for classifier-free guidance (Ho & Salimans 2022, Sec. 3.2).
    optimizer : {"adam", "adamw"}, default "adam"
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    backend : {"numpy", "cpu", "cuda"} or None
        By default the model's ``backend`` (else "cpu"). Another name moves the model there first
        (``model.backend = backend``; a model without a settable backend raises TypeError). The step
        runs on that backend's kernels and arrays: with "cuda" the parameters, gradients, Adam's
        moments and the EMA stay on the GPU; without a usable GPU (or the CUDA simulator) a
        RuntimeError says why.

    Attributes
    ----------
    model, schedule, rng
    ema_model : model of the same class, holding the EMA parameters (usable as a sampler model).
    ema : :class:`difnumpy.nn.optim.EMA` whose arrays are ``ema_model.params``.
    optimizer : :class:`difnumpy.nn.optim.Adam` or :class:`~difnumpy.nn.optim.AdamW`.
    step_count : int
        Number of updates applied.
    last_loss, last_grad_norm, last_lr : float or None
        Figures of the last successful step (grad norm before clipping).

    Notes
    -----
    One step for every backend: the arrays live where the backend computes (device arrays on "cuda":
    ``model.params``, ``ema_model.params``, ``optimizer.m`` / ``.v``); a step copies up the batch and
    ``eps`` and copies down the loss and the gradient norm (two floats). NumPy copies of the state
    come from ``model.host_params()``, ``optimizer.state_dict()`` and ``ema.state_dict()``.
    Replacing a params dict (``model.set_params(...)``) is picked up at the next step.
    """

    def __init__(self, model, schedule: Schedule, lr: float = 2e-4, ema_decay: float = 0.999, rng=None,
                 prediction_type: str = "epsilon", weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                 warmup_steps: int = 0, optimizer: str = "adam", betas=(0.9, 0.999), eps: float = 1e-8,
                 backend: str | None = None, label_dropout: float = 0.0, world: World | None = None):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a difnumpy Schedule, got {type(schedule).__name__}")
        params = _model_params(model)
        for name in ("forward", "backward"):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"model must have a .{name} method, got {type(model).__name__}")
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
        self.optimizer_name = check_choice(optimizer, "optimizer", OPTIMIZERS)
        if grad_clip is not None:
            if isinstance(grad_clip, bool) or not isinstance(grad_clip, (numbers.Real, np.floating, np.integer)):
                raise TypeError(f"grad_clip must be a positive number or None, got {type(grad_clip).__name__}")
            if not float(grad_clip) > 0.0:
                raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
            grad_clip = float(grad_clip)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (numbers.Integral, np.integer)):
            raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if backend is not None and backend != _model_backend(model):
            check_backend(backend)
            if not isinstance(getattr(type(model), "backend", None), property) or \
                    getattr(type(model), "backend").fset is None:
                raise TypeError(f"backend={backend!r}: the model ({type(model).__name__}) cannot move to another "
                                f"backend (it has no settable .backend); train it with backend=None")
            model.backend = backend
            params = _model_params(model)
        self._model = model
        self.schedule = schedule
        self.rng = as_generator(rng)
        self.grad_clip = grad_clip
        self.warmup_steps = int(warmup_steps)
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, (numbers.Real, np.floating)) \
                or not 0.0 <= float(label_dropout) <= 1.0:
            raise ValueError(f"label_dropout must be a number in [0, 1], got {label_dropout!r}")
        self.label_dropout = float(label_dropout)
        if world is not None and not isinstance(world, World):
            raise TypeError(f"world must be a difnumpy.distributed.World or None, got {type(world).__name__}")
        self.world = world or SINGLE
        self._allreduce = GradientAllreduce(self.world)
        self.backend = _model_backend(model)
        self._kern = get_backend(self.backend)
        opt_cls = AdamW if self.optimizer_name == "adamw" else Adam
        self._optimizer = opt_cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  backend=self.backend)
        self.lr = self._optimizer.lr  # base learning rate (the optimizer's lr follows the warmup)
        self._ema_model = _clone_model(model)
        self._ema = EMA(self._ema_model.params, ema_decay, copy=False, backend=self.backend)
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self.last_lr: float | None = None

    @property
    def model(self):
        """The trained model."""
        return self._model

    @property
    def ema_model(self):
        """A model of the same class and backend holding the EMA parameters."""
        return self._ema_model

    @property
    def ema(self) -> EMA:
        """The :class:`~difnumpy.nn.optim.EMA` whose arrays are ``ema_model.params``."""
        return self._ema

    @property
    def optimizer(self) -> Adam:
        """The :class:`~difnumpy.nn.optim.Adam` / ``AdamW``."""
        return self._optimizer

    @property
    def step_count(self) -> int:
        """Number of updates applied so far."""
        return self._optimizer.step_count

    @property
    def ema_decay(self) -> float:
        return self._ema.decay

    def hparams(self) -> dict:
        """The constructor's hyperparameters as a JSON-able dict (``Trainer(model, schedule, rng=..., **hparams)``)."""
        opt = self._optimizer
        return {"lr": self.lr, "ema_decay": self._ema.decay, "prediction_type": self.prediction_type,
                "weight_decay": opt.weight_decay, "grad_clip": self.grad_clip,
                "warmup_steps": self.warmup_steps, "optimizer": self.optimizer_name,
                "betas": list(opt.betas), "eps": opt.eps, "backend": self.backend,
                "label_dropout": self.label_dropout}

    def __repr__(self) -> str:
        return (f"Trainer(step_count={self.step_count}, lr={self.lr}, optimizer={self.optimizer_name!r}, "
                f"prediction_type={self.prediction_type!r}, ema_decay={self._ema.decay}, "
                f"grad_clip={self.grad_clip}, warmup_steps={self.warmup_steps})")

    def sync_to_host(self) -> None:
        """Kept for code written against 0.1, where the cuda step kept host mirrors: a no-op now (the
        state lives in the backend's arrays; NumPy copies come from ``model.host_params()`` and the
        ``state_dict()`` methods)."""

    def sync_to_device(self) -> None:
        """A no-op, as :meth:`sync_to_host` (edit parameters with ``model.set_params``)."""

    def _sync_params(self) -> None:
        # A model may replace its params dict (e.g. UNet.set_params); follow it, same keys and shapes.
        for owner, holder, name in ((self._model, self._optimizer, "model"),
                                    (self._ema_model, self._ema, "ema_model")):
            new = _model_params(owner)
            if holder.params is new:
                continue
            old = holder.params
            if set(new) != set(old) or any(tuple(new[k].shape) != tuple(old[k].shape) or new[k].dtype != old[k].dtype
                                           for k in old):
                raise ValueError(f"{name}.params was replaced by arrays of other keys, shapes or dtypes")
            holder.params = new

    def step(self, x0_batch: np.ndarray, class_labels=None) -> float:
        """One training step on a clean batch; returns the loss (before the update).

        Order: lr from the warmup schedule; :func:`loss_and_grads` (draws t then eps from :attr:`rng`);
        clip the gradients to :attr:`grad_clip`; optimizer update; EMA update; on every backend.

        Parameters
        ----------
        x0_batch : ndarray, shape (N, C, H, W), float
            Clean batch (cast to the model's dtype).
        class_labels : int array (N,) in [0, K], optional
            The batch's classes, for a class-conditional model (dropped to K with ``label_dropout``).

        Raises
        ------
        DivergenceError (a FloatingPointError)
            If the loss or the gradient norm is NaN or inf. Nothing is updated then (the rng has advanced).
        """
        self._sync_params()
        lr = lr_at(self.step_count + 1, self.lr, self.warmup_steps)
        world = self.world
        part = None
        if world.size > 1:  # the one hook point of data parallelism (difnumpy.distributed)
            part = world.batch_slice(_check_x0(x0_batch).shape[0])
        loss, grads = loss_and_grads(self._model, self.schedule, x0_batch, self.rng, self.prediction_type,
                                     class_labels, self.label_dropout, part)
        # one Allreduce of gradients, loss and stop flag (World.stop_agreed); with one process it only passes them on
        n = x0_batch.shape[0]
        grads, loss = self._allreduce(grads, n if part is None else part[1] - part[0], n, self._kern, loss)
        if not math.isfinite(loss):
            raise DivergenceError(f"non-finite loss ({loss}) at step {self.step_count + 1}; "
                                  f"the update was not applied")
        norm = clip_grad_norm(grads, self.grad_clip, backend=self._kern)
        if not math.isfinite(norm):
            raise DivergenceError(f"non-finite gradient norm ({norm}) at step {self.step_count + 1}; "
                                  f"the update was not applied")
        self._optimizer.lr = lr
        self._optimizer.step(grads)
        self._ema.update(self._model.params)
        self.last_loss, self.last_grad_norm, self.last_lr = loss, norm, lr
        return loss
