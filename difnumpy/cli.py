"""Command line: ``difnumpy train | sample | evaluate | demo`` (also ``python -m difnumpy``).

Every command validates its arguments before doing any work. Bad arguments, a missing or
corrupt checkpoint or an unwritable output directory print one line
``difnumpy <command>: error: <what is wrong>`` on stderr and exit with status 2 (usage) or
1 (runtime); a diverged training run exits with 3 and an interrupted one (Ctrl-C) with 130,
after saving its checkpoint. No traceback is ever printed (``DIFNUMPY_DEBUG=1`` re-raises
for debugging). Results are computed in memory first and every file is written atomically
(temporary file + ``os.replace``), so existing results are never left half-overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from difnumpy._validation import PREDICTION_TYPES

__all__ = ["main", "build_parser", "choose_weights"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and never exits by itself."""

    def error(self, message):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: error: {message} (see '{self.prog} --help')", EXIT_USAGE)


# ------------------------------------------------------------------------------ argument types
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _unit_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {s}")
    return v


def _int_list(s: str) -> tuple:
    try:
        vals = tuple(int(p) for p in s.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return vals


# ------------------------------------------------------------------------------ helpers
def _prepare_out_dir(path: str, name: str = "--out") -> str:
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


def _atomic_save_npy(path: str, arr: np.ndarray) -> str:
    from difnumpy._io import atomic_write

    return atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))


def _atomic_save_json(path: str, obj) -> str:
    from difnumpy.train import _atomic_write_text

    _atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


#: The demo's cap on training steps: out of reach, the time budget ends its training.
DEMO_STEPS_CAP = 100000

#: The EMA weights are used when the initial weights' share in them, ``decay ** updates``, is below this.
EMA_INIT_SHARE_MAX = 0.01


def choose_weights(ema_decay: float, ema_updates: int, weights: str = "auto") -> str:
    """``"ema"`` or ``"raw"``: which weights of a checkpoint to sample from.

    An EMA started at the initial weights still holds ``prod_n d_n`` of them, with ``d_n`` the decay
    of the n-th update (:func:`difnumpy.nn.optim.ema_decay_at`, warm-up included); without the
    warm-up that is ``decay ** updates``, e.g. 58 % after 550 updates at 0.999, which makes the EMA
    model far worse than the raw one in a short run. ``weights="auto"`` takes the EMA once that
    share is below 1 % (:data:`EMA_INIT_SHARE_MAX`), the raw weights before.
    """
    from difnumpy.nn.optim import ema_decay_at

    if weights in ("ema", "raw"):
        return weights
    share = float(np.prod([ema_decay_at(float(ema_decay), i) for i in range(int(ema_updates))]))
    return "ema" if share < EMA_INIT_SHARE_MAX else "raw"


#: Fields of the run metadata compared with a config.json beside the checkpoint.
_CROSS_CHECKED = ("image_shape", "data", "batch_size", "seed", "schedule", "num_timesteps", "prediction_type")


def _checkpoint_metadata(checkpoint: str, meta: dict, model) -> dict:
    """The run metadata of a checkpoint (:func:`difnumpy.checkpoint.read_metadata`), never a default.

    A checkpoint written before checkpoints held their metadata takes what it lacks from the
    ``config.json`` beside it (as ``difnumpy train`` writes it); without one that is a CLIError naming
    what is missing. A ``config.json`` that contradicts the checkpoint is a CLIError too.
    """
    from difnumpy.checkpoint import read_metadata
    from difnumpy.train import CONFIG_FILE, load_run_config

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
    return md


def _load_for_sampling(checkpoint: str, weights: str = "auto", backend: str | None = None):
    """(model, schedule, metadata, weights_used) of a checkpoint; CLIError if unusable.

    ``metadata`` is :func:`_checkpoint_metadata`: image shape, data, schedule, prediction type, ...
    """
    from difnumpy.checkpoint import load_model, read_checkpoint
    from difnumpy.schedules import Schedule

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
    return model, schedule, _checkpoint_metadata(checkpoint, meta, model), used


def _check_sampling_args(schedule, method: str, steps: int | None, eta: float, n: int):
    T = schedule.num_timesteps
    if steps is not None and steps > T:
        raise CLIError(f"--steps {steps} exceeds the model's number of diffusion timesteps T={T}")
    if method == "ddpm" and eta != 0.0:
        raise CLIError("--eta applies to --method ddim only")
    if n < 1:
        raise CLIError(f"-n must be >= 1, got {n}")


def _generate(model, schedule, shape, *, method, steps, eta, rng, prediction_type, batch_size,
              trajectory_rows=0, trajectory_frames=10, progress=False):
    """Samples in batches (one rng stream); optionally frames of x0_pred for the first rows.

    Returns (samples, frames, frame_ts) -- frames a list of (rows, C, H, W) arrays.
    """
    from difnumpy.samplers import sample_progressive

    n = shape[0]
    outs, frames, frame_ts = [], [], []
    # one child Generator per batch: the sampler draws the batch's x_T from it first, then the
    # DDPM / DDIM(eta > 0) step noise (a sampler refuses x_T= and rng= together)
    seeds = rng.integers(0, 2**63 - 1, size=(n + batch_size - 1) // batch_size)
    for bi, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        kw = dict(method=method, num_steps=steps, eta=eta, rng=np.random.default_rng(int(seeds[bi])),
                  progress=progress, prediction_type=prediction_type, dtype=np.float32)
        bshape = (b,) + tuple(shape[1:])
        want = trajectory_rows if start == 0 else 0
        n_steps = steps if steps is not None else (schedule.num_timesteps if method == "ddpm"
                                                   else min(50, schedule.num_timesteps))
        keep = set(np.round(np.linspace(0, n_steps - 1, trajectory_frames)).astype(int).tolist()) if want else ()
        x = None
        for i, st in enumerate(sample_progressive(model, schedule, bshape, **kw)):
            x = st["x_t"]
            if i in keep:  # only the frames shown are kept in memory
                frames.append(st["x0_pred"][:want].copy())
                frame_ts.append(st["t"])
        outs.append(np.clip(x, -1.0, 1.0))
    return np.concatenate(outs), frames, frame_ts


# ------------------------------------------------------------------------------ commands
def _cmd_train(args) -> int:
    from difnumpy.train import CHECKPOINT_FILE, TrainConfig, config_from_checkpoint, load_run_config, train

    given = {k: v for k, v in vars(args).items() if v is not None and k in
             {f for f in TrainConfig.__dataclass_fields__}}
    given["out_dir"] = args.out
    given.pop("resume", None)
    if args.resume:
        # the run's own values, never the defaults: config.json's, then the checkpoint's (which win; a
        # config.json that contradicts the checkpoint is refused by train), then the arguments given
        try:
            base = load_run_config(args.out)
        except FileNotFoundError:
            base = {}
        except ValueError as exc:
            raise CLIError(str(exc), EXIT_RUNTIME) from None
        base = {k: v for k, v in base.items() if k not in ("image_shape", "difnumpy_version")}
        ckpt = os.path.join(args.out, CHECKPOINT_FILE)
        if os.path.isfile(ckpt):
            try:
                base.update(config_from_checkpoint(ckpt, strict=False))
            except (ValueError, OSError) as exc:
                raise CLIError(f"cannot resume from {ckpt!r}: {' '.join(str(exc).split())}", EXIT_RUNTIME) from None
        base.update(given)
        given = base
        given["resume"] = True
    given["overwrite"] = bool(args.overwrite)
    given["progress"] = not args.no_progress
    if "channel_mults" in given:
        given["channel_mults"] = tuple(given["channel_mults"])
    try:
        config = TrainConfig.from_dict(given).validate()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    _prepare_out_dir(config.out_dir)
    result = train(config)
    print(f"{result['status']}: step {result['step']} ({result['steps_this_call']} this run, "
          f"{result['elapsed_s']:.1f} s, {result['images_per_s'] or 0:.0f} images/s), "
          f"last loss {result['last_loss'] if result['last_loss'] is None else round(result['last_loss'], 5)}; "
          f"checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        print("interrupted: checkpoint saved; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _cmd_sample(args) -> int:
    from difnumpy import viz

    model, schedule, md, used = _load_for_sampling(args.checkpoint, args.weights, args.backend)
    pred, image_shape = md["prediction_type"], md["image_shape"]
    _check_sampling_args(schedule, args.method, args.steps, args.eta, args.n)
    out = _prepare_out_dir(args.out)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    samples, frames, frame_ts = _generate(
        model, schedule, (args.n,) + image_shape, method=args.method, steps=args.steps, eta=args.eta, rng=rng,
        prediction_type=pred, batch_size=args.batch_size, trajectory_rows=min(8, args.n) if args.trajectory else 0,
        progress=not args.no_progress)
    dt = time.perf_counter() - t0
    T = schedule.num_timesteps
    n_steps = args.steps or (T if args.method == "ddpm" else min(50, T))
    written = [_atomic_save_npy(os.path.join(out, "samples.npy"), samples.astype(np.float32)),
               viz.image_grid(samples[:256], os.path.join(out, "samples.png"),
                              title=f"{args.method.upper()}, {n_steps} steps"
                                    + (f", eta={args.eta:g}" if args.method == "ddim" else ""))]
    if args.trajectory:
        written.append(viz.trajectory_strip(frames, frame_ts, os.path.join(out, "trajectory.png"),
                                            title="predicted x0 along the reverse process"))
    print(f"{args.n} samples ({used} weights) in {dt:.1f} s; wrote " + ", ".join(written))
    return EXIT_OK


def _format_table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v) + "]"
    return str(v)


def _evaluate(model, schedule, pred, samples, rng, bpd_timesteps: int, batch_size: int):
    from difnumpy import metrics
    from difnumpy.data import load_digits

    res = metrics.evaluate_samples(samples, rng)
    if bpd_timesteps > 0 and model is not None:
        x_test = load_digits("test").astype(model.dtype if hasattr(model, "dtype") else np.float32)
        bpd = metrics.bits_per_dim(model, schedule, x_test, rng, num_timesteps_subsample=bpd_timesteps,
                                   prediction_type=pred, bin_width=2.0 / 16.0, batch_size=batch_size)
        res.update({f"test_{k}": v for k, v in bpd.items()})
    return res


def _read_samples(path: str) -> np.ndarray:
    """The samples array of a .npy file, or of a .npz holding one array or a ``samples`` array."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"cannot read --samples {path!r}: {' '.join(str(exc).split())}", EXIT_RUNTIME) from None
    if hasattr(loaded, "files"):  # an .npz archive
        with loaded as z:
            names = list(z.files)
            if "samples" in names:
                key = "samples"
            elif len(names) == 1:
                key = names[0]
            else:
                raise CLIError(f"--samples {path!r} holds {len(names)} arrays {names[:6]}; expected one array "
                               f"or one named 'samples'", EXIT_RUNTIME)
            try:
                loaded = z[key]
            except Exception as exc:  # pickled object arrays (refused), a damaged member, ...
                raise CLIError(f"cannot read --samples {path!r} array {key!r}: {' '.join(str(exc).split())}",
                               EXIT_RUNTIME) from None
    if not isinstance(loaded, np.ndarray) or loaded.dtype.kind not in "fiu":
        raise CLIError(f"--samples {path!r} must hold a numeric array, got {getattr(loaded, 'dtype', type(loaded))}",
                       EXIT_RUNTIME)
    return loaded


def _cmd_evaluate(args) -> int:
    model, schedule, md, used = _load_for_sampling(args.checkpoint, args.weights, args.backend)
    pred, image_shape = md["prediction_type"], md["image_shape"]
    if image_shape != (1, 8, 8):
        raise CLIError(f"evaluate scores 8x8 digits models only; this checkpoint makes {image_shape} images")
    if md["data"] is None:
        raise CLIError(f"--checkpoint {args.checkpoint!r} does not say what it was trained on (no data source in "
                       f"it or in a config.json beside it); evaluate scores 8x8 digits models only", EXIT_RUNTIME)
    if md["data"] != "digits":
        raise CLIError(f"evaluate scores 8x8 digits models only; this checkpoint was trained on {md['data']!r}")
    _check_sampling_args(schedule, args.method, args.steps, args.eta, args.n)
    json_path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "evaluate.json")
    _prepare_out_dir(os.path.dirname(os.path.abspath(json_path)), "--json")
    rng = np.random.default_rng(args.seed)
    if args.samples:
        samples = _read_samples(args.samples)
        if samples.ndim != 4 or samples.shape[1:] != (1, 8, 8) or samples.shape[0] < 2:
            raise CLIError(f"--samples must hold an (N >= 2, 1, 8, 8) array, got {samples.shape}")
        method_info = {"samples_file": os.path.abspath(args.samples)}
    else:
        t0 = time.perf_counter()
        samples, _, _ = _generate(model, schedule, (args.n,) + image_shape, method=args.method, steps=args.steps,
                                  eta=args.eta, rng=rng, prediction_type=pred, batch_size=args.batch_size,
                                  progress=not args.no_progress)
        method_info = {"method": args.method, "num_steps": args.steps, "eta": args.eta,
                       "sampling_s": round(time.perf_counter() - t0, 3)}
    try:
        res = _evaluate(model, schedule, pred, samples, rng, args.bpd_timesteps, args.batch_size)
    except ValueError as exc:
        raise CLIError(f"evaluation failed: {exc}", EXIT_RUNTIME) from None
    res.update(method_info, checkpoint=os.path.abspath(args.checkpoint), seed=args.seed, weights=used)
    _atomic_save_json(json_path, res)
    print(_format_table([(k, _fmt(v)) for k, v in res.items()]))
    print(f"wrote {json_path}")
    return EXIT_OK


def _cmd_demo(args) -> int:
    from difnumpy import viz
    from difnumpy.data import load_digits
    from difnumpy.schedules import Schedule
    from difnumpy.train import TrainConfig, train

    out = _prepare_out_dir(args.out)
    if os.path.exists(os.path.join(out, "checkpoint.npz")) and not args.overwrite:
        raise CLIError(f"--out {out!r} already holds a run (checkpoint.npz); use --overwrite or another --out")
    if args.n_ddpm > args.n_eval:
        raise CLIError(f"--n-ddpm ({args.n_ddpm}) must not exceed --n-eval ({args.n_eval})")
    if args.ddim_steps > args.timesteps:
        raise CLIError(f"--ddim-steps {args.ddim_steps} exceeds --timesteps {args.timesteps}")
    config = TrainConfig(out_dir=out, steps=args.steps, max_minutes=args.minutes, seed=args.seed,
                         ema_decay=args.ema_decay,
                         num_timesteps=args.timesteps, schedule=args.schedule, base_channels=args.base_channels,
                         batch_size=args.batch_size, lr=args.lr, backend=args.backend, overwrite=args.overwrite,
                         checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    try:
        config.validate()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    cap = "" if args.steps >= DEMO_STEPS_CAP else f", at most {args.steps} steps"
    log(f"[1/5] training on 8x8 digits for a budget of {args.minutes:g} min{cap} ...")
    result = train(config)
    if result["status"] == "interrupted":
        print("interrupted: checkpoint saved in " + out, file=sys.stderr)
        return EXIT_INTERRUPTED
    trainer = result["trainer"]
    used = choose_weights(trainer.ema.decay, trainer.ema.num_updates, "auto")
    model = trainer.ema_model if used == "ema" else trainer.model
    schedule, pred = trainer.schedule, trainer.prediction_type
    log(f"      {result['status']}: {result['step']} steps in {result['elapsed_s']:.0f} s, "
        f"last loss {result['last_loss']:.4f}; sampling with the {used} weights"
        if result["last_loss"] is not None else "      no steps")

    log("[2/5] figures of the forward process and the schedules ...")
    rng = np.random.default_rng([args.seed, 10])
    x_test = load_digits("test")
    viz.forward_process_strip(schedule, x_test[:6], [0, schedule.num_timesteps // 10, schedule.num_timesteps // 4,
                                                     schedule.num_timesteps // 2, schedule.num_timesteps - 1],
                              os.path.join(out, "forward_process.png"), rng)
    T = schedule.num_timesteps
    scheds = {"linear": Schedule.from_name("linear", T), "cosine": Schedule.from_name("cosine", T),
              "linear, zero terminal SNR": Schedule.from_name("linear", T, zero_terminal_snr=True)}
    viz.schedule_curves(scheds, os.path.join(out, "schedules.png"), title=f"noise schedules, T={T}")

    log(f"[3/5] sampling: DDPM {T} steps and DDIM {args.ddim_steps} steps on the same {args.n_ddpm} x_T ...")
    from difnumpy.samplers import sample, sample_progressive

    # DDPM and DDIM start from the same x_T: each sampler draws x_T first from a Generator with
    # the same seed (DDPM then keeps drawing its step noise from it)
    shape = (args.n_ddpm, 1, 8, 8)
    same_seed = [args.seed, 12]
    t0 = time.perf_counter()
    ddpm = sample(model, schedule, shape, method="ddpm", rng=np.random.default_rng(same_seed),
                  prediction_type=pred, dtype=np.float32)
    t_ddpm = time.perf_counter() - t0
    t0 = time.perf_counter()
    traj = list(sample_progressive(model, schedule, shape, method="ddim", num_steps=args.ddim_steps,
                                   rng=np.random.default_rng(same_seed), prediction_type=pred, dtype=np.float32))
    t_ddim = time.perf_counter() - t0
    ddim_first = traj[-1]["x_t"]
    rest = (sample(model, schedule, (args.n_eval - args.n_ddpm, 1, 8, 8), method="ddim",
                   num_steps=args.ddim_steps, rng=np.random.default_rng([args.seed, 13]),
                   prediction_type=pred, dtype=np.float32)
            if args.n_eval > args.n_ddpm else ddim_first[:0])
    ddim = np.clip(np.concatenate([ddim_first, rest]), -1, 1)
    ddpm = np.clip(ddpm, -1, 1)
    speedup = t_ddpm / t_ddim if t_ddim > 0 else float("inf")
    log(f"      DDPM-{T}: {t_ddpm:.1f} s, DDIM-{args.ddim_steps}: {t_ddim:.1f} s for {args.n_ddpm} samples "
        f"-> {speedup:.1f}x faster")

    log("[4/5] sample figures ...")
    viz.image_grid(ddpm[:64], os.path.join(out, "ddpm_samples.png"), title=f"DDPM, {T} steps")
    viz.image_grid(ddim[:64], os.path.join(out, "ddim_samples.png"), title=f"DDIM, {args.ddim_steps} steps, eta=0")
    viz.compare_grid({f"DDPM {T} steps": ddpm[:36], f"DDIM {args.ddim_steps} steps": ddim[:36]},
                     os.path.join(out, "ddpm_vs_ddim.png"), title="same x_T, two samplers")
    idx = np.unique(np.round(np.linspace(0, len(traj) - 1, 10)).astype(int))
    viz.trajectory_strip([traj[i]["x0_pred"][:8] for i in idx], [traj[i]["t"] for i in idx],
                         os.path.join(out, "trajectory.png"), title="DDIM: predicted x0 along the reverse process")
    _atomic_save_npy(os.path.join(out, "samples.npy"), ddim.astype(np.float32))

    log(f"[5/5] metrics on {args.n_eval} DDIM-{args.ddim_steps} samples ...")
    res = _evaluate(model, schedule, pred, ddim, np.random.default_rng([args.seed, 11]), args.bpd_timesteps,
                    256)
    res.update({
        "method": "ddim", "num_steps": args.ddim_steps, "eta": 0.0,
        "train_steps": result["step"], "train_status": result["status"],
        "train_seconds": round(result["elapsed_s"], 1), "final_loss": result["last_loss"],
        "ddpm_seconds": round(t_ddpm, 3), "ddim_seconds": round(t_ddim, 3),
        "timed_samples": args.n_ddpm, "ddim_speedup": round(speedup, 2),
        "seed": args.seed, "num_timesteps": T, "weights": used, "ema_decay": trainer.ema.decay,
    })
    res["goal_fd_within_2x_floor"] = bool(res["fd"] <= 2.0 * res["fd_floor"])
    res["goal_confident_90"] = bool(res["confident_fraction"] >= 0.9)
    res["goal_classes_5_to_15"] = bool(0.05 <= res["class_fraction_min"] and res["class_fraction_max"] <= 0.15)
    _atomic_save_json(os.path.join(out, "metrics.json"), res)
    shown = ["fd", "fd_floor", "fd_noise", "fd_ratio", "confident_fraction", "mean_confidence",
             "class_histogram", "test_bpd", "ddpm_seconds", "ddim_seconds", "ddim_speedup",
             "goal_fd_within_2x_floor", "goal_confident_90", "goal_classes_5_to_15"]
    print(_format_table([(k, _fmt(res[k])) for k in shown if k in res]))
    print(f"DDIM-{args.ddim_steps} is {speedup:.1f}x faster than DDPM-{T} (wall clock, {args.n_ddpm} samples)")
    print(f"wrote the demo to {out}")
    return EXIT_OK


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from difnumpy.kernels import BACKENDS
    from difnumpy.schedules import SCHEDULE_NAMES
    from difnumpy.train import TrainConfig

    d = TrainConfig()
    p = _Parser(prog="difnumpy", description="Denoising diffusion models (DDPM, DDIM) in NumPy.")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,evaluate,demo}", parser_class=_Parser)

    t = sub.add_parser("train", help="train a U-Net on digits or an IDX image file",
                       description="Train the U-Net with the DDPM loss; see difnumpy.train.")
    t.add_argument("--out", default=d.out_dir, help=f"run directory (default {d.out_dir})")
    t.add_argument("--data", help="'digits' (default) or the path of an MNIST-style IDX image file")
    t.add_argument("--steps", type=_positive_int, help=f"total updates (default {d.steps})")
    t.add_argument("--batch-size", dest="batch_size", type=_positive_int, help=f"default {d.batch_size}")
    t.add_argument("--lr", type=_positive_float, help=f"default {d.lr:g}")
    t.add_argument("--ema-decay", dest="ema_decay", type=_unit_float, help=f"default {d.ema_decay}")
    t.add_argument("--warmup-steps", dest="warmup_steps", type=_nonneg_int, help=f"default {d.warmup_steps}")
    t.add_argument("--schedule", choices=SCHEDULE_NAMES, help=f"default {d.schedule}")
    t.add_argument("--timesteps", dest="num_timesteps", type=_positive_int, help=f"T (default {d.num_timesteps})")
    t.add_argument("--prediction-type", dest="prediction_type", choices=PREDICTION_TYPES)
    t.add_argument("--base-channels", dest="base_channels", type=_positive_int, help=f"default {d.base_channels}")
    t.add_argument("--channel-mults", dest="channel_mults", type=_int_list, help="e.g. 1,2 (default)")
    t.add_argument("--groups", type=_positive_int, help=f"GroupNorm groups (default {d.groups})")
    t.add_argument("--seed", type=_nonneg_int, help=f"default {d.seed}")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=_positive_int,
                   help=f"default {d.checkpoint_every}")
    t.add_argument("--log-every", dest="log_every", type=_positive_int, help=f"default {d.log_every}")
    t.add_argument("--minutes", dest="max_minutes", type=_positive_float, help="wall-clock budget")
    t.add_argument("--backend", choices=BACKENDS, help=f"kernel backend (default {d.backend})")
    t.add_argument("--device", dest="backend", choices=("cpu", "cuda"), help="same as --backend, cpu or cuda")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    def sampling_args(q, n_default, method_default, steps_help):
        q.add_argument("--checkpoint", required=True, help="a checkpoint.npz written by difnumpy train")
        q.add_argument("--method", choices=("ddpm", "ddim"), default=method_default,
                       help=f"sampler (default {method_default})")
        q.add_argument("--steps", type=_positive_int, default=None, help=steps_help)
        q.add_argument("--eta", type=_unit_float, default=0.0, help="DDIM eta in [0, 1] (default 0)")
        q.add_argument("-n", dest="n", type=int, default=n_default, help=f"number of samples (default {n_default})")
        q.add_argument("--seed", type=_nonneg_int, default=0, help="default 0")
        q.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=256,
                       help="images per model call (default 256)")
        q.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                       help="EMA or raw weights; auto (default): EMA once the initial weights' share in it, "
                            "decay**updates, is below 1%%")
        q.add_argument("--backend", choices=BACKENDS, default=None, help="kernel backend (default: stored)")
        q.add_argument("--device", dest="backend", choices=("cpu", "cuda"), help="same as --backend, cpu or cuda")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="draw samples from a checkpoint",
                       description="Write OUT/samples.npy (N, C, H, W) in [-1, 1] and OUT/samples.png.")
    sampling_args(s, 64, "ddim", "sampling steps (default: T for ddpm, 50 for ddim)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--trajectory", action="store_true", help="also write OUT/trajectory.png")

    e = sub.add_parser("evaluate", help="score a checkpoint's samples (Frechet distance, confidence, bits/dim)",
                       description="Print the metrics of difnumpy.metrics as a table and write them as JSON.")
    sampling_args(e, 500, "ddim", "sampling steps (default: T for ddpm, 50 for ddim)")
    e.add_argument("--samples", help="score this .npy of samples instead of sampling")
    e.add_argument("--bpd-timesteps", dest="bpd_timesteps", type=_nonneg_int, default=100,
                   help="timesteps for the bits/dim estimate on the test split (0: skip; default 100)")
    e.add_argument("--json", help="output JSON (default: evaluate.json beside the checkpoint)")

    m = sub.add_parser("demo", help="train on digits, sample with DDPM and DDIM, score, write figures",
                       description="The main command: everything in one directory in about 10 minutes on 2 cores.")
    m.add_argument("--out", default="difnumpy_demo", help="output directory (default difnumpy_demo)")
    # the training defaults are TrainConfig's (measured best, README); the demo adds only its budget
    m.add_argument("--minutes", type=_positive_float, default=8.5,
                   help="training budget in minutes (default 8.5); sampling and scoring add about 1")
    m.add_argument("--steps", type=_positive_int, default=DEMO_STEPS_CAP,
                   help=f"training steps cap (default {DEMO_STEPS_CAP}: the time budget decides)")
    m.add_argument("--seed", type=_nonneg_int, default=d.seed)
    m.add_argument("--timesteps", type=_positive_int, default=d.num_timesteps, help=f"T (default {d.num_timesteps})")
    m.add_argument("--schedule", choices=SCHEDULE_NAMES, default=d.schedule, help=f"default {d.schedule}")
    m.add_argument("--base-channels", dest="base_channels", type=_positive_int, default=d.base_channels)
    m.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=d.batch_size,
                   help=f"default {d.batch_size}")
    m.add_argument("--lr", type=_positive_float, default=d.lr, help=f"default {d.lr:g}")
    m.add_argument("--ema-decay", dest="ema_decay", type=_unit_float, default=d.ema_decay,
                   help=f"EMA decay (default {d.ema_decay})")
    m.add_argument("--checkpoint-every", dest="checkpoint_every", type=_positive_int, default=d.checkpoint_every)
    m.add_argument("--ddim-steps", dest="ddim_steps", type=_positive_int, default=50)
    m.add_argument("--n-eval", dest="n_eval", type=_positive_int, default=500, help="DDIM samples scored")
    m.add_argument("--n-ddpm", dest="n_ddpm", type=_positive_int, default=64, help="DDPM samples (timed)")
    m.add_argument("--bpd-timesteps", dest="bpd_timesteps", type=_nonneg_int, default=100)
    m.add_argument("--backend", choices=BACKENDS, default=d.backend)
    m.add_argument("--device", dest="backend", choices=("cpu", "cuda"), help="same as --backend, cpu or cuda")
    m.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--quiet", action="store_true", help="only the final table")
    return p


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "evaluate": _cmd_evaluate, "demo": _cmd_demo}


def main(argv=None) -> int:
    """Entry point of the ``difnumpy`` console script; returns the exit status."""
    debug = os.environ.get("DIFNUMPY_DEBUG") == "1"
    prog = "difnumpy"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        prog = f"difnumpy {args.command}"
        return _COMMANDS[args.command](args)
    except CLIError as exc:
        msg = str(exc)
        print(msg if msg.startswith("difnumpy") else f"{prog}: error: {msg}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback
        if debug:
            raise
        from difnumpy.trainer import DivergenceError

        if isinstance(exc, DivergenceError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_DIVERGED
        kind = "" if isinstance(exc, (ValueError, TypeError, OSError)) else f"{type(exc).__name__}: "
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {kind}{text}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
