"""05 - DDIM inversion: encode digits into latents, interpolate the latents, decode.

With eta = 0 the DDIM update (Song et al. 2021, eq. 12) is deterministic,

    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev) eps_theta(x_t, t),
    x0_pred = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t),

a discretisation of an ODE (eq. 13, Sec. 4.3). Run that ODE forwards -- from a clean x0 up to t = T-1, using
at each step the eps predicted at the next timestep -- and you get a latent x_T that decodes back to
(nearly) the same x0: :func:`difnumpy.ddim_invert`. The latent is an ordinary Gaussian-looking array of the
image's shape, so latents can be mixed. Two independent N(0, I) vectors in d = 64 dimensions are nearly
orthogonal with norm ~sqrt(d); their straight-line midpoint has norm ~sqrt(d/2), a point the model never
started from (blurry, washed-out decodes). Spherical linear interpolation (slerp, Shoemake 1985) keeps the norm:

    theta = arccos(<z0, z1> / (|z0| |z1|))
    slerp(z0, z1; a) = sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1,   a in [0, 1].

The check: the reconstruction error ``decode(encode(x0)) - x0`` for a batch of test digits and several step
counts (it shrinks as S grows: the inversion's approximation eps(x_t) ~ eps(x_prev) gets finer), printed
beside the pixel range [-1, 1]. Decoding uses ``clip_sample=False`` so that decode is the exact reverse of
encode (clipping x0_pred would break the symmetry).

Model: ``--checkpoint`` (from example 03 or ``difnumpy demo``), or, without one, a small U-Net trained here for
``--train-minutes``.

Output (in --out): ``ddim_inversion.png`` -- the two digits, their reconstructions, and the slerp and lerp
interpolation rows.

    python examples/05_ddim_inversion.py [--checkpoint out/03_train_digits/checkpoint.npz] [--digits 0,6]

Measured with example 03's 4-minute checkpoint (T = 1000), 32 test digits: RMS reconstruction error 0.115 / 0.034
/ 0.0096 (max 0.65 / 0.21 / 0.052) for S = 10 / 50 / 200. The latents have std 0.68 / 0.76 / 0.83 rather than 1:
inverted latents are not exactly N(0, I) samples. Midpoint norms for a 0 and a 6 (angle 102 deg): slerp 5.45,
lerp 3.44. About 30 s in all.
"""
import argparse
import os
import time

import numpy as np
from matplotlib.figure import Figure

from difnumpy import ddim_invert, sample
from difnumpy.data import load_digits
from difnumpy.viz import make_grid, save_figure

import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _quick_model import get_model  # noqa: E402  (examples/_quick_model.py, shared with example 04)


def slerp(z0, z1, a):
    """Spherical linear interpolation between two arrays (flattened for the angle), ``a`` in [0, 1]."""
    u0, u1 = z0.ravel().astype(np.float64), z1.ravel().astype(np.float64)
    cos_theta = np.clip(u0 @ u1 / (np.linalg.norm(u0) * np.linalg.norm(u1)), -1.0, 1.0)
    theta = np.arccos(cos_theta)
    if theta < 1e-6:  # (nearly) parallel: slerp -> lerp
        return ((1 - a) * z0 + a * z1).astype(z0.dtype)
    w0, w1 = np.sin((1 - a) * theta) / np.sin(theta), np.sin(a * theta) / np.sin(theta)
    return (w0 * z0 + w1 * z1).astype(z0.dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description="Encode digits with DDIM inversion, slerp the latents, decode.")
    p.add_argument("--out", default="out/05_ddim_inversion", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="a checkpoint.npz (example 03 or `difnumpy demo`); else train a quick model")
    p.add_argument("--digits", default="0,6", help="the classes of the two test digits to interpolate")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps S for encoding and decoding (default 50)")
    p.add_argument("--check-steps", default="10,50,200", help="S values of the reconstruction check")
    p.add_argument("--n-check", type=int, default=32, help="test digits in the reconstruction check")
    p.add_argument("--n-interp", type=int, default=9, help="points on each interpolation path (ends included)")
    # only used without --checkpoint:
    p.add_argument("--train-minutes", type=float, default=1.0)
    p.add_argument("--train-steps", type=int, default=100_000)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--base-channels", type=int, default=16)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    model, schedule, prediction_type, about = get_model(args)
    T = schedule.num_timesteps
    print(f"model: {about}; T = {T}")
    kw = dict(prediction_type=prediction_type)

    # 1. the reconstruction check: encode, decode, compare, for several step counts
    x_test, y_test = load_digits("test", return_labels=True)
    x_check = x_test[:args.n_check]
    print(f"reconstruction of {len(x_check)} test digits, decode(encode(x0)) - x0 (pixels in [-1, 1]):")
    print(f"  {'S':>5s} {'RMS error':>10s} {'max |error|':>12s} {'latent mean':>12s} {'latent std':>11s} "
          f"{'seconds':>8s}")
    for s in sorted({min(int(v), T) for v in args.check_steps.split(",")}):
        t0 = time.perf_counter()
        z = ddim_invert(model, schedule, x_check, s, **kw)
        x_rec = sample(model, schedule, x_check.shape, method="ddim", num_steps=s, eta=0.0, x_T=z,
                       clip_sample=False, **kw)
        err = x_rec - x_check
        print(f"  {s:5d} {np.sqrt(np.mean(err ** 2)):10.4f} {np.abs(err).max():12.4f} {z.mean():12.3f} "
              f"{z.std():11.3f} {time.perf_counter() - t0:8.1f}")

    # 2. encode the two digits
    classes = [int(c) for c in args.digits.split(",")]
    if len(classes) != 2:
        p.error(f"--digits must name two classes, got {args.digits!r}")
    pair = np.stack([x_test[np.flatnonzero(y_test == c)[0]] for c in classes])      # (2, 1, 8, 8)
    S = min(args.steps, T)
    z = ddim_invert(model, schedule, pair, S, **kw)

    def decode(latents):
        return sample(model, schedule, latents.shape, method="ddim", num_steps=S, eta=0.0, x_T=latents,
                      clip_sample=False, **kw)

    rec = decode(z)
    cos = float(z[0].ravel() @ z[1].ravel() / (np.linalg.norm(z[0]) * np.linalg.norm(z[1])))
    print(f"digits {classes[0]} and {classes[1]}: S = {S}, reconstruction RMS error "
          f"{np.sqrt(np.mean((rec - pair) ** 2)):.4f}; latent norms {np.linalg.norm(z[0]):.2f}, "
          f"{np.linalg.norm(z[1]):.2f} (sqrt(d) = {np.sqrt(z[0].size):.2f}); angle "
          f"{np.degrees(np.arccos(np.clip(cos, -1, 1))):.1f} deg")

    # 3. interpolate: slerp (norm-preserving) and, for contrast, lerp
    alphas = np.linspace(0.0, 1.0, args.n_interp)
    z_slerp = np.stack([slerp(z[0], z[1], a) for a in alphas])
    z_lerp = np.stack([((1 - a) * z[0] + a * z[1]).astype(z.dtype) for a in alphas])
    mid = len(alphas) // 2
    print(f"latent norm at a = {alphas[mid]:.2f}: slerp {np.linalg.norm(z_slerp[mid]):.2f}, "
          f"lerp {np.linalg.norm(z_lerp[mid]):.2f}")
    x_slerp = np.clip(decode(z_slerp), -1, 1)
    x_lerp = np.clip(decode(z_lerp), -1, 1)

    # 4. the figure: one row per strip
    rows = [("input x0", pair), ("decode(encode(x0))", np.clip(rec, -1, 1)),
            ("slerp, decoded", x_slerp), ("lerp, decoded", x_lerp)]
    fig = Figure(figsize=(max(4.0, 0.8 * args.n_interp), 1.1 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), 1)
    for ax, (label, imgs) in zip(np.atleast_1d(axes), rows):
        grid = make_grid(imgs, nrow=len(imgs))
        ax.imshow(grid[..., 0], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(label, loc="left", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"DDIM inversion (S = {S}) and latent interpolation, digits {classes[0]} -> {classes[1]}",
                 fontsize=10)
    fig.tight_layout()
    print("wrote", save_figure(fig, os.path.join(args.out, "ddim_inversion.png")))
    return {"reconstruction_rms": float(np.sqrt(np.mean((rec - pair) ** 2)))}


if __name__ == "__main__":
    main()
