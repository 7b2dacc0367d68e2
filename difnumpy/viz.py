"""Figures: image grids, forward-process and denoising strips, schedule curves, loss curves.

Matplotlib is used through its object API only (``matplotlib.figure.Figure`` with the Agg
canvas): no ``pyplot``, no global figure state, no GUI backend, safe in threads and on
machines without a display. Every PNG is written atomically: rendered to a temporary file
in the destination directory, then moved over the destination with ``os.replace``, so a
reader never sees a half-written file and a failed write leaves an existing file intact.

Every function returns the path it wrote (a ``str``).
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from difnumpy._io import atomic_write

__all__ = [
    "make_grid",
    "save_figure",
    "image_grid",
    "forward_process_strip",
    "trajectory_strip",
    "schedule_curves",
    "loss_curve",
    "compare_grid",
    "labelled_rows",
]

_DPI = 100


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path must end with .png, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory")
    return path


def _check_image_list(seq, name: str) -> list:
    """A non-empty list (or a 5-D array) of (N, C, H, W) image arrays, each checked by :func:`_check_images`."""
    if isinstance(seq, np.ndarray) and seq.ndim == 5:
        seq = list(seq)
    if not isinstance(seq, (list, tuple)) or len(seq) < 1:
        raise ValueError(f"{name} must be a non-empty list of (N, C, H, W) arrays")
    return [_check_images(a, f"{name}[{i}]") for i, a in enumerate(seq)]


def _check_images(images, name: str = "images") -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name} must be an ndarray of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1 and C in (1, 3), "
                         f"got {images.shape}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name} has an empty spatial size, got {images.shape}")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise TypeError(f"{name} must be a real array, got dtype {images.dtype}")
    images = images.astype(np.float64)
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{name} contains NaN or inf")
    return images


def _check_nrow(nrow, n: int):
    if nrow is None:
        return max(1, math.ceil(math.sqrt(n)))
    if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1 or None, got {nrow!r}")
    return int(nrow)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(max(width, 1.0), max(height, 1.0)), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> str:
    """Write ``fig`` as a PNG to ``path`` atomically.

    Renders to a temporary file in the destination directory (created if missing), then
    ``os.replace`` moves it onto ``path``. On any error the temporary file is removed and
    an existing file at ``path`` is left untouched.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : str or os.PathLike, ending in ``.png``

    Returns
    -------
    path : str
    """
    path = _check_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI))


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1,
              pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one array (like torchvision's ``make_grid``).

    Parameters
    ----------
    images : ndarray, shape (N, C, H, W), C in {1, 3}
    nrow : int, optional
        Images per row; default ``ceil(sqrt(N))``.
    padding : int
        Pixels between images and around the border.
    pad_value : float
        Value of the padding pixels (in data units; 1.0 is white for [-1, 1] data).

    Returns
    -------
    grid : ndarray, shape (rows*(H+p)+p, nrow*(W+p)+p, C), float64
    """
    images = _check_images(images)
    nrow = _check_nrow(nrow, images.shape[0])
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    p = int(padding)
    grid = np.full((rows * (h + p) + p, ncol * (w + p) + p, c), float(pad_value))
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = p + r * (h + p), p + q * (w + p)
        grid[y0:y0 + h, x0:x0 + w, :] = images[i].transpose(1, 2, 0)
    return grid


def _show(ax, grid: np.ndarray) -> None:
    """Show a (H, W, C) array of [-1, 1] data (clipped) on ``ax``."""
    g = np.clip(grid, -1.0, 1.0)
    if g.shape[2] == 1:
        ax.imshow(g[:, :, 0], cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow((g + 1.0) / 2.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _strip(columns: Sequence[np.ndarray], col_titles: Sequence[str], path, title):
    """Rows = samples, columns = stages; one axis per column, laid out in inches."""
    ncol = len(columns)
    n, c, h, w = columns[0].shape
    grids = [make_grid(col, nrow=1) for col in columns]
    gh, gw = grids[0].shape[:2]
    per_px = min(1.0 / max(h, w), 9.0 / gh)  # ~1 inch per image, at most 9 inches tall
    col_w, col_h = gw * per_px, gh * per_px
    gap, margin, head = 0.08, 0.1, 0.45 + (0.35 if title else 0.0)
    W = 2 * margin + ncol * col_w + (ncol - 1) * gap
    H = margin + col_h + head
    fig = Figure(figsize=(W, H), dpi=_DPI)
    FigureCanvasAgg(fig)
    for i, (g, ct) in enumerate(zip(grids, col_titles)):
        ax = fig.add_axes(((margin + i * (col_w + gap)) / W, margin / H, col_w / W, col_h / H))
        _show(ax, g)
        ax.set_title(ct, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.12 / H, va="top")
    return save_figure(fig, path)


def _check_ts(ts, name: str = "ts") -> list[int]:
    arr = np.asarray(ts)
    if arr.ndim != 1 or arr.size < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of ints, got {ts!r}")
    return [int(v) for v in arr]


# --------------------------------------------------------------------------------------
# public figures
# --------------------------------------------------------------------------------------
def image_grid(images: np.ndarray, path, nrow: int | None = None, title: str | None = None) -> str:
    """Save a grid of images in ``[-1, 1]`` (values outside are clipped) as a PNG.

    Parameters
    ----------
    images : ndarray, shape (N, C, H, W), C in {1, 3}, values in [-1, 1]
    path : str or os.PathLike, ending in ``.png``
    nrow : int, optional
        Images per row; default ``ceil(sqrt(N))``.
    title : str, optional

    Returns
    -------
    path : str
    """
    images = _check_images(images)
    nrow = _check_nrow(nrow, images.shape[0])
    grid = make_grid(images, nrow=nrow)
    gh, gw = grid.shape[:2]
    # ~0.15 in per pixel for 8x8 digits, capped at 10 in for large grids
    per_px = min(0.15, 10.0 / max(gh, gw))
    w_in, h_in = gw * per_px, gh * per_px
    margin, top = 0.1, (0.4 if title else 0.1)
    fig = Figure(figsize=(w_in + 2 * margin, h_in + margin + top), dpi=_DPI)
    FigureCanvasAgg(fig)
    W, H = w_in + 2 * margin, h_in + margin + top
    ax = fig.add_axes((margin / W, margin / H, w_in / W, h_in / H))
    _show(ax, grid)
    if title:
        ax.set_title(str(title), fontsize=9)
    return save_figure(fig, path)


def forward_process_strip(schedule, x0: np.ndarray, ts, path, rng: np.random.Generator,
                          title: str | None = "forward process q(x_t | x_0)") -> str:
    """Show ``x_t ~ q(x_t | x0)`` for a few images at several timesteps.

    Parameters
    ----------
    schedule : Schedule
    x0 : ndarray, shape (N, C, H, W), values in [-1, 1]
        A few clean images (rows of the figure).
    ts : sequence of int
        Timesteps in ``[0, T-1]`` (columns); each column is titled with ``t`` and
        ``abar_t``. A leading column shows ``x0`` itself.
    path : str or os.PathLike, ending in ``.png``
    rng : numpy.random.Generator
        Draws one noise tensor, shared by all columns (so a row shows one noise path).
    title : str or None

    Returns
    -------
    path : str

    Notes
    -----
    DDPM eq. 4: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, via
    :func:`difnumpy.diffusion.q_sample`.
    """
    from difnumpy.diffusion import q_sample

    _check_path(path)
    if not isinstance(x0, np.ndarray) or x0.dtype not in (np.float32, np.float64):
        raise TypeError(f"x0 must be a float32 or float64 ndarray, got {type(x0).__name__}")
    _check_images(x0, "x0")
    ts = _check_ts(ts)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    noise = rng.standard_normal(x0.shape).astype(x0.dtype)
    cols, titles = [x0], ["x0"]
    abar = np.asarray(schedule.alphas_cumprod)
    for t in ts:
        cols.append(q_sample(schedule, x0, t, noise=noise))
        titles.append(f"t={t}\nabar={abar[t]:.2g}")
    return _strip(cols, titles, path, title)


def trajectory_strip(frames: Sequence[np.ndarray], ts, path, title: str | None = None) -> str:
    """Show a reverse-process trajectory: one column per step, one row per sample.

    Parameters
    ----------
    frames : sequence of ndarray, each shape (N, C, H, W), same shape
        E.g. the ``x_t`` or ``x0_pred`` arrays of :func:`difnumpy.samplers.sample_progressive`,
        in the order they were produced (noisy to clean). Values are clipped to [-1, 1].
    ts : sequence of int, same length as ``frames``
        The timestep of each frame (column titles).
    path : str or os.PathLike, ending in ``.png``
    title : str, optional

    Returns
    -------
    path : str
    """
    _check_path(path)
    frames = _check_image_list(frames, "frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"frames must all have the same shape, got {[f.shape for f in frames]}")
    ts = _check_ts(ts)
    if len(ts) != len(frames):
        raise ValueError(f"ts must have one entry per frame: {len(frames)} frames, {len(ts)} ts")
    return _strip(frames, [f"t={t}" for t in ts], path, title)


def schedule_curves(schedules: Mapping[str, object], path, title: str | None = None) -> str:
    """Plot ``abar_t`` and ``log SNR(t)`` of several schedules against ``t / T``.

    Parameters
    ----------
    schedules : dict, name -> Schedule
        Each value needs float64 attributes ``alphas_cumprod`` and ``snr`` (shape (T,)) and
        ``num_timesteps``. Non-finite log-SNR values (zero terminal SNR) are not drawn.
    path : str or os.PathLike, ending in ``.png``
    title : str, optional

    Returns
    -------
    path : str

    Notes
    -----
    ``SNR(t) = abar_t / (1 - abar_t)`` (Kingma et al. 2021; Nichol & Dhariwal 2021, Fig. 5
    compare linear and cosine schedules by ``abar_t``).
    """
    _check_path(path)
    if not isinstance(schedules, Mapping) or len(schedules) == 0:
        raise ValueError("schedules must be a non-empty dict mapping a name to a Schedule")
    fig = _new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for name, sch in schedules.items():
        try:
            abar = np.asarray(sch.alphas_cumprod, dtype=np.float64)
            snr = np.asarray(sch.snr, dtype=np.float64)
            T = int(sch.num_timesteps)
        except AttributeError as exc:
            raise TypeError(f"schedules[{name!r}] must be a Schedule (with alphas_cumprod, snr, "
                            f"num_timesteps), got {type(sch).__name__}") from exc
        u = (np.arange(T) + 1.0) / T
        ax1.plot(u, abar, label=str(name))
        with np.errstate(divide="ignore"):
            log_snr = np.log(snr)
        ok = np.isfinite(log_snr)
        ax2.plot(u[ok], log_snr[ok], label=str(name))
    ax1.set_xlabel("t / T")
    ax1.set_ylabel(r"$\bar\alpha_t$")
    ax1.set_ylim(-0.02, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("t / T")
    ax2.set_ylabel(r"log SNR $= \log(\bar\alpha_t / (1-\bar\alpha_t))$")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (no lag); near the ends the window shrinks to what exists."""
    if window <= 1:
        return values.copy()
    kernel = np.ones(window)
    num = np.convolve(values, kernel, mode="same")
    den = np.convolve(np.ones_like(values), kernel, mode="same")
    return num / den


def loss_curve(steps, losses, path, window: int | None = None, title: str | None = "training loss",
               log_scale: bool | None = None) -> str:
    """Plot a training loss: the raw values (faint) and a smoothed line.

    Parameters
    ----------
    steps : array_like, shape (K,)
        Step numbers (x axis).
    losses : array_like, shape (K,)
        Loss values; non-finite entries are skipped (not drawn).
    path : str or os.PathLike, ending in ``.png``
    window : int, optional
        Width (in points) of the centred moving average drawn over the raw curve; default
        ``K // 20`` rounded up to odd (no smoothing for fewer than 40 points).
    title : str or None
    log_scale : bool, optional
        Log y axis; default: when every finite loss is > 0.

    Returns
    -------
    path : str
    """
    _check_path(path)
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if steps.ndim != 1 or losses.ndim != 1 or steps.shape != losses.shape or steps.size == 0:
        raise ValueError(f"steps and losses must be non-empty 1-D arrays of the same length, "
                         f"got shapes {steps.shape} and {losses.shape}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                               or window < 1):
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    ok = np.isfinite(losses) & np.isfinite(steps)
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if ok.any():
        s, l = steps[ok], losses[ok]
        win = int(window) if window is not None else max(1, (len(l) // 20) | 1)
        ax.plot(s, l, color="tab:blue", alpha=0.35 if win > 1 else 1.0, linewidth=0.8, label="loss")
        if win > 1:
            ax.plot(s, _moving_average(l, win), color="tab:blue", linewidth=1.6,
                    label=f"moving average ({win} points)")
        if log_scale is None:
            log_scale = bool(np.all(l > 0))
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite loss values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def compare_grid(grids: Mapping[str, np.ndarray], path, nrow: int | None = None,
                 title: str | None = None) -> str:
    """Side-by-side image grids, one panel per label (e.g. DDPM vs DDIM samples).

    Parameters
    ----------
    grids : dict, label -> ndarray of shape (N_i, C, H, W), values in [-1, 1]
        The panels, left to right, each titled with its label.
    path : str or os.PathLike, ending in ``.png``
    nrow : int, optional
        Images per row in each panel; default ``ceil(sqrt(N_i))``.
    title : str, optional

    Returns
    -------
    path : str
    """
    _check_path(path)
    if not isinstance(grids, Mapping) or len(grids) == 0:
        raise ValueError("grids must be a non-empty dict mapping a label to an (N, C, H, W) array")
    panels = []
    for label, imgs in grids.items():
        imgs = _check_images(imgs, f"grids[{label!r}]")
        panels.append((str(label), make_grid(imgs, nrow=_check_nrow(nrow, imgs.shape[0]))))
    maxpx = max(max(g.shape[:2]) for _, g in panels)
    per_px = min(0.15, 6.0 / maxpx)
    width = sum(g.shape[1] for _, g in panels) * per_px + 0.3 * len(panels)
    height = max(g.shape[0] for _, g in panels) * per_px + 0.8
    fig = _new_figure(width, height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, g) in zip(axes, panels):
        _show(ax, g)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def labelled_rows(rows: Sequence[np.ndarray], row_labels: Sequence[str], path, title: str | None = None,
                  col_labels: Sequence[str] | None = None) -> str:
    """Rows of images, each with its label on the left (e.g. one row per class, per guidance scale,
    or original / masked / completed).

    Parameters
    ----------
    rows : sequence of ndarray, each shape (N_i, C, H, W) with the same C, H, W, values in [-1, 1]
        Row ``i`` shows its ``N_i`` images left to right (shorter rows are padded with white).
    row_labels : sequence of str, one per row
    path : str or os.PathLike, ending in ``.png``
    title : str, optional
    col_labels : sequence of str, optional
        One per column (the longest row's length), written above the first row.

    Returns
    -------
    path : str
    """
    _check_path(path)
    rows = _check_image_list(rows, "rows")
    if any(r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(f"rows must share C, H, W, got {[r.shape for r in rows]}")
    labels = [str(v) for v in row_labels]
    if len(labels) != len(rows):
        raise ValueError(f"row_labels must have one entry per row: {len(rows)} rows, {len(labels)} labels")
    ncol = max(r.shape[0] for r in rows)
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"col_labels must have one entry per column ({ncol}), got {len(col_labels)}")
    _, c, h, w = rows[0].shape
    pad = np.ones((1, c, h, w))
    grids = [make_grid(np.concatenate([r] + [pad] * (ncol - r.shape[0])), nrow=ncol) for r in rows]
    gh, gw = grids[0].shape[:2]
    per_px = min(0.12, 12.0 / gw, 1.6 / gh)  # ~1 inch per 8x8 image, at most 12 inches wide
    row_w, row_h = gw * per_px, gh * per_px
    label_w = 0.12 + 0.07 * max(len(t) for t in labels)
    margin, gap = 0.1, 0.04
    head = (0.4 if title else 0.05) + (0.25 if col_labels is not None else 0.0)
    W = label_w + row_w + 2 * margin
    H = len(rows) * row_h + (len(rows) - 1) * gap + margin + head
    fig = _new_figure(W, H)
    W, H = fig.get_size_inches()
    for i, (g, lab) in enumerate(zip(grids, labels)):
        y0 = margin + (len(rows) - 1 - i) * (row_h + gap)
        ax = fig.add_axes(((margin + label_w) / W, y0 / H, row_w / W, row_h / H))
        _show(ax, g)
        ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=8)
        if i == 0 and col_labels is not None:
            for j, cl in enumerate(col_labels):
                ax.text((j + 0.5) * gw / ncol, -1, str(cl), ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.08 / H, va="top")
    return save_figure(fig, path)
