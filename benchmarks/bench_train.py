"""Training-step and sampling throughput of the default U-Net: NumPy vs numba vs PyTorch (CPU).

Question: how many images/s does one training step (forward + MSE + backward + Adam) of the default
U-Net (base 32, mults (1, 2), 410,721 params) process at batch 1, 16 and 128 on 8x8 and 28x28 inputs, for
``backend="numpy"`` (reference twins), ``backend="cpu"`` (numba kernels) and the same architecture in
PyTorch on the CPU (when torch is importable)? Also forward-only (sampling) images/s, and conv2d
GFLOP/s (forward, backward) beside np.matmul SGEMM GFLOP/s measured in the same run. The training step's
GFLOP/s is given as a fraction of that SGEMM rate ("% matmul"), its FLOPs counted as PyTorch's FLOP counter
counts them (``torch.utils.flop_counter``, the direct convolution: Winograd's saving is ours to keep).

How it measures: every contender (a backend's train step, its forward pass; a conv kernel) is called once
untimed (compilation), then all of them are warmed *interleaved* until each one's step time is stable (at
least 5 steps, and two successive 3-step medians within 5 %: ``_common.warm_until_stable``), then timed
in alternation, ``--repeats`` rounds, in the same process. The figure quoted is the ratio of the medians,
printed beside both sides' absolute images/s; a contender that did not settle within the warm-up budget is
flagged "NOT stable". (An earlier version warmed each side with one call: PyTorch, which needs a few steps
to settle, was timed cold, and 28x28 training read 1.6x PyTorch instead of about 1.1x.)

Usage: ``python benchmarks/bench_train.py [--threads N] [--repeats R] [--batches 1,16,128] [--quick | --smoke]
[--json OUT]``
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import (machine_info, print_table, set_threads, time_interleaved, warm_until_stable,  # noqa: E402
                     warmup_note, write_json)

try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as tF
except ImportError:  # torch is optional, never a dependency
    torch = None

PARAMS_DEFAULT = 410_721


# ----------------------------------------------------------------------------- PyTorch mirror
if torch is not None:
    class _TorchRes(tnn.Module):
        """ResBlock(ci -> co): conv3x3(silu(gn(x))) + lin(silu(temb)); conv3x3(silu(gn(h))); + skip."""

        def __init__(self, ci, co, tdim, groups):
            super().__init__()
            self.n1, self.c1 = tnn.GroupNorm(groups, ci), tnn.Conv2d(ci, co, 3, padding=1)
            self.t = tnn.Linear(tdim, co)
            self.n2, self.c2 = tnn.GroupNorm(groups, co), tnn.Conv2d(co, co, 3, padding=1)
            self.skip = tnn.Conv2d(ci, co, 1) if ci != co else None

        def forward(self, x, temb):
            h = self.c1(tF.silu(self.n1(x))) + self.t(tF.silu(temb))[:, :, None, None]
            h = self.c2(tF.silu(self.n2(h)))
            return h + (self.skip(x) if self.skip is not None else x)

    class TorchUNet(tnn.Module):
        """The difnumpy U-Net architecture (issue 3) in PyTorch, for the baseline only."""

        def __init__(self, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, groups=8):
            super().__init__()
            C = self.C = base_channels
            self.t1, self.t2 = tnn.Linear(C, 4 * C), tnn.Linear(4 * C, 4 * C)
            self.stem = tnn.Conv2d(in_channels, C, 3, padding=1)
            self.down, self.downs, chans, ch = tnn.ModuleList(), tnn.ModuleList(), [], C
            for i, m in enumerate(channel_mults):
                blocks = tnn.ModuleList()
                for _ in range(num_res_blocks):
                    blocks.append(_TorchRes(ch, C * m, 4 * C, groups))
                    ch = C * m
                    chans.append(ch)
                self.down.append(blocks)
                last = i == len(channel_mults) - 1
                self.downs.append(tnn.Identity() if last else tnn.Conv2d(ch, ch, 3, stride=2, padding=1))
            self.mid = _TorchRes(ch, ch, 4 * C, groups)
            self.up, self.ups = tnn.ModuleList(), tnn.ModuleList()
            for i, m in reversed(list(enumerate(channel_mults))):
                blocks = tnn.ModuleList()
                for _ in range(num_res_blocks):
                    blocks.append(_TorchRes(ch + chans.pop(), C * m, 4 * C, groups))
                    ch = C * m
                self.up.append(blocks)
                self.ups.append(tnn.Conv2d(ch, ch, 3, padding=1) if i > 0 else tnn.Identity())
            self.out_norm, self.out_conv = tnn.GroupNorm(groups, ch), tnn.Conv2d(ch, in_channels, 3, padding=1)
            self.nlev = len(channel_mults)

        def forward(self, x, t):
            half = self.C // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            a = t.float()[:, None] * freqs[None]
            temb = self.t2(tF.silu(self.t1(torch.cat([torch.sin(a), torch.cos(a)], 1))))
            h, skips = self.stem(x), []
            for i in range(self.nlev):
                for blk in self.down[i]:
                    h = blk(h, temb)
                    skips.append(h)
                h = self.downs[i](h)
            h = self.mid(h, temb)
            for j in range(self.nlev):
                for blk in self.up[j]:
                    h = blk(torch.cat([h, skips.pop()], 1), temb)
                if j < self.nlev - 1:
                    h = self.ups[j](tF.interpolate(h, scale_factor=2, mode="nearest"))
            return self.out_conv(tF.silu(self.out_norm(h)))


# ----------------------------------------------------------------------------- measurements
def _difnumpy_runner(backend, x, t, noise):
    from difnumpy.nn.layers import mse_loss
    from difnumpy.nn.optim import Adam
    from difnumpy.nn.unet import UNet
    model = UNet(backend=backend, rng=np.random.default_rng(0))
    assert model.num_params() == PARAMS_DEFAULT, model.num_params()
    opt = Adam(model.params, lr=1e-4)

    def train_step():
        out, cache = model.forward(x, t)
        _, dout = mse_loss(out, noise)
        opt.step(model.backward(dout, cache))

    return train_step, (lambda: model(x, t))


def _torch_runner(x, t, noise):
    torch.manual_seed(0)
    model = TorchUNet()
    assert sum(p.numel() for p in model.parameters()) == PARAMS_DEFAULT
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xt, tt, nt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(noise)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = tF.mse_loss(model(xt, tt), nt)
        loss.backward()
        opt.step()

    def fwd():
        with torch.no_grad():
            model(xt, tt)

    return train_step, fwd


PHASES = ("train", "forward")
WARMUP = {"min_steps": 5, "block": 3, "rtol": 0.05, "max_steps": 60, "max_seconds": 300.0}


def train_flops_per_image(hw: int):
    """FLOPs of one training step (forward + backward) per image, as PyTorch's FLOP counter counts them
    (convolutions, matmuls; the direct convolution's 2 N F C K^2 Ho Wo), or None without torch."""
    if torch is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode
    model = TorchUNet()
    x, t = torch.zeros(4, 1, hw, hw), torch.zeros(4, dtype=torch.int64)
    with FlopCounterMode(display=False) as fc:
        model(x, t).square().mean().backward()
    return fc.get_total_flops() / 4


def measure_sgemm(repeats, warmup=None):
    """np.matmul float32 GFLOP/s at 1024^3 (this process, these threads): the machine's matmul rate."""
    warmup = dict(WARMUP if warmup is None else warmup)
    a = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)
    o = np.empty_like(a)
    sg = {"sgemm": lambda: np.matmul(a, a, out=o)}
    warm_until_stable(sg, **warmup)
    return 2 * 1024 ** 3 / float(np.median(time_interleaved(sg, repeats)["sgemm"])) / 1e9


def bench_model(sizes, batch, repeats, backends, warmup=None, sgemm=None):
    """Images/s of a train step and a forward pass per backend and size, contenders warmed until stable and
    timed interleaved. Returns one row per (size, phase) with each backend's img/s, the ratios, warm-up info,
    and (train, with torch and ``sgemm`` GFLOP/s given) each side's share of the matmul rate."""
    warmup = dict(WARMUP if warmup is None else warmup)
    rows = []
    rng = np.random.default_rng(0)
    for hw in sizes:
        flops = train_flops_per_image(hw) if sgemm else None
        x = rng.standard_normal((batch, 1, hw, hw)).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        t = rng.integers(0, 1000, size=batch).astype(np.int64)
        fns, reps = {}, {}  # contender "backend phase" -> one call
        for name in backends:
            runner = _torch_runner(x, t, noise) if name == "torch" else _difnumpy_runner(name, x, t, noise)
            for phase, fn in zip(PHASES, runner):
                fns[f"{name} {phase}"] = fn
                reps[f"{name} {phase}"] = 1 if name == "numpy" else repeats  # NumPy is ~10x slower: one call
        warm = warm_until_stable(fns, **warmup)
        print(f"  {hw}x{hw} {warmup_note(warm)}", flush=True)
        times = time_interleaved(fns, reps)
        for phase in PHASES:
            row = {"size": f"{hw}x{hw}", "batch": batch, "phase": phase}
            for name in backends:
                row[name] = batch / float(np.median(times[f"{name} {phase}"]))
                w = warm[f"{name} {phase}"]
                row[f"{name}_warmup_steps"], row[f"{name}_stable"] = w["steps"], w["stable"]
                if flops and phase == "train" and name != "numpy":
                    row["train_gflop_per_image"] = flops / 1e9
                    row[f"{name}_%matmul"] = 100.0 * row[name] * flops / 1e9 / sgemm
            if "torch" in backends and "cpu" in backends:
                row["cpu/torch"] = row["cpu"] / row["torch"]
                pct = (f"  ({row['cpu_%matmul']:.0f} % / {row['torch_%matmul']:.0f} % of the matmul rate)"
                       if "cpu_%matmul" in row else "")
                print(f"  {hw}x{hw} b{batch:<4d} {phase:7s} numba {row['cpu']:8.1f} img/s  torch {row['torch']:8.1f} "
                      f"img/s  -> numba/torch {row['cpu/torch']:.2f}{pct}", flush=True)
            if "numpy" in backends and "cpu" in backends:
                row["cpu/numpy"] = row["cpu"] / row["numpy"]
                print(f"  {hw}x{hw} {phase:7s} numba {row['cpu']:8.1f} img/s  numpy {row['numpy']:8.1f} img/s"
                      f"  -> numba/numpy {row['cpu/numpy']:.2f}", flush=True)
            if len(backends) == 1:
                print(f"  {hw}x{hw} {phase:7s} {backends[0]} {row[backends[0]]:8.1f} img/s", flush=True)
            rows.append(row)
    return rows


CONV_LAYERS = [(128, 32, 28, 32, 3, 1, 1), (128, 64, 14, 64, 3, 1, 1), (128, 64, 8, 64, 3, 1, 1),
               (128, 32, 28, 32, 3, 2, 1), (128, 128, 14, 64, 1, 1, 0)]


def bench_conv(repeats, use_torch, layers=None, warmup=None):
    """conv2d GFLOP/s at the U-Net's layer shapes (batch 128) beside np.matmul SGEMM GFLOP/s.

    Per layer the numba and torch kernels (forward; backward = input + weight gradients) are warmed until
    stable and timed interleaved, like the whole-model contenders."""
    from difnumpy.kernels import cpu
    warmup = dict(WARMUP if warmup is None else warmup)
    rng = np.random.default_rng(1)
    sgemm = measure_sgemm(repeats, warmup)
    rows = []
    for (N, C, H, F, K, s, p) in (CONV_LAYERS if layers is None else layers):
        x = rng.standard_normal((N, C, H, H)).astype(np.float32)
        w = rng.standard_normal((F, C, K, K)).astype(np.float32)
        b = rng.standard_normal(F).astype(np.float32)
        out = cpu.conv2d_forward(x, w, b, s, p)
        dout = rng.standard_normal(out.shape).astype(np.float32)
        flops = 2.0 * N * F * C * K * K * out.shape[2] * out.shape[3]
        fns = {"numba_fwd": lambda: cpu.conv2d_forward(x, w, b, s, p),
               "numba_bwd": lambda: (cpu.conv2d_backward_input(dout, w, x.shape, s, p),
                                     cpu.conv2d_backward_weight(dout, x, w.shape, s, p))}
        if use_torch:
            xt = torch.from_numpy(x).requires_grad_()
            wt = torch.from_numpy(w).requires_grad_()
            bt = torch.from_numpy(b).requires_grad_()
            gt = torch.from_numpy(dout)
            yt = tF.conv2d(xt, wt, bt, stride=s, padding=p)  # backward alone, on a kept graph
            fns["torch_fwd"] = lambda: tF.conv2d(xt, wt, bt, stride=s, padding=p)
            fns["torch_bwd"] = lambda: torch.autograd.grad(yt, (xt, wt, bt), gt, retain_graph=True)
        warm = warm_until_stable(fns, **warmup)
        med = {k: float(np.median(v)) for k, v in time_interleaved(fns, repeats).items()}
        row = {"layer": f"{C}->{F} k{K} s{s} {H}x{H}" + ("" if N == 128 else f" N{N}"),
               "numba_fwd": flops / med["numba_fwd"] / 1e9, "numba_bwd": 2 * flops / med["numba_bwd"] / 1e9,
               "sgemm": sgemm}
        row["fwd/sgemm"] = row["numba_fwd"] / sgemm
        if use_torch:
            row["torch_fwd"] = flops / med["torch_fwd"] / 1e9
            row["torch_bwd"] = 2 * flops / med["torch_bwd"] / 1e9
            row["fwd numba/torch"] = row["numba_fwd"] / row["torch_fwd"]
            row["bwd numba/torch"] = row["numba_bwd"] / row["torch_bwd"]
        row["warmup_steps"] = max(r["steps"] for r in warm.values())
        row["stable"] = all(r["stable"] for r in warm.values())
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="BLAS, numba and torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    ap.add_argument("--batches", default="1,16,128", help="comma-separated batch sizes (default 1,16,128)")
    ap.add_argument("--batch", type=int, default=None, help="one batch size (same as --batches B)")
    ap.add_argument("--quick", action="store_true", help="8x8 only, 1 repeat, no NumPy path")
    ap.add_argument("--smoke", action="store_true",
                    help="tiniest settings (tests only): batch 4, 8x8, one small conv layer, short warm-up budget")
    ap.add_argument("--warmup-seconds", type=float, default=None,
                    help="give up warming a set of contenders after this long (default 300; --quick 60)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) pure NumPy path")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--json", default=None, help="write results to this JSON file (atomically)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    repeats = 1 if (args.quick or args.smoke) else args.repeats
    sizes = (8,) if (args.quick or args.smoke) else (8, 28)
    batches = [args.batch] if args.batch else [int(b) for b in args.batches.split(",") if b.strip()]
    if args.smoke and not args.batch:
        batches = [4]
    warmup = dict(WARMUP)
    if args.quick:
        warmup["max_seconds"] = 60.0
    if args.smoke:
        warmup.update(max_steps=12, max_seconds=10.0)
    if args.warmup_seconds is not None:
        warmup["max_seconds"] = args.warmup_seconds
    use_torch = torch is not None and not args.no_torch
    backends = [b for b in ("numpy", "cpu") if not (b == "numpy" and (args.quick or args.smoke or args.no_numpy))]
    if use_torch:
        backends.append("torch")
    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores; numpy {info['numpy']}, numba {info['numba']}, "
          f"torch {info['torch']}; threads {threads}")
    print(f"# glibc malloc tuned by the cpu backend (process-wide, both sides): {info['glibc_malloc_tuned']}"
          f" (one arena: {info['glibc_malloc_one_arena']})")
    print(f"# warm-up: every contender until stable (>= {warmup['min_steps']} steps, two successive "
          f"{warmup['block']}-step medians within {warmup['rtol']:.0%}), interleaved; then {repeats} interleaved "
          f"timed round(s)")
    sgemm_runs = [measure_sgemm(repeats, warmup)]
    print(f"# np.matmul float32 1024^3: {sgemm_runs[0]:.1f} GFLOP/s (the matmul rate of '% matmul'; measured again "
          f"after the models, the better of the two is used)")
    rows = [r for b in batches for r in bench_model(sizes, b, repeats, backends, warmup, sgemm_runs[0])]
    # the machine's rate at its best: a shared VM's rate moves between minutes (one run measured 136 at the
    # start, against 270-300 before and after)
    sgemm_runs.append(measure_sgemm(repeats, warmup))
    sgemm = max(sgemm_runs)
    print(f"# np.matmul float32 1024^3 after the models: {sgemm_runs[1]:.1f} GFLOP/s; '% matmul' below uses "
          f"{sgemm:.1f}")
    for r in rows:
        for name in ("cpu", "torch"):
            if f"{name}_%matmul" in r:
                r[f"{name}_%matmul"] = 100.0 * r[name] * r["train_gflop_per_image"] / sgemm
    heads = ["size", "batch", "phase", "cpu"] + (["torch", "cpu/torch", "cpu_%matmul", "torch_%matmul"]
                                                 if use_torch else []) \
        + (["numpy", "cpu/numpy"] if "numpy" in backends else []) \
        + [f"{b}_warmup_steps" for b in backends] + [f"{b}_stable" for b in backends]
    print(f"\nimages/s (train = forward + MSE + backward + Adam); cpu = numba kernels; % matmul = the training step's "
          f"GFLOP/s (PyTorch's FLOP count) / np.matmul's {sgemm:.0f} GFLOP/s")
    print_table([[r.get(h) for h in heads] for r in rows], heads)
    conv = bench_conv(repeats, use_torch, [(4, 32, 8, 32, 3, 1, 1)] if args.smoke else None, warmup)
    cheads = ["layer", "numba_fwd", "numba_bwd"] \
        + (["torch_fwd", "torch_bwd", "fwd numba/torch", "bwd numba/torch"] if use_torch else []) \
        + ["sgemm", "fwd/sgemm", "warmup_steps", "stable"]
    print("\nconv2d GFLOP/s (batch 128, float32) beside np.matmul SGEMM 1024^3 GFLOP/s")
    print_table([[r.get(h) for h in cheads] for r in conv], cheads)
    if args.json:
        write_json(args.json, {"machine": info, "threads": threads, "batches": batches, "repeats": repeats,
                               "sgemm_gflops": sgemm, "sgemm_runs": sgemm_runs, "warmup": warmup, "model": rows,
                               "conv": conv})
    return rows, conv


if __name__ == "__main__":
    main()
