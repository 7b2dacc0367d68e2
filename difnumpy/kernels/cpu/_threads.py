"""Threads of the numba CPU backend: the worker pool, BLAS held to one thread, the batch split.

Why not numba's parallel layer (measured on the shared 2-core Sapphire Rapids dev machine): numba's
``omp`` layer (GNU OpenMP) waits by spinning; on a shared machine a spinning thread holds a core while
its peer is descheduled, and a 0.3 ms GroupNorm took 8-16 ms (50x) with 2 threads.
OMP_WAIT_POLICY=PASSIVE cures it only if set before the first OpenMP runtime loads (with torch
imported first numba binds torch's libgomp). So the kernels are serial ``nogil`` numba functions that
take a share ``(t, nt)`` of the work, and :func:`_run_split` runs share 0 in the calling thread and
the others on a small ``ThreadPoolExecutor`` (futex-based futures: ~85 us of hand-off per call, never
a collapse). ``nt`` is ``numba.get_num_threads()``.

Reproducibility across thread counts (issue 14): no result may depend on ``nt``. Work that is
*written* per image or per chunk (forward convs, GroupNorm) is the same whoever computes it. Work that
is *summed* (weight gradients) is summed per fixed part (:func:`_parts`: boundaries that depend on the
problem's size only), each part in a fixed order, then the parts in part order; threads only decide
who computes which part. :func:`batch_shares` splits a batch into shares that depend on
its size only (at most :data:`SHARE_IMAGES` images each), and :func:`run_shares` returns results in
share order (the U-Net sums the shares' gradients in that order).
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

try:  # optional: keep BLAS single-threaded inside our own threaded loops
    from threadpoolctl import ThreadpoolController as _TPC
except ImportError:  # pragma: no cover
    _TPC = None
_BLAS_LIBS = None


def _nthreads() -> int:
    """The number of threads the kernels may use: ``numba.get_num_threads()`` (thread-local)."""
    return max(1, int(numba.get_num_threads()))


# ---- BLAS held to one thread ----
_BLAS_HOLD_LOCK = threading.Lock()
_BLAS_HOLD = [0, None]  # [depth, [(library, its thread count before)]]: BLAS's thread count is process-global


class _BlasOneThread:
    """Context manager: BLAS limited to one thread while our kernels run (any ``nt``; without threadpoolctl
    a no-op).

    Re-entrant: nested scopes (a model step around its kernel calls) set the limit once and restore
    it when the outermost scope exits.
    """

    def __init__(self, nt=2):
        self._on = _TPC is not None  # at nt == 1 too: see step_scope

    def __enter__(self):
        if self._on:
            with _BLAS_HOLD_LOCK:
                if _BLAS_HOLD[0] == 0:
                    # the libraries' own get/set calls: threadpoolctl's limit() + restore cost ~9 us a pass
                    held = []
                    for lib in _blas_libs():
                        n = lib.get_num_threads()
                        if n is not None and n != 1:
                            lib.set_num_threads(1)
                            held.append((lib, n))
                    _BLAS_HOLD[1] = held
                _BLAS_HOLD[0] += 1
        return self

    def __exit__(self, *exc):
        if self._on:
            with _BLAS_HOLD_LOCK:
                _BLAS_HOLD[0] -= 1
                if _BLAS_HOLD[0] == 0:
                    held, _BLAS_HOLD[1] = _BLAS_HOLD[1], None
                    for lib, n in held:
                        lib.set_num_threads(n)
        return False


def _blas_libs():
    """threadpoolctl's controllers of the BLAS libraries loaded (scanned once, on the first hold)."""
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot BLAS; load before scanning)
        ctl = _TPC()
        _BLAS_LIBS = [lib for lib in ctl.lib_controllers if lib.user_api == "blas"]
    return _BLAS_LIBS


# ---- arrays derived from weights (Winograd-transformed filters), computed once per pass ----
# A model pass reads its weights and never writes them, so what a kernel derives from a weight array
# (the F(2x2, 3x3) transform G w G^T) can be computed once per pass instead of once per call and per
# batch share. The store is this thread's while a pass runs (and the pass's shares', which run_shares
# hands it); a frozen model (UNet.frozen, the sampling loops) passes its own store, which lives as long
# as its read-only scope. Entries are keyed by (tag, id(w)) and keep ``w`` itself: a hit needs the very
# same array object, so a replaced parameter never meets a stale entry.
# A pass too small to split over the threads may have the idle one make its entries ahead (prefetch).
_DERIVED = threading.local()  # .store: dict (tag, id(w)) -> (w, derived array), or None
_DERIVED_LOCK = threading.Lock()  # one computation per entry when two shares miss it at once


def derived(tag, w, compute):
    """``compute()``, or the array it gave for the same ``tag`` (hashable) and the same array ``w`` in this pass."""
    store = getattr(_DERIVED, "store", None)
    if store is None:
        return compute()
    key = (tag, id(w))
    hit = store.get(key)
    if hit is None or hit[0] is not w:
        with _DERIVED_LOCK:
            hit = store.get(key)
            if hit is None or hit[0] is not w:
                hit = store[key] = (w, compute())
    value = hit[1]
    if isinstance(value, _Pending):  # a prefetch() job's entry
        if value.state[value.i] == _DONE:
            value = value.array
        else:  # not made yet: made here, and the job skips it if it has not begun it (or its result is dropped)
            value.state[value.i] = _TAKEN
            value = compute()
        store[key] = (w, value)
    return value


_TODO, _BUSY, _DONE, _TAKEN = 0, 1, 2, 3  # a prefetch() entry's state (the job's ``state`` array)


class _Pending:
    """A :func:`derived` entry that a :func:`prefetch` job fills: ``array``, made once ``state[i] == _DONE``."""
    __slots__ = ("state", "i", "array")

    def __init__(self, state, i, array):
        self.state, self.i, self.array = state, i, array


def prefetching() -> bool:
    """Whether :func:`prefetch` would start a job now: in a pass's scope, outside batch shares (where
    every thread runs a share), with more than one thread."""
    return getattr(_DERIVED, "store", None) is not None and not _in_share() and _nthreads() > 1


def missing(tag, w) -> bool:
    """Whether :func:`derived` ``(tag, w)`` is neither in this pass's store nor being made."""
    hit = _DERIVED.store.get((tag, id(w)))
    return hit is None or hit[0] is not w


def prefetch(entries, fill) -> int:
    """Start ``fill(state)`` on a pool worker: it makes the :func:`derived` arrays ``entries`` =
    ``[(tag, w, array)]`` in order into their ``array`` (allocated by the caller), entry ``i`` only if
    ``state[i] == _TODO`` (it sets ``_BUSY``, then ``_DONE``). :func:`derived` takes a done entry's array,
    and makes any other itself (marking it ``_TAKEN``), so this thread never waits for the job. Only when
    :func:`prefetching`; returns how many entries were started.

    Why: a pass of a batch too small to share out runs its kernels on this thread, while the transforms of
    the filters (made once per pass in training) can be made on the idle one. ``fill`` should be one
    ``nogil`` compiled call: a worker running Python contends for the GIL with this thread's glue (one job
    per transform made the batch-1 training step no faster, measured).
    """
    if not entries or not prefetching():
        return 0
    state = np.zeros(len(entries), np.int8)
    store = _DERIVED.store
    for i, (tag, w, array) in enumerate(entries):
        store[(tag, id(w))] = (w, _Pending(state, i, array))
    _pool(1).submit(fill, state)
    return len(entries)


@contextlib.contextmanager
def _derived_store(store):
    prev = getattr(_DERIVED, "store", None)
    _DERIVED.store = store
    try:
        yield
    finally:
        _DERIVED.store = prev


@contextlib.contextmanager
def step_scope(store: dict | None = None):
    """Context for a whole model pass on this backend (used by :class:`difnumpy.nn.unet.UNet`).

    It holds BLAS to one thread for the whole forward or backward pass, not only inside each kernel: a
    multi-threaded BLAS call (the U-Net's small linear layers) leaves OpenBLAS's worker threads spinning
    (sched_yield) for ~0.1 s, and on a loaded 2-core machine they took the core that our second share
    needed (8x8 training step 2.3x slower, measured). With one numba thread too: there the small GEMMs
    on two BLAS threads made a batch-128 8x8 forward pass 2x slower (76 vs 39 ms; the linear layers 24
    vs 1 ms, measured 2026-11-30).

    It also opens the pass's store of derived weights (:func:`derived`): ``store`` (a dict the caller
    keeps, valid only while the weights stay unchanged, e.g. a frozen model's) or a fresh one.
    The weights must not change while the scope is open.
    """
    with _BlasOneThread(_nthreads()), _derived_store({} if store is None else store):
        yield


# ---- the worker pool and kernel-level splitting ----
_POOL = None
_POOL_LOCK = threading.Lock()


def _pool(workers):
    """The shared worker pool (created lazily, grown if more workers are asked for)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="difnumpy-nn")
        return _POOL


_SHARE = threading.local()  # .active: this thread is running a batch share (its kernels run serially)


#: flops of a kernel call (~0.4 ms on one thread) from which its work is shared by the threads: waking a
#: pool worker and collecting it costs ~0.1 ms each way on the 2-core VM (measured), so smaller calls (the
#: convs of a batch of 1-7 images, which runs as one pass) are faster on one thread
SPLIT_MIN_FLOPS = 4e7


def _split_threads(units: int, flops: float) -> int:
    """Threads for a kernel call of ``units`` independent units of work and about ``flops`` flops."""
    return min(_nthreads(), units) if flops >= SPLIT_MIN_FLOPS else 1


def _in_share() -> bool:
    """Whether this thread is running a batch share (its kernels run serially)."""
    return getattr(_SHARE, "active", False)


def _run_split(kernel, nt, blas, *args):
    """Run ``kernel(*args, t, nt)`` for ``t = 0 .. nt-1`` concurrently (share 0 in this thread).

    ``kernel`` is a ``nogil`` numba function whose result must not depend on ``nt`` (it only decides
    who computes what); ``blas``: hold BLAS to one thread while the shares run.
    """
    # BLAS held to one thread for a serial call too: a multi-threaded OpenBLAS GEMM may sum in another order
    # (the im2col forward of 19 images, 40 -> 48 channels at 16x16 differed in the last bits, measured)
    ctx = _BlasOneThread(nt) if blas else contextlib.nullcontext()
    if nt <= 1 or _in_share():  # inside a batch share: serial (no nested pool use)
        with ctx:
            kernel(*args, 0, 1)
        return
    pool = _pool(nt - 1)
    with ctx:
        futs = [pool.submit(kernel, *args, t, nt) for t in range(1, nt)]
        try:
            kernel(*args, 0, nt)
        finally:
            for f in futs:
                f.result()


#: at most this many parts per summed reduction (enough for 8 threads) ...
_MAX_PARTS = 8
#: ... and at least this many chunks per part (each extra part costs a zeroed partial and a sum)
_PART_CHUNKS = 2


def _parts(nchunks: int) -> int:
    """How many fixed parts a reduction over ``nchunks`` chunks is summed in (independent of threads).

    Part ``p`` of ``P`` covers chunks ``p * nchunks // P`` to ``(p + 1) * nchunks // P`` (summed in
    chunk order); the ``P`` partial results are then summed in part order.
    """
    return max(1, min(_MAX_PARTS, nchunks // _PART_CHUNKS))


# ---- whole-pass data parallelism: the batch split into fixed shares ----
# A 2-thread kernel call costs ~85 us of hand-off (waking a sleeping worker on this VM, then the GIL);
# a U-Net pass makes 30-60 such calls. Splitting the *batch* instead, each thread running the whole
# pass on its shares with single-threaded kernels, needs a few hand-offs per pass and no per-kernel
# barrier: measured 19 % (forward) and 18 % (forward+backward) faster at 8x8, 15 % / 9 % at 28x28
# (batch 128, two shares of 64 on 2 threads). Shares of at most 32 images cost 12 % (train) and 17 %
# (forward) more CPU time than shares of 64 at 8x8, batch 128 (per-pass overhead), so shares are 64.
SHARE_IMAGES = 64  # images per share at most ...
_MIN_SHARE = 4  # ... and at least: a batch of fewer than 2 * _MIN_SHARE images runs as one pass


def batch_shares(n: int):
    """How a whole model pass over ``n`` images is split: ``None`` (one pass) or ``(start, stop)`` ranges.

    The shares depend on ``n`` only, never on the thread count (so that the gradients, summed share by
    share in share order, are the same bits with any number of threads): ``ceil(n / SHARE_IMAGES)``
    shares of balanced sizes, and at least two from ``2 * _MIN_SHARE`` images on (so that two threads
    share a small batch). :func:`run_shares` runs them on the threads there are.
    """
    n = int(n)
    k = max(-(-n // SHARE_IMAGES), 2 if n >= 2 * _MIN_SHARE else 1)
    if k < 2:
        return None
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class _Counter:
    """Hands out 0, 1, 2, ... to concurrent callers (and ``end`` for ever once :meth:`stop` is called)."""

    def __init__(self, end: int):
        self._next = 0
        self._end = end
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            k = min(self._next, self._end)
            self._next += 1
            return k

    def stop(self) -> None:
        with self._lock:
            self._next = self._end


def _worker(fn, shares, counter, results, errors, store):
    """Run the shares ``counter`` hands out until none is left (the kernels single-threaded, the caller's
    store of derived weights in use)."""
    prev = numba.get_num_threads()  # thread-local in numba: kernels called by fn run serially
    prev_active = getattr(_SHARE, "active", False)
    prev_store = getattr(_DERIVED, "store", None)
    numba.set_num_threads(1)
    _SHARE.active = True
    _DERIVED.store = store
    try:
        while True:
            k = counter.take()
            if k >= len(shares):
                return
            try:
                results[k] = fn(k, *shares[k])
            except Exception as e:  # re-raised by run_shares once every share has run
                errors[k] = e
            except BaseException:  # KeyboardInterrupt, SystemExit: no further share starts
                counter.stop()
                raise
    finally:
        _SHARE.active = prev_active
        _DERIVED.store = prev_store
        numba.set_num_threads(prev)


def run_shares(fn, shares):
    """Run ``fn(k, start, stop)`` for every share; returns the results in share order.

    The shares are spread over ``min(numba.get_num_threads(), len(shares))`` threads (this thread and
    pool workers), each taking the next share not yet taken; inside ``fn`` the numba kernels run
    single-threaded. Which thread runs a share does not change its result. An exception of any share
    is re-raised here (the lowest share's first) after all shares have finished.
    """
    shares = [(int(a), int(b)) for a, b in shares]
    nt = min(_nthreads(), len(shares))
    if getattr(_SHARE, "active", False):
        nt = 1  # already inside a share: no nested pool use
    results = [None] * len(shares)
    errors = [None] * len(shares)
    counter = _Counter(len(shares))
    store = getattr(_DERIVED, "store", None)
    futs = [_pool(nt - 1).submit(_worker, fn, shares, counter, results, errors, store) for _ in range(nt - 1)]
    try:
        _worker(fn, shares, counter, results, errors, store)
    finally:
        for f in futs:
            f.result()
    for e in errors:
        if e is not None:
            raise e
    return results
