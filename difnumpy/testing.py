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
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), (x_t.shape[0],))
        abar = self.schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
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
