"""Does data parallelism over MPI ranks cost anything on one machine? 2 ranks x 1 thread vs 1 rank x 2 threads.

Both contenders train the default U-Net (8x8 digits, batch 128) with :class:`difnumpy.Trainer`:

- ``1x2``: one process, 2 numba threads (the batch split into shares over the threads);
- ``2x1``: ``mpiexec -n 2``, 1 numba thread per rank; each rank computes 64 of the 128 images and one
  ``Allreduce`` of one flat buffer (1.64 MB float32) sums the gradients (:mod:`difnumpy.distributed`).

Each run warms up until its step time is stable (>= 5 steps, two successive 3-step medians within 5 %),
then times ``--steps`` steps; the contenders alternate (1x2, 2x1, 2x1, 1x2, ...) for ``--rounds`` rounds and
the medians are compared. The ranks also time their Allreduce (copy in, sum, copy out). The figure
quoted is ``img/s(2x1) / img/s(1x2)``; goal >= 0.9 (distribution overhead at most 10 %).

``--model`` also fits the scaling model of benchmarks/RESULTS.md: the one-thread step time at batch b is
measured for a few b and fitted as ``compute(b) = c0 + b c1``; a step on N ranks (global batch B) takes
``compute(B/N) + 2 (N-1)/N * S / bandwidth + 2 (N-1) latency`` (a ring Allreduce of S bytes), and the
parallel efficiency is ``compute(B) / (N * step(N))``. The model's 2-rank step (with the Allreduce time
measured here) is printed beside the measured one, and the N where the efficiency falls below 80 % at
10 and 100 Gb/s for batch 128 and 1024 (the first N below 80 %).

    python benchmarks/bench_distributed.py [--quick] [--model] [--rounds R] [--steps S] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine_info, print_table, write_json  # noqa: E402

_WORKER = r"""
import json, statistics, sys, time
import numpy as np
from difnumpy import Schedule, Trainer, UNet
from difnumpy.distributed import get_world
world = get_world()
steps, batch, hw = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tr = Trainer(UNet(rng=0), Schedule.from_name("cosine", 1000), lr=2e-3, rng=0, world=world)
x = np.random.default_rng(1).uniform(-1, 1, (batch, 1, hw, hw)).astype(np.float32)
reduce_t = []
ar = tr._allreduce
def timed(*a, **k):
    t0 = time.perf_counter(); r = ar(*a, **k); reduce_t.append(time.perf_counter() - t0); return r
tr._allreduce = timed
times = []
while True:  # warm until stable: >= 5 steps, two 3-step medians within 5 % (rank 0 decides for all)
    t0 = time.perf_counter(); tr.step(x); times.append(time.perf_counter() - t0)
    stable = len(times) >= 40 or (len(times) >= 6 and
                                  abs(statistics.median(times[-3:]) / statistics.median(times[-6:-3]) - 1) < 0.05)
    if world.bcast(stable):
        break
warm = len(times)
reduce_t.clear()
times = []
for _ in range(steps):
    t0 = time.perf_counter(); tr.step(x); times.append(time.perf_counter() - t0)
if world.is_root:
    print("RESULT " + json.dumps({"step_s": statistics.median(times), "warm_steps": warm,
                                  "allreduce_s": statistics.median(reduce_t) if reduce_t else 0.0,
                                  "allreduce_bytes": ar.last_bytes}))
"""


def _run(ranks: int, threads: int, steps: int, batch: int, hw: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))}
    env["NUMBA_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", _WORKER, str(steps), str(batch), str(hw)]
    if ranks > 1:
        cmd = [shutil.which("mpiexec"), "-n", str(ranks)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{ranks}x{threads} failed: {r.stderr[-2000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 5 steps (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=8, help="image side (default 8)")
    ap.add_argument("--model", action="store_true", help="also fit and print the scaling model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if shutil.which("mpiexec") is None:
        print("bench_distributed: no mpiexec (pip install 'difnumpy[mpi]')", file=sys.stderr)
        return 2
    rounds, steps = (1, 5) if args.quick else (args.rounds, args.steps)
    res = {"1x2": [], "2x1": []}
    t0 = time.perf_counter()
    for r in range(rounds):
        order = ("1x2", "2x1") if r % 2 == 0 else ("2x1", "1x2")
        for name in order:
            ranks, threads = (1, 2) if name == "1x2" else (2, 1)
            res[name].append(_run(ranks, threads, steps, args.batch, args.size))
    ips = {k: [args.batch / v["step_s"] for v in runs] for k, runs in res.items()}
    med = {k: statistics.median(v) for k, v in ips.items()}
    allreduce = statistics.median(v["allreduce_s"] for v in res["2x1"])
    ratio = med["2x1"] / med["1x2"]
    rows = [[k, f"{med[k]:.0f}", ", ".join(f"{v:.0f}" for v in ips[k]),
             f"{statistics.median(v['step_s'] for v in res[k]) * 1e3:.1f}",
             ", ".join(str(v["warm_steps"]) for v in res[k])] for k in ("1x2", "2x1")]
    print(f"batch {args.batch}, {args.size}x{args.size}, {rounds} round(s) of {steps} timed steps "
          f"({time.perf_counter() - t0:.0f} s)")
    print_table(rows, ["ranks x threads", "img/s (median)", "img/s per round", "step ms", "warm-up steps"])
    nbytes = res["2x1"][0]["allreduce_bytes"]
    print(f"allreduce per step: {allreduce * 1e3:.2f} ms for {nbytes / 1e6:.2f} MB "
          f"({allreduce / statistics.median(v['step_s'] for v in res['2x1']) * 100:.1f} % of a step)")
    print(f"2x1 / 1x2 = {ratio:.3f}  (goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
    out = {"machine": machine_info(), "batch": args.batch, "size": args.size, "rounds": res, "images_per_s": ips,
           "median_images_per_s": med, "allreduce_s": allreduce, "allreduce_bytes": nbytes,
           "ratio_2x1_over_1x2": ratio}
    if args.model:
        out["model"] = scaling_model(args, steps, nbytes, allreduce, statistics.median(v["step_s"] for v in res["2x1"]))
    if args.json:
        write_json(args.json, out)
    return 0


def scaling_model(args, steps, nbytes, allreduce_s, measured_2x1_s, latency_s=5e-6) -> dict:
    """Fit compute(b) = c0 + b c1 on one thread; print the model's 2-rank step and its efficiency limits."""
    batches = (32, 64, 128) if args.batch <= 128 else (64, 128, args.batch // 2, args.batch)
    t = {b: _run(1, 1, steps, b, args.size)["step_s"] for b in batches}
    c1, c0 = [float(v) for v in __import__("numpy").polyfit(list(t), list(t.values()), 1)]
    compute = lambda b: c0 + c1 * b  # noqa: E731
    pred_2 = compute(args.batch / 2) + allreduce_s
    print(f"\nscaling model: compute(b) = {c0 * 1e3:.1f} ms + b * {c1 * 1e3:.3f} ms (one thread; measured "
          + ", ".join(f"b={b}: {v * 1e3:.0f} ms" for b, v in t.items()) + ")")
    print(f"2 ranks on this machine: model {pred_2 * 1e3:.1f} ms/step (compute(B/2) + the measured Allreduce) "
          f"vs measured {measured_2x1_s * 1e3:.1f} ms")
    rows, limits = [], {}
    for gbps in (10, 100):
        bw = gbps * 1e9 / 8
        for B in (128, 1024):
            def eff(N):
                step = compute(B / N) + 2 * (N - 1) / N * nbytes / bw + 2 * (N - 1) * latency_s
                return compute(B) / (N * step)
            N = next((n for n in range(2, 4097) if eff(n) < 0.8), None)  # the first N below 80 %
            limits[f"{gbps}Gbps_B{B}"] = N
            rows.append([f"{gbps} Gb/s", B, f"{eff(2):.2f}", f"{eff(8):.2f}", f"{eff(32):.2f}", N])
    print_table(rows, ["network", "batch", "eff N=2", "eff N=8", "eff N=32", "first N below 80 %"])
    return {"c0_s": c0, "c1_s_per_image": c1, "one_thread_step_s": t, "model_2x1_s": pred_2,
            "measured_2x1_s": measured_2x1_s, "first_N_below_80pct": limits, "latency_s": latency_s}


if __name__ == "__main__":
    sys.exit(main())
