"""Run under ``mpiexec -n N`` by tests/test_distributed.py (also runs as one process, N = 1).

usage: python mpi_worker.py MODE OUT [args]
  train DTYPE STEPS [RESUME_FROM]   data-parallel training; rank 0 writes OUT (params, EMA, m, v, losses)
  sample M BATCH                     sharded DDPM sampling; rank 0 writes the gathered samples to OUT
  fail STEPS FAIL_AT                 rank 1 raises at step FAIL_AT; rank 0 checkpoints every step to OUT
  batch B                            a global batch B (not divisible by N: refused before any work)
"""
import sys

import numpy as np

from difnumpy import Schedule, Trainer, UNet, sample
from difnumpy._validation import SampleGenerators
from difnumpy.checkpoint import load_checkpoint, save_checkpoint
from difnumpy.distributed import abort_on_error, get_world, shard

TINY = dict(base_channels=8, channel_mults=(1, 2), groups=4)


def model(dtype="float32", seed=0):
    m = UNet(**TINY, dtype=dtype, rng=seed, backend="cpu")
    rng = np.random.default_rng(seed + 100)
    m.set_params({k: rng.standard_normal(p.shape) * 0.2 for k, p in m.params.items()})
    return m


def data(steps, batch=8):
    return np.random.default_rng(1).uniform(-1, 1, (steps, batch, 1, 8, 8))


def main():
    world = get_world()
    mode, out = sys.argv[1], sys.argv[2]
    try:
        if mode == "train":
            dtype, steps = sys.argv[3], int(sys.argv[4])
            x = data(steps)
            if len(sys.argv) > 5:
                tr = load_checkpoint(sys.argv[5], world=world)
            else:
                tr = Trainer(model(dtype), Schedule.from_name("cosine", 100), lr=1e-2, rng=0, ema_decay=0.9,
                             world=world)
            losses = [tr.step(x[i]) for i in range(tr.step_count, steps)]
            if world.is_root:
                opt = tr.optimizer.state_dict()
                np.savez(out, losses=np.array(losses), **{f"p/{k}": v for k, v in tr.model.params.items()},
                         **{f"e/{k}": v for k, v in tr.ema.params.items()},
                         **{f"m/{k}": opt[f"m/{k}"] for k in tr.model.params})
        elif mode == "sample":
            M, batch = int(sys.argv[3]), int(sys.argv[4])
            a, b = shard(M, world)
            m = model()
            parts = [sample(m, Schedule.from_name("cosine", 100), (min(batch, b - i), 1, 8, 8), method="ddpm",
                            num_steps=10, rng=SampleGenerators(7, range(i, min(i + batch, b))))
                     for i in range(a, b, batch)]
            mine = np.concatenate(parts) if parts else np.zeros((0, 1, 8, 8), np.float32)
            allx = world.gather_rows(mine)
            if world.is_root:
                np.save(out, allx)
        elif mode == "fail":
            steps, fail_at = int(sys.argv[3]), int(sys.argv[4])
            x = data(steps)
            tr = Trainer(model(), Schedule.from_name("cosine", 100), lr=1e-2, rng=0, world=world)
            for i in range(steps):
                if world.rank == 1 and i == fail_at:
                    raise FloatingPointError(f"rank 1 fails at step {i}")
                tr.step(x[i])
                if world.is_root:
                    save_checkpoint(out, tr)
        elif mode == "batch":
            tr = Trainer(model(), Schedule.from_name("cosine", 100), rng=0, world=world)
            tr.step(np.zeros((int(sys.argv[3]), 1, 8, 8), np.float32))
    except Exception as exc:  # noqa: BLE001 - every rank must stop: print once here, abort the others
        abort_on_error(world, exc)


if __name__ == "__main__":
    main()
