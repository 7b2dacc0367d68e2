"""Command line: ``difnumpy train | sample | evaluate | inpaint | demo`` (also ``python -m difnumpy``).

Every command validates its arguments before doing any work. Bad arguments, a missing or
corrupt checkpoint or an unwritable output directory print one line
``difnumpy <command>: error: <what is wrong>`` on stderr and exit with status 2 (usage) or
1 (runtime); a diverged training run exits with 3 and an interrupted one (Ctrl-C) with 130,
after saving its checkpoint. No traceback is ever printed (``DIFNUMPY_DEBUG=1`` re-raises
for debugging). Results are computed in memory first and every file is written atomically
(temporary file + ``os.replace``), so existing results are never left half-overwritten.

The package: :mod:`._common` (errors, argument types, loading, batched sampling, masks, scores),
:mod:`.commands` (train, sample, evaluate, inpaint), :mod:`.demo` (the plain and the conditional demo);
this module holds the parser and :func:`main`.
"""
from __future__ import annotations

import argparse
import os
import sys

from difnumpy._validation import PREDICTION_TYPES
from difnumpy.cli._common import (DEMO_STEPS_CAP, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE,
                                  KARRAS_METHODS, MASK_NAMES, CLIError, Parser, choose_weights, class_labels_arg,
                                  int_list, nonneg_float, nonneg_int, positive_float, positive_int, unit_float)
from difnumpy.cli._common import INPAINT_JUMP_LENGTH, INPAINT_JUMP_N_SAMPLE, INPAINT_RECONSTRUCTION_GUIDANCE, INPAINT_STEPS
from difnumpy.cli.commands import cmd_evaluate, cmd_inpaint, cmd_sample, cmd_train
from difnumpy.cli.demo import (COND_GUIDANCE_SCALE, COND_JUMP_LENGTH, COND_JUMP_N_SAMPLE, COND_LABEL_DROPOUT,
                               COND_RECONSTRUCTION_GUIDANCE,
                               COND_N_INPAINT, COND_INPAINT_STEPS, COND_TOTAL_MINUTES, DEMO_MINUTES, cmd_demo)
from difnumpy.distributed import SINGLE, PeerFailure, configure_threads, get_world
from difnumpy.kernels import BACKENDS
from difnumpy.samplers import METHODS
from difnumpy.schedules import SCHEDULE_NAMES
from difnumpy.train import TrainConfig
from difnumpy.trainer import DivergenceError

__all__ = ["main", "build_parser", "choose_weights", "CLIError"]


def _sampling_args(q, n_default, method_default, steps_help):
    q.add_argument("--checkpoint", required=True, help="a checkpoint.npz written by difnumpy train")
    q.add_argument("--method", choices=METHODS, default=method_default, metavar="METHOD",
                   help=f"sampler: {', '.join(METHODS)} (default {method_default})")
    q.add_argument("--karras", action="store_true",
                   help=f"Karras et al. sigmas (use_karras_sigmas) for {', '.join(KARRAS_METHODS)}")
    q.add_argument("--steps", type=positive_int, default=None, help=steps_help)
    q.add_argument("--eta", type=unit_float, default=0.0, help="DDIM eta in [0, 1] (default 0)")
    q.add_argument("-n", dest="n", type=int, default=n_default, help=f"number of samples (default {n_default})")
    q.add_argument("--seed", type=nonneg_int, default=0, help="default 0")
    _model_args(q)


def _model_args(q):
    q.add_argument("--batch-size", dest="batch_size", type=positive_int, default=256,
                   help="images per model call (default 256)")
    q.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="EMA or raw weights; auto (default): EMA once the initial weights' share in it, "
                        "decay**updates, is below 1%%")
    q.add_argument("--backend", choices=BACKENDS, default=None, help="kernel backend (default: stored)")
    q.add_argument("--device", dest="backend", choices=("cpu", "cuda"), help="same as --backend, cpu or cuda")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads_arg(q)


def _threads_arg(q):
    q.add_argument("--threads", type=positive_int, default=None,
                   help="kernel threads of this process (default: all cores; under mpiexec -n N, cores / N per rank)")


def _class_args(q, rescale=True):
    q.add_argument("--class-labels", dest="class_labels", type=class_labels_arg, default=None,
                   help="class-conditional checkpoints: 'all' (0..K-1 in turn over the samples) or a list such as "
                        "0,3,7 (likewise cycled; one class: all of them)")
    q.add_argument("--guidance-scale", dest="guidance_scale", type=nonneg_float, default=None,
                   help="classifier-free guidance w with --class-labels: out_u + w (out_c - out_u); 1 (default) is "
                        "plain conditional, 0 unconditional")
    if rescale:
        q.add_argument("--guidance-rescale", dest="guidance_rescale", type=unit_float, default=None,
                       help="guidance rescale phi in [0, 1] (Lin et al. 2023, eqs. 15-16; default 0)")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = Parser(prog="difnumpy", description="Denoising diffusion models (DDPM, DDIM) in NumPy.")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,evaluate,inpaint,demo}", parser_class=Parser)

    t = sub.add_parser("train", help="train a U-Net on digits or an IDX image file",
                       description="Train the U-Net with the DDPM loss; see difnumpy.train.")
    t.add_argument("--out", default=d.out_dir, help=f"run directory (default {d.out_dir})")
    t.add_argument("--data", help="'digits' (default) or the path of an MNIST-style IDX image file")
    t.add_argument("--conditional", action="store_true", default=None,
                   help="a class-conditional U-Net trained on the digits' labels (data 'digits' only)")
    t.add_argument("--label-dropout", dest="label_dropout", type=unit_float,
                   help=f"with --conditional: probability of dropping a label to 'no class' (default "
                        f"{d.label_dropout:g}); it trains the unconditional model that guidance needs")
    t.add_argument("--steps", type=positive_int, help=f"total updates (default {d.steps})")
    t.add_argument("--batch-size", dest="batch_size", type=positive_int, help=f"default {d.batch_size}")
    t.add_argument("--lr", type=positive_float, help=f"default {d.lr:g}")
    t.add_argument("--ema-decay", dest="ema_decay", type=unit_float, help=f"default {d.ema_decay}")
    t.add_argument("--warmup-steps", dest="warmup_steps", type=nonneg_int, help=f"default {d.warmup_steps}")
    t.add_argument("--schedule", choices=SCHEDULE_NAMES, help=f"default {d.schedule}")
    t.add_argument("--timesteps", dest="num_timesteps", type=positive_int, help=f"T (default {d.num_timesteps})")
    t.add_argument("--prediction-type", dest="prediction_type", choices=PREDICTION_TYPES)
    t.add_argument("--base-channels", dest="base_channels", type=positive_int, help=f"default {d.base_channels}")
    t.add_argument("--channel-mults", dest="channel_mults", type=int_list, help="e.g. 1,2 (default)")
    t.add_argument("--groups", type=positive_int, help=f"GroupNorm groups (default {d.groups})")
    t.add_argument("--seed", type=nonneg_int, help=f"default {d.seed}")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int,
                   help=f"default {d.checkpoint_every}")
    t.add_argument("--log-every", dest="log_every", type=positive_int, help=f"default {d.log_every}")
    t.add_argument("--minutes", dest="max_minutes", type=positive_float, help="wall-clock budget")
    t.add_argument("--backend", choices=BACKENDS, help=f"kernel backend (default {d.backend})")
    t.add_argument("--device", dest="backend", choices=("cpu", "cuda"), help="same as --backend, cpu or cuda")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads_arg(t)

    steps_help = "sampling steps (default: T for ddpm, 50 for the others)"
    s = sub.add_parser("sample", help="draw samples from a checkpoint (optionally class-guided)",
                       description="Write OUT/samples.npy (N, C, H, W) in [-1, 1] and OUT/samples.png; with "
                                   "--class-labels also OUT/labels.npy (int64, the requested class of each sample).")
    _sampling_args(s, 64, "ddim", steps_help)
    _class_args(s)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--trajectory", action="store_true", help="also write OUT/trajectory.png")

    e = sub.add_parser("evaluate", help="score a checkpoint's samples (Frechet distance, confidence, bits/dim)",
                       description="Print the metrics of difnumpy.metrics as a table and write them as JSON.")
    _sampling_args(e, 500, "ddim", steps_help)
    e.add_argument("--samples", help="score this .npy of samples instead of sampling")
    e.add_argument("--bpd-timesteps", dest="bpd_timesteps", type=nonneg_int, default=100,
                   help="timesteps for the bits/dim estimate on the test split (0: skip; default 100)")
    e.add_argument("--json", help="output JSON (default: evaluate.json beside the checkpoint)")

    i = sub.add_parser("inpaint", help="fill in masked regions of images (RePaint)",
                       description="Complete the masked region of images with RePaint (Lugmayr et al. 2022) and "
                                   "write DIR/inpainted.npy, originals.npy, mask.npy (N, 1, H, W; 1 = known, "
                                   "0 = generated), labels.npy (the true labels, --images test only) and "
                                   "inpainting.png (original, masked, completed). The known region is kept exactly.")
    i.add_argument("--checkpoint", required=True, help="a checkpoint.npz written by difnumpy train")
    i.add_argument("--images", required=True,
                   help="'test' (the held-out 8x8 digits, with their labels) or PATH.npy, an (N, C, H, W) array "
                        "in [-1, 1] of the checkpoint's image shape")
    i.add_argument("--mask", required=True,
                   help=f"{', '.join(MASK_NAMES)}: that half (center: the central H/2 x W/2 block) is generated and "
                        "the rest kept; or PATH.npy of 0 (generate) and 1 (keep), shape (H, W), (1, 1, H, W) or "
                        "(N, 1, H, W)")
    i.add_argument("-n", dest="n", type=int, default=None, help="the first N images (default: all)")
    i.add_argument("--out", required=True, help="output directory")
    i.add_argument("--steps", type=positive_int, default=INPAINT_STEPS,
                   help=f"steps of one descent (default {INPAINT_STEPS})")
    i.add_argument("--jump-length", dest="jump_length", type=positive_int, default=INPAINT_JUMP_LENGTH,
                   help=f"RePaint: steps of each resampling jump (default {INPAINT_JUMP_LENGTH})")
    i.add_argument("--jump-n-sample", dest="jump_n_sample", type=positive_int, default=INPAINT_JUMP_N_SAMPLE,
                   help=f"RePaint: times each stretch is run (default {INPAINT_JUMP_N_SAMPLE}; 1: no resampling)")
    i.add_argument("--reconstruction-guidance", dest="reconstruction_guidance", type=nonneg_float,
                   default=INPAINT_RECONSTRUCTION_GUIDANCE,
                   help=f"w_r of reconstruction guidance (Ho et al. 2022, Sec. 3.1): the generated region is pulled "
                        f"towards agreeing with the known one through the network's gradient (default "
                        f"{INPAINT_RECONSTRUCTION_GUIDANCE:g}; 0: plain RePaint, a third of the cost)")
    i.add_argument("--eta", type=unit_float, default=1.0,
                   help="eta of the generated region's DDIM step (default 1: the ancestral step of the paper)")
    i.add_argument("--seed", type=nonneg_int, default=0, help="default 0")
    _class_args(i, rescale=False)
    _model_args(i)

    m = sub.add_parser("demo", help="train on digits, sample with DDPM and DDIM, score, write figures",
                       description="The main command: everything in one directory in about 10 minutes on 2 cores. "
                                   "With --conditional: a class-conditional U-Net, class-guided samples and a "
                                   "guidance-scale sweep scored by the digit classifier, and inpainting.")
    m.add_argument("--out", default="difnumpy_demo", help="output directory (default difnumpy_demo)")
    m.add_argument("--conditional", action="store_true",
                   help="the conditional demo: class_grid.png, guidance_sweep.png, inpainting.png, metrics.json")
    # the training defaults are TrainConfig's (measured best, README); the demo adds only its budget
    m.add_argument("--minutes", type=positive_float, default=None,
                   help=f"training budget in minutes (default {DEMO_MINUTES:g}; sampling and scoring add about 1). "
                        f"--conditional: by default {COND_TOTAL_MINUTES:g} min in all, the training getting what "
                        f"the sampling and inpainting, predicted from a timed forward pass, leave (at most "
                        f"{DEMO_MINUTES:g})")
    m.add_argument("--steps", type=positive_int, default=DEMO_STEPS_CAP,
                   help=f"training steps cap (default {DEMO_STEPS_CAP}: the time budget decides)")
    m.add_argument("--seed", type=nonneg_int, default=d.seed)
    m.add_argument("--timesteps", type=positive_int, default=d.num_timesteps, help=f"T (default {d.num_timesteps})")
    m.add_argument("--schedule", choices=SCHEDULE_NAMES, default=d.schedule, help=f"default {d.schedule}")
    m.add_argument("--base-channels", dest="base_channels", type=positive_int, default=d.base_channels)
    m.add_argument("--batch-size", dest="batch_size", type=positive_int, default=d.batch_size,
                   help=f"default {d.batch_size}")
    m.add_argument("--lr", type=positive_float, default=d.lr, help=f"default {d.lr:g}")
    m.add_argument("--ema-decay", dest="ema_decay", type=unit_float, default=d.ema_decay,
                   help=f"EMA decay (default {d.ema_decay})")
    m.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int, default=d.checkpoint_every)
    m.add_argument("--ddim-steps", dest="ddim_steps", type=positive_int, default=50)
    m.add_argument("--n-eval", dest="n_eval", type=positive_int, default=500,
                   help="DDIM samples scored (with --conditional: per guidance scale, classes 0..9 in turn)")
    m.add_argument("--n-ddpm", dest="n_ddpm", type=positive_int, default=64, help="DDPM samples (timed)")
    m.add_argument("--bpd-timesteps", dest="bpd_timesteps", type=nonneg_int, default=100)
    m.add_argument("--label-dropout", dest="label_dropout", type=unit_float, default=None,
                   help=f"--conditional: label dropout of the training (default {COND_LABEL_DROPOUT:g})")
    m.add_argument("--guidance-scale", dest="guidance_scale", type=nonneg_float, default=None,
                   help=f"--conditional: the guidance scale of class_grid.png and of the main scores "
                        f"(default {COND_GUIDANCE_SCALE:g})")
    m.add_argument("--n-inpaint", dest="n_inpaint", type=positive_int, default=None,
                   help=f"--conditional: test digits inpainted (default {COND_N_INPAINT})")
    m.add_argument("--inpaint-steps", dest="inpaint_steps", type=positive_int, default=None,
                   help=f"--conditional: RePaint steps (default {COND_INPAINT_STEPS})")
    m.add_argument("--jump-length", dest="jump_length", type=positive_int, default=None,
                   help=f"--conditional: RePaint jump length (default {COND_JUMP_LENGTH})")
    m.add_argument("--jump-n-sample", dest="jump_n_sample", type=positive_int, default=None,
                   help=f"--conditional: RePaint resamplings (default {COND_JUMP_N_SAMPLE})")
    m.add_argument("--reconstruction-guidance", dest="reconstruction_guidance", type=nonneg_float, default=None,
                   help=f"--conditional: inpainting's reconstruction guidance w_r (default "
                        f"{COND_RECONSTRUCTION_GUIDANCE:g}; 0: plain RePaint)")
    m.add_argument("--backend", choices=BACKENDS, default=d.backend)
    m.add_argument("--device", dest="backend", choices=("cpu", "cuda"), help="same as --backend, cpu or cuda")
    m.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--quiet", action="store_true", help="only the final table")
    return p


_COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "inpaint": cmd_inpaint,
             "demo": cmd_demo}


def _report(prog: str, exc: BaseException) -> tuple[str, int]:
    """(the one-line message, the exit status) of an exception."""
    if isinstance(exc, CLIError):
        msg = str(exc)
        return (msg if msg.startswith("difnumpy") else f"{prog}: error: {msg}"), exc.code
    if isinstance(exc, KeyboardInterrupt):
        return f"{prog}: interrupted", EXIT_INTERRUPTED
    if isinstance(exc, DivergenceError):
        return f"{prog}: error: {exc}", EXIT_DIVERGED
    kind = "" if isinstance(exc, (ValueError, TypeError, OSError)) else f"{type(exc).__name__}: "
    return f"{prog}: error: {kind}{' '.join(str(exc).split()) or type(exc).__name__}", EXIT_RUNTIME


def main(argv=None) -> int:
    """Entry point of the ``difnumpy`` console script; returns the exit status.

    Under ``mpiexec -n N`` (N > 1) every rank runs this: the arguments and inputs are checked on every
    rank, then the ranks agree (:meth:`difnumpy.distributed.World.end_setup`) so that a set-up error is
    printed once (by the lowest rank that raised it) and every rank exits; an error after that is
    printed by the rank that raised it, which stops every rank (``MPI_Abort``): the exit status is
    non-zero and no rank waits forever. Rank 0 alone writes files and shows progress.
    """
    debug = os.environ.get("DIFNUMPY_DEBUG") == "1"
    prog, world = "difnumpy", SINGLE
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        prog = f"difnumpy {args.command}"
        world = get_world()
        world.setup_done = False
        try:
            configure_threads(world, getattr(args, "threads", None))
        except ValueError as exc:
            raise CLIError(f"--threads: {exc}") from None
        return _COMMANDS[args.command](args, world)
    except BaseException as exc:  # noqa: BLE001 - the CLI never shows a traceback
        if isinstance(exc, SystemExit) or (debug and isinstance(exc, Exception) and not isinstance(exc, CLIError)):
            raise
        if world.size > 1:
            return _fail_distributed(prog, exc, world)
        if not isinstance(exc, Exception) and not isinstance(exc, KeyboardInterrupt):
            raise
        msg, code = _report(prog, exc)
        print(msg, file=sys.stderr)
        return code


def _fail_distributed(prog: str, exc: BaseException, world) -> int:
    """An error on one rank of several: printed once, and every rank stops (see :func:`main`)."""
    if not world.setup_done:  # the others reach end_setup too: agree on who failed first
        world.end_setup(failed=True)
    if isinstance(exc, PeerFailure):  # another rank failed its set-up and prints why
        return EXIT_RUNTIME
    msg, code = _report(prog, exc)
    if world.setup_failed_rank is not None:  # a set-up error: every rank stops here, no abort needed
        if world.rank == world.setup_failed_rank:
            print(msg, file=sys.stderr, flush=True)
        return code
    if isinstance(exc, DivergenceError):  # the global loss and gradient norm: every rank raised it, same step
        if world.is_root:
            print(msg, file=sys.stderr, flush=True)
        return code
    if not isinstance(exc, KeyboardInterrupt) or world.is_root:  # Ctrl-C reaches every rank: said once
        print(f"{msg} (rank {world.rank} of {world.size}; stopping every rank)", file=sys.stderr, flush=True)
    world.abort(code)
    return code  # pragma: no cover - abort does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
