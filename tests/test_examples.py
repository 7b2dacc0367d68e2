"""Smoke tests of the example scripts: each ``main()`` runs end to end on tiny settings and writes what it promises.

The settings are chosen for speed (a few training steps, T = 20, base_channels = 8, 2-5 sampling steps), not
quality: these tests check that the scripts run against the current API and write valid PNG files; the
quality figures are in each script's printed output on its default settings.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
from matplotlib.image import imread

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY_UNET = ["--timesteps", "20", "--base-channels", "8"]


def load_example(name):
    """Import examples/<name>.py as a module (the file names start with digits, so no plain import)."""
    path = os.path.join(EXAMPLES, name + ".py")
    spec = importlib.util.spec_from_file_location("example_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path):
    assert os.path.isfile(path), f"missing {path}"
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    img = imread(path)  # decodes the whole file: a truncated PNG fails here
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert np.ptp(img[..., :3]) > 0, f"{path} is blank"


def no_temp_files(directory):
    left = [f for f in os.listdir(directory) if f.endswith(".tmp") or f.startswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Example 03 on a tiny budget; its checkpoint feeds 04 and 05."""
    out = tmp_path_factory.mktemp("ex03")
    metrics = load_example("03_train_digits").main(
        ["--out", str(out), "--minutes", "0.05", "--steps", "3", "--ddim-steps", "2", "-n", "8", *TINY_UNET])
    return out, metrics


def test_02_toy_2d(tmp_path, capsys):
    res = load_example("02_toy_2d").main(["--out", str(tmp_path), "--steps", "30", "--timesteps", "10",
                                          "--hidden", "16", "-n", "200", "--batch-size", "64"])
    for name in ("toy_2d_reverse.png", "toy_2d_loss.png"):
        assert_png(tmp_path / name)
    no_temp_files(tmp_path)
    assert np.isfinite(res["precision"]) and res["precision"] > 0
    # the floor (two draws of the data) must beat Gaussian noise, or the check measures nothing
    assert res["floor_precision"] < res["noise_precision"]
    assert "precision" in capsys.readouterr().out


def test_03_train_digits(digits_run):
    out, metrics = digits_run
    for name in ("samples.png", "loss.png"):
        assert_png(out / name)
    no_temp_files(out)
    from difnumpy import load_model

    model = load_model(out / "checkpoint.npz")
    assert model.config["base_channels"] == 8
    assert {"fd", "fd_floor", "confident_fraction"} <= set(metrics)
    assert np.isfinite(metrics["fd"])


def test_04_ddpm_vs_ddim_from_checkpoint(digits_run, tmp_path, capsys):
    ckpt = str(digits_run[0] / "checkpoint.npz")
    rows = load_example("04_ddpm_vs_ddim").main(
        ["--out", str(tmp_path), "--checkpoint", ckpt, "--ddim-steps", "2,5,50", "--etas", "0,1", "-n", "4",
         "--n-ddpm", "3"])
    assert_png(tmp_path / "ddpm_vs_ddim.png")
    no_temp_files(tmp_path)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    # DDPM-T, then DDIM for S in {2, 5} (50 > T = 20 is skipped, and says so) x eta in {0, 1}
    assert [(r["method"], r["steps"], r["eta"]) for r in saved["rows"]] == \
        [("DDPM", 20, 1.0), ("DDIM", 2, 0.0), ("DDIM", 2, 1.0), ("DDIM", 5, 0.0), ("DDIM", 5, 1.0)]
    assert saved["rows"][0]["n"] == 3 and all(r["n"] == 4 for r in saved["rows"][1:])
    assert all(np.isfinite(r["fd"]) and r["seconds"] >= 0 for r in rows)
    assert "skipping DDIM step counts > T = 20: [50]" in capsys.readouterr().out


def test_04_ddpm_vs_ddim_trains_without_checkpoint(tmp_path):
    load_example("04_ddpm_vs_ddim").main(
        ["--out", str(tmp_path), "--train-minutes", "0.05", "--train-steps", "2", *TINY_UNET,
         "--ddim-steps", "2", "--etas", "0", "-n", "3"])
    assert_png(tmp_path / "ddpm_vs_ddim.png")


def test_05_ddim_inversion_from_checkpoint(digits_run, tmp_path):
    ckpt = str(digits_run[0] / "checkpoint.npz")
    res = load_example("05_ddim_inversion").main(
        ["--out", str(tmp_path), "--checkpoint", ckpt, "--steps", "3", "--check-steps", "2,5", "--n-check", "4",
         "--n-interp", "3"])
    assert_png(tmp_path / "ddim_inversion.png")
    no_temp_files(tmp_path)
    assert np.isfinite(res["reconstruction_rms"])


def test_05_ddim_inversion_trains_without_checkpoint(tmp_path):
    load_example("05_ddim_inversion").main(
        ["--out", str(tmp_path), "--train-minutes", "0.05", "--train-steps", "2", *TINY_UNET, "--steps", "2",
         "--check-steps", "2", "--n-check", "2", "--n-interp", "3", "--digits", "1,7"])
    assert_png(tmp_path / "ddim_inversion.png")


def test_05_slerp_formula():
    slerp = load_example("05_ddim_inversion").slerp
    rng = np.random.default_rng(0)
    z0, z1 = rng.standard_normal((2, 1, 8, 8))
    np.testing.assert_allclose(slerp(z0, z1, 0.0), z0, atol=1e-12)
    np.testing.assert_allclose(slerp(z0, z1, 1.0), z1, atol=1e-12)
    # orthonormal endpoints: the path stays on the unit circle, at angle a * pi/2 from e0
    e0, e1 = np.zeros(64), np.zeros(64)
    e0[0], e1[1] = 1.0, 1.0
    for a in (0.25, 0.5, 0.8):
        np.testing.assert_allclose(slerp(e0, e1, a)[:2], [np.cos(a * np.pi / 2), np.sin(a * np.pi / 2)])


def test_06_solver_orders(tmp_path):
    res = load_example("06_solver_orders").main(["--out", str(tmp_path), "--quick"])
    assert_png(tmp_path / "solver_orders.png")
    no_temp_files(tmp_path)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert set(saved["ode"]) == set(res["ode"]) and len(saved["ode"]) == 6
    for r in saved["ode"].values():
        assert len(r["errors"]) == len(saved["steps"]) and all(np.isfinite(r["errors"]))
    # even three step counts (8, 16, 32) separate the first-order methods from the second-order ones
    assert saved["ode"]["Heun"]["errors"][-1] < saved["ode"]["Euler"]["errors"][-1]
    assert set(saved["stochastic"]) == {"euler_ancestral", "dpmpp_2m_sde"}
