"""Shared by examples 04 and 05: the model to sample from (a checkpoint's EMA weights, or a quickly trained one)."""
import time

import numpy as np

from difnumpy import Schedule, Trainer, UNet, load_checkpoint
from difnumpy.data import iterate_batches, load_digits


def get_model(args):
    """(model, schedule, prediction_type, description): the EMA model of --checkpoint, or a quickly trained one."""
    if args.checkpoint:
        trainer = load_checkpoint(args.checkpoint)
        return (trainer.ema_model, trainer.schedule, trainer.prediction_type,
                f"EMA weights of {args.checkpoint} ({trainer.step_count} training steps)")
    schedule = Schedule.from_name("linear", args.timesteps)
    model = UNet(base_channels=args.base_channels, rng=np.random.default_rng([args.seed, 1]))
    trainer = Trainer(model, schedule, lr=1e-3, ema_decay=0.995, warmup_steps=50,
                      rng=np.random.default_rng([args.seed, 2]))
    batches = iterate_batches(load_digits("train"), 64, np.random.default_rng([args.seed, 3]))
    t0 = time.perf_counter()
    while trainer.step_count < args.train_steps and time.perf_counter() - t0 < 60.0 * args.train_minutes:
        trainer.step(next(batches))
    print(f"no --checkpoint: trained a U-Net (base_channels={args.base_channels}, T={args.timesteps}) for "
          f"{trainer.step_count} steps in {time.perf_counter() - t0:.0f} s, last loss {trainer.last_loss:.4f}")
    return trainer.ema_model, schedule, trainer.prediction_type, f"quick model ({trainer.step_count} steps)"
