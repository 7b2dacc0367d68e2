"""Tests for difnumpy.nn.unet.UNet: architecture, whole-network gradient check, dtypes, API, errors."""
import json

import numpy as np
import pytest

from difnumpy.nn import UNet
from difnumpy.nn.gradcheck import eval_numerical_gradient_at, rel_error

TINY = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=2)


def _randomize(model, rng, scale=1.0):
    """Give every parameter (zero-initialised ones included) a random non-trivial value, in place."""
    for key, p in model.params.items():
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
        v = rng.uniform(-1.0, 1.0, p.shape) * scale / np.sqrt(fan_in)
        if key.endswith(".gamma"):
            v = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif key.endswith(".beta"):
            v = 0.3 * rng.standard_normal(p.shape)
        p[...] = v


def test_default_parameter_count_and_keys():
    m = UNet(backend="numpy", rng=0)
    assert m.num_params() == 410_721
    assert sum(p.size for p in m.params.values()) == 410_721
    keys = list(m.params)
    assert keys[:4] == ["time.lin1.w", "time.lin1.b", "time.lin2.w", "time.lin2.b"]
    for k in ("stem.w", "down.0.res.0.conv1.w", "down.0.downsample.w", "down.1.res.0.skip.w",
              "mid.res.conv2.w", "up.1.res.0.skip.w", "up.1.upsample.w", "up.0.res.0.norm1.gamma",
              "out.norm.gamma", "out.conv.w"):
        assert k in m.params, k
    assert "down.0.res.0.skip.w" not in m.params          # 32 -> 32: identity skip
    assert m.params["time.lin1.w"].shape == (128, 32)
    assert m.params["up.1.res.0.conv1.w"].shape == (64, 128, 3, 3)   # concat(64, 64) -> 64
    assert m.params["up.0.res.0.conv1.w"].shape == (32, 96, 3, 3)    # concat(64, 32) -> 32
    assert m.params["out.conv.w"].shape == (1, 32, 3, 3)
    assert all(p.dtype == np.float32 and p.flags.c_contiguous for p in m.params.values())
    # 3 image channels: stem and output conv gain 2 * 9 * 32 weights each, the output conv 2 biases
    assert UNet(in_channels=3, backend="numpy", rng=0).num_params() == 410_721 + 2 * (2 * 9 * 32) + 2


@pytest.mark.parametrize("hw", [8, 28])
def test_output_shape_and_dtype(hw, rng):
    m = UNet(backend="numpy", rng=0)
    x = rng.standard_normal((2, 1, hw, hw)).astype(np.float32)
    out, cache = m.forward(x, np.array([0, 999]))
    assert out.shape == (2, 1, hw, hw) and out.dtype == np.float32
    grads = m.backward(np.ones_like(out), cache)
    assert list(grads) == list(m.params)
    for k, g in grads.items():
        assert g.shape == m.params[k].shape and g.dtype == np.float32, k
        assert np.all(np.isfinite(g)), k


def test_zero_init_output_and_resblocks():
    """DDPM-style init: the output conv and every ResBlock's conv2 start at zero -> output is 0."""
    m = UNet(**TINY, backend="numpy", rng=3)
    for k, p in m.params.items():
        if k.endswith("conv2.w") or k.startswith("out.conv"):
            assert not p.any(), k
        elif k.endswith(".gamma"):
            assert np.all(p == 1), k
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    np.testing.assert_array_equal(m(x, 5), 0.0)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("config", [TINY, dict(in_channels=2, base_channels=4, channel_mults=(1, 2, 2),
                                                  num_res_blocks=2, groups=2)])
def test_whole_unet_gradcheck_float64(config, backend):
    """Central differences on a random subset of coordinates of every parameter and of the input (on "cpu"
    the training pass is the compiled program of kernels/cpu/plan.py where it applies)."""
    rng = np.random.default_rng(7)
    m = UNet(**config, dtype=np.float64, backend=backend, rng=1)
    _randomize(m, rng, scale=2.0)   # weights large enough that deep gradients are not ~1e-5 of the loss
    N = 2
    x = rng.standard_normal((N, config["in_channels"], 8, 8))
    t = np.array([3, 917])
    out, cache = m.forward(x, t)
    if backend == "cpu" and config is TINY:  # (4 channels: under the Winograd threshold, not planned)
        assert "plan" in cache and m._train_plans[x.shape, False][1].bprog is not None
    dout = rng.standard_normal(out.shape)
    grads, dx = m.backward(dout, cache, return_input_grad=True)

    def f(_):
        return float(np.sum(m(x, t) * dout))

    per_param = 2 if len(m.params) > 80 else 3
    worst = 0.0
    for key, p in m.params.items():
        idx = rng.choice(p.size, size=min(per_param, p.size), replace=False)
        num = eval_numerical_gradient_at(f, p, idx)
        err = rel_error(grads[key].ravel()[idx], num)
        assert err < 1e-6, (key, err, grads[key].ravel()[idx], num)
        worst = max(worst, err)
    idx = rng.choice(x.size, size=12, replace=False)
    num = eval_numerical_gradient_at(f, x, idx)
    assert rel_error(dx.ravel()[idx], num) < 1e-6
    assert worst < 1e-6


def test_gradcheck_would_catch_a_wrong_gradient():
    """The whole-network check is not vacuous: a scaled gradient on one block fails it."""
    rng = np.random.default_rng(2)
    m = UNet(**TINY, dtype=np.float64, backend="numpy", rng=1)
    _randomize(m, rng)
    x = rng.standard_normal((2, 1, 8, 8))
    t = np.array([1, 2])
    out, cache = m.forward(x, t)
    dout = rng.standard_normal(out.shape)
    grads = m.backward(dout, cache)
    key = "down.0.res.0.norm1.gamma"
    num = eval_numerical_gradient_at(lambda _: float(np.sum(m(x, t) * dout)), m.params[key], [0, 1, 2])
    assert rel_error(grads[key][:3], num) < 1e-6
    assert rel_error(grads[key][:3] * 1.01, num) > 1e-3


def test_float32_forward_agrees_with_float64(rng):
    m64 = UNet(dtype=np.float64, backend="numpy", rng=0)
    _randomize(m64, rng)
    m32 = UNet(**{**m64.config, "dtype": "float32"}, rng=0)
    m32.set_params(m64.params)
    x = rng.standard_normal((2, 1, 28, 28))
    t = np.array([3, 999])
    o64, o32 = m64(x, t), m32(x.astype(np.float32), t)
    assert o32.dtype == np.float32 and o64.dtype == np.float64
    assert np.abs(o64).max() > 0.1                  # a non-trivial output
    assert rel_error(o32, o64) < 1e-5


def test_same_rng_same_params_and_config_rebuilds():
    a = UNet(**TINY, backend="numpy", rng=42)
    b = UNet(**TINY, backend="numpy", rng=np.random.default_rng(42))
    c = UNet(**TINY, backend="numpy", rng=43)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)
    cfg = json.loads(json.dumps(a.config))          # plain JSON-able
    assert cfg == {**TINY, "channel_mults": [1, 2], "dtype": "float32", "backend": "numpy", "num_classes": None}
    d = UNet(**cfg, rng=42)
    assert list(d.params) == list(a.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], d.params[k])
    # same seed, other dtype: the same draws, rounded
    e = UNet(**{**cfg, "dtype": "float64"}, rng=42)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], e.params[k].astype(np.float32))
    # copy() is independent
    f = a.copy()
    f.params["stem.w"][...] = 0
    assert a.params["stem.w"].any()


def test_call_matches_forward_and_t_broadcast(rng):
    m = UNet(**TINY, dtype=np.float64, backend="numpy", rng=0)
    _randomize(m, rng)
    x = rng.standard_normal((3, 1, 8, 8))
    out, _ = m.forward(x, np.array([5, 5, 5]))
    np.testing.assert_array_equal(m(x, np.array([5, 5, 5])), out)
    np.testing.assert_array_equal(m(x, 5), out)
    np.testing.assert_array_equal(m(x, np.float64(5.0)), out)
    # the timestep matters, and each sample uses its own
    o2 = m(x, np.array([5, 6, 5]))
    np.testing.assert_array_equal(o2[[0, 2]], out[[0, 2]])
    assert not np.allclose(o2[1], out[1])
    # the input is not modified
    x0 = x.copy()
    m.forward(x, 1)
    np.testing.assert_array_equal(x, x0)


def test_backend_switch_and_cpu_agreement(rng):
    m = UNet(**TINY, dtype=np.float64, backend="numpy", rng=0)
    assert m.config["backend"] == "numpy"
    m.backend = "cpu"
    assert m.backend == "cpu" and m.config["backend"] == "cpu"
    with pytest.raises(ValueError, match="backend"):
        m.backend = "gpu"
    _randomize(m, rng)
    x = rng.standard_normal((2, 1, 8, 8))
    t = np.array([4, 40])
    out_c, cache_c = m.forward(x, t)
    dout = rng.standard_normal(out_c.shape)
    g_c = m.backward(dout, cache_c)
    m.backend = "numpy"
    out_n, cache_n = m.forward(x, t)
    g_n = m.backward(dout, cache_n)
    assert rel_error(out_c, out_n) < 1e-12
    for k in g_n:
        assert rel_error(g_c[k], g_n[k]) < 1e-10, k


def test_bad_inputs_raise():
    m = UNet(**TINY, backend="numpy", rng=0)
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="divisible"):
        m(np.zeros((2, 1, 7, 8), np.float32), 0)
    with pytest.raises(ValueError, match="in_channels"):
        m(np.zeros((2, 3, 8, 8), np.float32), 0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        m(np.zeros((1, 8, 8), np.float32), 0)
    with pytest.raises(ValueError, match="t must be >= 0"):
        m(x, np.array([0, -1]))
    with pytest.raises(ValueError, match="t must be an int or have shape"):
        m(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="t must hold finite"):
        m(x, np.array([0.5, np.nan]))
    with pytest.raises(TypeError, match="t must hold timesteps"):
        m(x, np.array([True, False]))
    # real t (samplers that interpolate sigmas between training steps) is embedded as it is, not rounded
    from difnumpy.nn.layers import timestep_embedding
    _, c_half = m.forward(x, np.array([10.5, 3.0]))
    np.testing.assert_array_equal(c_half["time"][0][0],
                                  timestep_embedding(np.array([10.5, 3.0]), m.base_channels, dtype=m.dtype))
    assert not np.array_equal(c_half["time"][0][0], m.forward(x, np.array([10, 3]))[1]["time"][0][0])
    with pytest.raises(TypeError, match="x must be a real numeric"):
        m(x.astype(np.complex64), 0)
    out, cache = m.forward(x, 0)
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        m.backward(np.zeros((2, 1, 4, 4)), cache)
    with pytest.raises(ValueError, match="cache"):
        m.backward(out, None)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="groups"):
        UNet(base_channels=12, groups=8, backend="numpy")
    with pytest.raises(ValueError, match="base_channels must be even"):
        UNet(base_channels=7, groups=7, backend="numpy")
    with pytest.raises(ValueError, match="dtype"):
        UNet(dtype=np.float16, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        UNet(backend="tpu")
    with pytest.raises(TypeError, match="channel_mults"):
        UNet(channel_mults=(), backend="numpy")
    with pytest.raises(ValueError, match=r"channel_mults\[1\]"):
        UNet(channel_mults=(1, 0), backend="numpy")
    with pytest.raises(TypeError, match="in_channels"):
        UNet(in_channels=1.0, backend="numpy")
    with pytest.raises(TypeError, match="rng"):
        UNet(rng="seed", backend="numpy")


def test_set_params_validation():
    m = UNet(**TINY, backend="numpy", rng=0)
    p = {k: v.copy() for k, v in m.params.items()}
    p.pop("stem.w")
    with pytest.raises(ValueError, match="missing"):
        m.set_params(p)
    p = {k: v.copy() for k, v in m.params.items()}
    p["stem.w"] = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="stem.w"):
        m.set_params(p)
    p = {k: v.copy() for k, v in m.params.items()}
    p["stem.b"][0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        m.set_params(p)


def test_batch_split_over_threads_matches_one_pass(monkeypatch):
    """backend="cpu" splits a batch over threads (each runs the whole pass on its images); the result
    equals the one-pass result, its gradients sum the shares' and pass a float64 gradient check."""
    from difnumpy.kernels import cpu
    monkeypatch.setattr(cpu, "batch_shares", lambda n: [(0, 4), (4, n)])  # two shares even on one core
    rng = np.random.default_rng(11)
    m = UNet(**TINY, dtype=np.float64, backend="cpu", rng=1)
    _randomize(m, rng, scale=2.0)
    x = rng.standard_normal((9, 1, 8, 8))
    t = rng.integers(0, 1000, 9)
    out, cache = m.forward(x, t)
    assert cache["shares"] == [(0, 4), (4, 9)]
    dout = rng.standard_normal(out.shape)
    grads, dx = m.backward(dout, cache, return_input_grad=True)
    np.testing.assert_array_equal(m(x, t), out)

    ref = UNet(**TINY, dtype=np.float64, backend="numpy", rng=1)
    ref.set_params(m.params)
    out_r, cache_r = ref.forward(x, t)
    assert "shares" not in cache_r
    grads_r, dx_r = ref.backward(dout, cache_r, return_input_grad=True)
    np.testing.assert_allclose(out, out_r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, dx_r, rtol=1e-10, atol=1e-12)
    for key in grads_r:
        np.testing.assert_allclose(grads[key], grads_r[key], rtol=1e-9, atol=1e-12, err_msg=key)

    def f(_):
        return float(np.sum(m(x, t) * dout))

    for key in ("stem.w", "mid.res.conv1.w", "up.0.res.0.norm1.gamma", "out.conv.b"):
        idx = rng.choice(m.params[key].size, size=min(2, m.params[key].size), replace=False)
        num = eval_numerical_gradient_at(f, m.params[key], idx)
        assert rel_error(grads[key].ravel()[idx], num) < 1e-6, key
    with pytest.raises(ValueError, match="dout"):
        m.backward(dout[:5], cache)


def test_batch_split_reraises_a_failing_share():
    from difnumpy.kernels import cpu
    done = []

    def fn(k, a, b):
        done.append(k)
        if k == 1:
            raise FloatingPointError("share 1")
        return k

    with pytest.raises(FloatingPointError, match="share 1"):
        cpu.run_shares(fn, [(0, 2), (2, 4)])
    assert sorted(done) == [0, 1]
    assert cpu.run_shares(lambda k, a, b: (k, a, b), [(0, 2), (2, 5)]) == [(0, 0, 2), (1, 2, 5)]


# ---- frozen parameters: derived filters computed once (issue 15) ----

def _count_transforms(monkeypatch):
    """Count the Winograd filter transforms the cpu backend computes (forward and flipped)."""
    import difnumpy.kernels.cpu.winograd as wino
    calls = []
    real = wino._wino_transform

    def counting(w, *a, **k):
        calls.append(w.shape)
        return real(w, *a, **k)
    monkeypatch.setattr(wino, "_wino_transform", counting)
    return calls


def _winograd_convs(model):
    """The model's 3x3 stride-1 convs that take the Winograd path (the Downsample convs are stride 2; a conv of
    fewer than _WINO_MIN_C input channels, the stem, uses the wide-row im2col)."""
    from difnumpy.kernels.cpu import conv as cpu_conv
    return sum(1 for k, p in model.params.items() if p.ndim == 4 and p.shape[2] == 3 and "downsample" not in k
               and p.shape[1] >= cpu_conv._WINO_MIN_C)


def test_frozen_model_is_read_only_and_gives_the_same_bits(rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([1, 500, 999])
    plain = m(x, t)
    out, cache = m.forward(x, t)
    g_plain, dx_plain = m.backward(np.ones_like(out), cache, return_input_grad=True)
    with m.frozen() as fm:
        assert fm is m
        with m.frozen():  # re-entrant
            np.testing.assert_array_equal(m(x, t), plain)
        np.testing.assert_array_equal(m(x, t), plain)
        out, cache = m.forward(x, t)
        g, dx = m.backward(np.ones_like(out), cache, return_input_grad=True)
        np.testing.assert_array_equal(dx, dx_plain)  # the flipped filters' cached transform
        for k in g:
            np.testing.assert_array_equal(g[k], g_plain[k])
        with pytest.raises(ValueError, match="read-only"):
            m.params["stem.w"][0, 0, 0, 0] = 1.0
        assert not any(p.flags.writeable for p in m.params.values())
    assert all(p.flags.writeable for p in m.params.values())
    m.params["stem.w"][0, 0, 0, 0] += 1.0  # writeable again, and seen by the next call
    assert not np.array_equal(m(x, t), plain)


def test_frozen_model_computes_each_filter_transform_once(monkeypatch, rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    calls = _count_transforms(monkeypatch)
    n = _winograd_convs(m)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)  # two batch shares
    m(x, 5)
    assert len(calls) == n  # once per pass, not once per share
    calls.clear()
    with m.frozen():
        for _ in range(3):
            m(x, 5)
    assert len(calls) == n  # once per scope
    calls.clear()
    for _ in range(2):
        m(x, 5)
    assert len(calls) == 2 * n  # the scope's store is gone with it


def test_frozen_model_never_uses_a_replaced_parameters_transform(rng):
    m = UNet(**TINY, backend="cpu", rng=0)
    other = UNet(**TINY, backend="cpu", rng=1)
    _randomize(m, rng)
    _randomize(other, rng)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    want = other(x, 7)
    with m.frozen():
        m(x, 7)
        m.set_params(other.host_params())
        np.testing.assert_array_equal(m(x, 7), want)
        m.params["stem.w"] = m.params["stem.w"].copy()  # assigned inside the scope: read-only from the next call
        m(x, 7)
        assert not m.params["stem.w"].flags.writeable
        good = m.params["stem.w"]
        m.params["stem.w"] = good[:4]  # the parameters are checked again once they are other arrays
        with pytest.raises(ValueError, match="stem.w"):
            m(x, 7)
        m.params["stem.w"] = good
    assert m.params["stem.w"].flags.writeable


def test_sampling_loops_run_the_model_frozen(monkeypatch, rng):
    from difnumpy import Schedule, sample
    m = UNet(**TINY, backend="cpu", rng=0)
    _randomize(m, rng)
    sched = Schedule.from_name("linear", 100)
    want = sample(m, sched, (2, 1, 8, 8), method="ddim", num_steps=4, rng=np.random.default_rng(0), backend="cpu")
    calls = _count_transforms(monkeypatch)
    got = sample(m, sched, (2, 1, 8, 8), method="ddim", num_steps=4, rng=np.random.default_rng(0), backend="cpu")
    np.testing.assert_array_equal(got, want)
    assert len(calls) == _winograd_convs(m)  # one transform per filter for the 4 steps
    assert all(p.flags.writeable for p in m.params.values())


# ---- the fused inference ResBlock of the cpu backend (issue 15) ----

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch,hw,nthreads", [(1, 8, 1), (16, 8, 2), (3, 28, 2), (2, 12, 1)])
def test_fused_resblock_gives_the_unfused_bits(dtype, batch, hw, nthreads, monkeypatch, rng):
    """cpu's resblock_forward and resblock_backward run the same kernels and reductions as the unfused graph:
    the same bits (outputs, input gradient, every parameter gradient), with and without a skip conv, in
    batch shares and in one pass; they decline (None) where a conv is big enough to be shared out over the
    threads, and the graph then runs unfused."""
    import numba
    from difnumpy.kernels import cpu
    from difnumpy.kernels.cpu import _threads
    m = UNet(backend="cpu", dtype=dtype, rng=0)
    _randomize(m, rng)
    x = rng.standard_normal((batch, 1, hw, hw))
    t = rng.integers(0, 1000, batch)
    def counting(hook, log):  # the hook, noting whether it ran the block (or declined with None)
        def wrapped(*a):
            out = hook(*a)
            log.append(out is not None)
            return out
        return wrapped
    calls, bwd_calls = [], []
    prev = numba.get_num_threads()
    numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
    monkeypatch.setattr(_threads, "_nthreads", lambda: nthreads)  # the hook's choice whatever the machine
    monkeypatch.setattr(cpu, "plan_forward", None)  # the passes call the hooks (a plan runs the kernels itself)

    def run():  # inference, and a training pass (the fused block returns the activations the backward needs)
        out, cache = m.forward(x, t)
        grads, dx = m.backward(np.cos(out), cache, return_input_grad=True)
        return [m(x, t), out, dx] + [grads[k] for k in m.params]
    try:
        monkeypatch.setattr(cpu, "resblock_forward", counting(cpu.resblock_forward, calls))
        monkeypatch.setattr(cpu, "resblock_backward", counting(cpu.resblock_backward, bwd_calls))
        fused = run()
        monkeypatch.setattr(cpu, "resblock_forward", None)
        monkeypatch.setattr(cpu, "resblock_backward", None)
        unfused = run()
    finally:
        numba.set_num_threads(prev)
    for a, b in zip(fused, unfused):
        np.testing.assert_array_equal(a, b)
    calls = calls[:len(calls) // 2]  # one pass's (the training and the inference pass ask alike)
    assert len(calls) == 5 * (2 if batch >= 8 else 1)  # every ResBlock of every share asked the hook
    assert sorted(bwd_calls) == sorted(calls)  # the backward hook decides as the forward one (shares interleave)
    if hw == 28 and nthreads > 1:
        assert not all(calls) and any(calls)  # the 96 -> 32 block at 28x28, 3 images: its convs shared out
    else:
        assert all(calls)


def test_fused_resblock_declines_where_the_unfused_convs_are_not_winograd(monkeypatch, rng):
    """The fused ResBlock kernels are Winograd's: where the unfused calls take another path (fewer than
    _WINO_MIN_C channels, or USE_WINOGRAD off) the hook declines, so the two ways never differ in bits."""
    from difnumpy.kernels.cpu import conv as cpu_conv, resblock

    def block(C, F):
        x = rng.standard_normal((2, C, 8, 8)).astype(np.float32)
        z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        o = lambda *s: np.ones(s, np.float32)  # noqa: E731
        skip = (rng.standard_normal((F, C, 1, 1)).astype(np.float32), z(F)) if C != F else (None, None)
        return resblock.resblock_forward(x, o(C), z(C), rng.standard_normal((F, C, 3, 3)).astype(np.float32), z(F),
                                         z(2, F), o(F), z(F), rng.standard_normal((F, F, 3, 3)).astype(np.float32),
                                         z(F), *skip, 1, 1e-5)  # groups=1: any C
    lo = cpu_conv._WINO_MIN_C
    assert block(lo, lo) is not None and block(lo, 2 * lo) is not None
    assert block(lo - 1, lo) is None and block(lo, lo - 1) is None
    monkeypatch.setattr(cpu_conv, "USE_WINOGRAD", False)
    assert block(lo, lo) is None
