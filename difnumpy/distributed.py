"""Data-parallel training and sharded sampling on MPI (mpi4py), identical to one process.

The pattern of improved-diffusion's ``dist_util`` and of torch DDP: every rank holds the whole model
and optimizer; each training step's global batch of B images is drawn exactly as one process draws it
(one rng stream, identical on every rank), rank r computes the loss and gradients of its slice of
B/N images, one ``Allreduce`` of a single flat buffer sums the gradients, and Adam, clipping and the
EMA run replicated, so the parameters stay identical. Sampling shards the M samples over the ranks;
each sample's noise comes from ``(seed, sample index)`` (:class:`difnumpy._validation.SampleGenerators`),
so the samples do not depend on the number of ranks or the batch size.

Without an MPI launcher (or with one rank) nothing here imports mpi4py: :func:`get_world` returns the
one-process world, and every function is the identity. ``pip install 'difnumpy[mpi]'`` installs
mpi4py and an MPI runtime (mpich) from wheels, so ``mpiexec`` exists with no system MPI.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from difnumpy.kernels import get_backend

__all__ = ["World", "PeerFailure", "get_world", "configure_threads", "launcher_size", "shard", "GradientAllreduce", "default_threads", "abort_on_error"]

#: Environment variables through which MPI launchers (MPICH/Hydra, Open MPI, MVAPICH) give the world size.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_size() -> int:
    """The number of ranks an MPI launcher started (1 without one); reads the environment only."""
    for name in _SIZE_VARS:
        v = os.environ.get(name)
        if v is not None:
            try:
                return max(1, int(v))
            except ValueError:
                continue
    return 1


class PeerFailure(RuntimeError):
    """Raised on a rank whose set-up passed when another rank's failed (that rank prints the error)."""


class World:
    """The ranks of a run: ``rank``, ``size`` and the MPI communicator (None for one process).

    Every collective used by difnumpy is a method here, so the trainer and the samplers never call MPI.
    """

    def __init__(self, rank: int = 0, size: int = 1, comm=None, mpi=None):
        self.rank, self.size, self.comm, self._mpi = int(rank), int(size), comm, mpi
        #: set by this rank to ask every rank to stop after the current step (Ctrl-C, a time budget)
        self.stop_requested = False
        #: whether some rank asked, as agreed by the last training step's allreduce (the same on every rank)
        self.stop_agreed = False
        #: :meth:`end_setup` was called; the lowest rank whose set-up failed (None: none)
        self.setup_done, self.setup_failed_rank = False, None

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that writes files, logs and the progress bar."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        """``buf`` summed over the ranks, in place (a contiguous NumPy array); returns ``buf``."""
        if self.size > 1:
            self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        return buf

    def sum(self, value: float) -> float:
        """A float summed over the ranks (float64)."""
        return float(self.allreduce_(np.array([value], dtype=np.float64))[0])

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj if self.size == 1 else self.comm.bcast(obj, root=0)

    def gather_rows(self, a: np.ndarray) -> np.ndarray | None:
        """Every rank's ``a`` (N_r, ...) concatenated in rank order on rank 0 (None on the others)."""
        if self.size == 1:
            return a
        parts = self.comm.gather(np.ascontiguousarray(a), root=0)
        return np.concatenate(parts) if self.is_root else None

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def end_setup(self, failed: bool = False) -> None:
        """The end of the set-up (argument and input checks, no collective calls): a collective, once.

        Every rank calls it once per set-up: with ``failed=False`` when its checks passed, with ``failed=True`` from
        its error handler when they did not. Afterwards :attr:`setup_failed_rank` is the lowest rank that
        failed (None: none did); on a rank whose checks passed while another's failed this raises
        :class:`PeerFailure`, so every rank stops, none waits forever and the error is printed once.
        With one process it only records the outcome.
        """
        self.setup_done = True
        if self.size == 1:
            self.setup_failed_rank = 0 if failed else None
            return
        first = int(self.comm.allreduce(self.rank if failed else self.size, op=self._mpi.MIN))
        self.setup_failed_rank = None if first == self.size else first
        if self.setup_failed_rank is not None and not failed:
            raise PeerFailure(f"rank {first} failed during set-up")

    def abort(self, code: int = 1) -> None:
        """Stop every rank now (``MPI_Abort``); with one process, exit with ``code``."""
        if self.size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            self.comm.Abort(int(code))
        raise SystemExit(code)

    def batch_slice(self, batch_size: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of a global batch; B must be divisible by the number of ranks."""
        b = int(batch_size)
        if b % self.size:
            raise ValueError(f"batch_size {b} is not divisible by the number of MPI ranks {self.size}: each rank "
                             f"takes B/N images of every step")
        per = b // self.size
        return self.rank * per, (self.rank + 1) * per


SINGLE = World()
_WORLD: World | None = None


def get_world() -> World:
    """The world of this process: one rank without an MPI launcher (mpi4py is then never imported).

    Raises
    ------
    RuntimeError
        Started by an MPI launcher with several ranks, but mpi4py is not installed.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if launcher_size() <= 1:
        _WORLD = SINGLE
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"started by an MPI launcher with {launcher_size()} ranks, but mpi4py cannot be "
                           f"imported ({e}); install it with pip install 'difnumpy[mpi]'") from None
    comm = MPI.COMM_WORLD
    _WORLD = World(comm.Get_rank(), comm.Get_size(), comm, MPI)
    return _WORLD


def shard(n: int, world: World) -> tuple[int, int]:
    """This rank's contiguous ``(start, stop)`` of ``n`` items (balanced: sizes differ by at most one)."""
    n = int(n)
    return n * world.rank // world.size, n * (world.rank + 1) // world.size


def default_threads(world: World, cores: int | None = None) -> int:
    """Threads per rank so that the machine is not oversubscribed: ``cores // ranks`` (at least 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cores) // world.size)


def configure_threads(world: World, threads: int | None = None) -> int:
    """Set this rank's kernel (numba) and BLAS threads; returns the number set.

    ``threads=None``: :func:`default_threads` under an MPI launcher with several ranks, unless
    ``NUMBA_NUM_THREADS`` is set in the environment (an explicit choice, kept); with one process
    nothing changes. At most numba's own limit (``NUMBA_NUM_THREADS``, by default the cores).
    """
    import numba

    limit = int(numba.config.NUMBA_NUM_THREADS)
    if threads is None:
        if world.size == 1 or "NUMBA_NUM_THREADS" in os.environ:
            return int(numba.get_num_threads())
        threads = min(default_threads(world), limit)
    threads = int(threads)
    if not 1 <= threads <= limit:
        raise ValueError(f"threads must be in 1..{limit} (numba's NUMBA_NUM_THREADS), got {threads}")
    numba.set_num_threads(threads)
    try:  # BLAS (NumPy's, scipy's) would otherwise start one thread per core in every rank
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads, user_api="blas")
    except ImportError:  # pragma: no cover
        pass
    return threads


class GradientAllreduce:
    """The gradient sum of a data-parallel step: one ``Allreduce`` of one flat contiguous buffer.

    ``grads`` (a dict of the backend's arrays, the mean-loss gradients of this rank's ``n_local`` images) are
    copied into one buffer (allocated once, the gradients' dtype: 1.64 MB for the default float32 U-Net),
    scaled by ``n_local``, summed over the ranks, divided by the global batch size B and copied back, in
    place: afterwards every rank holds the gradient of the mean loss over all B images.

    Two more numbers ride at the end of the same buffer, so a step makes exactly one call: this rank's
    loss (the global mean loss is returned) and its :attr:`World.stop_requested` (summed into
    :attr:`World.stop_agreed`, so every rank stops after the same step).
    """

    def __init__(self, world: World):
        self.world = world
        self._buf = None
        self.last_bytes = 0

    def __call__(self, grads: dict, n_local: int, batch_size: int, backend="cpu",
                 loss: float = 0.0) -> tuple[dict, float]:
        """(the global-mean gradients, in place in ``grads``; the global mean loss)."""
        world = self.world
        if world.size == 1:
            world.stop_agreed = world.stop_requested
            return grads, float(loss)
        kern = get_backend(backend)
        host = {k: kern.to_host(g) for k, g in grads.items()}
        dt = np.result_type(*[h.dtype for h in host.values()])
        total = sum(h.size for h in host.values())
        if self._buf is None or self._buf.size != total + 2 or self._buf.dtype != dt:
            self._buf = np.empty(total + 2, dtype=dt)
        buf, off = self._buf, 0
        for h in host.values():
            buf[off:off + h.size] = h.reshape(-1)
            off += h.size
        buf[:total] *= dt.type(n_local)
        with np.errstate(over="ignore"):  # an overflow is an inf loss: the trainer reports the divergence
            buf[total] = float(loss) * n_local  # in the gradients' dtype: float32 rounding of the reported loss
        buf[total + 1] = 1.0 if world.stop_requested else 0.0
        world.allreduce_(buf)
        self.last_bytes = buf.nbytes
        buf[:total] *= dt.type(1.0 / batch_size)
        off = 0
        for k, h in host.items():
            grads[k] = kern.asarray(buf[off:off + h.size].reshape(h.shape).copy())
            off += h.size
        extra = buf[total:].astype(np.float64)
        world.stop_agreed = bool(extra[1] > 0)
        return grads, float(extra[0]) / batch_size


def abort_on_error(world: World, exc: BaseException, code: int = 1) -> None:
    """Print ``exc`` once (this rank raised it) and stop every rank: no rank waits forever in a collective."""
    print(f"difnumpy (rank {world.rank} of {world.size}): error: {' '.join(str(exc).split()) or type(exc).__name__}",
          file=sys.stderr, flush=True)
    world.abort(code)
