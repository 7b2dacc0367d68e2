"""Small helpers shared by the benchmark scripts (timing, machine info, JSON, tables).

API: ``time_call(fn, repeats, warmup=1) -> median seconds``, ``machine_info() -> dict``,
``write_json(path, obj)`` (atomic), ``print_table(rows, headers)``, ``set_threads(n) -> dict``;
for comparisons against a baseline (ARCHITECTURE.md, convention 10): ``warm_until_stable(fns) -> report``
then ``time_interleaved(fns, repeats) -> {name: [seconds]}``, every contender warmed until its step
time is stable and all of them timed in alternation in the same process.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["time_call", "warm_until_stable", "time_interleaved", "run_interleaved", "machine_info",
           "write_json", "print_table", "set_threads", "warmup_note"]

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


def _round_order(names: Sequence[str], r: int) -> Sequence[str]:
    """Round r's calling order: forwards on even rounds, backwards on odd ones, so that no contender
    always runs right after the same other one (caches, thread pools, clock boost)."""
    return names if r % 2 == 0 else names[::-1]


def _is_stable(times: Sequence[float], min_steps: int, block: int, rtol: float) -> bool:
    """At least ``min_steps`` steps and the medians of the last two blocks of ``block`` steps agree within rtol."""
    if len(times) < max(min_steps, 2 * block):
        return False
    last = statistics.median(times[-block:])
    prev = statistics.median(times[-2 * block:-block])
    return abs(last - prev) <= rtol * prev


def warm_until_stable(fns: Mapping[str, Callable[[], Any]], *, min_steps: int = 5, block: int = 3,
                      rtol: float = 0.05, max_steps: int = 60, max_seconds: float | None = None,
                      untimed: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Warm every contender, interleaved, until its step time is stable.

    Parameters
    ----------
    fns : mapping name -> callable
        One step of each contender (a training step, a forward pass, one sampler step).
    min_steps : int
        Every contender runs at least this many timed warm-up steps.
    block, rtol : int, float
        Stable means: the medians of the contender's last two non-overlapping blocks of ``block`` warm-up
        steps agree within ``rtol`` (``|m_last - m_prev| <= rtol m_prev``). With the defaults: at least 6
        steps, and two successive 3-step medians within 5 %.
    max_steps, max_seconds :
        Give up after this many rounds or seconds; the contenders not stable by then are reported with
        ``stable=False`` (a benchmark prints that beside its figures rather than hiding it).
    untimed : int
        Calls of each contender before the first timed one (numba compilation, torch's one-off set-up:
        never timed, never part of the stability test).
    clock : callable
        Seconds, monotonic (injectable for tests).

    Returns
    -------
    report : dict name -> {"steps", "stable", "median_s", "prev_median_s", "times_s"}
        ``steps``: timed warm-up steps; ``median_s`` / ``prev_median_s``: the last two block medians.

    Notes
    -----
    Rounds call every contender once, alternating the order (:func:`_round_order`), and go on until all of
    them are stable: the ones that settle early keep running beside the others, so none goes cold while
    another warms, and a slow spell of the machine hits all of them.
    """
    names = list(fns)
    if not names:
        raise ValueError("fns must name at least one contender")
    if min_steps < 1 or block < 1 or max_steps < 1:
        raise ValueError(f"min_steps, block and max_steps must be >= 1, got {min_steps}, {block}, {max_steps}")
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    n_untimed = max(0, int(untimed))
    for r in range(n_untimed):
        for name in _round_order(names, r):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    for r in range(int(max_steps)):
        for name in _round_order(names, n_untimed + r):  # the alternation runs on across the untimed rounds
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
        if all(_is_stable(times[n], min_steps, block, rtol) for n in names):
            break
        if max_seconds is not None and clock() - start > max_seconds:
            break
    report = {}
    for name in names:
        ts = times[name]
        report[name] = {
            "steps": len(ts),
            "stable": _is_stable(ts, min_steps, block, rtol),
            "median_s": float(statistics.median(ts[-block:])),
            "prev_median_s": float(statistics.median(ts[-2 * block:-block])) if len(ts) >= 2 * block else None,
            "times_s": [float(t) for t in ts],
        }
    return report


def run_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int | Mapping[str, int], *,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """Call the contenders in alternation, ``repeats`` rounds; return ``{name: [(seconds, fn's result), ...]}``.

    ``repeats`` may be a mapping name -> count (a slow reference timed fewer times); a contender takes part in
    the rounds up to its own count. The order alternates between rounds as in :func:`warm_until_stable`.
    """
    names = list(fns)
    reps = {n: int(repeats[n] if isinstance(repeats, Mapping) else repeats) for n in names}
    if any(v < 1 for v in reps.values()):
        raise ValueError(f"repeats must be >= 1 for every contender, got {reps}")
    out: dict[str, list] = {n: [] for n in names}
    for r in range(max(reps.values())):
        for name in _round_order(names, r):
            if r >= reps[name]:
                continue
            t0 = clock()
            res = fns[name]()
            out[name].append((clock() - t0, res))
    return out


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int | Mapping[str, int], *,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """Seconds of each call of each contender, timed in alternation: ``{name: [seconds, ...]}``.

    Warm them first with :func:`warm_until_stable`; quote the ratio of the medians.
    """
    return {n: [t for t, _ in v] for n, v in run_interleaved(fns, repeats, clock=clock).items()}


def warmup_note(report: Mapping[str, Mapping[str, Any]]) -> str:
    """One line: warm-up steps per contender, and which ones were not stable (their figures are doubtful)."""
    parts = [f"{n} {r['steps']}{'' if r['stable'] else ' (NOT stable)'}" for n, r in report.items()]
    return "warm-up steps: " + ", ".join(parts)


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
    """CPU model, core count, OS, Python and library versions, thread counts, whether the cpu backend tuned
    glibc's malloc (a JSON-able dict)."""
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
    # process-wide, so both sides of a comparison run under it (see difnumpy.kernels.cpu._malloc)
    from difnumpy.kernels.cpu._malloc import _state
    info["glibc_malloc_tuned"] = _state["tuned"]
    info["glibc_malloc_one_arena"] = _state["arenas"]
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
