"""End-to-end tests of the command line (difnumpy train | sample | evaluate | demo)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from difnumpy.cli import main

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


def _state(path):
    """Everything a run's continuation depends on, from its checkpoint (public Trainer API)."""
    from difnumpy.checkpoint import load_checkpoint

    tr = load_checkpoint(path)
    st = {f"params/{k}": v for k, v in tr.model.params.items()}
    st.update({f"ema/{k}": np.asarray(v) for k, v in tr.ema.state_dict().items()})
    st.update({f"optim/{k}": np.asarray(v) for k, v in tr.optimizer.state_dict().items()})
    return st, tr.step_count, tr.rng.bit_generator.state


def _assert_same_state(a, b):
    (sa, na, ra), (sb, nb, rb) = a, b
    assert na == nb and ra == rb and set(sa) == set(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)  # bit for bit
        assert sa[k].dtype == sb[k].dtype, k


@pytest.fixture(scope="module")
def straight_6(tmp_path_factory):
    """The run of run_dir, uninterrupted to step 6 (the last --steps given counts)."""
    out = tmp_path_factory.mktemp("cli") / "straight"
    assert main(["train", "--out", str(out)] + TINY_TRAIN + ["--steps", "6"]) == 0
    return out


def test_train_command(run_dir, straight_6):
    for f in ("checkpoint.npz", "log.jsonl", "loss.png", "config.json"):
        assert (run_dir / f).is_file()
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "6", "--no-progress"]) == 0
    # resumed at 4 and continued to 6: parameters, EMA, Adam moments and rng as an uninterrupted run's
    _assert_same_state(_state(run_dir / "checkpoint.npz"), _state(straight_6 / "checkpoint.npz"))
    assert _state(run_dir / "checkpoint.npz")[1] == 6


def test_resume_without_config_json_keeps_the_data_stream(tmp_path, straight_6, capsys):
    """The checkpoint alone fixes the run (data, batch size, seed, schedule, model): no default creeps in."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)] + TINY_TRAIN) == 0
    os.unlink(out / "config.json")
    before = (out / "checkpoint.npz").read_bytes()
    _one_line_error(capsys, main(["train", "--out", str(out), "--resume", "--steps", "6", "--batch-size", "32",
                                  "--backend", "numpy", "--no-progress"]), 1, "batch_size (16 in the checkpoint, 32")
    assert (out / "checkpoint.npz").read_bytes() == before
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--backend", "numpy",
                 "--no-progress"]) == 0
    _assert_same_state(_state(out / "checkpoint.npz"), _state(straight_6 / "checkpoint.npz"))


def test_overwrite_checks_everything_before_touching_the_run(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)] + TINY_TRAIN) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    _one_line_error(capsys, main(["train", "--out", str(out), "--overwrite"] + TINY_TRAIN + ["--groups", "3"]), 1, "groups=3")
    from difnumpy import kernels

    real = kernels.get_backend
    monkeypatch.setattr(kernels, "get_backend",
                        lambda name="cpu": (_ for _ in ()).throw(RuntimeError("no GPU here")) if name == "cuda"
                        else real(name))
    _one_line_error(capsys, main(["train", "--out", str(out), "--overwrite"] + TINY_TRAIN + ["--device", "cuda"]), 1, "backend='cuda' cannot run here: no GPU here")
    _one_line_error(capsys, main(["train", "--out", str(out), "--overwrite", "--channel-mults", "1,2,2,2,2"]
                                 + TINY_TRAIN), 1, "divisible by 2**(levels-1) = 16")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


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
    import difnumpy

    # the difnumpy under test: the source tree, or the installed copy when the tests run against one
    where = os.path.dirname(os.path.dirname(os.path.abspath(difnumpy.__file__)))
    env = dict(os.environ, PYTHONPATH=where + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
    assert "budget of 1 min, at most 4 steps" in proc.stdout and "100000" not in proc.stdout + proc.stderr
    # the demo's checkpoint is loadable by `difnumpy sample`
    assert main(["sample", "--checkpoint", str(out / "checkpoint.npz"), "-n", "2", "--steps", "2",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ---- sample and evaluate read the checkpoint's own metadata (issue 14, item 3) -------------------

def _idx_file(path, n=40, h=8, w=8):
    img = np.random.default_rng(0).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, 3]) + np.asarray(img.shape, ">u4").tobytes() + img.tobytes())
    return str(path)


@pytest.fixture(scope="module")
def run_12x16(tmp_path_factory):
    """A run on 12x16 images whose config.json is gone: only the checkpoint knows the image size."""
    d = tmp_path_factory.mktemp("cli12")
    out = d / "run"
    assert main(["train", "--out", str(out), "--data", _idx_file(d / "imgs-idx3-ubyte", h=12, w=16)]
                + TINY_TRAIN) == 0
    os.unlink(out / "config.json")
    return out


def test_sample_uses_the_checkpoints_image_shape(run_12x16, tmp_path):
    assert main(["sample", "--checkpoint", str(run_12x16 / "checkpoint.npz"), "--steps", "2", "-n", "3",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert np.load(tmp_path / "s" / "samples.npy").shape == (3, 1, 12, 16)  # was (3, 1, 8, 8)


def test_evaluate_refuses_a_model_not_trained_on_digits(run_12x16, tmp_path, capsys):
    _one_line_error(capsys, main(["evaluate", "--checkpoint", str(run_12x16 / "checkpoint.npz"), "-n", "4",
                                  "--json", str(tmp_path / "m.json"), "--no-progress"]), 2, "8x8 digits models only")


def _as_format_1(src, dst):
    """A copy of a checkpoint as difnumpy wrote it before checkpoints held their run metadata."""
    import zipfile

    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    del meta["run"]
    meta["format_version"] = 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
    arrays["format_version"] = np.array(1)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return dst


def test_old_checkpoint_without_metadata(run_dir, tmp_path, capsys):
    old = _as_format_1(run_dir / "checkpoint.npz", tmp_path / "old" / "checkpoint.npz")
    argv = ["sample", "--checkpoint", str(old), "--steps", "2", "-n", "2", "--no-progress", "--out"]
    # no config.json beside it: a clear error, never a guessed 8x8
    _one_line_error(capsys, main(argv + [str(tmp_path / "s1")]), 1, "holds no image shape", "config.json")
    assert not (tmp_path / "s1").exists()
    # with the run's config.json beside it: read from there, as before
    (tmp_path / "old" / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    assert main(argv + [str(tmp_path / "s2")]) == 0
    assert np.load(tmp_path / "s2" / "samples.npy").shape == (2, 1, 8, 8)
    # and it still cannot be resumed without config.json
    os.unlink(tmp_path / "old" / "config.json")
    _one_line_error(capsys, main(["train", "--out", str(tmp_path / "old"), "--resume", "--steps", "6",
                                  "--no-progress"]), 1, "holds no data, batch_size, seed, image_shape")


def test_contradictory_config_json_is_refused(run_dir, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "checkpoint.npz").write_bytes((run_dir / "checkpoint.npz").read_bytes())
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg.update(image_shape=[1, 28, 28], seed=7)
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, main(["sample", "--checkpoint", str(d / "checkpoint.npz"), "--out", str(tmp_path / "s"),
                                  "--no-progress"]), 1, "contradicts the config.json", "image_shape (1, 8, 8)")


# ---- evaluate --samples accepts .npz (issue 14, item 6) ------------------------------------------

def test_evaluate_samples_npz(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoint.npz")
    x = np.random.default_rng(0).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    js = tmp_path / "m.json"
    argv = ["evaluate", "--checkpoint", ckpt, "--bpd-timesteps", "0", "--json", str(js), "--no-progress", "--samples"]
    np.savez(tmp_path / "one.npz", x)
    assert main(argv + [str(tmp_path / "one.npz")]) == 0
    assert json.loads(js.read_text())["n_samples"] == 6
    np.savez(tmp_path / "named.npz", samples=x[:4], labels=np.arange(4))
    assert main(argv + [str(tmp_path / "named.npz")]) == 0
    assert json.loads(js.read_text())["n_samples"] == 4
    capsys.readouterr()
    np.savez(tmp_path / "two.npz", a=x, b=x)
    _one_line_error(capsys, main(argv + [str(tmp_path / "two.npz")]), 1, "holds 2 arrays", "'samples'")
    np.savez(tmp_path / "empty.npz")
    _one_line_error(capsys, main(argv + [str(tmp_path / "empty.npz")]), 1, "holds 0 arrays")
    np.savez(tmp_path / "objects.npz", samples=np.array([object()], dtype=object))
    _one_line_error(capsys, main(argv + [str(tmp_path / "objects.npz")]), 1, "cannot read --samples")
