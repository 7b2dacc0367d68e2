"""The cpu backend's planned inference pass (``plan_forward``, issue 15): a frozen model's small pass as one
compiled program must give the unplanned pass's bits, be used where it applies and only there, and follow
replaced parameters."""
import numba
import numpy as np
import pytest

import difnumpy.kernels.cpu as cpu
from difnumpy.kernels.cpu import plan as cpu_plan
from difnumpy.nn.unet import UNet

TINY = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=2)


def _randomize(model, rng):
    """Every parameter random and non-trivial (the zero-initialised convs too), in place."""
    for key, p in model.params.items():
        v = rng.uniform(-1.0, 1.0, p.shape) / np.sqrt(int(np.prod(p.shape[1:])) if p.ndim > 1 else 1)
        if key.endswith(".gamma"):
            v = 1.0 + 0.3 * rng.standard_normal(p.shape)
        model.params[key] = v.astype(p.dtype)


def _plan_of(model, shape):
    """The plan the frozen scope keeps for inputs of ``shape`` (None: the pass is not planned)."""
    kept = model._frozen[3]
    return None if kept is None or tuple(shape) not in kept[1] else kept[1][tuple(shape)][0]


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
    x16 = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)  # two batch shares: never planned
    prev = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        want4, want16 = m(x4, 3), m(x16, 3)
        with m.frozen():
            np.testing.assert_array_equal(m(x4, 3), want4)
            np.testing.assert_array_equal(m(x16, 3), want16)
            if numba.get_num_threads() > 1:
                assert tuple(x4.shape) in m._frozen[3][1] and _plan_of(m, x4.shape) is None
            assert m._frozen[3] is None or tuple(x16.shape) not in m._frozen[3][1]
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


def test_training_passes_are_never_planned(monkeypatch, rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    made = []
    real = cpu.plan_forward
    monkeypatch.setattr(cpu, "plan_forward", lambda *a: made.append(a[1]) or real(*a))
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    m(x, 4)                  # not frozen
    with m.frozen():
        out, cache = m.forward(x, 4)  # keeps a cache for the backward pass
        assert made == [] and "out" in cache
        m(x, 4)
        m(x, 5)
    assert made == [(2, 1, 8, 8)]  # made once for the scope's input shape


def test_plan_program_rows_match_the_op_list(rng):
    """The builder writes one row per op, each op's code first; an op it has no form for gives no plan."""
    m = UNet(**TINY, backend="cpu", rng=0)
    ops, res_keys = m._plan_ops(m.params)
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
