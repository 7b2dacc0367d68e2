"""Checkpoints: round trip, bit-for-bit resume, atomic writes and refusal of bad files."""
import json
import os
import pickle

import numpy as np
import pytest

from difnumpy.checkpoint import FORMAT_VERSION, load_checkpoint, load_model, read_checkpoint, save_checkpoint
from difnumpy.nn.unet import UNet
from difnumpy.schedules import Schedule
from difnumpy.trainer import Trainer

# A tiny U-Net (26k params) on 8x8 images; the NumPy kernels keep the test free of compile time, the
# optimizer uses the numba adam kernel.
CONFIG = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=2, backend="numpy")
HP = dict(lr=2e-3, ema_decay=0.9, warmup_steps=4, optimizer="adamw", weight_decay=0.01, grad_clip=1.0,
          prediction_type="v_prediction", backend="cpu")


@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_name("cosine", 50)


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).uniform(-1, 1, size=(3, 4, 1, 8, 8)).astype(np.float32)


def _trainer(schedule, seed=7):
    return Trainer(UNet(**CONFIG, rng=1), schedule, rng=np.random.default_rng(seed), **HP)


def _snapshot(tr):
    return {"params": {k: v.copy() for k, v in tr.model.params.items()},
            "ema": {k: v.copy() for k, v in tr.ema.params.items()},
            "m": {k: v.copy() for k, v in tr.optimizer.m.items()},
            "v": {k: v.copy() for k, v in tr.optimizer.v.items()}}


def _assert_same(a, b):
    for part in a:
        assert set(a[part]) == set(b[part])
        for k in a[part]:
            np.testing.assert_array_equal(a[part][k], b[part][k], err_msg=f"{part}/{k}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, schedule, data):
    """A trainer after 2 steps, saved once; returns (path, trainer snapshot, rng state)."""
    tr = _trainer(schedule)
    for i in range(2):
        tr.step(data[i])
    path = tmp_path_factory.mktemp("ckpt") / "model.npz"
    assert save_checkpoint(path, tr) == str(path)
    return str(path), tr


def _rewrite(src, dst, edit):
    """Copy the checkpoint at src to dst through edit(arrays_dict) (arrays re-saved with np.savez)."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def _edit_meta(arrays, fn):
    meta = json.loads(arrays["meta"].tobytes().decode())
    fn(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()


# ---- round trip and resume ----------------------------------------------------------------------

def test_round_trip_restores_everything(saved, schedule):
    path, tr = saved
    meta, arrays = read_checkpoint(path)
    assert meta["format_version"] == FORMAT_VERSION and int(arrays["format_version"]) == FORMAT_VERSION
    assert meta["step"] == 2 and meta["model_config"]["base_channels"] == 8
    assert all(a.dtype != object for a in arrays.values())
    loaded = load_checkpoint(path)
    assert loaded.step_count == 2 and loaded.hparams() == tr.hparams()
    assert loaded.schedule.name == "cosine"
    np.testing.assert_array_equal(loaded.schedule.betas, schedule.betas)
    assert isinstance(loaded.model, UNet) and loaded.model.config == tr.model.config
    _assert_same(_snapshot(tr), _snapshot(loaded))
    assert loaded.ema.num_updates == tr.ema.num_updates and loaded.ema.decay == 0.9
    assert loaded.rng.bit_generator.state == tr.rng.bit_generator.state
    assert loaded.ema_model.params is loaded.ema.params
    for ema in (True, False):
        model = load_model(path, ema=ema)
        src = tr.ema.params if ema else tr.model.params
        assert isinstance(model, UNet) and model.config == tr.model.config
        for k in src:
            np.testing.assert_array_equal(model.params[k], src[k])
        out = model(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 49]))  # usable as a sampler model
        assert out.shape == (2, 1, 8, 8) and np.all(np.isfinite(out))
    assert load_model(path, backend="cpu").backend == "cpu"
    assert load_checkpoint(path, backend="numpy").optimizer.backend == "numpy"
    with pytest.raises(ValueError, match="backend"):
        load_model(path, backend="tpu")


def test_resume_is_bit_for_bit(tmp_path, schedule, data):
    # uninterrupted: 5 steps (the warmup of 4 steps spans the interruption)
    ref = _trainer(schedule)
    ref_losses = [ref.step(data[i % 3]) for i in range(5)]
    # interrupted after 2 steps, saved, reloaded into a fresh process-like state, continued
    tr = _trainer(schedule)
    losses = [tr.step(data[i % 3]) for i in range(2)]
    path = tmp_path / "resume.npz"
    save_checkpoint(path, tr)
    del tr
    resumed = load_checkpoint(path)
    losses += [resumed.step(data[i % 3]) for i in range(2, 5)]
    assert losses == ref_losses  # exact float equality
    assert resumed.step_count == ref.step_count == 5
    _assert_same(_snapshot(ref), _snapshot(resumed))
    assert resumed.rng.bit_generator.state == ref.rng.bit_generator.state
    # saving again over the same path works (atomic replace of an existing file)
    save_checkpoint(path, resumed)
    assert load_checkpoint(path).step_count == 5


@pytest.mark.parametrize("bitgen", ["MT19937", "Philox", "SFC64"])
def test_other_bit_generators_round_trip(tmp_path, schedule, data, bitgen):
    tr = Trainer(UNet(**CONFIG, rng=1), schedule, rng=np.random.Generator(getattr(np.random, bitgen)(3)),
                 backend="cpu")
    tr.step(data[0])
    path = tmp_path / "bg.npz"
    save_checkpoint(path, tr)
    loaded = load_checkpoint(path)
    assert loaded.rng.random() == tr.rng.random()


# ---- atomic writes ------------------------------------------------------------------------------

def test_crash_inside_savez_leaves_previous_file_intact(tmp_path, saved, monkeypatch):
    path, tr = saved
    dst = tmp_path / "ckpt.npz"
    save_checkpoint(dst, tr)
    before = dst.read_bytes()

    def crashing_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half-written archive")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(dst, tr)
    assert dst.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]  # the temporary file was removed
    monkeypatch.undo()
    assert load_checkpoint(dst).step_count == 2


def test_crash_before_replace_leaves_previous_file_intact(tmp_path, saved, monkeypatch):
    path, tr = saved
    dst = tmp_path / "ckpt.npz"
    dst.write_bytes(b"previous contents")

    def failing_replace(src, dst_):
        raise OSError("simulated power loss before rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(dst, tr)
    assert dst.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]


def test_save_into_missing_directory(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "c.npz", saved[1])
    with pytest.raises(TypeError, match="Trainer"):
        save_checkpoint(tmp_path / "c.npz", object())


# ---- bad files ----------------------------------------------------------------------------------

def test_missing_and_non_regular(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    with pytest.raises(OSError, match="not a regular file"):
        load_model(tmp_path)


def test_empty_truncated_corrupted(tmp_path, saved):
    path, _ = saved
    raw = open(path, "rb").read()
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(empty)
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_checkpoint(trunc)
    for pos in (len(raw) // 3, len(raw) // 2, len(raw) - 3000):  # flip bytes inside array data
        bad = bytearray(raw)
        bad[pos] ^= 0x5A
        corrupt = tmp_path / "corrupt.npz"
        corrupt.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="corrupted or truncated"):
            load_model(corrupt)
    text = tmp_path / "text.npz"
    text.write_text("not a checkpoint at all\n")
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_checkpoint(text)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single .npy"):
        load_checkpoint(npy)


def test_pickles_are_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    pkl = tmp_path / "evil.npz"
    pkl.write_bytes(pickle.dumps({"params/w": Evil()}))
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(pkl)
    obj = tmp_path / "objects.npz"
    with open(obj, "wb") as f:
        np.savez(f, format_version=np.array(FORMAT_VERSION), meta=np.array([Evil()], dtype=object))
    with pytest.raises(ValueError, match="pickled object arrays"):
        load_checkpoint(obj)
    with pytest.raises(ValueError, match="pickled object arrays"):
        load_model(obj)
    assert not marker.exists()


def test_mismatched_files(tmp_path, saved):
    path, _ = saved
    key = "params/stem.w"

    def drop(a):
        del a[key]

    def extra(a):
        a["params/bogus"] = np.zeros(3, np.float32)

    def reshape(a):
        a["ema/stem.b"] = np.zeros(5, np.float32)

    def version(a):
        a["format_version"] = np.array(FORMAT_VERSION + 1)

    def no_meta(a):
        del a["meta"]

    def other_config(a):
        def f(meta):
            meta["model_config"]["base_channels"] = 16
            meta["model_config"]["groups"] = 4
        _edit_meta(a, f)

    def bad_config(a):
        _edit_meta(a, lambda meta: meta["model_config"].update(groups=3))

    def bad_rng(a):
        _edit_meta(a, lambda meta: meta["rng"].update(bit_generator="os.system"))

    def bad_step(a):
        a["step"] = np.array(99)

    def foreign_class(a):
        _edit_meta(a, lambda meta: meta.update(model_class="os.system"))

    cases = [(drop, f"missing.*{key}"), (extra, "unexpected.*params/bogus"), (reshape, "ema/stem.b is float32"),
             (version, "format version"), (no_meta, "no 'meta' entry"), (other_config, "another config"),
             (bad_config, "does not build"), (bad_rng, "invalid rng state"), (bad_step, "inconsistent step"),
             (foreign_class, "only 'difnumpy.nn.unet.UNet' is known")]
    for edit, msg in cases:
        dst = _rewrite(path, tmp_path / f"{edit.__name__}.npz", edit)
        with pytest.raises(ValueError, match=msg):
            load_checkpoint(dst)
    # load_model does not need the rng, but checks everything else
    with pytest.raises(ValueError, match="another config"):
        load_model(tmp_path / "other_config.npz")
    assert load_model(tmp_path / "bad_rng.npz").config["base_channels"] == 8
