"""The command line of conditional generation and of the solvers (issues 11 and 12), end to end on tiny runs:
``train --conditional``, ``sample --class-labels/--guidance-scale/--method/--karras``, ``inpaint`` and
``demo --conditional``; the files they write and the errors they refuse with."""
import json

import numpy as np
import pytest

from difnumpy.checkpoint import read_metadata
from difnumpy.cli import main
from difnumpy.cli.demo import COND_LABEL_DROPOUT
from difnumpy.data import load_digits
from difnumpy.samplers import METHODS
from test_cli import _one_line_error

TINY = ["--steps", "4", "--base-channels", "8", "--groups", "4", "--timesteps", "20", "--batch-size", "16",
        "--backend", "numpy", "--no-progress", "--log-every", "2"]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    assert main(["train", "--out", str(out), "--conditional", "--label-dropout", "0.2"] + TINY) == 0
    return out


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("uncond") / "run"
    assert main(["train", "--out", str(out)] + TINY) == 0
    return str(out / "checkpoint.npz")


_error = _one_line_error  # one line on stderr, the exit status, no traceback (tests/test_cli.py)


# ------------------------------------------------------------------------------ train --conditional
def test_train_conditional(cond_run, capsys):
    ckpt = cond_run / "checkpoint.npz"
    assert read_metadata(str(ckpt))["num_classes"] == 10
    cfg = json.loads((cond_run / "config.json").read_text())
    assert cfg["conditional"] is True and cfg["label_dropout"] == 0.2
    # --resume recovers the conditional model and its label dropout from the checkpoint ...
    assert main(["train", "--out", str(cond_run), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert read_metadata(str(ckpt))["num_classes"] == 10
    # ... and refuses to change them
    _error(capsys, main(["train", "--out", str(cond_run), "--resume", "--steps", "6", "--label-dropout", "0.5",
                         "--no-progress"]), 1, "label_dropout (0.2 in the checkpoint, 0.5 given)")


def test_train_conditional_errors(tmp_path, capsys):
    idx = tmp_path / "imgs-idx3-ubyte"
    img = np.zeros((20, 8, 8), np.uint8)
    idx.write_bytes(bytes([0, 0, 8, 3]) + np.asarray(img.shape, ">u4").tobytes() + img.tobytes())
    _error(capsys, main(["train", "--out", str(tmp_path / "a"), "--conditional", "--data", str(idx)] + TINY), 2,
           "only data='digits' has")
    _error(capsys, main(["train", "--out", str(tmp_path / "b"), "--label-dropout", "0.2"] + TINY), 2,
           "--label-dropout applies to conditional runs only")
    _error(capsys, main(["train", "--out", str(tmp_path / "c"), "--conditional", "--label-dropout", "2"] + TINY), 2,
           "--label-dropout")
    assert not any((tmp_path / d).exists() for d in "abc")


# ------------------------------------------------------------------------------ sample
def test_sample_class_labels(cond_run, tmp_path):
    ckpt = str(cond_run / "checkpoint.npz")
    base = ["sample", "--checkpoint", ckpt, "--steps", "3", "--no-progress", "--seed", "1"]
    assert main(base + ["-n", "13", "--class-labels", "all", "--guidance-scale", "3",
                        "--out", str(tmp_path / "a")]) == 0
    x = np.load(tmp_path / "a" / "samples.npy", allow_pickle=False)
    y = np.load(tmp_path / "a" / "labels.npy", allow_pickle=False)
    assert x.shape == (13, 1, 8, 8) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert y.dtype == np.int64 and y.tolist() == list(range(10)) + [0, 1, 2]  # "all" cycles 0..K-1
    assert (tmp_path / "a" / "samples.png").stat().st_size > 100
    assert main(base + ["-n", "5", "--class-labels", "0,3,7", "--guidance-scale", "3", "--guidance-rescale", "0.7",
                        "--batch-size", "2", "--out", str(tmp_path / "b")]) == 0
    assert np.load(tmp_path / "b" / "labels.npy").tolist() == [0, 3, 7, 0, 3]
    # the same seed and labels give the same samples; guidance changes them
    assert main(base + ["-n", "13", "--class-labels", "all", "--guidance-scale", "3",
                        "--out", str(tmp_path / "c")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "samples.npy"), x)
    assert main(base + ["-n", "13", "--class-labels", "all", "--out", str(tmp_path / "d")]) == 0
    assert not np.array_equal(np.load(tmp_path / "d" / "samples.npy"), x)
    # without labels a conditional checkpoint samples unconditionally (the "no class" row) and writes no labels
    assert main(base + ["-n", "3", "--out", str(tmp_path / "e")]) == 0
    assert not (tmp_path / "e" / "labels.npy").exists()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ddpm"])
def test_sample_every_method_with_labels(cond_run, tmp_path, method):
    argv = ["sample", "--checkpoint", str(cond_run / "checkpoint.npz"), "--method", method, "--steps", "3", "-n", "4",
            "--class-labels", "2", "--guidance-scale", "2", "--out", str(tmp_path / "s"), "--no-progress"]
    karras = method not in ("ddpm", "ddim")
    assert main(argv + (["--karras"] if karras else [])) == 0
    x = np.load(tmp_path / "s" / "samples.npy")
    assert x.shape == (4, 1, 8, 8) and np.all(np.isfinite(x))
    assert np.load(tmp_path / "s" / "labels.npy").tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("args, code, needles", [
    (["--class-labels", "10"], 2, ["class(es) [10] out of range", "0..9"]),
    (["--class-labels", "3,12,11"], 2, ["[11, 12] out of range"]),
    (["--class-labels", "x"], 2, ["--class-labels", "'all' or comma-separated"]),
    (["--class-labels", "-1"], 2, ["--class-labels"]),
    (["--guidance-scale", "2"], 2, ["--guidance-scale needs --class-labels"]),
    (["--guidance-rescale", "0.5"], 2, ["--guidance-rescale needs --class-labels"]),
    (["--class-labels", "1", "--guidance-scale", "-1"], 2, ["--guidance-scale"]),
    (["--class-labels", "1", "--guidance-rescale", "2"], 2, ["--guidance-rescale"]),
    (["--method", "ddim", "--karras"], 2, ["--karras", "dpmpp_2m"]),
    (["--method", "ddpm", "--karras"], 2, ["--karras"]),
    (["--method", "euler", "--eta", "0.5"], 2, ["--eta applies to --method ddim only"]),
])
def test_sample_errors(cond_run, tmp_path, capsys, args, code, needles):
    out = tmp_path / "out"
    _error(capsys, main(["sample", "--checkpoint", str(cond_run / "checkpoint.npz"), "--out", str(out),
                         "--no-progress", "-n", "2"] + args), code, *needles)
    assert not out.exists()


def test_class_labels_need_a_conditional_checkpoint(uncond_ckpt, tmp_path, capsys):
    _error(capsys, main(["sample", "--checkpoint", uncond_ckpt, "--class-labels", "all", "--out",
                         str(tmp_path / "o"), "--no-progress"]), 2, "needs a class-conditional model",
           "train --conditional")
    _error(capsys, main(["inpaint", "--checkpoint", uncond_ckpt, "--images", "test", "--mask", "top", "-n", "2",
                         "--class-labels", "1", "--steps", "4", "--out", str(tmp_path / "o"), "--no-progress"]), 2,
           "needs a class-conditional model")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ inpaint
INPAINT = ["--steps", "4", "--jump-length", "2", "--jump-n-sample", "2", "--no-progress"]


def test_inpaint_test_digits(cond_run, tmp_path, capsys):
    out = tmp_path / "i"
    assert main(["inpaint", "--checkpoint", str(cond_run / "checkpoint.npz"), "--images", "test", "--mask", "bottom",
                 "-n", "5", "--out", str(out), "--batch-size", "3"] + INPAINT) == 0
    assert "classifier names the true digit" in capsys.readouterr().out
    done, orig = np.load(out / "inpainted.npy"), np.load(out / "originals.npy")
    mask, labels = np.load(out / "mask.npy"), np.load(out / "labels.npy")
    x_test, y_test = load_digits("test", return_labels=True)
    assert done.shape == orig.shape == (5, 1, 8, 8) and done.dtype == orig.dtype == np.float32
    np.testing.assert_array_equal(orig, x_test[:5])
    assert labels.dtype == np.int64 and labels.tolist() == y_test[:5].tolist()
    assert mask.shape == (5, 1, 8, 8) and mask.dtype == np.float32
    assert np.all(mask[:, :, :4] == 1) and np.all(mask[:, :, 4:] == 0)  # bottom: the bottom half is generated
    known = mask == 1
    np.testing.assert_array_equal(done[known], orig[known])  # the known half exactly
    assert not np.array_equal(done[~known], orig[~known])
    assert (out / "inpainting.png").stat().st_size > 100 and not (out / "class_labels.npy").exists()


@pytest.mark.parametrize("name, generated", [
    ("top", (slice(0, 4), slice(None))), ("left", (slice(None), slice(0, 4))),
    ("right", (slice(None), slice(4, 8))), ("center", (slice(2, 6), slice(2, 6)))])
def test_inpaint_named_masks(cond_run, tmp_path, name, generated):
    out = tmp_path / name
    assert main(["inpaint", "--checkpoint", str(cond_run / "checkpoint.npz"), "--images", "test", "--mask", name,
                 "-n", "2", "--out", str(out), "--steps", "2", "--jump-n-sample", "1", "--no-progress"]) == 0
    want = np.ones((8, 8), np.float32)
    want[generated] = 0
    mask = np.load(out / "mask.npy")
    assert np.all(mask == want)
    done, orig = np.load(out / "inpainted.npy"), np.load(out / "originals.npy")
    np.testing.assert_array_equal(done[mask == 1], orig[mask == 1])


def test_inpaint_files_and_labels(cond_run, tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float64)
    np.save(tmp_path / "imgs.npy", imgs)
    m = (rng.random((8, 8)) < 0.5).astype(np.uint8)
    np.save(tmp_path / "m.npy", m)
    out = tmp_path / "o"
    assert main(["inpaint", "--checkpoint", str(cond_run / "checkpoint.npz"), "--images", str(tmp_path / "imgs.npy"),
                 "--mask", str(tmp_path / "m.npy"), "--out", str(out), "--class-labels", "all",
                 "--guidance-scale", "2"] + INPAINT) == 0
    done, mask = np.load(out / "inpainted.npy"), np.load(out / "mask.npy")
    assert done.shape == (4, 1, 8, 8) and np.all(mask == m)
    np.testing.assert_array_equal(done[mask == 1], imgs.astype(np.float32)[mask == 1])
    assert not (out / "labels.npy").exists()  # no true labels for a file of images
    assert np.load(out / "class_labels.npy").tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("what, code, needles", [
    ("n", 2, ["-n 400 exceeds the 360 images of --images test"]),
    ("mask_values", 2, ["must hold only 0 (to generate) and 1 (known)"]),
    ("mask_shape", 2, ["--mask", "must have shape (8, 8)"]),
    ("mask_missing", 1, ["--mask", "no such file"]),
    ("images_range", 2, ["in [-1, 1]"]),
    ("images_shape", 2, ["(N, 1, 8, 8)"]),
    ("guidance", 2, ["--guidance-scale needs --class-labels"]),
    ("steps", 2, ["--steps 21 exceeds", "T=20"]),
])
def test_inpaint_errors(cond_run, tmp_path, capsys, what, code, needles):
    np.save(tmp_path / "m3.npy", np.full((8, 8), 0.5))
    np.save(tmp_path / "m_shape.npy", np.ones((4, 4)))
    np.save(tmp_path / "big.npy", np.full((2, 1, 8, 8), 3.0))
    np.save(tmp_path / "shape.npy", np.zeros((2, 8, 8)))
    args = {"n": ["--images", "test", "--mask", "top", "-n", "400"],
            "mask_values": ["--images", "test", "--mask", str(tmp_path / "m3.npy")],
            "mask_shape": ["--images", "test", "--mask", str(tmp_path / "m_shape.npy")],
            "mask_missing": ["--images", "test", "--mask", str(tmp_path / "nope.npy")],
            "images_range": ["--images", str(tmp_path / "big.npy"), "--mask", "top"],
            "images_shape": ["--images", str(tmp_path / "shape.npy"), "--mask", "top"],
            "guidance": ["--images", "test", "--mask", "top", "--guidance-scale", "2"],
            "steps": ["--images", "test", "--mask", "top", "--steps", "21"]}[what]
    out = tmp_path / "out"
    _error(capsys, main(["inpaint", "--checkpoint", str(cond_run / "checkpoint.npz"), "--out", str(out),
                         "--no-progress", "-n", "2", "--steps", "4"] + args), code, *needles)
    assert not out.exists()


# ------------------------------------------------------------------------------ demo --conditional
# (no --minutes: the training budget is what the predicted sampling leaves of 10 min; --steps 4 ends it first)
TINY_DEMO = ["--steps", "4", "--timesteps", "20", "--base-channels", "8", "--batch-size", "16",
             "--n-eval", "20", "--ddim-steps", "3", "--n-inpaint", "6", "--inpaint-steps", "3", "--jump-length", "1",
             "--jump-n-sample", "2", "--backend", "numpy", "--no-progress"]


def test_demo_conditional(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--conditional", "--out", str(out), "--guidance-scale", "3"] + TINY_DEMO) == 0
    assert "goal_accuracy_97" in capsys.readouterr().out
    for f in ("checkpoint.npz", "class_grid.png", "guidance_sweep.png", "inpainting.png", "metrics.json", "loss.png",
              "samples.npy", "labels.npy"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert read_metadata(str(out / "checkpoint.npz"))["num_classes"] == 10
    m = json.loads((out / "metrics.json").read_text())
    assert m["guidance_scale"] == 3.0 and m["n_samples"] == 20 and m["train_steps"] == 4
    assert m["predicted_sampling_seconds"] > 0 and 1 <= m["train_budget_minutes"] <= 8.5
    assert len(m["per_class_accuracy"]) == 10 and 0 <= m["accuracy"] <= 1
    assert m["fd_ratio"] == pytest.approx(m["fd"] / m["fd_floor"])
    assert [s["guidance_scale"] for s in m["guidance_sweep"]] == [0.0, 1.0, 2.0, 3.0, 4.0, 8.0]
    assert m["inpainting"]["known_region_exact"] is True and m["inpainting"]["n"] == 6
    assert 0 <= m["inpainting"]["label_agreement"] <= 1 and m["label_dropout"] == COND_LABEL_DROPOUT
    for k in ("goal_accuracy_97", "goal_fd_within_2x_floor", "goal_inpainting_75"):
        assert isinstance(m[k], bool)
    assert np.load(out / "labels.npy").tolist() == list(range(10)) * 2
    # the demo's checkpoint takes class labels
    assert main(["sample", "--checkpoint", str(out / "checkpoint.npz"), "-n", "2", "--steps", "2",
                 "--class-labels", "5", "--out", str(tmp_path / "s"), "--no-progress"]) == 0


def test_demo_conditional_flags_need_conditional(tmp_path, capsys):
    _error(capsys, main(["demo", "--out", str(tmp_path / "d"), "--guidance-scale", "2"] + TINY_DEMO), 2,
           "--guidance-scale applies to 'difnumpy demo --conditional' only")
    _error(capsys, main(["demo", "--conditional", "--out", str(tmp_path / "d"), "--n-inpaint", "400"]), 2,
           "--n-inpaint 400 exceeds the 360 test digits")
    assert not (tmp_path / "d" / "checkpoint.npz").exists()


def test_labelled_rows_figure(tmp_path):
    from difnumpy import viz

    rows = [np.zeros((3, 1, 8, 8)), np.ones((2, 1, 8, 8))]
    p = viz.labelled_rows(rows, ["a", "bb"], tmp_path / "f.png", title="t", col_labels=["0", "1", "2"])
    assert p.endswith("f.png") and (tmp_path / "f.png").stat().st_size > 100
    with pytest.raises(ValueError, match="one entry per row"):
        viz.labelled_rows(rows, ["a"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="share C, H, W"):
        viz.labelled_rows([np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 4, 4))], ["a", "b"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="one entry per column"):
        viz.labelled_rows(rows, ["a", "b"], tmp_path / "g.png", col_labels=["0"])
