"""How fast is the forward process q_sample, measured against the machine's own copy bandwidth?

q_sample (DDPM eq. 4, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``) is memory bound: it reads two
arrays and writes one, so the most it can do is stream 3 * n * itemsize bytes at the rate the machine
copies memory. In one run this script times, for n = 1e5 .. 1e8 float32 elements:

- ``copy``: ``np.copyto(dst, src)`` (reads 1 array, writes 1): the machine's copy bandwidth, the baseline;
- ``numpy``: the NumPy expression ``a * x0 + b * eps`` (allocates temporaries);
- ``numba``: the numba kernel (:func:`difnumpy.kernels.cpu.q_sample`, one thread, like ``np.copyto``) into a
  preallocated output.

Bandwidth counts the bytes each must move (copy: 2n, q_sample: 3n itemsizes) divided by the median time
of the repeats; the first (compiling) call is never timed. The figure quoted is ``numba GB/s / copy GB/s``.
Goal: >= 0.8 at 1e7 elements.

    python benchmarks/bench_forward.py [--quick] [--repeats R] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_call, write_json  # noqa: E402

from difnumpy.kernels import cpu, reference  # noqa: E402


def run(sizes, repeats):
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        batch = 128 if n >= 128 * 64 else 1
        m = n // batch
        x0 = rng.standard_normal((batch, m), dtype=np.float32)
        eps = rng.standard_normal((batch, m), dtype=np.float32)
        a, b = rng.uniform(0, 1, batch), rng.uniform(0, 1, batch)
        out = np.empty_like(x0)
        dst = np.empty_like(x0)
        item = x0.itemsize * batch * m
        af, bf = a.astype(np.float32)[:, None], b.astype(np.float32)[:, None]
        reps = max(3, min(repeats, int(2e9 // (item * 3)) + 3))
        t_copy = time_call(lambda: np.copyto(dst, x0), reps)
        t_np = time_call(lambda: af * x0 + bf * eps, reps)
        t_nb = time_call(lambda: cpu.q_sample(x0, eps, a, b, out=out), reps)
        assert np.array_equal(out, reference.q_sample(x0, eps, a, b))
        gb = lambda nbytes, t: nbytes / t / 1e9  # noqa: E731
        copy_bw = gb(2 * item, t_copy)
        rows.append({
            "elements": batch * m, "copy_GBps": copy_bw, "numpy_GBps": gb(3 * item, t_np),
            "numba_GBps": gb(3 * item, t_nb),
            "numpy_vs_copy": gb(3 * item, t_np) / copy_bw, "numba_vs_copy": gb(3 * item, t_nb) / copy_bw,
            "median_s": {"copy": t_copy, "numpy": t_np, "numba": t_nb},
        })
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 1e5..1e7 only, fewer repeats")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", help="write the results here (atomically)")
    args = p.parse_args(argv)
    sizes = [10 ** 5, 10 ** 6, 10 ** 7] if args.quick else [10 ** 5, 10 ** 6, 10 ** 7, 10 ** 8]
    repeats = 5 if args.quick else args.repeats
    # compile outside the timed region
    z = np.zeros((2, 4), np.float32)
    cpu.q_sample(z, z, np.ones(2), np.ones(2))
    rows = run(sizes, repeats)
    print_table([[f"{r['elements']:.0e}", f"{r['copy_GBps']:.1f}", f"{r['numpy_GBps']:.1f}",
                  f"{r['numba_GBps']:.1f}", f"{r['numpy_vs_copy']:.2f}", f"{r['numba_vs_copy']:.2f}"]
                 for r in rows],
                ["elements", "copy GB/s", "numpy GB/s", "numba GB/s", "numpy/copy", "numba/copy"])
    at = [r for r in rows if r["elements"] == 10 ** 7]
    if at:
        best = at[0]["numba_vs_copy"]
        print(f"\nq_sample at 1e7 float32 elements: {best:.2f}x copy bandwidth (goal >= 0.80: "
              f"{'met' if best >= 0.8 else 'NOT met'})")
    if args.json:
        write_json(args.json, {"benchmark": "bench_forward", "machine": machine_info(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
