"""GPU throughput of the numba.cuda backend, beside PyTorch CUDA and the card's own figures.

Questions answered, each with its baseline timed in the same run:

1. Sampling: DDIM-50 (eta = 0) of ``--num-images`` (default 10,000) 28x28 images with the default U-Net
   (410,721 params), device-resident (:func:`difnumpy.sample` with ``UNet(backend="cuda")``: x_t,
   parameters and activations stay on the GPU from the first step to the last), in batches of ``--batch-sample``;
   images/s. Beside it: the same architecture in PyTorch CUDA (``TorchUNet`` of bench_train.py, the same
   DDIM update written in torch), when torch with CUDA is installed. Figure quoted: numba / torch.
2. Training: one DDPM training step (Ho et al. 2020, Algorithm 1: q_sample, forward, MSE, backward,
   clipping, Adam, EMA) at batch ``--batch-train`` (default 256), 28x28, device-resident
   (:class:`difnumpy.Trainer` with ``backend="cuda"``); images/s, beside PyTorch CUDA (forward, MSE,
   backward, Adam). Goal of the issue: >= 0.5x PyTorch CUDA images/s.
3. Kernels: the tiled conv2d forward (batch 256, 64 -> 64 channels, 14x14, 3x3) in TFLOP/s and the fused
   sampler update / q_sample in GB/s, beside the card's nominal FP32 TFLOP/s and memory bandwidth
   (datasheet figures for known cards, else only the measured ones) and a device-to-device copy's GB/s
   (the card's achievable bandwidth, measured here).

The first (compiling) call of everything is never timed; figures are medians of ``--repeats`` runs,
each ending with a device synchronisation.

    python benchmarks/bench_cuda.py [--num-images 10000] [--batch-sample 1000] [--batch-train 256]
                                    [--repeats 3] [--json OUT] [--no-torch]

Without a GPU (or with NUMBA_ENABLE_CUDASIM=1) it prints why and exits with status 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import machine_info, print_table, time_call, write_json  # noqa: E402

# nominal figures (datasheets): FP32 non-tensor TFLOP/s, memory bandwidth GB/s
CARD_FIGURES = {
    "H100 SXM": (67.0, 3350.0), "H100 PCIe": (51.0, 2000.0), "H100 NVL": (60.0, 3900.0),
    "H200": (67.0, 4800.0), "A100-SXM4-80GB": (19.5, 2039.0), "A100-SXM4-40GB": (19.5, 1555.0),
    "A100-PCIE": (19.5, 1555.0), "L4": (30.3, 300.0), "T4": (8.1, 320.0), "A10": (31.2, 600.0),
}


def card_figures(name: str):
    for key, fig in CARD_FIGURES.items():
        if all(part.lower() in name.lower() for part in key.split()):
            return key, fig
    return None, (None, None)


def gpu_or_exit():
    try:
        from difnumpy.kernels import get_backend
        ck = get_backend("cuda")
    except RuntimeError as e:
        print(f"bench_cuda: no GPU here, nothing measured ({e})")
        sys.exit(0)
    if ck.SIMULATOR:
        print("bench_cuda: NUMBA_ENABLE_CUDASIM=1 is set (the CUDA simulator is not a GPU); nothing measured")
        sys.exit(0)
    return ck


def timed(ck, fn, repeats):
    def run():
        fn()
        ck.cuda.synchronize()
    return time_call(run, repeats=repeats, warmup=1)


def bench_sampling(ck, model, schedule, n_images, batch, repeats):
    from difnumpy import sample

    def run():
        for i in range(0, n_images, batch):
            nb = min(batch, n_images - i)
            sample(model, schedule, (nb, 1, 28, 28), method="ddim", num_steps=50, rng=np.random.default_rng(i),
                   backend="cuda")
    sample(model, schedule, (min(batch, n_images), 1, 28, 28), method="ddim", num_steps=2,
           rng=np.random.default_rng(0), backend="cuda")
    s = timed(ck, run, repeats)
    return n_images / s, s


def bench_training(ck, model, schedule, batch, repeats):
    from difnumpy import Trainer
    x0 = np.random.default_rng(0).uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32)
    trainer = Trainer(model, schedule, lr=2e-4, rng=0, backend="cuda")
    s = timed(ck, lambda: trainer.step(x0), repeats)
    return batch / s, s


def torch_runners(schedule, n_images, batch_sample, batch_train):
    try:
        import torch
        import torch.nn.functional as tF
        from bench_train import TorchUNet
    except Exception:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = TorchUNet().to(dev)

    def fwd(x, t):  # TorchUNet.forward with the embedding's frequencies on the GPU
        half = model.C // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=dev) / half)
        a = t.float()[:, None] * freqs[None]
        temb = model.t2(tF.silu(model.t1(torch.cat([torch.sin(a), torch.cos(a)], 1))))
        h, skips = model.stem(x), []
        for i in range(model.nlev):
            for blk in model.down[i]:
                h = blk(h, temb)
                skips.append(h)
            h = model.downs[i](h)
        h = model.mid(h, temb)
        for j in range(model.nlev):
            for blk in model.up[j]:
                h = blk(torch.cat([h, skips.pop()], 1), temb)
            if j < model.nlev - 1:
                h = model.ups[j](tF.interpolate(h, scale_factor=2, mode="nearest"))
        return model.out_conv(tF.silu(model.out_norm(h)))

    from difnumpy.samplers import inference_timesteps
    ab = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=dev)
    ts = [int(t) for t in inference_timesteps(schedule.num_timesteps, 50)]

    def sample():
        with torch.no_grad():
            for i in range(0, n_images, batch_sample):
                nb = min(batch_sample, n_images - i)
                x = torch.randn(nb, 1, 28, 28, device=dev)
                for k, t in enumerate(ts):
                    a_t = ab[t]
                    a_p = ab[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, device=dev)
                    eps = fwd(x, torch.full((nb,), t, device=dev))
                    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
                    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                    x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
        torch.cuda.synchronize()

    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    xb = torch.rand(batch_train, 1, 28, 28, device=dev) * 2 - 1

    def train():
        t = torch.randint(0, schedule.num_timesteps, (batch_train,), device=dev)
        noise = torch.randn_like(xb)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * xb + (1 - a).sqrt() * noise
        opt.zero_grad(set_to_none=True)
        loss = tF.mse_loss(fwd(xt, t), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()

    return sample, train


def bench_kernels(ck, repeats):
    rng = np.random.default_rng(0)
    x = ck.asarray(rng.standard_normal((256, 64, 14, 14)).astype(np.float32))
    w = ck.asarray(rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05)
    b = ck.zeros(64, np.float32)
    s = timed(ck, lambda: ck.conv2d_forward(x, w, b, 1, 1), repeats)
    conv_tflops = 2.0 * 256 * 64 * 64 * 9 * 14 * 14 / s / 1e12
    n, m = 1000, 784
    xs = ck.asarray(rng.standard_normal((n, m)).astype(np.float32))
    coef = rng.standard_normal((n, 5))
    lo, hi = np.full(n, -1.0), np.full(n, 1.0)
    big_n = 16
    xb = ck.asarray(rng.standard_normal((n * big_n, m)).astype(np.float32))
    cb = rng.standard_normal((n * big_n, 5))
    lob, hib = np.full(n * big_n, -1.0), np.full(n * big_n, 1.0)
    s_up = timed(ck, lambda: ck.sampler_update(xb, xb, xb, cb, lob, hib), repeats)
    upd_gbs = 5 * xb.size * 4 / s_up / 1e9          # reads x, model_output, noise; writes x_prev, x0
    ab = np.full(n * big_n, 0.5)
    s_q = timed(ck, lambda: ck.q_sample(xb, xb, ab, ab), repeats)
    q_gbs = 3 * xb.size * 4 / s_q / 1e9
    dst = ck.cuda.device_array_like(xb)
    s_c = timed(ck, lambda: dst.copy_to_device(xb), repeats)
    copy_gbs = 2 * xb.size * 4 / s_c / 1e9
    del xs, coef, lo, hi
    return {"conv_fwd_tflops": conv_tflops, "sampler_update_gbs": upd_gbs, "q_sample_gbs": q_gbs,
            "d2d_copy_gbs": copy_gbs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--batch-sample", type=int, default=1000)
    p.add_argument("--batch-train", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args(argv)
    ck = gpu_or_exit()
    from difnumpy import Schedule, UNet
    gpu = ck.cuda.get_current_device()
    name = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
    card, (peak_tflops, peak_gbs) = card_figures(name)
    schedule = Schedule.from_name("linear", 1000)
    model = UNet(rng=0, backend="cuda")
    res = {"machine": machine_info(), "gpu": name, "card_figures": {"matched": card, "fp32_tflops": peak_tflops,
                                                                     "mem_gbs": peak_gbs}}
    samp_ips, samp_s = bench_sampling(ck, model, schedule, a.num_images, a.batch_sample, a.repeats)
    train_ips, train_s = bench_training(ck, model, schedule, a.batch_train, a.repeats)
    res["numba_cuda"] = {"ddim50_images_per_s": samp_ips, "ddim50_total_s": samp_s,
                         "train_images_per_s": train_ips, "train_step_s": train_s}
    runners = None if a.no_torch else torch_runners(schedule, a.num_images, a.batch_sample, a.batch_train)
    if runners is not None:
        t_samp = time_call(runners[0], repeats=a.repeats, warmup=1)
        t_train = time_call(runners[1], repeats=a.repeats, warmup=1)
        res["torch_cuda"] = {"ddim50_images_per_s": a.num_images / t_samp, "train_images_per_s": a.batch_train / t_train}
    res["kernels"] = bench_kernels(ck, a.repeats)
    rows = [["DDIM-50 sampling", a.num_images, samp_ips, res.get("torch_cuda", {}).get("ddim50_images_per_s")],
            ["train step", a.batch_train, train_ips, res.get("torch_cuda", {}).get("train_images_per_s")]]
    for r in rows:
        r.append(r[2] / r[3] if r[3] else None)
    print(f"GPU: {name} (nominal: {peak_tflops} FP32 TFLOP/s, {peak_gbs} GB/s)")
    print_table(rows, ["what", "images", "numba.cuda img/s", "torch cuda img/s", "ratio"])
    k = res["kernels"]
    print_table([["conv2d fwd 3x3 64->64 14x14 b256", k["conv_fwd_tflops"], "TFLOP/s", peak_tflops],
                 ["sampler_update", k["sampler_update_gbs"], "GB/s", peak_gbs],
                 ["q_sample", k["q_sample_gbs"], "GB/s", peak_gbs],
                 ["device-to-device copy", k["d2d_copy_gbs"], "GB/s", peak_gbs]],
                ["kernel", "achieved", "unit", "card (nominal)"])
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
