"""Noise schedules: the betas and every buffer derived from them.

All buffers are float64 (as in improved-diffusion's ``GaussianDiffusion``); samplers and the forward
process cast the coefficients they gather to the dtype of the data.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")


def _cosine_alpha_bar(u: np.ndarray, s: float) -> np.ndarray:
    return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2


def make_betas(name: str, num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
               max_beta: float = 0.999, cosine_s: float = 0.008) -> np.ndarray:
    """Return the betas of a named schedule.

    Parameters
    ----------
    name : {"linear", "scaled_linear", "cosine", "sigmoid"}
        ``"linear"``: ``linspace(beta_start, beta_end, T)`` (DDPM, Sec. 4).
        ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (latent diffusion).
        ``"cosine"``: Nichol & Dhariwal 2021, eq. 17:
        ``abar(u) = cos^2(((u + s) / (1 + s)) pi/2)`` and
        ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``.
        ``"sigmoid"``: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``.
    num_timesteps : int
        T >= 1.

    Returns
    -------
    betas : ndarray, shape (T,), float64
    """
    if not isinstance(num_timesteps, (numbers.Integral, np.integer)) or isinstance(num_timesteps, bool) \
            or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    T = int(num_timesteps)
    if name in ("linear", "scaled_linear", "sigmoid"):
        if not (0.0 < beta_start <= beta_end <= 1.0):
            raise ValueError(f"need 0 < beta_start <= beta_end <= 1, got beta_start={beta_start}, "
                             f"beta_end={beta_end}")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif name == "cosine":
        if not (0.0 < max_beta <= 1.0):
            raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
        if not cosine_s >= 0.0:
            raise ValueError(f"cosine_s must be >= 0, got {cosine_s}")
        u = np.arange(T + 1, dtype=np.float64) / T
        abar = _cosine_alpha_bar(u, cosine_s)
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    elif name == "sigmoid":
        z = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        betas = 1.0 / (1.0 + np.exp(-z)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"unknown schedule name {name!r}; valid names are {SCHEDULE_NAMES}")
    return np.ascontiguousarray(betas, dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that the terminal SNR is exactly zero.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift ``sqrt(abar)`` so its last value is 0 and scale it so its first value is unchanged.

    Parameters
    ----------
    betas : ndarray, shape (T,), float64, T >= 2

    Returns
    -------
    betas : ndarray, shape (T,), float64, with ``cumprod(1 - betas)[-1] == 0`` exactly and
        ``cumprod(1 - betas)[0]`` unchanged; the last beta is 1.
    """
    betas = _check_betas(betas)
    if betas.shape[0] < 2:
        raise ValueError("betas must have at least 2 entries to rescale to zero terminal SNR")
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    a0, aT = abar_sqrt[0], abar_sqrt[-1]
    if not a0 > aT:
        raise ValueError("betas give a constant alphas_cumprod; cannot rescale to zero terminal SNR")
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar_sqrt[-1] = 0.0  # exact, whatever the rounding above
    abar = abar_sqrt ** 2
    alphas = np.empty_like(abar)
    alphas[0] = abar[0]
    alphas[1:] = abar[1:] / abar[:-1]
    return 1.0 - alphas


def _check_betas(betas) -> np.ndarray:
    arr = np.asarray(betas)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array with at least one entry, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"betas must be a real array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("betas contains NaN or inf")
    if np.any(arr <= 0.0) or np.any(arr > 1.0):
        raise ValueError(f"betas must lie in (0, 1], got values in [{arr.min()}, {arr.max()}]")
    return arr


class Schedule:
    """A discrete noise schedule and its derived float64 buffers (DDPM, Ho et al. 2020).

    Parameters
    ----------
    betas : array_like, shape (T,)
        Variances of the forward steps, each in (0, 1] (beta_T = 1 is allowed for zero terminal SNR).

    Attributes
    ----------
    num_timesteps : int
        T. Timesteps are 0-indexed: t = 0 is the first noising step.
    betas, alphas : ndarray, shape (T,), float64
        ``alphas = 1 - betas``.
    alphas_cumprod : ndarray, shape (T,), float64
        ``abar_t = prod_{s<=t} alpha_s`` (DDPM eq. 4).
    alphas_cumprod_prev : ndarray, shape (T,), float64
        ``abar_{t-1}`` with ``abar_{-1} = 1``.
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod : ndarray, shape (T,), float64
    posterior_variance : ndarray, shape (T,), float64
        ``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (DDPM eq. 7); zero at t = 0.
    posterior_log_variance_clipped : ndarray, shape (T,), float64
        ``log beta~_t`` with the t = 0 entry replaced by the t = 1 entry (improved-diffusion), so it is finite.
    posterior_mean_coef1, posterior_mean_coef2 : ndarray, shape (T,), float64
        ``mu~_t = coef1 * x0 + coef2 * x_t`` with ``coef1 = sqrt(abar_{t-1}) beta_t / (1 - abar_t)``,
        ``coef2 = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)`` (DDPM eq. 7).
    snr : ndarray, shape (T,), float64
        ``abar_t / (1 - abar_t)``.
    """

    def __init__(self, betas, *, name: str | None = None):
        betas = _check_betas(betas)
        self.name = name
        self.num_timesteps = int(betas.shape[0])
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        pv = self.posterior_variance
        clip_src = pv[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.concatenate([[clip_src], pv[1:]]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / one_minus
        self.snr = self.alphas_cumprod / one_minus
        for k, v in vars(self).items():
            if isinstance(v, np.ndarray):
                v.setflags(write=False)  # buffers are shared by every caller: keep them immutable

    @classmethod
    def from_name(cls, name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **kw) -> "Schedule":
        """Build a schedule from :func:`make_betas` (``**kw`` go there), optionally rescaled with
        :func:`rescale_zero_terminal_snr`."""
        betas = make_betas(name, num_timesteps, **kw)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, name=name)

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (f"Schedule(name={self.name!r}, num_timesteps={self.num_timesteps}, "
                f"beta_0={self.betas[0]:.3g}, beta_T={self.betas[-1]:.3g})")
