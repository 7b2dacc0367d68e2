"""The CUDA backend (difnumpy.kernels.cuda) against its NumPy twins and the CPU path.

Runs under numba's CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is imported,
see .ci/run); skipped as a whole when neither a GPU nor the simulator is usable. The simulator runs one
Python thread per CUDA thread, so every shape here is tiny. Tests marked ``gpu`` need a real GPU.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from difnumpy.kernels import get_backend
from difnumpy.kernels import reference as ref

try:
    ck = get_backend("cuda")
except RuntimeError as e:  # no GPU, no numba-cuda, and the simulator is off
    pytest.skip(f"CUDA backend not usable here ({e})", allow_module_level=True)

from difnumpy import Schedule, Trainer, UNet, sample  # noqa: E402

pytestmark = [
    # numba.cuda.random's xoroshiro128p on the simulator does uint64 arithmetic in NumPy scalars
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning"),
]

needs_gpu = pytest.mark.skipif(ck.SIMULATOR, reason="needs a real NVIDIA GPU (the CUDA simulator is on)")
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True, scope="module")
def _fast_thread_switching():
    # the simulator's blocks are Python threads meeting at barriers: switch the GIL often
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


def tol(dt):
    return dict(rtol=2e-4, atol=2e-5) if dt == np.float32 else dict(rtol=1e-10, atol=1e-12)


def randn(rng, shape, dt):
    return rng.standard_normal(shape).astype(dt)


# ---------------------------------------------------------------------------------------------------
# availability and errors


def test_cuda_available_and_simulator_flag():
    assert ck.cuda_available() is True
    assert isinstance(ck.SIMULATOR, bool)


def test_unusable_cuda_is_a_clear_runtime_error():
    code = textwrap.dedent("""
        import os
        os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
        import numba.cuda
        if numba.cuda.is_available():
            print("HAS_GPU")
        else:
            from difnumpy.kernels import get_backend
            try:
                get_backend("cuda")
            except RuntimeError as e:
                print("RUNTIMEERROR", e)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "DIFNUMPY_CUDA_COMPILE_ONLY")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if "HAS_GPU" in r.stdout:
        pytest.skip("a real GPU is present")
    assert "RUNTIMEERROR" in r.stdout, r.stdout + r.stderr
    assert "NUMBA_ENABLE_CUDASIM" in r.stdout and "backend='cuda'" in r.stdout


def test_bad_arguments_name_the_argument(rng):
    x = randn(rng, (1, 2, 3, 3), np.float32)
    with pytest.raises(TypeError, match="w must have dtype float32"):
        ck.conv2d_forward(x, randn(rng, (2, 2, 3, 3), np.float64), np.zeros(2, np.float32), 1, 1)
    with pytest.raises(TypeError, match="x must be a numpy ndarray or a numba.cuda device array"):
        ck.conv2d_forward([1.0], x, x, 1, 1)
    with pytest.raises(ValueError, match="groups must divide"):
        ck.group_norm_silu_forward(x, np.ones(2, np.float32), np.zeros(2, np.float32), 3, 1e-5, True)
    with pytest.raises(ValueError, match="step must be"):
        p = np.zeros(3, np.float32)
        ck.adam_update(p, p.copy(), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        ck.randn((2,), np.int32, rng=0)


# ---------------------------------------------------------------------------------------------------
# every kernel against its NumPy twin


def test_scalar_maths_cpu_and_device_compilations(rng):
    y = randn(rng, 50, np.float64) * 5
    half, one = 0.5, 1.0
    s = np.array([ck.scalar_cpu.sigmoid(v, half) for v in y])
    np.testing.assert_allclose(s, ref._sigmoid(y), rtol=1e-12)
    g = np.array([ck.scalar_cpu.silu_grad(v, one, half) for v in y])
    sg = ref._sigmoid(y)
    np.testing.assert_allclose(g, sg * (1 + y * (1 - sg)), rtol=1e-12)
    xp, x0 = ck.scalar_cpu.sampler(0.3, -0.2, 1.5, 2.0, 1.0, 0.5, 0.25, 0.1, -1.0, 1.0)
    assert np.isclose(x0, 0.4)
    assert np.isclose(xp, 0.5 * x0 + 0.25 * 0.3 + 0.1 * 1.5)


@pytest.mark.parametrize("dt", DTYPES)
def test_q_sample_and_sampler_update(dt, rng):
    n, m = 3, 7
    x0, e = randn(rng, (n, m), dt), randn(rng, (n, m), dt)
    a, b = rng.uniform(0.1, 1, n), rng.uniform(0.1, 1, n)
    np.testing.assert_allclose(ck.q_sample(x0, e, a, b), ref.q_sample(x0, e, a, b), **tol(dt))
    out = np.empty_like(x0)
    assert ck.q_sample(x0, e, a, b, out=out) is out
    coef = rng.standard_normal((n, 5))
    lo, hi = np.array([-1.0, -np.inf, -0.5]), np.array([1.0, np.inf, 0.2])
    got = ck.sampler_update(x0, e, x0 * 2, coef, lo, hi)
    want = ref.sampler_update(x0, e, x0 * 2, coef, lo, hi)
    for g, w in zip(got, want):
        assert g.dtype == dt
        np.testing.assert_allclose(g, w, **tol(dt))


@pytest.mark.parametrize("dt", DTYPES)
def test_device_noise_and_fused_random_update(dt):
    z = ck.randn((2, 200), dt, rng=np.random.default_rng(0)).copy_to_host()
    assert z.dtype == dt and abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.15
    z2 = ck.randn((2, 200), dt, rng=np.random.default_rng(0)).copy_to_host()
    np.testing.assert_array_equal(z, z2)  # same seed, same draws
    # E = 1, C = D = 0: x_prev is exactly the device noise
    x = np.zeros((2, 20), dt)
    coef = np.tile([0.0, 0.0, 0.0, 0.0, 1.0], (2, 1))
    xp, _ = ck.sampler_update_random(x, x, ck.DeviceRandom(1), coef, np.full(2, -1.0), np.full(2, 1.0))
    assert xp.std() > 0.5 and len(np.unique(xp)) == xp.size


CONV_CASES = [(4, 3, 1, 1), (5, 3, 2, 1), (3, 1, 1, 0), (2, 5, 1, 2), (3, 2, 3, 0)]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("F,K,stride,pad", CONV_CASES)
@pytest.mark.parametrize("block_reductions", [False, True])
def test_conv2d_forward_and_backward(dt, F, K, stride, pad, block_reductions, rng, monkeypatch):
    # covers the tiled kernel (K <= 3, stride <= 2), the direct one, and both weight-gradient kernels
    monkeypatch.setattr(ck, "USE_BLOCK_REDUCTIONS", block_reductions)
    x = randn(rng, (2, 3, 5, 6), dt)
    w, b = randn(rng, (F, 3, K, K), dt), randn(rng, (F,), dt)
    out = ck.conv2d_forward(x, w, b, stride, pad)
    want = ref.conv2d_forward(x, w, b, stride, pad)
    assert out.dtype == dt and out.shape == want.shape
    np.testing.assert_allclose(out, want, **tol(dt))
    dout = randn(rng, want.shape, dt)
    np.testing.assert_allclose(ck.conv2d_backward_input(dout, w, x.shape, stride, pad),
                               ref.conv2d_backward_input(dout, w, x.shape, stride, pad), **tol(dt))
    for g, r in zip(ck.conv2d_backward_weight(dout, x, w.shape, stride, pad),
                    ref.conv2d_backward_weight(dout, x, w.shape, stride, pad)):
        np.testing.assert_allclose(g, r, **tol(dt))


def test_conv2d_tiled_multi_tile_and_channel_chunks(rng):
    # more output pixels than one tile and more channels than one shared-memory chunk
    x = randn(rng, (1, 6, 9, 10), np.float32)
    w, b = randn(rng, (6, 6, 3, 3), np.float32), randn(rng, (6,), np.float32)
    for stride in (1, 2):
        np.testing.assert_allclose(ck.conv2d_forward(x, w, b, stride, 1), ref.conv2d_forward(x, w, b, stride, 1),
                                   **tol(np.float32))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("block_reductions", [False, True])
def test_group_norm_silu(dt, silu, block_reductions, rng, monkeypatch):
    monkeypatch.setattr(ck, "USE_BLOCK_REDUCTIONS", block_reductions)
    x = randn(rng, (2, 4, 3, 3), dt) * 3 + 1
    g, be = randn(rng, (4,), dt), randn(rng, (4,), dt)
    got = ck.group_norm_silu_forward(x, g, be, 2, 1e-5, silu)
    want = ref.group_norm_silu_forward(x, g, be, 2, 1e-5, silu)
    for a, r in zip(got, want):
        assert a.dtype == dt and a.shape == r.shape
        np.testing.assert_allclose(a, r, **tol(dt))
    dout = randn(rng, x.shape, dt)
    for a, r in zip(ck.group_norm_silu_backward(dout, x, g, be, want[1], want[2], 2, silu),
                    ref.group_norm_silu_backward(dout, x, g, be, want[1], want[2], 2, silu)):
        np.testing.assert_allclose(a, r, **tol(dt))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_update(dt, wd, rng):
    shape = (3, 4)
    p, g = randn(rng, shape, dt), randn(rng, shape, dt)
    m, v = randn(rng, shape, dt) * 0.1, np.abs(randn(rng, shape, dt)) * 0.1
    host = [a.copy() for a in (p, g, m, v)]
    twin = [a.copy() for a in (p, g, m, v)]
    for step in (1, 2):
        ck.adam_update(*host, 1e-2, 0.9, 0.999, 1e-8, wd, step)
        ref.adam_update(*twin, 1e-2, 0.9, 0.999, 1e-8, wd, step)
    for a, r in zip(host, twin):
        np.testing.assert_allclose(a, r, rtol=2e-5 if dt == np.float32 else 1e-12, atol=1e-6 if dt == np.float32 else 0)
    # device arrays are updated in place on the device
    d = [ck.to_device(a) for a in (p, g, m, v)]
    ck.adam_update(*d, 1e-2, 0.9, 0.999, 1e-8, wd, 1)
    t2 = [a.copy() for a in (p, g, m, v)]
    ref.adam_update(*t2, 1e-2, 0.9, 0.999, 1e-8, wd, 1)
    np.testing.assert_allclose(d[0].copy_to_host(), t2[0], **tol(dt))


@pytest.mark.parametrize("dt", DTYPES)
def test_extras_upsample_linear_mse_ema(dt, rng):
    x = randn(rng, (2, 3, 2, 3), dt)
    np.testing.assert_array_equal(ck.upsample_nearest2x_forward(x), ref.upsample_nearest2x_forward(x))
    d = randn(rng, (2, 3, 4, 6), dt)
    np.testing.assert_allclose(ck.upsample_nearest2x_backward(d), ref.upsample_nearest2x_backward(d), **tol(dt))
    y = randn(rng, (2, 4, 2, 3), dt)
    cat = ck.concat_channels([x, y])
    np.testing.assert_array_equal(cat, ref.concat_channels([x, y]))
    for a, r in zip(ck.split_channels(cat, (3, 4)), ref.split_channels(cat, (3, 4))):
        np.testing.assert_array_equal(a, r)
    xs, w, b = randn(rng, (3, 5), dt), randn(rng, (4, 5), dt), randn(rng, (4,), dt)
    np.testing.assert_allclose(ck.linear_forward(xs, w, b), ref.linear_forward(xs, w, b), **tol(dt))
    do = randn(rng, (3, 4), dt)
    for a, r in zip(ck.linear_backward(do, xs, w), ref.linear_backward(do, xs, w)):
        np.testing.assert_allclose(a, r, **tol(dt))
    pred, target = randn(rng, (2, 1, 3, 3), dt), randn(rng, (2, 1, 3, 3), dt)
    loss, dp = ck.mse_loss(pred, target)
    rl, rdp = ref.mse_loss(pred, target)
    assert isinstance(loss, float) and np.isclose(loss, rl, rtol=1e-6 if dt == np.float32 else 1e-12)
    np.testing.assert_allclose(dp, rdp, **tol(dt))
    e, p = randn(rng, (7,), dt), randn(rng, (7,), dt)
    e2 = e.copy()
    ck.ema_update(e, p, 0.9)
    ref.ema_update(e2, p, 0.9)
    np.testing.assert_allclose(e, e2, **tol(dt))


def test_device_arrays_stay_on_the_device(rng):
    x = randn(rng, (1, 2, 4, 4), np.float32)
    w, b = randn(rng, (2, 2, 3, 3), np.float32), np.zeros(2, np.float32)
    dx = ck.to_device(x)
    out = ck.conv2d_forward(dx, w, b, 1, 1)
    assert ck.is_device_array(out) and not ck.is_device_array(ck.conv2d_forward(x, w, b, 1, 1))
    y, mean, rstd = ck.group_norm_silu_forward(out, np.ones(2, np.float32), np.zeros(2, np.float32), 1, 1e-5, True)
    assert all(ck.is_device_array(a) for a in (y, mean, rstd))
    np.testing.assert_allclose(ck.to_host(out), ref.conv2d_forward(x, w, b, 1, 1), **tol(np.float32))


def test_device_helper_kernels(rng):
    k = ck._k(np.float32)
    h, t = randn(rng, (2, 3, 2, 2), np.float32), randn(rng, (2, 3), np.float32)
    dh = ck.to_device(h)
    k.add_bias_k[1, 32](dh, ck.to_device(t))
    np.testing.assert_allclose(dh.copy_to_host(), h + t[:, :, None, None], rtol=1e-6)
    s = ck.to_device(np.zeros((2, 3), np.float32))
    k.sum_hw_k[1, 32](ck.to_device(h), s)
    np.testing.assert_allclose(s.copy_to_host(), h.sum(axis=(2, 3)), rtol=1e-5)
    a, b2 = randn(rng, (2, 1, 2, 2), np.float32), randn(rng, (2, 2, 2, 2), np.float32)
    cat = ck.cuda.device_array((2, 3, 2, 2), np.float32)
    k.concat_k[1, 32](ck.to_device(a), ck.to_device(b2), cat)
    np.testing.assert_array_equal(cat.copy_to_host(), np.concatenate([a, b2], axis=1))
    v = randn(rng, (5,), np.float32)
    np.testing.assert_allclose(ck._silu(ck.to_device(v)).copy_to_host(), v * ref._sigmoid(v), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# no float64 in float32 kernels (numba.cuda.compile_ptx, no GPU needed; in a subprocess without the simulator)

_PTX_SCRIPT = textwrap.dedent("""
    import types, numpy as np
    import numba.cuda.dispatcher as D
    # device functions are typed for the current device; there is none here: pretend sm_75
    D.get_current_device = lambda: types.SimpleNamespace(compute_capability=(7, 5))
    from numba import cuda, int64 as i8, boolean
    import difnumpy.kernels.cuda as ck
    for dt, nt in ((np.float32, __import__("numba").float32), (np.float64, __import__("numba").float64)):
        ks = ck._k(dt)
        a1, a2, a3, a4 = nt[::1], nt[:, ::1], nt[:, :, ::1], nt[:, :, :, ::1]
        sigs = {"sampler_k": (a2, a2, a2, a2, a1, a1, a2, a2), "q_sample_k": (a2, a2, a1, a1, a2),
                "conv_fwd_tiled_k": (a4, a4, a1, i8, i8, i8, a4), "conv_bwd_input_k": (a4, a4, i8, i8, a4),
                "conv_bwd_weight_k": (a4, a4, i8, i8, a4, a1), "gn_fwd_k": (a4, a1, a1, i8, nt, boolean, a4, a2, a2),
                "gn_bwd_dx_k": (a4, a4, a1, a1, a2, a2, i8, boolean, a3, a4), "adam_k": (a1,) * 4 + (nt,) * 8,
                "mse_k": (a1, a1, nt, a1, a1), "ema_k": (a1, a1, nt, nt), "silu_k": (a1, a1),
                "axpy_k": (a1, a1, nt)}
        for name, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(getattr(ks, name).py_func, sig, cc=(7, 5))
            print(np.dtype(dt).name, name, ptx.count(".f64"))
""")


def test_float32_kernels_compile_without_f64_instructions():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["DIFNUMPY_CUDA_COMPILE_ONLY"] = "1"
    r = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"numba.cuda.compile_ptx is not usable here (needs NVVM and NVRTC): "
                    f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    counts = {tuple(line.split()[:2]): int(line.split()[2]) for line in r.stdout.splitlines()}
    f32 = {k[1]: v for k, v in counts.items() if k[0] == "float32"}
    assert len(f32) == 12
    assert all(v == 0 for v in f32.values()), f"float64 instructions in float32 kernels: {f32}"
    # the check can fail: the float64 builds do show .f64
    assert counts[("float64", "sampler_k")] > 0


# ---------------------------------------------------------------------------------------------------
# the U-Net, a training step and sampling: cuda agrees with cpu

def _tiny_unet(backend, seed=0):
    return UNet(base_channels=4, groups=2, rng=seed, backend=backend)


def _randomise(model, rng):
    # non-zero everywhere (the zero-initialised convs would hide errors)
    for p in model.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.3


def test_unet_forward_and_device_backward_agree_with_cpu(rng):
    cpu = _tiny_unet("cpu")
    _randomise(cpu, rng)
    gpu = _tiny_unet("cuda")
    gpu.set_params(cpu.params)
    x = randn(rng, (2, 1, 4, 4), np.float32)
    t = np.array([3, 17])
    want = cpu(x, t)
    np.testing.assert_allclose(gpu(x, t), want, rtol=1e-4, atol=1e-5)        # host arrays, cuda kernels
    dev = ck.DeviceUNet(cpu)
    out, cache = dev.forward(x, t)                                           # everything on the device
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-4, atol=1e-5)
    dout = randn(rng, want.shape, np.float32)
    grads = dev.backward(dout, cache)
    want_g = cpu.backward(dout, cpu.forward(x, t)[1])
    assert list(grads) == list(want_g)
    for k, g in grads.items():
        w = want_g[k]
        np.testing.assert_allclose(g.copy_to_host(), w, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(w).max()),
                                   err_msg=k)


def test_training_step_agrees_with_cpu(rng):
    sched = Schedule.from_name("linear", 50)
    x0 = randn(rng, (1, 1, 4, 4), np.float32)
    models = {}
    for backend in ("cpu", "cuda"):
        m = _tiny_unet(backend, seed=3)
        tr = Trainer(m, sched, lr=1e-2, rng=7, ema_decay=0.9)
        loss = tr.step(x0)
        models[backend] = (loss, m.params, tr.ema_model.params)
    # the device-resident step: same rng order (t then eps), same update
    m = _tiny_unet("cpu", seed=3)
    dstep = ck.DeviceTrainStep(m, sched, lr=1e-2, rng=7, ema_decay=0.9)
    loss_d = dstep.step(x0)
    ema = {k: np.empty_like(p) for k, p in m.params.items()}
    dstep.download(ema)
    models["device"] = (loss_d, m.params, ema)
    loss_c, p_c, e_c = models["cpu"]
    for name in ("cuda", "device"):
        loss, p, e = models[name]
        assert np.isclose(loss, loss_c, rtol=1e-5), name
        for k in p_c:
            np.testing.assert_allclose(p[k], p_c[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
            np.testing.assert_allclose(e[k], e_c[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")


def test_ddim_sampling_agrees_with_cpu(rng):
    sched = Schedule.from_name("linear", 40)
    model = _tiny_unet("cpu", seed=1)
    _randomise(model, rng)
    kw = dict(method="ddim", num_steps=2, eta=0.0, clip_sample=True)
    want = sample(model, sched, (1, 1, 4, 4), rng=np.random.default_rng(5), **kw)
    gpu = _tiny_unet("cuda", seed=1)
    gpu.set_params(model.params)
    got = sample(gpu, sched, (1, 1, 4, 4), rng=np.random.default_rng(5), backend="cuda", **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    dev = ck.sample_device(model, sched, (1, 1, 4, 4), rng=np.random.default_rng(5), **kw)
    assert isinstance(dev, np.ndarray) and dev.dtype == np.float32
    np.testing.assert_allclose(dev, want, rtol=1e-4, atol=1e-5)


def test_ddpm_sampling_on_device_runs_with_device_noise(rng):
    sched = Schedule.from_name("linear", 4)
    model = _tiny_unet("cpu", seed=2)
    x = ck.sample_device(model, sched, (1, 1, 4, 4), method="ddpm", num_steps=2, rng=3)
    x2 = ck.sample_device(model, sched, (1, 1, 4, 4), method="ddpm", num_steps=2, rng=3)
    assert x.shape == (1, 1, 4, 4) and np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, x2)  # same seed, same samples
    with pytest.raises(ValueError, match="eta applies"):
        ck.sample_device(model, sched, (1, 1, 4, 4), method="ddpm", eta=0.5, rng=0)


# ---------------------------------------------------------------------------------------------------
# real GPU only


@pytest.mark.gpu
@needs_gpu
def test_gpu_default_unet_forward_matches_cpu():
    model = UNet(rng=0, backend="cpu")
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    t = np.arange(8) * 100
    want = model(x, t)
    got = ck.DeviceUNet(model)(x, t).copy_to_host()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_block_reduction_kernels_large_shapes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32, 28, 28)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((16, 64, 28, 28)).astype(np.float32)
    for a, r in zip(ck.conv2d_backward_weight(dout, x, w.shape, 1, 1), ref.conv2d_backward_weight(dout, x, w.shape, 1, 1)):
        np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-2)
