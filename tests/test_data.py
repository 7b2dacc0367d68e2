"""Tests for difnumpy.data: digits, IDX files, 2-D toy sets, the batch iterator."""
import gzip
import hashlib

import numpy as np
import pytest

from difnumpy import data
from difnumpy.data import iterate_batches, load_digits, load_idx, make_toy_2d


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_dtype_range():
    x_tr, y_tr = load_digits("train", return_labels=True)
    x_te, y_te = load_digits("test", return_labels=True)
    x_all = load_digits("all")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_all.shape == (1797, 1, 8, 8)
    assert (data.DIGITS_NUM_TRAIN, data.DIGITS_NUM_TEST) == (1437, 360)
    for x in (x_tr, x_te, x_all):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert x.min() == -1.0 and x.max() == 1.0
        # values are exactly k/8 - 1 for integer k in 0..16
        k = (x.astype(np.float64) + 1.0) * 8.0
        np.testing.assert_array_equal(k, np.round(k))
    assert y_tr.dtype == np.int64 and y_tr.shape == (1437,) and y_te.shape == (360,)
    # every class present in near-equal proportion in both splits
    assert np.bincount(y_tr, minlength=10).min() >= 130
    assert np.bincount(y_te, minlength=10).min() >= 30
    # the splits partition "all", in order
    np.testing.assert_array_equal(np.concatenate([x_tr, x_te]), x_all)


# sha256 prefixes of the split's labels (little-endian int64) and pixels (little-endian
# float32): pinned, so any change of the split (or of sklearn's data) fails loudly.
_SPLIT_HASHES = {
    "train": ("cb6863cc760a900d", "f2708b788f4583cc"),
    "test": ("58c508427633b293", "a278653a530ca3ae"),
}


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_split_is_stable(split):
    x, y = load_digits(split, return_labels=True)
    h_y = hashlib.sha256(y.astype("<i8").tobytes()).hexdigest()[:16]
    h_x = hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()[:16]
    assert (h_y, h_x) == _SPLIT_HASHES[split]
    # two calls give identical arrays (no RNG involved)
    np.testing.assert_array_equal(load_digits(split), x)


def test_digits_split_is_sklearn_order():
    from sklearn.datasets import load_digits as sk

    raw = sk()
    x_te, y_te = load_digits("test", return_labels=True)
    np.testing.assert_array_equal(y_te, raw.target[1437:])
    np.testing.assert_array_equal(x_te.reshape(360, 64), (raw.data[1437:] / 8 - 1).astype(np.float32))
    assert y_te[:10].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 0, 9]


@pytest.mark.parametrize("bad", ["val", "TRAIN", None, 0])
def test_digits_bad_split(bad):
    with pytest.raises(ValueError, match="split"):
        load_digits(bad)


# ----------------------------------------------------------------------------- IDX
def _idx_bytes(arr, code=0x08, magic=None):
    arr = np.asarray(arr)
    head = bytes([0, 0, code, arr.ndim]) if magic is None else magic
    dims = np.asarray(arr.shape, dtype=">u4").tobytes()
    return head + dims + arr.astype(np.uint8).tobytes()


def _write(path, payload, compress=False):
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 7, 6), dtype=np.uint8)
    img[0, 0, 0], img[0, 0, 1] = 0, 255
    lab = rng.integers(0, 10, size=5, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    p_img = _write(tmp_path / f"img-idx3-ubyte{suffix}", _idx_bytes(img), compress)
    p_lab = _write(tmp_path / f"lab-idx1-ubyte{suffix}", _idx_bytes(lab), compress)
    x = load_idx(p_img)
    y = load_idx(str(p_lab))
    assert x.shape == (5, 1, 7, 6) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x[:, 0], img / 127.5 - 1.0, atol=1e-6)
    assert y.dtype == np.int64 and y.shape == (5,)
    np.testing.assert_array_equal(y, lab)


def test_idx_gzip_detected_by_content(tmp_path):
    lab = np.arange(4, dtype=np.uint8)
    p = _write(tmp_path / "labels.bin", _idx_bytes(lab), compress=True)  # no .gz suffix
    np.testing.assert_array_equal(load_idx(p), lab)


def _malformed_cases():
    img = np.zeros((3, 4, 4), dtype=np.uint8)
    good = _idx_bytes(img)
    return {
        "bad_magic": (b"\x08\x03\x00\x00" + good[4:], "magic"),
        "float_code": (bytes([0, 0, 0x0D, 3]) + good[4:], "not supported"),
        "unknown_code": (bytes([0, 0, 0x42, 3]) + good[4:], "unknown IDX type code"),
        "ndim_2": (bytes([0, 0, 0x08, 2]) + good[4:], "dimensions"),
        "truncated_data": (good[:-5], "truncated"),
        "trailing_data": (good + b"\x00\x00", "trailing"),
        "truncated_header": (good[:9], "truncated IDX header"),
        "tiny": (b"\x00\x00", "not an IDX file"),
        "empty": (b"", "not an IDX file"),
        "size_mismatch": (bytes([0, 0, 8, 3]) + np.asarray([3, 5, 4], ">u4").tobytes()
                          + bytes(48), "truncated"),
    }


@pytest.mark.parametrize("case", sorted(_malformed_cases()))
@pytest.mark.parametrize("compress", [False, True])
def test_idx_malformed_raises_value_error_naming_file(tmp_path, case, compress):
    payload, msg = _malformed_cases()[case]
    p = _write(tmp_path / f"bad_{case}.idx", payload, compress)
    with pytest.raises(ValueError, match=msg) as info:
        load_idx(p)
    assert str(p) in str(info.value)


def test_idx_corrupt_and_truncated_gzip(tmp_path):
    blob = gzip.compress(_idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8)))
    p = _write(tmp_path / "trunc.gz", blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="gzip") as info:
        load_idx(p)
    assert str(p) in str(info.value)
    p2 = _write(tmp_path / "corrupt.gz", blob[:10] + bytes(len(blob) - 10))
    with pytest.raises(ValueError, match="gzip"):
        load_idx(p2)


def test_idx_missing_file_and_bad_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "nope")
    with pytest.raises(TypeError, match="path"):
        load_idx(3)


# ----------------------------------------------------------------------------- toy 2-D
@pytest.mark.parametrize("name", data.TOY_2D_NAMES)
def test_toy_2d_shape_scale_determinism(name):
    x = make_toy_2d(name, 20000, np.random.default_rng(1))
    assert x.shape == (20000, 2) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(x.std(0), 1.0, atol=0.05)
    np.testing.assert_array_equal(x, make_toy_2d(name, 20000, np.random.default_rng(1)))
    assert not np.array_equal(x, make_toy_2d(name, 20000, np.random.default_rng(2)))


def test_toy_2d_8gaussians_has_eight_modes():
    x = make_toy_2d("8gaussians", 4000, np.random.default_rng(0)).astype(np.float64)
    ang = np.mod(np.arctan2(x[:, 1], x[:, 0]), 2 * np.pi)
    k = np.round(ang / (np.pi / 4)).astype(int) % 8
    counts = np.bincount(k, minlength=8)
    assert counts.min() > 400 and counts.max() < 600


def test_toy_2d_bad_args():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="name"):
        make_toy_2d("circles", 10, rng)
    with pytest.raises(ValueError, match="n "):
        make_toy_2d("moons", 0, rng)
    with pytest.raises(TypeError, match="n "):
        make_toy_2d("moons", 2.5, rng)
    with pytest.raises(TypeError, match="rng"):
        make_toy_2d("moons", 10, 0)


# ----------------------------------------------------------------------------- batches
def test_batches_deterministic_for_seed():
    x = np.arange(50, dtype=np.float32).reshape(25, 2)
    a = list(iterate_batches(x, 4, np.random.default_rng(7), epochs=3))
    b = list(iterate_batches(x, 4, np.random.default_rng(7), epochs=3))
    c = list(iterate_batches(x, 4, np.random.default_rng(8), epochs=3))
    assert len(a) == 3 * 6
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, v) for u, v in zip(a, c))


def test_batches_cover_every_sample_once_per_epoch():
    n, bs = 23, 5
    x = np.arange(n)
    batches = list(iterate_batches(x, bs, np.random.default_rng(0), drop_last=False, epochs=2))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] * 2
    for e in range(2):
        seen = np.concatenate(batches[5 * e : 5 * e + 5])
        np.testing.assert_array_equal(np.sort(seen), x)
    # epochs are shuffled differently
    assert not np.array_equal(np.concatenate(batches[:5]), np.concatenate(batches[5:]))
    # drop_last: full batches only, no repeats within an epoch
    dl = list(iterate_batches(x, bs, np.random.default_rng(0), epochs=1))
    assert [len(b) for b in dl] == [5, 5, 5, 5]
    assert len(np.unique(np.concatenate(dl))) == 20


def test_batches_tuple_and_infinite():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6)
    it = iterate_batches((x, y), 4, np.random.default_rng(3))
    for _ in range(10):  # endless stream
        xb, yb = next(it)
        assert xb.shape == (4, 2) and yb.shape == (4,)
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)


def test_batches_bad_args():
    x = np.zeros((5, 3))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, 0, rng)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, 6, rng)  # drop_last would yield nothing, forever
    with pytest.raises(TypeError, match="rng"):
        iterate_batches(x, 2, 123)
    with pytest.raises(ValueError, match="epochs"):
        iterate_batches(x, 2, rng, epochs=0)
    with pytest.raises(ValueError, match="first dimension"):
        iterate_batches((x, np.zeros(4)), 2, rng)
    with pytest.raises(TypeError, match="x"):
        iterate_batches([1, 2, 3], 2, rng)
    with pytest.raises(ValueError, match="N=0"):
        iterate_batches(np.zeros((0, 3)), 1, rng, drop_last=False)
    assert len(list(iterate_batches(x, 6, rng, drop_last=False, epochs=1))) == 1
