"""The forward process q and the closed-form quantities built on it.

Notation follows Ho et al. 2020 (DDPM): ``abar_t = alphas_cumprod[t]``; ``x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps`` (eq. 4); the posterior ``q(x_{t-1} | x_t, x0)`` (eqs. 6-7). The v
parameterisation is Salimans & Ho 2022 (Sec. 4 and Appendix D): ``v = sqrt(abar) eps - sqrt(1-abar) x0``.

Arrays may have any shape (N, ...): images (N, C, H, W) or vectors (N, D). Per-timestep coefficients
are gathered from the float64 schedule buffers, cast to the data's dtype and broadcast per sample.
"""
from __future__ import annotations

import numpy as np
from scipy import special

from difnumpy._validation import (as_generator, check_float_array, check_rng_noise, check_same_shape,
                                  check_timesteps)
from difnumpy.kernels import get_backend
from difnumpy.schedules import Schedule


def _check_schedule(schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a difnumpy Schedule, got {type(schedule).__name__}")
    return schedule


def extract(buffer: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Gather ``buffer[t]`` and shape it (N, 1, ..., 1) to broadcast against ``x``, in x's dtype."""
    return buffer[t].astype(x.dtype).reshape((t.shape[0],) + (1,) * (x.ndim - 1))


def _prepare(schedule, x, t, name="x0", *, allow_nan=False):
    _check_schedule(schedule)
    check_float_array(x, name, allow_nan=allow_nan)
    return check_timesteps(t, schedule.num_timesteps, x.shape[0])


def q_sample(schedule: Schedule, x0: np.ndarray, t, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None, *, backend: str = "cpu") -> np.ndarray:
    """Sample ``x_t ~ q(x_t | x0)``.

    Parameters
    ----------
    schedule : Schedule
    x0 : ndarray, shape (N, ...), float32 or float64
        Clean data.
    t : int or ndarray of int, shape (N,)
        Timesteps in [0, T-1].
    noise : ndarray, shape of x0, optional
        The eps to use; drawn from ``rng`` if not given.
    rng : numpy.random.Generator, optional
        Source of the noise when ``noise`` is not given (a fresh, OS-seeded one if both are None).
    backend : {"numpy", "cpu", "cuda"}
        Kernel backend (:func:`difnumpy.kernels.get_backend`). Host arrays in, host array out.

    Returns
    -------
    x_t : ndarray, shape of x0, dtype of x0

    Notes
    -----
    DDPM eq. 4: ``q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)``, so
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``eps ~ N(0, I)``.
    """
    tt = _prepare(schedule, x0, t)
    check_rng_noise(rng, noise)
    if noise is None:
        noise = as_generator(rng).standard_normal(x0.shape, dtype=x0.dtype)
    else:
        check_float_array(noise, "noise")
        check_same_shape(x0, noise, "x0", "noise")
        noise = noise.astype(x0.dtype, copy=False)
    n = x0.shape[0]
    x2 = np.ascontiguousarray(x0).reshape(n, -1)
    e2 = np.ascontiguousarray(noise).reshape(n, -1)
    out = get_backend(backend).q_sample(x2, e2, schedule.sqrt_alphas_cumprod[tt],
                                        schedule.sqrt_one_minus_alphas_cumprod[tt])
    return out.reshape(x0.shape)


def q_mean_variance(schedule: Schedule, x0: np.ndarray, t):
    """Mean, variance and log-variance of ``q(x_t | x0)`` (DDPM eq. 4).

    Returns
    -------
    mean : ndarray, shape of x0 ; variance, log_variance : ndarray, shape (N, 1, ..., 1), dtype of x0
    """
    tt = _prepare(schedule, x0, t)
    mean = extract(schedule.sqrt_alphas_cumprod, tt, x0) * x0
    var = extract(1.0 - schedule.alphas_cumprod, tt, x0)
    log_var = np.log(var)  # -inf never occurs: abar_t < 1 for every valid schedule
    return mean, var, log_var


def q_posterior_mean_variance(schedule: Schedule, x0: np.ndarray, x_t: np.ndarray, t):
    """Mean and variance of the forward-process posterior ``q(x_{t-1} | x_t, x0)``.

    Parameters
    ----------
    x0, x_t : ndarray, shape (N, ...), float32 or float64 (same shape)
    t : int or ndarray of int, shape (N,)

    Returns
    -------
    mean : ndarray, shape of x0
    variance, log_variance_clipped : ndarray, shape (N, 1, ..., 1), dtype of x0

    Notes
    -----
    DDPM eqs. 6-7: ``mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
    + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t`` and
    ``beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t``.
    """
    tt = _prepare(schedule, x0, t)
    check_float_array(x_t, "x_t")
    check_same_shape(x0, x_t, "x0", "x_t")
    mean = extract(schedule.posterior_mean_coef1, tt, x0) * x0 + extract(schedule.posterior_mean_coef2, tt, x0) * x_t
    var = extract(schedule.posterior_variance, tt, x0)
    log_var = extract(schedule.posterior_log_variance_clipped, tt, x0)
    return mean, var, log_var


def predict_x0_from_eps(schedule: Schedule, x_t: np.ndarray, t, eps: np.ndarray) -> np.ndarray:
    """``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (DDPM eq. 4 solved for x0, eq. 15).

    Raises ValueError where ``abar_t == 0`` (zero terminal SNR): x0 cannot be recovered from eps there;
    use the v parameterisation.
    """
    tt = _prepare(schedule, x_t, t, "x_t")
    check_same_shape(x_t, eps, "x_t", "eps")
    abar = schedule.alphas_cumprod[tt]  # gather first: 1/abar of the whole buffer would divide by the 0 of
    if np.any(abar == 0.0):             # a zero-terminal-SNR schedule on every call
        raise ValueError("t: x0 cannot be predicted from eps where alphas_cumprod[t] == 0 (zero terminal SNR); "
                         "use prediction_type='v_prediction'")
    shape = (tt.shape[0],) + (1,) * (x_t.ndim - 1)
    return (np.sqrt(1.0 / abar).astype(x_t.dtype).reshape(shape) * x_t
            - np.sqrt(1.0 / abar - 1.0).astype(x_t.dtype).reshape(shape) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: np.ndarray, t, x0: np.ndarray) -> np.ndarray:
    """``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` (DDPM eq. 4 solved for eps)."""
    tt = _prepare(schedule, x_t, t, "x_t")
    check_same_shape(x_t, x0, "x_t", "x0")
    return (x_t - extract(schedule.sqrt_alphas_cumprod, tt, x_t) * x0) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, tt, x_t)


def get_velocity(schedule: Schedule, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
    """The v target, Salimans & Ho 2022 (Sec. 4): ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``."""
    tt = _prepare(schedule, x0, t)
    check_same_shape(x0, noise, "x0", "noise")
    return (extract(schedule.sqrt_alphas_cumprod, tt, x0) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, tt, x0) * x0)


def predict_x0_from_v(schedule: Schedule, x_t: np.ndarray, t, v: np.ndarray) -> np.ndarray:
    """``x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v`` (Salimans & Ho 2022, Appendix D)."""
    tt = _prepare(schedule, x_t, t, "x_t")
    check_same_shape(x_t, v, "x_t", "v")
    return (extract(schedule.sqrt_alphas_cumprod, tt, x_t) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, tt, x_t) * v)


def predict_eps_from_v(schedule: Schedule, x_t: np.ndarray, t, v: np.ndarray) -> np.ndarray:
    """``eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v`` (Salimans & Ho 2022, Appendix D)."""
    tt = _prepare(schedule, x_t, t, "x_t")
    check_same_shape(x_t, v, "x_t", "v")
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, tt, x_t) * x_t
            + extract(schedule.sqrt_alphas_cumprod, tt, x_t) * v)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    ``0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))``;
    arguments broadcast against each other (improved-diffusion ``losses.normal_kl``).
    """
    mean1, logvar1, mean2, logvar2 = (np.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales, *, bin_width: float = 2.0 / 255.0):
    """Log-likelihood of data discretised into bins, under a Gaussian: the DDPM decoder ``L_0`` (eq. 13).

    Parameters
    ----------
    x : ndarray, values on the bin centres in [-1, 1] (e.g. uint8 images scaled by ``x/127.5 - 1``)
    means, log_scales : ndarray, broadcast against x
        Gaussian mean and log standard deviation.
    bin_width : float
        Width of one bin in data units: ``2/255`` for 8-bit images, ``2/16`` for 17-level digits.

    Returns
    -------
    log_probs : ndarray, shape broadcast of the inputs, float64, in nats
        ``log P(bin of x)``; the first and last bins extend to -inf and +inf.

    Notes
    -----
    DDPM eq. 13 with improved-diffusion's ``discretized_gaussian_log_likelihood``, computed with the
    exact normal CDF (``scipy.special.log_ndtr``) in float64 instead of the tanh approximation.
    """
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    log_scales = np.asarray(log_scales, dtype=np.float64)
    if not bin_width > 0:
        raise ValueError(f"bin_width must be > 0, got {bin_width}")
    half = bin_width / 2.0
    inv_std = np.exp(-log_scales)
    upper = (x - means + half) * inv_std
    lower = (x - means - half) * inv_std
    log_cdf_upper = special.log_ndtr(upper)          # log P(z < upper), used at the top edge
    log_sf_lower = special.log_ndtr(-lower)          # log P(z > lower), used at the bottom edge
    # log(Phi(upper) - Phi(lower)) on the side of the mean where it does not cancel:
    # log(a - b) = log a + log1p(-exp(log b - log a))
    with np.errstate(divide="ignore"):
        left = log_cdf_upper + np.log1p(-np.exp(special.log_ndtr(lower) - log_cdf_upper))
        right = log_sf_lower + np.log1p(-np.exp(special.log_ndtr(-upper) - log_sf_lower))
    mid = np.where(lower > 0, right, left)
    lo_edge = -1.0 + half * 1.001
    hi_edge = 1.0 - half * 1.001
    return np.where(x < lo_edge, log_cdf_upper, np.where(x > hi_edge, log_sf_lower, mid))
