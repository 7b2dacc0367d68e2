"""Small argument checkers shared by the library (convention 8: name the argument, what was given,
what is allowed)."""
from __future__ import annotations

import numbers

import numpy as np

#: The network's output parameterisations: eps (Ho et al. 2020), x0, or v (Salimans & Ho 2022, Sec. 4).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class SampleGenerators:
    """One ``np.random.Generator`` per sample, seeded by ``(seed, sample index)``: noise that does not
    depend on how the samples are batched or sharded over processes.

    A sampler draws its noise through ``standard_normal(shape, dtype)``, the only method it uses; here
    row i of every draw comes from sample ``indices[i]``'s own stream. So sample j gets the same x_T and
    the same step noise whether it is drawn alone, in a batch of 256, or on another MPI rank.

    Parameters
    ----------
    seed : int >= 0, or a tuple of them (sample i's stream is ``default_rng([*seed, i])``)
    indices : sequence of int >= 0, the global indices of the samples of this batch (its rows)
    """

    def __init__(self, seed, indices):
        key = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        if not key or any(isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) or v < 0
                          for v in key):
            raise ValueError(f"seed must be an int >= 0 or a tuple of them, got {seed!r}")
        self.indices = [int(i) for i in indices]
        if not self.indices or min(self.indices) < 0:
            raise ValueError(f"indices must be non-empty ints >= 0, got {indices!r}")
        self._gens = [np.random.default_rng([*(int(v) for v in key), i]) for i in self.indices]

    def standard_normal(self, size, dtype=np.float64) -> np.ndarray:
        size = (size,) if isinstance(size, (numbers.Integral, np.integer)) else tuple(int(s) for s in size)
        if not size or size[0] != len(self._gens):
            raise ValueError(f"a per-sample draw needs shape ({len(self._gens)}, ...), one row per sample; got {size}")
        return np.stack([g.standard_normal(size[1:], dtype=dtype) for g in self._gens])


RNG_TYPES = (np.random.Generator, SampleGenerators)


def check_rng_noise(rng, noise, noise_name: str = "noise") -> None:
    """Both an explicit array and a Generator given at once is ambiguous: refuse it."""
    if rng is not None and noise is not None:
        raise ValueError(f"give either {noise_name}= or rng=, not both")
    if rng is not None and not isinstance(rng, RNG_TYPES):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def as_generator(rng) -> np.random.Generator:
    """``rng`` as a Generator: a Generator (or :class:`SampleGenerators`) is returned as is, an int seeds
    a new one, None gives a fresh one seeded from the OS (never the global NumPy RNG)."""
    if isinstance(rng, RNG_TYPES):
        return rng
    if rng is None or isinstance(rng, (numbers.Integral, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def check_float_array(x, name: str, *, min_ndim: int = 1, allow_nan: bool = False) -> np.ndarray:
    """``x`` as a float32/float64 ndarray with at least ``min_ndim`` dims and (by default) no NaN/inf."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    if not allow_nan and not np.isfinite(x).all():  # (the method: ~1.5 us less a call than np.all)
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {a.shape}, got {b.shape}")


def check_timesteps(t, num_timesteps: int, batch: int, name: str = "t", *, allow_minus_one: bool = False) -> np.ndarray:
    """Return ``t`` as an int64 array of shape (batch,).

    ``t`` may be a Python/NumPy integer (broadcast to the batch) or an integer array of shape (batch,).
    Values must lie in [0, num_timesteps - 1] (or -1 too, with ``allow_minus_one``, which samplers use
    for "after the final step"). Negative indices are never wrapped.
    """
    lo = -1 if allow_minus_one else 0
    if isinstance(t, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer or an integer array, got bool")
    if isinstance(t, (numbers.Integral, np.integer)):
        arr = np.full(batch, int(t), dtype=np.int64)
    else:
        arr = np.asarray(t)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must be an integer or an integer array, got dtype {arr.dtype}")
        if arr.ndim == 0:
            arr = np.full(batch, int(arr), dtype=np.int64)
        elif arr.shape != (batch,):
            raise ValueError(f"{name} must be an int or an int array of shape ({batch},), got shape {arr.shape}")
        arr = arr.astype(np.int64)
    if arr.size and (arr.min() < lo or arr.max() > num_timesteps - 1):
        raise ValueError(f"{name} must lie in [{lo}, {num_timesteps - 1}], got values in "
                         f"[{int(arr.min())}, {int(arr.max())}]")
    return arr


def check_choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value
