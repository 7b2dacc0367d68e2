"""Training a noise-prediction network: the DDPM loss and a small trainer (Adam, clipping, warmup, EMA).

The loss is DDPM's simplified objective (Ho et al. 2020, eq. 14, Algorithm 1): draw ``t ~ U{0, ..., T-1}``
and ``eps ~ N(0, I)``, form ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (eq. 4) and regress the
network output onto the target with a mean squared error. The target is ``eps`` ("epsilon"), ``x0``
("sample") or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` ("v_prediction", Salimans & Ho 2022, Sec. 4).

A model is anything with the U-Net's training API (:class:`difnumpy.nn.unet.UNet`): ``.params``
(dict of arrays), ``.forward(x, t) -> (out, cache)``, ``.backward(dout, cache) -> grads`` (dict with the
params' keys), ``.config`` (a dict such that ``type(model)(**config)`` rebuilds it) and ``__call__``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from difnumpy._validation import as_generator, check_choice
from difnumpy.diffusion import get_velocity, q_sample
from difnumpy.kernels import BACKENDS, get_backend
from difnumpy.nn.optim import EMA, Adam, AdamW, clip_grad_norm, lr_at
from difnumpy.schedules import Schedule

__all__ = ["PREDICTION_TYPES", "OPTIMIZERS", "DivergenceError", "loss_and_grads", "Trainer"]

#: Allowed regression targets of the network.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
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
    return next(iter(_model_params(model).values())).dtype


def _model_backend(model) -> str:
    backend = getattr(model, "backend", None)
    if backend is None:
        backend = (getattr(model, "config", None) or {}).get("backend", "cpu")
    return backend


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


def loss_and_grads(model, schedule: Schedule, x0: np.ndarray, rng: np.random.Generator,
                   prediction_type: str = "epsilon") -> tuple[float, dict]:
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
    dtype = _model_dtype(model)
    x0 = np.ascontiguousarray(_check_x0(x0), dtype=dtype)
    n = x0.shape[0]
    t = rng.integers(0, schedule.num_timesteps, size=n, dtype=np.int64)
    noise = rng.standard_normal(x0.shape, dtype=dtype)
    backend = _model_backend(model)
    x_t = q_sample(schedule, x0, t, noise=noise, backend=backend if backend in BACKENDS else "cpu")
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = x0
    else:
        target = get_velocity(schedule, x0, noise, t)
    out, cache = model.forward(x_t, t)
    if not isinstance(out, np.ndarray) or out.shape != target.shape:
        raise ValueError(f"model output must have the shape of x0 {target.shape}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    diff = out - target.astype(out.dtype, copy=False)
    flat = diff.astype(np.float64, copy=False).reshape(-1)
    # einsum, not np.dot: a multi-threaded BLAS call here left OpenBLAS workers spinning into the next
    # step's U-Net pass (Trainer.step 1230 -> 2250 img/s at 8x8 without BLAS here, measured)
    loss = float(np.einsum("i,i->", flat, flat)) / flat.size
    dout = diff * np.asarray(2.0 / diff.size, dtype=diff.dtype)
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
    for k, p in src.items():
        if dst[k].shape != p.shape or dst[k].dtype != p.dtype:
            raise ValueError(f"type(model)(**model.config) rebuilds params[{k!r}] as {dst[k].shape} "
                             f"{dst[k].dtype}, the model has {p.shape} {p.dtype}")
        dst[k][...] = p
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
    optimizer : {"adam", "adamw"}, default "adam"
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    backend : {"numpy", "cpu", "cuda"} or None
        By default the model's ``backend`` (else "cpu"). "numpy" / "cpu": the step runs on the host with
        that backend's optimizer kernels (the model's forward/backward use the model's own backend).
        "cuda": the whole step runs on the GPU (:class:`difnumpy.kernels.cuda.DeviceTrainStep`, the
        model must be a :class:`difnumpy.nn.unet.UNet`); without a usable GPU (or the CUDA simulator) a
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
    Host and device state with ``backend="cuda"``: the parameters, Adam's moments and the EMA stay on
    the device between steps; a step copies up the batch, ``eps`` and what depends on ``t`` (drawn on
    the host from :attr:`rng`, as on the CPU) and copies down the loss and the gradient norm. The host
    arrays (``model.params``, ``ema_model.params`` = ``ema.params``, ``optimizer.m`` / ``.v``) are copies
    refreshed lazily: reading :attr:`model`, :attr:`ema_model`, :attr:`ema` or :attr:`optimizer` through
    the trainer, or calling :meth:`sync_to_host` (as :func:`difnumpy.checkpoint.save_checkpoint` does),
    first downloads the device state if a step ran since the last download. The arrays are refreshed in
    place, so a reference to the model or its params kept outside the trainer is current after any of
    these calls, and stale before. Scalars (``step_count``, ``optimizer.lr``, ``ema.num_updates``,
    ``last_*``) are host values and always current.

    Host to device: replacing a params dict (``model.set_params(...)``, ``ema_model.set_params(...)``) is
    picked up at the next step, as on the CPU (the new values are uploaded). In-place edits of host
    arrays reach the device only through :meth:`sync_to_device`, which uploads every host array (call
    :meth:`sync_to_host`, or read them through the trainer, before editing). On host backends both sync
    methods do nothing.
    """

    def __init__(self, model, schedule: Schedule, lr: float = 2e-4, ema_decay: float = 0.999, rng=None,
                 prediction_type: str = "epsilon", weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                 warmup_steps: int = 0, optimizer: str = "adam", betas=(0.9, 0.999), eps: float = 1e-8,
                 backend: str | None = None):
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
        self._model = model
        self.schedule = schedule
        self.rng = as_generator(rng)
        self.grad_clip = grad_clip
        self.warmup_steps = int(warmup_steps)
        self.backend = _model_backend(model) if backend is None else backend
        opt_cls = AdamW if self.optimizer_name == "adamw" else Adam
        self._optimizer = opt_cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  backend=self.backend)
        self.lr = self._optimizer.lr  # base learning rate (the optimizer's lr follows the warmup)
        self._ema_model = _clone_model(model)
        self._ema = EMA(self._ema_model.params, ema_decay, copy=False)
        self._device = None
        if self.backend == "cuda":
            # the whole step on the GPU; the host optimizer and EMA become its mirrors (class Notes)
            self._device = get_backend("cuda").DeviceTrainStep(
                model, schedule, grad_clip=grad_clip, rng=self.rng, prediction_type=self.prediction_type,
                optimizer=self._optimizer, ema=self._ema, error=DivergenceError)
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self.last_lr: float | None = None

    # The host views: with backend="cuda" they are brought up to date on access (class Notes).
    @property
    def model(self):
        """The trained model (its params current on the host, see :meth:`sync_to_host`)."""
        self.sync_to_host()
        return self._model

    @property
    def ema_model(self):
        """A model of the same class holding the EMA parameters (current on the host)."""
        self.sync_to_host()
        return self._ema_model

    @property
    def ema(self) -> EMA:
        """The :class:`~difnumpy.nn.optim.EMA` whose arrays are ``ema_model.params`` (current on the host)."""
        self.sync_to_host()
        return self._ema

    @property
    def optimizer(self) -> Adam:
        """The :class:`~difnumpy.nn.optim.Adam` / ``AdamW`` (moments current on the host)."""
        self.sync_to_host()
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
                "betas": list(opt.betas), "eps": opt.eps, "backend": self.backend}

    def __repr__(self) -> str:
        return (f"Trainer(step_count={self.step_count}, lr={self.lr}, optimizer={self.optimizer_name!r}, "
                f"prediction_type={self.prediction_type!r}, ema_decay={self._ema.decay}, "
                f"grad_clip={self.grad_clip}, warmup_steps={self.warmup_steps})")

    def sync_to_host(self) -> None:
        """Copy the device state into the host arrays (``backend="cuda"``; a no-op on host backends).

        Afterwards ``model.params``, ``ema_model.params`` (= ``ema.params``) and ``optimizer.m`` / ``.v``
        hold the values of the last step, updated in place. Nothing is copied when no step ran since
        the last download. Called by the :attr:`model`, :attr:`ema_model`, :attr:`ema` and
        :attr:`optimizer` properties and by :func:`difnumpy.checkpoint.save_checkpoint`.
        """
        if self._device is None:
            return
        self._sync_params()  # a replaced params dict goes up first, so the download cannot overwrite it
        self._device.download()

    def sync_to_device(self) -> None:
        """Upload the host arrays (params, EMA params, Adam moments) after editing them in place.

        ``backend="cuda"`` only (a no-op on host backends): makes in-place host edits, e.g. a restored
        checkpoint's state, the state the next step starts from.

        Raises
        ------
        RuntimeError
            If a step ran since the host arrays were last refreshed: they are stale, and uploading them
            would silently undo those steps. Read them through the trainer (or call :meth:`sync_to_host`)
            before editing them.
        """
        if self._device is None:
            return
        self._sync_params()
        if not self._device.host_current:
            raise RuntimeError("sync_to_device: the host arrays are older than the device state (a step ran "
                               "since they were last refreshed); call sync_to_host() (or read them through "
                               "trainer.model / .ema_model / .optimizer / .ema) before editing them")
        self._device.upload()

    def _sync_params(self) -> None:
        # A model may replace its params dict (e.g. UNet.set_params); follow it, same keys and shapes.
        replaced = set()
        for owner, holder, name in ((self._model, self._optimizer, "model"),
                                    (self._ema_model, self._ema, "ema_model")):
            new = _model_params(owner)
            if holder.params is new:
                continue
            old = holder.params
            if set(new) != set(old) or any(new[k].shape != old[k].shape or new[k].dtype != old[k].dtype
                                           for k in old):
                raise ValueError(f"{name}.params was replaced by arrays of other keys, shapes or dtypes")
            holder.params = new
            replaced.add(name)
        if self._device is not None and replaced:
            # the new dict holds the caller's values: they go up; the rest of the state stays on the device
            self._device.upload(params="model" in replaced, ema="ema_model" in replaced, optimizer=False)

    def step(self, x0_batch: np.ndarray) -> float:
        """One training step on a clean batch; returns the loss (before the update).

        Order: lr from the warmup schedule; :func:`loss_and_grads` (draws t then eps from :attr:`rng`);
        clip the gradients to :attr:`grad_clip`; optimizer update; EMA update. With ``backend="cuda"``
        the same step runs on the device (:meth:`difnumpy.kernels.cuda.DeviceTrainStep.step`).

        Parameters
        ----------
        x0_batch : ndarray, shape (N, C, H, W), float
            Clean batch (cast to the model's dtype).

        Raises
        ------
        DivergenceError (a FloatingPointError)
            If the loss or the gradient norm is NaN or inf. Nothing is updated then (the rng has advanced).
        """
        self._sync_params()
        lr = lr_at(self.step_count + 1, self.lr, self.warmup_steps)
        if self._device is not None:  # backend="cuda": the one dispatch point
            loss = self._device.step(_check_x0(x0_batch), lr, rng=self.rng, grad_clip=self.grad_clip,
                                     prediction_type=self.prediction_type)
            norm = self._device.last_grad_norm
        else:
            loss, grads = loss_and_grads(self._model, self.schedule, x0_batch, self.rng, self.prediction_type)
            if not math.isfinite(loss):
                raise DivergenceError(f"non-finite loss ({loss}) at step {self.step_count + 1}; "
                                      f"the update was not applied")
            norm = clip_grad_norm(grads, self.grad_clip)
            if not math.isfinite(norm):
                raise DivergenceError(f"non-finite gradient norm ({norm}) at step {self.step_count + 1}; "
                                      f"the update was not applied")
            self._optimizer.lr = lr
            self._optimizer.step(grads)
            self._ema.update(self._model.params)
        self.last_loss, self.last_grad_norm, self.last_lr = loss, norm, lr
        return loss
