"""Sampling throughput: DDPM-1000, DDIM-{10,20,50,100} and DPM-Solver++(2M)-15 with the default U-Net,
beside PyTorch.

Questions answered, each with its baseline timed in the same run:

1. How many images/s does ``difnumpy.sample`` produce with the default U-Net (``backend="cpu"``,
   410,721 params) at batch N (default 128) on HxW images (default 8x8), for DDPM with all 1000 steps
   and DDIM (eta = 0) with 10, 20, 50 and 100 steps? Beside it: the same architecture in PyTorch on the
   CPU (``TorchUNet`` from bench_train.py) driven by a diffusers-style loop (``for t in timesteps:
   eps = model(x, t); x = step(eps, t, x)`` with the DDPM / DDIM update written in torch, "leading"
   timestep spacing, x0 clipped to [-1, 1], as ``diffusers.DDPMScheduler`` / ``DDIMScheduler`` do;
   no diffusers dependency). Both start from the same x_T. The figure quoted is ``cpu / torch``.
   DPM-Solver++(2M) with 15 steps (``method="dpmpp_2m"``; the torch loop writes the same multistep update,
   Lu et al. 2022 Alg. 2, at the same timesteps: ``difnumpy.solvers.schedule_sigmas``).
2. The DDIM-50 vs DDPM-1000 wall-clock speedup. Goal >= 19x. The ideal is 20x = 1000 / 50: both loops
   call the same network once per step, so the ratio falls below 20 only by what each step costs beyond
   the network (the sampler update, noise drawing, Python), and exceeds it slightly because a DDPM step
   also draws fresh noise while a DDIM (eta = 0) step does not.
3. The loop's own overhead: the same ``sample`` calls with a zero-cost model (``lambda x, t: x * 0``,
   costs one multiply) give the per-step cost of everything but the network, which is reported beside the
   network's own per-step forward time (``model(x, t)`` timed alone) as a fraction.

How it measures: every implementation runs both loops once untimed first (numba compilation / loading,
first-touch allocation, torch's one-off initialisation); then the implementations are warmed, interleaved,
until each one's sampling-step time is stable (at least 5 steps and two successive 3-step medians within
5 %: ``_common.warm_until_stable``); then each full loop is timed ``--repeats`` times (DDPM-1000
``--ddpm-repeats`` times, default 1), the implementations alternating repeat by repeat in this process, and
the median is kept; each ``cpu / torch`` ratio is printed beside both sides' images/s. Each loop is also
timed step by step; the median step time x the number of steps is given as a noise-robust cross-check
(``median_step_s``).
With ``--ddpm-steps K`` (K < 1000) DDPM-1000 is NOT run to the end: the first K steps of the 1000-step
loop are timed and the total is extrapolated x 1000/K; such rows are labelled ``extrapolated``.

    python benchmarks/bench_sample.py [--batch 128] [--size 8|28] [--threads 2] [--repeats 3]
                                      [--ddpm-steps K] [--quick] [--smoke] [--json OUT]

``--quick``: batch 16, full loops (DDPM-1000 once, DDIM median of 3): well under a minute when the machine
is quiet. Its figures are per-step-overhead heavy (small batch); quote the default (batch 128) run.
``--smoke``: batch 2, DDPM extrapolated from 5 steps, DDIM-{10,20}: for the test suite only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import (machine_info, print_table, run_interleaved, set_threads, time_call,  # noqa: E402
                     warm_until_stable, warmup_note, write_json)

import difnumpy  # noqa: E402
from difnumpy.samplers import inference_timesteps, sample_progressive  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional, never a dependency
    torch = None

GOAL_SPEEDUP = 19.0
GOAL_VS_TORCH = 1.0


# ----------------------------------------------------------------------------- the loops
def _zero_model(x, t):
    """A model of (almost) zero cost: the loop's own overhead is what remains."""
    return x * 0


def difnumpy_loop(model, schedule, x_T, method, num_steps, max_steps=None):
    """Run ``difnumpy.sample_progressive`` from ``x_T``; return (x, per-step seconds list).

    ``max_steps`` stops the loop early (used only for the labelled DDPM extrapolation).
    """
    times = []
    x = None
    # x_T given -> rng may not be (ARCHITECTURE.md, convention 3); DDPM's step noise then comes from a fresh
    # generator, which does not matter for timing
    gen = sample_progressive(model, schedule, x_T.shape, method=method, num_steps=num_steps, x_T=x_T,
                             backend="cpu")
    t0 = time.perf_counter()
    for i, step in enumerate(gen):
        x = step["x_t"]
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
        if max_steps is not None and i + 1 >= max_steps:
            break
    return x, times


def torch_dpmpp_2m_loop(model, schedule, x_T, num_steps):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) as diffusers' ``DPMSolverMultistepScheduler`` runs it by default
    (midpoint, no thresholding, first order at the final step to sigma 0) in torch, at the timesteps of
    ``difnumpy.solvers.schedule_sigmas``; returns (x as ndarray, per-step seconds)."""
    from difnumpy.solvers import schedule_sigmas
    ts, sigmas = schedule_sigmas("dpmpp_2m", schedule, num_steps)
    alpha = [1.0 / (1.0 + s * s) ** 0.5 for s in sigmas]  # VP: sigma = sigma_t / alpha_t
    sig = [s * a for s, a in zip(sigmas, alpha)]
    lam = [float("inf") if s == 0 else float(np.log(a / s)) for a, s in zip(alpha, sig)]
    n = x_T.shape[0]
    x = torch.from_numpy(np.array(x_T, copy=True))
    times, x0_prev, h_prev = [], None, None
    with torch.no_grad():
        t0 = time.perf_counter()
        for i, t in enumerate(ts):
            eps = model(x, torch.full((n,), int(t), dtype=torch.int64))
            x0 = (x - sig[i] * eps) / alpha[i]
            if sig[i + 1] == 0:  # the final step to sigma 0: x0
                x = x0
            else:
                h = lam[i + 1] - lam[i]
                d = x0 if x0_prev is None else x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
                x = (sig[i + 1] / sig[i]) * x - alpha[i + 1] * float(np.expm1(-h)) * d
                h_prev = h
            x0_prev = x0
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
    return x.numpy(), times


def torch_loop(model, schedule, x_T, method, num_steps, max_steps=None, seed=1):
    """A diffusers-style sampling loop in torch; returns (x as ndarray, per-step seconds list).

    DDPM step (diffusers ``DDPMScheduler.step``, variance "fixed_small", clip_sample=True) and DDIM step
    (``DDIMScheduler.step``, eta = 0, clip_sample=True, eps re-derived from the clipped x0,
    ``set_alpha_to_one=True``), timesteps with "leading" spacing: the same maths as ``difnumpy.sample``.
    """
    if method == "dpmpp_2m":
        return torch_dpmpp_2m_loop(model, schedule, x_T, num_steps)
    alphas_cumprod = schedule.alphas_cumprod
    T = len(alphas_cumprod)
    timesteps = [int(t) for t in inference_timesteps(T, num_steps, "leading")]
    ac = [float(a) for a in alphas_cumprod]
    gen = torch.Generator().manual_seed(seed)
    n = x_T.shape[0]
    x = torch.from_numpy(np.array(x_T, copy=True))
    times = []
    with torch.no_grad():
        t0 = time.perf_counter()
        for i, t in enumerate(timesteps):
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps = model(x, torch.full((n,), t, dtype=torch.int64))
            # 1. alphas, betas
            a_t = ac[t]
            a_prev = ac[prev_t] if prev_t >= 0 else 1.0
            b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
            # 2. predicted x0 (DDPM eq. 15), clipped
            x0 = ((x - b_t ** 0.5 * eps) / a_t ** 0.5).clamp_(-1.0, 1.0)
            if method == "ddpm":
                # 3.-4. posterior mean coefficients (DDPM eq. 7)
                cur_alpha = a_t / a_prev
                cur_beta = 1.0 - cur_alpha
                x = (a_prev ** 0.5 * cur_beta / b_t) * x0 + (cur_alpha ** 0.5 * b_prev / b_t) * x
                # 5. noise with the fixed_small variance, none on the last step
                if prev_t >= 0:
                    var = max(b_prev / b_t * cur_beta, 1e-20)
                    x = x + var ** 0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            else:
                # DDIM eq. 12 with sigma = 0
                eps_c = (x - a_t ** 0.5 * x0) / b_t ** 0.5
                x = a_prev ** 0.5 * x0 + b_prev ** 0.5 * eps_c
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
            if max_steps is not None and i + 1 >= max_steps:
                break
    return x.numpy(), times


# ----------------------------------------------------------------------------- measurement
WARMUP = {"min_steps": 5, "block": 3, "rtol": 0.05, "max_steps": 60, "max_seconds": 120.0}


def bench_loops(impls, schedule, x_T, configs, repeats, ddpm_repeats, ddpm_steps, warmup=None):
    """Time every (method, steps) config for every implementation. Returns (rows, warm-up report).

    ``impls`` is a list of (name, make_run) with ``make_run(method, steps, max_steps) -> run`` and
    ``run() -> (x, per-step seconds)``. The implementations are warmed together until their step times
    are stable, then each config's repeats alternate between them.
    """
    warmup = dict(WARMUP if warmup is None else warmup)
    rows = []
    batch = x_T.shape[0]
    T = schedule.num_timesteps
    for name, make_run in impls:
        # untimed: compiles / loads kernels, allocates, for both methods
        make_run("ddim", 2, None)()
        make_run("ddpm", T, 2)()
    # one sampler step (model call + update) per call, until every implementation's step time is stable
    warm = warm_until_stable({name: make_run("ddim", 50, 1) for name, make_run in impls}, untimed=0, **warmup)
    print(f"  {warmup_note(warm)}", flush=True)
    for method, steps in configs:
        is_ddpm = method == "ddpm"
        partial = is_ddpm and ddpm_steps is not None and ddpm_steps < steps
        runs = {name: make_run(method, steps, ddpm_steps if partial else None) for name, make_run in impls}
        res = run_interleaved(runs, ddpm_repeats if is_ddpm else repeats)
        for name, _ in impls:
            walls = [wall for wall, _ in res[name]]
            step_lists = [st for _, (_, st) in res[name]]
            wall = statistics.median(walls)
            med = statistics.median([statistics.median(st) * len(st) for st in step_lists])
            done = len(step_lists[0])
            scale = steps / done
            row = {"impl": name, "method": method.upper(), "steps": steps, "batch": batch,
                   "seconds": wall * scale, "median_step_s": med * scale / steps,
                   "images_per_s": batch / (wall * scale), "timed_steps": done,
                   "extrapolated": bool(scale != 1.0), "warmup_steps": warm[name]["steps"],
                   "warmup_stable": warm[name]["stable"]}
            rows.append(row)
            label = f" (extrapolated from {done} steps)" if row["extrapolated"] else ""
            print(f"  {name:6s} {method.upper()}-{steps:<5d} {row['seconds']:9.3f} s  "
                  f"{row['images_per_s']:9.2f} img/s{label}", flush=True)
    return rows, warm


def bench_overhead(model, schedule, x_T, repeats, ddpm_steps):
    """Per-step cost of the loop alone (zero-cost model) vs the network's forward alone."""
    n = x_T.shape[0]
    t_batch = np.full(n, 500, dtype=np.int64)
    fwd = time_call(lambda: model(x_T, t_batch), max(3, repeats), warmup=1)
    out = {"model_forward_s": fwd}
    T = schedule.num_timesteps
    for method, steps in (("ddpm", T), ("ddim", 50)):
        lim = ddpm_steps if (method == "ddpm" and ddpm_steps is not None and ddpm_steps < steps) else None
        difnumpy_loop(_zero_model, schedule, x_T, method, steps, 2)  # warm-up
        walls = []
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            _, st = difnumpy_loop(_zero_model, schedule, x_T, method, steps, lim)
            walls.append((time.perf_counter() - t0) / len(st))
        per_step = statistics.median(walls)
        out[f"{method}_loop_overhead_step_s"] = per_step
        out[f"{method}_overhead_fraction"] = per_step / (per_step + fwd)
    # what the speedup would be from these parts: 1000 (m + o_ddpm) / (50 (m + o_ddim))
    out["predicted_speedup"] = (T * (fwd + out["ddpm_loop_overhead_step_s"])
                                / (50 * (fwd + out["ddim_loop_overhead_step_s"])))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick 16)")
    ap.add_argument("--size", type=int, default=8, help="image side H = W (8 or 28; default 8)")
    ap.add_argument("--threads", type=int, default=2, help="BLAS, numba and torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each DDIM loop (median)")
    ap.add_argument("--ddpm-repeats", type=int, default=1, help="timed repeats of the DDPM-1000 loop")
    ap.add_argument("--ddpm-steps", type=int, default=None,
                    help="time only the first K DDPM steps and extrapolate x 1000/K (labelled)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--quick", action="store_true", help="batch 16, full loops")
    ap.add_argument("--smoke", action="store_true", help="tiniest settings (tests only)")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args(argv)
    ddim_steps = (10, 20, 50, 100)
    batch, repeats, ddpm_steps = args.batch or 128, args.repeats, args.ddpm_steps
    if args.quick:
        batch, repeats = args.batch or 16, 3
    if args.smoke:
        batch, repeats, ddpm_steps, ddim_steps = args.batch or 2, 1, ddpm_steps or 5, (10, 50)
    threads = set_threads(args.threads)
    use_torch = torch is not None and not args.no_torch
    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores; numpy {info['numpy']}, numba {info['numba']}, "
          f"torch {info['torch']}; threads {threads}")
    print(f"# glibc malloc tuned by the cpu backend (process-wide, both sides): {info['glibc_malloc_tuned']}"
          f" (one arena: {info['glibc_malloc_one_arena']})")
    print(f"# sampling, default U-Net, batch {batch}, {args.size}x{args.size}, float32")

    schedule = difnumpy.Schedule.from_name("linear", 1000)
    model = difnumpy.UNet(backend="cpu", rng=np.random.default_rng(0))
    x_T = np.random.default_rng(0).standard_normal((batch, 1, args.size, args.size), dtype=np.float32)
    configs = [("ddpm", 1000)] + [("ddim", s) for s in ddim_steps] + [("dpmpp_2m", 15)]

    impls = []
    if use_torch:
        from bench_train import TorchUNet
        torch.manual_seed(0)
        tmodel = TorchUNet().eval()
        impls.append(("torch", lambda m, s, lim: (lambda: torch_loop(tmodel, schedule, x_T, m, s, lim))))
    impls.append(("cpu", lambda m, s, lim: (lambda: difnumpy_loop(model, schedule, x_T, m, s, lim))))
    # the two implementations alternate in this process (bench_loops), both warmed until stable
    warmup = dict(WARMUP)
    if args.smoke:
        warmup.update(max_steps=12, max_seconds=10.0)
    rows, warm = bench_loops(impls, schedule, x_T, configs, repeats, args.ddpm_repeats, ddpm_steps, warmup)

    by = {(r["impl"], r["method"], r["steps"]): r for r in rows}
    for r in rows:
        if r["impl"] == "cpu" and ("torch", r["method"], r["steps"]) in by:
            r["torch_images_per_s"] = by[("torch", r["method"], r["steps"])]["images_per_s"]
            r["cpu/torch"] = r["images_per_s"] / r["torch_images_per_s"]

    overhead = bench_overhead(model, schedule, x_T, repeats, ddpm_steps)
    summary = {}
    for impl in [i for i, _ in impls]:
        ddpm, ddim50 = by.get((impl, "DDPM", 1000)), by.get((impl, "DDIM", 50))
        if ddpm and ddim50:
            summary[f"{impl}_ddim50_vs_ddpm1000_speedup"] = ddpm["seconds"] / ddim50["seconds"]
            summary[f"{impl}_ddim50_vs_ddpm1000_speedup_median_step"] = (
                ddpm["median_step_s"] * 1000 / (ddim50["median_step_s"] * 50))
    summary.update(overhead)
    summary["ddpm_extrapolated"] = any(r["extrapolated"] for r in rows)

    heads = ["impl", "method", "steps", "seconds", "images_per_s", "torch_images_per_s", "cpu/torch",
             "extrapolated", "warmup_steps", "warmup_stable"]
    print(f"\nsampling images/s, batch {batch}, {args.size}x{args.size}  "
          f"(seconds = median wall clock of the whole loop)")
    print_table([[r.get(h) for h in heads] for r in rows], heads)
    sp = summary.get("cpu_ddim50_vs_ddpm1000_speedup")
    if sp is not None:
        ok = "met" if sp >= GOAL_SPEEDUP else "NOT met"
        ext = " (DDPM extrapolated)" if summary["ddpm_extrapolated"] else ""
        print(f"\nDDIM-50 vs DDPM-1000 wall clock: {sp:.1f}x{ext} (ideal 20x; goal >= {GOAL_SPEEDUP:g}x: {ok}); "
              f"from median step times {summary['cpu_ddim50_vs_ddpm1000_speedup_median_step']:.1f}x")
    print(f"loop overhead per step (zero-cost model): DDPM {overhead['ddpm_loop_overhead_step_s'] * 1e3:.3f} ms, "
          f"DDIM {overhead['ddim_loop_overhead_step_s'] * 1e3:.3f} ms;  network forward "
          f"{overhead['model_forward_s'] * 1e3:.2f} ms/step  -> overhead {overhead['ddpm_overhead_fraction']:.2%} "
          f"(DDPM), {overhead['ddim_overhead_fraction']:.2%} (DDIM); predicted speedup "
          f"{overhead['predicted_speedup']:.1f}x")
    if args.json:
        write_json(args.json, {"benchmark": "bench_sample", "machine": info, "threads": threads,
                               "batch": batch, "size": args.size, "repeats": repeats, "warmup": warmup,
                               "warmup_report": {k: {kk: vv for kk, vv in v.items() if kk != "times_s"}
                                                 for k, v in warm.items()},
                               "rows": rows, "summary": summary})
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
