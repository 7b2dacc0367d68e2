"""Tests for difnumpy.viz: every figure is a valid PNG, written atomically."""
import os
import struct
import zlib

import numpy as np
import pytest
from matplotlib.figure import Figure

from difnumpy import viz

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    """A complete PNG: signature, IHDR first, IEND last, every chunk CRC correct."""
    raw = open(path, "rb").read()
    assert raw[:8] == PNG_SIG, "missing PNG signature"
    pos, chunks = 8, []
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        ctype = raw[pos + 4:pos + 8]
        body = raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(ctype + body) & 0xFFFFFFFF == crc, f"bad CRC in chunk {ctype!r}"
        chunks.append(ctype)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and pos == len(raw)
    w, h = struct.unpack(">II", raw[16:24])
    assert w > 20 and h > 20
    return w, h


def _no_temp_files(directory):
    leftovers = [f for f in os.listdir(directory) if f.endswith(".tmp")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def _images(n=12, c=1, h=8, w=8, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, c, h, w)).astype(np.float32)


class _FakeSchedule:
    """Duck-typed schedule for schedule_curves (alphas_cumprod, snr, num_timesteps)."""

    def __init__(self, T, zero_terminal=False):
        betas = np.linspace(1e-4, 0.02, T)
        self.alphas_cumprod = np.cumprod(1 - betas)
        if zero_terminal:
            self.alphas_cumprod[-1] = 0.0
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self.num_timesteps = T


def _call_each(tmp_path):
    """Call every figure function once; return the paths written."""
    x = _images()
    paths = {
        "grid": viz.image_grid(x, tmp_path / "grid.png", nrow=4, title="grid"),
        "grid_rgb": viz.image_grid(_images(5, c=3, h=6, w=10), str(tmp_path / "rgb.png")),
        "traj": viz.trajectory_strip([x[:3] * s for s in (1.0, 0.5, 0.0)], [999, 500, 0],
                                     tmp_path / "traj.png", title="trajectory"),
        "sched": viz.schedule_curves({"a": _FakeSchedule(100), "zsnr": _FakeSchedule(50, True)},
                                     tmp_path / "sched.png"),
        "loss": viz.loss_curve(np.arange(200), 1.0 / (1 + np.arange(200)), tmp_path / "loss.png"),
        "cmp": viz.compare_grid({"DDPM": x, "DDIM": x[:6]}, tmp_path / "cmp.png", title="vs"),
    }
    return paths


def test_every_function_writes_a_valid_png(tmp_path):
    paths = _call_each(tmp_path)
    for name, p in paths.items():
        assert isinstance(p, str) and os.path.isfile(p), name
        _assert_png(p)
    _no_temp_files(tmp_path)
    src = open(viz.__file__).read()  # viz never uses pyplot's global state
    assert "import pyplot" not in src and "matplotlib.pyplot" not in src


def test_forward_process_strip(tmp_path):
    from difnumpy.schedules import Schedule

    sch = Schedule.from_name("linear", 100)
    p = viz.forward_process_strip(sch, _images(3), [0, 10, 50, 99], tmp_path / "fwd.png",
                                  np.random.default_rng(0))
    _assert_png(p)
    _no_temp_files(tmp_path)
    with pytest.raises(TypeError, match="rng"):
        viz.forward_process_strip(sch, _images(3), [0], tmp_path / "f2.png", 0)
    assert not (tmp_path / "f2.png").exists()


def test_make_grid_layout():
    x = np.stack([np.full((1, 2, 3), v, dtype=np.float32) for v in (-1.0, 0.0, 0.5)])
    g = viz.make_grid(x, nrow=2, padding=1, pad_value=9.0)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    np.testing.assert_array_equal(g[1:3, 1:4, 0], -1.0)
    np.testing.assert_array_equal(g[1:3, 5:8, 0], 0.0)
    np.testing.assert_array_equal(g[4:6, 1:4, 0], 0.5)
    np.testing.assert_array_equal(g[4:6, 5:8, 0], 9.0)  # empty cell stays padding
    assert g[0].tolist() == [[9.0]] * 9


def test_overwrite_replaces_file(tmp_path):
    p = tmp_path / "g.png"
    p.write_bytes(b"old")
    viz.image_grid(_images(), p)
    _assert_png(p)
    _no_temp_files(tmp_path)


def test_failing_write_leaves_existing_file_intact(tmp_path, monkeypatch):
    p = tmp_path / "keep.png"
    viz.image_grid(_images(4), p)
    before = p.read_bytes()

    def broken_savefig(self, fh, *a, **k):
        fh.write(PNG_SIG + b"half a figure")  # partial output, then failure
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    for call in (
        lambda: viz.image_grid(_images(9, seed=1), p),
        lambda: viz.loss_curve([1, 2, 3], [3.0, 2.0, 1.0], p),
        lambda: viz.compare_grid({"a": _images(2)}, p),
    ):
        with pytest.raises(OSError, match="disk full"):
            call()
        assert p.read_bytes() == before
        _no_temp_files(tmp_path)


def test_interrupt_during_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(self, fh, *a, **k):
        fh.write(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        viz.image_grid(_images(2), tmp_path / "new.png")
    assert os.listdir(tmp_path) == []


def test_creates_missing_parent_directory(tmp_path):
    p = viz.image_grid(_images(2), tmp_path / "a" / "b" / "g.png")
    _assert_png(p)


def test_bad_arguments(tmp_path):
    x = _images()
    with pytest.raises(ValueError, match="path"):
        viz.image_grid(x, tmp_path / "g.jpg")
    with pytest.raises(ValueError, match="images"):
        viz.image_grid(x[:, 0], tmp_path / "g.png")
    with pytest.raises(ValueError, match="images"):
        viz.image_grid(np.zeros((2, 2, 4, 4)), tmp_path / "g.png")
    with pytest.raises(TypeError, match="images"):
        viz.image_grid(x.tolist(), tmp_path / "g.png")
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        viz.image_grid(nan, tmp_path / "g.png")
    with pytest.raises(ValueError, match="nrow"):
        viz.image_grid(x, tmp_path / "g.png", nrow=0)
    with pytest.raises(ValueError, match="ts"):
        viz.trajectory_strip([x, x], [1], tmp_path / "t.png")
    with pytest.raises(ValueError, match="same shape"):
        viz.trajectory_strip([x, x[:2]], [1, 0], tmp_path / "t.png")
    with pytest.raises(ValueError, match="steps and losses"):
        viz.loss_curve([1, 2], [1.0], tmp_path / "l.png")
    with pytest.raises(ValueError, match="window"):
        viz.loss_curve([1, 2], [1.0, 2.0], tmp_path / "l.png", window=0)
    with pytest.raises(ValueError, match="schedules"):
        viz.schedule_curves({}, tmp_path / "s.png")
    with pytest.raises(TypeError, match="schedules"):
        viz.schedule_curves({"x": object()}, tmp_path / "s.png")
    with pytest.raises(ValueError, match="grids"):
        viz.compare_grid({}, tmp_path / "c.png")
    assert os.listdir(tmp_path) == []  # nothing written by any failing call


def test_moving_average_is_centred_and_exact():
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(viz._moving_average(v, 3), [1.5, 2.0, 3.0, 4.0, 4.5])
    np.testing.assert_array_equal(viz._moving_average(v, 1), v)


def test_loss_curve_skips_non_finite(tmp_path):
    losses = np.array([1.0, 0.5, np.nan, np.inf, 0.25])
    _assert_png(viz.loss_curve(np.arange(5), losses, tmp_path / "l.png"))
    _assert_png(viz.loss_curve(np.arange(2), [np.nan, np.nan], tmp_path / "l2.png"))
    # negative losses: linear axis chosen automatically
    _assert_png(viz.loss_curve(np.arange(3), [-1.0, 0.0, 1.0], tmp_path / "l3.png"))
    _assert_png(viz.loss_curve(np.arange(500), np.exp(-np.arange(500) / 100.0), tmp_path / "l4.png"))
