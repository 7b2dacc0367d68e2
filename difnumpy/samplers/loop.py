"""The one sampling loop: ``sample`` / ``sample_progressive`` for every method, backend and condition.

The loop builds one model function ``model_fn(x_t, t) -> output`` (the backend's native arrays in and
out; class labels and classifier-free guidance inside it), then runs the method's steps: DDPM and DDIM
(:mod:`difnumpy.samplers.steps`) or a few-step solver (:mod:`difnumpy.solvers`). Image-to-image
(SDEdit) starts the same loop part-way, from a noised ``x_init``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from difnumpy import solvers
from difnumpy._validation import PREDICTION_TYPES, as_generator, check_choice, check_float_array, check_rng_noise
from difnumpy.diffusion import _check_schedule
from difnumpy.kernels import BACKENDS, get_backend
from difnumpy.samplers.steps import (SPACINGS, _check_ddim_args, _check_state, ddim_step, ddpm_step,
                                     inference_timesteps)
from difnumpy.schedules import Schedule

#: Every sampling method: the DDPM / DDIM step functions and the few-step solvers.
METHODS = ("ddpm", "ddim") + tuple(solvers.METHODS)

_STEP_OPTIONS = {
    "ddpm": {"prediction_type", "variance_type", "clip_sample", "clip_range", "thresholding",
             "dynamic_thresholding_ratio", "sample_max_value"},
    "ddim": {"prediction_type", "clip_sample", "clip_range", "final_alpha_cumprod", "thresholding",
             "dynamic_thresholding_ratio", "sample_max_value"},
    **{m: set(o) for m, o in solvers.OPTIONS.items()},
}


def _resolve_backend(model, backend):
    """``backend``, or by default the model's own backend (a UNet's), else "cpu"."""
    if backend is None:
        backend = getattr(model, "backend", None)
        return backend if backend in BACKENDS else "cpu"
    return check_choice(backend, "backend", BACKENDS)


def check_class_labels(class_labels, n: int, num_classes: int | None, name: str = "class_labels") -> np.ndarray:
    """``class_labels`` as an int64 array of shape (n,) with values in [0, K] (K = ``num_classes``: "no class").

    An int is broadcast to the batch. Raises TypeError / ValueError naming ``name``.
    """
    if num_classes is None:
        raise TypeError(f"{name} needs a class-conditional model (one with num_classes, e.g. "
                        f"UNet(num_classes=K)); this model has none")
    if isinstance(class_labels, (bool, np.bool_)):
        raise TypeError(f"{name} must be ints in [0, {num_classes}], got bool")
    a = np.asarray(class_labels)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be ints in [0, {num_classes}], got dtype {a.dtype}")
    if a.ndim == 0:
        a = np.full(n, int(a))
    if a.shape != (n,):
        raise ValueError(f"{name} must be an int or have shape (N,) = ({n},), got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}] ({num_classes} = no class), got values in "
                         f"[{int(a.min())}, {int(a.max())}]")
    return a.astype(np.int64)


def guided_output(out_c, out_u, guidance_scale: float, guidance_rescale: float = 0.0, *, backend="numpy"):
    """Classifier-free guidance of a model output, in its own parameterisation.

    Parameters
    ----------
    out_c, out_u : array, shape (N, ...), the conditional and unconditional outputs (native arrays)
    guidance_scale : float, w (diffusers' convention: 1 is plain conditional, 0 unconditional)
    guidance_rescale : float in [0, 1], phi (0: no rescale)

    Returns
    -------
    array, shape of ``out_c``: ``out_u + w (out_c - out_u)``, then rescaled when ``phi > 0``

    Notes
    -----
    Ho & Salimans 2022, eq. 6 (with ``w`` here = ``1 + w`` there). Lin et al. 2023, eqs. 15-16:
    ``x_rescaled = x_cfg * std(out_c) / std(x_cfg)`` and ``x = phi x_rescaled + (1 - phi) x_cfg``, the
    standard deviations per sample over all other axes (computed on the host).
    """
    kern = get_backend(backend)
    d = kern.axpy_(kern.copy(out_c), out_u, -1.0)          # out_c - out_u
    g = kern.axpy_(kern.copy(out_u), d, float(guidance_scale))
    if guidance_rescale:
        n = int(g.shape[0])
        gh, ch = kern.to_host(g).reshape(n, -1), kern.to_host(out_c).reshape(n, -1)
        std_g = gh.astype(np.float64).std(axis=1)
        std_c = ch.astype(np.float64).std(axis=1)
        factor = float(guidance_rescale) * std_c / np.where(std_g > 0, std_g, 1.0) + (1.0 - float(guidance_rescale))
        flat = g.reshape(n, gh.shape[1])
        g = kern.q_sample(flat, flat, factor, np.zeros(n)).reshape(tuple(int(s) for s in g.shape))
    return g


def frozen_model(model: Callable):
    """``model.frozen()`` (parameters unchanged for the scope, see :meth:`difnumpy.UNet.frozen`) when the model
    has it, else a no-op context: every sampling loop runs inside it."""
    frozen = getattr(model, "frozen", None)
    return frozen() if callable(frozen) else contextlib.nullcontext()


def make_model_fn(model: Callable, backend: str, class_labels=None, guidance_scale: float = 1.0,
                  guidance_rescale: float = 0.0, n: int | None = None, variance_type: str | None = None):
    """The one model function of the loop: ``model_fn(x_t, t) -> output``, native arrays of ``backend``.

    A model on ``backend`` (a UNet with that backend) is called with native arrays, any other callable with
    NumPy arrays. With ``class_labels`` the model is called as ``model(x_t, t, class_labels=y)``; with
    ``guidance_scale != 1`` the conditional and unconditional halves go through one call of batch 2N
    (labels ``[y, K]``, K = ``model.num_classes``) and are combined by :func:`guided_output`.
    """
    kern = get_backend(backend)
    native = getattr(model, "backend", None) == backend

    def call(x, t, labels):
        xin = x if native else kern.to_host(x)
        out = model(xin, t) if labels is None else model(xin, t, class_labels=labels)
        return out if native else kern.asarray(out)

    w = float(guidance_scale)
    if not np.isfinite(w):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    phi = float(guidance_rescale)
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale!r}")
    if class_labels is None:
        if w != 1.0 or phi != 0.0:
            raise ValueError(f"guidance_scale={guidance_scale!r} / guidance_rescale={guidance_rescale!r} need "
                             f"class_labels (classifier-free guidance mixes conditional and unconditional outputs)")
        return lambda x, t: call(x, t, None)
    K = getattr(model, "num_classes", None)
    labels = check_class_labels(class_labels, n, K)
    if w == 1.0:
        return lambda x, t: call(x, t, labels)
    if variance_type == "learned_range":
        raise ValueError("guidance_scale != 1 with variance_type='learned_range' is not supported: the variance "
                         "channels are not a prediction to extrapolate")
    labels2 = np.concatenate([labels, np.full(n, K, dtype=np.int64)])

    def guided(x, t):
        m = int(x.shape[0])
        x2 = kern.zeros((2 * m,) + tuple(int(s) for s in x.shape[1:]), np.dtype(x.dtype))
        kern.copy_into(x2[:m], x)
        kern.copy_into(x2[m:], x)
        out = call(x2, np.concatenate([t, t]), labels2)
        return guided_output(out[:m], out[m:], w, phi, backend=kern)

    return guided


def _check_strength(strength, x_init) -> float:
    if x_init is None:
        if strength is not None:
            raise ValueError("strength applies to image-to-image only (give x_init=)")
        return 1.0
    if isinstance(strength, bool) or not isinstance(strength, (numbers.Real, np.floating)) \
            or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def _reverse_process(model, schedule, shape, *, method, num_steps, eta, spacing, steps_offset, x_T, rng,
                     progress, dtype, backend, step_kw, class_labels=None, guidance_scale=1.0,
                     guidance_rescale=0.0, x_init=None, strength=None):
    """The one sampling loop: validates everything, then yields ``(t, prev_t, x_prev, x0_pred)`` with
    the arrays native to ``backend`` (they stay on the device on "cuda")."""
    check_choice(method, "method", METHODS)
    _check_schedule(schedule)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    unknown = set(step_kw) - _STEP_OPTIONS[method]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for method={method!r}: {sorted(unknown)}")
    if not (isinstance(eta, (numbers.Real, np.floating)) and not isinstance(eta, bool) and np.isfinite(eta)
            and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if method != "ddim" and eta != 0.0:
        raise ValueError("eta applies to method='ddim' only")
    strength = _check_strength(strength, x_init)
    if x_init is not None and x_T is not None:
        raise ValueError("give either x_T= (the starting noise) or x_init= (image-to-image), not both")
    kern = get_backend(backend)
    T = schedule.num_timesteps
    solver = method in solvers.METHODS
    if spacing is None:
        spacing = solvers.DEFAULT_SPACING[method] if solver else "leading"
    check_choice(spacing, "spacing", SPACINGS)
    if num_steps is None:
        num_steps = T if method == "ddpm" else min(50, T)
    if solver:
        if steps_offset:
            raise ValueError(f"steps_offset applies to method='ddpm' / 'ddim' only, got {steps_offset}")
        timesteps, sigmas = solvers.schedule_sigmas(method, schedule, num_steps, spacing, **step_kw)
    else:
        timesteps = inference_timesteps(T, num_steps, spacing, steps_offset)
    # image-to-image (diffusers' strength): skip the first steps, start from x_init noised to that level
    n_skip = 0
    if x_init is not None:
        n_run = min(int(num_steps * strength), num_steps)
        if n_run < 1:
            raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no step to run "
                             f"(int(num_steps * strength) < 1)")
        n_skip = num_steps - n_run
    if method == "ddim":  # refuse a bad final step before the first model call, not after the last
        _check_ddim_args(schedule, timesteps[-1:], np.array([-1]), eta, step_kw.get("final_alpha_cumprod", 1.0))
    stochastic = method in ("ddpm", "euler_ancestral", "dpmpp_2m_sde") or eta > 0
    if stochastic or x_init is not None:
        check_rng_noise(rng, None)  # rng draws the step noise (or x_init's noise) even when x_T is given
    else:
        check_rng_noise(rng, x_T, "x_T")  # deterministic: rng would be ignored, so both is ambiguous
    rng = as_generator(rng)
    if x_T is None and x_init is None:
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
        if len(shape) < 1 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        x = kern.asarray(rng.standard_normal(shape, dtype=dtype))
    else:
        given, gname = (x_T, "x_T") if x_init is None else (x_init, "x_init")
        _check_state(given, gname, backend)
        if shape is not None and tuple(shape) != tuple(given.shape):
            raise ValueError(f"shape {tuple(shape)} does not match {gname}.shape {tuple(given.shape)}")
        x = kern.copy(kern.asarray(given))
        if x_init is not None:
            # noise x_init to the first step run: x = (x0 + sigma eps) / sqrt(1 + sigma^2), sigma^2 = (1-abar)/abar
            # (= q_sample, DDPM eq. 4, at an integer timestep)
            if solver:
                sigma = solvers.start_sigma(method, schedule, num_steps, spacing, n_skip, **step_kw)[1]
            else:
                ab = float(schedule.alphas_cumprod[timesteps[n_skip]])
                sigma = float(np.sqrt((1.0 - ab) / ab))
            nn = int(x.shape[0])
            eps = kern.asarray(rng.standard_normal(tuple(int(s) for s in x.shape), dtype=np.dtype(x.dtype)))
            c = 1.0 / np.sqrt(1.0 + sigma ** 2)
            flat = (nn, int(np.prod(x.shape[1:])))
            x = kern.q_sample(x.reshape(flat), eps.reshape(flat), np.full(nn, c),
                              np.full(nn, sigma * c)).reshape(tuple(int(s) for s in x.shape))
    n = int(x.shape[0])
    model_fn = make_model_fn(model, backend, class_labels, guidance_scale, guidance_rescale, n,
                             step_kw.get("variance_type"))
    with frozen_model(model):
        if solver:
            gen = solvers.solve(method, model_fn, schedule, x, num_steps=num_steps, spacing=spacing, rng=rng,
                                backend=backend, start=n_skip, **step_kw)
            if progress:
                gen = tqdm(gen, total=num_steps - n_skip, desc=f"{method} sampling", unit="step")
            yield from gen
            return
        it = range(n_skip, len(timesteps))
        if progress:
            it = tqdm(it, desc=f"{method} sampling", unit="step")
        for i in it:
            t = int(timesteps[i])
            prev_t = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
            t_batch = np.full(n, t, dtype=np.int64)
            out = model_fn(x, t_batch)
            if method == "ddpm":
                x, x0 = ddpm_step(schedule, out, t_batch, x, prev_t=prev_t, rng=rng, backend=backend, **step_kw)
            else:
                x, x0 = ddim_step(schedule, out, t_batch, prev_t, x, eta=eta, rng=rng if eta > 0 else None,
                                  backend=backend, **step_kw)
            yield t, prev_t, x, x0


_LOOP_DOC = """
    Parameters
    ----------
    model : callable
        ``model(x_t, t_batch) -> output`` (``t_batch`` an array of shape (N,): int64 timesteps, or
        float64 where a solver interpolates between training steps); with ``class_labels``,
        ``model(x_t, t_batch, class_labels=y)``.
    schedule : Schedule
    shape : tuple of int
        (N, ...) of the samples; must match ``x_T`` / ``x_init`` when one is given.
    method : {"ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler", "euler_ancestral", "heun"}
    num_steps : int, optional
        Number of steps S (default: T for DDPM, 50 for the others, capped at T).
    eta : float
        DDIM only (0 = deterministic).
    spacing : {"leading", "trailing", "linspace"} or None
        See :func:`inference_timesteps`; None: "leading" for DDPM / DDIM, diffusers' default of the
        scheduler for the solvers. ``steps_offset``: DDPM / DDIM only.
    x_T : ndarray, optional
        Starting noise; drawn from ``rng`` if not given.
    rng : numpy.random.Generator, optional
        Draws x_T (unless given), x_init's noise and every stochastic step's noise. Giving both ``x_T``
        and ``rng`` is allowed only where the steps need noise. With neither, a fresh OS-seeded Generator.
    progress : bool
        Show a tqdm progress bar.
    dtype : float32 or float64
        Dtype of x_T when it is drawn here.
    backend : {"numpy", "cpu", "cuda"} or None
        Kernels and arrays of the loop; by default the model's ``backend`` (a UNet's), else "cpu".
    class_labels : int or int array (N,), optional
        Class of each sample, in [0, K]; K (``model.num_classes``) is "no class".
    guidance_scale : float, default 1.0
        Classifier-free guidance w, ``out_u + w (out_c - out_u)`` (1: plain conditional, 0: unconditional);
        w != 1 makes one model call of batch 2N per evaluation.
    guidance_rescale : float in [0, 1], default 0.0
        Lin et al. 2023 eqs. 15-16 (see :func:`guided_output`).
    x_init : ndarray, optional
        Image-to-image (SDEdit, Meng et al. 2022): start from ``x_init`` noised to the step that
        ``strength`` selects and run the remaining steps.
    strength : float in (0, 1], optional (with ``x_init``)
        diffusers' convention: the last ``int(num_steps * strength)`` steps run.
    **step_kw :
        Passed to the step function or solver (prediction_type, variance_type, clip_sample, ...).
"""


def sample_progressive(model: Callable, schedule: Schedule, shape, *, method: str = "ddpm",
                       num_steps: int | None = None, eta: float = 0.0, spacing: str | None = None,
                       steps_offset: int = 0, x_T: np.ndarray | None = None,
                       rng: np.random.Generator | None = None, progress: bool = False,
                       dtype=np.float32, backend: str | None = None, class_labels=None,
                       guidance_scale: float = 1.0, guidance_rescale: float = 0.0, x_init=None, strength=None,
                       **step_kw) -> Iterator[dict]:
    backend = _resolve_backend(model, backend)
    kern = get_backend(backend)
    for t, prev_t, x, x0 in _reverse_process(model, schedule, shape, method=method, num_steps=num_steps, eta=eta,
                                             spacing=spacing, steps_offset=steps_offset, x_T=x_T, rng=rng,
                                             progress=progress, dtype=dtype, backend=backend, step_kw=step_kw,
                                             class_labels=class_labels, guidance_scale=guidance_scale,
                                             guidance_rescale=guidance_rescale, x_init=x_init, strength=strength):
        yield {"t": t, "prev_t": prev_t, "x_t": kern.to_host(x), "x0_pred": kern.to_host(x0)}


sample_progressive.__doc__ = """Run the reverse process, yielding after every step.
""" + _LOOP_DOC + """
    Yields
    ------
    dict with ``"t"`` (the timestep just processed), ``"prev_t"`` (-1 after the last step), ``"x_t"``
    (the sample after the step, i.e. at ``prev_t``) and ``"x0_pred"``, as NumPy arrays (copied down
    from the device on "cuda").
"""


def sample(model: Callable, schedule: Schedule, shape, *, method: str = "ddpm", num_steps: int | None = None,
           eta: float = 0.0, spacing: str | None = None, steps_offset: int = 0, x_T: np.ndarray | None = None,
           rng: np.random.Generator | None = None, progress: bool = False, return_trajectory: bool = False,
           dtype=np.float32, backend: str | None = None, class_labels=None, guidance_scale: float = 1.0,
           guidance_rescale: float = 0.0, x_init=None, strength=None, **step_kw):
    backend = _resolve_backend(model, backend)
    kern = get_backend(backend)
    traj = [] if return_trajectory else None
    x = None
    for t, prev_t, x, x0 in _reverse_process(model, schedule, shape, method=method, num_steps=num_steps, eta=eta,
                                             spacing=spacing, steps_offset=steps_offset, x_T=x_T, rng=rng,
                                             progress=progress, dtype=dtype, backend=backend, step_kw=step_kw,
                                             class_labels=class_labels, guidance_scale=guidance_scale,
                                             guidance_rescale=guidance_rescale, x_init=x_init, strength=strength):
        if traj is not None:
            traj.append({"t": t, "prev_t": prev_t, "x_t": kern.to_host(x), "x0_pred": kern.to_host(x0)})
    x = kern.to_host(x)
    return (x, traj) if return_trajectory else x


sample.__doc__ = """Draw samples (DDPM, DDIM or a few-step solver), optionally class-conditional, guided, or
    image-to-image; ``x_t`` stays in the backend's arrays for the whole loop, copied down once at the end.
""" + _LOOP_DOC + """
    Returns
    -------
    x0 : ndarray, shape ``shape``
        The final samples (a NumPy array on every backend).
    trajectory : list of dict, only with ``return_trajectory=True``
        Every step's ``{"t", "prev_t", "x_t", "x0_pred"}`` (NumPy arrays), returned as ``(x0, trajectory)``.
"""


def ddim_invert(model: Callable, schedule: Schedule, x0: np.ndarray, num_steps: int, *,
                spacing: str = "leading", steps_offset: int = 0, prediction_type: str = "epsilon",
                progress: bool = False, return_trajectory: bool = False):
    """Deterministic DDIM encoder ``x0 -> x_T``: the eta = 0 ODE run forwards.

    Parameters
    ----------
    model : callable ``model(x_t, t_batch) -> output``
    schedule : Schedule
    x0 : ndarray, shape (N, ...), float32 or float64
    num_steps : int
        Use the same ``num_steps``, ``spacing`` and ``steps_offset`` to decode with
        ``sample(..., method="ddim", eta=0, clip_sample=False, x_T=x_T)``.

    Returns
    -------
    x_T : ndarray, shape and dtype of x0 (and the list of intermediate states with ``return_trajectory``)

    Notes
    -----
    DDIM eq. 13 read as an ODE and integrated from t = 0 upwards (Song et al. 2021, Sec. 4.3): with the
    current state at ``t_prev`` (clean data, ``abar = 1``, before the first step) and eps predicted by the
    model at the next timestep t, ``x0 = (x - sqrt(1 - abar_prev) eps) / sqrt(abar_prev)`` and
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
    """
    _check_schedule(schedule)
    check_float_array(x0, "x0")
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    timesteps = inference_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)[::-1]
    x = x0.copy()
    n = x.shape[0]
    abar_prev = 1.0
    traj = [x] if return_trajectory else None
    it = timesteps
    if progress:
        it = tqdm(it, desc="ddim inversion", unit="step")
    with frozen_model(model):
        for t in it:
            t = int(t)
            t_batch = np.full(n, t, dtype=np.int64)
            out = model(x, t_batch)
            abar_t = float(schedule.alphas_cumprod[t])
            # the model reads x as a sample at t: convert its output to eps there
            if prediction_type == "epsilon":
                eps = out
            elif prediction_type == "sample":
                eps = (x - np.sqrt(abar_t) * out) / np.sqrt(1.0 - abar_t)
            else:
                eps = np.sqrt(1.0 - abar_t) * x + np.sqrt(abar_t) * out
            x0_pred = (x - np.sqrt(1.0 - abar_prev) * eps) / np.sqrt(abar_prev)
            x = (np.sqrt(abar_t) * x0_pred + np.sqrt(1.0 - abar_t) * eps).astype(x0.dtype, copy=False)
            abar_prev = abar_t
            if traj is not None:
                traj.append(x)
    return (x, traj) if return_trajectory else x
