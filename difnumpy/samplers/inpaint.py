"""Inpainting with RePaint (Lugmayr et al. 2022, arXiv 2201.09865), optionally reconstruction-guided.

At each reverse step the unknown region comes from the model's step and the known region from the
forward process applied to the known image (eq. 8); resampling jumps go back up the chain
``jump_n_sample - 1`` times every ``jump_length`` steps, so that the two regions harmonise (Sec. 4.2).

Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", arXiv 2204.03458, Sec. 3.1) adds the
known region's information to the unknown region's prediction itself: with ``x0_hat(x_t)`` the model's
prediction of the clean image, the unknown part becomes
``x0_hat^b - (w_r sqrt(abar_t) / 2) grad_{x_t^b} ||x^a - x0_hat^a(x_t)||^2`` (a: known, b: unknown), the
gradient taken through the network (:meth:`difnumpy.nn.unet.UNet.backward`). It approximates
``E[x^b | x_t, x^a]``; ``w_r > 1`` strengthens it, as the paper recommends.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from difnumpy._validation import PREDICTION_TYPES, as_generator, check_choice, check_float_array
from difnumpy.diffusion import _check_schedule
from difnumpy.kernels import get_backend
from difnumpy.samplers.loop import _resolve_backend, frozen_model, make_model_fn
from difnumpy.samplers.steps import _x0_coefficients, ddim_step
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


def _check_differentiable(model) -> None:
    if not (callable(getattr(model, "forward", None)) and callable(getattr(model, "backward", None))):
        raise TypeError(f"reconstruction guidance differentiates the model: it needs a difnumpy UNet (forward and "
                        f"backward), got {type(model).__name__}")


def reconstruction_guided_output(model, schedule: Schedule, x_t: np.ndarray, t: int, x_known: np.ndarray,
                                 mask: np.ndarray, weight: float, *, prediction_type: str = "epsilon",
                                 class_labels=None, guidance_scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """The model output at ``(x_t, t)`` with reconstruction guidance (Ho et al. 2022, Sec. 3.1).

    Parameters
    ----------
    model : a :class:`difnumpy.nn.unet.UNet` (anything with its ``forward`` / ``backward`` methods)
    schedule : Schedule
    x_t : ndarray (N, C, H, W), float (host)
    t : int, the timestep of ``x_t``
    x_known, mask : ndarrays of ``x_t``'s shape; ``mask`` 1 where known
    weight : float >= 0, w_r
    prediction_type : the model's parameterisation; the output is returned in it
    class_labels, guidance_scale : as in :func:`difnumpy.samplers.sample` (the guided output
        ``out_u + w (out_c - out_u)`` is what is differentiated: one forward and one backward of batch 2N)

    Returns
    -------
    output : ndarray, shape and dtype of ``x_t``: the output whose ``x0_hat`` is
        ``x0_hat - (w_r sqrt(abar_t) / 2) (1 - mask) * grad``, ``grad = d/dx_t ||mask (x_known - x0_hat)||^2``
    info : dict with ``x0_hat`` (float64) and ``grad`` (float64), for tests and diagnostics
    """
    _check_differentiable(model)
    x = np.asarray(x_t)
    n = x.shape[0]
    tt = np.full(n, int(t), dtype=np.int64)
    w = float(guidance_scale)
    if class_labels is not None and w != 1.0:  # one pass of 2N: [conditional, unconditional]
        labels = np.concatenate([np.asarray(class_labels, np.int64), np.full(n, model.num_classes, np.int64)])
        out2, cache = model.forward(np.concatenate([x, x]), np.concatenate([tt, tt]), class_labels=labels)
        out2 = np.asarray(out2, np.float64)
        out = out2[n:] + w * (out2[:n] - out2[n:])
    else:
        out, cache = model.forward(x, tt, class_labels=class_labels)
        out = np.asarray(out, np.float64)
    if out.shape != x.shape:
        raise ValueError(f"reconstruction guidance needs an output of x_t's shape {x.shape}, got {out.shape} "
                         f"(a learned variance is not supported)")
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    abar = _abar(schedule, int(t))
    c_x, c_o = (float(c) for c in _x0_coefficients(schedule, np.asarray(int(t)), prediction_type))
    x64, m = x.astype(np.float64), np.asarray(mask, np.float64)
    x0 = c_x * x64 + c_o * out
    v = 2.0 * m * (x0 - np.asarray(x_known, np.float64))  # d/dx0 of ||m (x_known - x0)||^2
    u = (c_o * v).astype(x.dtype)  # the vector of the vector-Jacobian product through the network
    if class_labels is not None and w != 1.0:  # d(out_u + w (out_c - out_u)) = w d out_c + (1 - w) d out_u
        _, dx2 = model.backward(np.concatenate([w * u, (1.0 - w) * u]), cache, return_input_grad=True)
        jtu = np.asarray(dx2[:n], np.float64) + np.asarray(dx2[n:], np.float64)
    else:
        _, jtu = model.backward(u, cache, return_input_grad=True)
        jtu = np.asarray(jtu, np.float64)
    grad = c_x * v + jtu
    x0_adj = x0 - (float(weight) * np.sqrt(abar) / 2.0) * (1.0 - m) * grad
    adj = (x0_adj - c_x * x64) / c_o
    return adj.astype(x.dtype), {"x0_hat": x0, "grad": grad}


def inpaint(model: Callable, schedule: Schedule, x_known: np.ndarray, mask, *, num_steps: int,
            jump_length: int = 10, jump_n_sample: int = 10, rng=None, class_labels=None,
            guidance_scale: float = 1.0, eta: float = 1.0, reconstruction_guidance: float = 0.0,
            backend: str | None = None, progress: bool = False, **step_kw) -> np.ndarray:
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
    reconstruction_guidance : float >= 0, default 0.0
        w_r of Ho et al. 2022, Sec. 3.1 (:func:`reconstruction_guided_output`): the unknown region's
        prediction is pulled towards consistency with the known region through the network's gradient
        (one forward and one backward per step instead of one forward; needs a difnumpy UNet). 0 is plain
        RePaint. With RePaint's resampling it completes digits into the right digit far more often
        (README, "Conditional generation").
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
    w_r = float(reconstruction_guidance)
    if not np.isfinite(w_r) or w_r < 0:
        raise ValueError(f"reconstruction_guidance must be a finite number >= 0, got {reconstruction_guidance!r}")
    if w_r > 0:  # the guided output replaces the plain model call (its maths on the host: on cuda a step
        # copies x_t down and the output up, as thresholding does)
        pred = step_kw.get("prediction_type", "epsilon")
        check_choice(pred, "prediction_type", PREDICTION_TYPES)  # clear errors before any work
        _check_differentiable(model)
        known_h, mask_h = np.ascontiguousarray(x_known), np.ascontiguousarray(m, dtype=dt)

        def guided_fn(x, tt):
            out, _ = reconstruction_guided_output(model, schedule, kern.to_host(x), int(tt[0]), known_h, mask_h, w_r,
                                                  prediction_type=pred, class_labels=class_labels,
                                                  guidance_scale=guidance_scale)
            return kern.asarray(out)

        model_fn = guided_fn

    def noise():
        return kern.asarray(rng.standard_normal(shape, dtype=dt))

    def forward(x, a):  # sqrt(a) x + sqrt(1 - a) eps, per sample, through the backend's q_sample
        return kern.q_sample(x.reshape(flat), noise().reshape(flat), np.full(n, np.sqrt(a)),
                             np.full(n, np.sqrt(1.0 - a))).reshape(shape)

    x = noise()
    t_last = int(ts[0]) + step
    it = tqdm(ts, desc="repaint", unit="step") if progress else ts
    with frozen_model(model):
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
