"""Sample quality against network evaluations: FD vs NFE for every sampler on the demo checkpoint.

Question: how many network function evaluations (NFE) does each sampler need for a given quality? The
samplers are the few-step solvers of ``difnumpy.solvers`` and, as the baseline measured in the same run, DDIM
(eta = 0, difnumpy's defaults: "leading" spacing, x0 clipped to [-1, 1]). Quality is the Frechet distance (FD)
between the samples, clipped to [-1, 1], and the test digits in the project's digit classifier's feature space
(``difnumpy.metrics.evaluate_samples``, as ``difnumpy demo`` and ``difnumpy evaluate`` score), beside its floor
(a train subset of the same size against the test digits).

Configurations (``CONFIGS``). The demo's model predicts eps on a cosine schedule whose last timestep has
sigma = sqrt((1 - abar) / abar) = 2.0e4, so a solver that starts there turns a 1e-3 error of eps into an x0
error of ~20: with diffusers' defaults (no clipping, "linspace" spacing, first step at t = 999) DPM-Solver++ and
Euler reach FD ~31 and Heun (5 steps) ~360, whatever the step count (rows marked "defaults", NFE 10). What
diffusers offers against it is used for the main sweep: DPM-Solver++ with ``thresholding=True`` (with
``sample_max_value=1`` that is x0 clipped to [-1, 1], as DDIM does by default); Euler and Euler ancestral,
which diffusers cannot clip, with ``spacing="leading"`` (first step at t = 1000 - 1000 / S); Heun with both
(its trapezoidal corrector over the step from sigma = 2e4 fails even with x0 clipped).

How: the EMA weights of ``--checkpoint`` (``difnumpy demo --out DIR`` writes DIR/checkpoint.npz); every sampler
starts from the same x_T (``--seed``), ``-n`` samples (default 2000) in one batch through ``difnumpy.sample``;
NFE targets ``--nfe`` (default 5,10,20,50,100): S = NFE steps for the single-call methods, S = (NFE + 1) // 2
for Heun (2S - 1 evaluations: its last step, to sigma = 0, is an Euler step). The figure quoted is each FD's
ratio to DDIM-50's (the same x_T, so much of the sampling noise cancels). The goal's ratio moves by about
+-0.04 from one set of x_T to another, so it is measured on ``--goal-seeds`` (default 4) independent sets
(DDIM-50, DPM-Solver++ 2M with 10 and 5 steps each) and the mean is quoted with the range.

Goal (issue 12): DPM-Solver++ 2M with 10 steps reaches an FD no worse than 1.05x DDIM-50's.

Outputs: the table on stdout and as markdown in ``--out`` (``quality_vs_nfe.md``), ``quality_vs_nfe.png``
(FD against NFE, log-log), ``--json``; all written atomically.

    python benchmarks/bench_solvers.py --checkpoint /tmp/demo_ckpt/checkpoint.npz [-n 2000]
                                       [--nfe 5,10,20,50,100] [--configs ...] [--out DIR] [--json OUT] [--quick]

``--quick`` (tests only): a tiny untrained U-Net, 16 samples, NFE 5 and 10: checks the plumbing, not quality.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import machine_info, print_table, set_threads, write_json  # noqa: E402

from difnumpy import Schedule, UNet, load_checkpoint, sample, solvers  # noqa: E402
from difnumpy._io import atomic_write  # noqa: E402
from difnumpy.metrics import evaluate_samples  # noqa: E402

GOAL_RATIO = 1.05
METHODS = ("ddim",) + tuple(solvers.METHODS)
#: label -> (method, options) of the main sweep (see the module docstring for why these options)
CONFIGS = {
    "ddim": ("ddim", {}),
    "dpmpp_2m": ("dpmpp_2m", {"thresholding": True}),
    "dpmpp_3m": ("dpmpp_3m", {"thresholding": True}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {"thresholding": True}),
    "euler": ("euler", {"spacing": "leading"}),
    "euler_ancestral": ("euler_ancestral", {"spacing": "leading"}),
    "heun": ("heun", {"spacing": "leading", "clip_sample": True}),
}
DEFAULTS_NFE = 10   # every solver with diffusers' defaults, at this NFE only


def steps_for(method: str, nfe: int) -> int:
    """Steps S for an NFE target (Heun: 2S - 1 evaluations)."""
    return max(1, (nfe + 1) // 2) if method == "heun" else nfe


def nfe_of(method: str, steps: int) -> int:
    return 2 * steps - 1 if method == "heun" else steps


def _model(args):
    if args.quick:
        schedule = Schedule.from_name("cosine", 1000)
        model = UNet(base_channels=8, groups=2, rng=np.random.default_rng(0))
        return model, schedule, "epsilon", "tiny untrained U-Net (--quick: plumbing only)"
    if not args.checkpoint or not os.path.exists(args.checkpoint):
        raise SystemExit(f"--checkpoint {args.checkpoint!r} not found: run `difnumpy demo --out DIR` and pass "
                         f"DIR/checkpoint.npz")
    trainer = load_checkpoint(args.checkpoint)
    return (trainer.ema_model, trainer.schedule, trainer.prediction_type,
            f"EMA weights of {args.checkpoint} ({trainer.step_count} training steps)")


def run(model, schedule, prediction_type, method, steps, n, seed, opts):
    """One sampler run: (samples clipped to [-1, 1], seconds)."""
    x_T = np.random.default_rng([seed, 7]).standard_normal((n, 1, 8, 8)).astype(np.float32)
    kw = {"prediction_type": prediction_type, **opts}
    stochastic = method in ("euler_ancestral", "dpmpp_2m_sde")
    t0 = time.perf_counter()
    x = sample(model, schedule, x_T.shape, method=method, num_steps=steps, x_T=x_T,
               rng=np.random.default_rng([seed, 9]) if stochastic else None, **kw)
    return np.clip(x, -1.0, 1.0), time.perf_counter() - t0


def markdown_table(rows, ref_fd):
    head = ("| sampler | options | steps | NFE | FD | FD / DDIM-50 | FD / floor | confident | s |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['label']} | {_opts_text(r['options'])} | {r['steps']} | {r['nfe']} | {r['fd']:.3f} | "
        f"{r['fd'] / ref_fd:.3f} | {r['fd_ratio']:.2f} | {100 * r['confident_fraction']:.1f} % | "
        f"{r['seconds']:.1f} |\n" for r in rows)


def _opts_text(opts):
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"


def plot(rows, ref_fd, floor, floor_std, about, path):
    from matplotlib.figure import Figure

    from difnumpy.viz import save_figure

    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    labels = list(dict.fromkeys(r["label"] for r in rows if not r["defaults"]))
    for label in labels:
        pts = sorted((r for r in rows if r["label"] == label and not r["defaults"]), key=lambda r: r["nfe"])
        style = "k--o" if label == "ddim" else "-o"
        ax.plot([r["nfe"] for r in pts], [r["fd"] for r in pts], style, markersize=4,
                label=f"{label} ({_opts_text(pts[0]['options'])})")
    ax.axhline(GOAL_RATIO * ref_fd, color="tab:red", linestyle=":", label=f"{GOAL_RATIO} x DDIM-50")
    ax.axhline(floor, color="gray", linestyle="--", label="floor (train subset vs test) +- spread")
    ax.axhspan(floor - floor_std, floor + floor_std, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE, log scale)")
    ax.set_ylabel("Frechet distance to the test digits (log scale, lower is better)")
    ax.set_title(f"quality vs NFE: {about}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="difnumpy_demo/checkpoint.npz")
    ap.add_argument("-n", "--n-samples", dest="n", type=int, default=2000)
    ap.add_argument("--nfe", default="5,10,20,50,100", help="comma-separated NFE targets")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ",".join(CONFIGS))
    ap.add_argument("--no-defaults", action="store_true", help=f"skip the diffusers-defaults rows (NFE {DEFAULTS_NFE})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal-seeds", type=int, default=4,
                    help="independent x_T sets for the goal check (DDIM-50, DPM-Solver++ 2M-10 and 2M-5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench_solvers", help="directory of quality_vs_nfe.png / .md")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    ap.add_argument("--quick", action="store_true", help="tiny untrained model, 16 samples, NFE 5,10 (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.nfe, args.goal_seeds = 16, "5,10", 2
    nfes = [int(v) for v in args.nfe.split(",")]
    labels = [c.strip() for c in args.configs.split(",")]
    for c in labels:
        if c not in CONFIGS:
            ap.error(f"--configs: unknown configuration {c!r}; choose from {tuple(CONFIGS)}")
    threads = set_threads(args.threads)
    info = machine_info()
    model, schedule, pred, about = _model(args)
    print(f"model: {about}; n = {args.n}; threads {threads}; {info.get('cpu', '')}", flush=True)
    # the first call compiles / loads the numba kernels: never time it
    sample(model, schedule, (2, 1, 8, 8), method="ddim", num_steps=2, rng=np.random.default_rng(0),
           prediction_type=pred)

    runs = [(c, *CONFIGS[c], steps_for(CONFIGS[c][0], nfe), False) for c in labels for nfe in nfes]
    if "ddim" not in labels or 50 not in nfes:
        runs.append(("ddim", "ddim", {}, 50, False))        # the reference
    if not args.no_defaults:
        runs += [(m, m, {}, steps_for(m, DEFAULTS_NFE), True) for m in solvers.METHODS]
    rows = []
    for label, method, opts, steps, defaults in runs:
        x, seconds = run(model, schedule, pred, method, steps, args.n, args.seed, opts)
        m = evaluate_samples(x, np.random.default_rng([args.seed, 8]))
        rows.append({"label": label, "method": method, "options": opts, "defaults": defaults, "steps": steps,
                     "nfe": nfe_of(method, steps), "seconds": seconds, "n": args.n, "fd": m["fd"],
                     "fd_floor": m["fd_floor"], "fd_floor_std": m["fd_floor_std"], "fd_ratio": m["fd_ratio"],
                     "confident_fraction": m["confident_fraction"]})
        print(f"  {label:16s} {_opts_text(opts):38s} S={steps:<4d} NFE={rows[-1]['nfe']:<4d} FD {m['fd']:8.3f} "
              f"(floor {m['fd_floor']:.3f})  {seconds:6.1f} s", flush=True)

    ref = next((r for r in rows if r["method"] == "ddim" and r["steps"] == 50 and not r["options"]), None)
    ref_fd = ref["fd"] if ref else float("nan")
    print()
    print_table([[r["label"], _opts_text(r["options"]), r["steps"], r["nfe"], f"{r['fd']:.3f}",
                  f"{r['fd'] / ref_fd:.3f}", f"{r['fd_ratio']:.2f}", f"{100 * r['confident_fraction']:.1f}",
                  f"{r['seconds']:.1f}"] for r in rows],
                ["sampler", "options", "steps", "NFE", "FD", "FD/DDIM-50", "FD/floor", "conf %", "s"])
    summary = {"ddim50_fd": ref_fd, "fd_floor": rows[-1]["fd_floor"], "fd_floor_std": rows[-1]["fd_floor_std"]}
    # the goal, over --goal-seeds independent sets of x_T: one set's ratio moves by about +-0.04
    goal = []
    two_m = CONFIGS["dpmpp_2m"][1]
    for k in range(args.goal_seeds):
        seed = args.seed + k
        fds = {}
        for S, method, opts in [(50, "ddim", {}), (10, "dpmpp_2m", two_m), (5, "dpmpp_2m", two_m)]:
            r = next((r for r in rows if k == 0 and r["method"] == method and r["steps"] == S
                      and r["options"] == opts), None)
            if r is None:
                x = run(model, schedule, pred, method, S, args.n, seed, opts)[0]
                r = evaluate_samples(x, np.random.default_rng([args.seed, 8]))
            fds[(method, S)] = r["fd"]
        goal.append({"seed": seed, "ddim50_fd": fds[("ddim", 50)], "dpmpp_2m_10_fd": fds[("dpmpp_2m", 10)],
                     "dpmpp_2m_5_fd": fds[("dpmpp_2m", 5)],
                     "dpmpp_2m_10_vs_ddim50": fds[("dpmpp_2m", 10)] / fds[("ddim", 50)],
                     "dpmpp_2m_5_vs_ddim50": fds[("dpmpp_2m", 5)] / fds[("ddim", 50)]})
        g = goal[-1]
        print(f"  goal, x_T seed {seed}: DDIM-50 FD {g['ddim50_fd']:.3f}; DPM-Solver++ 2M-10 "
              f"{g['dpmpp_2m_10_fd']:.3f} ({g['dpmpp_2m_10_vs_ddim50']:.3f} x), 2M-5 {g['dpmpp_2m_5_fd']:.3f} "
              f"({g['dpmpp_2m_5_vs_ddim50']:.3f} x)", flush=True)
    if goal:
        r10 = np.array([g["dpmpp_2m_10_vs_ddim50"] for g in goal])
        r5 = np.array([g["dpmpp_2m_5_vs_ddim50"] for g in goal])
        summary.update(goal_runs=goal, dpmpp_2m_10_vs_ddim50=float(r10.mean()), dpmpp_2m_5_vs_ddim50=float(r5.mean()),
                       dpmpp_2m_10_vs_ddim50_range=[float(r10.min()), float(r10.max())])
        met = bool(r10.mean() <= GOAL_RATIO)
        summary["goal_dpmpp_2m_10_within_1.05x_ddim50"] = met
        print(f"\nDPM-Solver++ 2M (thresholding), 10 steps: FD {r10.mean():.3f} x DDIM-50's, mean of {len(goal)} x_T "
              f"sets (range {r10.min():.3f}-{r10.max():.3f}, {int(np.sum(r10 <= GOAL_RATIO))} of {len(goal)} "
              f"within {GOAL_RATIO}); goal <= {GOAL_RATIO}: {'met' if met else 'NOT met'}; 5 steps: {r5.mean():.3f} x"
              + (" (--quick: an untrained model, meaningless)" if args.quick else ""))
    os.makedirs(args.out, exist_ok=True)
    md = markdown_table(rows, ref_fd)
    md_path = atomic_write(os.path.join(args.out, "quality_vs_nfe.md"),
                           lambda f: f.write(f"{about}; n = {args.n}; seed {args.seed}\n\n{md}"), binary=False)
    png = plot(rows, ref_fd, summary["fd_floor"], summary["fd_floor_std"], about,
               os.path.join(args.out, "quality_vs_nfe.png"))
    print("wrote", md_path, "and", png)
    res = {"machine": info, "threads": threads, "model": about, "n": args.n, "seed": args.seed, "rows": rows,
           "summary": summary}
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
