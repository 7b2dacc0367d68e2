"""End-to-end tests of the command line (difnumpy train | sample | evaluate | demo)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from difnumpy.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = ["--steps", "4", "--base-channels", "8", "--groups", "4", "--timesteps", "20", "--batch-size", "16",
              "--backend", "numpy", "--no-progress", "--log-every", "2"]
TINY_DEMO = ["--minutes", "1", "--steps", "4", "--timesteps", "20", "--base-channels", "8", "--batch-size", "16",
             "--n-eval", "24", "--n-ddpm", "8", "--ddim-steps", "5", "--bpd-timesteps", "3", "--backend", "numpy",
             "--no-progress"]
DEMO_FILES = ("checkpoint.npz", "forward_process.png", "schedules.png", "loss.png", "ddpm_samples.png",
              "ddim_samples.png", "trajectory.png", "metrics.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(out)] + TINY_TRAIN) == 0
    return out


def _one_line_error(capsys, code, expected_code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("difnumpy"), err
    for n in needles:
        assert n in last, last
    return last


def test_train_command(run_dir):
    for f in ("checkpoint.npz", "log.jsonl", "loss.png", "config.json"):
        assert (run_dir / f).is_file()
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "6", "--no-progress"]) == 0
    from difnumpy.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir / "checkpoint.npz").step_count == 6


def test_sample_command(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["sample", "--checkpoint", str(run_dir / "checkpoint.npz"), "--method", "ddim", "--steps", "5",
                 "-n", "10", "--out", str(out), "--trajectory", "--no-progress", "--seed", "1"])
    assert code == 0
    x = np.load(out / "samples.npy", allow_pickle=False)
    assert x.shape == (10, 1, 8, 8) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert (out / "samples.png").stat().st_size > 100 and (out / "trajectory.png").stat().st_size > 100
    # same seed -> same samples; DDPM and eta > 0 run too
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.npz"), "--steps", "5", "-n", "10",
                 "--out", str(tmp_path / "s2"), "--no-progress", "--seed", "1"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s2" / "samples.npy"), x)
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.npz"), "--method", "ddpm", "-n", "3",
                 "--out", str(tmp_path / "s3"), "--no-progress", "--weights", "ema"]) == 0
    assert "(ema weights)" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.npz"), "--eta", "1", "--steps", "4",
                 "-n", "3", "--out", str(tmp_path / "s4"), "--no-progress", "--batch-size", "2"]) == 0
    assert np.load(tmp_path / "s4" / "samples.npy").shape == (3, 1, 8, 8)


def test_evaluate_command(run_dir, tmp_path, capsys):
    js = tmp_path / "m.json"
    code = main(["evaluate", "--checkpoint", str(run_dir / "checkpoint.npz"), "-n", "20", "--steps", "4",
                 "--bpd-timesteps", "3", "--json", str(js), "--no-progress"])
    assert code == 0
    res = json.loads(js.read_text())
    for k in ("fd", "fd_floor", "fd_noise", "confident_fraction", "class_histogram", "test_bpd"):
        assert k in res
    assert "fd_floor" in capsys.readouterr().out
    # scoring a samples file instead of sampling
    np.save(tmp_path / "x.npy", np.zeros((5, 1, 8, 8), np.float32))
    assert main(["evaluate", "--checkpoint", str(run_dir / "checkpoint.npz"), "--samples", str(tmp_path / "x.npy"),
                 "--bpd-timesteps", "0", "--json", str(js), "--no-progress"]) == 0
    assert json.loads(js.read_text())["n_samples"] == 5


@pytest.mark.parametrize("args, code, needles", [
    (["sample", "--method", "foo"], 2, ["--method", "invalid choice"]),
    (["sample", "--steps", "21"], 2, ["--steps 21", "T=20"]),
    (["sample", "-n", "0"], 2, ["-n"]),
    (["sample", "-n", "-3"], 2, ["-n"]),
    (["sample", "--method", "ddpm", "--eta", "0.5"], 2, ["--eta"]),
    (["sample", "--eta", "1.5"], 2, ["--eta"]),
    (["evaluate", "--steps", "0"], 2, ["--steps"]),
])
def test_bad_sampling_arguments(run_dir, tmp_path, capsys, args, code, needles):
    out = tmp_path / "out"
    argv = args[:1] + ["--checkpoint", str(run_dir / "checkpoint.npz"), "--no-progress"] + args[1:]
    if args[0] == "sample":
        argv += ["--out", str(out)]
    _one_line_error(capsys, main(argv), code, *needles)
    assert not out.exists()  # nothing written


def test_missing_and_corrupt_checkpoint(run_dir, tmp_path, capsys):
    _one_line_error(capsys, main(["sample", "--checkpoint", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o")]),
                    1, "does not exist")
    bad = tmp_path / "bad.npz"
    bad.write_bytes((run_dir / "checkpoint.npz").read_bytes()[:5000])  # truncated
    _one_line_error(capsys, main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]), 1,
                    "cannot load --checkpoint")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint at all")
    _one_line_error(capsys, main(["evaluate", "--checkpoint", str(garbage)]), 1, "cannot load --checkpoint")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_directory(run_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, main(["sample", "--checkpoint", str(run_dir / "checkpoint.npz"),
                                  "--out", str(blocker / "sub"), "--no-progress"]), 1, "not a writable directory")
    _one_line_error(capsys, main(["train", "--out", str(blocker / "sub")] + TINY_TRAIN), 1,
                    "not a writable directory")


def test_existing_results_are_not_overwritten(run_dir, tmp_path, capsys):
    before = (run_dir / "checkpoint.npz").read_bytes()
    _one_line_error(capsys, main(["train", "--out", str(run_dir)] + TINY_TRAIN), 1, "already holds a run")
    _one_line_error(capsys, main(["demo", "--out", str(run_dir)] + TINY_DEMO), 2, "already holds a run")
    assert (run_dir / "checkpoint.npz").read_bytes() == before


def test_choose_weights():
    from difnumpy.cli import choose_weights

    # with the EMA warm-up the decays are 0.1, 2/11, 3/12, ...: the start's share is 10 %, 1.8 %, 0.45 %
    assert choose_weights(0.999, 1) == "raw"
    assert choose_weights(0.999, 2) == "raw"
    assert choose_weights(0.999, 3) == "ema"
    assert choose_weights(0.995, 1000) == "ema"
    assert choose_weights(0.0, 1) == "ema" and choose_weights(0.5, 0) == "raw"  # no update: EMA == start
    assert choose_weights(0.999, 1, "ema") == "ema" and choose_weights(0.9, 10**6, "raw") == "raw"


def test_usage_errors(capsys):
    _one_line_error(capsys, main(["bogus"]), 2, "invalid choice")
    _one_line_error(capsys, main(["train", "--steps", "zero"]), 2, "--steps")
    _one_line_error(capsys, main(["train", "--channel-mults", "1,x"]), 2, "--channel-mults")
    _one_line_error(capsys, main(["sample", "--out", "x"]), 2, "--checkpoint")
    _one_line_error(capsys, main(["train", "--resume", "--overwrite"]), 2, "not allowed")
    assert main([]) == 2


def test_demo_end_to_end_via_python_m(tmp_path):
    """`python -m difnumpy demo` on a tiny budget writes every promised file."""
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "difnumpy", "demo", "--out", str(out)] + TINY_DEMO,
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in DEMO_FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    for k in ("fd", "fd_floor", "fd_noise", "confident_fraction", "mean_confidence", "class_histogram",
              "test_bpd", "ddpm_seconds", "ddim_seconds", "ddim_speedup", "train_steps"):
        assert k in m, k
    assert m["train_steps"] == 4 and m["n_samples"] == 24 and m["weights"] == "ema"  # 4 warm-up updates leave 0.1 % of the start
    assert "faster than DDPM" in proc.stdout
    # the demo's checkpoint is loadable by `difnumpy sample`
    assert main(["sample", "--checkpoint", str(out / "checkpoint.npz"), "-n", "2", "--steps", "2",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
