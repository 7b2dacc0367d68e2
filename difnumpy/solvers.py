"""Few-step solvers of the probability-flow ODE (and two SDE samplers) in sigma space.

Methods, each matching one diffusers scheduler with that scheduler's defaults (``steps_offset=0``):

- ``"dpmpp_2m"``, ``"dpmpp_3m"``: multistep DPM-Solver++ of order 2 and 3 in the data-prediction form
  (Lu et al. 2022b, arXiv 2211.01095, Sec. 4 and Algorithm 2), diffusers' ``DPMSolverMultistepScheduler``
  with ``algorithm_type="dpmsolver++"`` and ``solver_order`` 2 or 3. One deliberate difference: diffusers'
  third-order step (like the reference ``dpm_solver_pytorch.py`` it copies) weights its second divided
  difference D2 by half the Taylor coefficient, which makes its "3M" globally second order
  (``tests/test_solvers.py`` measures both); ``dpmpp_3m`` uses the full coefficient (third order) unless
  ``diffusers_d2=True``, which reproduces diffusers exactly.
- ``"dpmpp_2m_sde"``: the same scheduler with ``algorithm_type="sde-dpmsolver++"``, ``solver_order=2``.
- ``"euler"``, ``"euler_ancestral"``, ``"heun"``: Karras et al. 2022 (EDM, arXiv 2206.00364), Algorithm 1
  (Heun; Euler is its first stage), diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``
  and ``HeunDiscreteScheduler``.

Sigma space (Karras et al. Sec. 2 with ``s(t) = 1``): ``sigma = sqrt((1 - abar) / abar)`` and
``x_sigma = x0 + sigma eps = sqrt(sigma^2 + 1) x_ddpm``; the probability-flow ODE is
``dx_sigma / dsigma = (x_sigma - D(x; sigma)) / sigma`` with ``D`` the model's prediction of x0 (Karras et al.
eqs. 1 and 3). The state is kept in the DDPM scaling (``x_ddpm = x_sigma / sqrt(sigma^2 + 1)``, exactly what
diffusers' ``scale_model_input`` hands the model), so every step below is that ODE step rewritten for DDPM-scaled
arrays: a per-sample linear combination of native arrays done with the backend API (``sampler_update``, which
also predicts and clips x0, and ``axpy_``). It therefore runs unchanged on every backend. Noise of the stochastic
methods is drawn on the host from the caller's Generator and copied up.

The floors (ARCHITECTURE.md): this module sits beside :mod:`difnumpy.samplers` (floor 3) and imports only the
kernels, the validators, the schedules and the forward process. :func:`difnumpy.samplers.sample` calls
:func:`solve`.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterator

import numpy as np

from difnumpy._validation import PREDICTION_TYPES, RNG_TYPES, as_generator, check_choice
from difnumpy.diffusion import _check_schedule
from difnumpy.kernels import BACKENDS, get_backend
from difnumpy.schedules import Schedule

METHODS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler", "euler_ancestral", "heun")
SPACINGS = ("linspace", "leading", "trailing")

#: diffusers' default ``timestep_spacing`` of the scheduler behind each method.
DEFAULT_SPACING = {m: "linspace" for m in METHODS}

_DPM_DEFAULTS = {"prediction_type": "epsilon", "use_karras_sigmas": False, "final_sigmas_type": "zero",
                 "lower_order_final": True, "euler_at_final": False, "solver_type": "midpoint",
                 "lambda_min_clipped": -math.inf, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                 "sample_max_value": 1.0}
#: each method's keyword options and their defaults (diffusers' names and defaults for that scheduler).
#: ``euler_ancestral`` also takes ``use_karras_sigmas`` (diffusers' EulerAncestral has no such option; it follows
#: EulerDiscreteScheduler's rule) and ``prediction_type="sample"`` (diffusers raises NotImplementedError).
#: ``dpmpp_3m`` also takes ``diffusers_d2`` (not a diffusers option): True halves the D2 term as diffusers does.
DEFAULTS: dict[str, dict] = {
    "dpmpp_2m": dict(_DPM_DEFAULTS),
    "dpmpp_3m": dict(_DPM_DEFAULTS, diffusers_d2=False),
    "dpmpp_2m_sde": dict(_DPM_DEFAULTS),
    "euler": {"prediction_type": "epsilon", "use_karras_sigmas": False, "final_sigmas_type": "zero"},
    "euler_ancestral": {"prediction_type": "epsilon", "use_karras_sigmas": False},
    "heun": {"prediction_type": "epsilon", "use_karras_sigmas": False, "clip_sample": False,
             "clip_sample_range": 1.0},
}
#: the keyword options each method accepts.
OPTIONS: dict[str, frozenset] = {m: frozenset(d) for m, d in DEFAULTS.items()}
#: model calls per step: Heun evaluates the model twice (its last step, an Euler step to sigma = 0, once).
CALLS_PER_STEP = {m: (2 if m == "heun" else 1) for m in METHODS}
_ORDER = {"dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2}
_BOOLS = ("use_karras_sigmas", "lower_order_final", "euler_at_final", "thresholding", "clip_sample", "diffusers_d2")
_CHOICES = {"prediction_type": PREDICTION_TYPES, "final_sigmas_type": ("zero", "sigma_min"),
            "solver_type": ("midpoint", "heun")}


# ---------------------------------------------------------------------------------------------
# options and noise levels


def resolve_options(method: str, opts: dict) -> dict:
    """``opts`` checked against :data:`OPTIONS` ``[method]`` and completed with the method's defaults.

    Raises TypeError for an option the method does not take or a value of the wrong type, ValueError for a
    value out of range; each names the option.
    """
    check_choice(method, "method", METHODS)
    unknown = set(opts) - OPTIONS[method]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for method={method!r}: {sorted(unknown)}; "
                        f"it takes {sorted(OPTIONS[method])}")
    out = dict(DEFAULTS[method])
    out.update(opts)
    for name in _BOOLS:
        if name in out and not isinstance(out[name], (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {out[name]!r}")
    for name, allowed in _CHOICES.items():
        if name in out:
            check_choice(out[name], name, allowed)
    for name in ("dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "lambda_min_clipped"):
        if name not in out:
            continue
        v = out[name]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
            raise TypeError(f"{name} must be a real number, got {v!r}")
        out[name] = float(v)
    if "dynamic_thresholding_ratio" in out and not 0.0 < out["dynamic_thresholding_ratio"] <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1], got {out['dynamic_thresholding_ratio']}")
    if "sample_max_value" in out and not out["sample_max_value"] >= 1.0:
        raise ValueError(f"sample_max_value must be >= 1, got {out['sample_max_value']}")
    if "clip_sample_range" in out and not (out["clip_sample_range"] > 0 and math.isfinite(out["clip_sample_range"])):
        raise ValueError(f"clip_sample_range must be a finite number > 0, got {out['clip_sample_range']}")
    if "lambda_min_clipped" in out and math.isnan(out["lambda_min_clipped"]):
        raise ValueError("lambda_min_clipped must not be NaN")
    return out


def training_sigmas(schedule: Schedule) -> np.ndarray:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for t = 0..T-1, float64, increasing.

    A zero-terminal-SNR schedule (``abar_{T-1} = 0``, Lin et al. 2023) would give sigma = inf; as diffusers does
    (``rescale_betas_zero_snr``), its last ``abar`` is read as ``2**-24`` (sigma about 4096).
    """
    abar = np.array(schedule.alphas_cumprod, dtype=np.float64)
    if abar[-1] == 0.0:
        abar[-1] = 2.0 ** -24
    return np.sqrt((1.0 - abar) / abar)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5, for i = 0..n-1 (descending, float64; rho = 7 as in the paper):
    ``sigma_i = (sigma_max^(1/rho) + i / (n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    ``n = 1`` gives ``[sigma_max]`` (diffusers' ``linspace(0, 1, 1) = [0]``)."""
    ramp = np.linspace(0.0, 1.0, int(n))
    lo, hi = float(sigma_min) ** (1.0 / rho), float(sigma_max) ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each ``sigma``: linear interpolation of ``log sigma`` between the two training
    timesteps around it (diffusers' ``_sigma_to_t``, reproduced step by step), clamped to [0, T-1]."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0.0, 1.0)
    return ((1.0 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _trailing(T: int, S: int, top: float) -> np.ndarray:
    """``arange(top, 0, -T/S).round() - 1`` written with an integer index, so that it has exactly S entries
    (the float range gets an extra, negative entry for some S, e.g. 61, 103, 121 with T = 1000)."""
    return np.round(top - np.arange(S, dtype=np.float64) * (T / S)) - 1.0


def _dpm_timesteps(schedule: Schedule, S: int, spacing: str, lambda_min_clipped: float) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps (integer timesteps, descending)."""
    T = schedule.num_timesteps
    abar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lambda_t = 0.5 * np.log(abar) - 0.5 * np.log(1.0 - abar)
    last = T - int(np.searchsorted(lambda_t[::-1], lambda_min_clipped, side="left"))
    if spacing == "linspace":
        ts = np.round(np.linspace(0, last - 1, S + 1))[::-1][:-1]
    elif spacing == "leading":
        ts = np.round(np.arange(S + 1) * (last // (S + 1)))[::-1][:-1]
    else:
        ts = _trailing(T, S, float(last))
    return ts.astype(np.int64).astype(np.float64)


def _discrete_timesteps(T: int, S: int, spacing: str) -> np.ndarray:
    """EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete ``set_timesteps``: float timesteps, descending
    (``"linspace"``: ``linspace(0, T-1, S)``, not rounded, so the model gets fractional t)."""
    if spacing == "linspace":
        return np.linspace(0.0, T - 1, S)[::-1].copy()
    if spacing == "leading":
        return np.round(np.arange(S, dtype=np.float64) * (T // S))[::-1].copy()
    return _trailing(T, S, float(T))


def _check_num_steps(num_steps, T: int) -> int:
    if not isinstance(num_steps, (numbers.Integral, np.integer)) or isinstance(num_steps, (bool, np.bool_)):
        raise TypeError(f"num_steps must be an integer, got {num_steps!r}")
    if not 1 <= int(num_steps) <= T:
        raise ValueError(f"num_steps must lie in [1, num_train_timesteps={T}], got {num_steps}")
    return int(num_steps)


def schedule_sigmas(method: str, schedule: Schedule, num_steps: int, spacing: str | None = None,
                    **opts) -> tuple[np.ndarray, np.ndarray]:
    """The model-call timesteps and the noise levels of a solver run, exactly as diffusers' scheduler sets them.

    Parameters
    ----------
    method : one of :data:`METHODS`
    schedule : Schedule
        T >= 2 training timesteps.
    num_steps : int
        S in [1, T]: solver steps (Heun makes 2S - 1 model calls, the others S).
    spacing : {"linspace", "leading", "trailing"} or None
        diffusers' ``timestep_spacing`` (None: :data:`DEFAULT_SPACING`). DPM-Solver++ spaces S+1 points and
        drops the last (``linspace``: ``round(linspace(0, T-1, S+1))``; ``leading``: ``arange(S+1) * (T // (S+1))``);
        Euler/Heun space S points (``linspace(0, T-1, S)``, unrounded; ``leading``: ``arange(S) * (T // S)``);
        ``trailing`` is ``round(T - i T / S) - 1`` for both.
    **opts : the method's options (:data:`OPTIONS`); those that matter here are ``use_karras_sigmas``,
        ``final_sigmas_type`` and ``lambda_min_clipped``.

    Returns
    -------
    timesteps : ndarray, float64, shape (S,), or (2S - 1,) for Heun
        The timestep each model call receives: integers for DPM-Solver++ (Karras sigmas are rounded to the
        nearest timestep, as diffusers does), fractional where diffusers interpolates (Euler and Heun on
        ``linspace`` or Karras sigmas).
    sigmas : ndarray, float64, shape (S + 1,), or (2S,) for Heun
        The sigma of each model call and, last, the final one (0, or the training ``sigma_min`` with
        ``final_sigmas_type="sigma_min"``). Heun's are doubled as diffusers does it:
        ``[s_0, s_1, s_1, ..., s_{S-1}, s_{S-1}, 0]``, so step i starts at ``sigmas[i * CALLS_PER_STEP[method]]``.

    Notes
    -----
    Sigmas at timesteps come from linear interpolation in sigma of :func:`training_sigmas`. With
    ``use_karras_sigmas`` they are Karras et al. eq. 5 (rho = 7) between the smallest and largest sigma --
    of the training schedule for DPM-Solver++, of the S interpolated sigmas for Euler and Heun (so there the
    spacing still matters) -- and the timesteps come from :func:`sigma_to_t`.
    """
    opts = resolve_options(method, opts)
    _check_schedule(schedule)
    T = schedule.num_timesteps
    if T < 2:
        raise ValueError(f"the sigma-space solvers need a schedule with at least 2 timesteps, got {T}")
    S = _check_num_steps(num_steps, T)
    spacing = DEFAULT_SPACING[method] if spacing is None else spacing
    check_choice(spacing, "spacing", SPACINGS)
    sig_train = training_sigmas(schedule)
    log_sig = np.log(sig_train)
    karras = opts["use_karras_sigmas"]
    if method.startswith("dpmpp"):
        if karras:
            sig = karras_sigmas(sig_train[0], sig_train[-1], S)
            ts = np.round(sigma_to_t(sig, log_sig))
        else:
            ts = _dpm_timesteps(schedule, S, spacing, opts["lambda_min_clipped"])
            sig = np.interp(ts, np.arange(T), sig_train)
    else:
        ts = _discrete_timesteps(T, S, spacing)
        sig = np.interp(ts, np.arange(T), sig_train)
        if karras:
            sig = karras_sigmas(sig[-1], sig[0], S)
            ts = sigma_to_t(sig, log_sig)
    final = sig_train[0] if opts.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    if S > 1 and not np.all(np.diff(sig) < 0):
        raise ValueError(f"num_steps={S} with spacing={spacing!r} gives repeated noise levels for method={method!r} "
                         f"(timesteps {ts.tolist()[:8]}...); use fewer steps or another spacing")
    if np.any(ts < 0) or np.any(ts > T - 1):
        raise ValueError(f"num_steps={S} with spacing={spacing!r} gives timesteps outside [0, {T - 1}]")
    sigmas = np.concatenate([sig, [final]])
    if method == "heun":
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    return np.ascontiguousarray(ts, dtype=np.float64), np.ascontiguousarray(sigmas, dtype=np.float64)


def start_sigma(method: str, schedule: Schedule, num_steps: int, spacing: str | None = None, start: int = 0,
                **opts) -> tuple[float, float]:
    """``(t, sigma)`` of step ``start``: the level to which image-to-image noises its input before
    ``solve(..., start=start)`` (``x_ddpm = (x0 + sigma eps) / sqrt(sigma^2 + 1)``, diffusers' ``add_noise`` at
    ``begin_index = start * order``)."""
    ts, sigmas = schedule_sigmas(method, schedule, num_steps, spacing, **opts)
    if not isinstance(start, (numbers.Integral, np.integer)) or isinstance(start, (bool, np.bool_)) \
            or not 0 <= int(start) < int(num_steps):
        raise ValueError(f"start must be an integer in [0, num_steps={num_steps}), got {start!r}")
    k = int(start) * CALLS_PER_STEP[method]
    return float(ts[k]), float(sigmas[k])


# ---------------------------------------------------------------------------------------------
# the pieces of a step


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """VP coefficients of a sigma-space level: ``alpha = 1 / sqrt(sigma^2 + 1)``, ``sigma_vp = sigma alpha``."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _x0_coefficients(prediction_type: str, sigma: float) -> tuple[float, float]:
    """``(A, B)`` with ``x0 = A x_ddpm + B model_output`` at noise level ``sigma``.

    epsilon: ``x0 = sqrt(sigma^2+1) x - sigma eps`` (DDPM eq. 15 in sigma terms); v: ``x0 = alpha x - sigma_vp v``
    (Salimans & Ho 2022, App. D); sample: the output is x0.
    """
    alpha, sigma_vp = _alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma
    if prediction_type == "v_prediction":
        return alpha, -sigma_vp
    return 0.0, 1.0


class _Stepper:
    """Calls the model and applies the per-sample linear combinations of one run (native arrays throughout)."""

    def __init__(self, kern, model_fn, x, opts, rng):
        self.kern, self.model_fn, self.opts, self.rng = kern, model_fn, opts, rng
        self.shape = tuple(int(s) for s in x.shape)
        self.n = self.shape[0]
        self.m = int(np.prod(self.shape[1:], dtype=np.int64))
        self.dtype = np.dtype(x.dtype)

    def flat(self, a):
        return a.reshape(self.n, self.m)

    def call(self, x, t: float):
        """The model's output at (x, t), checked and cast to x's dtype."""
        out = self.model_fn(x, np.full(self.n, t, dtype=np.float64))
        if not hasattr(out, "shape") or tuple(int(s) for s in out.shape) != self.shape:
            raise ValueError(f"model_fn must return an array of the shape of x {self.shape}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return self.kern.asarray(out, self.dtype)

    def noise(self):
        return self.kern.asarray(self.rng.standard_normal(self.shape, dtype=self.dtype))

    def update(self, x, out, sigma: float, C: float, D: float, E: float = 0.0, noise=None):
        """``x0 = clip(A x + B out)`` (the model's x0 at ``sigma``, thresholded or clipped where the method does
        it) and ``x_new = C x0 + D x + E noise``, in one ``sampler_update``. Returns ``(x_new, x0)``."""
        A, B = _x0_coefficients(self.opts["prediction_type"], sigma)
        n = self.n
        lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
        A, B = np.full(n, A), np.full(n, B)
        if self.opts.get("thresholding"):
            # Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3), as diffusers' _threshold_sample:
            # s = the ratio-quantile of |x0| per sample, clamped to [1, sample_max_value]; x0 <- clip(x0, -s, s) / s
            # = clip(x0 / s, -1, 1), which folds into A, B. The quantile is taken on the host.
            x0 = A[:, None] * self.kern.to_host(self.flat(x)).astype(np.float64) \
                + B[:, None] * self.kern.to_host(self.flat(out)).astype(np.float64)
            s = np.clip(np.quantile(np.abs(x0), self.opts["dynamic_thresholding_ratio"], axis=1),
                        1.0, self.opts["sample_max_value"])
            A, B, lo, hi = A / s, B / s, -np.ones(n), np.ones(n)
        elif self.opts.get("clip_sample"):
            r = self.opts["clip_sample_range"]
            lo, hi = np.full(n, -r), np.full(n, r)
        coef = np.stack([A, B, np.full(n, C), np.full(n, D), np.full(n, E)], axis=1)
        x_new, x0 = self.kern.sampler_update(self.flat(x), self.flat(out), self.flat(x if noise is None else noise),
                                             coef, lo, hi)
        return x_new.reshape(self.shape), x0.reshape(self.shape)

    def axpy(self, y, a, s: float):
        """``y += s a`` in place (y is always an array this run created, never one it has yielded)."""
        if s != 0.0:
            self.kern.axpy_(self.flat(y), self.flat(a), float(s))
        return y


# ---------------------------------------------------------------------------------------------
# the solvers


def _dpm_coefficients(order: int, sig: list, sde: bool, solver_type: str, diffusers_d2: bool = False):
    """``(a, [c_0, c_1, ...], e)`` with ``x_t = a x_s + sum_k c_k m_k + e z`` for one DPM-Solver++ step.

    ``sig = [sigma_t, sigma_s0, sigma_s1, ...]`` (the target level, then the current and earlier ones) and
    ``m_k`` the data predictions at ``sigma_s{k}``. With ``lambda = log(alpha / sigma_vp) = -log sigma`` and
    ``h = lambda_t - lambda_s0``, the exact solution of the data-prediction ODE (Lu et al. 2022b, Sec. 4.1)
    ``x_t = sigma_vp_t / sigma_vp_s x_s + sigma_vp_t int e^lambda x0(lambda) dlambda`` is integrated with x0
    expanded in divided differences ``D1 = (m_0 - m_1) / r0`` (``r0 = h_0 / h``) and, for order 3, ``D2``:

    - order 1 (DDIM): ``x_t = (sigma_vp_t / sigma_vp_s) x_s + alpha_t (1 - e^-h) m_0``;
    - 2M midpoint (Algorithm 2): ``... + 0.5 alpha_t (1 - e^-h) D1``; ``solver_type="heun"``:
      ``... + alpha_t ((e^-h - 1) / h + 1) D1``;
    - 3M: ``... + alpha_t ((e^-h - 1)/h + 1) D1 - 2 alpha_t ((e^-h - 1 + h)/h^2 - 1/2) D2``. D1 and D2 are the
      divided differences of the three last predictions with ``D1 = h x0'`` and ``D2 = h^2 x0'' / 2`` for a
      quadratic x0(lambda), and ``int_0^h e^-(h-u) u^2 du = -2 h^2 ((e^-h - 1 + h)/h^2 - 1/2)``, hence the 2.
      diffusers (``diffusers_d2=True``) omits it: its step is exact for linear x0(lambda) only, its local
      error O(h^3), the method globally second order;
    - SDE (``sde-dpmsolver++``): ``x_t = (sigma_vp_t / sigma_vp_s) e^-h x_s + alpha_t (1 - e^-2h) (m_0 + D1 / 2)
      + sigma_vp_t sqrt(1 - e^-2h) z``.

    D1 and D2 are expanded into coefficients of m_0, m_1, m_2 (float64), as diffusers' code computes them.
    A step to sigma_t = 0 (h = inf) is exactly ``x_t = m_0``.
    """
    if sig[0] == 0.0:
        return 0.0, [1.0], 0.0
    alpha_t, sv_t = _alpha_sigma(sig[0])
    lam = [-math.log(s) for s in sig]
    h = lam[0] - lam[1]
    if h <= 0.0:  # a step of size zero (sigma_min final level after a Karras sigma_min, up to rounding)
        return 1.0, [0.0], 0.0
    em1 = math.expm1(-h)             # e^-h - 1
    sv_s = _alpha_sigma(sig[1])[1]
    if sde:
        em2 = -math.expm1(-2.0 * h)  # 1 - e^-2h
        a, k0, e = sv_t / sv_s * math.exp(-h), alpha_t * em2, sv_t * math.sqrt(em2)
        k1 = 0.5 * k0 if solver_type == "midpoint" else alpha_t * (em2 / (-2.0 * h) + 1.0)
    else:
        a, k0, e = sv_t / sv_s, -alpha_t * em1, 0.0
        # the third-order step always uses the Taylor phi_2 for D1; a second-order step the solver_type's
        k1 = 0.5 * k0 if solver_type == "midpoint" and order == 2 else alpha_t * (em1 / h + 1.0)
    if order == 1:
        return a, [k0], e
    r0 = (lam[1] - lam[2]) / h
    if order == 2:  # k0 m0 + k1 (m0 - m1) / r0
        return a, [k0 + k1 / r0, -k1 / r0], e
    r1 = (lam[2] - lam[3]) / h
    k2 = -alpha_t * ((em1 + h) / (h * h) - 0.5) * (1.0 if diffusers_d2 else 2.0)
    # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1), D1_0 = (m0-m1)/r0, D1_1 = (m1-m2)/r1
    p = k1 * (1.0 + r0 / (r0 + r1)) + k2 / (r0 + r1)
    q = (k1 * r0 + k2) / (r0 + r1)
    return a, [k0 + p / r0, -p / r0 - q / r1, q / r1], e


def _run_dpm(st: _Stepper, method, x, ts, sigmas, start):
    """Multistep DPM-Solver++ with diffusers' order schedule: the history starts empty at ``start``; order 1 on
    the first step, 2 on the second (3M); lower order at the final steps (``lower_order_final`` with fewer than
    15 steps: order 1 at the last, at most 2 at the one before; always order 1 at a last step to sigma = 0)."""
    opts = st.opts
    S = len(ts)
    solver_order = _ORDER[method]
    sde = method == "dpmpp_2m_sde"
    history = []       # data predictions, newest last
    sig_hist = []
    for i in range(start, S):
        out = st.call(x, float(ts[i]))
        final = i == S - 1 and (opts["euler_at_final"] or (opts["lower_order_final"] and S < 15)
                                or opts["final_sigmas_type"] == "zero")
        second = i == S - 2 and opts["lower_order_final"] and S < 15
        done = len(history)   # diffusers' lower_order_nums
        if solver_order == 1 or done < 1 or final:
            order = 1
        elif solver_order == 2 or done < 2 or second:
            order = 2
        else:
            order = 3
        sig = [float(sigmas[i + 1]), float(sigmas[i])] + sig_hist[::-1][:order - 1]
        a, c, e = _dpm_coefficients(order, sig, sde, opts["solver_type"], opts.get("diffusers_d2", False))
        noise = st.noise() if e != 0.0 else None
        x_new, x0 = st.update(x, out, float(sigmas[i]), c[0], a, e, noise)
        for k in range(1, order):
            st.axpy(x_new, history[-k], c[k])
        history = (history + [x0])[-(solver_order - 1):]          # at most solver_order - 1 kept
        sig_hist = (sig_hist + [float(sigmas[i])])[-(solver_order - 1):]
        x = x_new
        yield float(ts[i]), (float(ts[i + 1]) if i + 1 < S else -1), x, x0


def _euler_coefficients(s: float, s_next: float, s_level: float | None = None) -> tuple[float, float]:
    """``(C, D)`` with ``x_next = C x0 + D x`` for an Euler step of the sigma-space ODE from s to s_next
    (Karras et al. Algorithm 1, first stage): ``X' = X + (s' - s)(X - x0) / s`` with ``X = sqrt(s^2+1) x``, and
    ``x_next = X' / sqrt(s_level^2 + 1)`` (``s_level``: the noise level of the result, s_next unless noise is
    added after the step)."""
    s_level = s_next if s_level is None else s_level
    c, c_next = math.sqrt(s * s + 1.0), math.sqrt(s_level * s_level + 1.0)
    return (1.0 - s_next / s) / c_next, c * s_next / (s * c_next)


def _run_euler(st: _Stepper, method, x, ts, sigmas, start):
    """Euler, or Euler ancestral: the ancestral step goes down to ``sigma_down`` and adds ``sigma_up`` fresh noise,
    ``sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2)``, ``sigma_down = sqrt(s'^2 - sigma_up^2)`` (diffusers /
    k-diffusion's ``get_ancestral_step`` with eta = 1)."""
    S = len(ts)
    for i in range(start, S):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        out = st.call(x, float(ts[i]))
        if method == "euler_ancestral":
            s_up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
            s_down = math.sqrt(s_next ** 2 - s_up ** 2)
            C, D = _euler_coefficients(s, s_down, s_next)
            E = s_up / math.sqrt(s_next * s_next + 1.0)
        else:
            C, D = _euler_coefficients(s, s_next)
            E = 0.0
        noise = st.noise() if E != 0.0 else None
        x, x0 = st.update(x, out, s, C, D, E, noise)
        yield float(ts[i]), (float(ts[i + 1]) if i + 1 < S else -1), x, x0


def _run_heun(st: _Stepper, x, ts, sigmas, start):
    """Heun's second-order method (Karras et al. Algorithm 1): an Euler predictor to s', the model again there,
    then the trapezoidal corrector ``X' = X + (s' - s) (d + d') / 2`` with ``d = (X - x0) / s``; the last step, to
    sigma = 0, is an Euler step (d' would divide by zero), as in diffusers. One yield per step (two model calls);
    its ``x0_pred`` is the prediction at the step's own level."""
    step_sig = np.concatenate([sigmas[:1], sigmas[1::2]])   # s_0, s_1, ..., s_{S-1}, 0
    step_ts = np.concatenate([ts[:1], ts[1::2]])            # t_0, ..., t_{S-1}
    S = len(step_ts)
    for i in range(start, S):
        s, s_next = float(step_sig[i]), float(step_sig[i + 1])
        out = st.call(x, float(step_ts[i]))
        C, D = _euler_coefficients(s, s_next)
        x_pred, x0 = st.update(x, out, s, C, D)
        if s_next > 0.0:
            out2 = st.call(x_pred, float(step_ts[i + 1]))
            c, c_next, dt = math.sqrt(s * s + 1.0), math.sqrt(s_next * s_next + 1.0), s_next - s
            # x' = [c x + dt/2 ((c x - x0)/s + (c' x_pred - x0')/s')] / c'
            x_new, _ = st.update(x_pred, out2, s_next, -dt / (2.0 * s_next * c_next), dt / (2.0 * s_next))
            st.axpy(x_new, x, c * (1.0 + dt / (2.0 * s)) / c_next)
            st.axpy(x_new, x0, -dt / (2.0 * s * c_next))
            x = x_new
        else:
            x = x_pred
        yield float(step_ts[i]), (float(step_ts[i + 1]) if i + 1 < S else -1), x, x0


def solve(method: str, model_fn: Callable, schedule: Schedule, x, *, num_steps: int, spacing: str | None = None,
          rng: np.random.Generator | None = None, backend: str = "cpu", start: int = 0,
          **opts) -> Iterator[tuple]:
    """Run a sigma-space solver from the noise level of step ``start`` to the end; a generator.

    Parameters
    ----------
    method : one of :data:`METHODS`
    model_fn : callable
        ``model_fn(x, t) -> output``: x a native array of ``backend`` in the DDPM scaling, t float64 (N,) (not
        integer for Euler and Heun where diffusers interpolates), the output of x's shape in the model's
        parameterisation (``prediction_type``), native or NumPy.
    schedule : Schedule
    x : native array of ``backend`` (or NumPy), shape (N, ...), float32 or float64
        The state at the noise level of step ``start`` in the DDPM scaling (start = 0: ``x_T ~ N(0, I)``;
        image-to-image: ``(x0 + sigma eps) / sqrt(sigma^2 + 1)`` with sigma from :func:`start_sigma`). Not modified.
    num_steps : int
        S solver steps (the whole schedule, including the skipped ones).
    spacing : {"linspace", "leading", "trailing"} or None
        See :func:`schedule_sigmas` (None: diffusers' default, :data:`DEFAULT_SPACING`).
    rng : numpy.random.Generator, optional
        Draws the noise of ``euler_ancestral`` and ``dpmpp_2m_sde`` (on the host, then copied up); unused otherwise.
    backend : {"numpy", "cpu", "cuda"}
    start : int in [0, num_steps]
        Steps to skip (image-to-image with diffusers' ``strength``); the multistep history starts empty there.
    **opts : the method's options, :data:`OPTIONS` (diffusers' names and defaults, :data:`DEFAULTS`).

    Yields
    ------
    (t, prev_t, x_prev, x0_pred) after every step: t (float) the step's timestep, prev_t the next step's (-1 after
    the last), x_prev the state at the next level in the DDPM scaling (the clean sample after a last step to
    sigma = 0) and x0_pred the model's (thresholded or clipped) prediction of x0 at t; both native arrays, new
    at every step (never modified afterwards).
    """
    opts = resolve_options(method, opts)
    ts, sigmas = schedule_sigmas(method, schedule, num_steps, spacing, **opts)
    check_choice(backend, "backend", BACKENDS)
    kern = get_backend(backend)
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(x, t), got {type(model_fn).__name__}")
    if not (isinstance(x, np.ndarray) or kern.is_array(x)):
        raise TypeError(f"x must be a numpy ndarray or a native array of backend {backend!r}, got {type(x).__name__}")
    if np.dtype(x.dtype) not in (np.float32, np.float64):
        raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
    if len(x.shape) < 1 or int(x.shape[0]) < 1:
        raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    if not isinstance(start, (numbers.Integral, np.integer)) or isinstance(start, (bool, np.bool_)):
        raise TypeError(f"start must be an integer, got {start!r}")
    if not 0 <= int(start) <= int(num_steps):
        raise ValueError(f"start must lie in [0, num_steps={num_steps}], got {start}")
    if rng is not None and not isinstance(rng, RNG_TYPES):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    stochastic = method in ("euler_ancestral", "dpmpp_2m_sde")
    st = _Stepper(kern, model_fn, x, opts, as_generator(rng) if stochastic else None)
    x = kern.asarray(x)
    if method.startswith("dpmpp"):
        return _run_dpm(st, method, x, ts, sigmas, int(start))
    if method == "heun":
        return _run_heun(st, x, ts, sigmas, int(start))
    return _run_euler(st, method, x, ts, sigmas, int(start))
