"""Data sets and batching: 8x8 digits, MNIST-style IDX files, 2-D toy sets.

Every loader returns ``float32`` arrays in the model's value range ``[-1, 1]``
(images NCHW), the range DDPM assumes for its data (Ho et al. 2020, Sec. 3.3:
"images consisting of integers in {0, 1, ..., 255} scaled linearly to [-1, 1]").

Randomness only through an explicit ``np.random.Generator``: nothing here touches
the global NumPy RNG.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "DIGITS_NUM_TRAIN",
    "DIGITS_NUM_TEST",
    "DIGITS_NUM_CLASSES",
    "TOY_2D_NAMES",
    "load_digits",
    "load_idx",
    "make_toy_2d",
    "iterate_batches",
    "SeededBatches",
]

#: Size of the digits train split: the first 1437 samples in scikit-learn's order.
DIGITS_NUM_TRAIN = 1437
#: Size of the digits test split: the last 360 samples in scikit-learn's order.
DIGITS_NUM_TEST = 360
#: Number of classes of the digits (0..9): the ``num_classes`` of a class-conditional digits model.
DIGITS_NUM_CLASSES = 10
#: Names accepted by :func:`make_toy_2d`.
TOY_2D_NAMES = ("moons", "swiss_roll", "8gaussians")

_DIGITS_SPLITS = ("train", "test", "all")


def _check_rng(rng, name: str = "rng") -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{name} must be a numpy.random.Generator (e.g. np.random.default_rng(0)), "
            f"got {type(rng).__name__}"
        )
    return rng


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# 8x8 digits (scikit-learn)
# --------------------------------------------------------------------------------------
def load_digits(split: str = "train", return_labels: bool = False):
    """The 8x8 handwritten digits shipped inside scikit-learn, scaled to [-1, 1].

    The 1797 images come with scikit-learn (``sklearn.datasets.load_digits``, a copy of
    the test part of the UCI "Optical Recognition of Handwritten Digits" set); nothing
    is downloaded. Pixel values are integers 0..16 and are mapped linearly to
    ``x / 8 - 1`` in ``[-1, 1]``.

    Parameters
    ----------
    split : {"train", "test", "all"}
        The fixed split, in scikit-learn's own sample order (no shuffling, no RNG, so it
        cannot change with the NumPy version): ``"train"`` is the first 1437 samples
        (80 %), ``"test"`` the last 360 (20 %), ``"all"`` all 1797. Both splits hold
        every class in near-equal proportion (141..146 train, 33..37 test per class).
    return_labels : bool
        If True, return ``(images, labels)`` instead of ``images``.

    Returns
    -------
    images : ndarray, shape (N, 1, 8, 8), float32
        Values in ``{k / 8 - 1 : k = 0..16}``, so in ``[-1, 1]``.
    labels : ndarray, shape (N,), int64
        Digit classes 0..9; only when ``return_labels`` is True.
    """
    if not isinstance(split, str) or split not in _DIGITS_SPLITS:
        raise ValueError(f"split must be one of {_DIGITS_SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    data = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if data.shape != (DIGITS_NUM_TRAIN + DIGITS_NUM_TEST, 64):  # pragma: no cover - sklearn changed
        raise RuntimeError(f"unexpected sklearn digits shape {data.shape}")
    if split == "train":
        sl = slice(0, DIGITS_NUM_TRAIN)
    elif split == "test":
        sl = slice(DIGITS_NUM_TRAIN, None)
    else:
        sl = slice(None)
    images = (data[sl] / 8.0 - 1.0).astype(np.float32).reshape(-1, 1, 8, 8)
    images = np.ascontiguousarray(images)
    if return_labels:
        return images, labels[sl].copy()
    return images


# --------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------
# IDX type codes (http://yann.lecun.com/exdb/mnist/): 0x08 ubyte, 0x09 byte, 0x0B short,
# 0x0C int, 0x0D float, 0x0E double; all multi-byte values big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an MNIST / Fashion-MNIST IDX file (raw or gzip-compressed).

    Parameters
    ----------
    path : str or os.PathLike
        An IDX file such as ``train-images-idx3-ubyte`` or ``t10k-labels-idx1-ubyte.gz``.
        Gzip compression is detected from the content (magic bytes ``1f 8b``), not the
        file name.

    Returns
    -------
    images : ndarray, shape (N, 1, H, W), float32
        For a 3-dimensional file (``idx3``): pixels 0..255 scaled to ``x / 127.5 - 1``,
        i.e. to ``[-1, 1]`` as in DDPM (Ho et al. 2020, Sec. 3.3).
    labels : ndarray, shape (N,), int64
        For a 1-dimensional file (``idx1``): the stored unsigned bytes.

    Raises
    ------
    ValueError
        The file is not a valid unsigned-byte IDX file of 1 or 3 dimensions: bad magic
        number, a type code other than 0x08 (unsigned byte), a header or payload whose
        size does not match the declared dimensions (truncated or trailing data), or
        corrupt gzip data. The message names the file.
    FileNotFoundError
        ``path`` does not exist.

    Notes
    -----
    Format: two zero bytes, one type-code byte, one byte giving the number of
    dimensions ``d``, then ``d`` big-endian uint32 sizes, then the data in C order.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, header needs 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with two zero bytes)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    if code != 0x08:
        raise ValueError(
            f"{path}: IDX type code 0x{code:02x} ({_IDX_DTYPES[code]}) is not supported; "
            "MNIST-style files use 0x08 (unsigned byte)"
        )
    if ndim not in (1, 3):
        raise ValueError(
            f"{path}: IDX file has {ndim} dimensions; expected 1 (labels) or 3 (images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dims)"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) if shape else 0
    payload = len(raw) - header
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing data"
        raise ValueError(
            f"{path}: IDX file {kind}: dimensions {shape} need {expected} data bytes, "
            f"found {payload}"
        )
    if ndim == 3 and 0 in shape[1:]:
        raise ValueError(f"{path}: IDX image dimensions {shape} contain a zero size")
    data = np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(shape)
    if ndim == 1:
        return data.astype(np.int64)
    images = data.astype(np.float32)
    images /= np.float32(127.5)
    images -= np.float32(1.0)
    return np.ascontiguousarray(images[:, None, :, :])


# --------------------------------------------------------------------------------------
# 2-D toy sets
# --------------------------------------------------------------------------------------
# Standardization constants: exact mean and std of the generating distributions below
# (computed by quadrature), so the distribution depends neither on n nor on the draw.
_MOONS_MEAN = np.array([0.5, 0.25])
_MOONS_STD = np.array([0.87178, 0.50417])
_SWISS_MEAN = np.array([2.0, 0.21221])  # (2, 2/(3 pi)) for s ~ U(1.5 pi, 4.5 pi)
_SWISS_STD = np.array([6.64186, 6.96917])


def make_toy_2d(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A 2-D toy data set for teaching examples, standardized to roughly unit scale.

    Parameters
    ----------
    name : {"moons", "swiss_roll", "8gaussians"}
        ``"moons"``: two interleaved half circles (as ``sklearn.datasets.make_moons``,
        angles uniform instead of evenly spaced), Gaussian noise std 0.1, each point on
        either moon with probability 1/2.
        ``"swiss_roll"``: the 2-D spiral ``(s cos s, s sin s)``, ``s = 1.5 pi (1 + 2u)``,
        ``u ~ U(0, 1)``, plus Gaussian noise std 0.5 (the x/z plane of sklearn's
        ``make_swiss_roll``).
        ``"8gaussians"``: a mixture of 8 equal-weight Gaussians with std 0.2 centred on
        a circle of radius 2 at angles ``k pi / 4``.
    n : int
        Number of points, >= 1.
    rng : numpy.random.Generator
        The only source of randomness.

    Returns
    -------
    x : ndarray, shape (n, 2), float32
        Each coordinate has mean ~0 and std ~1 under the generating distribution (fixed
        constants, not statistics of this draw).
    """
    if not isinstance(name, str) or name not in TOY_2D_NAMES:
        raise ValueError(f"name must be one of {TOY_2D_NAMES}, got {name!r}")
    n = _check_int(n, "n", 1)
    _check_rng(rng)
    if name == "moons":
        theta = rng.uniform(0.0, np.pi, size=n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(theta), 1.0 - np.cos(theta))
        y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
        pts = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
        pts = (pts - _MOONS_MEAN) / _MOONS_STD
    elif name == "swiss_roll":
        s = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
        pts = np.stack([s * np.cos(s), s * np.sin(s)], axis=1)
        pts = pts + 0.5 * rng.standard_normal((n, 2))
        pts = (pts - _SWISS_MEAN) / _SWISS_STD
    else:  # 8gaussians
        radius, sigma = 2.0, 0.2
        k = rng.integers(0, 8, size=n)
        ang = k * (np.pi / 4.0)
        centres = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        pts = centres + sigma * rng.standard_normal((n, 2))
        # per-axis variance of the mixture: radius^2 / 2 + sigma^2 (mean 0 by symmetry)
        pts = pts / np.sqrt(radius**2 / 2.0 + sigma**2)
    return np.ascontiguousarray(pts, dtype=np.float32)


# --------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------
def iterate_batches(
    x,
    batch_size: int,
    rng: np.random.Generator,
    drop_last: bool = True,
    epochs: int | None = None,
) -> Iterator:
    """Yield shuffled mini-batches, one fresh permutation per epoch.

    Parameters
    ----------
    x : ndarray, shape (N, ...), or a tuple/list of ndarrays with the same N
        The data. With a tuple (e.g. ``(images, labels)``) every batch is a tuple of
        the same rows of each array.
    batch_size : int
        Rows per batch, >= 1. With ``drop_last=True`` it must be <= N.
    rng : numpy.random.Generator
        Draws each epoch's permutation (``rng.permutation(N)``); the same seed gives the
        same batches.
    drop_last : bool
        Drop each epoch's final partial batch (default True), so every batch has exactly
        ``batch_size`` rows. With False the last batch of an epoch may be smaller.
    epochs : int or None
        Number of passes over the data (>= 1), or None for an endless stream.

    Yields
    ------
    batch : ndarray, shape (batch_size, ...), or tuple of such arrays
        Copies (fancy-indexed), C-contiguous. Within one epoch every row appears at most
        once, and exactly once when ``drop_last`` is False or N % batch_size == 0.
    """
    single = not isinstance(x, (tuple, list))
    arrays: Sequence[np.ndarray] = (x,) if single else tuple(x)
    if len(arrays) == 0:
        raise ValueError("x must be an array or a non-empty tuple of arrays, got an empty tuple")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.ndim < 1:
            raise TypeError(
                f"x{'' if single else f'[{i}]'} must be an ndarray with ndim >= 1, "
                f"got {type(a).__name__}"
            )
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(
            f"x arrays must share their first dimension, got {[a.shape[0] for a in arrays]}"
        )
    if n == 0:
        raise ValueError("x must hold at least one sample, got N=0")
    batch_size = _check_int(batch_size, "batch_size", 1)
    if drop_last and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the number of samples N={n} with drop_last=True "
            "(no batch would ever be produced)"
        )
    if epochs is not None:
        epochs = _check_int(epochs, "epochs", 1)
    _check_rng(rng)
    return _batch_generator(arrays, single, n, batch_size, rng, bool(drop_last), epochs)


def _batch_generator(arrays, single, n, batch_size, rng, drop_last, epochs):
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = rng.permutation(n)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            idx = perm[start : start + batch_size]
            if single:
                yield arrays[0][idx]
            else:
                yield tuple(a[idx] for a in arrays)
        epoch += 1


class SeededBatches:
    """Batch ``k`` of an endless shuffled stream as a pure function of ``(seed, k)``.

    Epoch ``e = k // (N // batch_size)`` uses the permutation ``default_rng([seed, 3, e]).permutation(N)``;
    its batches follow in order and the last partial batch is dropped. So any batch can be recomputed
    from its index alone: a training run resumed at step ``k`` continues with exactly the batches the
    uninterrupted run would have drawn (:func:`difnumpy.train.train`).

    Parameters
    ----------
    x : ndarray, shape (N, ...)
    batch_size : int in [1, N]
    seed : int >= 0
    labels : ndarray, shape (N,), optional
        Per-sample labels; batch ``k`` then holds the same rows of both.

    Calling it with ``k`` returns ``(x_batch, labels_batch)``; ``labels_batch`` is None without labels.
    """

    def __init__(self, x: np.ndarray, batch_size: int, seed: int, labels: np.ndarray | None = None):
        if not isinstance(x, np.ndarray) or x.ndim < 1:
            raise TypeError(f"x must be an ndarray with ndim >= 1, got {type(x).__name__}")
        self.bs = _check_int(batch_size, "batch_size", 1)
        if self.bs > x.shape[0]:
            raise ValueError(f"batch_size={self.bs} exceeds the number of samples N={x.shape[0]}")
        self.seed = _check_int(seed, "seed", 0)
        if labels is not None and (not isinstance(labels, np.ndarray) or labels.shape != (x.shape[0],)):
            raise ValueError(f"labels must be an ndarray of shape ({x.shape[0]},), got "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        self.x, self.labels = x, labels
        self.per_epoch = x.shape[0] // self.bs
        self._epoch, self._perm = -1, None

    def __call__(self, k: int):
        epoch, pos = divmod(int(k), self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, 3, epoch]).permutation(self.x.shape[0])
            self._epoch = epoch
        idx = self._perm[pos * self.bs:(pos + 1) * self.bs]
        return self.x[idx], (None if self.labels is None else self.labels[idx])
