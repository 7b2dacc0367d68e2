"""How does sampling cost grow with batch size, image size and number of steps? (log-log, fitted slopes)

Three sweeps with the default U-Net (``backend="cpu"``), each beside the same architecture in PyTorch on
the CPU (``TorchUNet`` from bench_train.py, when torch is installed) timed in the same run:

- batch size N = 1, 2, 4, ..., 512 (8x8 images): seconds of one network forward (one sampling step's
  network evaluation). Ideal: slope 1 (linear in N) once N is large enough to hide the per-call overhead;
  a slope well below 1 at small N means fixed per-call costs (Python, kernel launch, thread start) dominate.
- image side H = W = 8, 16, 28, 32 (batch ``--size-batch``, default 32): forward seconds. Ideal: slope 2 in
  the side (cost proportional to the number of pixels).
- number of sampling steps S = 5, 10, 20, 50, 100 (DDIM, eta = 0, batch ``--steps-batch``, default 8):
  seconds of a whole ``difnumpy.sample`` call. Ideal: slope 1 (each step costs the same).

How it measures: every point is called once untimed first (compilation, first-touch allocation); then
timed ``--repeats`` times or more (small, fast points are repeated until about 0.3 s has been spent, at
most 20 times) and the median is kept. Slopes are least-squares fits of log(seconds) on log(x); for the
batch sweep the slope over N >= 32 (the asymptotic regime) is reported too.
A 3-panel log-log PNG is written (atomically) to ``--plot`` (default benchmarks/scaling.png).

    python benchmarks/bench_scaling.py [--quick] [--smoke] [--threads 2] [--repeats 3]
                                       [--plot PNG | --no-plot] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import machine_info, print_table, set_threads, time_call, write_json  # noqa: E402

import difnumpy  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional, never a dependency
    torch = None

DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling.png")


BUDGET_S = 0.3  # time spent per point when a single call is fast (lowered by --smoke)


def _adaptive_time(fn, repeats, budget_s=None, max_repeats=20):
    """Warm-up call, then the median of max(repeats, ~budget_s / first-timed-call) timed calls."""
    budget_s = BUDGET_S if budget_s is None else budget_s
    fn()  # untimed warm-up
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(min(max_repeats, max(repeats, budget_s / max(first, 1e-9))))
    return time_call(fn, max(1, reps - 1), warmup=0) if reps > 1 else first


def fit_slope(x, y):
    """Least-squares slope of log(y) on log(x) (None with fewer than 2 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def _forward_fns(hw, n, use_torch, model, tmodel):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 1, hw, hw), dtype=np.float32)
    t = rng.integers(0, 1000, size=n).astype(np.int64)
    fns = {"cpu": lambda: model(x, t)}
    if use_torch:
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def tfwd():
            with torch.no_grad():
                tmodel(xt, tt)
        fns["torch"] = tfwd
    return fns


def sweep_forward(kind, values, fixed, repeats, use_torch, model, tmodel):
    rows = []
    for v in values:
        n, hw = (v, fixed) if kind == "batch" else (fixed, v)
        fns = _forward_fns(hw, n, use_torch, model, tmodel)
        row = {"sweep": kind, "x": v, "batch": n, "size": hw}
        for name in sorted(fns, key=lambda k: k != "torch"):  # torch first (see bench_train)
            row[f"{name}_s"] = _adaptive_time(fns[name], repeats)
        if use_torch:
            row["cpu/torch"] = row["torch_s"] / row["cpu_s"]
        rows.append(row)
        print(f"  {kind:5s} = {v:4d}: cpu {row['cpu_s'] * 1e3:9.2f} ms"
              + (f"   torch {row['torch_s'] * 1e3:9.2f} ms" if use_torch else ""), flush=True)
    return rows


def sweep_steps(values, batch, hw, repeats, model, schedule):
    x_T = np.random.default_rng(0).standard_normal((batch, 1, hw, hw), dtype=np.float32)
    rows = []
    for s in values:
        t = _adaptive_time(lambda: difnumpy.sample(model, schedule, x_T.shape, method="ddim", num_steps=s,
                                                   x_T=x_T, backend="cpu"), repeats)
        rows.append({"sweep": "steps", "x": s, "batch": batch, "size": hw, "cpu_s": t})
        print(f"  steps = {s:4d}: cpu {t * 1e3:9.2f} ms", flush=True)
    return rows


def plot(rows, slopes, path):
    from matplotlib.figure import Figure

    from difnumpy.viz import save_figure
    fig = Figure(figsize=(13, 4))
    titles = {"batch": "forward vs batch size (8x8)", "size": "forward vs image side",
              "steps": "DDIM sampling vs steps"}
    for ax, kind in zip(fig.subplots(1, 3), ("batch", "size", "steps")):
        pts = [r for r in rows if r["sweep"] == kind]
        if not pts:
            ax.set_visible(False)
            continue
        x = np.array([r["x"] for r in pts], float)
        for impl, style in (("cpu", "o-"), ("torch", "s--")):
            if f"{impl}_s" not in pts[0]:
                continue
            y = np.array([r[f"{impl}_s"] for r in pts])
            k = slopes.get(f"{kind}_{impl}")
            ax.loglog(x, y, style, label=f"{'difnumpy numba' if impl == 'cpu' else 'PyTorch'}"
                      + (f" (slope {k:.2f})" if k is not None else ""))
        ref = {"batch": 1.0, "size": 2.0, "steps": 1.0}[kind]
        y0 = pts[-1]["cpu_s"]
        ax.loglog(x, y0 * (x / x[-1]) ** ref, ":", color="grey", label=f"ideal slope {ref:g}")
        ax.set_xlabel({"batch": "batch size N", "size": "image side H = W", "steps": "sampling steps S"}[kind])
        ax.set_xticks(x)
        ax.set_xticks([], minor=True)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.set_ylabel("seconds")
        ax.set_title(titles[kind])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="BLAS, numba and torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="minimum timed repeats per point (median)")
    ap.add_argument("--size-batch", type=int, default=32, help="batch of the image-size sweep")
    ap.add_argument("--steps-batch", type=int, default=8, help="batch of the steps sweep")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--plot", default=DEFAULT_PLOT, help="PNG path (default benchmarks/scaling.png)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 1..128, size batch 8, steps 5..50, 1 repeat")
    ap.add_argument("--smoke", action="store_true", help="tiniest settings (tests only)")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args(argv)
    global BUDGET_S
    BUDGET_S = 0.02 if args.smoke else 0.3
    batches = [2 ** k for k in range(10)]  # 1 .. 512
    sizes, steps = [8, 16, 28, 32], [5, 10, 20, 50, 100]
    size_batch, steps_batch, repeats = args.size_batch, args.steps_batch, args.repeats
    if args.quick:
        batches, size_batch, steps, repeats = [2 ** k for k in range(8)], 8, [5, 10, 20, 50], 1
    if args.smoke:
        batches, sizes, steps, size_batch, steps_batch, repeats = [1, 2, 4], [8, 16], [2, 4], 1, 1, 1
    threads = set_threads(args.threads)
    use_torch = torch is not None and not args.no_torch
    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores; numpy {info['numpy']}, numba {info['numba']}, "
          f"torch {info['torch']}; threads {threads}")
    model = difnumpy.UNet(backend="cpu", rng=np.random.default_rng(0))
    schedule = difnumpy.Schedule.from_name("linear", 1000)
    tmodel = None
    if use_torch:
        from bench_train import TorchUNet
        torch.manual_seed(0)
        tmodel = TorchUNet().eval()

    rows = sweep_forward("batch", batches, 8, repeats, use_torch, model, tmodel)
    rows += sweep_forward("size", sizes, size_batch, repeats, use_torch, model, tmodel)
    rows += sweep_steps(steps, steps_batch, 8, repeats, model, schedule)

    slopes = {}
    for kind in ("batch", "size", "steps"):
        pts = [r for r in rows if r["sweep"] == kind]
        for impl in ("cpu", "torch"):
            if pts and f"{impl}_s" in pts[0]:
                slopes[f"{kind}_{impl}"] = fit_slope([r["x"] for r in pts], [r[f"{impl}_s"] for r in pts])
                big = [r for r in pts if kind == "batch" and r["x"] >= 32]
                if len(big) >= 2:
                    slopes[f"batch>=32_{impl}"] = fit_slope([r["x"] for r in big], [r[f"{impl}_s"] for r in big])

    heads = ["sweep", "x", "batch", "size", "cpu_s"] + (["torch_s", "cpu/torch"] if use_torch else [])
    print("\nseconds per forward (batch, size sweeps) or per whole DDIM sample call (steps sweep); "
          "cpu/torch > 1 means difnumpy is faster")
    print_table([[r.get(h) for h in heads] for r in rows], heads)
    print("\nfitted log-log slopes (ideal: batch 1, size 2, steps 1):")
    print_table([[k, v] for k, v in slopes.items()], ["fit", "slope"])
    png = None
    if not args.no_plot:
        png = plot(rows, slopes, args.plot)
        print(f"\nplot written to {png}")
    if args.json:
        write_json(args.json, {"benchmark": "bench_scaling", "machine": info, "threads": threads,
                               "rows": rows, "slopes": slopes, "plot": png})
    return {"rows": rows, "slopes": slopes, "plot": png}


if __name__ == "__main__":
    main()
