"""A small convolutional U-Net (the noise predictor ``eps_theta(x_t, t)``) with hand-written backprop.

The architecture is part of the reference (issue 3); with ``C = base_channels``:

- time embedding: ``sinusoidal(t, C) -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C) = temb``; with
  ``num_classes = K`` a class embedding ``label_emb[y]`` (a (K+1) x 4C table, row K = "no class") is
  added to it, as improved-diffusion's ``label_emb`` (Nichol & Dhariwal 2021; the null row for
  classifier-free guidance, Ho & Salimans 2022);
- stem: ``Conv3x3(in_channels -> C)``, padding 1;
- down path: for each level ``i`` (``C * channel_mults[i]`` channels) ``num_res_blocks`` ResBlocks, each
  output kept as a skip; between levels a Downsample = ``Conv3x3``, stride 2, padding 1, channels kept;
- middle: one ResBlock at the lowest level;
- up path, levels in reverse: ``num_res_blocks`` times ``h = ResBlock(concat(h, skips.pop()))``;
  between levels an Upsample = nearest x2 then ``Conv3x3`` (channels kept);
- out: ``GroupNorm -> SiLU -> Conv3x3(C -> in_channels)``;
- ``ResBlock(ci -> co)``: ``h = Conv3x3(SiLU(GN(x)))``; ``h += Linear(4C -> co)(SiLU(temb))`` broadcast
  over H, W; ``h = Conv3x3(SiLU(GN(h)))``; ``out = h + (Conv1x1(x) if ci != co else x)``.

This is the DDPM U-Net of Ho et al. 2020 (appendix B) without attention and dropout, at a small
size: the default (``in_channels=1``) has exactly 410,721 parameters.

Parameter keys (stable, in forward order), e.g. for the default model::

    time.lin1.{w,b}  time.lin2.{w,b}  [label_emb.w]  stem.{w,b}
    down.0.res.0.{norm1.gamma, norm1.beta, conv1.w, conv1.b, temb.w, temb.b,
                  norm2.gamma, norm2.beta, conv2.w, conv2.b[, skip.w, skip.b]}
    down.0.downsample.{w,b}  down.1.res.0.*  mid.res.*  up.1.res.0.*  up.1.upsample.{w,b}
    up.0.res.0.*  out.norm.{gamma,beta}  out.conv.{w,b}

Initialisation (from the explicit ``rng``): PyTorch's defaults for conv and linear layers
(``kaiming_uniform_(a=sqrt(5))``, i.e. weights and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``),
GroupNorm ``gamma = 1, beta = 0``, the class embedding ``N(0, 1)`` (``nn.Embedding``'s); and, as in the DDPM reference code, the last conv of every
ResBlock (``conv2``) and the output conv start at zero, so that each ResBlock starts as its
skip path and the untrained model predicts 0. Draws are made in float64 and cast, so the same
seed gives the same parameters (to rounding) in float32 and float64.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from difnumpy._validation import as_generator
from difnumpy.kernels import check_backend, get_backend
from difnumpy.nn import _unet_plan as _plan
from difnumpy.nn import layers as L

__all__ = ["UNet"]

GN_EPS = 1e-5
"""The GroupNorm epsilon (PyTorch's default)."""


def _as_int(name: str, v, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _as_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from e
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


class UNet:
    """The reference U-Net ``eps_theta(x_t, t)`` (see the module docstring for the architecture).

    Parameters
    ----------
    in_channels : int >= 1, image channels (also the output channels)
    base_channels : int, even, >= 2 (``C``; the time embedding has dimension C, temb 4C)
    channel_mults : sequence of int >= 1, one per resolution level
    num_res_blocks : int >= 1, ResBlocks per level (down and up)
    groups : int, GroupNorm groups; must divide every normalised channel count
    dtype : float32 or float64, dtype of the parameters and activations
    rng : numpy.random.Generator, int seed or None, for the initial parameters
    backend : {"numpy", "cpu", "cuda"}, the kernel backend every op of the graph runs on
    num_classes : int >= 1 or None
        K: a class-conditional model (``model(x, t, class_labels=y)``, y in [0, K], K = no class); None
        (the default) is the unconditional model, unchanged (410,721 parameters by default).

    Attributes
    ----------
    params : dict[str, array], stable keys in forward order, arrays of ``dtype``: the backend's native
        arrays (NumPy arrays on "numpy" and "cpu", device arrays on "cuda"; :meth:`host_params` gives
        NumPy arrays on every backend)
    config : dict, plain JSON-able; ``UNet(**model.config)`` rebuilds the architecture
    backend : str, settable (moves the parameters to the new backend's arrays; values unchanged)

    Notes
    -----
    ``forward(x, t)`` accepts ``x`` of shape (N, in_channels, H, W) with H and W divisible by
    ``2 ** (len(channel_mults) - 1)`` (e.g. 8x8 or 28x28 for two levels); ``x`` is cast to the
    model's dtype and the output has the model's dtype. ``t`` holds timesteps >= 0, shape (N,), or one
    number for the whole batch: integers, or reals where a sampler interpolates between training steps
    (Euler / Heun on Karras sigmas); the sinusoidal embedding is defined for real t. It is computed in
    float64 and cast.

    One graph serves every backend: each op is a call of the backend API
    (:data:`difnumpy.kernels.api.BACKEND_API`) on the backend's native arrays, so on "cuda" the
    parameters and every activation stay on the device. Results come back in the kind of array given:
    a NumPy ``x`` (or ``dout``) gives NumPy outputs (copied down once), a device ``x`` device outputs.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, groups: int = 8, dtype=np.float32, rng=None, backend: str = "cpu",
                 num_classes: int | None = None):
        self.in_channels = _as_int("in_channels", in_channels, 1)
        self.base_channels = _as_int("base_channels", base_channels, 2)
        if self.base_channels % 2:
            raise ValueError(f"base_channels must be even (it is the sinusoidal embedding's dimension), "
                             f"got {base_channels}")
        if isinstance(channel_mults, (str, bytes)) or not isinstance(channel_mults, Sequence) \
                or len(channel_mults) == 0:
            raise TypeError(f"channel_mults must be a non-empty sequence of ints, got {channel_mults!r}")
        self.channel_mults = tuple(_as_int(f"channel_mults[{i}]", m, 1) for i, m in enumerate(channel_mults))
        self.num_res_blocks = _as_int("num_res_blocks", num_res_blocks, 1)
        self.groups = _as_int("groups", groups, 1)
        self.num_classes = None if num_classes is None else _as_int("num_classes", num_classes, 1)
        self.dtype = _as_dtype(dtype)
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)) and rng < 0:
            raise ValueError(f"rng must be a non-negative int seed, None or a numpy Generator, got {rng}")
        rng = as_generator(rng)
        check_backend(backend)
        self._backend = backend
        self._kern = get_backend(backend)

        self._build_plan()
        bad = sorted({c for c in self._norm_channels if c % self.groups})
        if bad:
            raise ValueError(f"groups={self.groups} must divide every GroupNorm channel count "
                             f"{sorted(set(self._norm_channels))}; it does not divide {bad}")
        self.params: dict[str, np.ndarray] = {}
        # while frozen: [store of derived weights, arrays made read-only, (param ids, checked params) | None,
        #               (checked params, {(input shape, share index): (plan | None, ResBlock keys)}) | None]
        self._frozen: list | None = None
        self._train_plans: dict = {}  # (shape, share) -> (parameter ids, plan | None, ops, ResBlock keys): _unet_plan
        self._init_params(rng)

    # ---------------------------------------------------------------- construction

    @property
    def backend(self) -> str:
        """The kernel backend: "numpy" (NumPy twins), "cpu" (numba) or "cuda"."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend(name)
        kern = get_backend(name)
        if kern is not self._kern:  # the parameters move to the new backend's arrays
            self.params = {k: kern.asarray(self._kern.to_host(v)) for k, v in self.params.items()}
        self._kern = kern
        self._backend = name

    @property
    def kernels(self):
        """The kernel module of :attr:`backend` (the backend API)."""
        return self._kern

    def host_params(self) -> dict[str, np.ndarray]:
        """The parameters as NumPy arrays: :attr:`params` itself on host backends, copies on "cuda"."""
        return {k: self._kern.to_host(v) for k, v in self.params.items()}

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def config(self) -> dict[str, Any]:
        """A plain JSON-able dict such that ``UNet(**config)`` rebuilds this architecture."""
        return {
            "in_channels": self.in_channels,
            "base_channels": self.base_channels,
            "channel_mults": list(self.channel_mults),
            "num_res_blocks": self.num_res_blocks,
            "groups": self.groups,
            "num_classes": self.num_classes,
            "dtype": self.dtype.name,
            "backend": self.backend,
        }

    def _build_plan(self) -> None:
        """Lay out the blocks: ``self._shapes`` (key -> (shape, init)) and the op lists."""
        C, T = self.base_channels, 4 * self.base_channels
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        norm_channels: list[int] = []

        def lin(key, fin, fout):
            shapes[key + ".w"] = ((fout, fin), "uniform")
            shapes[key + ".b"] = ((fout,), f"uniform:{fin}")

        def conv(key, cin, cout, k, zero=False):
            init = "zero" if zero else "uniform"
            shapes[key + ".w"] = ((cout, cin, k, k), init)
            shapes[key + ".b"] = ((cout,), "zero" if zero else f"uniform:{cin * k * k}")

        def norm(key, ch):
            shapes[key + ".gamma"] = ((ch,), "one")
            shapes[key + ".beta"] = ((ch,), "zero")
            norm_channels.append(ch)

        def res(key, ci, co):
            norm(key + ".norm1", ci)
            conv(key + ".conv1", ci, co, 3)
            lin(key + ".temb", T, co)
            norm(key + ".norm2", co)
            conv(key + ".conv2", co, co, 3, zero=True)
            if ci != co:
                conv(key + ".skip", ci, co, 1)
            return (key, ci != co)

        lin("time.lin1", C, T)
        lin("time.lin2", T, T)
        if self.num_classes is not None:
            shapes["label_emb.w"] = ((self.num_classes + 1, T), "normal")
        conv("stem", self.in_channels, C, 3)
        ch = C
        skip_ch: list[int] = []
        down: list[tuple] = []          # ("res", key, has_skip_conv, skip_index) | ("downsample", key)
        for i, mult in enumerate(self.channel_mults):
            for j in range(self.num_res_blocks):
                key, has_skip = res(f"down.{i}.res.{j}", ch, C * mult)
                ch = C * mult
                down.append(("res", key, has_skip, len(skip_ch)))
                skip_ch.append(ch)
            if i < self.num_levels - 1:
                conv(f"down.{i}.downsample", ch, ch, 3)
                down.append(("downsample", f"down.{i}.downsample"))
        mid = res("mid.res", ch, ch)
        up: list[tuple] = []            # ("res", key, has_skip_conv, skip_index) | ("upsample", key)
        for i in reversed(range(self.num_levels)):
            for j in range(self.num_res_blocks):
                sidx = len(skip_ch) - 1
                key, has_skip = res(f"up.{i}.res.{j}", ch + skip_ch.pop(), C * self.channel_mults[i])
                ch = C * self.channel_mults[i]
                up.append(("res", key, has_skip, sidx))
            if i > 0:
                conv(f"up.{i}.upsample", ch, ch, 3)
                up.append(("upsample", f"up.{i}.upsample"))
        norm("out.norm", ch)
        conv("out.conv", ch, self.in_channels, 3, zero=True)
        self._shapes = shapes
        self._norm_channels = norm_channels
        self._down, self._mid, self._up = down, mid, up
        self._conv3x3_keys = None  # (see _conv3x3s)
        self._num_skips = self.num_levels * self.num_res_blocks

    def _init_params(self, rng: np.random.Generator) -> None:
        for key, (shape, init) in self._shapes.items():
            if init == "zero":
                a = np.zeros(shape)
            elif init == "normal":
                a = rng.standard_normal(shape)
            elif init == "one":
                a = np.ones(shape)
            else:                       # "uniform" (weights: fan_in from the shape) or "uniform:<fan_in>"
                fan_in = int(init.split(":")[1]) if ":" in init else int(np.prod(shape[1:]))
                bound = 1.0 / np.sqrt(fan_in)
                a = rng.uniform(-bound, bound, size=shape)
            self.params[key] = self._kern.asarray(a, self.dtype)

    def num_params(self) -> int:
        """Total number of scalar parameters."""
        return int(sum(p.size for p in self.params.values()))

    def set_params(self, params: dict[str, np.ndarray], copy: bool = True) -> None:
        """Replace the parameters with ``params`` (same keys and shapes; cast to the model's dtype).

        ``params`` may hold NumPy arrays or this backend's native arrays; they are copied to the
        backend (``copy=False`` lets host arrays of the right dtype be used as they are on host backends).

        Raises
        ------
        ValueError
            If a key is missing or unexpected, or a shape differs, or a value is not finite.
        """
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
        missing = [k for k in self._shapes if k not in params]
        extra = [k for k in params if k not in self._shapes]
        if missing or extra:
            raise ValueError(f"params keys do not match the model: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                             f"{'...' if len(extra) > 5 else ''}")
        new = {}
        for k, (shape, _) in self._shapes.items():
            a = params[k]
            a = self._kern.to_host(a) if self._kern.is_array(a) else np.asarray(a)
            if a.shape != shape:
                raise ValueError(f"params[{k!r}] must have shape {shape}, got {a.shape}")
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"params[{k!r}] must be a float array, got {a.dtype}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"params[{k!r}] holds non-finite values")
            a = np.array(a, dtype=self.dtype, order="C", copy=True) if copy \
                else np.ascontiguousarray(a, dtype=self.dtype)
            new[k] = self._kern.asarray(a)
        self.params = new

    def copy(self) -> "UNet":
        """A new UNet with the same config and a copy of the parameters."""
        other = UNet(**self.config, rng=0)
        other.set_params(self.host_params(), copy=True)
        return other

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"UNet({cfg})  # {self.num_params():,} params"

    # ---------------------------------------------------------------- input checks

    def _check_labels(self, class_labels, n: int):
        """Host int64 labels (N,) in [0, K] (K = no class), or None for an unconditional model."""
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional UNet (num_classes=None)")
            return None
        if class_labels is None:
            return np.full(n, self.num_classes, dtype=np.int64)  # all "no class"
        y = np.asarray(class_labels)
        if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"class_labels must be ints in [0, {self.num_classes}], got dtype {y.dtype}")
        if y.ndim == 0:
            y = np.full(n, int(y))
        if y.shape != (n,):
            raise ValueError(f"class_labels must be an int or have shape (N,) = ({n},), got shape {y.shape}")
        if y.min() < 0 or y.max() > self.num_classes:
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} = no class), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        return y.astype(np.int64)

    def _check_inputs(self, x, t):
        native = not isinstance(x, np.ndarray) and self._kern.is_array(x)
        if not native:
            x = np.asarray(x)
        dt = np.dtype(x.dtype)
        if dt.kind not in "fiu":  # (not bool, complex, object...; dtype.kind: ~3 us less a pass than issubdtype)
            raise TypeError(f"x must be a real numeric array, got dtype {x.dtype}")
        if native and dt != self.dtype:
            raise TypeError(f"x must have the model's dtype {self.dtype} when it is a device array, got {dt}")
        shape = tuple(int(s) for s in x.shape)
        if len(shape) != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got shape {shape}")
        N, C, H, W = shape
        if C != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (in_channels), got shape {shape}")
        div = 2 ** (self.num_levels - 1)
        if N == 0 or H == 0 or W == 0 or H % div or W % div:
            raise ValueError(f"x must have N >= 1 and H, W positive and divisible by {div} "
                             f"(2**(levels-1)), got shape {shape}")
        x = self._kern.asarray(x, self.dtype)

        ta = np.asarray(t)
        if ta.dtype.kind not in "fiu":
            raise TypeError(f"t must hold timesteps (integers or reals), got dtype {ta.dtype}")
        if ta.ndim == 0:
            ta = np.full(N, ta)
        if ta.shape != (N,):
            raise ValueError(f"t must be an int or have shape (N,) = ({N},), got shape {ta.shape}")
        if ta.dtype.kind == "f" and not np.isfinite(ta).all():
            raise ValueError("t must hold finite timesteps, got NaN or inf")
        if (ta < 0).any():
            raise ValueError(f"t must be >= 0 (0-indexed timesteps), got min {ta.min()}")
        return x, ta

    # ---------------------------------------------------------------- forward

    def _pass_params(self) -> dict:
        """The parameters as native arrays of the backend, checked once per pass (shape and dtype):
        the graph's layers then run unchecked (:mod:`difnumpy.nn.layers`' ``_conv2d`` etc.)."""
        k, P, out = self._kern, self.params, {}
        if self._frozen is not None:  # the same arrays as at the last pass of the scope: checked then
            ids = tuple(map(id, P.values()))
            if self._frozen[2] is not None and self._frozen[2][0] == ids:
                return self._frozen[2][1]
        for key, (shape, _) in self._shapes.items():
            a = P.get(key)
            if a is None:
                raise ValueError(f"params[{key!r}] is missing")
            if not (isinstance(a, np.ndarray) or k.is_array(a)):
                raise TypeError(f"params[{key!r}] must be an array, got {type(a).__name__}")
            if tuple(a.shape) != shape:
                raise ValueError(f"params[{key!r}] must have shape {shape}, got {tuple(a.shape)}")
            if np.dtype(a.dtype) != self.dtype:
                raise TypeError(f"params[{key!r}] must have the model's dtype {self.dtype}, got {a.dtype}")
            out[key] = k.asarray(a)
        if self._frozen is not None:
            self._frozen[2] = (ids, out)
        return out

    def _res_forward(self, P: dict, key: str, has_skip: bool, x: np.ndarray, temb_act: np.ndarray, keep: bool):
        k, g = self._kern, self.groups
        tp, c_t = L._linear(temb_act, P[key + ".temb.w"], P[key + ".temb.b"], k)
        fused = getattr(k, "resblock_forward", None)
        if fused is not None:  # the backend may run the whole block in one call (the same bits)
            s = (P[key + ".skip.w"], P[key + ".skip.b"]) if has_skip else (None, None)
            r = fused(x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], P[key + ".conv1.w"], P[key + ".conv1.b"], tp,
                      P[key + ".norm2.gamma"], P[key + ".norm2.beta"], P[key + ".conv2.w"], P[key + ".conv2.b"], *s,
                      g, GN_EPS, keep)
            if r is not None:
                if not keep:
                    return r, None
                h, (h0, m1, r1, h1, h2, m2, r2) = r
                # the caches the unfused layers build
                return h, (L._gn_silu_cache(x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], m1, r1, g, True, k),
                           L._conv2d_cache(h0, P[key + ".conv1.w"], 1, 1, k), c_t,
                           L._gn_silu_cache(h1, P[key + ".norm2.gamma"], P[key + ".norm2.beta"], m2, r2, g, True, k),
                           L._conv2d_cache(h2, P[key + ".conv2.w"], 1, 1, k),
                           L._conv2d_cache(x, s[0], 1, 0, k) if has_skip else None)
        h, c_n1 = L._gn_silu(x, P[key + ".norm1.gamma"], P[key + ".norm1.beta"], g, GN_EPS, True, k)
        h, c_c1 = L._conv2d(h, P[key + ".conv1.w"], P[key + ".conv1.b"], 1, 1, k)
        k.add_channel_bias_(h, tp)
        h, c_n2 = L._gn_silu(h, P[key + ".norm2.gamma"], P[key + ".norm2.beta"], g, GN_EPS, True, k)
        h, c_c2 = L._conv2d(h, P[key + ".conv2.w"], P[key + ".conv2.b"], 1, 1, k)
        if has_skip:
            s, c_s = L._conv2d(x, P[key + ".skip.w"], P[key + ".skip.b"], 1, 0, k)
            k.add_(h, s)
        else:
            c_s = None
            k.add_(h, x)
        return h, ((c_n1, c_c1, c_t, c_n2, c_c2, c_s) if keep else None)

    def _scope(self):
        """The backend's context for a whole pass (the numba backend holds BLAS to one thread and computes
        each conv's Winograd filters once per pass, or once per :meth:`frozen` scope)."""
        scope = getattr(self._kern, "step_scope", None)
        if scope is None:
            return contextlib.nullcontext()
        if self._frozen is None:
            return scope()
        self._freeze_arrays()  # parameters assigned since the scope opened are read-only too
        return scope(self._frozen[0])

    def _conv3x3s(self, P: dict, H: int, W: int) -> list:
        """``[(weight, h, w)]``: the pass's 3x3 stride-1 convs' weights and image sizes, in forward order."""
        keys = self._conv3x3_keys
        if keys is None:  # (key, levels down) walked once from the graph's op lists
            keys, e = [("stem.w", 0)], 0
            for op in self._down:
                if op[0] == "res":
                    keys += [(op[1] + ".conv1.w", e), (op[1] + ".conv2.w", e)]
                else:  # the stride-2 downsampling conv
                    e += 1
            keys += [(self._mid[0] + ".conv1.w", e), (self._mid[0] + ".conv2.w", e)]
            for op in self._up:
                if op[0] == "res":
                    keys += [(op[1] + ".conv1.w", e), (op[1] + ".conv2.w", e)]
                else:  # nearest 2x upsampling, then a 3x3 conv
                    e -= 1
                    keys.append((op[1] + ".w", e))
            keys.append(("out.conv.w", e))
            self._conv3x3_keys = keys
        return [(P[key], H >> e, W >> e) for key, e in keys]  # (H, W divisible by 2**(levels - 1))

    def _prefetch_filters(self, P: dict, x_shape, backward: bool) -> None:
        """Let the backend start the pass's filter transforms on an idle thread (a pass not split into batch
        shares runs its kernels on one thread; the transforms are made once per pass while training)."""
        hook = getattr(self._kern, "prefetch_conv3x3_filters", None)
        if hook is not None:
            N, _, H, W = (int(s) for s in x_shape)
            convs = self._conv3x3s(P, H, W)
            hook(convs[::-1] if backward else convs, N, backward)

    def _freeze_arrays(self) -> None:
        for v in self.params.values():
            if isinstance(v, np.ndarray) and v.flags.writeable:
                v.flags.writeable = False
                self._frozen[1].append(v)

    @contextlib.contextmanager
    def frozen(self):
        """Context in which the parameters do not change: every model call may reuse what it derived from them.

        Inside it the host parameter arrays are read-only (an in-place write raises ValueError; arrays
        assigned to :attr:`params` inside the scope are made read-only at the next call), and on the "cpu"
        backend each 3x3 conv's Winograd filter transform (Lavin & Gray 2016, eq. 8: ``G g G^T``) is
        computed once for the scope instead of once per call. The sampling loops
        (:func:`difnumpy.samplers.sample`, the solvers, inpainting) run inside it. Re-entrant; on exit the
        arrays it made read-only are writeable again. Results are the same bits as without it.
        """
        if self._frozen is not None:
            yield self
            return
        self._frozen = [{}, [], None, None]
        try:
            self._freeze_arrays()
            yield self
        finally:
            store, arrays = self._frozen[0], self._frozen[1]
            self._frozen = None
            store.clear()
            for v in arrays:
                v.flags.writeable = True

    def _shares(self, n: int):
        """The backend's batch split for a pass over ``n`` images (None: one pass)."""
        split = getattr(self._kern, "batch_shares", None)
        return split(n) if split is not None else None

    def _forward(self, x, t, keep: bool, class_labels=None):
        given_host = isinstance(x, np.ndarray) or not self._kern.is_array(x)
        with self._scope():
            x, t = self._check_inputs(x, t)
            y = self._check_labels(class_labels, int(x.shape[0]))
            P = self._pass_params()
            shares = self._shares(x.shape[0])
            planned = None
            if shares is None:  # the backend may run the pass as one compiled program (the same bits)
                planned = _plan.training_pass(self, P, x, t, y, GN_EPS) if keep else \
                    _plan.inference_pass(self, P, x, t, y, GN_EPS) if self._frozen is not None else None
            if planned is not None:
                out, cache = planned
            elif shares is None:
                if self._frozen is None:  # (a frozen scope makes its transforms once)
                    self._prefetch_filters(P, x.shape, False)
                out, cache = self._forward_impl(P, x, t, y, keep)
                if keep:
                    cache["params"] = P  # the backward's convs (its filter prefetch)
            else:
                # data parallel (host backends): each thread runs the whole pass on its images
                def share(j, a, b):  # a share may run as one compiled program, as a small pass does
                    ys = None if y is None else y[a:b]
                    r = _plan.training_pass(self, P, x[a:b], t[a:b], ys, GN_EPS, share=True) if keep else \
                        _plan.inference_pass(self, P, x[a:b], t[a:b], ys, GN_EPS, share=j) \
                        if self._frozen is not None else None
                    return r if r is not None else self._forward_impl(P, x[a:b], t[a:b], ys, keep)
                parts = self._kern.run_shares(share, shares)
                out = np.concatenate([p[0] for p in parts])
                cache = {"shares": shares, "parts": [p[1] for p in parts]} if keep else None
        return (self._kern.to_host(out) if given_host else out), cache

    def _time_embedding(self, P, t, y):
        """``(SiLU(temb), caches)``: the time MLP (plus the class embedding), shared by every ResBlock."""
        k = self._kern
        # float64 sinusoid on the host, cast to the model dtype
        e = k.asarray(L.timestep_embedding(t, self.base_channels, dtype=self.dtype))
        e, c_l1 = L._linear(e, P["time.lin1.w"], P["time.lin1.b"], k)
        e, c_a1 = L._silu(e, k)
        e, c_l2 = L._linear(e, P["time.lin2.w"], P["time.lin2.b"], k)
        c_y = None
        if y is not None:  # the class embedding added to temb (improved-diffusion's label_emb)
            ey, c_y = L.embedding_forward(P["label_emb.w"], y, backend=k)
            k.add_(e, ey)
        temb_act, c_a2 = L._silu(e, k)
        return temb_act, (c_l1, c_a1, c_l2, c_a2, c_y)

    def _forward_impl(self, P, x, t, y, keep: bool):
        # x, t, P: already checked by _forward (once for the whole batch, not once per share or layer)
        k = self._kern
        temb_act, c_time = self._time_embedding(P, t, y)  # SiLU(temb), shared by every ResBlock

        h, c_stem = L._conv2d(x, P["stem.w"], P["stem.b"], 1, 1, k)
        skips: list[np.ndarray] = []
        down_c: list = []
        for op in self._down:
            if op[0] == "res":
                _, key, has_skip, _sidx = op
                h, c = self._res_forward(P, key, has_skip, h, temb_act, keep)
                skips.append(h)
            else:
                key = op[1]
                h, c = L._conv2d(h, P[key + ".w"], P[key + ".b"], 2, 1, k)
            down_c.append(c)
        h, mid_c = self._res_forward(P, self._mid[0], self._mid[1], h, temb_act, keep)
        up_c: list = []
        for op in self._up:
            if op[0] == "res":
                _, key, has_skip, _sidx = op
                h, c_cat = L._concat([h, skips.pop()], k)
                h, c = self._res_forward(P, key, has_skip, h, temb_act, keep)
                up_c.append((c_cat, c))
            else:
                key = op[1]
                h, c_up = L._upsample(h, k)
                h, c_conv = L._conv2d(h, P[key + ".w"], P[key + ".b"], 1, 1, k)
                up_c.append((c_up, c_conv))
        h, c_on = L._gn_silu(h, P["out.norm.gamma"], P["out.norm.beta"], self.groups, GN_EPS, True, k)
        out, c_oc = L._conv2d(h, P["out.conv.w"], P["out.conv.b"], 1, 1, k)
        if not keep:
            return out, None
        cache = {
            "time": c_time,
            "stem": c_stem,
            "down": down_c,
            "mid": mid_c,
            "up": up_c,
            "out": (c_on, c_oc),
        }
        return out, cache

    def forward(self, x, t, class_labels=None) -> tuple[np.ndarray, dict]:
        """Training forward pass.

        Parameters
        ----------
        x : ndarray, shape (N, in_channels, H, W), cast to the model's dtype
        t : int or int array, shape (N,), timesteps >= 0
        class_labels : int or int array (N,) in [0, K], optional (class-conditional models only;
            None means every sample is "no class", label K)

        Returns
        -------
        out : ndarray, shape (N, in_channels, H, W), model dtype (the predicted noise, or x0 / v)
        cache : dict, everything :meth:`backward` needs (see the Notes)

        Notes
        -----
        ``cache`` = ``{"time": (lin1, silu1, lin2, silu2, label_emb | None), "stem": conv, "down": [per op of the down
        path: ResBlock cache | conv cache], "mid": ResBlock cache, "up": [per op of the up path:
        (concat cache, ResBlock cache) | (upsample cache, conv cache)], "out": (gn_silu, conv)}``;
        a ResBlock cache is ``(gn_silu1, conv1, temb_linear, gn_silu2, conv2, skip_conv | None)``.
        Each entry is the cache of the corresponding :mod:`difnumpy.nn.layers` function; a pass not split into
        batch shares also keeps ``"params"``, the pass's parameter arrays (to start the backward's filter
        transforms early, :meth:`_prefetch_filters`), and a pass the backend ran as one compiled program
        ``"plan"``, what the backward's program needs (the arrays above are then views of its workspace).
        """
        return self._forward(x, t, keep=True, class_labels=class_labels)

    def __call__(self, x, t, class_labels=None) -> np.ndarray:
        """Inference forward pass (no cache kept): ``model(x_t, t[, class_labels]) -> output``, shape of
        ``x`` (a NumPy array for a NumPy ``x``, a native array for a native one)."""
        return self._forward(x, t, keep=False, class_labels=class_labels)[0]

    # ---------------------------------------------------------------- backward

    def _res_backward(self, key: str, dout: np.ndarray, cache, grads: dict):
        c_n1, c_c1, c_t, c_n2, c_c2, c_s = cache
        fused = getattr(self._kern, "resblock_backward", None)
        if fused is not None:  # the backend may run the block's backward in two calls (the same bits)
            temb = {}

            def temb_backward(dtp):
                dtemb_act, temb["w"], temb["b"] = L.linear_backward(dtp, c_t)
                return dtemb_act
            r = fused(dout, c_n1[0], c_c1[0], c_n2[0], c_c2[0], c_n1[3], c_n1[4], c_n2[3], c_n2[4], c_n1[1], c_n1[2],
                      c_c1[1], c_n2[1], c_n2[2], c_c2[1], None if c_s is None else c_s[1], self.groups, temb_backward)
            if r is not None:
                dx, dtemb_act, block_grads = r
                for suffix, v in block_grads.items():
                    grads[key + "." + suffix] = v
                grads[key + ".temb.w"], grads[key + ".temb.b"] = temb["w"], temb["b"]
                return dx, dtemb_act
        if c_s is not None:
            dx_skip, grads[key + ".skip.w"], grads[key + ".skip.b"] = L.conv2d_backward(dout, c_s)
        else:
            dx_skip = dout
        dh, grads[key + ".conv2.w"], grads[key + ".conv2.b"] = L.conv2d_backward(dout, c_c2)
        dh, grads[key + ".norm2.gamma"], grads[key + ".norm2.beta"] = L.group_norm_silu_backward(dh, c_n2)
        dtp = self._kern.sum_hw(dh)     # the gradient of add_channel_bias_
        dtemb_act, grads[key + ".temb.w"], grads[key + ".temb.b"] = L.linear_backward(dtp, c_t)
        dh, grads[key + ".conv1.w"], grads[key + ".conv1.b"] = L.conv2d_backward(dh, c_c1)
        dx, grads[key + ".norm1.gamma"], grads[key + ".norm1.beta"] = L.group_norm_silu_backward(dh, c_n1)
        self._kern.add_(dx, dx_skip)    # kernels return fresh arrays, so in place is safe
        return dx, dtemb_act

    def _time_backward(self, c_time, dtemb, g: dict) -> None:
        """The time MLP's (and the class embedding's) gradients into ``g``, from SiLU(temb)'s ``dtemb``."""
        c_l1, c_a1, c_l2, c_a2, c_y = c_time
        de = L.silu_backward(dtemb, c_a2)
        if c_y is not None:
            g["label_emb.w"] = L.embedding_backward(de, c_y)
        de, g["time.lin2.w"], g["time.lin2.b"] = L.linear_backward(de, c_l2)
        de = L.silu_backward(de, c_a1)
        _, g["time.lin1.w"], g["time.lin1.b"] = L.linear_backward(de, c_l1)

    def backward(self, dout: np.ndarray, cache: dict, return_input_grad: bool = False):
        """Backward pass through :meth:`forward`.

        Parameters
        ----------
        dout : ndarray, shape of the forward output, the gradient of the loss w.r.t. it
        cache : dict, from :meth:`forward`
        return_input_grad : bool, also return the gradient w.r.t. ``x``

        Returns
        -------
        grads : dict[str, array], the keys of :attr:`params` (same order, shapes and dtype); NumPy
            arrays for a NumPy ``dout``, native arrays for a native one
        dx : array, shape of ``x`` (only if ``return_input_grad``)
        """
        if not isinstance(cache, dict) or not ("out" in cache or "shares" in cache):
            raise ValueError("cache must be the dict returned by UNet.forward")
        k = self._kern
        given_host = isinstance(dout, np.ndarray) or not k.is_array(dout)
        if given_host:
            dout = np.asarray(dout)
        if "shares" not in cache:
            with self._scope():
                # the backend may run it as one compiled program (a planned forward's; the same bits)
                res = _plan.training_backward(self, dout, cache, return_input_grad) if "plan" in cache else None
                if res is None:
                    if "params" in cache and self._frozen is None:
                        self._prefetch_filters(cache["params"], cache["stem"][0].shape, True)
                    res = self._backward_impl(dout, cache, return_input_grad)
        else:
            shares, parts = cache["shares"], cache["parts"]
            out_shape = (shares[-1][1], self.in_channels) + parts[0]["out"][1][0].shape[2:]  # (out conv's input)
            if tuple(dout.shape) != out_shape:
                raise ValueError(f"dout must have the output's shape {out_shape}, got {tuple(dout.shape)}")
            def share(j, a, b):
                r = _plan.training_backward(self, dout[a:b], parts[j], return_input_grad) \
                    if "plan" in parts[j] else None
                return r if r is not None else self._backward_impl(dout[a:b], parts[j], return_input_grad)
            with self._scope():
                parts_res = k.run_shares(share, shares)
            if return_input_grad:
                parts_res, dxs = [r[0] for r in parts_res], [r[1] for r in parts_res]
            grads = parts_res[0]
            for r in parts_res[1:]:  # summed in share order: the result does not depend on the threads
                for key, v in r.items():
                    k.add_(grads[key], v)
            res = (grads, np.concatenate(dxs)) if return_input_grad else grads
        if not given_host:
            return res
        if return_input_grad:  # NumPy in, NumPy out (a no-op on host backends)
            return {key: k.to_host(v) for key, v in res[0].items()}, k.to_host(res[1])
        return {key: k.to_host(v) for key, v in res.items()}

    def _backward_impl(self, dout, cache: dict, return_input_grad: bool):
        c_on, c_oc = cache["out"]
        out_shape = (int(c_oc[0].shape[0]), self.in_channels) + tuple(int(s) for s in c_oc[0].shape[2:])
        if tuple(dout.shape) != out_shape:
            raise ValueError(f"dout must have the output's shape {out_shape}, got {tuple(dout.shape)}")
        k = self._kern
        dout = k.asarray(dout, self.dtype)
        g: dict[str, np.ndarray] = {}

        dh, g["out.conv.w"], g["out.conv.b"] = L.conv2d_backward(dout, c_oc)
        dh, g["out.norm.gamma"], g["out.norm.beta"] = L.group_norm_silu_backward(dh, c_on)
        dtemb = None
        dskips: list = [None] * self._num_skips
        for op, c in zip(reversed(self._up), reversed(cache["up"])):
            if op[0] == "res":
                _, key, _has_skip, sidx = op
                c_cat, c_res = c
                dh, dt = self._res_backward(key, dh, c_res, g)
                dtemb = dt if dtemb is None else k.add_(dtemb, dt)
                dh, dskips[sidx] = L.concat_backward(dh, c_cat)
            else:
                key = op[1]
                c_up, c_conv = c
                dh, g[key + ".w"], g[key + ".b"] = L.conv2d_backward(dh, c_conv)
                dh = L.upsample_nearest_backward(dh, c_up)
        dh, dt = self._res_backward(self._mid[0], dh, cache["mid"], g)
        dtemb = dt if dtemb is None else k.add_(dtemb, dt)
        for op, c in zip(reversed(self._down), reversed(cache["down"])):
            if op[0] == "res":
                _, key, _has_skip, sidx = op
                k.add_(dh, dskips[sidx])    # the skip's gradient from the up path's concat
                dskips[sidx] = None
                dh, dt = self._res_backward(key, dh, c, g)
                k.add_(dtemb, dt)
            else:
                key = op[1]
                dh, g[key + ".w"], g[key + ".b"] = L.conv2d_backward(dh, c)
        dx, g["stem.w"], g["stem.b"] = L.conv2d_backward(dh, cache["stem"], input_grad=return_input_grad)

        self._time_backward(cache["time"], dtemb, g)

        grads = {key: k.asarray(g[key], self.dtype) for key in self.params}
        return (grads, dx) if return_input_grad else grads
