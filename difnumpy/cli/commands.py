"""The commands ``difnumpy train | sample | evaluate | inpaint`` (the demo is in :mod:`.demo`)."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from difnumpy.cli._common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, MASK_NAMES, CLIError, check_guidance_args,
                                  check_sampling_args, class_scores, evaluate, fmt, format_table, generate,
                                  load_for_sampling, named_mask, prepare_out_dir, resolve_class_labels, save_json,
                                  save_npy)
from difnumpy._validation import SampleGenerators
from difnumpy.data import load_digits
from difnumpy.distributed import SINGLE, shard
from difnumpy.samplers import inpaint
from difnumpy.train import CHECKPOINT_FILE, TrainConfig, config_from_checkpoint, load_run_config, train


# ------------------------------------------------------------------------------ train
def cmd_train(args, world=SINGLE) -> int:
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
    if args.label_dropout is not None and not given.get("conditional", False):
        raise CLIError("--label-dropout applies to conditional runs only (add --conditional)")
    try:
        config = TrainConfig.from_dict(given).validate()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    if world.is_root:
        prepare_out_dir(config.out_dir)
    result = train(config, world=world)
    if not world.is_root:
        return EXIT_INTERRUPTED if result["status"] == "interrupted" else EXIT_OK
    print(f"{result['status']}: step {result['step']} ({result['steps_this_call']} this run, "
          f"{result['elapsed_s']:.1f} s, {result['images_per_s'] or 0:.0f} images/s), "
          f"last loss {result['last_loss'] if result['last_loss'] is None else round(result['last_loss'], 5)}; "
          f"checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        print("interrupted: checkpoint saved; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


# ------------------------------------------------------------------------------ sample
def cmd_sample(args, world=SINGLE) -> int:
    from difnumpy import viz  # matplotlib: only for the commands that draw

    model, schedule, md, used = load_for_sampling(args.checkpoint, args.weights, args.backend)
    pred, image_shape = md["prediction_type"], md["image_shape"]
    check_sampling_args(schedule, args.method, args.steps, args.eta, args.n, args.karras)
    labels = resolve_class_labels(args.class_labels, args.n, md["num_classes"], args.checkpoint)
    w, phi = check_guidance_args(labels, args.guidance_scale, args.guidance_rescale)
    out = prepare_out_dir(args.out) if world.is_root else args.out
    world.end_setup()
    t0 = time.perf_counter()
    samples, frames, frame_ts = generate(
        model, schedule, (args.n,) + image_shape, method=args.method, steps=args.steps, eta=args.eta, seed=args.seed,
        prediction_type=pred, batch_size=args.batch_size, class_labels=labels, guidance_scale=w,
        guidance_rescale=phi, karras=args.karras,
        trajectory_rows=min(8, args.n) if args.trajectory else 0, progress=not args.no_progress, world=world)
    dt = time.perf_counter() - t0
    if not world.is_root:
        return EXIT_OK
    T = schedule.num_timesteps
    n_steps = args.steps or (T if args.method == "ddpm" else min(50, T))
    title = (f"{args.method.upper()}, {n_steps} steps" + (f", eta={args.eta:g}" if args.method == "ddim" else "")
             + (", Karras sigmas" if args.karras else "") + (f", w={w:g}" if labels is not None else ""))
    written = [save_npy(os.path.join(out, "samples.npy"), samples.astype(np.float32))]
    if labels is not None:
        written.append(save_npy(os.path.join(out, "labels.npy"), labels.astype(np.int64)))
        K = md["num_classes"]
        # one row per class when the labels cycle through the classes ("all"), else a plain grid
        nrow = K if args.class_labels == "all" and args.n >= K else None
        written.append(viz.image_grid(samples[:256 if nrow is None else (256 // K) * K],
                                      os.path.join(out, "samples.png"), nrow=nrow, title=title))
    else:
        written.append(viz.image_grid(samples[:256], os.path.join(out, "samples.png"), title=title))
    if args.trajectory:
        written.append(viz.trajectory_strip(frames, frame_ts, os.path.join(out, "trajectory.png"),
                                            title="predicted x0 along the reverse process"))
    print(f"{args.n} samples ({used} weights) in {dt:.1f} s; wrote " + ", ".join(written))
    return EXIT_OK


# ------------------------------------------------------------------------------ evaluate
def read_samples(path: str) -> np.ndarray:
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


def cmd_evaluate(args, world=SINGLE) -> int:
    model, schedule, md, used = load_for_sampling(args.checkpoint, args.weights, args.backend)
    pred, image_shape = md["prediction_type"], md["image_shape"]
    if image_shape != (1, 8, 8):
        raise CLIError(f"evaluate scores 8x8 digits models only; this checkpoint makes {image_shape} images")
    if md["data"] is None:
        raise CLIError(f"--checkpoint {args.checkpoint!r} does not say what it was trained on (no data source in "
                       f"it or in a config.json beside it); evaluate scores 8x8 digits models only", EXIT_RUNTIME)
    if md["data"] != "digits":
        raise CLIError(f"evaluate scores 8x8 digits models only; this checkpoint was trained on {md['data']!r}")
    check_sampling_args(schedule, args.method, args.steps, args.eta, args.n, args.karras)
    json_path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "evaluate.json")
    if world.is_root:
        prepare_out_dir(os.path.dirname(os.path.abspath(json_path)), "--json")
    rng = np.random.default_rng(args.seed)
    if args.samples:
        samples = read_samples(args.samples)
        if samples.ndim != 4 or samples.shape[1:] != (1, 8, 8) or samples.shape[0] < 2:
            raise CLIError(f"--samples must hold an (N >= 2, 1, 8, 8) array, got {samples.shape}")
        method_info = {"samples_file": os.path.abspath(args.samples)}
        world.end_setup()
    else:
        world.end_setup()
        t0 = time.perf_counter()
        samples, _, _ = generate(model, schedule, (args.n,) + image_shape, method=args.method, steps=args.steps,
                                 eta=args.eta, seed=args.seed, prediction_type=pred, batch_size=args.batch_size,
                                 karras=args.karras, progress=not args.no_progress, world=world)
        method_info = {"method": args.method, "num_steps": args.steps, "eta": args.eta,
                       "use_karras_sigmas": bool(args.karras), "sampling_s": round(time.perf_counter() - t0, 3)}
    if not world.is_root:  # the metrics are computed once, on rank 0
        return EXIT_OK
    try:
        res = evaluate(model, schedule, pred, samples, rng, args.bpd_timesteps, args.batch_size)
    except ValueError as exc:
        raise CLIError(f"evaluation failed: {exc}", EXIT_RUNTIME) from None
    res.update(method_info, checkpoint=os.path.abspath(args.checkpoint), seed=args.seed, weights=used)
    save_json(json_path, res)
    print(format_table([(k, fmt(v)) for k, v in res.items()]))
    print(f"wrote {json_path}")
    return EXIT_OK


# ------------------------------------------------------------------------------ inpaint
def _load_array(path: str, flag: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r}: no such file (give a .npy file or one of the names)", EXIT_RUNTIME)
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"cannot read {flag} {path!r}: {' '.join(str(exc).split())}", EXIT_RUNTIME) from None
    if not isinstance(a, np.ndarray):  # an .npz archive
        a.close()
        raise CLIError(f"{flag} {path!r} is an .npz archive; give one array saved with np.save (.npy)")
    if a.dtype.kind not in "biuf":
        raise CLIError(f"{flag} {path!r} must hold a numeric array, got dtype {a.dtype}")
    return a


def load_images(spec: str, n: int | None, image_shape: tuple):
    """(images (n, C, H, W) float32, true labels (n,) int64 or None) of ``--images test|PATH.npy``."""
    if spec == "test":
        if tuple(image_shape) != (1, 8, 8):
            raise CLIError(f"--images test are the held-out 8x8 digits; this checkpoint makes {image_shape} images "
                           f"(give --images PATH.npy)")
        x, y = load_digits("test", return_labels=True)
    else:
        x, y = _load_array(spec, "--images"), None
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape) or x.shape[0] < 1:
            raise CLIError(f"--images {spec!r} must hold an (N, {', '.join(map(str, image_shape))}) array (the "
                           f"checkpoint's image shape), got {x.shape}")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)) or x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
            raise CLIError(f"--images {spec!r} must hold finite values in [-1, 1] (the model's data range), got "
                           f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]")
    if n is None:
        n = x.shape[0]
    if n > x.shape[0]:
        raise CLIError(f"-n {n} exceeds the {x.shape[0]} images of --images {spec}")
    return np.ascontiguousarray(x[:n], dtype=np.float32), (None if y is None else y[:n].astype(np.int64))


def load_mask(spec: str, n: int, image_shape: tuple) -> np.ndarray:
    """``--mask NAME|PATH.npy`` as an (n, 1, H, W) float32 array: 1 = known (kept), 0 = generated."""
    _, h, w = image_shape
    if spec in MASK_NAMES:
        return np.ascontiguousarray(np.broadcast_to(named_mask(spec, image_shape), (n, 1, h, w)))
    m = _load_array(spec, "--mask")
    if m.ndim == 2:
        m = m[None, None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[2:] != (h, w) or (m.shape[0] != 1 and m.shape[0] < n):
        raise CLIError(f"--mask {spec!r} must have shape ({h}, {w}), (1, 1, {h}, {w}) or (N >= {n}, 1, {h}, {w}), "
                       f"got {m.shape}")
    m = m[:n] if m.shape[0] != 1 else m
    if not np.all((m == 0) | (m == 1)):
        raise CLIError(f"--mask {spec!r} must hold only 0 (to generate) and 1 (known)")
    return np.ascontiguousarray(np.broadcast_to(m.astype(np.float32), (n, 1, h, w)))


def run_inpaint(model, schedule, x_known, mask, *, steps, jump_length, jump_n_sample, eta, seed, prediction_type,
                batch_size, class_labels=None, guidance_scale=1.0, reconstruction_guidance=0.0, progress=False,
                world=SINGLE):
    """RePaint over batches of ``batch_size``, sharded over the MPI ranks; the result on rank 0 (None elsewhere).

    Image i's noise comes from ``(seed, i)`` (:class:`difnumpy._validation.SampleGenerators`): the same
    bits for any batch size and any number of ranks.
    """
    a, b = shard(x_known.shape[0], world)
    outs = [np.zeros((0,) + x_known.shape[1:], np.float32)]
    for start in range(a, b, batch_size):
        sl = slice(start, min(b, start + batch_size))
        cond = {} if class_labels is None else dict(class_labels=class_labels[sl], guidance_scale=guidance_scale)
        outs.append(inpaint(model, schedule, x_known[sl], mask[sl], num_steps=steps, jump_length=jump_length,
                            jump_n_sample=jump_n_sample, eta=eta, rng=SampleGenerators(seed, range(sl.start, sl.stop)),
                            prediction_type=prediction_type, reconstruction_guidance=reconstruction_guidance,
                            progress=progress and world.is_root, **cond).astype(np.float32))
    x = world.gather_rows(np.concatenate(outs))
    if x is None:
        return None
    known = mask.astype(bool) if x.shape[1] == 1 else np.broadcast_to(mask, x.shape).astype(bool)
    if not np.array_equal(x[known], x_known[known]):  # RePaint keeps the known region exactly
        raise RuntimeError("inpainting changed the known region")
    return x


def masked_view(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The images with the region to generate shown mid-grey (0 in [-1, 1])."""
    return np.where(np.broadcast_to(mask, x.shape) == 1, x, 0.0).astype(np.float32)


def cmd_inpaint(args, world=SINGLE) -> int:
    from difnumpy import viz  # matplotlib: only for the commands that draw

    model, schedule, md, used = load_for_sampling(args.checkpoint, args.weights, args.backend)
    pred, image_shape = md["prediction_type"], md["image_shape"]
    if args.n is not None and args.n < 1:
        raise CLIError(f"-n must be >= 1, got {args.n}")
    if args.steps > schedule.num_timesteps:
        raise CLIError(f"--steps {args.steps} exceeds the model's number of diffusion timesteps "
                       f"T={schedule.num_timesteps}")
    x, true_labels = load_images(args.images, args.n, image_shape)
    n = x.shape[0]
    mask = load_mask(args.mask, n, image_shape)
    labels = resolve_class_labels(args.class_labels, n, md["num_classes"], args.checkpoint)
    w, _ = check_guidance_args(labels, args.guidance_scale, None)
    out = prepare_out_dir(args.out) if world.is_root else args.out
    world.end_setup()
    t0 = time.perf_counter()
    done = run_inpaint(model, schedule, x, mask, steps=args.steps, jump_length=args.jump_length,
                       jump_n_sample=args.jump_n_sample, eta=args.eta, seed=args.seed,
                       reconstruction_guidance=args.reconstruction_guidance,
                       prediction_type=pred, batch_size=args.batch_size, class_labels=labels, guidance_scale=w,
                       progress=not args.no_progress, world=world)
    dt = time.perf_counter() - t0
    if not world.is_root:
        return EXIT_OK
    written = [save_npy(os.path.join(out, "inpainted.npy"), done.astype(np.float32)),
               save_npy(os.path.join(out, "originals.npy"), x),
               save_npy(os.path.join(out, "mask.npy"), mask)]
    if true_labels is not None:
        written.append(save_npy(os.path.join(out, "labels.npy"), true_labels))
    if labels is not None:
        written.append(save_npy(os.path.join(out, "class_labels.npy"), labels))
    k = min(n, 16)
    written.append(viz.labelled_rows([x[:k], masked_view(x[:k], mask[:k]), done[:k]],
                                     ["original", "masked", "completed"], os.path.join(out, "inpainting.png"),
                                     title=f"RePaint, {args.steps} steps, jumps {args.jump_length} x "
                                           f"{args.jump_n_sample}, reconstruction guidance "
                                           f"{args.reconstruction_guidance:g}, --mask {os.path.basename(args.mask)}"))
    msg = f"{n} images inpainted ({used} weights) in {dt:.1f} s; the known region is exact"
    if true_labels is not None:
        agree = class_scores(done, true_labels)["accuracy"]
        msg += f"; the digit classifier names the true digit for {100 * agree:.1f} % of the completions"
    print(msg + "; wrote " + ", ".join(written))
    return EXIT_OK
