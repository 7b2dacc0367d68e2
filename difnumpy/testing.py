"""Analytic oracles for testing samplers without a network.

For Gaussian data ``x0 ~ N(mu, diag(s^2))`` the forward marginal is
``x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar)`` and the minimum-MSE predictions are linear in x_t
(the conditional mean of a joint Gaussian):

- ``E[eps | x_t] = sqrt(1 - abar) / (abar s^2 + 1 - abar) * (x_t - sqrt(abar) mu)``
- ``E[x0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) * (x_t - sqrt(abar) mu)``
- ``E[v | x_t] = sqrt(abar) E[eps | x_t] - sqrt(1 - abar) E[x0 | x_t]``

A model that outputs these is the optimal denoiser: the samplers driven by it must reproduce the data
distribution up to their own discretisation error.
"""
from __future__ import annotations

import numpy as np

from difnumpy._validation import PREDICTION_TYPES, check_choice
from difnumpy.schedules import Schedule


class GaussianOracle:
    """The exact (Bayes-optimal) denoiser for data ``N(mu, diag(s^2))``.

    Parameters
    ----------
    schedule : Schedule
    mu, s : array_like, shape (...) (the per-sample data shape, e.g. (D,) or (C, H, W))
    prediction_type : {"epsilon", "sample", "v_prediction"}

    Calling ``oracle(x_t, t)`` with x_t of shape (N, ...) and t int64 (N,) returns the prediction in x_t's dtype.
    """

    def __init__(self, schedule: Schedule, mu, s, prediction_type: str = "epsilon"):
        self.schedule = schedule
        self.mu = np.asarray(mu, dtype=np.float64)
        self.s = np.asarray(s, dtype=np.float64)
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)

    def __call__(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        abar = _abar(self.schedule, t, x_t)
        sa, s1 = np.sqrt(abar), np.sqrt(1.0 - abar)
        var = abar * self.s ** 2 + 1.0 - abar
        centred = x_t.astype(np.float64) - sa * self.mu
        eps = s1 / var * centred
        x0 = self.mu + sa * self.s ** 2 / var * centred
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "sample":
            out = x0
        else:
            out = sa * eps - s1 * x0
        return out.astype(x_t.dtype)


def _output(x_t, x0, abar, prediction_type):
    """The model output for the posterior mean ``x0`` (eps and v follow linearly from it)."""
    sa, s1 = np.sqrt(abar), np.sqrt(1.0 - abar)
    if prediction_type == "sample":
        return x0
    eps = (x_t - sa * x0) / s1
    return eps if prediction_type == "epsilon" else sa * eps - s1 * x0


def _abar(schedule: Schedule, t, x_t: np.ndarray) -> np.ndarray:
    """``abar`` at each sample's timestep, shape (N, 1, ...): ``alphas_cumprod[t]`` for integer t; for a
    real t, the noise level that diffusers' sigma-space schedulers mean by it (log sigma interpolated
    linearly between training steps, ``sigma = sqrt((1 - abar) / abar)``)."""
    t = np.broadcast_to(np.asarray(t), (x_t.shape[0],))
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    if not np.issubdtype(t.dtype, np.floating) or np.all(t == np.round(t)):
        return schedule.alphas_cumprod[t.astype(np.int64)].reshape(shape)
    ab = schedule.alphas_cumprod
    log_sigmas = 0.5 * np.log((1.0 - ab) / ab)
    sigma = np.exp(np.interp(t, np.arange(ab.size), log_sigmas))
    return (1.0 / (1.0 + sigma ** 2)).reshape(shape)


class GaussianMixtureOracle:
    """The exact denoiser of class-conditional Gaussian data, conditional and unconditional.

    Class ``k`` (of K) is ``N(mu[k], diag(s[k]^2))`` with probability ``weights[k]``; the unconditional
    data is their mixture. ``oracle(x_t, t, class_labels=y)`` gives, per sample, the Bayes-optimal
    prediction for class ``y`` (``y < K``) or for the mixture (``y == K``, "no class"; also when
    ``class_labels`` is None).

    Parameters
    ----------
    schedule : Schedule
    mu, s : array_like, shape (K, D)
    weights : array_like, shape (K,), positive (normalised here)
    prediction_type : {"epsilon", "sample", "v_prediction"}

    Notes
    -----
    Class k: ``E[x0 | x_t, k] = mu_k + sqrt(abar) s_k^2 / (abar s_k^2 + 1 - abar) (x_t - sqrt(abar) mu_k)``.
    Mixture: ``E[x0 | x_t] = sum_k r_k(x_t) E[x0 | x_t, k]`` with the posterior class probabilities
    ``r_k ∝ weights_k N(x_t; sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I)`` (Bayes' rule on the marginals of
    DDPM eq. 4). eps and v follow from ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``.
    """

    def __init__(self, schedule: Schedule, mu, s, weights=None, prediction_type: str = "epsilon"):
        self.schedule = schedule
        self.mu = np.atleast_2d(np.asarray(mu, dtype=np.float64))
        self.s = np.broadcast_to(np.asarray(s, dtype=np.float64), self.mu.shape)
        K = self.mu.shape[0]
        w = np.full(K, 1.0 / K) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (K,) or np.any(w <= 0):
            raise ValueError(f"weights must be {K} positive numbers, got {weights!r}")
        self.weights = w / w.sum()
        self.num_classes = K
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)

    def posterior_mean(self, x_t: np.ndarray, t, class_labels=None) -> np.ndarray:
        """``E[x0 | x_t, y]``, shape of ``x_t`` (N, D), float64."""
        x = np.asarray(x_t, dtype=np.float64)
        n = x.shape[0]
        y = np.full(n, self.num_classes) if class_labels is None else np.asarray(class_labels)
        ab = _abar(self.schedule, t, x)                                   # (N, 1)
        sa = np.sqrt(ab)
        var = ab[:, None, :] * self.s[None] ** 2 + 1.0 - ab[:, None, :]   # (N, K, D)
        centred = x[:, None, :] - sa[:, None, :] * self.mu[None]           # (N, K, D)
        x0_k = self.mu[None] + sa[:, None, :] * self.s[None] ** 2 / var * centred
        logp = np.log(self.weights)[None] - 0.5 * np.sum(centred ** 2 / var + np.log(var), axis=2)  # (N, K)
        r = np.exp(logp - logp.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        mix = np.einsum("nk,nkd->nd", r, x0_k)
        cond = x0_k[np.arange(n), np.minimum(y, self.num_classes - 1)]
        return np.where((y == self.num_classes)[:, None], mix, cond)

    def __call__(self, x_t: np.ndarray, t, class_labels=None) -> np.ndarray:
        x0 = self.posterior_mean(x_t, t, class_labels)
        return _output(np.asarray(x_t, np.float64), x0, _abar(self.schedule, t, x_t),
                       self.prediction_type).astype(x_t.dtype)


class CorrelatedGaussianOracle:
    """The exact denoiser for data ``N(mean, cov)`` with a full covariance (x of shape (N, D)).

    Notes
    -----
    The conditional mean of a joint Gaussian: with ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``,
    ``E[x0 | x_t] = mean + sqrt(abar) cov (abar cov + (1 - abar) I)^{-1} (x_t - sqrt(abar) mean)``.
    """

    def __init__(self, schedule: Schedule, mean, cov, prediction_type: str = "epsilon"):
        self.schedule = schedule
        self.mean = np.asarray(mean, dtype=np.float64)
        self.cov = np.asarray(cov, dtype=np.float64)
        if self.cov.shape != (self.mean.size, self.mean.size):
            raise ValueError(f"cov must have shape ({self.mean.size}, {self.mean.size}), got {self.cov.shape}")
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)

    def __call__(self, x_t: np.ndarray, t) -> np.ndarray:
        x = np.asarray(x_t, dtype=np.float64)
        ab = _abar(self.schedule, t, x)[:, 0]
        x0 = np.empty_like(x)
        eye = np.eye(self.mean.size)
        for a in np.unique(ab):
            rows = ab == a
            gain = np.sqrt(a) * self.cov @ np.linalg.inv(a * self.cov + (1.0 - a) * eye)
            x0[rows] = self.mean + (x[rows] - np.sqrt(a) * self.mean) @ gain.T
        return _output(x, x0, ab[:, None], self.prediction_type).astype(x_t.dtype)
