"""Inpainting with RePaint (Lugmayr et al. 2022, arXiv 2201.09865).

At each reverse step the unknown region comes from the model's step and the known region from the
forward process applied to the known image (eq. 8); resampling jumps go back up the chain
``jump_n_sample - 1`` times every ``jump_length`` steps, so that the two regions harmonise (Sec. 4.2).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from difnumpy._validation import as_generator, check_float_array
from difnumpy.diffusion import _check_schedule
from difnumpy.kernels import get_backend
from difnumpy.samplers.loop import _resolve_backend, make_model_fn
from difnumpy.samplers.steps import ddim_step
from difnumpy.schedules import Schedule

_STEP_KW = {"prediction_type", "clip_sample", "clip_range", "thresholding", "dynamic_thresholding_ratio",
            "sample_max_value"}


def _check_count(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def repaint_timesteps(num_train_timesteps: int, num_steps: int, jump_length: int = 10,
                      jump_n_sample: int = 10) -> np.ndarray:
    """RePaint's timestep list with resampling jumps (as diffusers' ``RePaintScheduler.set_timesteps``).

    Parameters
    ----------
    num_train_timesteps : int, T
    num_steps : int in [1, T], the steps of one descent (spacing ``T // num_steps``)
    jump_length : int >= 1, how far each jump goes back up (in steps)
    jump_n_sample : int >= 1, how many times each stretch is run (1: no jumps, plain replacement)

    Returns
    -------
    timesteps : ndarray, int64: a step from ``t`` to ``t - T // num_steps`` where the list goes down, a jump
    back up (a forward-process step) where it goes up; it ends at 0.
    """
    T = _check_count(num_train_timesteps, "num_train_timesteps", 1)
    S = _check_count(num_steps, "num_steps", 1)
    if S > T:
        raise ValueError(f"num_steps must lie in [1, num_train_timesteps={T}], got {S}")
    jump_length = _check_count(jump_length, "jump_length", 1)
    jump_n_sample = _check_count(jump_n_sample, "jump_n_sample", 1)
    jumps = {j: jump_n_sample - 1 for j in range(0, S - jump_length, jump_length)}
    ts = []
    t = S
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    return np.asarray(ts, dtype=np.int64) * (T // S)


def _abar(schedule: Schedule, level: int) -> float:
    return 1.0 if level < 0 else float(schedule.alphas_cumprod[level])


def inpaint(model: Callable, schedule: Schedule, x_known: np.ndarray, mask, *, num_steps: int,
            jump_length: int = 10, jump_n_sample: int = 10, rng=None, class_labels=None,
            guidance_scale: float = 1.0, eta: float = 1.0, backend: str | None = None, progress: bool = False,
            **step_kw) -> np.ndarray:
    """Fill in the unknown region of ``x_known`` (where ``mask == 0``) with RePaint.

    Parameters
    ----------
    model : callable ``model(x_t, t[, class_labels=y])`` (see :func:`difnumpy.samplers.sample`)
    schedule : Schedule
    x_known : ndarray, shape (N, C, H, W) (or any (N, ...)), float32 or float64
        The images; only the region where ``mask == 1`` is used.
    mask : array_like of {0, 1}, broadcastable to ``x_known`` (for images (N or 1, 1, H, W))
        1 = known (kept), 0 = to be generated.
    num_steps : int, the steps of one descent (spacing ``T // num_steps``)
    jump_length, jump_n_sample : int
        Resampling (Sec. 4.2): every ``jump_length`` steps the chain goes back up ``jump_length`` steps,
        ``jump_n_sample - 1`` times; ``jump_n_sample=1`` is plain replacement (no jumps).
    rng : numpy.random.Generator, int or None; draws x_T, the known region's noise and the step noise
    class_labels, guidance_scale : class-conditional sampling and classifier-free guidance, as in ``sample``
    eta : float >= 0, default 1.0
        The unknown region's step is DDIM's (eq. 12) with this eta; 1 is the ancestral DDPM step the
        paper uses (Algorithm 1).
    backend : {"numpy", "cpu", "cuda"} or None (the model's)
    **step_kw : prediction_type, clip_sample, clip_range (passed to :func:`ddim_step`)

    Returns
    -------
    x : ndarray, shape and dtype of ``x_known``; exactly ``x_known`` where ``mask == 1``

    Notes
    -----
    Lugmayr et al. 2022, eq. 8 and Algorithm 1: ``x_{t-1} = m * x_{t-1}^known + (1 - m) * x_{t-1}^unknown``
    with ``x^known ~ q(x_{t-1} | x_0)`` (DDPM eq. 4) and ``x^unknown`` the reverse step. A jump up from level
    ``a`` to level ``b`` draws ``q(x_b | x_a) = N(sqrt(abar_b / abar_a) x_a, (1 - abar_b / abar_a) I)``
    (DDPM eq. 2 composed; diffusers' ``undo_step`` uses the betas one index later).
    """
    _check_schedule(schedule)
    check_float_array(x_known, "x_known", min_ndim=2)
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.astype(x_known.dtype)
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise TypeError(f"mask must hold 0 and 1, got dtype {m.dtype}")
    try:
        m = np.broadcast_to(m, x_known.shape)
    except ValueError:
        raise ValueError(f"mask of shape {np.shape(mask)} does not broadcast to x_known's shape {x_known.shape} "
                         f"(images: (N or 1, 1, H, W))") from None
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("mask must hold only 0 (to generate) and 1 (known)")
    unknown = set(step_kw) - _STEP_KW
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for inpaint: {sorted(unknown)}")
    T = schedule.num_timesteps
    ts = repaint_timesteps(T, num_steps, jump_length, jump_n_sample)
    step = T // num_steps
    backend = _resolve_backend(model, backend)
    kern = get_backend(backend)
    rng = as_generator(rng)
    dt = x_known.dtype
    shape = x_known.shape
    n, flat = shape[0], (shape[0], int(np.prod(shape[1:])))
    known = kern.asarray(x_known)
    mask_n = kern.asarray(np.ascontiguousarray(m, dtype=dt))
    model_fn = make_model_fn(model, backend, class_labels, guidance_scale, 0.0, n)

    def noise():
        return kern.asarray(rng.standard_normal(shape, dtype=dt))

    def forward(x, a):  # sqrt(a) x + sqrt(1 - a) eps, per sample, through the backend's q_sample
        return kern.q_sample(x.reshape(flat), noise().reshape(flat), np.full(n, np.sqrt(a)),
                             np.full(n, np.sqrt(1.0 - a))).reshape(shape)

    x = noise()
    t_last = int(ts[0]) + step
    it = tqdm(ts, desc="repaint", unit="step") if progress else ts
    for t in it:
        t = int(t)
        if t < t_last:  # a reverse step t -> t - step, then the known region pasted in at that level
            prev = t - step if t - step >= 0 else -1
            out = model_fn(x, np.full(n, t, dtype=np.int64))
            x, _ = ddim_step(schedule, out, t, prev, x, eta=eta, rng=rng if eta > 0 else None, backend=backend,
                             **step_kw)
            kern.blend_(x, forward(known, _abar(schedule, prev)), mask_n)
        else:  # a resampling jump up, from level t_last - step to level t - step
            x = forward(x, _abar(schedule, t - step) / _abar(schedule, t_last - step))
        t_last = t
    kern.blend_(x, known, mask_n)  # exactly x_known where mask == 1
    return kern.to_host(x)
