"""TEMPORARY (issue 10): the device-resident U-Net, sampling loop and training step of the old cuda.py.

``difnumpy/trainer.py`` and ``difnumpy/samplers.py`` still reach :class:`DeviceTrainStep` and
:func:`sample_device` through ``get_backend("cuda")`` until the one U-Net graph, the one trainer step and
the one sampling loop run on every backend's arrays; this module is deleted then. It is the only module
of ``difnumpy/kernels`` that imports from the floors above (``difnumpy.nn``, ``difnumpy.samplers``),
inside functions. Written against the backend's public functions; the step noise of DDPM / DDIM with
eta > 0 is drawn on the host with NumPy and copied up (the device RNG is gone).
"""
from __future__ import annotations

import math

import numpy as np

from difnumpy.kernels.cuda._runtime import _check, _flat, asarray, cuda, grid_reduce, is_array, to_host
from difnumpy.kernels.cuda.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from difnumpy.kernels.cuda.elementwise import (add_, add_channel_bias_, axpy_, build_sumsq, mse_loss, q_sample,
                                               sampler_update, scale_, silu_backward, silu_forward, sum_hw)
from difnumpy.kernels.cuda.groupnorm import group_norm_silu_backward, group_norm_silu_forward
from difnumpy.kernels.cuda.layout import (concat_channels, split_channels, upsample_nearest2x_backward,
                                          upsample_nearest2x_forward)
from difnumpy.kernels.cuda.linear import linear_backward, linear_forward
from difnumpy.kernels.cuda.optim import adam_update, ema_update

__all__ = ["DeviceUNet", "sample_device", "DeviceTrainStep"]

class DeviceUNet:
    """A :class:`difnumpy.nn.unet.UNet` run on the GPU with parameters and activations on the device.

    Parameters
    ----------
    model : UNet
        Its parameters are copied up once (``upload``); its architecture (plan) is reused.

    Notes
    -----
    The graph is the U-Net's (module docstring of :mod:`difnumpy.nn.unet`), op for op: the same kernels
    as ``UNet(backend="cuda")`` but no host round trip between them. ``__call__(x, t)`` accepts a host
    or device ``x`` and returns a device array; ``forward``/``backward`` keep device caches and return
    device gradients; :meth:`download` copies the (updated) parameters back into ``model.params``.
    """

    def __init__(self, model):
        for attr in ("params", "_down", "_mid", "_up", "groups", "base_channels", "dtype"):
            if not hasattr(model, attr):
                raise TypeError(f"model must be a difnumpy UNet (missing .{attr}), got {type(model).__name__}")
        self.model = model
        self.dtype = np.dtype(model.dtype)
        self.params: dict = {}
        self.upload()

    def upload(self) -> None:
        """Copy ``model.params`` to the device.

        Existing device arrays are overwritten in place (their identity is kept, so references to them,
        e.g. a :class:`DeviceTrainStep`'s, stay valid); missing ones are allocated.
        """
        for k, v in self.model.params.items():
            host = np.ascontiguousarray(v, dtype=self.dtype)
            d = self.params.get(k)
            if d is not None and tuple(d.shape) == host.shape:
                d.copy_to_device(host)
            else:
                self.params[k] = cuda.to_device(host)

    def download(self) -> None:
        """Copy the device parameters into ``model.params`` (in place)."""
        for k, d in self.params.items():
            d.copy_to_host(self.model.params[k])

    def _temb(self, t, n):
        from difnumpy.nn.layers import timestep_embedding
        t = np.asarray(t)
        if t.ndim == 0:
            t = np.full(n, t)
        if t.shape != (n,):
            raise ValueError(f"t must be an int or have shape (N,) = ({n},), got shape {t.shape}")
        return cuda.to_device(timestep_embedding(t, self.model.base_channels, dtype=self.dtype))

    def _res(self, key, has_skip, x, temb_act, keep):
        P, g, eps = self.params, self.model.groups, _gn_eps()
        h, m1, r1 = group_norm_silu_forward(x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], g, eps, True)
        a1 = h
        h = conv2d_forward(h, P[key + ".conv1.w"], P[key + ".conv1.b"], 1, 1)
        tp = linear_forward(temb_act, P[key + ".temb.w"], P[key + ".temb.b"])
        add_channel_bias_(h, tp)
        h1 = h
        h, m2, r2 = group_norm_silu_forward(h, P[key + ".norm2.gamma"], P[key + ".norm2.beta"], g, eps, True)
        a2 = h
        h = conv2d_forward(h, P[key + ".conv2.w"], P[key + ".conv2.b"], 1, 1)
        if has_skip:
            add_(h, conv2d_forward(x, P[key + ".skip.w"], P[key + ".skip.b"], 1, 0))
        else:
            add_(h, x)
        return h, ((x, m1, r1, a1, h1, m2, r2, a2, has_skip) if keep else None)

    def forward(self, x, t, keep: bool = True):
        """Forward pass on the device: ``(out, cache)`` (``cache`` None unless ``keep``)."""
        _check("x", x, 4)
        n = int(x.shape[0])
        x = asarray(x, self.dtype) if not is_array(x) else x
        if np.dtype(x.dtype) != self.dtype:
            raise TypeError(f"x must have the model's dtype {self.dtype}, got {x.dtype}")
        P, M = self.params, self.model
        e0 = self._temb(t, n)
        e1 = linear_forward(e0, P["time.lin1.w"], P["time.lin1.b"])
        s1 = silu_forward(e1)
        e2 = linear_forward(s1, P["time.lin2.w"], P["time.lin2.b"])
        temb_act = silu_forward(e2)
        h = conv2d_forward(x, P["stem.w"], P["stem.b"], 1, 1)
        skips, down_c, up_c = [], [], []
        hin = x
        for op in M._down:
            if op[0] == "res":
                h, c = self._res(op[1], op[2], h, temb_act, keep)
                skips.append(h)
            else:
                c = h
                h = conv2d_forward(h, P[op[1] + ".w"], P[op[1] + ".b"], 2, 1)
            down_c.append(c)
        h, mid_c = self._res(M._mid[0], M._mid[1], h, temb_act, keep)
        for op in M._up:
            if op[0] == "res":
                s = skips.pop()
                cat = concat_channels([h, s])
                ca = int(h.shape[1])
                h, c = self._res(op[1], op[2], cat, temb_act, keep)
                up_c.append((ca, c))
            else:
                u = upsample_nearest2x_forward(h)
                h = conv2d_forward(u, P[op[1] + ".w"], P[op[1] + ".b"], 1, 1)
                up_c.append((None, u))
        hn, mo, ro = group_norm_silu_forward(h, P["out.norm.gamma"], P["out.norm.beta"], M.groups, _gn_eps(), True)
        out = conv2d_forward(hn, P["out.conv.w"], P["out.conv.b"], 1, 1)
        if not keep:
            return out, None
        cache = {"x": hin, "time": (e0, e1, s1, e2, temb_act), "down": down_c, "mid": mid_c, "up": up_c,
                 "out": (h, mo, ro, hn)}
        return out, cache

    def __call__(self, x, t):
        """Inference forward pass: a device array of the shape of ``x``."""
        return self.forward(x, t, keep=False)[0]

    def _res_bwd(self, key, dout, c, g):
        P, G = self.params, self.model.groups
        x, m1, r1, a1, h1, m2, r2, a2, has_skip = c
        if has_skip:
            dxs, g[key + ".skip.w"], g[key + ".skip.b"] = _conv_bwd(dout, x, P[key + ".skip.w"], 1, 0)
        else:
            dxs = dout
        dh, g[key + ".conv2.w"], g[key + ".conv2.b"] = _conv_bwd(dout, a2, P[key + ".conv2.w"], 1, 1)
        dh, g[key + ".norm2.gamma"], g[key + ".norm2.beta"] = group_norm_silu_backward(
            dh, h1, P[key + ".norm2.gamma"], P[key + ".norm2.beta"], m2, r2, G, True)
        dtp = sum_hw(dh)
        dta, g[key + ".temb.w"], g[key + ".temb.b"] = linear_backward(dtp, self._temb_act, P[key + ".temb.w"])
        dh, g[key + ".conv1.w"], g[key + ".conv1.b"] = _conv_bwd(dh, a1, P[key + ".conv1.w"], 1, 1)
        dx, g[key + ".norm1.gamma"], g[key + ".norm1.beta"] = group_norm_silu_backward(
            dh, x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], m1, r1, G, True)
        add_(dx, dxs)
        return dx, dta

    def backward(self, dout, cache) -> dict:
        """Backward pass on the device: a dict of device gradients with the keys of ``model.params``."""
        P, M = self.params, self.model
        dout = asarray(dout, self.dtype)
        g: dict = {}
        h, mo, ro, hn = cache["out"]
        e0, e1, s1, e2, temb_act = cache["time"]
        self._temb_act = temb_act
        dh, g["out.conv.w"], g["out.conv.b"] = _conv_bwd(dout, hn, P["out.conv.w"], 1, 1)
        dh, g["out.norm.gamma"], g["out.norm.beta"] = group_norm_silu_backward(
            dh, h, P["out.norm.gamma"], P["out.norm.beta"], mo, ro, M.groups, True)
        dtemb = None
        dskips = [None] * M._num_skips
        for op, c in zip(reversed(M._up), reversed(cache["up"])):
            if op[0] == "res":
                ca, c_res = c
                dh, dt_ = self._res_bwd(op[1], dh, c_res, g)
                dtemb = dt_ if dtemb is None else add_(dtemb, dt_)
                dh, dskips[op[3]] = split_channels(dh, (ca, int(dh.shape[1]) - ca))
            else:
                u = c[1]
                du, g[op[1] + ".w"], g[op[1] + ".b"] = _conv_bwd(dh, u, P[op[1] + ".w"], 1, 1)
                dh = upsample_nearest2x_backward(du)
        dh, dt_ = self._res_bwd(M._mid[0], dh, cache["mid"], g)
        dtemb = dt_ if dtemb is None else add_(dtemb, dt_)
        for op, c in zip(reversed(M._down), reversed(cache["down"])):
            if op[0] == "res":
                add_(dh, dskips[op[3]])
                dh, dt_ = self._res_bwd(op[1], dh, c, g)
                add_(dtemb, dt_)
            else:
                dh, g[op[1] + ".w"], g[op[1] + ".b"] = _conv_bwd(dh, c, P[op[1] + ".w"], 2, 1)
        x = cache["x"]
        g["stem.w"], g["stem.b"] = conv2d_backward_weight(dh, x, tuple(P["stem.w"].shape), 1, 1)
        de = silu_backward(dtemb, e2)
        de, g["time.lin2.w"], g["time.lin2.b"] = linear_backward(de, s1, P["time.lin2.w"])
        de = silu_backward(de, e1)
        _, g["time.lin1.w"], g["time.lin1.b"] = linear_backward(de, e0, P["time.lin1.w"])
        self._temb_act = None
        return {k: g[k] for k in P}


def _conv_bwd(dout, x, w, stride, padding):
    dx = conv2d_backward_input(dout, w, tuple(x.shape), stride, padding)
    dw, db = conv2d_backward_weight(dout, x, tuple(w.shape), stride, padding)
    return dx, dw, db


def _gn_eps() -> float:  # TEMPORARY: kernels must not import nn (issue 10)
    from difnumpy.nn.unet import GN_EPS
    return GN_EPS




def _ddim_coefficients(schedule, t, prev_t, n, eta, prediction_type, clip_sample, clip_range,
                       final_alpha_cumprod):
    """(coef (N, 5), lo, hi, needs_noise) of one DDIM step, from :func:`difnumpy.samplers.ddim_coefficients`."""
    from difnumpy.samplers import ddim_coefficients
    A, B, C, D, sigma = ddim_coefficients(schedule, np.full(n, t, dtype=np.int64), np.full(n, prev_t, dtype=np.int64),
                                          eta, prediction_type, final_alpha_cumprod)
    lim = float(clip_range) if clip_sample else np.inf
    return np.stack([A, B, C, D, sigma], axis=1), np.full(n, -lim), np.full(n, lim), bool(np.any(sigma > 0))


def _ddpm_coefficients(schedule, t, prev_t, n, prediction_type, clip_sample, clip_range, variance_type):
    """(coef, lo, hi, needs_noise) of one DDPM step, from :func:`difnumpy.samplers.ddpm_coefficients`."""
    from difnumpy.samplers import ddpm_coefficients
    A, B, c1, c2, post_var, beta = ddpm_coefficients(schedule, np.full(n, t, dtype=np.int64),
                                                     np.full(n, prev_t, dtype=np.int64), prediction_type)
    E = np.zeros(n) if prev_t < 0 else np.sqrt(post_var if variance_type == "fixed_small" else beta)
    lim = float(clip_range) if clip_sample else np.inf
    return np.stack([A, B, c1, c2, E], axis=1), np.full(n, -lim), np.full(n, lim), prev_t >= 0


def sample_device(model, schedule, shape, *, method: str = "ddim", num_steps: int | None = None,
                  eta: float = 0.0, spacing: str = "leading", x_T=None, rng=None, dtype=np.float32,
                  prediction_type: str = "epsilon", clip_sample: bool = True, clip_range: float = 1.0,
                  final_alpha_cumprod: float = 1.0, variance_type: str = "fixed_small",
                  return_device: bool = False):
    """DDPM / DDIM sampling with ``x_t`` on the device from the first step to the last.

    Parameters
    ----------
    model : UNet or DeviceUNet
        The noise predictor; a UNet is wrapped in a :class:`DeviceUNet` (parameters copied up once).
    schedule : Schedule
    shape : tuple (N, C, H, W)
    method : {"ddpm", "ddim"}
    num_steps, eta, spacing : as in :func:`difnumpy.samplers.sample`
    x_T : ndarray or device array, optional
        Starting noise; otherwise drawn on the host from ``rng`` exactly as
        :func:`difnumpy.samplers.sample` does (``rng.standard_normal(shape, dtype)``), then copied up once,
        so deterministic DDIM (eta = 0) gives the CPU path's result for the same ``rng``.
    rng : numpy.random.Generator, int or None
        Also draws the step noise (DDPM, or DDIM with eta > 0) on the host, ``(N, C*H*W)`` per step, copied
        up (not promised to be the CPU path's draws).
    prediction_type, clip_sample, clip_range, final_alpha_cumprod, variance_type :
        As in :func:`difnumpy.samplers.ddim_step` / :func:`~difnumpy.samplers.ddpm_step`
        (variance_type "fixed_small" or "fixed_large"; no dynamic thresholding on the device).
    return_device : bool
        Return the device array instead of copying the samples down.

    Returns
    -------
    x0 : ndarray (or device array), shape ``shape``
    """
    from difnumpy.samplers import METHODS, PREDICTION_TYPES, inference_timesteps
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large' on the device, got {variance_type!r}")
    if method == "ddpm" and eta != 0.0:
        raise ValueError("eta applies to method='ddim' only")
    dmodel = model if isinstance(model, DeviceUNet) else DeviceUNet(model)
    dt = dmodel.dtype
    T = schedule.num_timesteps
    if num_steps is None:
        num_steps = T if method == "ddpm" else min(50, T)
    timesteps = inference_timesteps(T, num_steps, spacing)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if x_T is None:
        x_host = gen.standard_normal(tuple(int(s) for s in shape), dtype=dt)
    else:
        _check("x_T", x_T)
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T.shape {tuple(x_T.shape)}")
        x_host = x_T
    x = asarray(x_host, dt)
    n = int(x.shape[0])
    m = int(np.prod(x.shape[1:]))
    for i in range(len(timesteps)):
        t = int(timesteps[i])
        prev_t = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        out = dmodel(x, np.full(n, t, dtype=np.int64))
        if method == "ddim":
            coef, lo, hi, noisy = _ddim_coefficients(schedule, t, prev_t, n, float(eta), prediction_type,
                                                     clip_sample, clip_range, final_alpha_cumprod)
        else:
            coef, lo, hi, noisy = _ddpm_coefficients(schedule, t, prev_t, n, prediction_type, clip_sample,
                                                     clip_range, variance_type)
        x2, o2 = x.reshape(n, m), out.reshape(n, m)
        z = cuda.to_device(gen.standard_normal((n, m), dtype=dt)) if noisy else x2
        xp, _ = sampler_update(x2, o2, z, coef, lo, hi)
        x = xp.reshape(*x.shape)
    return x if return_device else x.copy_to_host()


_SAME = object()  # DeviceTrainStep.step: "use the value given to the constructor"


class DeviceTrainStep:
    """The DDPM training step (Ho et al. 2020, Algorithm 1) with parameters, Adam and EMA on the device.

    The device-resident twin of :meth:`difnumpy.trainer.Trainer.step` (which dispatches here for
    ``backend="cuda"``): the same rng draws, loss target, clipping, Adam / AdamW and EMA update, with
    the host ``optimizer`` and ``ema`` objects as *mirrors*. Their scalars (``lr``, ``step_count``,
    ``betas``, ``eps``, ``weight_decay``, ``decay``, ``num_updates``) are read and written on the host at
    every step (no transfer); their arrays (``m``, ``v``, the EMA parameters) and ``model.params`` hold
    the values of the last :meth:`download` (or :meth:`upload`).

    Parameters
    ----------
    model : difnumpy.nn.unet.UNet
        Its parameters are copied up once (a :class:`DeviceUNet`); :meth:`download` copies them back.
    schedule : Schedule
    lr, betas, eps, weight_decay, decoupled : Adam / AdamW hyperparameters (``decoupled`` selects AdamW);
        used to build the host ``optimizer`` mirror when none is given, ignored otherwise.
    ema_decay : float, decay of the EMA mirror built when ``ema`` is None (ignored otherwise).
    grad_clip : float > 0 or None
        Global-norm clipping bound (Pascanu et al. 2013), as :func:`difnumpy.nn.optim.clip_grad_norm`.
    rng : numpy.random.Generator or int
        Draws ``t`` then ``eps`` on the host exactly as :func:`difnumpy.trainer.loss_and_grads`, so a
        step matches the CPU path for the same rng.
    prediction_type : {"epsilon", "sample", "v_prediction"}, default "epsilon"
        Regression target ``eps``, ``x0`` or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``.
    optimizer : difnumpy.nn.optim.Adam or AdamW, optional
        Host mirror of the optimizer (``params`` with the keys of ``model.params``); by default a new one.
    ema : difnumpy.nn.optim.EMA, optional
        Host mirror of the EMA (its warm-up and counter are used); by default ``EMA(model.params, ema_decay)``.
    error : type, default FloatingPointError
        Exception raised for a non-finite loss or gradient norm (the Trainer passes DivergenceError).

    Attributes
    ----------
    net : DeviceUNet (``net.params``: the device parameters)
    m, v, ema_params : dict[str, device array], shapes of ``model.params``, the model's dtype
        Adam's moments and the EMA parameters on the device.
    host_current : bool
        True while the host mirrors hold the device values (False after a step until :meth:`download`).
    last_loss, last_grad_norm : float or None

    Notes
    -----
    ``step(x0)`` copies up the batch, ``eps``, the per-sample coefficients of ``t`` and the timestep
    embedding, and copies down two small arrays of per-block partial sums (the loss and the squared
    gradient norm, summed in float64 on the host). Parameters, gradients, moments and EMA never cross.
    Every device array keeps its identity for the object's lifetime (:meth:`upload` copies in place).
    """

    def __init__(self, model, schedule, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False, ema_decay=0.999, grad_clip=1.0, rng=None, *, prediction_type: str = "epsilon",
                 optimizer=None, ema=None, error: type = FloatingPointError):
        from difnumpy.nn.optim import EMA, Adam, AdamW
        from difnumpy.samplers import PREDICTION_TYPES
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        try:
            self.net = DeviceUNet(model)
        except TypeError as e:
            raise TypeError(f"the device training step (backend='cuda') trains a difnumpy UNet; {e}. Train other "
                            f"models with backend='cpu' (their own kernels may still run on the GPU)") from None
        self.schedule = schedule
        self.grad_clip, self.prediction_type, self.error = grad_clip, prediction_type, error
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if optimizer is None:
            opt_cls = AdamW if decoupled else Adam
            optimizer = opt_cls(model.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                backend="numpy")
        if ema is None:
            ema = EMA(model.params, ema_decay)
        for name, mirror in (("optimizer", optimizer), ("ema", ema)):
            if set(mirror.params) != set(model.params):
                raise ValueError(f"{name}.params must have the keys of model.params")
        self.optimizer, self.ema = optimizer, ema
        dt = self.net.dtype
        # moments and EMA start from the mirrors (zeros / a copy of the parameters for a new trainer,
        # restored values after load_checkpoint, which calls upload again)
        self.m = {k: cuda.to_device(np.ascontiguousarray(optimizer.m[k], dtype=dt)) for k in self.net.params}
        self.v = {k: cuda.to_device(np.ascontiguousarray(optimizer.v[k], dtype=dt)) for k in self.net.params}
        self.ema_params = {k: cuda.to_device(np.ascontiguousarray(ema.params[k], dtype=dt)) for k in self.net.params}
        self.host_current = True
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self._partial = None  # per-block partial sums of the squared gradient norm (allocated once)

    @property
    def step_count(self) -> int:
        """Number of updates applied (the optimizer mirror's ``step_count``)."""
        return self.optimizer.step_count

    def _target(self, d_x0, d_noise, sab, s1m, prediction_type):
        """The regression target on the device, shape (N, M) (Ho et al. eq. 14; Salimans & Ho Sec. 4)."""
        if prediction_type == "epsilon":
            return d_noise
        if prediction_type == "sample":
            return d_x0
        if prediction_type == "v_prediction":
            # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0: q_sample's kernel a x0 + b eps, (a, b) = (-s1m, sab)
            return q_sample(d_x0, d_noise, -s1m, sab)
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")

    def _global_norm(self, grads: dict) -> float:
        """``sqrt(sum_k ||g_k||^2)``: per-block partials of all arrays into one buffer, one copy down."""
        dt = self.net.dtype
        blocks = [grid_reduce(int(g.size))[0] for g in grads.values()]
        total = sum(blocks)
        if self._partial is None or self._partial.shape[0] != total:
            self._partial = cuda.device_array((total,), dtype=dt)
        off = 0
        for g, b in zip(grads.values(), blocks):
            build_sumsq(dt)[b, grid_reduce(1)[1]](_flat(g), self._partial[off:off + b])
            off += b
        return math.sqrt(float(self._partial.copy_to_host().astype(np.float64).sum()))

    def step(self, x0, lr=None, *, rng=None, grad_clip=_SAME, prediction_type=None) -> float:
        """One training step on a clean batch; returns the loss (before the update).

        Parameters
        ----------
        x0 : ndarray, shape (N, C, H, W), float
            Clean batch, cast to the model's dtype and copied up.
        lr : float, optional
            Learning rate of this update (the Trainer's warmup value); by default ``optimizer.lr``.
        rng, grad_clip, prediction_type : optional
            This step's values instead of the constructor's (the Trainer passes its current ones).

        Returns
        -------
        loss : float
            ``mean((model(x_t, t) - target)**2)``.

        Raises
        ------
        error (FloatingPointError or the constructor's ``error``)
            If the loss or the gradient norm is not finite; nothing is updated then (the rng has advanced).

        Notes
        -----
        Order as :meth:`difnumpy.trainer.Trainer.step`: draw ``t`` then ``eps``; ``x_t`` (DDPM eq. 4);
        forward, MSE, backward; global norm, clip ``g *= c / (norm + 1e-6)`` if ``norm > c``; Adam / AdamW
        (Kingma & Ba Alg. 1; L2 penalty ``g + wd p`` for Adam, decoupled decay for AdamW); EMA with the
        mirror's warm-up decay. Parameters, moments and EMA are updated on the device only.
        """
        opt, ema = self.optimizer, self.ema
        rng = self.rng if rng is None else rng
        grad_clip = self.grad_clip if grad_clip is _SAME else grad_clip
        prediction_type = prediction_type or self.prediction_type
        lr = opt.lr if lr is None else float(lr)
        dt = self.net.dtype
        step = opt.step_count + 1
        x0 = np.ascontiguousarray(to_host(x0), dtype=dt)
        n = x0.shape[0]
        t = rng.integers(0, self.schedule.num_timesteps, size=n, dtype=np.int64)
        noise = rng.standard_normal(x0.shape, dtype=dt)
        d_x0 = cuda.to_device(x0.reshape(n, -1))
        d_noise = cuda.to_device(noise.reshape(n, -1))
        sab, s1m = self.schedule.sqrt_alphas_cumprod[t], self.schedule.sqrt_one_minus_alphas_cumprod[t]
        x_t = q_sample(d_x0, d_noise, sab, s1m)
        target = self._target(d_x0, d_noise, sab, s1m, prediction_type)
        out, cache = self.net.forward(x_t.reshape(*x0.shape), t)
        loss, dout = mse_loss(out, target.reshape(*x0.shape))
        if not math.isfinite(loss):
            raise self.error(f"non-finite loss ({loss}) at step {step}; the update was not applied")
        grads = self.net.backward(dout, cache)
        norm = self._global_norm(grads)
        if not math.isfinite(norm):
            raise self.error(f"non-finite gradient norm ({norm}) at step {step}; the update was not applied")
        if grad_clip is not None and norm > grad_clip:
            s = grad_clip / (norm + 1e-6)
            for g in grads.values():
                scale_(g, s)
        b1, b2 = opt.betas
        wd = float(opt.weight_decay)
        decoupled = bool(getattr(opt, "decoupled", False))
        ema_decay = ema.current_decay()  # the host EMA's warm-up, same update count
        for k, p in self.net.params.items():
            g = grads[k]
            if wd != 0.0 and not decoupled:
                axpy_(g, p, wd)  # L2 penalty, as Adam.step
            adam_update(p, g, self.m[k], self.v[k], lr, b1, b2, opt.eps, wd if decoupled else 0.0, step)
            ema_update(self.ema_params[k], p, ema_decay)
        # the mirrors' scalars follow at once (host values, no transfer); their arrays are now stale
        opt.lr, opt.step_count = lr, step
        ema.num_updates += 1
        self.host_current = False
        self.last_loss, self.last_grad_norm = loss, norm
        return loss

    def download(self, ema_params: dict | None = None) -> None:
        """Copy the device state into the host mirrors: ``model.params``, ``optimizer.m``/``v``, ``ema.params``.

        A no-op when :attr:`host_current` (nothing changed on the device since the last copy), except
        that ``ema_params`` (a dict of host arrays), if given, always receives the EMA parameters.
        """
        if not self.host_current:
            self.net.download()
            for k in self.net.params:
                self.m[k].copy_to_host(self.optimizer.m[k])
                self.v[k].copy_to_host(self.optimizer.v[k])
                self.ema_params[k].copy_to_host(self.ema.params[k])
            self.host_current = True
        if ema_params is not None:
            for k, d in self.ema_params.items():
                d.copy_to_host(ema_params[k])

    def upload(self, params: bool = True, ema: bool = True, optimizer: bool = True) -> None:
        """Copy host mirrors to the device, in place: ``model.params``, ``ema.params``, ``optimizer.m``/``v``.

        Used after the host values were changed (a checkpoint restored, parameters replaced). Uploading
        all three makes :attr:`host_current` True; uploading mirrors that are stale (``host_current``
        False) would discard device updates, which is the caller's decision.
        """
        dt = self.net.dtype
        if params:
            self.net.upload()
        for flag, dev, host in ((ema, self.ema_params, self.ema.params), (optimizer, self.m, self.optimizer.m),
                                (optimizer, self.v, self.optimizer.v)):
            if flag:
                for k, d in dev.items():
                    d.copy_to_device(np.ascontiguousarray(host[k], dtype=dt))
        if params and ema and optimizer:
            self.host_current = True
