"""Tests for difnumpy.train: logging, checkpoints, resume, determinism, interrupts, divergence."""
import json
import os
import signal
import warnings

import numpy as np
import pytest

from difnumpy.checkpoint import load_checkpoint
from difnumpy.train import DivergenceError, TrainConfig, read_log, train

# tiny and fast: NumPy kernels, 8 base channels, T = 20
TINY = dict(base_channels=8, groups=4, num_timesteps=20, batch_size=16, backend="numpy", progress=False,
            warmup_steps=2, log_every=2)


def _cfg(tmp_path, name="run", **kw):
    d = dict(TINY, out_dir=str(tmp_path / name))
    d.update(kw)
    return TrainConfig(**d)


def _params(path):
    tr = load_checkpoint(path)
    return {k: v.copy() for k, v in tr.model.params.items()}, {k: v.copy() for k, v in tr.ema.params.items()}


def test_train_writes_every_file(tmp_path):
    r = train(_cfg(tmp_path, steps=6, checkpoint_every=4))
    out = tmp_path / "run"
    assert r["status"] == "completed" and r["step"] == 6 and r["steps_this_call"] == 6
    for f in ("checkpoint.npz", "log.jsonl", "loss.png", "config.json"):
        assert (out / f).is_file(), f
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    recs = read_log(str(out / "log.jsonl"))
    assert [rec["step"] for rec in recs] == [2, 4, 6]
    for rec in recs:
        assert set(rec) == {"step", "loss", "last_loss", "lr", "grad_norm", "images_per_s", "elapsed_s"}
        assert np.isfinite(rec["loss"]) and rec["images_per_s"] > 0
    assert recs[0]["lr"] == pytest.approx(TrainConfig().lr)  # warmup 2: step 2 reaches the base lr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_shape"] == [1, 8, 8] and cfg["seed"] == 0 and cfg["steps"] == 6
    assert load_checkpoint(r["checkpoint"]).step_count == 6
    assert r["trainer"].step_count == 6


def test_same_seed_same_result_and_resume_is_bit_exact(tmp_path):
    train(_cfg(tmp_path, "a", steps=6, seed=3))
    train(_cfg(tmp_path, "b", steps=6, seed=3))
    train(_cfg(tmp_path, "c", steps=3, seed=3))
    train(_cfg(tmp_path, "c", steps=6, seed=3, resume=True))
    train(_cfg(tmp_path, "d", steps=6, seed=4))
    pa, ea = _params(tmp_path / "a" / "checkpoint.npz")
    for other in ("b", "c"):
        pb, eb = _params(tmp_path / other / "checkpoint.npz")
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{other}: params {k}")
            np.testing.assert_array_equal(ea[k], eb[k], err_msg=f"{other}: ema {k}")
    pd, _ = _params(tmp_path / "d" / "checkpoint.npz")
    assert any(not np.array_equal(pa[k], pd[k]) for k in pa)
    # the resumed run's log continues where the checkpoint was
    # (the first call also logged its final step, 3)
    log_a = {r["step"]: r for r in read_log(str(tmp_path / "a" / "log.jsonl"))}
    log_c = {r["step"]: r for r in read_log(str(tmp_path / "c" / "log.jsonl"))}
    assert sorted(log_a) == [2, 4, 6] and sorted(log_c) == [2, 3, 4, 6]
    for s in (2, 4, 6):
        assert log_a[s]["last_loss"] == log_c[s]["last_loss"]


def test_refuses_to_clobber_and_checks_resume(tmp_path):
    train(_cfg(tmp_path, steps=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(tmp_path, steps=2))
    with pytest.raises(ValueError, match="seed"):
        train(_cfg(tmp_path, steps=4, seed=9, resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(tmp_path, "empty", steps=2, resume=True))
    r = train(_cfg(tmp_path, steps=3, overwrite=True))
    assert r["step"] == 3 and r["steps_this_call"] == 3


def test_interrupt_saves_a_checkpoint(tmp_path):
    def press_ctrl_c(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    r = train(_cfg(tmp_path, steps=50, checkpoint_every=100), callback=press_ctrl_c)
    assert r["status"] == "interrupted" and r["step"] == 3
    assert load_checkpoint(r["checkpoint"]).step_count == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    r2 = train(_cfg(tmp_path, steps=5, resume=True))
    assert r2["status"] == "completed" and r2["step"] == 5 and r2["steps_this_call"] == 2


def test_time_budget_stops_and_saves(tmp_path):
    r = train(_cfg(tmp_path, steps=10**6, max_minutes=1e-4))
    assert r["status"] == "time_budget" and r["step"] < 10**6
    assert load_checkpoint(r["checkpoint"]).step_count == r["step"]


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, steps=20, lr=1e30, grad_clip=None, warmup_steps=0, checkpoint_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            with pytest.raises(DivergenceError, match=r"diverged at step (\d+).*last good checkpoint") as info:
                train(cfg)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    tr = load_checkpoint(ckpt)
    diverged_at = int(info.value.args[0].split("step ")[1].split(":")[0])
    assert tr.step_count == diverged_at - 1
    assert all(np.all(np.isfinite(p)) for p in tr.model.params.values())
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


def test_config_validation(tmp_path):
    for bad, match in ((dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(schedule="nope"), "schedule"),
                       (dict(ema_decay=1.5), "ema_decay"), (dict(channel_mults=()), "channel_mults"),
                       (dict(resume=True, overwrite=True), "resume")):
        with pytest.raises((ValueError, TypeError), match=match):
            train(_cfg(tmp_path, **bad))
    with pytest.raises(ValueError, match="unknown config key"):
        train({"out_dir": str(tmp_path / "x"), "stepz": 3})
    with pytest.raises(ValueError, match="batch_size"):
        train(_cfg(tmp_path, steps=1, batch_size=5000))
    with pytest.raises(FileNotFoundError, match="data"):
        train(_cfg(tmp_path, steps=1, data=str(tmp_path / "missing-idx3-ubyte")))
    assert not (tmp_path / "run").exists()  # nothing written by a rejected config


def test_train_on_idx_file(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    path = tmp_path / "imgs-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + np.asarray(img.shape, ">u4").tobytes() + img.tobytes())
    r = train(_cfg(tmp_path, steps=2, data=str(path)))
    assert r["status"] == "completed"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_shape"] == [1, 8, 8]


# ---- --overwrite never loses the old run (issue 14, item 2) --------------------------------------

def _snapshot_dir(path):
    """The regular files of a run directory and their bytes (a new run's staging folder aside)."""
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path)) if (path / f).is_file()}


def _idx_file(path, n=40, h=8, w=8, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, 3]) + np.asarray(img.shape, ">u4").tobytes() + img.tobytes())
    return str(path)


def test_overwrite_validates_everything_before_touching_the_old_run(tmp_path, monkeypatch):
    train(_cfg(tmp_path, steps=2))
    out = tmp_path / "run"
    before = _snapshot_dir(out)
    bad_cases = [
        (dict(groups=3), "groups"),                                   # does not divide the channel counts
        (dict(channel_mults=(1, 2, 2, 2)), "divisible by 2\\*\\*\\(levels-1\\) = 8"),  # 12x12 images
        (dict(batch_size=5000), "batch_size"),
        (dict(data=str(tmp_path / "missing-idx3-ubyte")), "data"),
    ]
    idx12 = _idx_file(tmp_path / "twelve-idx3-ubyte", h=12, w=12)
    for kw, match in bad_cases:
        if "channel_mults" in kw:
            kw = dict(kw, data=idx12)
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
            train(_cfg(tmp_path, steps=3, overwrite=True, **kw))
        assert _snapshot_dir(out) == before, kw
        assert sorted(os.listdir(out)) == sorted(before)
    # backend="cuda" without a usable GPU (simulated: get_backend("cuda") refuses, as it does then)
    from difnumpy import kernels

    real = kernels.get_backend

    def no_gpu(name="cpu"):
        if name == "cuda":
            raise RuntimeError("no CUDA-capable GPU found")
        return real(name)

    monkeypatch.setattr(kernels, "get_backend", no_gpu)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here: no CUDA-capable GPU"):
        train(_cfg(tmp_path, steps=3, overwrite=True, backend="cuda"))
    assert _snapshot_dir(out) == before


def test_overwrite_replaces_the_old_run_only_at_the_new_first_checkpoint(tmp_path):
    train(_cfg(tmp_path, steps=2))
    out = tmp_path / "run"
    before = _snapshot_dir(out)
    seen = []

    def look(step, loss):  # during the new run, before its first checkpoint (step 4)
        if step < 4:
            seen.append(_snapshot_dir(out) == before)

    r = train(_cfg(tmp_path, steps=5, checkpoint_every=4, seed=1, overwrite=True), callback=look)
    assert seen == [True, True, True]
    assert r["step"] == 5 and load_checkpoint(out / "checkpoint.npz").step_count == 5
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert [rec["step"] for rec in read_log(str(out / "log.jsonl"))] == [2, 4, 5]
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "log.jsonl", "loss.png"]  # no staging


def test_overwrite_that_diverges_before_its_first_checkpoint_keeps_the_old_run(tmp_path):
    train(_cfg(tmp_path, steps=2))
    out = tmp_path / "run"
    before = _snapshot_dir(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            with pytest.raises(DivergenceError, match="previous run in .* is kept"):
                train(_cfg(tmp_path, steps=20, lr=1e30, grad_clip=None, warmup_steps=0, checkpoint_every=100,
                           overwrite=True))
    assert _snapshot_dir(out) == before
    assert sorted(os.listdir(out)) == sorted(before)  # the new run's staging folder is gone


# ---- the checkpoint describes its run; resume follows it (issue 14, item 3) ----------------------

def test_checkpoints_hold_the_run_metadata(tmp_path):
    from difnumpy.checkpoint import read_metadata

    idx = _idx_file(tmp_path / "imgs-idx3-ubyte", h=12, w=16)
    r = train(_cfg(tmp_path, steps=2, data=idx, seed=5, schedule="linear", prediction_type="v_prediction"))
    assert read_metadata(r["checkpoint"]) == {
        "image_shape": (1, 12, 16), "data": idx, "batch_size": 16, "seed": 5, "num_classes": None,
        "schedule": "linear", "num_timesteps": 20, "prediction_type": "v_prediction", "format_version": 2}


def test_resume_checks_the_checkpoint_not_the_defaults(tmp_path):
    from difnumpy.train import config_from_checkpoint

    train(_cfg(tmp_path, steps=2, seed=3, batch_size=8))
    out = tmp_path / "run"
    os.unlink(out / "config.json")  # the checkpoint alone says what the run is
    ckpt = str(out / "checkpoint.npz")
    assert config_from_checkpoint(ckpt)["batch_size"] == 8 and config_from_checkpoint(ckpt)["seed"] == 3
    with pytest.raises(ValueError, match=r"batch_size \(8 in the checkpoint, 16 given\).*seed \(3 in the"):
        train(_cfg(tmp_path, steps=4, resume=True))  # the defaults of _cfg: another data stream
    idx = _idx_file(tmp_path / "imgs-idx3-ubyte")
    with pytest.raises(ValueError, match="data"):
        train(_cfg(tmp_path, steps=4, seed=3, batch_size=8, resume=True, data=idx))
    r = train(_cfg(tmp_path, steps=4, seed=3, batch_size=8, resume=True))
    assert r["step"] == 4


def test_resume_refuses_a_config_json_that_contradicts_the_checkpoint(tmp_path):
    train(_cfg(tmp_path, steps=2, seed=3))
    cfg_path = tmp_path / "run" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["seed"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"seed \(3 in the checkpoint, 4 given\)"):
        train(_cfg(tmp_path, steps=4, seed=4, resume=True))
    with pytest.raises(ValueError, match=r"config.json: seed \(4 in config.json, 3 given\)"):
        train(_cfg(tmp_path, steps=4, seed=3, resume=True))


def test_resume_of_an_old_checkpoint_needs_its_config_json(tmp_path):
    """A checkpoint without run metadata (format 1) resumes only with the config.json beside it."""
    import zipfile

    train(_cfg(tmp_path, steps=2))
    out = tmp_path / "run"
    ckpt = out / "checkpoint.npz"
    with np.load(ckpt, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    del meta["run"]
    meta["format_version"] = 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
    arrays["format_version"] = np.array(1)
    with zipfile.ZipFile(ckpt, "w") as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    cfg = (out / "config.json").read_bytes()
    os.unlink(out / "config.json")
    with pytest.raises(ValueError, match="holds no data, batch_size, seed, image_shape.*no config.json"):
        train(_cfg(tmp_path, steps=4, resume=True))
    (out / "config.json").write_bytes(cfg)
    assert train(_cfg(tmp_path, steps=4, resume=True))["step"] == 4


# ---- defaults and progress (issue 14, items 10 and 11) -------------------------------------------

def test_one_set_of_defaults_the_measured_best():
    from difnumpy.cli import build_parser

    d = TrainConfig()
    assert (d.batch_size, d.lr, d.schedule, d.num_timesteps, d.ema_decay) == (128, 2e-3, "cosine", 1000, 0.995)
    demo = build_parser().parse_args(["demo"])
    for k in ("batch_size", "lr", "schedule", "ema_decay", "seed", "base_channels", "checkpoint_every"):
        assert getattr(demo, k) == getattr(d, k), k
    assert demo.timesteps == d.num_timesteps


def test_time_budget_progress_bar_counts_the_budget(tmp_path, capsys):
    r = train(_cfg(tmp_path, steps=10**5, max_minutes=0.02, progress=True))
    assert r["status"] == "time_budget"
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and "of the time budget" in last, last
    assert "100000" not in err


def test_step_progress_bar_without_a_budget(tmp_path, capsys):
    train(_cfg(tmp_path, steps=4, progress=True))
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and "4/4" in last, last


def test_compile_message_when_numba_compiles(tmp_path, capsys):
    import numba

    from difnumpy.train import COMPILE_MESSAGE

    def compile_something(step, loss):  # a fresh function: numba compiles it on its first call
        if step == 1:
            f = numba.njit(lambda a: a + step)
            f(1.0)
            f(np.zeros(2))

    train(_cfg(tmp_path, steps=2, progress=True), callback=compile_something)
    assert capsys.readouterr().err.count(COMPILE_MESSAGE) == 1
    train(_cfg(tmp_path, "quiet", steps=2, progress=False), callback=compile_something)
    assert COMPILE_MESSAGE not in capsys.readouterr().err


# ---- class-conditional runs (issue 11) -----------------------------------------------------------

def test_conditional_run_trains_on_the_labels_and_resumes_bit_exact(tmp_path):
    from difnumpy.checkpoint import read_metadata
    from difnumpy.data import SeededBatches, load_digits

    r = train(_cfg(tmp_path, "a", steps=6, conditional=True, label_dropout=0.25))
    tr = r["trainer"]
    assert tr.model.num_classes == 10 and tr.label_dropout == 0.25
    assert read_metadata(r["checkpoint"])["num_classes"] == 10
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["conditional"] is True and cfg["label_dropout"] == 0.25
    # the batches hold the same rows of images and labels as the unconditional stream
    x, y = load_digits("train", return_labels=True)
    xb, yb = SeededBatches(x, 16, 0, y)(5)
    xu, yu = SeededBatches(x, 16, 0)(5)
    np.testing.assert_array_equal(xb, xu)
    assert yu is None and yb.dtype == np.int64 and all(np.any(np.all(x[y == c] == im, axis=(1, 2, 3)))
                                                       for c, im in zip(yb, xb))
    train(_cfg(tmp_path, "b", steps=3, conditional=True, label_dropout=0.25))
    train(_cfg(tmp_path, "b", steps=6, conditional=True, label_dropout=0.25, resume=True))
    pa, ea = _params(tmp_path / "a" / "checkpoint.npz")
    pb, eb = _params(tmp_path / "b" / "checkpoint.npz")
    assert "label_emb.w" in pa
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
        np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)
    # an unconditional run: no class embedding, no label dropout
    train(_cfg(tmp_path, "u", steps=6))
    pu, _ = _params(tmp_path / "u" / "checkpoint.npz")
    assert "label_emb.w" not in pu and load_checkpoint(tmp_path / "u" / "checkpoint.npz").label_dropout == 0.0


def test_conditional_is_part_of_the_runs_identity(tmp_path):
    from difnumpy.train import config_from_checkpoint

    train(_cfg(tmp_path, "c", steps=2, conditional=True, label_dropout=0.2))
    ck = tmp_path / "c" / "checkpoint.npz"
    d = config_from_checkpoint(ck)
    assert d["conditional"] is True and d["label_dropout"] == 0.2
    with pytest.raises(ValueError, match=r"label_dropout \(0.2 in the checkpoint, 0.3 given\)"):
        train(_cfg(tmp_path, "c", steps=4, conditional=True, label_dropout=0.3, resume=True))
    with pytest.raises(ValueError, match=r"conditional \(True in the checkpoint, False given\)"):
        train(_cfg(tmp_path, "c", steps=4, resume=True))
    train(_cfg(tmp_path, "u", steps=2))
    d = config_from_checkpoint(tmp_path / "u" / "checkpoint.npz")
    assert d["conditional"] is False and "label_dropout" not in d  # an unconditional run draws no labels
    with pytest.raises(ValueError, match=r"conditional \(False in the checkpoint, True given\)"):
        train(_cfg(tmp_path, "u", steps=4, conditional=True, resume=True))
    # the label dropout of an unconditional run is no part of it
    assert train(_cfg(tmp_path, "u", steps=3, label_dropout=0.5, resume=True))["step"] == 3


def test_conditional_needs_the_digits_labels(tmp_path):
    with pytest.raises(ValueError, match="only data='digits' has"):
        _cfg(tmp_path, data="some-idx3-ubyte", conditional=True).validate()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises((ValueError, TypeError), match="label_dropout"):
            _cfg(tmp_path, conditional=True, label_dropout=bad).validate()
    with pytest.raises(TypeError, match="conditional must be a bool"):
        _cfg(tmp_path, conditional="yes").validate()
