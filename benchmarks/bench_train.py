"""Training-step and sampling throughput of the default U-Net: NumPy vs numba vs PyTorch (CPU).

Question: how many images/s does one training step (forward + MSE + backward + Adam) of the default
U-Net (base 32, mults (1, 2), 410,721 params) process at batch 128 on 8x8 and 28x28 inputs, for
``backend="numpy"`` (reference twins), ``backend="cpu"`` (numba kernels) and the same architecture in
PyTorch on the CPU (when torch is importable)? Also forward-only (sampling) images/s, and conv2d
GFLOP/s (forward, backward) beside np.matmul SGEMM GFLOP/s measured in the same run.

Usage: ``python benchmarks/bench_train.py [--threads N] [--repeats R] [--quick] [--json OUT]``
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import machine_info, print_table, set_threads, time_call, write_json  # noqa: E402

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


def bench_model(sizes, batch, repeats, backends):
    rows = []
    rng = np.random.default_rng(0)
    for hw in sizes:
        x = rng.standard_normal((batch, 1, hw, hw)).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        t = rng.integers(0, 1000, size=batch).astype(np.int64)
        runners = {}
        for name in backends:
            runners[name] = _torch_runner(x, t, noise) if name == "torch" else _difnumpy_runner(name, x, t, noise)
        # Interleaved: repeat r times "torch, numba" (one train step, one forward each) and take medians,
        # so that a slow spell of the shared machine hits both sides instead of skewing the ratio.
        times = {name: ([], []) for name in backends}
        for name in backends:
            for fn in runners[name]:
                fn()  # warm-up: compilation, first-touch allocation
        for r in range(repeats):
            for name in backends:
                if name == "numpy" and r > 0:
                    continue  # the NumPy path is ~10x slower; one timed call each
                for k, fn in enumerate(runners[name]):
                    times[name][k].append(time_call(fn, 1, warmup=0))
        res = {name: tuple(batch / float(np.median(times[name][k])) for k in (0, 1)) for name in backends}
        for name in backends:
            print(f"  {hw}x{hw} {name:6s} train {res[name][0]:8.1f} img/s   forward {res[name][1]:8.1f} img/s",
                  flush=True)
        for phase, k in (("train", 0), ("forward", 1)):
            row = {"size": f"{hw}x{hw}", "phase": phase}
            for name in backends:
                row[name] = res[name][k]
            if "torch" in res and "cpu" in res:
                row["cpu/torch"] = res["cpu"][k] / res["torch"][k]
            if "numpy" in res and "cpu" in res:
                row["cpu/numpy"] = res["cpu"][k] / res["numpy"][k]
            rows.append(row)
    return rows


def bench_conv(repeats, use_torch):
    """conv2d GFLOP/s at the U-Net's layer shapes (batch 128) beside np.matmul SGEMM GFLOP/s."""
    from difnumpy.kernels import cpu
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    o = np.empty_like(a)
    sgemm = 2 * 1024 ** 3 / time_call(lambda: np.matmul(a, a, out=o), repeats) / 1e9
    rows = []
    for (N, C, H, F, K, s, p) in [(128, 32, 28, 32, 3, 1, 1), (128, 64, 14, 64, 3, 1, 1),
                                  (128, 64, 8, 64, 3, 1, 1), (128, 32, 28, 32, 3, 2, 1),
                                  (128, 128, 14, 64, 1, 1, 0)]:
        x = rng.standard_normal((N, C, H, H)).astype(np.float32)
        w = rng.standard_normal((F, C, K, K)).astype(np.float32)
        b = rng.standard_normal(F).astype(np.float32)
        out = cpu.conv2d_forward(x, w, b, s, p)
        dout = rng.standard_normal(out.shape).astype(np.float32)
        flops = 2.0 * N * F * C * K * K * out.shape[2] * out.shape[3]
        fwd = flops / time_call(lambda: cpu.conv2d_forward(x, w, b, s, p), repeats) / 1e9
        bwd = 2 * flops / time_call(lambda: (cpu.conv2d_backward_input(dout, w, x.shape, s, p),
                                             cpu.conv2d_backward_weight(dout, x, w.shape, s, p)), repeats) / 1e9
        row = {"layer": f"{C}->{F} k{K} s{s} {H}x{H}", "numba_fwd": fwd, "numba_bwd": bwd,
               "sgemm": sgemm, "fwd/sgemm": fwd / sgemm}
        if use_torch:
            xt = torch.from_numpy(x).requires_grad_()
            wt = torch.from_numpy(w).requires_grad_()
            bt = torch.from_numpy(b).requires_grad_()
            gt = torch.from_numpy(dout)
            tf = time_call(lambda: tF.conv2d(xt, wt, bt, stride=s, padding=p), repeats)
            yt = tF.conv2d(xt, wt, bt, stride=s, padding=p)  # backward alone, on a kept graph
            tb = time_call(lambda: torch.autograd.grad(yt, (xt, wt, bt), gt, retain_graph=True), repeats)
            row["torch_fwd"] = flops / tf / 1e9
            row["torch_bwd"] = 2 * flops / tb / 1e9
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="BLAS, numba and torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="8x8 only, 1 repeat, no NumPy path")
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) pure NumPy path")
    ap.add_argument("--json", default=None, help="write results to this JSON file (atomically)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    sizes = (8,) if args.quick else (8, 28)
    backends = [b for b in ("numpy", "cpu") if not (b == "numpy" and (args.quick or args.no_numpy))]
    if torch is not None:
        backends.append("torch")
    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores; numpy {info['numpy']}, numba {info['numba']}, "
          f"torch {info['torch']}; threads {threads}")
    rows = bench_model(sizes, args.batch, repeats, backends)
    heads = ["size", "phase"] + backends + [h for h in ("cpu/torch", "cpu/numpy") if h in rows[0]]
    print(f"\nimages/s, batch {args.batch} (train = forward + MSE + backward + Adam)")
    print_table([[r.get(h) for h in heads] for r in rows], heads)
    conv = bench_conv(repeats, torch is not None)
    cheads = ["layer", "numba_fwd", "numba_bwd"] + (["torch_fwd", "torch_bwd"] if torch is not None else []) \
        + ["sgemm", "fwd/sgemm"]
    print("\nconv2d GFLOP/s (batch 128, float32) beside np.matmul SGEMM 1024^3 GFLOP/s")
    print_table([[r.get(h) for h in cheads] for r in conv], cheads)
    if args.json:
        write_json(args.json, {"machine": info, "threads": threads, "batch": args.batch, "repeats": repeats,
                               "model": rows, "conv": conv})
    return rows, conv


if __name__ == "__main__":
    main()
