"""The backend API: the functions every kernel backend provides (see ARCHITECTURE.md, "Backends").

A backend is a module (``difnumpy.kernels.reference`` for ``"numpy"``, the packages
``difnumpy.kernels.cpu`` and ``difnumpy.kernels.cuda``) that defines every name of
:data:`BACKEND_API`. The NumPy twins in :mod:`difnumpy.kernels.reference` define what each function
computes; a contract test (``tests/test_backend_contract.py``) checks that every backend provides the
whole API and agrees with the twins.

Arrays: a backend computes on its *native* arrays (``numpy.ndarray`` on "numpy" and "cpu", numba
device arrays on "cuda"). Every function accepts native arrays and returns native arrays; the cuda
backend also accepts NumPy arrays (copied up) and then returns NumPy arrays (copied down), so the
twins' tests can call it like the others. Per-sample coefficient arrays (``sqrt_ab``, ``coef``,
``clip_lo`` ...) are small host float64 arrays on every backend. Functions ending in ``_`` work in
place on their first argument and return it.

Models, samplers and the trainer (the floors above the kernels) are written once against this API;
nothing above the kernels branches on the backend's name.
"""
from __future__ import annotations

#: name -> one-line contract (shapes in the NumPy twins' docstrings).
BACKEND_API: dict[str, str] = {
    # arrays
    "is_array": "is_array(a) -> bool: a is a native array of this backend",
    "asarray": "asarray(a, dtype=None) -> native C-contiguous array (no copy when a already is one)",
    "to_host": "to_host(a) -> numpy.ndarray (copied down from the device on cuda)",
    "zeros": "zeros(shape, dtype) -> native array of zeros",
    "copy": "copy(a) -> a new native array equal to a",
    "copy_into": "copy_into(dst, src) -> dst: dst[...] = src (src native or NumPy, same shape)",
    # diffusion
    "q_sample": "q_sample(x0, noise, sqrt_ab, sqrt_1m_ab, out=None) -> x_t, shapes (N, M); DDPM eq. 4",
    "sampler_update": "sampler_update(x_t, model_output, noise, coef, clip_lo, clip_hi) -> (x_prev, x0_pred)",
    # nn
    "conv2d_forward": "conv2d_forward(x, w, b, stride, padding) -> out",
    "conv2d_backward_input": "conv2d_backward_input(dout, w, x_shape, stride, padding) -> dx",
    "conv2d_backward_weight": "conv2d_backward_weight(dout, x, w_shape, stride, padding) -> (dw, db)",
    "group_norm_silu_forward": "group_norm_silu_forward(x, gamma, beta, groups, eps, silu) -> (out, mean, rstd)",
    "group_norm_silu_backward": ("group_norm_silu_backward(dout, x, gamma, beta, mean, rstd, groups, silu) "
                                 "-> (dx, dgamma, dbeta)"),
    "linear_forward": "linear_forward(x, w, b) -> x @ w.T + b",
    "linear_backward": "linear_backward(dout, x, w) -> (dx, dw, db)",
    "silu_forward": "silu_forward(x) -> x * sigmoid(x)",
    "silu_backward": "silu_backward(dout, x) -> dx",
    "add_": "add_(a, b) -> a: a += b (same shape)",
    "axpy_": "axpy_(y, x, s) -> y: y += s * x (s a Python float)",
    "scale_": "scale_(a, s) -> a: a *= s (s a Python float)",
    "add_channel_bias_": "add_channel_bias_(h, t) -> h: h[n, c, :, :] += t[n, c]",
    "blend_": "blend_(x, known, mask) -> x: x = (1 - mask) x + mask known (mask of x's shape, in {0, 1})",
    "sum_hw": "sum_hw(h) -> (N, C): h summed over H and W",
    "embedding_forward": "embedding_forward(table, idx) -> table[idx]: rows of a (R, D) table, idx host int64 (N,)",
    "embedding_backward": "embedding_backward(dout, idx, num_rows) -> (R, D): dout's rows summed per index",
    "sumsq": "sumsq(a) -> float: sum of squares, accumulated in float64",
    "mse_loss": "mse_loss(pred, target) -> (loss: float, dpred); DDPM eq. 14",
    "upsample_nearest2x_forward": "upsample_nearest2x_forward(x) -> (N, C, 2H, 2W)",
    "upsample_nearest2x_backward": "upsample_nearest2x_backward(dout) -> (N, C, H, W)",
    "concat_channels": "concat_channels(xs) -> channels of two NCHW arrays concatenated",
    "split_channels": "split_channels(dout, channels) -> tuple of arrays, inverse of concat_channels",
    # optim
    "adam_update": "adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None (in place)",
    "ema_update": "ema_update(ema, param, decay) -> None (in place)",
}

#: Optional hooks a backend may provide (the U-Net uses them when present):
#: ``step_scope(store=None)`` a context manager around a whole model pass (``store``: a dict the caller keeps
#: for what the kernels derive from the weights, valid while they do not change); ``batch_shares(n)`` a list of
#: ``(start, stop)`` image ranges or None; ``run_shares(fn, shares)`` runs ``fn(k, start, stop)`` per share;
#: ``resblock_forward(x, gamma1, beta1, w1, b1, tp, gamma2, beta2, w2, b2, skip_w, skip_b, groups, eps, keep)`` one
#: ResBlock forward (the U-Net's unfused ops, the same bits; ``keep=True`` also returns the activations) and
#: ``resblock_backward(...)`` its backward, each None where the backend prefers the unfused ops;
#: ``adam_update_many(params, grads, ms, vs, ...)`` ``adam_update`` on lists of arrays in one call (the same bits);
#: ``prefetch_conv3x3_filters(convs, n, backward)`` a hint, inside ``step_scope``, that a pass of ``n`` images
#: will run the 3x3 convs ``convs`` (``(w, H, W)`` in order of use; ``backward``: their input gradients);
#: ``plan_forward(ops, x_shape, dtype, groups, eps, params=None)`` a callable ``plan(x, tps)`` running a U-Net
#: pass (the op list of ``nn._unet_plan.plan_ops``) in one call, the same bits, or None (then the U-Net runs
#: the ops itself): with ``params=None`` a frozen model's inference pass (``-> out``, or None when busy), with
#: the parameter arrays a training pass (``-> (out, views, workspace)``; ``plan.backward(workspace, dout,
#: input_grad)`` its backward).
OPTIONAL_API: tuple[str, ...] = ("step_scope", "batch_shares", "run_shares", "resblock_forward", "resblock_backward",
                                 "adam_update_many", "prefetch_conv3x3_filters", "plan_forward")


def missing_api(module) -> list[str]:
    """The names of :data:`BACKEND_API` that ``module`` does not define (empty when it is complete)."""
    return [name for name in BACKEND_API if not callable(getattr(module, name, None))]
