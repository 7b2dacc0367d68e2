"""01 - The forward process q(x_t | x0).

DDPM (Ho et al. 2020, eq. 4) destroys an image in closed form: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
This script writes two figures:

- ``forward_process.png``: handwritten digits noised at several t, under the linear and the cosine schedule
  (the cosine schedule, Nichol & Dhariwal 2021, destroys information more slowly in the middle);
- ``schedules.png``: abar_t and log-SNR(t) = log(abar_t / (1 - abar_t)) for each named schedule, and the
  linear schedule rescaled to zero terminal SNR (Lin et al. 2023).

    python examples/01_forward_process.py [--out DIR]
"""
import argparse
import os

import numpy as np

from difnumpy import Schedule, q_sample
from difnumpy.data import load_digits
from difnumpy.schedules import SCHEDULE_NAMES
from difnumpy.viz import forward_process_strip, schedule_curves


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot the forward process and the noise schedules.")
    p.add_argument("--out", default="out/01_forward_process", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    x0 = load_digits("test")[:6]
    ts = [0, 50, 100, 250, 500, 750, 999]
    for name in ("linear", "cosine"):
        s = Schedule.from_name(name, 1000)
        path = forward_process_strip(s, x0, ts, os.path.join(args.out, f"forward_process_{name}.png"), rng,
                                     title=f"q(x_t | x0), {name} schedule, T = 1000")
        print("wrote", path)
        # how much of the signal is left: the correlation between x_t and x0 is sqrt(abar_t) for unit data
        xt = q_sample(s, np.repeat(x0[:1], 2000, axis=0), 250, rng=rng)
        print(f"  {name}: abar_250 = {s.alphas_cumprod[250]:.3f}, "
              f"mean of x_250 / x0 over 2000 draws = {np.mean(xt, 0).ravel() @ x0[0].ravel() / (x0[0].ravel() @ x0[0].ravel()):.3f} "
              f"(theory sqrt(abar) = {np.sqrt(s.alphas_cumprod[250]):.3f})")

    schedules = {name: Schedule.from_name(name, 1000) for name in SCHEDULE_NAMES}
    schedules["linear, zero terminal SNR"] = Schedule.from_name("linear", 1000, zero_terminal_snr=True)
    print("wrote", schedule_curves(schedules, os.path.join(args.out, "schedules.png")))


if __name__ == "__main__":
    main()
