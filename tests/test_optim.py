"""Adam/AdamW, the adam_update kernel twins, gradient clipping, EMA and warmup."""
import math

import numpy as np
import pytest

from difnumpy.kernels import cpu, get_backend, reference
from difnumpy.nn.optim import EMA, Adam, AdamW, clip_grad_norm, global_norm, lr_at, warmup_schedule


def _scalar_adam(p, grads, lr, b1, b2, eps, wd=0.0, decoupled=False):
    """Independent scalar-by-scalar Adam/AdamW in Python floats (Kingma & Ba 2015, Algorithm 1)."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            gi = float(g[i])
            if wd and not decoupled:
                gi += wd * p[i]
            if wd and decoupled:
                p[i] -= lr * wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            p[i] -= lr * mhat / (math.sqrt(vhat) + eps)
    return np.array(p)


# ---- kernel twins -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_kernel_numba_equals_numpy_twin(dtype, wd):
    rng = np.random.default_rng(0)
    shape = (7, 3, 5)
    p0 = rng.standard_normal(shape).astype(dtype)
    a = [p0.copy(), np.zeros(shape, dtype), np.zeros(shape, dtype)]
    b = [p0.copy(), np.zeros(shape, dtype), np.zeros(shape, dtype)]
    for step in range(1, 8):
        g = rng.standard_normal(shape).astype(dtype)
        reference.adam_update(a[0], g, a[1], a[2], 3e-2, 0.9, 0.999, 1e-8, wd, step)
        cpu.adam_update(b[0], g, b[1], b[2], 3e-2, 0.9, 0.999, 1e-8, wd, step)
    for x, y in zip(a, b):
        assert x.dtype == dtype and y.dtype == dtype
        np.testing.assert_array_equal(x, y)  # same float64 arithmetic in the same order: bit for bit
    assert not np.array_equal(a[0], p0)


@pytest.mark.parametrize("mod", [reference, cpu])
def test_adam_kernel_against_scalar_reference(mod):
    rng = np.random.default_rng(1)
    p = rng.standard_normal(11)
    grads = [rng.standard_normal(11) for _ in range(5)]
    expected = _scalar_adam(p, grads, 1e-2, 0.9, 0.99, 1e-8, wd=0.1, decoupled=True)
    m, v = np.zeros(11), np.zeros(11)
    for t, g in enumerate(grads, start=1):
        mod.adam_update(p, g, m, v, 1e-2, 0.9, 0.99, 1e-8, 0.1, t)
    np.testing.assert_allclose(p, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mod", [reference, cpu])
def test_adam_kernel_rejects_bad_input(mod):
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="grad"):
        mod.adam_update(p, np.zeros(4, np.float64), np.zeros(4, np.float32), np.zeros(4, np.float32),
                        1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="m must have the shape"):
        mod.adam_update(p, p.copy(), np.zeros(5, np.float32), np.zeros(4, np.float32), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="step"):
        mod.adam_update(p, p.copy(), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        q = np.zeros((4, 4), np.float32)[:, ::2]
        mod.adam_update(q, q.copy(), q.copy(), q.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)


def test_get_backend_exposes_adam_update():
    assert get_backend("cpu").adam_update is cpu.adam_update
    assert get_backend("numpy").adam_update is reference.adam_update


# ---- Adam / AdamW -------------------------------------------------------------------------------

def test_adam_first_step_is_lr_times_sign():
    # With m0 = v0 = 0 the bias-corrected first step is lr * g / (|g| + eps), i.e. ~lr * sign(g).
    params = {"w": np.array([1.0, -2.0, 0.5]), "b": np.array([[3.0]])}
    grads = {"w": np.array([0.3, -4.0, 1e-3]), "b": np.array([[-2.0]])}
    opt = Adam(params, lr=0.1)
    opt.step(grads)
    np.testing.assert_allclose(params["w"], [1.0 - 0.1 * 0.3 / (0.3 + 1e-8), -2.0 + 0.1 * 4.0 / (4.0 + 1e-8),
                                             0.5 - 0.1 * 1e-3 / (1e-3 + 1e-8)], rtol=1e-12)
    np.testing.assert_allclose(params["b"], [[3.0 + 0.1 * 2.0 / (2.0 + 1e-8)]], rtol=1e-12)
    assert opt.step_count == 1


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("cls,wd,decoupled", [(Adam, 0.0, False), (Adam, 0.05, False), (AdamW, 0.05, True)])
def test_adam_matches_hand_reference(backend, cls, wd, decoupled):
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(6)
    grads = [rng.standard_normal(6) for _ in range(4)]
    params = {"a": p0[:4].reshape(2, 2).copy(), "b": p0[4:].copy()}
    opt = cls(params, lr=5e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, backend=backend)
    for g in grads:
        opt.step({"a": g[:4].reshape(2, 2), "b": g[4:]})
    expected = _scalar_adam(p0, grads, 5e-2, 0.8, 0.95, 1e-6, wd=wd, decoupled=decoupled)
    got = np.concatenate([params["a"].ravel(), params["b"]])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_adamw_decoupled_decay_with_zero_gradient():
    # Zero gradient: the Adam part is 0 / (0 + eps) = 0, so AdamW only shrinks: p * (1 - lr*wd)^n.
    p = {"w": np.array([2.0, -1.0])}
    opt = AdamW(p, lr=0.1, weight_decay=0.5)
    assert opt.weight_decay == 0.5 and AdamW(p.copy()).weight_decay == 0.01
    for _ in range(3):
        opt.step({"w": np.zeros(2)})
    np.testing.assert_allclose(p["w"], np.array([2.0, -1.0]) * (1 - 0.05) ** 3, rtol=1e-14)
    # Classic Adam's L2 penalty instead enters the normalised step: a first move of ~lr, not lr*wd*p.
    q = {"w": np.array([2.0, -1.0])}
    Adam(q, lr=0.1, weight_decay=0.5).step({"w": np.zeros(2)})
    np.testing.assert_allclose(q["w"], [1.9, -0.9], rtol=1e-8)


def test_adam_float32_params_stay_float32_and_backends_agree():
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    pa = {k: v.copy() for k, v in base.items()}
    pb = {k: v.copy() for k, v in base.items()}
    oa, ob = AdamW(pa, lr=1e-2, backend="numpy"), AdamW(pb, lr=1e-2, backend="cpu")
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape) for k, v in base.items()}  # float64 grads are cast
        oa.step(g)
        ob.step(g)
    for k in base:
        assert pa[k].dtype == np.float32 and oa.m[k].dtype == np.float32
        np.testing.assert_array_equal(pa[k], pb[k])
        np.testing.assert_array_equal(oa.v[k], ob.v[k])


def test_adam_state_dict_round_trip_and_validation():
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    opt = Adam(params, lr=1e-2)
    for _ in range(2):
        opt.step({k: rng.standard_normal(v.shape) for k, v in params.items()})
    sd = opt.state_dict()
    assert sd["step"] == 2 and set(sd) == {"step", "lr", "beta1", "beta2", "eps", "weight_decay",
                                           "m/w", "m/b", "v/w", "v/b"}
    params2 = {k: v.copy() for k, v in params.items()}
    opt2 = Adam(params2, lr=0.5)
    opt2.load_state_dict(sd)
    g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    opt.step(g)
    opt2.step(g)
    for k in params:
        np.testing.assert_array_equal(params[k], params2[k])
    bad = dict(sd)
    del bad["m/w"]
    with pytest.raises(ValueError, match="missing keys.*m/w"):
        opt2.load_state_dict(bad)
    bad = dict(sd, **{"v/b": np.zeros(3)})
    with pytest.raises(ValueError, match="v/b has shape"):
        opt2.load_state_dict(bad)
    with pytest.raises(ValueError, match="unexpected"):
        opt2.load_state_dict(dict(sd, extra=1))


def test_adam_argument_checks():
    p = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match="lr"):
        Adam(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="backend"):
        Adam(p, backend="tpu")
    with pytest.raises(TypeError, match="params"):
        Adam([np.zeros(3)])
    with pytest.raises(TypeError, match="float32 or float64"):
        Adam({"w": np.zeros(3, np.int64)})
    opt = Adam(p)
    with pytest.raises(ValueError, match="missing.*'w'"):
        opt.step({"x": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.zeros(4)})
    assert opt.step_count == 0


# ---- clipping -----------------------------------------------------------------------------------

def test_clip_grad_norm_global():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0, 0.0]], dtype=np.float32)}
    assert global_norm(grads) == 5.0
    total = clip_grad_norm(grads, 1.0)
    assert total == 5.0
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(grads["a"], [3.0 * scale], rtol=1e-14)
    np.testing.assert_allclose(grads["b"], [[4.0 * scale, 0.0]], rtol=1e-6)
    assert grads["b"].dtype == np.float32
    assert abs(global_norm(grads) - 1.0) < 1e-6
    # under the bound, None or inf: untouched
    g = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(g, 1.0) == pytest.approx(0.5) and np.array_equal(g["a"], [0.3, 0.4])
    g = {"a": np.array([30.0, 40.0])}
    assert clip_grad_norm(g, None) == 50.0 and clip_grad_norm(g, float("inf")) == 50.0
    assert np.array_equal(g["a"], [30.0, 40.0])


def test_clip_grad_norm_nonfinite_and_bad_args():
    g = {"a": np.array([np.nan, 1.0]), "b": np.array([2.0])}
    assert math.isnan(clip_grad_norm(g, 1.0))
    assert g["b"][0] == 2.0  # untouched
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, 0.0)
    with pytest.raises(TypeError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, "1")


# ---- EMA ----------------------------------------------------------------------------------------

def test_ema_maths():
    p = {"w": np.array([1.0, 2.0]), "h": np.array([[0.0]], dtype=np.float32)}
    ema = EMA(p, decay=0.9, warmup=False)
    assert ema.params["w"] is not p["w"]
    target = {"w": np.array([3.0, -2.0]), "h": np.array([[1.0]], dtype=np.float32)}
    ema.update(target)
    np.testing.assert_allclose(ema.params["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-15)
    for _ in range(9):
        ema.update(target)
    # constant target: e_n = p + d^n (e_0 - p)
    np.testing.assert_allclose(ema.params["w"], [3 + 0.9 ** 10 * (1 - 3), -2 + 0.9 ** 10 * (2 + 2)], rtol=1e-13)
    np.testing.assert_allclose(ema.params["h"], [[1 - 0.9 ** 10]], rtol=1e-6)
    assert ema.params["h"].dtype == np.float32 and ema.num_updates == 10
    np.testing.assert_array_equal(p["w"], [1.0, 2.0])  # the tracked params are not touched
    # decay 0 follows the params exactly; decay 1 never moves
    e0, e1 = EMA(p, 0.0), EMA(p, 1.0, warmup=False)
    e0.update(target)
    e1.update(target)
    np.testing.assert_array_equal(e0.params["w"], target["w"])
    np.testing.assert_array_equal(e1.params["w"], p["w"])
    with pytest.raises(ValueError, match="decay"):
        EMA(p, 1.5)
    with pytest.raises(ValueError, match="keys"):
        ema.update({"w": np.zeros(2)})


def test_ema_in_place_storage_and_state():
    store = {"w": np.zeros(3)}
    ema = EMA(store, decay=0.5, copy=False, warmup=False)
    ema.update({"w": np.ones(3)})
    np.testing.assert_array_equal(store["w"], 0.5)  # updated in place
    sd = ema.state_dict()
    other = EMA({"w": np.zeros(3)}, decay=0.1)
    other.load_state_dict(sd)
    assert other.decay == 0.5 and other.num_updates == 1
    np.testing.assert_array_equal(other.params["w"], 0.5)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(dict(sd, **{"params/w": np.zeros(4)}))


def test_ema_warmup_forgets_the_initialisation_quickly():
    """d_n = min(decay, (1 + n) / (10 + n)): 0.1, 2/11, 3/12, ... until it reaches decay."""
    p = {"w": np.array([1.0])}
    ema = EMA(p, decay=0.999)
    target = {"w": np.array([0.0])}
    expected = 1.0
    for n in range(50):
        assert ema.current_decay() == pytest.approx(min(0.999, (1 + n) / (10 + n)))
        ema.update(target)
        expected *= min(0.999, (1 + n) / (10 + n))
    np.testing.assert_allclose(ema.params["w"], expected, rtol=1e-12)
    assert expected < 1e-2 < 0.999 ** 50  # the warm-up leaves far less of the start behind
    late = EMA(p, decay=0.9)
    late.num_updates = 10 ** 6
    assert late.current_decay() == 0.9  # capped by decay


# ---- warmup -------------------------------------------------------------------------------------

def test_warmup_lr():
    assert lr_at(1, 1e-3, 4) == pytest.approx(2.5e-4)
    assert [lr_at(s, 1.0, 4) for s in range(0, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(1, 2e-4, 0) == 2e-4 and lr_at(10 ** 6, 2e-4, 0) == 2e-4
    f = warmup_schedule(0.5, 2)
    assert f(1) == 0.25 and f(2) == 0.5 and f(100) == 0.5
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1.0, 2)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(1, 1.0, -2)
    with pytest.raises(TypeError, match="step"):
        lr_at(1.5, 1.0, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_cpu_adam_update_many_is_adam_update_on_each_array(dtype, wd, monkeypatch):
    """The cpu hook updates every array exactly as one adam_update call each (the same bits), and Adam.step
    goes through it; mixed dtypes fall back to the per-array calls; a bad array is refused by name."""
    rng = np.random.default_rng(4)
    shapes = [(3, 4), (7,), (2, 3, 3, 3), (1,)]
    arrays = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(2)]
    states = [[(np.abs(rng.standard_normal(s)) * 0.1).astype(dtype) for s in shapes] for _ in range(2)]
    one = [[a.copy() for a in arrays[0]], [m.copy() for m in states[0]], [v.copy() for v in states[1]]]
    many = [[a.copy() for a in arrays[0]], [m.copy() for m in states[0]], [v.copy() for v in states[1]]]
    for step in (1, 2, 3):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        for p, g, m, v in zip(*one[:1], grads, *one[1:]):
            cpu.adam_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, wd, step)
        cpu.adam_update_many(many[0], grads, many[1], many[2], 1e-2, 0.9, 0.999, 1e-8, wd, step)
        for a, b in zip(sum(one, []), sum(many, [])):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(one[0][0], arrays[0][0])  # something was updated
    mixed = [np.ones(3, np.float32), np.ones(2, np.float64)]
    grads = [np.full(3, 0.5, np.float32), np.full(2, 0.5, np.float64)]
    cpu.adam_update_many(mixed, grads, [np.zeros(3, np.float32), np.zeros(2)], [np.zeros(3, np.float32), np.zeros(2)],
                         1e-1, 0.9, 0.999, 1e-8, 0.0, 1)
    np.testing.assert_allclose(mixed[0], 0.9, rtol=1e-6)  # the first Adam step moves by lr against the gradient
    np.testing.assert_allclose(mixed[1], 1 - 0.1 * 0.5 / (0.5 + 1e-8), rtol=1e-12)  # m_hat = sqrt(v_hat) = 0.5
    with pytest.raises(ValueError, match="grad must have the shape"):
        cpu.adam_update_many([np.ones(3)], [np.ones(2)], [np.zeros(3)], [np.zeros(3)], 1e-2, 0.9, 0.999, 1e-8, 0.0, 1)
    calls = []
    monkeypatch.setattr(cpu, "adam_update_many", lambda *a: calls.append(len(a[0])))
    Adam({"a": np.ones(3, dtype), "b": np.ones(2, dtype)}).step({"a": np.ones(3, dtype), "b": np.ones(2, dtype)})
    assert calls == [2]


@pytest.mark.parametrize("nthreads", [2, 3])
def test_cpu_adam_update_many_shared_by_threads_gives_the_same_bits(nthreads, monkeypatch):
    """With the arrays shared by the threads (threshold patched to 0), every element gets the bits of one
    adam_update call; the shares are consecutive arrays of about equal total size."""
    from difnumpy.kernels.cpu import _threads, optim as cpu_optim
    monkeypatch.setattr(cpu_optim, "_ADAM_SPLIT_MIN", 0)
    monkeypatch.setattr(_threads, "_nthreads", lambda: nthreads)
    rng = np.random.default_rng(5)
    shapes = [(300,), (7, 3), (1,), (64, 2), (5,)]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ms = [(0.1 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    vs = [(0.1 * np.abs(rng.standard_normal(s))).astype(np.float32) for s in shapes]
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = [[a.copy() for a in lst] for lst in (ps, ms, vs)]
    before = [a.copy() for a in ps]
    for p, g, m, v in zip(ref[0], gs, ref[1], ref[2]):
        cpu.adam_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.01, 3)
    cpu.adam_update_many(ps, gs, ms, vs, 1e-2, 0.9, 0.999, 1e-8, 0.01, 3)
    for a, b in zip(ref[0] + ref[1] + ref[2], ps + ms + vs):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(before, ps))  # every array was updated
    with pytest.raises(ValueError, match="one length"):
        cpu.adam_update_many(ps, gs[:-1], ms, vs, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1)


def test_adam_cuts_balance_the_elements():
    from difnumpy.kernels.cpu.optim import _adam_cuts
    assert _adam_cuts([5, 5, 5, 5], 2).tolist() == [0, 2, 4]
    assert _adam_cuts([100, 1, 1], 2).tolist() == [0, 1, 3]
    assert _adam_cuts([1, 1, 100], 2).tolist() == [0, 2, 3]
    assert _adam_cuts([1] * 10, 3).tolist() == [0, 3, 7, 10]
    assert _adam_cuts([4], 1).tolist() == [0, 1]
