"""04 - DDPM versus DDIM: sample quality against wall-clock time.

DDPM (Ho et al. 2020, Algorithm 2) samples by ancestral steps through all T = 1000 timesteps:
``x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z`` (eq. 11).
DDIM (Song et al. 2021) keeps the same trained network but uses a non-Markovian process whose marginals match
(eq. 12), and can therefore jump along a subsequence tau of S << T timesteps:

    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps_theta(x_t, t) + sigma z,
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)          (eq. 16)

eta = 0 is the deterministic sampler (an ODE discretisation); eta = 1 has the DDPM posterior's variance, so
DDIM with S = T and eta = 1 is DDPM. Song et al. (Table 1) found eta = 0 best when S is small, and the stochastic
samplers catching up only for large S. This script measures that trade-off for one trained model: the Frechet
distance in a digit classifier's feature space (:func:`difnumpy.metrics.evaluate_samples`) and the classifier's
confidence, against the seconds spent, for DDPM-T and for DDIM with several S and eta. Every sampler starts from
the same x_T (the same seed).

Model: ``--checkpoint`` (from example 03 or ``difnumpy demo``), or, without one, a small U-Net trained here for
``--train-minutes`` (a quick model: expect large distances; the ranking of the samplers is the point).

Outputs (in --out): ``ddpm_vs_ddim.png`` (FD against seconds per sample, log x axis) and ``results.json``.

    python examples/04_ddpm_vs_ddim.py [--checkpoint out/03_train_digits/checkpoint.npz] [-n 100]

Measured on 2 shared CPU cores with example 03's 4-minute checkpoint (1054 steps), n = 100 each: DDPM-1000
63 s, FD 7.19 (floor 7.09); DDIM-50 2.6 s (24x faster), FD 8.9 / 7.1 / 7.3 at eta 0 / 0.5 / 1; DDIM-10
0.5-0.6 s (~110x), FD 8.8-10.4. At n = 100 the distances are noisy (the floor itself varies by ~15 %): use -n 500
for firmer rankings (DDPM then takes ~5 minutes; --n-ddpm lowers that).
"""
import argparse
import json
import os
import time

import numpy as np
from matplotlib.figure import Figure

from difnumpy import sample
from difnumpy._io import atomic_write
from difnumpy.metrics import evaluate_samples
from difnumpy.viz import save_figure

import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _quick_model import get_model  # noqa: E402  (examples/_quick_model.py, shared with example 05)


def main(argv=None):
    p = argparse.ArgumentParser(description="Quality and wall time of DDPM and DDIM samplers.")
    p.add_argument("--out", default="out/04_ddpm_vs_ddim", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="a checkpoint.npz (example 03 or `difnumpy demo`); else train a quick model")
    p.add_argument("-n", "--n-samples", dest="n_samples", type=int, default=100, help="samples per DDIM sampler")
    p.add_argument("--n-ddpm", type=int, default=None, help="samples for DDPM-T (default: -n; fewer is faster)")
    p.add_argument("--ddim-steps", default="10,20,50,100", help="comma-separated S values")
    p.add_argument("--etas", default="0,0.5,1", help="comma-separated eta values")
    # only used without --checkpoint:
    p.add_argument("--train-minutes", type=float, default=1.0)
    p.add_argument("--train-steps", type=int, default=100_000)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--base-channels", type=int, default=16)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n_ddpm = args.n_samples if args.n_ddpm is None else args.n_ddpm

    model, schedule, prediction_type, about = get_model(args)
    T = schedule.num_timesteps
    step_counts = [int(s) for s in args.ddim_steps.split(",")]
    if any(s > T for s in step_counts):
        print(f"skipping DDIM step counts > T = {T}: {[s for s in step_counts if s > T]}")
        step_counts = [s for s in step_counts if s <= T]
    etas = [float(e) for e in args.etas.split(",")]
    print(f"model: {about}; T = {T}; {args.n_samples} samples per DDIM sampler, {n_ddpm} for DDPM-{T}"
          + ("" if n_ddpm == args.n_samples else " (fewer: DDPM is the slow one; its FD is noisier)"))

    # the first call compiles the Numba kernels: never time it
    sample(model, schedule, (1, 1, 8, 8), method="ddim", num_steps=1, rng=np.random.default_rng(0),
           prediction_type=prediction_type)

    # DDPM is listed with eta = 1: its variance is the posterior's, which DDIM reaches at eta = 1
    configs = [("DDPM", T, 1.0, n_ddpm)] + [("DDIM", s, eta, args.n_samples) for s in step_counts for eta in etas]
    rows = []
    for method, steps, eta, n in configs:
        rng = np.random.default_rng([args.seed, 7])  # the same seed: every sampler starts from the same x_T
        t0 = time.perf_counter()
        x = sample(model, schedule, (n, 1, 8, 8), method=method.lower(), num_steps=steps,
                   eta=eta if method == "DDIM" else 0.0, rng=rng, prediction_type=prediction_type)
        seconds = time.perf_counter() - t0
        m = evaluate_samples(np.clip(x, -1.0, 1.0), np.random.default_rng([args.seed, 8]))
        rows.append({"method": method, "steps": steps, "eta": eta, "n": n, "seconds": seconds,
                     "ms_per_sample": 1000.0 * seconds / n, "fd": m["fd"], "fd_floor": m["fd_floor"],
                     "fd_floor_std": m["fd_floor_std"],
                     "fd_noise": m["fd_noise"], "fd_ratio": m["fd_ratio"],
                     "confident_fraction": m["confident_fraction"], "mean_confidence": m["mean_confidence"]})
        r = rows[-1]
        print(f"  {method}-{steps:<4d} eta={eta:<3g}: {seconds:7.2f} s, FD {r['fd']:7.2f} "
              f"(floor {r['fd_floor']:.2f}), confident {100 * r['confident_fraction']:3.0f} %", flush=True)

    # the table
    ddpm_ms = rows[0]["ms_per_sample"]
    print(f"\n{'sampler':10s} {'eta':>4s} {'n':>5s} {'seconds':>8s} {'ms/sample':>10s} {'speedup':>8s} "
          f"{'FD':>8s} {'FD/floor':>9s} {'conf>=0.9':>10s} {'mean conf':>10s}")
    for r in rows:
        print(f"{r['method'] + '-' + str(r['steps']):10s} {r['eta']:4.1f} {r['n']:5d} {r['seconds']:8.2f} "
              f"{r['ms_per_sample']:10.2f} {ddpm_ms / r['ms_per_sample']:7.1f}x {r['fd']:8.2f} "
              f"{r['fd_ratio']:9.2f} {100 * r['confident_fraction']:9.0f}% {r['mean_confidence']:10.3f}")
    print(f"floor (train subset vs test, n = {args.n_samples}): FD {rows[-1]['fd_floor']:.2f} "
          f"+- {rows[-1]['fd_floor_std']:.2f} over subsets (differences smaller than that are noise); "
          f"noise: FD {rows[-1]['fd_noise']:.2f}")

    # the plot: FD against time per sample, one line per eta, DDPM as a star
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    for eta in etas:
        pts = [r for r in rows if r["method"] == "DDIM" and r["eta"] == eta]
        ax.plot([r["ms_per_sample"] for r in pts], [r["fd"] for r in pts], "o-", label=f"DDIM, eta = {eta:g}")
        for r in pts:
            ax.annotate(f"S={r['steps']}", (r["ms_per_sample"], r["fd"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.plot([rows[0]["ms_per_sample"]], [rows[0]["fd"]], "k*", markersize=12, label=f"DDPM, {T} steps")
    floor, floor_std = rows[-1]["fd_floor"], rows[-1]["fd_floor_std"]
    ax.axhline(floor, color="gray", linestyle="--", label="floor (train vs test) +- its spread")
    ax.axhspan(floor - floor_std, floor + floor_std, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("wall time per sample (ms, log scale)")
    ax.set_ylabel("Frechet distance to the test digits (lower is better)")
    ax.set_title(f"DDPM vs DDIM: {about}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    print("wrote", save_figure(fig, os.path.join(args.out, "ddpm_vs_ddim.png")))
    print("wrote", atomic_write(os.path.join(args.out, "results.json"),
                               lambda f: json.dump({"model": about, "num_timesteps": T, "rows": rows}, f, indent=1),
                               binary=False))
    return rows


if __name__ == "__main__":
    main()
