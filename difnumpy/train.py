"""The training loop a user runs: ``train(config)`` and ``difnumpy train``.

One run lives in one directory (``config.out_dir``)::

    config.json      the run's configuration (written once, atomically; read back by --resume)
    checkpoint.npz   trainer state every ``checkpoint_every`` steps and at the end (atomic,
                     :func:`difnumpy.checkpoint.save_checkpoint`); resumable bit for bit
    log.jsonl        one JSON object per ``log_every`` steps: step, loss (mean over the
                     window), last_loss, lr, grad_norm, images_per_s, elapsed_s
    loss.png         the loss curve, written at the end (:func:`difnumpy.viz.loss_curve`)

Reproducibility: everything random comes from ``config.seed``. The U-Net's initial weights
from ``default_rng([seed, 1])``, the trainer's timesteps and noise from
``default_rng([seed, 2])`` (its state is saved in the checkpoint), and the batch of update
``k`` (0-based) is a pure function of ``(seed, k)``: epoch ``e = k // (N // batch_size)``
uses the permutation ``default_rng([seed, 3, e]).permutation(N)``, batches in order,
the last partial batch dropped. So the same seed gives the same run, and a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.

Stopping: after ``steps`` updates; after ``max_minutes`` of wall clock (the demo's budget);
on Ctrl-C (the first SIGINT finishes the current step, saves a checkpoint and returns with
status ``"interrupted"``; a second one interrupts at once); on divergence (a non-finite loss
or gradient norm: :class:`DivergenceError` is raised, and the last checkpoint written
before it is kept untouched).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import numpy as np

from difnumpy._io import atomic_write
from difnumpy.trainer import DivergenceError

__all__ = ["TrainConfig", "train", "DivergenceError", "read_log", "load_run_config",
           "CONFIG_FILE", "CHECKPOINT_FILE", "LOG_FILE", "LOSS_FILE"]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.npz"
LOG_FILE = "log.jsonl"
LOSS_FILE = "loss.png"

# Fields that define the run; a resumed run must agree on them.
_IDENTITY_FIELDS = ("data", "batch_size", "seed", "lr", "ema_decay", "warmup_steps", "grad_clip",
                    "weight_decay", "optimizer", "schedule", "num_timesteps", "prediction_type",
                    "base_channels", "channel_mults", "num_res_blocks", "groups", "dtype")


@dataclasses.dataclass
class TrainConfig:
    """Configuration of :func:`train` (plain values only; ``to_dict`` / ``from_dict`` via JSON).

    Attributes
    ----------
    out_dir : str
        Run directory (created if missing).
    data : str
        ``"digits"`` (the train split of :func:`difnumpy.data.load_digits`) or the path of an
        MNIST-style IDX image file (:func:`difnumpy.data.load_idx`).
    steps : int
        Total number of updates of the run (a resumed run continues up to it).
    batch_size : int
    lr, ema_decay, warmup_steps, grad_clip, weight_decay, optimizer :
        :class:`difnumpy.trainer.Trainer` arguments (``grad_clip`` None: no clipping).
    schedule, num_timesteps :
        :meth:`difnumpy.schedules.Schedule.from_name` arguments.
    prediction_type : {"epsilon", "sample", "v_prediction"}
    base_channels, channel_mults, num_res_blocks, groups, dtype, backend :
        :class:`difnumpy.nn.unet.UNet` arguments (``backend`` may change on resume).
    seed : int
        The only source of randomness (see the module docstring).
    checkpoint_every, log_every : int
        Periods in updates.
    max_minutes : float or None
        Wall-clock budget of this call; the run stops (status ``"time_budget"``) and saves
        once it is exceeded.
    resume : bool
        Continue from ``out_dir/checkpoint.npz``.
    overwrite : bool
        Start afresh even if ``out_dir`` already holds a checkpoint (otherwise that is an
        error: results are never overwritten by accident).
    progress : bool
        Show a tqdm progress bar (loss and images/s) on stderr.
    """

    out_dir: str = "runs/digits"
    data: str = "digits"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction_type: str = "epsilon"
    base_channels: int = 32
    channel_mults: tuple = (1, 2)
    num_res_blocks: int = 1
    groups: int = 8
    dtype: str = "float32"
    backend: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    max_minutes: float | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict; unknown keys are a ValueError naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict or TrainConfig, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"image_shape", "difnumpy_version"})
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys are {sorted(names)}")
        kw = {k: v for k, v in d.items() if k in names}
        if "channel_mults" in kw and isinstance(kw["channel_mults"], list):
            kw["channel_mults"] = tuple(kw["channel_mults"])
        return cls(**kw)

    def validate(self) -> "TrainConfig":
        """Check every field; raises ValueError/TypeError naming the field."""
        from difnumpy.kernels import BACKENDS
        from difnumpy.schedules import SCHEDULE_NAMES
        from difnumpy.trainer import OPTIMIZERS, PREDICTION_TYPES

        def intf(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")

        def floatf(name, lo, hi=math.inf, lo_open=False, none_ok=False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(v)):
                raise TypeError(f"{name} must be a finite number{' or None' if none_ok else ''}, got {v!r}")
            if (float(v) <= lo if lo_open else float(v) < lo) or float(v) > hi:
                raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}")

        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("num_timesteps", 1),
                         ("base_channels", 2), ("num_res_blocks", 1), ("groups", 1), ("seed", 0),
                         ("checkpoint_every", 1), ("log_every", 1)):
            intf(name, lo)
        floatf("lr", 0.0, lo_open=True)
        floatf("ema_decay", 0.0, 1.0)
        floatf("weight_decay", 0.0)
        floatf("grad_clip", 0.0, lo_open=True, none_ok=True)
        floatf("max_minutes", 0.0, lo_open=True, none_ok=True)
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULE_NAMES),
                              ("prediction_type", PREDICTION_TYPES), ("backend", BACKENDS),
                              ("dtype", ("float32", "float64"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be 'digits' or the path of an IDX image file, got {self.data!r}")
        if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        cm = self.channel_mults
        if isinstance(cm, (str, bytes)) or not hasattr(cm, "__len__") or len(cm) == 0 or any(
                isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in cm):
            raise ValueError(f"channel_mults must be a non-empty sequence of ints >= 1, got {cm!r}")
        for name in ("resume", "overwrite", "progress"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite cannot both be set")
        return self


# ------------------------------------------------------------------------------ file helpers
def _atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def read_log(path: str) -> list[dict]:
    """The records of a ``log.jsonl`` file (a torn last line, from a crash, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    return records


def load_run_config(out_dir: str) -> dict:
    """The ``config.json`` of a run directory, as a dict (FileNotFoundError if absent)."""
    path = os.path.join(os.fspath(out_dir), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _load_data(config: TrainConfig) -> np.ndarray:
    from difnumpy.data import load_digits, load_idx

    if config.data == "digits":
        x = load_digits("train")
    else:
        if not os.path.exists(config.data):
            raise FileNotFoundError(f"data: no such file {config.data!r} (use 'digits' or an IDX image file)")
        x = load_idx(config.data)
        if x.ndim != 4:
            raise ValueError(f"data: {config.data!r} holds labels (1-D), not images")
    if x.shape[0] < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the number of training images {x.shape[0]}")
    return np.ascontiguousarray(x, dtype=np.dtype(config.dtype))


class _Batches:
    """Batch ``k`` as a pure function of (seed, k); see the module docstring."""

    def __init__(self, x: np.ndarray, batch_size: int, seed: int):
        self.x, self.bs, self.seed = x, batch_size, seed
        self.per_epoch = x.shape[0] // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> np.ndarray:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, 3, epoch]).permutation(self.x.shape[0])
            self._epoch = epoch
        return self.x[self._perm[pos * self.bs:(pos + 1) * self.bs]]


class _SigintGuard:
    """First SIGINT sets a flag (stop after the current step); a second one raises at once.

    Only installs a handler in the main thread (signals are delivered there); elsewhere it is
    inert and a KeyboardInterrupt propagates as usual.
    """

    def __init__(self, on_first: Callable[[], None] | None = None):
        self.requested = False
        self._old = None
        self._on_first = on_first

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._old or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self._on_first is not None:
            self._on_first()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _build_trainer(config: TrainConfig, ckpt_path: str):
    from difnumpy.checkpoint import load_checkpoint
    from difnumpy.nn.unet import UNet
    from difnumpy.schedules import Schedule
    from difnumpy.trainer import Trainer

    if config.resume:
        return load_checkpoint(ckpt_path, backend=config.backend)
    model = UNet(in_channels=1, base_channels=config.base_channels, channel_mults=tuple(config.channel_mults),
                 num_res_blocks=config.num_res_blocks, groups=config.groups, dtype=np.dtype(config.dtype),
                 rng=np.random.default_rng([config.seed, 1]), backend=config.backend)
    schedule = Schedule.from_name(config.schedule, config.num_timesteps)
    return Trainer(model, schedule, lr=config.lr, ema_decay=config.ema_decay,
                   rng=np.random.default_rng([config.seed, 2]), prediction_type=config.prediction_type,
                   weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                   warmup_steps=config.warmup_steps, optimizer=config.optimizer)


def _check_resume_config(config: TrainConfig, out_dir: str) -> None:
    try:
        saved = load_run_config(out_dir)
    except FileNotFoundError:
        return
    diffs = []
    for k in _IDENTITY_FIELDS:
        if k not in saved:
            continue
        a, b = saved[k], getattr(config, k)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            diffs.append(f"{k} ({a!r} in {CONFIG_FILE}, {b!r} given)")
    if diffs:
        raise ValueError(f"resume: the configuration differs from the run's {CONFIG_FILE}: " + "; ".join(diffs))


def _write_loss_png(log_path: str, png_path: str) -> str | None:
    from difnumpy.viz import loss_curve

    try:
        recs = read_log(log_path)
    except FileNotFoundError:
        return None
    if not recs:
        return None
    steps = [r["step"] for r in recs]
    losses = [r["loss"] if r.get("loss") is not None else float("nan") for r in recs]
    return loss_curve(steps, losses, png_path, title="training loss (DDPM simple loss, eq. 14)")


# ------------------------------------------------------------------------------ train
def train(config: TrainConfig | dict, *, callback: Callable[[int, float], Any] | None = None) -> dict:
    """Train the U-Net with the DDPM loss, with logging, checkpoints, resume and a time budget.

    Parameters
    ----------
    config : TrainConfig or dict
        See :class:`TrainConfig`.
    callback : callable, optional
        ``callback(step, loss)`` after every successful update (``step`` 1-based).

    Returns
    -------
    result : dict
        ``status`` ("completed", "time_budget" or "interrupted"), ``step`` (updates applied
        in total), ``steps_this_call``, ``checkpoint``, ``log``, ``loss_png``, ``config``
        (path of config.json), ``elapsed_s``, ``images_per_s``, ``last_loss`` and ``trainer``
        (the :class:`difnumpy.trainer.Trainer`, whose ``ema_model`` is the sampling model).

    Raises
    ------
    DivergenceError
        A non-finite loss or gradient norm; the message names the step and the last good
        checkpoint, which is left untouched.
    ValueError, TypeError, FileNotFoundError
        Bad configuration; ``out_dir`` already holding a run without ``resume`` or
        ``overwrite``; ``resume`` without a checkpoint, or with a configuration that
        differs from the run's config.json.
    """
    from difnumpy.checkpoint import save_checkpoint

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    config = dataclasses.replace(config)  # private copy
    config.validate()
    out_dir = os.fspath(config.out_dir)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_FILE)
    log_path = os.path.join(out_dir, LOG_FILE)
    cfg_path = os.path.join(out_dir, CONFIG_FILE)
    png_path = os.path.join(out_dir, LOSS_FILE)

    if config.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path!r}")
        _check_resume_config(config, out_dir)
    elif os.path.exists(ckpt_path) and not config.overwrite:
        raise ValueError(f"out_dir {out_dir!r} already holds a run ({CHECKPOINT_FILE}); "
                         "resume it, choose another out_dir, or set overwrite")
    x = _load_data(config)
    os.makedirs(out_dir, exist_ok=True)
    if config.overwrite and os.path.exists(ckpt_path):
        os.unlink(ckpt_path)  # never leave the old run's checkpoint beside the new run's log
    trainer = _build_trainer(config, ckpt_path)
    start = trainer.step_count

    run_cfg = config.to_dict()
    run_cfg.update(resume=False, overwrite=False, image_shape=list(x.shape[1:]))
    from difnumpy import __version__
    run_cfg["difnumpy_version"] = __version__
    _atomic_write_text(cfg_path, json.dumps(run_cfg, indent=2) + "\n")

    # the log: keep records up to the checkpoint's step (a resumed run rewrites what followed it)
    kept = []
    if config.resume and os.path.exists(log_path):
        kept = [r for r in read_log(log_path) if r["step"] <= start]
    _atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))

    batches = _Batches(x, config.batch_size, config.seed)
    budget_s = None if config.max_minutes is None else 60.0 * float(config.max_minutes)
    status = "completed"
    diverged = None
    last_saved = start if config.resume else -1
    t_start = time.perf_counter()
    win_losses: list[float] = []
    win_t = t_start
    last_loss = None
    images_per_s = None
    bar = None
    if config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=min(start, config.steps), unit="step", desc="train",
                   dynamic_ncols=True, leave=True)

    def note_interrupt():
        msg = "interrupt received: saving a checkpoint after this step (Ctrl-C again to abort now)"
        (bar.write if bar is not None else print)(msg)

    log_fh = open(log_path, "a", encoding="utf-8")
    try:
        with _SigintGuard(note_interrupt) as guard:
            for k in range(start, config.steps):
                if guard.requested:
                    status = "interrupted"
                    break
                if budget_s is not None and time.perf_counter() - t_start > budget_s:
                    status = "time_budget"
                    break
                try:
                    loss = trainer.step(batches(k))
                except DivergenceError as exc:
                    where = (f"the last good checkpoint (step {last_saved}) is kept at {ckpt_path}"
                             if last_saved >= 0 else "no checkpoint was written")
                    diverged = DivergenceError(f"training diverged at step {k + 1}: {exc}; {where}")
                    status = "diverged"
                    break
                step = trainer.step_count
                last_loss = loss
                win_losses.append(loss)
                if callback is not None:
                    callback(step, loss)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    images_per_s = len(win_losses) * config.batch_size / max(now - win_t, 1e-9)
                    rec = {"step": step, "loss": float(np.mean(win_losses)), "last_loss": float(loss),
                           "lr": trainer.last_lr, "grad_norm": trainer.last_grad_norm,
                           "images_per_s": round(images_per_s, 2), "elapsed_s": round(now - t_start, 3)}
                    log_fh.write(json.dumps(rec) + "\n")
                    log_fh.flush()
                    win_losses, win_t = [], now
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                if bar is not None:
                    bar.update(1)
                if step % config.checkpoint_every == 0:
                    save_checkpoint(ckpt_path, trainer)
                    last_saved = step
            if status != "diverged" and trainer.step_count != last_saved:
                save_checkpoint(ckpt_path, trainer)
                last_saved = trainer.step_count
    finally:
        log_fh.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    loss_png = _write_loss_png(log_path, png_path)
    if diverged is not None:
        raise diverged
    done = trainer.step_count - start
    return {
        "status": status,
        "step": trainer.step_count,
        "steps_this_call": done,
        "checkpoint": ckpt_path,
        "log": log_path,
        "loss_png": loss_png,
        "config": cfg_path,
        "elapsed_s": elapsed,
        "images_per_s": done * config.batch_size / elapsed if elapsed > 0 else None,
        "last_loss": last_loss,
        "trainer": trainer,
    }
