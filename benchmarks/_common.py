"""Small helpers shared by the benchmark scripts (timing, machine info, JSON, tables).

API: ``time_call(fn, repeats, warmup=1) -> median seconds``, ``machine_info() -> dict``,
``write_json(path, obj)`` (atomic), ``print_table(rows, headers)``, ``set_threads(n) -> dict``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

__all__ = ["time_call", "machine_info", "write_json", "print_table", "set_threads"]

_TP_LIMITER = None  # keeps the threadpoolctl limit alive for the process


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones.

    The warm-up calls absorb compilation (numba) and first-touch allocation; the median resists the
    noise of a shared machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, int(warmup))):
        fn()
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def set_threads(n: int) -> dict:
    """Pin BLAS (all loaded OpenBLAS/MKL, via threadpoolctl), numba and torch (if loaded) to ``n`` threads.

    Call it after importing numpy/scipy/numba/torch. Returns the thread counts actually in force.
    """
    global _TP_LIMITER
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot BLAS: load it before limiting)
    except ImportError:  # pragma: no cover
        pass
    try:
        from threadpoolctl import threadpool_limits
        _TP_LIMITER = threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return thread_counts()


def thread_counts() -> dict:
    """Thread counts in force now: BLAS libraries, numba, torch (when loaded)."""
    out: dict[str, Any] = {}
    try:
        from threadpoolctl import threadpool_info
        out["blas"] = {os.path.basename(d["filepath"]): d["num_threads"] for d in threadpool_info()}
    except ImportError:  # pragma: no cover
        pass
    try:
        import numba
        out["numba"] = numba.get_num_threads()
        out["numba_threading_layer"] = numba.config.THREADING_LAYER
    except ImportError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, core count, OS, Python and library versions, thread counts (a JSON-able dict)."""
    import numpy as np
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for mod in ("numba", "scipy", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    info["threads"] = thread_counts()
    return info


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (difnumpy's own temp-file + os.replace writer)."""
    from difnumpy._io import atomic_write

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=2, sort_keys=True, default=str), binary=False)


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table (floats with 3 significant decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    print("  ".join(str(h).rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
