"""06 - Orders of convergence of the samplers, measured against an exact solution.

For Gaussian data x0 ~ N(mu, s^2) the probability-flow ODE (Song et al. 2021; Karras et al. 2022, eq. 1) has a
closed-form solution: the standardised value ``z = (x_t - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar)`` stays
constant along it, so a trajectory started at x_T ends exactly at ``x0 = mu + s z_T``. Driving each solver with
the exact denoiser at its own noise levels therefore isolates its discretisation error, and the slope of
log(error) against log(steps) is its order p (error ~ steps^-p):

- DDIM (Song et al. 2021, eq. 12) and Euler (Karras et al., Algorithm 1 without its correction): order 1;
- Heun (Karras et al., Algorithm 1) and DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): order 2;
- DPM-Solver++(3M): order 3. diffusers' 3M weights its second divided difference by half the Taylor
  coefficient and is second order (``diffusers_d2=True``; see difnumpy/solvers.py), plotted for comparison.

The stochastic samplers (Euler ancestral, DPM-Solver++(2M) SDE) do not follow the ODE: their error is in
distribution. The second panel shows how far the variance of their samples is from the data's, against the
steps, beside the sampling noise of that many samples.

Setup: a schedule log-linear in sigma from 1e-5 to 80 (so that the last step, sigma_min -> 0, adds no
visible error), Karras sigmas (eq. 5, rho = 7) for the sigma-space solvers, "linspace" integer timesteps for
DDIM. Output (in --out): ``solver_orders.png`` and ``results.json``.

    python examples/06_solver_orders.py [--out DIR] [--quick]

Measured (default settings), slopes over 45..256 steps: DDIM 0.99, Euler 0.99, Heun 2.05, DPM-Solver++ 2M 2.08,
3M 3.09 (diffusers' 3M 1.64, not yet at its asymptotic 2); errors at 256 steps: 6.7e-3, 5.5e-3, 1.2e-4 (NFE 511),
1.3e-4, 5.1e-6 (diffusers' 3M 3.1e-5). Below about 20 steps the multistep solvers on Karras sigmas are erratic
(the first steps, at sigma ~ 80, are long). Variance error of the stochastic samplers (20,000 samples): Euler
ancestral 0.23 / 0.11 / 0.025 at 50 / 100 / 400 steps (first order), 2M SDE 0.03 / 0.018 / 0.007.
"""
import argparse
import json
import os

import numpy as np
from matplotlib.figure import Figure

from difnumpy import Schedule, solvers
from difnumpy._io import atomic_write
from difnumpy.samplers import ddim_step, inference_timesteps
from difnumpy.testing import GaussianOracle
from difnumpy.viz import save_figure

MU, SD = 0.3, 0.5
T = 1000


def log_sigma_schedule(sigma_min=1e-5, sigma_max=80.0):
    sig = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), T))
    abar = 1.0 / (1.0 + sig ** 2)
    return Schedule(1.0 - abar / np.concatenate([[1.0], abar[:-1]]))


class SigmaOracle:
    """The exact denoiser of N(mu, sd^2) (epsilon prediction) at the noise level of each call in turn."""

    def __init__(self, sigmas, mu, sd):
        self.sigmas, self.mu, self.sd, self.k = sigmas, mu, sd, 0

    def __call__(self, x, t):
        sg = self.sigmas[self.k]
        self.k += 1
        ab = 1.0 / (1.0 + sg * sg)
        var = ab * self.sd ** 2 + 1.0 - ab
        return np.sqrt(1.0 - ab) / var * (x - np.sqrt(ab) * self.mu)


def ode_error(schedule, method, steps, n=64, **opts):
    """RMS distance of the solver's x0 from the exact end of the ODE, from n starting points."""
    x_T = np.random.default_rng(1).standard_normal((n, 1))
    if method == "ddim":
        ts = inference_timesteps(T, steps, "linspace")
        oracle, x = GaussianOracle(schedule, MU, SD), x_T
        for i, t in enumerate(ts):
            prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
            x, _ = ddim_step(schedule, oracle(x, np.full(n, t)), int(t), prev, x, clip_sample=False)
        ab = schedule.alphas_cumprod[ts[0]]
    else:
        _, sigmas = solvers.schedule_sigmas(method, schedule, steps, **opts)
        x = None
        for _, _, x, _ in solvers.solve(method, SigmaOracle(sigmas, MU, SD), schedule, x_T, num_steps=steps,
                                        backend="numpy", **opts):
            pass
        ab = 1.0 / (1.0 + sigmas[0] ** 2)
    exact = MU + SD * (x_T - np.sqrt(ab) * MU) / np.sqrt(ab * SD ** 2 + 1.0 - ab)
    return float(np.sqrt(np.mean((x - exact) ** 2)))


def variance_error(schedule, method, steps, n, seed=0):
    """|Var(samples) / s^2 - 1| of a stochastic sampler driven by the exact denoiser."""
    _, sigmas = solvers.schedule_sigmas(method, schedule, steps, use_karras_sigmas=True)
    rng = np.random.default_rng(seed)
    x = None
    for _, _, x, _ in solvers.solve(method, SigmaOracle(sigmas, MU, SD), schedule, rng.standard_normal((n, 1)),
                                    num_steps=steps, rng=rng, backend="numpy", use_karras_sigmas=True):
        pass
    return float(abs(x.var(ddof=1) / SD ** 2 - 1.0))


ODE_METHODS = [  # label, method, options, order
    ("DDIM", "ddim", {}, 1),
    ("Euler", "euler", {"use_karras_sigmas": True}, 1),
    ("Heun", "heun", {"use_karras_sigmas": True}, 2),
    ("DPM-Solver++ 2M", "dpmpp_2m", {"use_karras_sigmas": True}, 2),
    ("DPM-Solver++ 3M", "dpmpp_3m", {"use_karras_sigmas": True}, 3),
    ("3M, diffusers' D2", "dpmpp_3m", {"use_karras_sigmas": True, "diffusers_d2": True}, 2),
]


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure and plot the order of convergence of every sampler.")
    p.add_argument("--out", default="out/06_solver_orders", help="output directory")
    p.add_argument("--quick", action="store_true", help="few step counts and samples (tests)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    logsig = log_sigma_schedule()
    steps = [8, 16, 32] if args.quick else [4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256]
    fit_from = steps[0] if args.quick else 45          # the asymptotic range of the fit
    stoch_steps = [5, 20] if args.quick else [10, 20, 50, 100, 200, 400]
    n_stoch = 2000 if args.quick else 20000

    results = {"ode": {}, "stochastic": {}, "steps": steps, "fit_from": fit_from}
    print(f"{'method':20s} {'order':>5s} {'slope':>6s}   errors at {steps}")
    for label, method, opts, order in ODE_METHODS:
        err = np.array([ode_error(logsig, method, s, **opts) for s in steps])
        nfe = np.array([2 * s - 1 if method == "heun" else s for s in steps])
        sel = np.array(steps) >= fit_from
        slope = -np.polyfit(np.log(np.array(steps)[sel]), np.log(err[sel]), 1)[0]
        results["ode"][label] = {"method": method, "options": opts, "order": order, "slope": slope,
                                 "errors": err.tolist(), "nfe": nfe.tolist()}
        print(f"{label:20s} {order:5d} {slope:6.2f}   " + " ".join(f"{e:.1e}" for e in err))
    lin = Schedule.from_name("linear", T)
    noise = 2.0 * np.sqrt(2.0 / (n_stoch - 1))   # two standard errors of a sample variance, relative
    for method in ("euler_ancestral", "dpmpp_2m_sde"):
        errs = [variance_error(lin, method, s, n_stoch) for s in stoch_steps]
        results["stochastic"][method] = {"steps": stoch_steps, "variance_error": errs, "n": n_stoch}
        print(f"{method:20s} |Var/s^2 - 1| at {stoch_steps}: " + " ".join(f"{e:.3f}" for e in errs)
              + f"  (sampling noise ~{noise:.3f})")

    fig = Figure(figsize=(12, 5))
    ax, ax2 = fig.subplots(1, 2)
    for label, r in results["ode"].items():
        style = "--" if "diffusers" in label else "-"
        ax.loglog(r["nfe"], r["errors"], style + "o", markersize=3, label=f"{label}: slope {r['slope']:.2f} "
                                                                           f"(order {r['order']})")
    x_ref = np.array([30.0, 300.0])
    for p_ref in (1, 2, 3):
        ax.loglog(x_ref, 0.3 * (x_ref / x_ref[0]) ** -p_ref * 10 ** (-p_ref), ":", color="gray", linewidth=0.8)
        ax.annotate(f"slope -{p_ref}", (x_ref[1], 0.3 * 10 ** (-p_ref) * 10 ** -p_ref), fontsize=7, color="gray")
    ax.set_xlabel("model evaluations (NFE: steps; Heun 2 steps - 1)")
    ax.set_ylabel("RMS error of x0 vs the exact ODE solution")
    ax.set_title(f"ODE solvers, Gaussian data N({MU}, {SD}^2), exact denoiser", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    for method, r in results["stochastic"].items():
        ax2.loglog(r["steps"], r["variance_error"], "-o", markersize=3, label=method)
    ax2.axhline(noise, color="gray", linestyle="--", label=f"2 std. errors of a variance, n = {n_stoch}")
    ax2.set_xlabel("steps (Karras sigmas, linear schedule)")
    ax2.set_ylabel("|Var(samples) / s^2 - 1|")
    ax2.set_title("stochastic samplers: error in distribution", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    print("wrote", save_figure(fig, os.path.join(args.out, "solver_orders.png")))
    print("wrote", atomic_write(os.path.join(args.out, "results.json"),
                               lambda f: json.dump(results, f, indent=1), binary=False))
    return results


if __name__ == "__main__":
    main()
