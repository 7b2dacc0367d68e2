"""Peak resident memory of a training step and of sampling, against the size of the arrays that must exist.

Question: how much memory beyond the unavoidable does difnumpy use? For the default U-Net (410,721
float32 params) at batch 128 and 512 (8x8 images by default):

- ``train``: ``Trainer(model, schedule)`` is created and two ``.step(x0)`` calls run. Arrays that must
  exist: the gradients, Adam's m and v, the EMA copy (4 x params; the params themselves are in the
  baseline), the activations the backward needs (the input of every conv and of every fused
  GroupNorm+SiLU, each counted once, plus the GroupNorm statistics and the time-embedding MLP's inputs),
  and the batch-sized x0, noise, x_t, model output and its gradient.
- ``sample``: ``difnumpy.sample(model, schedule, shape, method="ddpm", num_steps=3)`` (respaced DDPM, so
  step noise is drawn). Arrays that must exist: x_t, the model output, x0_pred, the noise and x_prev, plus
  the largest set of activations alive at once during one inference forward (the skips held for the up
  path plus an op's input, output and one temporary).

These minimum sizes are computed analytically from the architecture (:func:`required_bytes`), not from
what the implementation happens to keep; the implementation's own training cache is reported beside them
(``cache_MB``, arrays counted once by their base buffer).

How it measures: each measurement runs in a fresh subprocess (``--child``). The child imports difnumpy,
creates the default model, and warms every kernel up on a small model (base_channels 8) at batch 2, so
compilation / cache loading is outside the measurement. The baseline is the resident set size then
(VmRSS); the peak counter is reset (``/proc/self/clear_refs`` <- 5, which resets VmHWM; if that is
refused the warm-up peak stays in and the row says ``peak_reset False``), the measured work runs, and the
peak resident set size (VmHWM, the figure ``getrusage(RUSAGE_SELF).ru_maxrss`` reports for a process not
started by a big parent; see :func:`_maxrss_bytes` for why ru_maxrss itself is not read) minus the
baseline is the figure. RSS is used rather than tracemalloc because numba's NRT allocations are invisible
to tracemalloc. Goal: peak / required <= 2.

    python benchmarks/bench_memory.py [--batches 128 512] [--size 8] [--threads 2] [--quick] [--smoke]
                                      [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import machine_info, print_table, write_json  # noqa: E402

GOAL_RATIO = 2.0
MB = 1024.0 ** 2


# ----------------------------------------------------------------------------- analytic sizes
def required_elements(N, H, W, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                      groups=8):
    """Element counts of the activations that must exist, from the architecture of issue 3.

    Returns
    -------
    dict with ``"saved"``: elements the backward needs (inputs of every conv and fused GroupNorm+SiLU,
    each array once, GroupNorm mean/rstd, the time-MLP inputs), and ``"live_peak"``: the largest number
    of activation elements alive at once in an inference forward (held skips + an op's input, output
    and one temporary).
    """
    C = base_channels
    saved = N * (C + 4 * C + 4 * C + 4 * C)   # time MLP: lin1 in, silu in, lin2 in, silu(temb)
    live_peak = 0
    skips = []                                 # element counts of the skips held for the up path

    def res(ci, co, h, w, x_is_skip_after):
        # x (GN1 and skip-conv input), silu(gn1(x)) (conv1 input), h1 (GN2 input), silu(gn2(h1)) (conv2 input)
        nonlocal saved, live_peak
        a, b = N * ci * h * w, N * co * h * w
        saved += a + a + b + b + 2 * 2 * N * groups
        held = sum(skips)
        live_peak = max(live_peak, held + a + a + b,  # x, gn1 out, conv1 out
                        held + a + b + b)             # x, gn2 out / h4, conv2 out / skip conv out
        return co

    x_elems = N * in_channels * H * W
    saved += x_elems                            # stem conv input
    h, w, ch = H, W, C
    live_peak = max(live_peak, x_elems + N * C * H * W)
    for i, m in enumerate(channel_mults):
        for _ in range(num_res_blocks):
            ch = res(ch, C * m, h, w, True)
            skips.append(N * ch * h * w)
        if i < len(channel_mults) - 1:
            saved += N * ch * h * w             # downsample conv input (aliases the last skip)
            live_peak = max(live_peak, sum(skips) + N * ch * (h // 2) * (w // 2))
            h, w = h // 2, w // 2
    ch = res(ch, ch, h, w, False)               # middle
    for i, m in reversed(list(enumerate(channel_mults))):
        for _ in range(num_res_blocks):
            sk = skips.pop()
            cin = ch + sk // (N * h * w)
            cat = N * cin * h * w
            live_peak = max(live_peak, sum(skips) + sk + N * ch * h * w + cat)
            ch = res(cin, C * m, h, w, False)   # concat output is the block's x
        if i > 0:
            up = N * ch * (2 * h) * (2 * w)
            saved += up                          # upsample output = conv input
            live_peak = max(live_peak, sum(skips) + N * ch * h * w + up + up)
            h, w = 2 * h, 2 * w
    saved += N * ch * h * w * 2 + 2 * 2 * N * groups   # out GN input, out conv input, stats
    live_peak = max(live_peak, 3 * N * ch * h * w)
    return {"saved": saved, "live_peak": live_peak}


def required_bytes(kind, N, H, W, num_params, itemsize=4):
    """Bytes of the arrays that must exist for ``kind`` in {"train", "sample"} (params excluded)."""
    el = required_elements(N, H, W)
    img = N * 1 * H * W
    if kind == "train":
        # grads, Adam m, v, EMA + saved activations + x0, noise, x_t, output, dout
        return (4 * num_params + el["saved"] + 5 * img) * itemsize
    # x_t, model output, x0_pred, noise, x_prev + the largest live activation set
    return (5 * img + el["live_peak"]) * itemsize


# ----------------------------------------------------------------------------- child process
def _rss_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def _maxrss_bytes():
    """Peak RSS of this process's own address space: VmHWM (reset by clear_refs).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that across fork + execve, so in a child
    started by a big parent it never drops below the parent's RSS at fork time (measured: a child of a
    process that had imported torch read ~40 MB more, a child of run_all ~400 MB more), and clear_refs
    does not reset that inherited part. ru_maxrss is used only where /proc is missing.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cache_bytes(obj, exclude=()):
    """Bytes of the distinct ndarray buffers reachable from a (nested tuple/list/dict) cache.

    Arrays whose id is in ``exclude`` (the model's parameters, which caches reference) are not counted.
    """
    seen = {}
    skip = set(exclude)

    def walk(o):
        if isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(o) not in skip and id(base) not in skip:
                seen[id(base)] = base.nbytes
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(obj)
    return sum(seen.values())


def child(kind, batch, size, threads):
    from _common import set_threads
    import difnumpy
    set_threads(threads)
    schedule = difnumpy.Schedule.from_name("linear", 1000)
    model = difnumpy.UNet(backend="cpu", rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    # warm-up on a small model (same kernels, same dtypes): compilation / cache loading stays outside
    small = difnumpy.UNet(base_channels=8, backend="cpu", rng=np.random.default_rng(1))
    xs = rng.standard_normal((2, 1, size, size), dtype=np.float32)
    if kind == "train":
        tr = difnumpy.Trainer(small, schedule, rng=np.random.default_rng(2))
        tr.step(xs)
        tr.step(xs)
        del tr
    else:
        difnumpy.sample(small, schedule, xs.shape, method="ddpm", num_steps=3, rng=np.random.default_rng(2))
        difnumpy.sample(model, schedule, xs.shape, method="ddpm", num_steps=2, rng=np.random.default_rng(2))
    del small, xs
    x0 = np.clip(rng.standard_normal((batch, 1, size, size), dtype=np.float32), -1, 1)
    gc.collect()
    baseline = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    if kind == "train":
        tr = difnumpy.Trainer(model, schedule, rng=np.random.default_rng(3))
        tr.step(x0)
        tr.step(x0)
    else:
        difnumpy.sample(model, schedule, x0.shape, method="ddpm", num_steps=3, rng=np.random.default_rng(3))
    peak = _maxrss_bytes()
    res = {"kind": kind, "batch": batch, "size": size, "baseline_MB": baseline / MB,
           "peak_MB": (peak - baseline) / MB, "peak_reset": peak_reset, "num_params": model.num_params()}
    if kind == "train":  # what the implementation keeps for the backward (after the peak was read)
        _, cache = model.forward(x0, np.full(batch, 10))
        res["cache_MB"] = _cache_bytes(cache, exclude=[id(p) for p in model.params.values()]) / MB
    return res


def measure(kind, batch, size, threads, timeout=600):
    """Run one measurement in a fresh interpreter and return its dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--batches", str(batch),
           "--size", str(size), "--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} batch {batch} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--size", type=int, default=8, help="image side H = W (default 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    ap.add_argument("--quick", action="store_true", help="same as the default (4 subprocesses)")
    ap.add_argument("--smoke", action="store_true", help="batch 4 only (tests only)")
    ap.add_argument("--child", choices=["train", "sample"], help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batches[0], args.size, args.threads)), flush=True)
        return None
    batches = [4] if args.smoke else args.batches
    rows = []
    for kind in args.kinds:
        for n in batches:
            r = measure(kind, n, args.size, args.threads)
            r["required_MB"] = required_bytes(kind, n, args.size, args.size, r["num_params"]) / MB
            r["ratio"] = r["peak_MB"] / r["required_MB"]
            r["goal_met"] = bool(r["ratio"] <= GOAL_RATIO)
            rows.append(r)
            print(f"  {kind:6s} batch {n:4d}: peak {r['peak_MB']:8.1f} MB above baseline, required "
                  f"{r['required_MB']:8.1f} MB -> {r['ratio']:.2f}x", flush=True)
    heads = ["kind", "batch", "size", "required_MB", "peak_MB", "ratio", "cache_MB", "baseline_MB", "peak_reset"]
    print(f"\npeak resident memory above the baseline (imports + model + warmed kernels) vs the arrays "
          f"that must exist; goal ratio <= {GOAL_RATIO:g}")
    print_table([[r.get(h) for h in heads] for r in rows], heads)
    worst = max(r["ratio"] for r in rows)
    print(f"\nworst ratio {worst:.2f} (goal <= {GOAL_RATIO:g}: {'met' if worst <= GOAL_RATIO else 'NOT met'})")
    if args.json:
        write_json(args.json, {"benchmark": "bench_memory", "machine": machine_info(), "rows": rows})
    return {"rows": rows, "worst_ratio": worst}


if __name__ == "__main__":
    main()
