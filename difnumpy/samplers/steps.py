"""The DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) steps and their timestep lists.

Each sampler has one step function (:func:`ddpm_step`, :func:`ddim_step`) that turns the model's
output at timestep ``t`` into ``x_{prev_t}``. Both reduce to the same fused elementwise update
(:func:`difnumpy.kernels.reference.sampler_update`)::

    x0_pred = clip(A x_t + B model_output)          # predict x0 from the model output
    x_prev  = C x0_pred + D x_t + E noise           # the step's mean plus its noise

with per-sample coefficients derived here from the schedule. ``model`` is any callable
``model(x_t, t_batch) -> output`` (a :class:`difnumpy.UNet`, or an analytic oracle in the tests).

One loop for every backend: ``backend=`` picks the kernels of the fused update, and ``x_t`` stays in
that backend's native arrays from the first step to the last (device arrays on "cuda"). A model that
runs on the same backend (a :class:`~difnumpy.UNet` with that ``backend``) is called with native
arrays; any other callable is called with NumPy arrays. Noise is drawn on the host from the ``rng``
on every backend, so the same seed gives the same samples on every backend (to float rounding).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from difnumpy._validation import (PREDICTION_TYPES, as_generator, check_choice, check_float_array,
                                  check_rng_noise, check_timesteps)
from difnumpy.diffusion import _check_schedule
from difnumpy.kernels import BACKENDS, get_backend
from difnumpy.schedules import Schedule
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
SPACINGS = ("leading", "trailing", "linspace")


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
    """The timesteps a sampler visits, in descending order.

    Parameters
    ----------
    num_train_timesteps : int
        T, the schedule's length.
    num_steps : int
        S in [1, T].
    spacing : {"leading", "trailing", "linspace"}
        ``"leading"``: ``arange(S) * (T // S) + steps_offset`` (DDIM paper, diffusers' default);
        ``"trailing"``: ``round(T - i T / S) - 1`` for i = 0..S-1 (Lin et al. 2023, Table 2), which always
        starts at T-1; ``"linspace"``: ``round(linspace(0, T - 1, S))``.
    steps_offset : int
        Added to every "leading" timestep (diffusers' ``steps_offset``); must keep them <= T-1.

    Returns
    -------
    timesteps : ndarray, shape (S,), int64
        Exactly S distinct values in [0, T-1], descending.

    Notes
    -----
    The trailing formula is written with an integer index rather than ``arange(T, 0, -T/S)``: the
    float range yields S+1 entries, the last one -1, for some S (61, 103, 121 with T = 1000).
    """
    for name, v in (("num_train_timesteps", num_train_timesteps), ("num_steps", num_steps),
                    ("steps_offset", steps_offset)):
        if not isinstance(v, (numbers.Integral, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    T, S = int(num_train_timesteps), int(num_steps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")
    if not 1 <= S <= T:
        raise ValueError(f"num_steps must lie in [1, num_train_timesteps={T}], got {S}")
    check_choice(spacing, "spacing", SPACINGS)
    if steps_offset != 0 and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing='leading' only, got steps_offset={steps_offset} "
                         f"with spacing={spacing!r}")
    if spacing == "leading":
        ts = np.arange(S, dtype=np.int64) * (T // S) + int(steps_offset)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(S, dtype=np.float64) * (T / S)).astype(np.int64) - 1
        ts = ts[::-1]
    else:
        ts = np.round(np.linspace(0, T - 1, S)).astype(np.int64)
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"steps_offset={steps_offset} moves the timesteps outside [0, {T - 1}] "
                         f"(got [{ts.min()}, {ts.max()}])")
    return np.ascontiguousarray(ts[::-1])


# ---------------------------------------------------------------------------------------------
# shared pieces of a step


def _x0_coefficients(schedule: Schedule, tt: np.ndarray, prediction_type: str):
    """(A, B) with ``x0 = A x_t + B model_output`` for each prediction type.

    epsilon: DDPM eq. 15, ``x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps``;
    sample: the output is x0; v_prediction: ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v`` (Salimans & Ho, App. D).
    """
    abar = schedule.alphas_cumprod[tt]
    if prediction_type == "epsilon":
        if (abar == 0.0).any():
            raise ValueError("prediction_type='epsilon' cannot recover x0 at a timestep with alphas_cumprod == 0 "
                             "(zero terminal SNR); use prediction_type='v_prediction'")
        return 1.0 / np.sqrt(abar), -np.sqrt(1.0 / abar - 1.0)
    if prediction_type == "sample":
        return np.zeros_like(abar), np.ones_like(abar)
    return np.sqrt(abar), -np.sqrt(1.0 - abar)


def _clip_bounds(x_t, model_output, A, B, *, clip_sample, clip_range, thresholding,
                 dynamic_thresholding_ratio, sample_max_value):
    """Per-sample clip bounds, and the rescaled (A, B) when dynamic thresholding is on.

    Dynamic thresholding (Saharia et al. 2022, Imagen Sec. 2.3): s = the ``ratio`` percentile of
    |x0_pred| per sample, clamped to [1, sample_max_value]; x0 <- clip(x0, -s, s) / s, which equals
    clip(x0 / s, -1, 1), so it folds into the fused update by scaling A and B by 1/s.
    """
    n = x_t.shape[0]
    if thresholding:
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1], got {dynamic_thresholding_ratio}")
        if not sample_max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value}")
        x_t, model_output = _host(x_t), _host(model_output)  # the percentile is taken on the host
        x0 = (A.reshape((n,) + (1,) * (x_t.ndim - 1)) * x_t.astype(np.float64)
              + B.reshape((n,) + (1,) * (x_t.ndim - 1)) * model_output.astype(np.float64))
        s = np.quantile(np.abs(x0.reshape(n, -1)), dynamic_thresholding_ratio, axis=1)
        s = np.clip(s, 1.0, sample_max_value)
        return A / s, B / s, -np.ones(n), np.ones(n)
    if clip_sample:
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        return A, B, np.full(n, -float(clip_range)), np.full(n, float(clip_range))
    return A, B, np.full(n, -np.inf), np.full(n, np.inf)


def _host(a) -> np.ndarray:
    """``a`` as a NumPy array (device arrays of the cuda backend are copied down)."""
    if isinstance(a, np.ndarray):
        return a
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _check_state(x, name: str, backend: str):
    """A NumPy float array (checked for NaN/inf), or a native float array of ``backend`` (shape and dtype
    only: scanning a device array for NaN would copy it down every step)."""
    if isinstance(x, np.ndarray):
        return check_float_array(x, name)
    if not get_backend(backend).is_array(x):
        raise TypeError(f"{name} must be a numpy ndarray or a native array of backend {backend!r}, "
                        f"got {type(x).__name__}")
    if np.dtype(x.dtype) not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    return x


def _check_step_inputs(schedule, model_output, x_t, t, noise, rng, prediction_type, out_channels_factor=1,
                       backend="cpu"):
    _check_schedule(schedule)
    check_choice(backend, "backend", BACKENDS)
    _check_state(x_t, "x_t", backend)
    _check_state(model_output, "model_output", backend)
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    check_rng_noise(rng, noise)
    shape = tuple(int(s) for s in x_t.shape)
    expect = (shape[0], shape[1] * out_channels_factor) + shape[2:] if len(shape) > 1 else shape
    if tuple(model_output.shape) != expect:
        raise ValueError(f"model_output must have shape {expect} for x_t of shape {shape}, "
                         f"got {tuple(model_output.shape)}")
    if noise is not None:
        _check_state(noise, "noise", backend)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have the shape of x_t {shape}, got {tuple(noise.shape)}")
    return check_timesteps(t, schedule.num_timesteps, shape[0], "t")


def _prev_timesteps(t_arr, prev_t, schedule, n):
    if prev_t is None:
        return t_arr - 1
    pt = check_timesteps(prev_t, schedule.num_timesteps, n, "prev_t", allow_minus_one=True)
    if (pt >= t_arr).any():
        raise ValueError("prev_t must be smaller than t for every sample")
    return pt


def ddpm_coefficients(schedule: Schedule, tt: np.ndarray, pt: np.ndarray, prediction_type: str):
    """Per-sample coefficients of one (possibly respaced) DDPM step, shape (N,) each, float64.

    Returns ``(A, B, coef1, coef2, post_var, beta)``: ``x0 = A x_t + B out`` (before clipping), the
    posterior mean ``coef1 x0 + coef2 x_t`` (DDPM eq. 7 with ``alpha = abar_t / abar_prev``), its variance
    ``beta~`` and ``beta = 1 - abar_t / abar_prev``. ``pt == -1`` marks the final step (``abar_prev = 1``).
    Shared by :func:`ddpm_step` and the device-resident loop of the CUDA backend.
    """
    abar_t = schedule.alphas_cumprod[tt]
    abar_prev = np.where(pt < 0, 1.0, schedule.alphas_cumprod[np.maximum(pt, 0)])
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    coef1 = np.sqrt(abar_prev) * beta / (1.0 - abar_t)
    coef2 = np.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar_t)
    A, B = _x0_coefficients(schedule, tt, prediction_type)
    return A, B, coef1, coef2, post_var, beta


def _check_ddim_args(schedule: Schedule, tt: np.ndarray, pt: np.ndarray, eta, final_alpha_cumprod) -> None:
    """Validate ``eta`` and ``final_alpha_cumprod`` for DDIM steps from ``tt`` to ``pt`` (``-1``: the final step).

    The final step goes to ``abar_prev = final_alpha_cumprod``, which must lie in (0, 1] and must not be
    below ``abar_t``: like ``prev_t < t`` for the other steps, a step of the reverse process may not add
    noise, and with eta > 0 DDIM eq. 16's ``sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t /
    abar_prev)`` is negative otherwise (the step would be all NaN). A sampling loop can call this once
    before its first step with ``tt`` = its last timestep and ``pt = -1``.
    """
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (numbers.Real, np.floating, np.integer)) \
            or not (np.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    f = final_alpha_cumprod
    if isinstance(f, (bool, np.bool_)) or not isinstance(f, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"final_alpha_cumprod must be a real number in (0, 1], got {type(f).__name__}")
    if not 0.0 < f <= 1.0:
        raise ValueError(f"final_alpha_cumprod must lie in (0, 1], got {f}")
    final = np.asarray(pt) < 0
    if final.any():
        t_final = np.asarray(tt)[final]
        abar_t = schedule.alphas_cumprod[t_final]
        if (abar_t > f).any():
            i = int(np.argmax(abar_t))
            raise ValueError(
                f"final_alpha_cumprod={float(f)!r} is below alphas_cumprod[t]={float(abar_t[i])!r} at the final "
                f"DDIM step (t={int(t_final[i])} -> abar_prev = final_alpha_cumprod): it must lie in "
                f"[alphas_cumprod[t], 1] (a reverse step may not add noise; with eta > 0 sigma would be NaN), "
                f"e.g. 1.0 or schedule.alphas_cumprod[0]")


def ddim_coefficients(schedule: Schedule, tt: np.ndarray, pt: np.ndarray, eta: float, prediction_type: str,
                      final_alpha_cumprod: float = 1.0):
    """Per-sample coefficients ``(A, B, C, D, sigma)`` of one DDIM step, shape (N,) each, float64.

    ``x0 = A x_t + B out`` (before clipping) and ``x_prev = C x0 + D x_t + sigma z``: DDIM eq. 12,
    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
    ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` and sigma from eq. 16. ``pt == -1`` is the final
    step (``abar_prev = final_alpha_cumprod``). Shared by :func:`ddim_step` and the CUDA backend, so the
    checks of ``eta`` and ``final_alpha_cumprod`` (:func:`_check_ddim_args`) live here.
    """
    _check_ddim_args(schedule, tt, pt, eta, final_alpha_cumprod)
    abar_t = schedule.alphas_cumprod[tt]
    abar_prev = np.where(pt < 0, float(final_alpha_cumprod), schedule.alphas_cumprod[np.maximum(pt, 0)])
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * np.sqrt(1.0 - abar_t / abar_prev)
    dir_coef = np.sqrt(np.maximum(1.0 - abar_prev - sigma ** 2, 0.0))
    sa, s1ma = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
    A, B = _x0_coefficients(schedule, tt, prediction_type)
    return A, B, np.sqrt(abar_prev) - dir_coef * sa / s1ma, dir_coef / s1ma, sigma


def _fused_update(x_t, model_output, noise, A, B, C, D, E, lo, hi, backend):
    kern = get_backend(backend)
    shape = tuple(int(s) for s in x_t.shape)
    n, m = shape[0], math.prod(shape[1:])
    dt = np.dtype(x_t.dtype)
    # NumPy in -> NumPy out on every backend; native (device) arrays in -> native out
    arr = (lambda a: np.ascontiguousarray(a, dtype=dt)) if isinstance(x_t, np.ndarray) else \
        (lambda a: kern.asarray(a, dt))
    if noise is None:
        # E is zero wherever noise is absent; any finite array of the right shape will do and
        # x_t avoids allocating one (0 * x_t == 0 exactly).
        noise = x_t
    coef = np.empty((n, 5), np.float64)  # columns A, B, C, D, E (np.stack cost ~7 us a step)
    for j, c in enumerate((A, B, C, D, E)):
        coef[:, j] = c
    x_prev, x0 = kern.sampler_update(arr(x_t).reshape(n, m), arr(model_output).reshape(n, m),
                                     arr(noise).reshape(n, m), coef, lo, hi)
    return x_prev.reshape(shape), x0.reshape(shape)


def _draw_noise(noise, rng, x_t, needed: bool):
    if noise is not None or not needed:
        return noise
    return as_generator(rng).standard_normal(tuple(int(s) for s in x_t.shape), dtype=np.dtype(x_t.dtype))


# ---------------------------------------------------------------------------------------------
# step functions


def ddpm_step(schedule: Schedule, model_output: np.ndarray, t, x_t: np.ndarray, *, prev_t=None,
              noise: np.ndarray | None = None, rng: np.random.Generator | None = None,
              prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip_sample: bool = True,
              clip_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
              sample_max_value: float = 1.0, backend: str = "cpu"):
    """One ancestral DDPM step ``x_t -> x_{prev_t}``.

    Parameters
    ----------
    schedule : Schedule
    model_output : ndarray, shape of x_t (or (N, 2C, ...) for ``variance_type="learned_range"``)
        The model's prediction at ``t``: eps, x0 or v according to ``prediction_type``; with
        learned_range the second half of the channels is the variance interpolation v in [-1, 1].
    t : int or ndarray of int, shape (N,)
    x_t : ndarray, shape (N, ...), float32 or float64
    prev_t : int or ndarray of int, optional
        Defaults to ``t - 1``. With skipped (respaced) steps the step uses
        ``alpha = abar_t / abar_prev`` and ``beta = 1 - abar_t / abar_prev`` (improved-diffusion ``respace``).
        ``-1`` means the final step, to clean data (``abar_prev = 1``); no noise is added there.
    noise, rng :
        The step's noise z, or the Generator it is drawn from (one or the other).
    prediction_type : {"epsilon", "sample", "v_prediction"}
    variance_type : {"fixed_small", "fixed_large", "learned_range"}
        fixed_small: ``beta~ = (1 - abar_prev) / (1 - abar_t) beta`` (DDPM eq. 7);
        fixed_large: ``beta``; learned_range: ``exp(f log beta + (1 - f) log beta~)`` with
        ``f = (v + 1) / 2`` (Nichol & Dhariwal 2021, eq. 15).
    clip_sample, clip_range : clip x0_pred to [-clip_range, clip_range].
    thresholding, dynamic_thresholding_ratio, sample_max_value :
        Imagen's dynamic thresholding of x0_pred (replaces clip_sample when on).
    backend : {"numpy", "cpu", "cuda"}

    Returns
    -------
    x_prev : ndarray, shape and dtype of x_t
    x0_pred : ndarray, shape and dtype of x_t

    Notes
    -----
    DDPM eq. 6-7 and Algorithm 2: ``x_{t-1} = mu~_t(x0_pred, x_t) + sigma_t z`` with
    ``mu~ = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t``.
    """
    check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    factor = 2 if variance_type == "learned_range" else 1
    if factor == 2 and len(x_t.shape) < 2:
        raise ValueError("variance_type='learned_range' needs x_t with a channel axis (N, C, ...)")
    tt = _check_step_inputs(schedule, model_output, x_t, t, noise, rng, prediction_type, factor, backend)
    n = int(x_t.shape[0])
    pt = _prev_timesteps(tt, prev_t, schedule, n)
    var_out = None
    if factor == 2:
        # the per-element variance is computed on the host (one copy down per step on "cuda")
        c = int(x_t.shape[1])
        model_output = _host(model_output)
        model_output, var_out = np.ascontiguousarray(model_output[:, :c]), model_output[:, c:]

    final = pt < 0
    A, B, coef1, coef2, post_var, beta = ddpm_coefficients(schedule, tt, pt, prediction_type)
    A, B, lo, hi = _clip_bounds(x_t, model_output, A, B, clip_sample=clip_sample, clip_range=clip_range,
                                thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                sample_max_value=sample_max_value)
    noise = _draw_noise(noise, rng, x_t, needed=not final.all())
    if variance_type == "learned_range":
        # the step's variance varies per element: pre-scale the noise and use E = 1
        # (log beta~ is clipped at the final step, where it is 0 and no noise is added anyway)
        min_log = np.log(np.where(post_var > 0, post_var, schedule.posterior_variance[min(1, schedule.num_timesteps - 1)]))
        max_log = np.log(beta)
        shape = (n,) + (1,) * (len(x_t.shape) - 1)
        frac = (var_out.astype(np.float64) + 1.0) / 2.0
        log_var = frac * max_log.reshape(shape) + (1.0 - frac) * min_log.reshape(shape)
        if noise is not None:
            noise = (np.exp(0.5 * log_var) * _host(noise)).astype(x_t.dtype)
        E = np.where(final, 0.0, 1.0)
    else:
        var = post_var if variance_type == "fixed_small" else beta
        E = np.where(final, 0.0, np.sqrt(var))
    return _fused_update(x_t, model_output, noise, A, B, coef1, coef2, E, lo, hi, backend)


def ddim_step(schedule: Schedule, model_output: np.ndarray, t, prev_t, x_t: np.ndarray, *, eta: float = 0.0,
              noise: np.ndarray | None = None, rng: np.random.Generator | None = None,
              prediction_type: str = "epsilon", clip_sample: bool = True, clip_range: float = 1.0,
              final_alpha_cumprod: float = 1.0, thresholding: bool = False,
              dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, backend: str = "cpu"):
    """One DDIM step ``x_t -> x_{prev_t}`` (Song et al. 2021, eq. 12).

    Parameters
    ----------
    schedule : Schedule
    model_output : ndarray, shape of x_t
    t : int or ndarray of int, shape (N,)
    prev_t : int or ndarray of int, shape (N,)
        The next timestep of the sampler's list; ``-1`` is the final step, where
        ``abar_prev = final_alpha_cumprod``.
    x_t : ndarray, shape (N, ...), float32 or float64
    eta : float >= 0
        0 is the deterministic DDIM; 1 gives the DDPM posterior variance.
    noise, rng : the noise z (used only when eta > 0), or the Generator it is drawn from.
    final_alpha_cumprod : float in [alphas_cumprod[t], 1]
        ``abar_prev`` of the final step (``prev_t == -1``): 1.0 is diffusers' ``set_alpha_to_one=True``,
        ``schedule.alphas_cumprod[0]`` its ``set_alpha_to_one=False``. A value below ``abar_t`` would make
        the final step add noise (and sigma NaN for eta > 0): ValueError.
    prediction_type, clip_sample, clip_range, thresholding, ... : as in :func:`ddpm_step`.

    Returns
    -------
    x_prev, x0_pred : ndarray, shape and dtype of x_t

    Notes
    -----
    DDIM eq. 12: ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``, with
    eq. 16: ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``.
    eps is re-derived from the (clipped) x0_pred, ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``,
    as improved-diffusion does; without clipping it equals the model's eps.
    """
    tt = _check_step_inputs(schedule, model_output, x_t, t, noise, rng, prediction_type, backend=backend)
    n = x_t.shape[0]
    if prev_t is None:
        raise ValueError("prev_t is required for ddim_step (-1 for the final step)")
    pt = _prev_timesteps(tt, prev_t, schedule, n)
    # ddim_coefficients checks eta and final_alpha_cumprod (_check_ddim_args)
    A, B, C, D, sigma = ddim_coefficients(schedule, tt, pt, eta, prediction_type, final_alpha_cumprod)
    A, B, lo, hi = _clip_bounds(x_t, model_output, A, B, clip_sample=clip_sample, clip_range=clip_range,
                                thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                sample_max_value=sample_max_value)
    noise = _draw_noise(noise, rng, x_t, needed=bool((sigma > 0).any()))
    return _fused_update(x_t, model_output, noise, A, B, C, D, sigma, lo, hi, backend)
