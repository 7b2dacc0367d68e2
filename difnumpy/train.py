"""The training loop a user runs: ``train(config)`` and ``difnumpy train``.

One run lives in one directory (``config.out_dir``)::

    config.json      the run's configuration (written once, atomically; read back by --resume)
    checkpoint.npz   trainer state every ``checkpoint_every`` steps and at the end (atomic,
                     :func:`difnumpy.checkpoint.save_checkpoint`); resumable bit for bit; it holds
                     the run metadata too (image shape, data, batch size, seed, schedule,
                     prediction type), which sampling, evaluation and resuming follow
    log.jsonl        one JSON object per ``log_every`` steps: step, loss (mean over the
                     window), last_loss, lr, grad_norm, images_per_s, elapsed_s
    loss.png         the loss curve, written at the end (:func:`difnumpy.viz.loss_curve`)

Reproducibility: everything random comes from ``config.seed``. The U-Net's initial weights
from ``default_rng([seed, 1])``, the trainer's timesteps and noise from
``default_rng([seed, 2])`` (its state is saved in the checkpoint), and the batch of update
``k`` (0-based) is a pure function of ``(seed, k)``: epoch ``e = k // (N // batch_size)``
uses the permutation ``default_rng([seed, 3, e]).permutation(N)``, batches in order,
the last partial batch dropped (:class:`difnumpy.data.SeededBatches`; a conditional run's labels
are the same rows' digit classes). So the same seed gives the same run, and a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.

Resuming checks the configuration against the checkpoint (and the config.json, when there is
one): a different data source, batch size, seed, schedule, model (conditional or not, and a
conditional run's label dropout) or optimizer setting is an error,
never a silent change of the run. ``overwrite`` replaces an old run only once the new run has
written its first checkpoint (until then it lives in a hidden folder inside ``out_dir``).

Stopping: after ``steps`` updates; after ``max_minutes`` of wall clock (the demo's budget);
on Ctrl-C (the first SIGINT finishes the current step, saves a checkpoint and returns with
status ``"interrupted"``; a second one interrupts at once); on divergence (a non-finite loss
or gradient norm: :class:`DivergenceError` is raised, and the last checkpoint written
before it is kept untouched).

Under ``mpiexec -n N`` (:mod:`difnumpy.distributed`) every rank runs :func:`train`: each computes B/N
images of every step, rank 0 alone writes the files, and the ranks agree on stopping through the step's
allreduce (a time budget or Ctrl-C stops every rank after the same step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from difnumpy._console import COMPILE_MESSAGE, CompileNotice, SigintGuard  # noqa: F401 (COMPILE_MESSAGE: re-exported)
from difnumpy._io import atomic_write
from difnumpy.data import DIGITS_NUM_CLASSES, SeededBatches, load_digits, load_idx
from difnumpy.trainer import DivergenceError

__all__ = ["TrainConfig", "train", "DivergenceError", "read_log", "load_run_config", "config_from_checkpoint",
           "CONFIG_FILE", "CHECKPOINT_FILE", "LOG_FILE", "LOSS_FILE"]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.npz"
LOG_FILE = "log.jsonl"
LOSS_FILE = "loss.png"

# Fields that define the run; a resumed run must agree on them.
# (label_dropout counts only in a conditional run: an unconditional one never draws it)
_IDENTITY_FIELDS = ("data", "batch_size", "seed", "lr", "ema_decay", "warmup_steps", "grad_clip",
                    "weight_decay", "optimizer", "schedule", "num_timesteps", "prediction_type",
                    "conditional", "label_dropout",
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
    conditional : bool
        Train a class-conditional U-Net (``UNet(num_classes=10)``) on the digits' labels
        (``data="digits"`` only: an IDX image file holds no labels). The checkpoint stores
        ``num_classes``; ``difnumpy sample --class-labels`` and classifier-free guidance need it.
    label_dropout : float in [0, 1]
        Conditional runs: the probability that a label is replaced by "no class" in a step
        (Ho & Salimans 2022, Alg. 1), which trains the unconditional model that guidance needs.
        Ignored by an unconditional run.
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
        Show a tqdm progress bar (loss and images/s) on stderr: steps done out of ``steps``, or,
        with ``max_minutes``, seconds spent out of the budget; and say when numba compiles
        kernels (a cold cache: the first run, about 20 s).

    Notes
    -----
    The defaults are the ones measured best on the 8x8 digits (README, "The demo"): batch 128,
    lr 2e-3 with 100 warm-up steps, the cosine schedule with T = 1000 and an EMA decay of 0.995
    (a budget of a few thousand steps). ``difnumpy train`` and ``difnumpy demo`` both take them
    from here.
    """

    out_dir: str = "runs/digits"
    data: str = "digits"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.995
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction_type: str = "epsilon"
    conditional: bool = False
    label_dropout: float = 0.1
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
        floatf("label_dropout", 0.0, 1.0)
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
        for name in ("resume", "overwrite", "progress", "conditional"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite cannot both be set")
        if self.conditional and self.data != "digits":
            raise ValueError(f"conditional=True trains on class labels, which only data='digits' has; "
                             f"data={self.data!r} (an IDX image file) holds images only")
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


def _load_data(config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels): labels (int64, 0..9) for a conditional run, else None."""
    labels = None
    if config.data == "digits":
        if config.conditional:
            x, labels = load_digits("train", return_labels=True)
        else:
            x = load_digits("train")
    else:
        if not os.path.exists(config.data):
            raise FileNotFoundError(f"data: no such file {config.data!r} (use 'digits' or an IDX image file)")
        x = load_idx(config.data)
        if x.ndim != 4:
            raise ValueError(f"data: {config.data!r} holds labels (1-D), not images")
    if x.shape[0] < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the number of training images {x.shape[0]}")
    return np.ascontiguousarray(x, dtype=np.dtype(config.dtype)), labels


def _check_backend_usable(config: TrainConfig) -> None:
    """backend="cuda" without a usable GPU is refused before anything is written."""
    if config.backend != "cuda":
        return
    from difnumpy import kernels

    try:
        kernels.get_backend("cuda")
    except Exception as exc:  # RuntimeError (no GPU, driver or numba-cuda) or a broken installation
        raise RuntimeError(f"backend='cuda' cannot run here: {' '.join(str(exc).split())}") from None


def _check_image_shape(config: TrainConfig, image_shape: tuple) -> None:
    levels = len(config.channel_mults)
    div = 2 ** (levels - 1)
    _, h, w = image_shape
    if h % div or w % div:
        raise ValueError(f"data: {h}x{w} images do not fit a U-Net with {levels} levels (channel_mults="
                         f"{list(config.channel_mults)}): H and W must be divisible by 2**(levels-1) = {div}")


def _run_metadata(config: TrainConfig, image_shape: tuple) -> dict:
    """The run metadata every checkpoint of this run holds (:data:`difnumpy.checkpoint.RUN_METADATA_KEYS`)."""
    return {"image_shape": [int(v) for v in image_shape], "data": config.data, "batch_size": config.batch_size,
            "seed": config.seed, "num_classes": DIGITS_NUM_CLASSES if config.conditional else None}


def _build_trainer(config: TrainConfig, ckpt_path: str, in_channels: int, world=None):
    from difnumpy.checkpoint import load_checkpoint
    from difnumpy.nn.unet import UNet
    from difnumpy.schedules import Schedule
    from difnumpy.trainer import Trainer

    if config.resume:
        return load_checkpoint(ckpt_path, backend=config.backend, world=world)
    model = UNet(in_channels=in_channels, base_channels=config.base_channels,
                 channel_mults=tuple(config.channel_mults), num_res_blocks=config.num_res_blocks,
                 groups=config.groups, dtype=np.dtype(config.dtype), rng=np.random.default_rng([config.seed, 1]),
                 backend=config.backend, num_classes=DIGITS_NUM_CLASSES if config.conditional else None)
    schedule = Schedule.from_name(config.schedule, config.num_timesteps)
    return Trainer(model, schedule, lr=config.lr, ema_decay=config.ema_decay,
                   rng=np.random.default_rng([config.seed, 2]), prediction_type=config.prediction_type,
                   weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                   warmup_steps=config.warmup_steps, optimizer=config.optimizer,
                   label_dropout=config.label_dropout if config.conditional else 0.0, world=world)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _config_from_meta(meta: dict) -> tuple[dict, list]:
    """(the TrainConfig fields the checkpoint header determines, the run fields it lacks)."""
    from difnumpy.checkpoint import read_metadata

    md = read_metadata(meta)
    mc, hp = meta["model_config"], meta["trainer"]
    d = {"schedule": md["schedule"], "num_timesteps": md["num_timesteps"],
         "prediction_type": md["prediction_type"]}
    for k in ("lr", "ema_decay", "warmup_steps", "grad_clip", "weight_decay", "optimizer"):
        if k in hp:
            d[k] = hp[k]
    for k in ("base_channels", "channel_mults", "num_res_blocks", "groups", "dtype"):
        if k in mc:
            d[k] = list(mc[k]) if k == "channel_mults" else mc[k]
    d["conditional"] = md["num_classes"] is not None or mc.get("num_classes") is not None
    if d["conditional"]:
        d["label_dropout"] = hp.get("label_dropout", 0.0)
    missing = []
    for k in ("data", "batch_size", "seed"):
        if md[k] is None:
            missing.append(k)
        else:
            d[k] = md[k]
    if md["image_shape"] is None:
        missing.append("image_shape")
    return d, missing


def config_from_checkpoint(path: str | os.PathLike, *, strict: bool = True) -> dict:
    """The :class:`TrainConfig` fields that a checkpoint fixes: what ``--resume`` continues with.

    Data source, batch size and seed (the data stream), the schedule and its T, the prediction type,
    the optimizer's and the EMA's hyperparameters and the U-Net's architecture, read from the
    checkpoint itself (not from ``config.json``).

    Parameters
    ----------
    path : str or path-like
    strict : bool, default True
        Refuse a checkpoint without run metadata (written by difnumpy before it stored them); with
        False, return the fields it has.

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        An unreadable checkpoint (:func:`difnumpy.checkpoint.read_checkpoint`), or (``strict``) one
        written before checkpoints held their run metadata (the message names the missing fields).
    """
    from difnumpy.checkpoint import read_checkpoint

    path = os.fspath(path)
    meta, _ = read_checkpoint(path)
    d, missing = _config_from_meta(meta)
    if missing and strict:
        raise ValueError(f"checkpoint {path!r} holds no {', '.join(missing)} (written before checkpoints held "
                         f"their run metadata)")
    return d


def _check_resume(config: TrainConfig, ckpt_path: str, image_shape: tuple, out_dir: str) -> None:
    """The resumed run must be the checkpoint's run: same data stream, schedule, model and optimizer."""
    from difnumpy.checkpoint import read_checkpoint, read_metadata

    meta, _ = read_checkpoint(ckpt_path)
    stored, missing = _config_from_meta(meta)
    try:
        saved = load_run_config(out_dir)
    except FileNotFoundError:
        saved = None
    if missing:  # a checkpoint from before the run metadata: config.json must supply it (as it did then)
        if saved is None:
            raise ValueError(f"resume: checkpoint {ckpt_path!r} holds no {', '.join(missing)} (written before "
                             f"checkpoints held their run metadata) and there is no {CONFIG_FILE} beside it; "
                             f"cannot tell which data stream to continue")
        lacking = [k for k in missing if k not in saved]
        if lacking:
            raise ValueError(f"resume: neither checkpoint {ckpt_path!r} nor {CONFIG_FILE} holds {', '.join(lacking)}")
        stored.update({k: saved[k] for k in missing if k != "image_shape"})
    shape = read_metadata(meta)["image_shape"]
    if shape is None:
        shape = tuple(saved["image_shape"])
    diffs = []
    for k, v in stored.items():
        if k == "label_dropout" and not config.conditional:
            continue  # the conditional flag differs already (an unconditional run draws no labels)
        if not _same(v, getattr(config, k)):
            diffs.append(f"{k} ({v!r} in the checkpoint, {getattr(config, k)!r} given)")
    if tuple(shape) != tuple(image_shape):
        diffs.append(f"image_shape ({tuple(shape)} in the checkpoint, the data gives {tuple(image_shape)})")
    if diffs:
        raise ValueError("resume: the configuration differs from the checkpoint's run: " + "; ".join(diffs))
    if saved is not None:
        _check_resume_config(config, out_dir)


def _check_resume_config(config: TrainConfig, out_dir: str) -> None:
    try:
        saved = load_run_config(out_dir)
    except FileNotFoundError:
        return
    diffs = []
    for k in _IDENTITY_FIELDS:
        if k not in saved or (k == "label_dropout" and not (config.conditional or saved.get("conditional"))):
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
def _setup(config: TrainConfig, world, ckpt_path: str, out_dir: str):
    """The checks and the trainer of :func:`train`, nothing written: (trainer, x, labels, image_shape)."""
    config.validate()
    world.batch_slice(config.batch_size)  # B divisible by the ranks, before any work
    if config.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path!r}")
    elif os.path.exists(ckpt_path) and not config.overwrite:
        raise ValueError(f"out_dir {out_dir!r} already holds a run ({CHECKPOINT_FILE}); "
                         "resume it, choose another out_dir, or set overwrite")
    _check_backend_usable(config)
    x, labels = _load_data(config)
    image_shape = tuple(int(v) for v in x.shape[1:])
    _check_image_shape(config, image_shape)
    if config.resume:
        _check_resume(config, ckpt_path, image_shape, out_dir)
    return _build_trainer(config, ckpt_path, image_shape[0], world), x, labels, image_shape


def train(config: TrainConfig | dict, *, callback: Callable[[int, float], Any] | None = None, world=None) -> dict:
    """Train the U-Net with the DDPM loss, with logging, checkpoints, resume and a time budget.

    Parameters
    ----------
    config : TrainConfig or dict
        See :class:`TrainConfig`.
    callback : callable, optional
        ``callback(step, loss)`` after every successful update (``step`` 1-based).
    world : difnumpy.distributed.World, optional
        Data parallelism over MPI ranks (default :func:`difnumpy.distributed.get_world`: one process
        unless started by ``mpiexec`` with several ranks). Every rank runs this function; each computes
        its B/N images of every step, and rank 0 alone writes the run's files, the log and the progress
        bar. Stopping (time budget, Ctrl-C) is agreed through the step's allreduce, so every rank stops
        after the same step. The run equals a one-process run up to float rounding.

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
        Bad configuration (including images whose H, W the U-Net cannot halve
        ``len(channel_mults) - 1`` times, or a ``groups`` that does not divide the channel
        counts); ``out_dir`` already holding a run without ``resume`` or ``overwrite``;
        ``resume`` without a checkpoint, or with a configuration that differs from the
        checkpoint's run metadata (or, for an older checkpoint, from the run's config.json).
    RuntimeError
        ``backend="cuda"`` without a usable GPU.
    ValueError
        Several MPI ranks and a ``batch_size`` they do not divide (before any work).

    Notes
    -----
    Everything is checked (configuration, data, backend, image shape, the model and trainer
    built) before ``out_dir`` is touched. With ``overwrite``, the new run is written to a
    temporary directory inside ``out_dir`` and replaces the old run's files only once its
    first checkpoint is written: a run that fails before that leaves the old run as it was.
    Every checkpoint holds the run metadata (image shape, data source, batch size, seed,
    schedule, prediction type; :func:`difnumpy.checkpoint.read_metadata`).
    """
    from difnumpy.checkpoint import save_checkpoint

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    config = dataclasses.replace(config)  # private copy
    from difnumpy.distributed import get_world
    world = world or get_world()
    root = world.is_root
    world.stop_requested = world.stop_agreed = False  # rank 0 alone writes files and shows progress
    out_dir = os.fspath(config.out_dir)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_FILE)
    log_path = os.path.join(out_dir, LOG_FILE)
    cfg_path = os.path.join(out_dir, CONFIG_FILE)
    png_path = os.path.join(out_dir, LOSS_FILE)
    bar = None

    def say(msg: str) -> None:
        if not root:
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    notice = CompileNotice(say) if config.progress else contextlib.nullcontext()
    with notice:
        # 1. everything that can fail is checked before out_dir is touched (every rank; no collectives)
        try:
            trainer, x, labels, image_shape = _setup(config, world, ckpt_path, out_dir)
        except BaseException:
            world.end_setup(failed=True)  # every rank learns of it: none waits in a collective
            raise
        world.end_setup()
        metadata = _run_metadata(config, image_shape)
        start = trainer.step_count

        # 2. the directory: a replaced run stays until the new run's first checkpoint is written
        staging, log_fh = None, None
        if root:
            os.makedirs(out_dir, exist_ok=True)
        if root and config.overwrite and os.path.exists(ckpt_path):
            staging = tempfile.mkdtemp(dir=out_dir, prefix=".difnumpy-new-run.")
        where = staging or out_dir
        run_ckpt, run_log, run_cfg_path = (os.path.join(where, f) for f in (CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE))

        run_cfg = config.to_dict()
        run_cfg.update(resume=False, overwrite=False, image_shape=list(image_shape))
        from difnumpy import __version__
        run_cfg["difnumpy_version"] = __version__
        try:
            if root:
                _atomic_write_text(run_cfg_path, json.dumps(run_cfg, indent=2) + "\n")
                # the log: keep records up to the checkpoint's step (a resumed run rewrites what followed it)
                kept = []
                if config.resume and os.path.exists(log_path):
                    kept = [r for r in read_log(log_path) if r["step"] <= start]
                _atomic_write_text(run_log, "".join(json.dumps(r) + "\n" for r in kept))
                log_fh = open(run_log, "a", encoding="utf-8")
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise

        def checkpoint() -> None:
            nonlocal staging, run_ckpt, log_fh
            if not root:
                return
            save_checkpoint(run_ckpt, trainer, metadata)
            if staging is None:
                return
            # the new run has its first checkpoint: it replaces the old run (checkpoint first, so that
            # a crash in between leaves a checkpoint whose own metadata is authoritative)
            log_fh.close()
            os.replace(run_ckpt, ckpt_path)
            os.replace(run_cfg_path, cfg_path)
            os.replace(run_log, log_path)
            if os.path.exists(png_path):
                os.unlink(png_path)  # the old run's loss curve; the new one is written at the end
            shutil.rmtree(staging, ignore_errors=True)
            staging, run_ckpt = None, ckpt_path
            log_fh = open(log_path, "a", encoding="utf-8")

        batches = SeededBatches(x, config.batch_size, config.seed, labels)
        budget_s = None if config.max_minutes is None else 60.0 * float(config.max_minutes)
        status = "completed"
        diverged = None
        last_saved = start if config.resume else -1
        t_start = time.perf_counter()
        win_losses: list[float] = []
        win_t = t_start
        last_loss = None
        images_per_s = None
        if config.progress and root:
            from tqdm.auto import tqdm
            if budget_s is not None:  # a time-budgeted run: progress is time spent out of the budget
                bar = tqdm(total=round(budget_s, 1), unit="s", desc="train", dynamic_ncols=True, leave=True,
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the time "
                                      "budget [{elapsed}<{remaining}{postfix}]")
            else:
                bar = tqdm(total=config.steps, initial=min(start, config.steps), unit="step", desc="train",
                           dynamic_ncols=True, leave=True)

        def note_interrupt():
            say("interrupt received: saving a checkpoint after this step (Ctrl-C again to abort now)")

        try:
            with SigintGuard(note_interrupt) as guard:
                for k in range(start, config.steps):
                    over = budget_s is not None and time.perf_counter() - t_start > budget_s
                    if world.size > 1:  # agreed in the step's allreduce: every rank stops after the same step
                        world.stop_requested = guard.requested or over
                    elif guard.requested or over:
                        status = "interrupted" if guard.requested else "time_budget"
                        break
                    try:
                        loss = trainer.step(*batches(k))
                    except DivergenceError as exc:
                        if last_saved >= 0:
                            where_ = f"the last good checkpoint (step {last_saved}) is kept at {ckpt_path}"
                        elif staging is not None:
                            where_ = f"no checkpoint was written; the previous run in {out_dir} is kept"
                        else:
                            where_ = "no checkpoint was written"
                        diverged = DivergenceError(f"training diverged at step {k + 1}: {exc}; {where_}")
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
                        if log_fh is not None:
                            log_fh.write(json.dumps(rec) + "\n")
                            log_fh.flush()
                        win_losses, win_t = [], now
                        if bar is not None:
                            bar.set_postfix(step=step, loss=f"{rec['loss']:.4f}", img_s=f"{images_per_s:.0f}",
                                            refresh=False)
                    if bar is not None:
                        if budget_s is not None:
                            bar.update(min(time.perf_counter() - t_start, budget_s) - bar.n)
                        else:
                            bar.update(1)
                    if step % config.checkpoint_every == 0:
                        checkpoint()
                        last_saved = step
                    if world.size > 1 and world.stop_agreed:
                        status = "interrupted" if guard.requested else "time_budget"
                        break
                if status != "diverged" and trainer.step_count != last_saved:
                    checkpoint()
                    last_saved = trainer.step_count
                if bar is not None and budget_s is not None and status == "time_budget":
                    bar.update(bar.total - bar.n)  # the budget is spent: 100 %
        finally:
            if log_fh is not None:
                log_fh.close()
            if bar is not None:
                bar.close()
            if staging is not None:  # the new run never reached its first checkpoint: the old run stays
                shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    replaced_old_run_kept = staging is not None
    loss_png = None if replaced_old_run_kept or not root else _write_loss_png(log_path, png_path)
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
