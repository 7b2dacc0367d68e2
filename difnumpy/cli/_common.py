"""What every command shares: the error type and exit codes, argument types, output files, loading a
checkpoint for sampling, batched sampling, class labels and masks, and scoring (:mod:`difnumpy.cli`)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from difnumpy import metrics, solvers
from difnumpy._io import atomic_write
from difnumpy._validation import SampleGenerators
from difnumpy.checkpoint import load_model, read_checkpoint, read_metadata
from difnumpy.data import load_digits
from difnumpy.distributed import SINGLE, shard
from difnumpy.nn.optim import ema_decay_at
from difnumpy.samplers import METHODS, sample_progressive
from difnumpy.schedules import Schedule
from difnumpy.train import CONFIG_FILE, load_run_config

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: The demo's cap on training steps: out of reach, the time budget ends its training.
DEMO_STEPS_CAP = 100000

#: The EMA weights are used when the initial weights' share in them, ``decay ** updates``, is below this.
EMA_INIT_SHARE_MAX = 0.01

#: The solvers that take ``use_karras_sigmas`` (``--karras``).
KARRAS_METHODS = tuple(m for m in METHODS if m in solvers.OPTIONS and "use_karras_sigmas" in solvers.OPTIONS[m])

#: The named inpainting masks: the region named is generated, the rest of the image is kept.
MASK_NAMES = ("top", "bottom", "left", "right", "center")
#: RePaint's settings for ``difnumpy inpaint`` and ``demo --conditional``: steps of one descent, jump length,
#: times each stretch is run, reconstruction guidance w_r (measured: README, "Conditional generation").
INPAINT_STEPS, INPAINT_JUMP_LENGTH, INPAINT_JUMP_N_SAMPLE, INPAINT_RECONSTRUCTION_GUIDANCE = 50, 10, 5, 4.0


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and never exits by itself."""

    def error(self, message):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: error: {message} (see '{self.prog} --help')", EXIT_USAGE)


# ------------------------------------------------------------------------------ argument types
def _number(cast, ok, expected: str, bound: str):
    """An argparse type: ``cast(s)``, then ``ok(v)``; the messages name what was expected."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must {bound}, got {s if cast is float else v}")
        return v
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer", "be >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0", "be >= 0")
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), "a positive number", "be a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0", "be a finite number >= 0")
unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "lie in [0, 1]")


def int_list(s: str) -> tuple:
    try:
        vals = tuple(int(p) for p in s.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return vals


def class_labels_arg(s: str):
    """``"all"`` or a tuple of ints >= 0 (checked against the model's classes later)."""
    if s.strip().lower() == "all":
        return "all"
    try:
        vals = tuple(int(p) for p in s.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated class numbers like 0,3,7, "
                                         f"got {s!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated class numbers >= 0, got {s!r}")
    return vals


# ------------------------------------------------------------------------------ output files
def prepare_out_dir(path: str, name: str = "--out") -> str:
    """Create ``path`` if needed and prove it writable (a temp file), before any heavy work."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".difnumpy-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise CLIError(f"{name} {path!r} is not a writable directory ({exc.strerror or exc})",
                       EXIT_RUNTIME) from None
    return path


def save_npy(path: str, arr: np.ndarray) -> str:
    return atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def save_json(path: str, obj) -> str:
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def format_table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v) + "]"
    return str(v)


# ------------------------------------------------------------------------------ checkpoints
def choose_weights(ema_decay: float, ema_updates: int, weights: str = "auto") -> str:
    """``"ema"`` or ``"raw"``: which weights of a checkpoint to sample from.

    An EMA started at the initial weights still holds ``prod_n d_n`` of them, with ``d_n`` the decay
    of the n-th update (:func:`difnumpy.nn.optim.ema_decay_at`, warm-up included); without the
    warm-up that is ``decay ** updates``, e.g. 58 % after 550 updates at 0.999, which makes the EMA
    model far worse than the raw one in a short run. ``weights="auto"`` takes the EMA once that
    share is below 1 % (:data:`EMA_INIT_SHARE_MAX`), the raw weights before.
    """
    if weights in ("ema", "raw"):
        return weights
    share = float(np.prod([ema_decay_at(float(ema_decay), i) for i in range(int(ema_updates))]))
    return "ema" if share < EMA_INIT_SHARE_MAX else "raw"


#: Fields of the run metadata compared with a config.json beside the checkpoint.
_CROSS_CHECKED = ("image_shape", "data", "batch_size", "seed", "schedule", "num_timesteps", "prediction_type")


def checkpoint_metadata(checkpoint: str, meta: dict, model) -> dict:
    """The run metadata of a checkpoint (:func:`difnumpy.checkpoint.read_metadata`), never a default.

    A checkpoint written before checkpoints held their metadata takes what it lacks from the
    ``config.json`` beside it (as ``difnumpy train`` writes it); without one that is a CLIError naming
    what is missing. A ``config.json`` that contradicts the checkpoint is a CLIError too.
    ``num_classes`` is the model's own (None: unconditional).
    """
    md = read_metadata(meta)
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CONFIG_FILE)
    try:
        cfg = load_run_config(os.path.dirname(cfg_path))
    except FileNotFoundError:
        cfg = None
    except ValueError as exc:
        if md["image_shape"] is None:
            raise CLIError(f"--checkpoint {checkpoint!r} holds no image shape (written before checkpoints held "
                           f"their metadata) and {exc}", EXIT_RUNTIME) from None
        cfg = None  # the checkpoint describes itself; an unreadable side file is not needed
    if cfg is not None:
        side = dict(cfg)
        if isinstance(side.get("image_shape"), list):
            side["image_shape"] = tuple(side["image_shape"])
        diffs = [f"{k} {md[k]!r} in the checkpoint, {side[k]!r} in {cfg_path}" for k in _CROSS_CHECKED
                 if md.get(k) is not None and side.get(k) is not None and md[k] != side[k]]
        if diffs:
            raise CLIError(f"--checkpoint {checkpoint!r} contradicts the {CONFIG_FILE} beside it: "
                           + "; ".join(diffs), EXIT_RUNTIME)
        for k in ("image_shape", "data", "batch_size", "seed"):
            if md[k] is None and side.get(k) is not None:
                md[k] = side[k]
    shape = md["image_shape"]
    if shape is None:
        raise CLIError(f"--checkpoint {checkpoint!r} holds no image shape (C, H, W) (written before checkpoints "
                       f"held their metadata) and there is no {CONFIG_FILE} beside it to read it from", EXIT_RUNTIME)
    shape = tuple(shape)
    if len(shape) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape):
        raise CLIError(f"--checkpoint {checkpoint!r}: image shape {shape!r} is not (C, H, W)", EXIT_RUNTIME)
    div = 2 ** (len(model.config["channel_mults"]) - 1)
    if shape[0] != model.config["in_channels"] or shape[1] % div or shape[2] % div:
        raise CLIError(f"--checkpoint {checkpoint!r}: image shape {shape} does not fit its model "
                       f"(in_channels={model.config['in_channels']}, H and W divisible by {div})", EXIT_RUNTIME)
    md["image_shape"] = shape
    if md["prediction_type"] is None:
        raise CLIError(f"--checkpoint {checkpoint!r} holds no prediction type", EXIT_RUNTIME)
    md["num_classes"] = getattr(model, "num_classes", None)
    return md


def load_for_sampling(checkpoint: str, weights: str = "auto", backend: str | None = None):
    """(model, schedule, metadata, weights_used) of a checkpoint; CLIError if unusable.

    ``metadata`` is :func:`checkpoint_metadata`: image shape, data, schedule, prediction type, num_classes...
    """
    if not os.path.exists(checkpoint):
        raise CLIError(f"--checkpoint {checkpoint!r} does not exist", EXIT_RUNTIME)
    try:
        meta, arrays = read_checkpoint(checkpoint)
        used = choose_weights(float(meta["ema"]["decay"]), int(meta["ema"]["num_updates"]), weights)
        model = load_model(checkpoint, ema=(used == "ema"), backend=backend)
        schedule = Schedule(arrays["schedule/betas"], name=meta["schedule"].get("name"))
    except (ValueError, OSError, TypeError, KeyError, RuntimeError) as exc:
        raise CLIError(f"cannot load --checkpoint {checkpoint!r}: {' '.join(str(exc).split())}",
                       EXIT_RUNTIME) from None
    return model, schedule, checkpoint_metadata(checkpoint, meta, model), used


# ------------------------------------------------------------------------------ sampling
def check_sampling_args(schedule, method: str, steps: int | None, eta: float, n: int, karras: bool = False):
    T = schedule.num_timesteps
    if steps is not None and steps > T:
        raise CLIError(f"--steps {steps} exceeds the model's number of diffusion timesteps T={T}")
    if method != "ddim" and eta != 0.0:
        raise CLIError(f"--eta applies to --method ddim only (got --method {method})")
    if karras and method not in KARRAS_METHODS:
        raise CLIError(f"--karras (Karras sigmas) applies to --method {', '.join(KARRAS_METHODS)}; "
                       f"{method} steps through the training timesteps")
    if n < 1:
        raise CLIError(f"-n must be >= 1, got {n}")


def resolve_class_labels(spec, n: int, num_classes: int | None, checkpoint: str = "") -> np.ndarray | None:
    """The requested class of each of ``n`` samples (int64), or None without ``--class-labels``.

    ``"all"`` cycles 0..K-1 over the samples; a list (e.g. 0,3,7) is cycled likewise (one class: all).
    """
    if spec is None:
        return None
    if num_classes is None:
        where = f" --checkpoint {checkpoint!r}" if checkpoint else ""
        raise CLIError(f"--class-labels needs a class-conditional model; the model of{where} has no classes "
                       f"(train one with 'difnumpy train --conditional')")
    if spec == "all":
        base = np.arange(num_classes, dtype=np.int64)
    else:
        base = np.asarray(spec, dtype=np.int64)
        bad = sorted({int(v) for v in base if not 0 <= v < num_classes})
        if bad:
            raise CLIError(f"--class-labels {','.join(map(str, spec))}: class(es) {bad} out of range; the model "
                           f"has classes 0..{num_classes - 1}")
    return np.resize(base, n).astype(np.int64)


def check_guidance_args(labels, guidance_scale, guidance_rescale) -> tuple[float, float]:
    """(w, phi): ``--guidance-scale`` / ``--guidance-rescale`` need class labels; defaults 1 and 0."""
    if labels is None:
        for flag, v in (("--guidance-scale", guidance_scale), ("--guidance-rescale", guidance_rescale)):
            if v is not None:
                raise CLIError(f"{flag} needs --class-labels (classifier-free guidance mixes the conditional "
                               f"and the unconditional model outputs)")
    return (1.0 if guidance_scale is None else float(guidance_scale),
            0.0 if guidance_rescale is None else float(guidance_rescale))


def generate(model, schedule, shape, *, method, steps, eta, seed, prediction_type, batch_size,
             class_labels=None, guidance_scale=1.0, guidance_rescale=0.0, karras=False,
             trajectory_rows=0, trajectory_frames=10, progress=False, world=SINGLE):
    """Samples in batches, sharded over the MPI ranks; optionally frames of x0_pred for the first rows.

    Sample i's x_T and step noise come from ``(seed, i)`` (:class:`difnumpy._validation.SampleGenerators`),
    so the samples are the same bits for any batch size and any number of ranks. Each rank draws its
    shard (:func:`difnumpy.distributed.shard`) and rank 0 gathers them. ``class_labels`` (N,) int64 or
    None; the batches take their slices of it. Returns (samples, frames, frame_ts) on rank 0 (samples
    None on the others) -- frames a list of (rows, C, H, W) arrays.
    """
    n = shape[0]
    frames, frame_ts = [], []
    step_kw = {"prediction_type": prediction_type}
    if karras:
        step_kw["use_karras_sigmas"] = True
    cond = {}
    a, b = shard(n, world)
    outs = [np.zeros((0,) + tuple(shape[1:]), np.float32)]
    for start in range(a, b, batch_size):
        bs = min(batch_size, b - start)
        if class_labels is not None:
            cond = dict(class_labels=class_labels[start:start + bs], guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale)
        kw = dict(method=method, num_steps=steps, eta=eta, rng=SampleGenerators(seed, range(start, start + bs)),
                  progress=progress and world.is_root, dtype=np.float32, **cond, **step_kw)
        bshape = (bs,) + tuple(shape[1:])
        want = trajectory_rows if start == 0 else 0
        x, all_frames, all_ts = None, [], []
        for st in sample_progressive(model, schedule, bshape, **kw):
            x = st["x_t"]
            if want:  # a few rows only: cheap to keep every step, the shown ones are picked at the end
                all_frames.append(st["x0_pred"][:want].copy())
                all_ts.append(int(round(st["t"])))
        if want:
            keep = np.unique(np.round(np.linspace(0, len(all_frames) - 1, trajectory_frames)).astype(int))
            frames = [all_frames[i] for i in keep]
            frame_ts = [all_ts[i] for i in keep]
        outs.append(np.clip(x, -1.0, 1.0).astype(np.float32))
    return world.gather_rows(np.concatenate(outs)), frames, frame_ts


# ------------------------------------------------------------------------------ inpainting masks
def named_mask(name: str, image_shape) -> np.ndarray:
    """The mask (1, 1, H, W) float32 of a named region: 0 in the region to generate, 1 where kept.

    ``top`` / ``bottom`` / ``left`` / ``right``: that half is generated (rows ``[0, H/2)`` for ``top``,
    ``[H/2, H)`` for ``bottom``; columns likewise), the other half kept. ``center``: the central
    ``H/2 x W/2`` block (rows ``[H/4, H/4 + H/2)``, columns likewise) is generated, the border kept.
    """
    _, h, w = image_shape
    m = np.ones((1, 1, h, w), np.float32)
    if name == "top":
        m[..., : h // 2, :] = 0
    elif name == "bottom":
        m[..., h // 2:, :] = 0
    elif name == "left":
        m[..., :, : w // 2] = 0
    elif name == "right":
        m[..., :, w // 2:] = 0
    elif name == "center":
        m[..., h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    else:  # pragma: no cover - argparse / the caller checked the name
        raise ValueError(f"mask must be one of {MASK_NAMES}, got {name!r}")
    return m


# ------------------------------------------------------------------------------ scores
def class_scores(samples: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> dict:
    """How often the digit classifier (:mod:`difnumpy.metrics`) names the requested / true class.

    ``accuracy`` over all samples, ``per_class_accuracy`` (list, one entry per class; None where no
    sample asked for it), ``mean_confidence`` (the classifier's mean probability of that class).
    """
    probs = metrics.predict_proba(samples)
    pred = probs.argmax(axis=1)
    hit = pred == labels
    per = [float(hit[labels == k].mean()) if np.any(labels == k) else None for k in range(num_classes)]
    return {"accuracy": float(hit.mean()), "per_class_accuracy": per,
            "mean_confidence": float(probs[np.arange(len(labels)), labels].mean()),
            "predicted": pred.astype(np.int64)}


def evaluate(model, schedule, pred, samples, rng, bpd_timesteps: int, batch_size: int):
    res = metrics.evaluate_samples(samples, rng)
    if bpd_timesteps > 0 and model is not None:
        x_test = load_digits("test").astype(model.dtype if hasattr(model, "dtype") else np.float32)
        bpd = metrics.bits_per_dim(model, schedule, x_test, rng, num_timesteps_subsample=bpd_timesteps,
                                   prediction_type=pred, bin_width=2.0 / 16.0, batch_size=batch_size)
        res.update({f"test_{k}": v for k, v in bpd.items()})
    return res
