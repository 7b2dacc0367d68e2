"""Checkpoints: round trip, bit-for-bit resume, atomic writes and refusal of bad files."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from difnumpy.checkpoint import (FORMAT_VERSION, RUN_METADATA_KEYS, load_checkpoint, load_model, read_checkpoint,
                                 read_metadata, save_checkpoint)
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
    """Everything a resumed run depends on, through the Trainer's public API."""
    opt = tr.optimizer.state_dict()
    ema = tr.ema.state_dict()
    return {"params": {k: v.copy() for k, v in tr.model.params.items()},
            "ema": {k: np.asarray(v).copy() for k, v in ema.items()},
            "optim": {k: np.asarray(v).copy() for k, v in opt.items()}}


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
    # written member by member (np.savez would take a key like "allow_pickle" as its own option)
    with zipfile.ZipFile(dst, "w") as z:
        for name, a in arrays.items():
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
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


# ---- the same file on every NumPy version (issue 14, item 1) -------------------------------------

def _expected_entries(tr):
    names = {"format_version", "meta", "step", "schedule/betas", "optim/step", "optim/lr", "optim/beta1",
             "optim/beta2", "optim/eps", "optim/weight_decay"}
    for k in tr.model.params:
        names |= {f"params/{k}", f"ema/{k}", f"optim/m/{k}", f"optim/v/{k}"}
    return names


def test_archive_holds_exactly_the_documented_entries(saved):
    path, tr = saved
    with zipfile.ZipFile(path) as z:
        names = {n[:-4] for n in z.namelist()}
        assert all(n.endswith(".npy") for n in z.namelist())
    assert names == _expected_entries(tr)  # no "allow_pickle" or any other stray entry


def test_savez_of_numpy_before_2_1_writes_a_loadable_file(tmp_path, saved, monkeypatch):
    """NumPy < 2.1's ``savez(file, *args, **kwds)`` stores every keyword as an array: a call like
    ``np.savez(f, allow_pickle=False, **arrays)`` then writes an extra entry and the loader refuses
    the file. Emulate that signature on any NumPy: the checkpoint must still round-trip."""
    def savez_before_2_1(file, *args, **kwds):  # numpy 1.24's savez: no options, every keyword is an array
        kwds.update({f"arr_{i}": a for i, a in enumerate(args)})
        with zipfile.ZipFile(file, "w") as z:
            for name, a in kwds.items():
                with z.open(name + ".npy", "w") as f:
                    np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=True)

    monkeypatch.setattr(np, "savez", savez_before_2_1)
    _, tr = saved
    dst = tmp_path / "old_numpy.npz"
    save_checkpoint(dst, tr)
    monkeypatch.undo()
    meta, arrays = read_checkpoint(dst)
    assert set(arrays) == _expected_entries(tr)
    _assert_same(_snapshot(tr), _snapshot(load_checkpoint(dst)))


def test_stray_allow_pickle_entry_is_refused_with_a_hint(tmp_path, saved):
    dst = _rewrite(saved[0], tmp_path / "stray.npz", lambda a: a.update(allow_pickle=np.array(False)))
    with pytest.raises(ValueError, match=r"unexpected \['allow_pickle'\].*NumPy < 2.1"):
        load_checkpoint(dst)


def test_object_arrays_are_never_written(tmp_path, saved, monkeypatch):
    from difnumpy import checkpoint

    _, tr = saved
    real = checkpoint._json_to_array
    monkeypatch.setattr(checkpoint, "_json_to_array", lambda obj: np.array([real(obj)], dtype=object))
    with pytest.raises(TypeError, match="'meta' has dtype object"):
        save_checkpoint(tmp_path / "obj.npz", tr)
    assert not os.listdir(tmp_path)


# ---- run metadata (issue 14, item 3) -------------------------------------------------------------

META = dict(image_shape=(1, 12, 16), data="digits", batch_size=4, seed=3)


def test_metadata_round_trip(tmp_path, saved):
    _, tr = saved
    path = tmp_path / "m.npz"
    save_checkpoint(path, tr, metadata=META)
    md = read_metadata(path)
    assert md == {"image_shape": (1, 12, 16), "data": "digits", "batch_size": 4, "seed": 3, "num_classes": None,
                  "schedule": "cosine", "num_timesteps": 50, "prediction_type": "v_prediction",
                  "format_version": FORMAT_VERSION}
    meta, _ = read_checkpoint(path)
    assert read_metadata(meta) == md and set(meta["run"]) == set(RUN_METADATA_KEYS)
    # the class count is the model's: a contradicting one is refused
    with pytest.raises(ValueError, match="num_classes=10 contradicts"):
        save_checkpoint(path, tr, metadata=dict(META, num_classes=10))
    # written without metadata: every run field is stored, as null (unknown), never a default
    save_checkpoint(path, tr)
    md = read_metadata(path)
    assert all(md[k] is None for k in RUN_METADATA_KEYS) and md["num_timesteps"] == 50


@pytest.mark.parametrize("bad, match", [
    (dict(colour="red"), "unknown key"),
    (dict(image_shape=(3, 8, 8)), "in_channels=1"),
    (dict(image_shape=(1, 12, 15)), "divisible"),          # two levels: H, W must be even
    (dict(image_shape=(1, 8)), r"\(C, H, W\)"),
    (dict(batch_size=0), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(data=""), "data"),
    (dict(num_classes=True), "num_classes"),
])
def test_bad_metadata_is_refused_before_writing(tmp_path, saved, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        save_checkpoint(tmp_path / "m.npz", saved[1], metadata=bad)
    assert not os.listdir(tmp_path)
    with pytest.raises(TypeError, match="metadata must be a dict"):
        save_checkpoint(tmp_path / "m.npz", saved[1], metadata=[("seed", 1)])


def _as_version_1(a):
    a["format_version"] = np.array(1)

    def f(meta):
        meta["format_version"] = 1
        del meta["run"]
    _edit_meta(a, f)


def test_version_1_files_load_without_run_metadata(tmp_path, saved):
    path, tr = saved
    old = _rewrite(path, tmp_path / "v1.npz", _as_version_1)
    _assert_same(_snapshot(tr), _snapshot(load_checkpoint(old)))
    md = read_metadata(old)
    assert md["format_version"] == 1 and all(md[k] is None for k in RUN_METADATA_KEYS)
    assert md["schedule"] == "cosine" and md["prediction_type"] == "v_prediction"


def test_missing_or_contradictory_metadata_is_refused(tmp_path, saved):
    path, _ = saved

    def no_run(a):
        _edit_meta(a, lambda meta: meta.pop("run"))

    def short_run(a):
        _edit_meta(a, lambda meta: meta["run"].pop("seed"))

    def wrong_channels(a):
        _edit_meta(a, lambda meta: meta["run"].update(image_shape=[3, 8, 8]))

    def wrong_T(a):
        _edit_meta(a, lambda meta: meta["schedule"].update(num_timesteps=1000))

    def v1_with_run(a):
        a["format_version"] = np.array(1)
        _edit_meta(a, lambda meta: meta.update(format_version=1))

    def header_version(a):
        _edit_meta(a, lambda meta: meta.update(format_version=1))

    for edit, msg in [(no_run, "lacks the 'run' field"), (short_run, "run metadata must have the keys"),
                      (wrong_channels, "in_channels=1"), (wrong_T, "T=1000.*50 values"),
                      (v1_with_run, "version 1 file has no 'run'"), (header_version, "says format version 1")]:
        dst = _rewrite(path, tmp_path / f"{edit.__name__}.npz", edit)
        with pytest.raises(ValueError, match=msg):
            read_metadata(dst)
        with pytest.raises(ValueError, match=msg):
            load_model(dst)


# ---- resume exactness on the default backend (issue 14, item 12) --------------------------------

def test_resume_is_bit_for_bit_on_the_default_cpu_backend(tmp_path, schedule, data):
    """The numba kernels (backend "cpu", the default of UNet and Trainer) resume exactly too."""
    config = dict(CONFIG)
    del config["backend"]
    hp = dict(HP)
    del hp["backend"]

    def make():
        tr = Trainer(UNet(**config, rng=1), schedule, rng=np.random.default_rng(5), **hp)
        assert tr.model.backend == "cpu" and tr.hparams()["backend"] == "cpu"
        return tr

    ref = make()
    ref_losses = [ref.step(data[i % 3]) for i in range(5)]
    tr = make()
    losses = [tr.step(data[i % 3]) for i in range(2)]
    path = tmp_path / "cpu.npz"
    save_checkpoint(path, tr, metadata=dict(image_shape=(1, 8, 8), data="test", batch_size=4, seed=5))
    del tr
    resumed = load_checkpoint(path)
    assert resumed.model.backend == "cpu" and resumed.hparams()["backend"] == "cpu"
    losses += [resumed.step(data[i % 3]) for i in range(2, 5)]
    assert losses == ref_losses  # exact float equality
    assert resumed.step_count == ref.step_count == 5
    _assert_same(_snapshot(ref), _snapshot(resumed))
    assert resumed.rng.bit_generator.state == ref.rng.bit_generator.state
