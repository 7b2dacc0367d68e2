"""Compute kernels and the single dispatch point between backends.

``get_backend(name)`` returns a module exposing the kernel functions listed in
:mod:`difnumpy.kernels.reference` (the NumPy twins that define them):

- ``"numpy"``: :mod:`difnumpy.kernels.reference`, plain NumPy (the readable definition);
- ``"cpu"``: :mod:`difnumpy.kernels.cpu`, ``numba.njit`` kernels;
- ``"cuda"``: :mod:`difnumpy.kernels.cuda`, ``numba.cuda`` kernels (needs an NVIDIA GPU and numba-cuda,
  or ``NUMBA_ENABLE_CUDASIM=1``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("numpy", "cpu", "cuda")

__all__ = ["BACKENDS", "check_backend", "get_backend", "backend_name", "cuda_available"]

_MODULES = {"numpy": "reference", "cpu": "cpu", "cuda": "cuda"}
_NAMES = {f"difnumpy.kernels.{m}": name for name, m in _MODULES.items()}


def backend_name(kern: ModuleType) -> str:
    """The backend name ("numpy", "cpu", "cuda") of a kernel module returned by :func:`get_backend`."""
    return _NAMES[kern.__name__]


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a known backend, else raise ValueError."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def get_backend(backend: str | ModuleType = "cpu") -> ModuleType:
    """Return the kernel module for ``backend`` ("numpy", "cpu" or "cuda"; a kernel module itself is
    returned as it is, so functions may take either).

    Raises
    ------
    ValueError
        If ``backend`` is not one of :data:`BACKENDS`.
    RuntimeError
        If ``backend="cuda"`` is asked for but no usable GPU / numba-cuda is present.
    """
    if isinstance(backend, ModuleType) and backend.__name__ in _NAMES:
        return backend
    check_backend(backend)
    if backend == "cuda":
        from difnumpy.kernels import cuda  # noqa: F401  (raises a clear error itself if unusable)
    return importlib.import_module(f"difnumpy.kernels.{_MODULES[backend]}")


def cuda_available() -> bool:
    """True when ``backend="cuda"`` can run here (an NVIDIA GPU with numba-cuda, or the CUDA simulator).

    Never raises: every reason :func:`get_backend` would give for refusing "cuda" yields False.
    """
    try:
        get_backend("cuda")
    except Exception:  # RuntimeError (no GPU / driver / numba-cuda), or a broken CUDA installation
        return False
    return True
