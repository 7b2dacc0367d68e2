"""The cpu backend's planned inference pass (``plan_forward``, issue 15): a frozen model's small pass as one
compiled program must give the unplanned pass's bits, be used where it applies and only there, and follow
replaced parameters."""
from concurrent.futures import Future

import numba
import numpy as np
import pytest

import difnumpy.kernels.cpu as cpu
from difnumpy.kernels.cpu import _plan_util
from difnumpy.kernels.cpu import plan as cpu_plan
from difnumpy.nn._unet_plan import plan_ops
from difnumpy.nn.unet import UNet

TINY = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=2)


def _randomize(model, rng):
    """Every parameter random and non-trivial (the zero-initialised convs too), in place."""
    for key, p in model.params.items():
        v = rng.uniform(-1.0, 1.0, p.shape) / np.sqrt(int(np.prod(p.shape[1:])) if p.ndim > 1 else 1)
        if key.endswith(".gamma"):
            v = 1.0 + 0.3 * rng.standard_normal(p.shape)
        model.params[key] = v.astype(p.dtype)


def _plan_of(model, shape, share=None):
    """The plan the frozen scope keeps for inputs of ``shape`` (None: the pass is not planned)."""
    kept = model._frozen[3]
    key = (tuple(shape), share)
    return None if kept is None or key not in kept[1] else kept[1][key][0]


@pytest.mark.parametrize("cfg,shape,nthreads", [
    (dict(), (1, 1, 8, 8), 2),                     # the default model, F(4x4) at 8x8, F(2x2) at 4x4
    (dict(), (3, 1, 8, 8), 1),
    (dict(), (1, 1, 28, 28), 2),                   # F(2x2) at 14x14 (not whole 4x4 tiles)
    (dict(dtype=np.float64), (2, 1, 8, 8), 2),
    (dict(TINY, num_classes=3, channel_mults=(1, 2, 2), num_res_blocks=2), (1, 1, 16, 16), 2),
    (dict(in_channels=3, base_channels=16, groups=4), (2, 3, 12, 12), 1),  # odd tiles, 3 channels in the stem
    (dict(TINY, in_channels=6), (1, 6, 8, 8), 1),  # a Winograd stem (>= 5 input channels)
])
def test_planned_pass_gives_the_unplanned_bits(cfg, shape, nthreads, rng):
    m = UNet(backend="cpu", rng=0, **cfg)
    _randomize(m, rng)
    x = rng.standard_normal(shape)
    t = rng.integers(0, 1000, shape[0])
    kw = {"class_labels": rng.integers(0, 4, shape[0])} if cfg.get("num_classes") else {}
    prev = numba.get_num_threads()
    numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
    try:
        want = m(x, t, **kw)  # unfrozen: the unplanned pass
        with m.frozen():
            first = m(x, t, **kw)
            assert _plan_of(m, shape) is not None
            second = m(x, t, **kw)  # the plan's buffers reused
            t2 = rng.integers(0, 1000, shape[0])
            other_t = m(x, t2, **kw)
    finally:
        numba.set_num_threads(prev)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)
    np.testing.assert_array_equal(other_t, m(x, t2, **kw))  # the time embedding is the plan's input
    assert first is not second and not np.shares_memory(first, second)  # a new array each call


def test_plan_only_where_no_kernel_is_split_over_the_threads(rng):
    m = UNet(backend="cpu", rng=0)
    _randomize(m, rng)
    x4 = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)  # its larger convs would take two threads
    x16 = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)  # two batch shares: a plan each
    prev = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        want4, want16 = m(x4, 3), m(x16, 3)
        with m.frozen():
            np.testing.assert_array_equal(m(x4, 3), want4)
            np.testing.assert_array_equal(m(x16, 3), want16)
            if numba.get_num_threads() > 1:
                assert (tuple(x4.shape), None) in m._frozen[3][1] and _plan_of(m, x4.shape) is None
            plans = [_plan_of(m, (8, 1, 8, 8), j) for j in range(2)]  # each share runs serially: planned
            assert None not in plans and plans[0] is not plans[1]
            np.testing.assert_array_equal(m(x16, 4), m.copy()(x16, 4))  # the plans again (the copy: unplanned)
    finally:
        numba.set_num_threads(prev)


def test_plan_follows_replaced_parameters_and_a_busy_plan_falls_back(rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    other = UNet(**TINY, backend="cpu", rng=1)
    _randomize(m, rng)
    _randomize(other, rng)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    want_m, want_other = m(x, 9), other(x, 9)
    with m.frozen():
        np.testing.assert_array_equal(m(x, 9), want_m)
        plan = _plan_of(m, x.shape)
        m.set_params(other.host_params())
        np.testing.assert_array_equal(m(x, 9), want_other)  # a new plan on the new arrays
        assert _plan_of(m, x.shape) is not plan
        busy = _plan_of(m, x.shape)
        with busy._lock:  # another thread's pass holds it: this one runs unplanned
            np.testing.assert_array_equal(m(x, 9), want_other)
        np.testing.assert_array_equal(m(x, 9), want_other)


def test_one_inference_plan_per_input_shape_and_scope(monkeypatch, rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    made = []
    real = cpu.plan_forward
    monkeypatch.setattr(cpu, "plan_forward", lambda *a, **k: made.append((a[1], k.get("params") is None))
                        or real(*a, **k))
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    m(x, 4)                  # not frozen: no plan
    assert made == []
    with m.frozen():
        out, cache = m.forward(x, 4)  # keeps a cache for the backward pass: a training plan's
        assert "out" in cache and made == [((2, 1, 8, 8), False)]
        m(x, 4)
        m(x, 5)
        m(x[:1], 5)
    assert made == [((2, 1, 8, 8), False), ((2, 1, 8, 8), True), ((1, 1, 8, 8), True)]


def test_plan_program_rows_match_the_op_list(rng):
    """The builder writes one row per op, each op's code first; an op it has no form for gives no plan."""
    m = UNet(**TINY, backend="cpu", rng=0)
    ops, res_keys = plan_ops(m, m.params)
    with m._scope():
        plan = cpu_plan.plan_forward(ops, (1, 1, 8, 8), np.float32, m.groups, 1e-5)
    kinds = {"conv": None, "res": cpu_plan._RES, "gn_silu": cpu_plan._GN_SILU, "concat": cpu_plan._CONCAT,
             "upsample": cpu_plan._UP2}
    assert plan.prog.shape == (len(ops), cpu_plan._COLS)
    for row, op in zip(plan.prog, ops):
        if op[0] == "conv":
            assert row[0] in (cpu_plan._WINO, cpu_plan._CONV, cpu_plan._PIX)
        else:
            assert row[0] == kinds[op[0]]
    assert res_keys == [op[1] for op in m._down if op[0] == "res"] + [m._mid[0]] + \
        [op[1] for op in m._up if op[0] == "res"]
    with m._scope():
        assert cpu_plan.plan_forward(ops + [("unknown", 99, 1)], (1, 1, 8, 8), np.float32, m.groups, 1e-5) is None


# ---- the training pass (keep=True): the forward as one program, the backward reads its caches ----

def _train_steps(model, x, t, kw, steps=3):
    """``steps`` Adam steps on an MSE loss: each step's output, gradients and input gradient (copies)."""
    from difnumpy.nn.layers import mse_loss
    from difnumpy.nn.optim import Adam
    opt = Adam(model.params, lr=1e-3)
    noise = np.random.default_rng(5).standard_normal(x.shape).astype(model.dtype)
    out = []
    for _ in range(steps):
        y, cache = model.forward(x, t, **kw)
        _, d = mse_loss(y, noise)
        g, dx = model.backward(d, cache, return_input_grad=True)
        opt.step(g)
        out.append((y.copy(), {k: v.copy() for k, v in g.items()}, dx.copy()))
    return out


@pytest.mark.parametrize("cfg,shape", [
    (dict(), (1, 1, 8, 8)), (dict(), (1, 1, 28, 28)), (dict(TINY, dtype=np.float64), (2, 1, 8, 8)),
    (dict(TINY, num_classes=3, channel_mults=(1, 2, 2), num_res_blocks=2), (1, 1, 16, 16)),
    (dict(in_channels=3, base_channels=16, groups=4), (2, 3, 12, 12)), (dict(TINY, in_channels=6), (1, 6, 8, 8)),
])
@pytest.mark.parametrize("worker", ["none", "ahead", "busy"])
def test_planned_training_pass_gives_the_unplanned_bits(cfg, shape, worker, monkeypatch, rng):
    """Three optimizer steps (the weights change between the passes: the plan reads them again each time)."""
    from difnumpy.kernels.cpu import _threads
    x = rng.standard_normal(shape)
    t = rng.integers(0, 1000, shape[0])
    kw = {"class_labels": rng.integers(0, 4, shape[0])} if cfg.get("num_classes") else {}
    models = []
    for _ in range(2):
        m = UNet(backend="cpu", rng=0, **cfg)
        _randomize(m, np.random.default_rng(3))
        models.append(m)
    monkeypatch.delattr(cpu, "plan_forward")
    want = _train_steps(models[0], x, t, kw)
    monkeypatch.undo()
    if worker == "none":  # every transform made by the pass itself (into its second buffer)
        monkeypatch.setattr(_threads, "prefetching", lambda: False)
    else:  # a worker's job runs to its end before the pass goes on: every transform made by the job
        jobs = []

        class Pool:
            @staticmethod
            def submit(f, *a):
                jobs.append(f)
                done = Future()
                if worker == "busy" and f is cpu_plan._make_transforms:
                    # a job that claimed every transform and has not finished one: the pass makes them
                    prog, ws, offs, _, state = a
                    for r in prog[prog[:, 0] == cpu_plan._PWINO]:
                        ws[offs[r[5], 0]:offs[r[5], 1]] = np.nan
                    state[:] = _plan_util._BUSY
                    done.set_result(None)
                else:
                    done.set_result(f(*a))
                return done
        monkeypatch.setattr(_threads, "prefetching", lambda: True)
        monkeypatch.setattr(_threads, "_pool", lambda n: Pool)
    got = _train_steps(models[1], x, t, kw)
    assert models[1]._train_plans[tuple(shape), False][1] is not None
    if worker != "none":
        assert jobs.count(cpu_plan._make_transforms) == 6  # one job a forward pass, one a backward pass
    for (y0, g0, dx0), (y1, g1, dx1) in zip(want, got):
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(dx1, dx0)
        assert list(g1) == list(g0)
        for k in g0:
            np.testing.assert_array_equal(g1[k], g0[k], err_msg=k)


def test_training_plan_is_kept_across_steps_and_follows_replaced_parameters(rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    m.forward(x, 3)
    kept = m._train_plans[x.shape, False]
    m.forward(x, 4)
    assert m._train_plans[x.shape, False] is kept  # the same arrays: the same plan
    other = UNet(**TINY, backend="cpu", rng=1)
    _randomize(other, rng)
    m.set_params(other.host_params())
    out, _ = m.forward(x, 4)
    assert m._train_plans[x.shape, False] is not kept
    np.testing.assert_array_equal(out, other.forward(x, 4)[0])
    with m.frozen():  # the plan only reads the parameters: still used
        np.testing.assert_array_equal(m.forward(x, 4)[0], out)
    fresh = other.copy()
    with fresh.frozen():  # read-only parameters: no training plan is made (the unplanned pass)
        np.testing.assert_array_equal(fresh.forward(x, 4)[0], out)
        assert fresh._train_plans[x.shape, False][1] is None


def test_planned_backward_once_per_cache_and_without_the_input_gradient(rng):
    """The planned backward writes its gradients into the forward's workspace, so it runs once per cache; a
    second backward on the cache is the unplanned one (the first call's gradients stay as they were)."""
    m = UNet(backend="cpu", rng=0)
    _randomize(m, rng)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    out, cache = m.forward(x, 7)
    dout = np.cos(out)
    g1 = m.backward(dout, cache)
    assert cache["plan"][1] is None  # used
    keep = {k: v.copy() for k, v in g1.items()}
    g2, dx = m.backward(dout, cache, return_input_grad=True)
    for k in g1:
        np.testing.assert_array_equal(g1[k], keep[k])
        np.testing.assert_array_equal(g2[k], g1[k])
    out3, cache3 = m.forward(x, 7)
    g3, dx3 = m.backward(dout, cache3, return_input_grad=True)  # planned, with the input's gradient
    np.testing.assert_array_equal(dx3, dx)
    for k in g1:
        np.testing.assert_array_equal(g3[k], g1[k])
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        m.backward(dout[:, :, :4], m.forward(x, 7)[1])


@pytest.mark.parametrize("batch", [16, 9])  # two shares of 8; shares of 4 and 5
def test_batch_shares_run_their_training_passes_planned_with_the_same_bits(batch, monkeypatch, rng):
    """Each batch share of a training pass runs its own plan (its kernels run serially anyway); the shares'
    gradients are summed in share order as before."""
    x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    models = []
    for _ in range(2):
        m = UNet(**TINY, backend="cpu", rng=0)
        _randomize(m, np.random.default_rng(3))
        models.append(m)
    monkeypatch.delattr(cpu, "plan_forward")
    want = _train_steps(models[0], x, t, {})
    monkeypatch.undo()
    got = _train_steps(models[1], x, t, {})
    sizes = sorted(k[0][0] for k, v in models[1]._train_plans.items() if k[1] and v[1] is not None)
    assert sizes == ([8] if batch == 16 else [4, 5])
    for (y0, g0, dx0), (y1, g1, dx1) in zip(want, got):
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(dx1, dx0)
        for k in g0:
            np.testing.assert_array_equal(g1[k], g0[k], err_msg=k)


def test_no_training_plan_with_a_workspace_over_the_cap(monkeypatch, rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    monkeypatch.setattr(cpu_plan, "MAX_TRAIN_WORKSPACE", 1 << 10)
    out, cache = m.forward(x, 3)
    assert "plan" not in cache and m._train_plans[x.shape, False][1] is None
    monkeypatch.undo()
    assert "plan" in UNet(**TINY, backend="cpu", rng=0).forward(x, 3)[1]


def test_training_workspaces_are_reused_only_once_nothing_refers_to_them(rng):
    """A training plan hands a pass a workspace of an earlier one only when that pass's cache, outputs and
    gradients are all gone: what a caller keeps never changes under it."""
    from difnumpy.nn.layers import mse_loss
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    out1, cache1 = m.forward(x, 3)
    g1 = m.backward(np.cos(out1), cache1)
    kept_out, kept_g = out1.copy(), {k: v.copy() for k, v in g1.items()}
    del cache1
    plan = m._train_plans[x.shape, False][1]
    for step in range(4):  # out1 and g1 still refer to the first workspace
        out, cache = m.forward(x, 10 + step)
        _, d = mse_loss(out, np.zeros_like(out))
        m.backward(d, cache)
    np.testing.assert_array_equal(out1, kept_out)
    for k in g1:
        np.testing.assert_array_equal(g1[k], kept_g[k])
    pooled = len(plan._pool)
    assert 2 <= pooled <= 3  # the first pass's, and the later passes' reused
    del out1, g1, out, cache, d
    for step in range(3):
        out, cache = m.forward(x, 20 + step)
        m.backward(np.cos(out), cache)
        del out, cache
    assert len(plan._pool) == pooled  # no new workspace once the old ones are free
