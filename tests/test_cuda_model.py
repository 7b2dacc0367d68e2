"""The one U-Net graph and the one sampling loop on the cuda backend, against the cpu backend.

Runs under numba's CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported); skipped
as a whole when neither a GPU nor the simulator is usable (the no-GPU error is checked in test_cuda.py).
Every shape is tiny: the simulator runs one Python thread per CUDA thread.
"""
import sys

import numpy as np
import pytest

from difnumpy.kernels import get_backend

try:
    ck = get_backend("cuda")
except RuntimeError as e:  # no GPU, no numba-cuda, and the simulator is off
    pytest.skip(f"CUDA backend not usable here ({e})", allow_module_level=True)

from difnumpy import Schedule, UNet, ddpm_step, inference_timesteps, sample, sample_progressive  # noqa: E402
from difnumpy.testing import GaussianOracle  # noqa: E402
from test_samplers import chain_moments  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]
Z = 5.0  # standard errors


@pytest.fixture(autouse=True, scope="module")
def _fast_thread_switching():
    # the simulator's blocks are Python threads meeting at barriers: switch the GIL often
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


def _pair(seed=0, **kw):
    """The same random (non-zero everywhere) U-Net on cpu and on cuda."""
    cpu = UNet(base_channels=4, groups=2, rng=seed, backend="cpu", **kw)
    rng = np.random.default_rng(seed + 100)
    cpu.set_params({k: rng.standard_normal(p.shape) * 0.3 for k, p in cpu.params.items()})
    gpu = cpu.copy()
    gpu.backend = "cuda"
    return cpu, gpu


def test_params_live_on_the_backend_and_move_with_it():
    cpu, gpu = _pair()
    assert all(isinstance(p, np.ndarray) for p in cpu.params.values())
    assert all(ck.is_array(p) and not isinstance(p, np.ndarray) for p in gpu.params.values())
    for k, v in gpu.host_params().items():
        np.testing.assert_array_equal(v, cpu.params[k])
    gpu.backend = "cpu"
    assert all(isinstance(p, np.ndarray) for p in gpu.params.values())
    gpu.backend = "cuda"
    assert UNet(**gpu.config, rng=0).backend == "cuda"


def test_unet_forward_and_backward_agree_with_cpu():
    cpu, gpu = _pair()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    t = np.array([3, 17])
    out_c, cache_c = cpu.forward(x, t)
    out_g, cache_g = gpu.forward(x, t)
    assert isinstance(out_g, np.ndarray)  # NumPy in, NumPy out
    np.testing.assert_allclose(out_g, out_c, rtol=1e-4, atol=1e-5)
    dout = rng.standard_normal(out_c.shape).astype(np.float32)
    g_c = cpu.backward(dout, cache_c, return_input_grad=True)
    g_g = gpu.backward(dout, cache_g, return_input_grad=True)
    assert list(g_g[0]) == list(g_c[0])
    for k, w in g_c[0].items():
        np.testing.assert_allclose(g_g[0][k], w, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(w).max()), err_msg=k)
    np.testing.assert_allclose(g_g[1], g_c[1], rtol=1e-3, atol=1e-5)
    # device in, device out: the whole pass stays on the device
    d_out = gpu(ck.asarray(x), t)
    assert ck.is_array(d_out) and not isinstance(d_out, np.ndarray)
    np.testing.assert_allclose(ck.to_host(d_out), out_c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,extra", [("ddim", {}), ("ddim", {"eta": 0.7}), ("ddpm", {}),
                                          ("ddpm", {"variance_type": "fixed_large", "steps_offset": 1}),
                                          ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 0.9})])
def test_sampling_agrees_with_cpu_for_every_option(method, extra):
    sched = Schedule.from_name("linear", 40)
    cpu, gpu = _pair(seed=1)
    kw = dict(method=method, num_steps=3, clip_sample=True, **extra)
    want, traj_c = sample(cpu, sched, (2, 1, 4, 4), rng=np.random.default_rng(5), return_trajectory=True, **kw)
    got, traj_g = sample(gpu, sched, (2, 1, 4, 4), rng=np.random.default_rng(5), return_trajectory=True,
                         progress=True, **kw)  # backend from the model: "cuda"
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    # noise is drawn on the host on every backend: the same seed gives the same samples
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [s["t"] for s in traj_g] == [s["t"] for s in traj_c]
    for a, b in zip(traj_g, traj_c):
        np.testing.assert_allclose(a["x0_pred"], b["x0_pred"], rtol=1e-4, atol=1e-4)


def test_any_callable_on_the_cuda_loop_and_learned_range():
    sched = Schedule.from_name("linear", 30)
    rng = np.random.default_rng(2)
    calls = []

    def model(x, t):  # a plain callable: called with NumPy arrays on every backend
        calls.append(type(x))
        return np.concatenate([0.1 * x, np.tanh(x)], axis=1)  # eps and the learned-range interpolation v

    kw = dict(method="ddpm", num_steps=4, variance_type="learned_range", clip_sample=False)
    want = sample(model, sched, (2, 1, 4, 4), rng=np.random.default_rng(3), backend="cpu", **kw)
    got = sample(model, sched, (2, 1, 4, 4), rng=np.random.default_rng(3), backend="cuda", **kw)
    assert set(calls) == {np.ndarray}
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the step function itself takes device arrays and returns device arrays
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    out = model(x, None)
    z = rng.standard_normal(x.shape).astype(np.float32)
    a = ddpm_step(sched, out, 20, x, prev_t=10, noise=z, variance_type="learned_range", backend="cpu")
    b = ddpm_step(sched, ck.asarray(out), 20, ck.asarray(x), prev_t=10, noise=ck.asarray(z),
                  variance_type="learned_range", backend="cuda")
    assert all(ck.is_array(v) and not isinstance(v, np.ndarray) for v in b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(ck.to_host(v), u, rtol=1e-5, atol=1e-6)


def test_sample_progressive_yields_numpy_on_cuda():
    sched = Schedule.from_name("linear", 20)
    _, gpu = _pair(seed=4)
    steps = list(sample_progressive(gpu, sched, (1, 1, 4, 4), method="ddim", num_steps=2, rng=np.random.default_rng(0)))
    assert [s["prev_t"] for s in steps][-1] == -1
    assert all(isinstance(s["x_t"], np.ndarray) for s in steps)


def test_validation_is_the_same_on_cuda():
    sched = Schedule.from_name("linear", 20)
    _, gpu = _pair(seed=4)
    for bad, err in ((dict(eta=-0.1, method="ddim"), "eta"), (dict(method="ddim", clip_range=0.0), "clip_range"),
                     (dict(method="ddim", final_alpha_cumprod=0.0), "final_alpha_cumprod")):
        with pytest.raises(ValueError, match=err):
            sample(gpu, sched, (1, 1, 4, 4), num_steps=2, rng=np.random.default_rng(0), **bad)
    x_T = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="either"):
        sample(gpu, sched, (1, 1, 4, 4), method="ddim", num_steps=2, x_T=x_T, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        sample(gpu, sched, (1, 1, 4, 4), method="ddpm", num_steps=2, rng="seed")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_cuda_ddim_samples_have_the_exact_moments(pred):
    """The Gaussian oracle (exact denoiser) driven through the cuda loop: the sample moments match the
    moments propagated exactly through DDIM's affine steps, within Z standard errors of n samples."""
    sched = Schedule.from_name("linear", 1000)
    mu, sd = np.array([0.5, -1.0, 0.0, 2.0]), np.array([0.3, 1.0, 2.0, 0.1])
    n, steps = 1500, 10
    oracle = GaussianOracle(sched, mu, sd, pred)
    x = sample(oracle, sched, (n, 4), method="ddim", num_steps=steps, rng=np.random.default_rng(0), backend="cuda",
               clip_sample=False, prediction_type=pred, dtype=np.float64)
    m, v = chain_moments(sched, mu, sd, "ddim", inference_timesteps(1000, steps))
    assert np.all(np.abs(x.mean(0) - m) < Z * np.sqrt(v / n)), (x.mean(0), m)
    assert np.all(np.abs(x.var(0, ddof=1) - v) < Z * v * np.sqrt(2 / (n - 1))), (x.var(0), v)
    # and the moments are not trivially met: the data's means are far apart in standard errors
    assert np.abs(m - mu).max() < 0.05 and np.ptp(mu) > 10 * Z * np.sqrt(v.max() / n)


# ---------------------------------------------------------------------------------------------------
# class labels, guidance, inpainting, image-to-image: cuda agrees with cpu


def _cond_pair(seed=5):
    cpu, gpu = _pair(seed=seed, num_classes=3)
    return cpu, gpu


def test_conditional_unet_and_guided_sampling_agree_with_cpu():
    from difnumpy import Trainer
    cpu, gpu = _cond_pair()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    y = np.array([2, 0])
    out_c, cache_c = cpu.forward(x, np.array([4, 30]), class_labels=y)
    out_g, cache_g = gpu.forward(x, np.array([4, 30]), class_labels=y)
    np.testing.assert_allclose(out_g, out_c, rtol=1e-4, atol=1e-5)
    dout = rng.standard_normal(out_c.shape).astype(np.float32)
    g_c, g_g = cpu.backward(dout, cache_c), gpu.backward(dout, cache_g)
    np.testing.assert_allclose(g_g["label_emb.w"], g_c["label_emb.w"], rtol=1e-3, atol=1e-5)
    sched = Schedule.from_name("linear", 40)
    kw = dict(method="ddim", num_steps=3, class_labels=y, guidance_scale=3.0, guidance_rescale=0.5)
    want = sample(cpu, sched, (2, 1, 4, 4), rng=np.random.default_rng(1), **kw)
    got = sample(gpu, sched, (2, 1, 4, 4), rng=np.random.default_rng(1), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # image-to-image
    kw = dict(method="ddpm", num_steps=4, x_init=x, strength=0.5, class_labels=y)
    np.testing.assert_allclose(sample(gpu, sched, x.shape, rng=np.random.default_rng(2), **kw),
                               sample(cpu, sched, x.shape, rng=np.random.default_rng(2), **kw), rtol=1e-4, atol=1e-4)
    # a training step with labels and label dropout
    losses = []
    for m in (cpu.copy(), gpu.copy()):
        tr = Trainer(m, sched, rng=9, label_dropout=0.5, lr=1e-2)
        losses.append(tr.step(x, y))
        losses.append(tr.step(x, y))
    assert losses[2:] == pytest.approx(losses[:2], rel=1e-5)


@pytest.mark.parametrize("w_r", [0.0, 3.0])
def test_inpainting_agrees_with_cpu(w_r):
    from difnumpy.samplers import inpaint
    cpu, gpu = _cond_pair()
    x = np.random.default_rng(3).standard_normal((2, 1, 4, 4)).astype(np.float32)
    y = np.array([2, 0])
    sched = Schedule.from_name("linear", 40)
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[..., :2, :] = 1
    kw = dict(num_steps=4, jump_length=2, jump_n_sample=2, class_labels=y, guidance_scale=2.0, reconstruction_guidance=w_r)
    a = inpaint(cpu, sched, x, mask, rng=np.random.default_rng(4), **kw)
    b = inpaint(gpu, sched, x, mask, rng=np.random.default_rng(4), **kw)
    np.testing.assert_array_equal(b[..., :2, :], x[..., :2, :])  # the known half exact
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
