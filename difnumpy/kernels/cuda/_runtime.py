"""The CUDA backend's runtime: availability, launch configuration, the kernel registry, native arrays.

- **Availability.** Importing this module where numba-cuda or a GPU is missing raises a RuntimeError that
  says why and how to run without a GPU (``NUMBA_ENABLE_CUDASIM=1`` before numba is imported). With
  ``DIFNUMPY_CUDA_COMPILE_ONLY=1`` it imports anyway, for ``numba.cuda.compile_ptx`` only (no launches).
- **Launch configuration.** Smaller under the simulator, where every CUDA thread is a Python thread.
- **Kernel registry.** Every kernel of the package is made by a builder ``build_<name>(dt)`` registered
  with :func:`kernel` together with its argument types as a function of the dtype. The builder returns
  the kernel's Python function, its constants NumPy scalars of ``dt`` (so float32 kernels compile
  without ``.f64`` instructions); :func:`kernel` turns it into a getter ``build_<name>(dtype)`` that
  compiles it with ``cuda.jit`` once per dtype. :data:`KERNELS` lists them all: the PTX test compiles
  each for real hardware (``tests/test_cuda_ptx.py``), and a test checks that every launch is registered
  with the argument types it is launched with.
- **Native arrays** (the backend API's array functions, ARCHITECTURE.md "Backends"): numba device
  arrays. Host wrappers take NumPy or device arrays: NumPy in -> copied up, computed, copied down, NumPy
  out; device arrays in -> device arrays out. Per-sample coefficient arrays are host float64.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np


# ------------------------------------------------------------------------------------------------
# availability: a clear error instead of a crash
# ------------------------------------------------------------------------------------------------

def _probe():
    """Return ``(numba, numba.cuda, simulator, reason)``; reason is None when kernels can run."""
    try:
        import numba
        from numba import cuda
    except Exception as e:  # ImportError, or a broken CUDA installation
        return None, None, False, (f"numba.cuda cannot be imported ({type(e).__name__}: {e}); "
                                   f"install the GPU extra: pip install 'difnumpy[cuda]'")
    sim = bool(getattr(numba.config, "ENABLE_CUDASIM", False))
    try:
        ok = bool(cuda.is_available())
    except Exception as e:  # pragma: no cover (driver errors)
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "numba.cuda.is_available() is False"
    if not ok:
        return numba, cuda, sim, (f"no usable NVIDIA GPU / CUDA driver was found ({why}). To run the CUDA "
                                  f"kernels without a GPU, set NUMBA_ENABLE_CUDASIM=1 before numba is imported")
    return numba, cuda, sim, None


numba, cuda, SIMULATOR, _REASON = _probe()
_COMPILE_ONLY = os.environ.get("DIFNUMPY_CUDA_COMPILE_ONLY") == "1" and cuda is not None
if _REASON is not None and not _COMPILE_ONLY:
    raise RuntimeError(f"backend='cuda' is not usable: {_REASON}")


def _serialise_simulator_shared_arrays() -> bool:
    """Make the CUDA simulator's ``cuda.shared.array`` safe for the block's threads (returns True if patched).

    The simulator runs every CUDA thread of a block as a Python thread, and its shared-array allocator
    (``FakeCUDAShared.array``) does an unlocked check-then-set on the block's allocations: when the GIL
    switches between the check and the set (likely under load: the allocator walks the Python stack), two
    threads of one block get *different* "shared" arrays and read each other's tile as garbage. Measured
    here: 3 of 30 runs of a 3-step DDPM sample on a loaded machine gave errors up to 0.13 in the tiled
    convolution. This replacement is the same allocator (one array per call site, keyed by the caller's
    file and line) under a lock. Simulator only; a real GPU is untouched.
    """
    try:
        import sys
        import threading

        from numba.core import types
        from numba.np import numpy_support
        from numba.cuda.simulator import kernelapi
    except ImportError:  # pragma: no cover - another numba-cuda layout: leave it alone
        return False
    shared = getattr(kernelapi, "FakeCUDAShared", None)
    if shared is None or getattr(shared, "_difnumpy_locked", False):
        return bool(shared)
    original = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0 or not hasattr(self, "_allocations"):
            return original(self, shape, dtype, alignment)  # errors and dynamic shared memory: unchanged
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    shared.array = array
    shared._difnumpy_locked = True
    return True


SIMULATOR_SHARED_LOCKED = SIMULATOR and _serialise_simulator_shared_arrays()


def cuda_available() -> bool:
    """True when the kernels of this backend can be launched (a GPU, or the simulator). Never raises."""
    return _REASON is None


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------

TPB = 16 if SIMULATOR else 256            # threads per block of 1-D (grid-stride) kernels
MAX_BLOCKS = 2 if SIMULATOR else 2048     # grid-stride loops: at most this many blocks
RED = 8 if SIMULATOR else 128             # threads per block of reduction kernels (a power of two)
CONV_TS = 4 if SIMULATOR else 16          # output tile (TS x TS threads) of the tiled convolution
CONV_FB = 4 if SIMULATOR else 8           # filters per block (register blocking)
CONV_CB = 4                               # input channels staged in shared memory at a time
KMAX = 3                                  # tiled / block-reduced kernels: KH, KW <= 3 ...
SMAX = 2                                  # ... and stride <= 2; larger ones take the direct kernels
MAX_GRID_Z = 65535
#: Block-reduction kernels (one block per output, shared-memory tree sums) for the weight gradient of
#: the convolution and GroupNorm's backward statistics. Under the simulator, where every block is a set
#: of Python threads meeting at barriers, the grid-stride "direct" kernels (one thread per output, serial
#: sums) are much faster; the tests run both kinds. Read at call time from this module (monkeypatch here).
USE_BLOCK_REDUCTIONS = not SIMULATOR


def grid1d(n: int) -> tuple[int, int]:
    """``(blocks, threads)`` of a grid-stride kernel over ``n`` elements."""
    return max(1, min((n + TPB - 1) // TPB, MAX_BLOCKS)), TPB


def grid_reduce(n: int) -> tuple[int, int]:
    """``(blocks, RED)`` of a grid-stride kernel over ``n`` elements writing one partial sum per block."""
    return max(1, min((n + RED - 1) // RED, MAX_BLOCKS)), RED


# ------------------------------------------------------------------------------------------------
# the kernel registry
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelSpec:
    """A registered kernel: ``build(dt)`` returns its Python function specialised for ``dt``;
    ``argtypes(t)`` its argument types from ``t = kernel_types(dt)``; ``module`` the family it is in."""
    name: str
    build: Callable
    argtypes: Callable
    module: str


#: name -> KernelSpec of every kernel the backend can launch (filled when the family modules import).
KERNELS: dict[str, KernelSpec] = {}
_COMPILED: dict = {}
#: Tests set this to a list: every launch then appends ``(name, dtype, argument types)`` to it.
LAUNCH_LOG: list | None = None


def kernel_types(dtype) -> SimpleNamespace:
    """numba types of kernel arguments for ``dtype``: C-contiguous arrays ``a1``..``a4``, the scalar
    ``s`` (a NumPy scalar of ``dtype``), ``i`` (a Python int: int64) and ``b`` (a bool)."""
    nt = numba.from_dtype(np.dtype(dtype))
    return SimpleNamespace(a1=nt[::1], a2=nt[:, ::1], a3=nt[:, :, ::1], a4=nt[:, :, :, ::1], s=nt,
                           i=numba.int64, b=numba.boolean)


def kernel(argtypes: Callable):
    """Register ``build_<name>(dt) -> python function`` as a kernel launched with ``argtypes(t)``.

    Returns the getter that replaces the builder: ``build_<name>(dtype)`` is the ``cuda.jit`` kernel for
    ``dtype``, built and wrapped once per dtype (numba compiles it on its first launch).
    """
    def register(builder):
        name = builder.__name__[len("build_"):] if builder.__name__.startswith("build_") else None
        if not name or name in KERNELS:
            raise RuntimeError(f"kernel builders are named build_<unique name>, got {builder.__name__}")
        KERNELS[name] = KernelSpec(name, builder, argtypes, builder.__module__)

        def get(dtype):
            dt = np.dtype(dtype)
            k = _COMPILED.get((name, dt))
            if k is None:
                k = _COMPILED[(name, dt)] = cuda.jit(builder(dt))
            return k if LAUNCH_LOG is None else _Logged(name, dt, k)

        get.__name__ = get.__qualname__ = builder.__name__
        get.__doc__ = builder.__doc__
        get.spec = KERNELS[name]
        return get
    return register


def argtype(a):
    """The numba type a launch argument is typed as (device arrays by dtype, ndim and contiguity)."""
    if is_array(a):
        return numba.types.Array(numba.from_dtype(np.dtype(a.dtype)), len(a.shape),
                                 "C" if a.is_c_contiguous() else "A")
    if isinstance(a, (bool, np.bool_)):
        return numba.boolean
    if isinstance(a, int):
        return numba.int64
    return numba.typeof(a)


class _Logged:
    """A kernel whose launches are appended to :data:`LAUNCH_LOG` (tests only)."""

    def __init__(self, name, dt, k):
        self.name, self.dt, self.k = name, dt, k

    def __getitem__(self, config):
        launch = self.k[config]

        def run(*args):
            LAUNCH_LOG.append((self.name, self.dt, tuple(argtype(a) for a in args)))
            return launch(*args)
        return run


# ------------------------------------------------------------------------------------------------
# native arrays (backend API) and the wrappers' argument helpers
# ------------------------------------------------------------------------------------------------

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def is_array(a) -> bool:
    """True for a native array of this backend: a numba device array (or the simulator's stand-in)."""
    return cuda.devicearray.is_cuda_ndarray(a)


def asarray(a, dtype=None):
    """``a`` as a C-contiguous device array of ``dtype`` (copied up from the host).

    A C-contiguous device array of that dtype (or ``dtype=None``) is returned as it is; another device
    array is converted through the host.
    """
    if is_array(a):
        if (dtype is None or np.dtype(dtype) == np.dtype(a.dtype)) and a.is_c_contiguous():
            return a
        a = a.copy_to_host()
    elif not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__"):  # pragma: no cover
        return asarray(cuda.as_cuda_array(a), dtype)   # CuPy / PyTorch tensors on a real GPU
    return cuda.to_device(np.ascontiguousarray(a, dtype=dtype))


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (copied down if it is a device array)."""
    return a.copy_to_host() if is_array(a) else np.asarray(a)


def _shape(shape) -> tuple:
    if np.ndim(shape) == 0:
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return shape


@kernel(lambda t: (t.a1, t.s))
def build_fill(dt):
    """``a[:] = value``."""
    def fill_k(a, value):
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[i] = value
    return fill_k


def zeros(shape, dtype):
    """A device array of zeros, shape ``shape`` (an int or a tuple), dtype ``dtype``."""
    shape, dt = _shape(shape), np.dtype(dtype)
    if dt not in FLOATS:
        return cuda.to_device(np.zeros(shape, dtype=dt))
    out = cuda.device_array(shape, dtype=dt)
    n = int(np.prod(shape))
    if n:
        build_fill(dt)[grid1d(n)](_flat(out), dt.type(0.0))
    return out


def copy(a):
    """A new array equal to ``a``: a device array for a device array (copied on the device), else NumPy."""
    if not is_array(a):
        return np.array(a, order="C", copy=True)
    if not a.is_c_contiguous():
        return asarray(a.copy_to_host())
    out = cuda.device_array(tuple(a.shape), dtype=a.dtype)
    out.copy_to_device(a)
    return out


def copy_into(dst, src):
    """``dst[...] = src`` (``src`` NumPy or device, of ``dst``'s shape, cast to its dtype); returns ``dst``."""
    if not (isinstance(dst, np.ndarray) or is_array(dst)):
        raise TypeError(f"dst must be a numpy ndarray or a numba.cuda device array, got {type(dst).__name__}")
    if not (is_array(src) or isinstance(src, np.ndarray)):
        src = np.asarray(src)
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"src must have the shape of dst {tuple(dst.shape)}, got {tuple(src.shape)}")
    if not is_array(dst):
        dst[...] = to_host(src)
        return dst
    if not dst.is_c_contiguous():
        raise ValueError("dst must be C-contiguous")
    if is_array(src) and np.dtype(src.dtype) == np.dtype(dst.dtype) and src.is_c_contiguous():
        dst.copy_to_device(src)   # device to device
    else:
        dst.copy_to_device(np.ascontiguousarray(to_host(src), dtype=dst.dtype))
    return dst


def _check(name: str, a, ndim: int | None = None, dtype=None, shape=None):
    """``a`` if it is a float32/float64 NumPy or C-contiguous device array of the given ndim, dtype, shape."""
    if not (isinstance(a, np.ndarray) or is_array(a)):
        raise TypeError(f"{name} must be a numpy ndarray or a numba.cuda device array, got {type(a).__name__}")
    if np.dtype(a.dtype) not in FLOATS:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (that of the first array), got {a.dtype}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if is_array(a) and not a.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous")
    return a


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if int(v) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _coef(name: str, a, dtype, shape):
    """A small per-sample coefficient array (host float64 in the API) as a device array of ``dtype``."""
    if is_array(a):
        a = a.copy_to_host()
    a = np.asarray(a, dtype=np.float64)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return cuda.to_device(np.ascontiguousarray(a.astype(dtype)))


def _ret(on_device: bool, *arrays):
    """The device results as they are (device inputs) or copied down (NumPy inputs)."""
    out = tuple(a if on_device else a.copy_to_host() for a in arrays)
    return out if len(out) > 1 else out[0]


def _back(host, dev) -> None:
    """Copy an in-place result ``dev`` down into ``host`` when the caller passed a NumPy array."""
    if is_array(host):
        return
    if host.flags.c_contiguous and host.dtype == np.dtype(dev.dtype):
        dev.copy_to_host(host)
    else:
        host[...] = dev.copy_to_host()


def _flat(d):
    """A C-contiguous device array as 1-D (a view)."""
    return d.reshape(int(np.prod(d.shape)))
