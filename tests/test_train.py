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
    assert recs[0]["lr"] == pytest.approx(1e-3)  # warmup 2: step 2 reaches the base lr
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
