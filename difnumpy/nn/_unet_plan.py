"""The U-Net's pass as one compiled program: the op list handed to a backend's optional hook ``plan_forward``.

A pass of a few images spends much of its time in Python between the kernels; the cpu backend can run the
whole pass as one program (:mod:`difnumpy.kernels.cpu.plan`) where none of its kernels would be split over
the threads. The same kernels run in the same order, so the outputs (and the training pass's caches, hence
its gradients) are the same bits as the unplanned pass of :meth:`UNet._forward_impl` (tested). The time
embedding and the ResBlocks' projections of it stay here (BLAS GEMMs), and are the program's inputs.
"""
from __future__ import annotations

from difnumpy.nn import layers as L

def plan_ops(model, P: dict):
    """The pass of :meth:`UNet._forward_impl` as the op list of ``plan_forward`` (``(kind, dst, inputs...,
    weights...)``; slot 0 is the input, op i writes slot i + 1) and the ResBlocks' keys in op order (whose
    time-embedding projections the plan takes)."""
    ops, res_keys = [], []

    def add(kind, *args):
        ops.append((kind, len(ops) + 1) + args)
        return len(ops)

    def res(key, has_skip, src):
        res_keys.append(key)
        return add("res", src, *(P[f"{key}.{n}"] for n in ("norm1.gamma", "norm1.beta", "conv1.w", "conv1.b",
                                                          "norm2.gamma", "norm2.beta", "conv2.w", "conv2.b")),
                   *((P[key + ".skip.w"], P[key + ".skip.b"]) if has_skip else (None, None)))

    h, skips = add("conv", 0, P["stem.w"], P["stem.b"], 1, 1), []
    for op in model._down:
        h = res(op[1], op[2], h) if op[0] == "res" else add("conv", h, P[op[1] + ".w"], P[op[1] + ".b"], 2, 1)
        if op[0] == "res":
            skips.append(h)
    h = res(model._mid[0], model._mid[1], h)
    for op in model._up:
        h = res(op[1], op[2], add("concat", h, skips.pop())) if op[0] == "res" else \
            add("conv", add("upsample", h), P[op[1] + ".w"], P[op[1] + ".b"], 1, 1)
    add("conv", add("gn_silu", h, P["out.norm.gamma"], P["out.norm.beta"]), P["out.conv.w"], P["out.conv.b"], 1, 1)
    return ops, res_keys


def inference_pass(model, P, x, t, y, eps: float, share=None):
    """A frozen model's inference pass through the hook (``eps``: the GroupNorms'): ``(out, None)``, or None
    where the backend has no plan for it (or the plan is busy). The plan of each input shape (and batch share
    index ``share``) is made at its first pass and kept while the scope's parameters stay the same arrays
    (``model._frozen[3]``)."""
    hook = getattr(model._kern, "plan_forward", None)
    if hook is None:
        return None
    kept = model._frozen[3]
    if kept is None or kept[0] is not P:  # (P: the checked parameters, new when an array was replaced)
        kept = model._frozen[3] = (P, {})
    key = (tuple(x.shape), share)  # (the concurrent batch shares each run their own plan)
    if key not in kept[1]:
        ops, res_keys = plan_ops(model, P)
        kept[1][key] = (hook(ops, key[0], model.dtype, model.groups, eps), res_keys)
    plan, res_keys = kept[1][key]
    if plan is None:
        return None
    temb_act = model._time_embedding(P, t, y)[0]
    out = plan(x, [L._linear(temb_act, P[key + ".temb.w"], P[key + ".temb.b"], model._kern)[0] for key in res_keys])
    return None if out is None else (out, None)


def training_pass(model, P, x, t, y, eps: float, share: bool = False):
    """A training forward pass (``keep=True``) through the hook: ``(out, cache)`` with the cache
    :meth:`UNet._forward_impl` builds (the same arrays, views of the plan's workspace), or None. A plan per
    input shape and ``share`` (a batch share's pass, whose kernels run serially) is kept while the model's
    parameters are the same arrays (``model._train_plans``); their values may change between the passes (an
    optimizer's steps): the plan reads them at every pass."""
    hook = getattr(model._kern, "plan_forward", None)
    if hook is None:
        return None
    shape, ids = tuple(x.shape), tuple(map(id, P.values()))
    key = (shape, share)  # (a share's plan runs every kernel serially: not the plan of a whole pass's shape)
    kept = model._train_plans.get(key)
    if kept is None or kept[0] != ids:
        if len(model._train_plans) >= 8:  # (bounded: a run over many batch sizes starts afresh)
            model._train_plans.clear()
        ops, res_keys = plan_ops(model, P)
        plan = hook(ops, shape, model.dtype, model.groups, eps, params=list(P.values()))
        kept = model._train_plans[key] = (ids, plan, ops, res_keys)
    _, plan, ops, res_keys = kept
    if plan is None:
        return None
    k, g = model._kern, model.groups
    temb_act, c_time = model._time_embedding(P, t, y)
    lins = [L._linear(temb_act, P[r + ".temb.w"], P[r + ".temb.b"], k) for r in res_keys]
    out, views, ws = plan(x, [tp for tp, _ in lins])
    arrays = [x] + [v[0] for v in views]  # slot -> array
    it = iter(zip(ops, views))
    lin = iter(lins)

    def conv():
        op, _ = next(it)
        return L._conv2d_cache(arrays[op[2]], op[3], op[5], op[6], k)

    def res():
        op, (_, h0, m1, r1, h1, h2, m2, r2) = next(it)
        xin = arrays[op[2]]
        return (L._gn_silu_cache(xin, op[3], op[4], m1, r1, g, True, k), L._conv2d_cache(h0, op[5], 1, 1, k),
                next(lin)[1], L._gn_silu_cache(h1, op[7], op[8], m2, r2, g, True, k),
                L._conv2d_cache(h2, op[9], 1, 1, k), None if op[11] is None else L._conv2d_cache(xin, op[11], 1, 0, k))

    def other():
        op, v = next(it)
        if op[0] == "concat":
            return (tuple(int(arrays[s].shape[1]) for s in op[2:4]), k)
        if op[0] == "upsample":
            return (k,)
        return L._gn_silu_cache(arrays[op[2]], op[3], op[4], v[1], v[2], g, True, k)

    cache = {"time": c_time, "stem": conv(), "down": [res() if op[0] == "res" else conv() for op in model._down]}
    cache["mid"] = res()
    cache["up"] = [(other(), res()) if op[0] == "res" else (other(), conv()) for op in model._up]
    cache["out"] = (other(), conv())
    cache["params"] = P
    cache["plan"] = [plan, ws, lins, res_keys]  # for training_backward (once: its buffers are in ws)
    return out, cache


def training_backward(model, dout, cache, input_grad: bool):
    """The backward pass of a planned training pass (``cache["plan"]``): ``grads`` or ``(grads, dx)`` as
    :meth:`UNet._backward_impl`, or None where it is not planned (or this cache's plan ran already: its
    gradients are views of the forward's workspace, so a second backward goes the unplanned way)."""
    entry = cache["plan"]
    plan, ws, lins, res_keys = entry
    if ws is None:
        return None
    k = model._kern
    out_shape = plan.shapes[plan.out_slot]
    if tuple(dout.shape) != out_shape:
        raise ValueError(f"dout must have the output's shape {out_shape}, got {tuple(dout.shape)}")
    r = plan.backward(ws, k.asarray(dout, model.dtype), input_grad)
    if r is None:
        return None
    entry[1] = None
    pgrads, dtps, dx = r
    keys = list(cache["params"])
    g = {keys[j]: v for j, v in pgrads.items()}
    dtemb = None
    for key, (_, c_t), dtp in zip(reversed(res_keys), reversed(lins), dtps):  # the unplanned order
        dt, g[key + ".temb.w"], g[key + ".temb.b"] = L.linear_backward(dtp, c_t)
        dtemb = dt if dtemb is None else k.add_(dtemb, dt)
    model._time_backward(cache["time"], dtemb, g)
    grads = {key: k.asarray(g[key], model.dtype) for key in model.params}
    return (grads, dx) if input_grad else grads
