"""``difnumpy demo``: train on the digits, sample, score and draw, in about 10 minutes on 2 cores.

The plain demo (DDPM and DDIM) and ``--conditional`` (class labels, classifier-free guidance and
RePaint inpainting), both writing everything into one directory.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from difnumpy.cli._common import (DEMO_STEPS_CAP, EXIT_INTERRUPTED, EXIT_OK, INPAINT_JUMP_LENGTH, INPAINT_JUMP_N_SAMPLE,
                                  INPAINT_RECONSTRUCTION_GUIDANCE,
                                  INPAINT_STEPS, CLIError, choose_weights, class_scores,
                                  evaluate, fmt, format_table, named_mask, prepare_out_dir, save_json, save_npy)
from difnumpy.cli.commands import masked_view, run_inpaint
from difnumpy.distributed import SINGLE
from difnumpy.data import DIGITS_NUM_CLASSES, load_digits
from difnumpy.metrics import evaluate_samples
from difnumpy.nn.unet import UNet
from difnumpy.samplers import repaint_timesteps, sample, sample_progressive
from difnumpy.schedules import Schedule
from difnumpy.train import TrainConfig, train

#: Training budget of the plain demo, in minutes (sampling and scoring add about 1).
DEMO_MINUTES = 8.5
#: ``demo --conditional``: the whole run's budget in minutes; the training gets what the sampling and scoring,
#: predicted from a timed forward pass on this machine, leave of it (at most :data:`DEMO_MINUTES`).
COND_TOTAL_MINUTES = 10.0
#: Minutes kept for what the prediction leaves out: the classifier, the scores, the figures, the checkpoints.
COND_MARGIN_MINUTES = 0.5
#: Its label dropout, guidance scale, the guidance scales of the sweep, and RePaint's settings. Measured:
#: README, "Conditional generation".
COND_LABEL_DROPOUT = 0.3
COND_GUIDANCE_SCALE = 2.0
COND_SWEEP = (0.0, 1.0, 2.0, 4.0, 8.0)
COND_N_INPAINT = 360
COND_INPAINT_STEPS, COND_JUMP_LENGTH, COND_JUMP_N_SAMPLE = INPAINT_STEPS, INPAINT_JUMP_LENGTH, INPAINT_JUMP_N_SAMPLE
COND_RECONSTRUCTION_GUIDANCE = INPAINT_RECONSTRUCTION_GUIDANCE
#: Cost of a reconstruction-guided network call (forward and backward) in forward passes (measured: ~3.2).
_GUIDED_CALL_COST = 3.2
#: The figures' sizes: samples per class in class_grid.png, columns of guidance_sweep.png.
_GRID_COLS, _SWEEP_COLS = 10, 20

#: Flags of ``demo --conditional`` only (None when not given).
CONDITIONAL_ONLY = ("label_dropout", "guidance_scale", "n_inpaint", "inpaint_steps", "jump_length", "jump_n_sample",
                    "reconstruction_guidance")


def _train(args, conditional: bool, log):
    """Validate, train for the budget; returns (result, model, schedule, prediction type, weights used)."""
    out = prepare_out_dir(args.out)
    if os.path.exists(os.path.join(out, "checkpoint.npz")) and not args.overwrite:
        raise CLIError(f"--out {out!r} already holds a run (checkpoint.npz); use --overwrite or another --out")
    if args.ddim_steps > args.timesteps:
        raise CLIError(f"--ddim-steps {args.ddim_steps} exceeds --timesteps {args.timesteps}")
    extra = {"conditional": True, "label_dropout": args.label_dropout} if conditional else {}
    config = TrainConfig(out_dir=out, steps=args.steps, max_minutes=args.minutes, seed=args.seed,
                         ema_decay=args.ema_decay,
                         num_timesteps=args.timesteps, schedule=args.schedule, base_channels=args.base_channels,
                         batch_size=args.batch_size, lr=args.lr, backend=args.backend, overwrite=args.overwrite,
                         checkpoint_every=args.checkpoint_every, progress=not args.no_progress, **extra)
    try:
        config.validate()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    cap = "" if args.steps >= DEMO_STEPS_CAP else f", at most {args.steps} steps"
    what = (f"a class-conditional U-Net (label dropout {args.label_dropout:g})" if conditional
            else "the U-Net")
    log(f"[1/5] training {what} on 8x8 digits for a budget of {args.minutes:g} min{cap} ...")
    result = train(config)
    if result["status"] == "interrupted":
        return result, None, None, None, None
    trainer = result["trainer"]
    used = choose_weights(trainer.ema.decay, trainer.ema.num_updates, "auto")
    model = trainer.ema_model if used == "ema" else trainer.model
    log(f"      {result['status']}: {result['step']} steps in {result['elapsed_s']:.0f} s, "
        f"last loss {result['last_loss']:.4f}; sampling with the {used} weights"
        if result["last_loss"] is not None else "      no steps")
    return result, model, trainer.schedule, trainer.prediction_type, used


def _train_info(result, used, trainer) -> dict:
    return {"train_steps": result["step"], "train_status": result["status"],
            "train_seconds": round(result["elapsed_s"], 1), "final_loss": result["last_loss"],
            "weights": used, "ema_decay": trainer.ema.decay}


def cmd_demo(args, world=SINGLE) -> int:
    """The plain demo, or the conditional one with ``--conditional`` (one process: not under mpiexec -n N > 1)."""
    if world.size > 1:
        raise CLIError(f"demo runs in one process (started here as {world.size} MPI ranks); run 'difnumpy demo' "
                       f"without mpiexec, or use mpiexec with train, sample, evaluate or inpaint")
    given = [k for k in CONDITIONAL_ONLY if getattr(args, k) is not None]
    if args.conditional:
        return _cmd_demo_conditional(args)
    if given:
        raise CLIError(f"--{given[0].replace('_', '-')} applies to 'difnumpy demo --conditional' only")
    if args.minutes is None:
        args.minutes = DEMO_MINUTES
    return _cmd_demo_plain(args)


def _cmd_demo_plain(args) -> int:
    from difnumpy import viz  # matplotlib: only for the commands that draw

    if args.n_ddpm > args.n_eval:
        raise CLIError(f"--n-ddpm ({args.n_ddpm}) must not exceed --n-eval ({args.n_eval})")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    result, model, schedule, pred, used = _train(args, False, log)
    out = args.out
    if model is None:
        print("interrupted: checkpoint saved in " + out, file=sys.stderr)
        return EXIT_INTERRUPTED

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
    save_npy(os.path.join(out, "samples.npy"), ddim.astype(np.float32))

    log(f"[5/5] metrics on {args.n_eval} DDIM-{args.ddim_steps} samples ...")
    res = evaluate(model, schedule, pred, ddim, np.random.default_rng([args.seed, 11]), args.bpd_timesteps, 256)
    res.update({
        "method": "ddim", "num_steps": args.ddim_steps, "eta": 0.0,
        "ddpm_seconds": round(t_ddpm, 3), "ddim_seconds": round(t_ddim, 3),
        "timed_samples": args.n_ddpm, "ddim_speedup": round(speedup, 2),
        "seed": args.seed, "num_timesteps": T, **_train_info(result, used, result["trainer"]),
    })
    res["goal_fd_within_2x_floor"] = bool(res["fd"] <= 2.0 * res["fd_floor"])
    res["goal_confident_90"] = bool(res["confident_fraction"] >= 0.9)
    res["goal_classes_5_to_15"] = bool(0.05 <= res["class_fraction_min"] and res["class_fraction_max"] <= 0.15)
    save_json(os.path.join(out, "metrics.json"), res)
    shown = ["fd", "fd_floor", "fd_noise", "fd_ratio", "confident_fraction", "mean_confidence",
             "class_histogram", "test_bpd", "ddpm_seconds", "ddim_seconds", "ddim_speedup",
             "goal_fd_within_2x_floor", "goal_confident_90", "goal_classes_5_to_15"]
    print(format_table([(k, fmt(res[k])) for k in shown if k in res]))
    print(f"DDIM-{args.ddim_steps} is {speedup:.1f}x faster than DDPM-{T} (wall clock, {args.n_ddpm} samples)")
    print(f"wrote the demo to {out}")
    return EXIT_OK


def _guided_set(model, schedule, pred, n, w, *, steps, seed, batch_size=250):
    """``n`` DDIM samples, classes cycling 0..9, at guidance scale ``w``; the same x_T for every ``w``."""
    labels = np.resize(np.arange(DIGITS_NUM_CLASSES, dtype=np.int64), n)
    outs = []
    for i, start in enumerate(range(0, n, batch_size)):
        sl = slice(start, min(n, start + batch_size))
        outs.append(sample(model, schedule, (sl.stop - start, 1, 8, 8), method="ddim", num_steps=steps,
                           rng=np.random.default_rng([seed, 20, i]), prediction_type=pred, dtype=np.float32,
                           class_labels=labels[sl], guidance_scale=w))
    return np.clip(np.concatenate(outs), -1.0, 1.0), labels


def _scores(x, labels, seed) -> dict:
    """Accuracy per requested class and the FD against its floor (the same floor subsets for every set)."""
    fd = evaluate_samples(x, np.random.default_rng([seed, 21]))
    cs = class_scores(x, labels)
    keep = ("fd", "fd_floor", "fd_floor_std", "fd_noise", "fd_ratio", "class_histogram")
    return {"accuracy": cs["accuracy"], "per_class_accuracy": cs["per_class_accuracy"],
            "mean_class_probability": cs["mean_confidence"], **{k: fd[k] for k in keep}}


def _network_images(args, scales) -> int:
    """Images that go through the network after training: the sweep (2 per image where w != 1) and RePaint."""
    sweep = sum(args.n_eval * args.ddim_steps * (1 if w == 1.0 else 2) for w in scales)
    ts = repaint_timesteps(args.timesteps, args.inpaint_steps, args.jump_length, args.jump_n_sample)
    calls = int(np.sum(np.diff(np.concatenate([[ts[0] + args.timesteps // args.inpaint_steps], ts])) < 0))
    return sweep + args.n_inpaint * calls * (_GUIDED_CALL_COST if args.reconstruction_guidance > 0 else 1)


def _seconds_per_image(args) -> float:
    """Seconds per image of a U-Net forward pass (batch 500, the model the demo trains) on this machine now."""
    d = TrainConfig()
    model = UNet(base_channels=args.base_channels, channel_mults=d.channel_mults, num_res_blocks=d.num_res_blocks,
                 groups=d.groups, num_classes=DIGITS_NUM_CLASSES, backend=args.backend, rng=0)
    x = np.random.default_rng(0).standard_normal((500, 1, 8, 8)).astype(np.float32)
    t, y = np.full(500, 500), np.resize(np.arange(DIGITS_NUM_CLASSES + 1), 500)
    model(x, t, class_labels=y)  # warm-up (and numba's compilation on a cold cache)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        model(x, t, class_labels=y)
        best = min(best, time.perf_counter() - t0)
    return best / 500


def _cmd_demo_conditional(args) -> int:
    from difnumpy import viz  # matplotlib: only for the commands that draw

    t_all = time.perf_counter()
    for k, v in (("label_dropout", COND_LABEL_DROPOUT),
                 ("guidance_scale", COND_GUIDANCE_SCALE), ("n_inpaint", COND_N_INPAINT),
                 ("inpaint_steps", COND_INPAINT_STEPS), ("jump_length", COND_JUMP_LENGTH),
                 ("jump_n_sample", COND_JUMP_N_SAMPLE), ("reconstruction_guidance", COND_RECONSTRUCTION_GUIDANCE)):
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.n_eval < DIGITS_NUM_CLASSES:
        raise CLIError(f"--n-eval {args.n_eval}: demo --conditional needs at least one sample per class (>= 10)")
    if args.n_inpaint > 360:
        raise CLIError(f"--n-inpaint {args.n_inpaint} exceeds the 360 test digits")
    if args.inpaint_steps > args.timesteps:
        raise CLIError(f"--inpaint-steps {args.inpaint_steps} exceeds --timesteps {args.timesteps}")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    w_demo = float(args.guidance_scale)
    scales = sorted(set(COND_SWEEP) | {w_demo})
    predicted_s = None
    if args.minutes is None:  # the budget is the whole run's: training gets what sampling will not need
        predicted_s = 1.15 * _network_images(args, scales) * _seconds_per_image(args)
        args.minutes = round(min(DEMO_MINUTES, max(1.0, COND_TOTAL_MINUTES - COND_MARGIN_MINUTES - predicted_s / 60
                                                   - (time.perf_counter() - t_all) / 60)), 2)
        log(f"      sampling and inpainting after the training: {predicted_s / 60:.1f} min predicted on this machine "
            f"now; the training gets {args.minutes:g} of the {COND_TOTAL_MINUTES:g} min")
    result, model, schedule, pred, used = _train(args, True, log)
    out = args.out
    if model is None:
        print("interrupted: checkpoint saved in " + out, file=sys.stderr)
        return EXIT_INTERRUPTED
    S = args.ddim_steps

    log(f"[2/5] class-guided sampling: {args.n_eval} DDIM-{S} samples (classes 0..9 in turn) at w in "
        f"{{{', '.join(f'{w:g}' for w in scales)}}}, the same x_T for each w ...")
    t0 = time.perf_counter()
    sets = {w: _guided_set(model, schedule, pred, args.n_eval, w, steps=S, seed=args.seed)[0] for w in scales}
    labels = np.resize(np.arange(DIGITS_NUM_CLASSES, dtype=np.int64), args.n_eval)
    t_sweep = time.perf_counter() - t0
    log(f"      {t_sweep:.0f} s")

    log("[3/5] scores: the digit classifier's accuracy per requested class, FD against its floor ...")
    sweep = [{"guidance_scale": w, **_scores(sets[w], labels, args.seed)} for w in scales]
    main_ = next(s for s in sweep if s["guidance_scale"] == w_demo)
    x_demo = sets[w_demo]
    save_npy(os.path.join(out, "samples.npy"), x_demo.astype(np.float32))
    save_npy(os.path.join(out, "labels.npy"), labels)

    log(f"[4/5] inpainting: {args.n_inpaint} test digits, bottom half generated (RePaint, {args.inpaint_steps} steps, "
        f"jumps {args.jump_length} x {args.jump_n_sample}, reconstruction guidance {args.reconstruction_guidance:g}, "
        f"no class label) ...")
    x_test, y_test = load_digits("test", return_labels=True)
    x_known, y_known = x_test[:args.n_inpaint], y_test[:args.n_inpaint]
    mask = np.ascontiguousarray(np.broadcast_to(named_mask("bottom", (1, 8, 8)), x_known.shape))
    t0 = time.perf_counter()
    done = run_inpaint(model, schedule, x_known, mask, steps=args.inpaint_steps, jump_length=args.jump_length,
                       jump_n_sample=args.jump_n_sample, eta=1.0, seed=(args.seed, 30),
                       reconstruction_guidance=args.reconstruction_guidance,
                       prediction_type=pred, batch_size=360)
    t_inpaint = time.perf_counter() - t0
    known = mask.astype(bool)
    known_exact = bool(np.array_equal(done[known], x_known[known]))
    inp = class_scores(done, y_known)
    orig = class_scores(x_known, y_known)
    log(f"      {t_inpaint:.0f} s")

    log("[5/5] figures ...")
    per_class = [x_demo[labels == k][:_GRID_COLS] for k in range(DIGITS_NUM_CLASSES)]
    viz.labelled_rows(per_class, [str(k) for k in range(DIGITS_NUM_CLASSES)], os.path.join(out, "class_grid.png"),
                      title=f"one row per class, DDIM-{S}, guidance scale w={w_demo:g}")
    cols = min(_SWEEP_COLS, args.n_eval)
    viz.labelled_rows([sets[w][:cols] for w in COND_SWEEP], [f"w={w:g}" for w in COND_SWEEP],
                      os.path.join(out, "guidance_sweep.png"), col_labels=[str(v) for v in labels[:cols]],
                      title="the same x_T at guidance scales w (columns: the requested class)")
    k = min(16, args.n_inpaint)
    viz.labelled_rows([x_known[:k], masked_view(x_known[:k], mask[:k]), done[:k]],
                      ["test digit", "bottom masked", "completed"], os.path.join(out, "inpainting.png"),
                      title=f"RePaint, {args.inpaint_steps} steps, jumps {args.jump_length} x {args.jump_n_sample}, "
                            f"reconstruction guidance {args.reconstruction_guidance:g}")

    total = time.perf_counter() - t_all
    res = {
        "guidance_scale": w_demo, "method": "ddim", "num_steps": S, "n_samples": args.n_eval,
        **{k: main_[k] for k in ("accuracy", "per_class_accuracy", "mean_class_probability", "fd", "fd_floor",
                                 "fd_floor_std", "fd_noise", "fd_ratio", "class_histogram")},
        "guidance_sweep": sweep,
        "inpainting": {"n": int(args.n_inpaint), "mask": "bottom", "label_agreement": inp["accuracy"],
                       "per_class_agreement": inp["per_class_accuracy"], "known_region_exact": known_exact,
                       "classifier_accuracy_on_originals": orig["accuracy"], "num_steps": args.inpaint_steps,
                       "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample, "eta": 1.0,
                       "reconstruction_guidance": args.reconstruction_guidance,
                       "class_labels": None, "seconds": round(t_inpaint, 1)},
        "label_dropout": args.label_dropout, "train_budget_minutes": args.minutes,
        "predicted_sampling_seconds": None if predicted_s is None else round(predicted_s, 1),
        "sweep_seconds": round(t_sweep, 1), "total_seconds": round(total, 1),
        "seed": args.seed, "num_timesteps": schedule.num_timesteps, **_train_info(result, used, result["trainer"]),
    }
    res["goal_accuracy_97"] = bool(res["accuracy"] >= 0.97)
    res["goal_fd_within_2x_floor"] = bool(res["fd"] <= 2.0 * res["fd_floor"])
    res["goal_inpainting_75"] = bool(inp["accuracy"] >= 0.75 and known_exact)
    save_json(os.path.join(out, "metrics.json"), res)
    rows = [(f"w={s['guidance_scale']:g}", f"accuracy {100 * s['accuracy']:.1f} %, FD {s['fd']:.2f} "
             f"({s['fd_ratio']:.2f}x floor {s['fd_floor']:.2f})") for s in sweep]
    rows += [("per-class accuracy", fmt([round(v, 3) for v in res["per_class_accuracy"]])),
             ("inpainting agreement", f"{100 * inp['accuracy']:.1f} % (classifier on the originals: "
                                      f"{100 * orig['accuracy']:.1f} %), known half exact: {known_exact}"),
             ("goal_accuracy_97", res["goal_accuracy_97"]), ("goal_fd_within_2x_floor", res["goal_fd_within_2x_floor"]),
             ("goal_inpainting_75", res["goal_inpainting_75"]),
             ("time", f"{total:.0f} s in all ({result['elapsed_s']:.0f} s training, {result['step']} steps)")]
    print(format_table(rows))
    print(f"wrote the demo to {out}")
    return EXIT_OK
