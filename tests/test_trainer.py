"""loss_and_grads and Trainer: the DDPM loss, its gradients, divergence handling, determinism."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from difnumpy.diffusion import get_velocity, q_sample
from difnumpy.nn.optim import AdamW
from difnumpy.schedules import Schedule
from difnumpy.nn.unet import UNet
from difnumpy.trainer import DivergenceError, Trainer, loss_and_grads


class PixelLinear:
    """Tiny stand-in with the UNet's training API: out = w[c] * x + b[c] + tw[c] * t / 1000."""

    def __init__(self, channels=1, dtype="float64", backend="cpu", seed=0):
        self.config = {"channels": channels, "dtype": np.dtype(dtype).name, "backend": backend, "seed": seed}
        self.backend = backend
        rng = np.random.default_rng(seed)
        self.params = {k: rng.standard_normal(channels).astype(dtype) for k in ("w", "b", "tw")}
        self.poison_output = False
        self.poison_grads = False

    def forward(self, x, t):
        p = self.params
        tt = (np.asarray(t, dtype=x.dtype) / 1000).reshape(-1, 1, 1, 1)
        out = p["w"][:, None, None] * x + p["b"][:, None, None] + p["tw"][:, None, None] * tt
        if self.poison_output:
            out = out * np.nan
        return out, (x, tt)

    def backward(self, dout, cache):
        x, tt = cache
        g = {"w": (dout * x).sum(axis=(0, 2, 3)), "b": dout.sum(axis=(0, 2, 3)),
             "tw": (dout * tt).sum(axis=(0, 2, 3))}
        if self.poison_grads:
            g["b"] = g["b"] + np.inf
        return g

    def __call__(self, x, t):
        return self.forward(x, t)[0]


@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_name("linear", 100)


def _data(n=8, c=1, hw=4, dtype=np.float64, seed=5):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, c, hw, hw)).astype(dtype)


# ---- loss_and_grads -----------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_matches_manual_computation(schedule, prediction_type):
    model = PixelLinear(channels=2)
    x0 = _data(c=2)
    loss, grads = loss_and_grads(model, schedule, x0, np.random.default_rng(7), prediction_type)
    # redo by hand with the documented draw order: t first, then eps
    rng = np.random.default_rng(7)
    t = rng.integers(0, schedule.num_timesteps, size=x0.shape[0])
    eps = rng.standard_normal(x0.shape)
    x_t = q_sample(schedule, x0, t, noise=eps)
    ab = schedule.alphas_cumprod[t][:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-12)
    target = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[prediction_type]
    if prediction_type == "v_prediction":
        np.testing.assert_allclose(get_velocity(schedule, x0, eps, t), target, rtol=1e-12)
    expected = np.mean((model(x_t, t) - target) ** 2)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert isinstance(loss, float) and set(grads) == {"w", "b", "tw"}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_grads_match_finite_differences(schedule, prediction_type):
    model = PixelLinear(channels=2)
    x0 = _data(c=2)
    _, grads = loss_and_grads(model, schedule, x0, np.random.default_rng(3), prediction_type)
    h = 1e-6
    for k, p in model.params.items():
        for i in range(p.size):
            old = p.flat[i]
            p.flat[i] = old + h
            lp, _ = loss_and_grads(model, schedule, x0, np.random.default_rng(3), prediction_type)
            p.flat[i] = old - h
            lm, _ = loss_and_grads(model, schedule, x0, np.random.default_rng(3), prediction_type)
            p.flat[i] = old
            num = (lp - lm) / (2 * h)
            assert abs(num - grads[k].flat[i]) <= 1e-6 * max(1.0, abs(num)), (k, i, num, grads[k].flat[i])


def test_loss_and_grads_argument_checks(schedule):
    model = PixelLinear()
    x0 = _data()
    with pytest.raises(ValueError, match="prediction_type"):
        loss_and_grads(model, schedule, x0, np.random.default_rng(0), "x0")
    with pytest.raises(TypeError, match="rng"):
        loss_and_grads(model, schedule, x0, 0)
    with pytest.raises(TypeError, match="schedule"):
        loss_and_grads(model, "linear", x0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN"):
        loss_and_grads(model, schedule, x0 * np.nan, np.random.default_rng(0))
    with pytest.raises(TypeError, match="x0"):
        loss_and_grads(model, schedule, x0.tolist(), np.random.default_rng(0))


# ---- Trainer ------------------------------------------------------------------------------------

def test_loss_decreases_on_tiny_problem(schedule):
    model = PixelLinear(channels=1, seed=1)
    trainer = Trainer(model, schedule, lr=3e-2, rng=0, ema_decay=0.9)
    x0 = _data(n=16)
    losses = [trainer.step(x0) for _ in range(150)]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:5])
    assert trainer.step_count == 150 and trainer.last_loss == losses[-1]
    # EMA model: same class/config, its own arrays, close to (not equal to) the trained params
    assert type(trainer.ema_model) is PixelLinear
    assert trainer.ema_model.params["w"] is trainer.ema.params["w"]
    assert trainer.ema_model.params["w"] is not model.params["w"]
    assert not np.array_equal(trainer.ema_model.params["w"], model.params["w"])
    np.testing.assert_allclose(trainer.ema_model.params["w"], model.params["w"], atol=0.2)


def test_same_seed_same_losses_bit_for_bit(schedule):
    runs = []
    for _ in range(2):
        trainer = Trainer(PixelLinear(channels=2), schedule, lr=1e-2, rng=np.random.default_rng(42),
                          warmup_steps=3, optimizer="adamw", weight_decay=0.01)
        losses = [trainer.step(_data(c=2)) for _ in range(10)]
        runs.append((losses, {k: v.copy() for k, v in trainer.model.params.items()},
                     {k: v.copy() for k, v in trainer.ema.params.items()}))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k])
        np.testing.assert_array_equal(runs[0][2][k], runs[1][2][k])
    other = Trainer(PixelLinear(channels=2), schedule, lr=1e-2, rng=np.random.default_rng(43))
    assert [other.step(_data(c=2)) for _ in range(3)] != runs[0][0][:3]


@pytest.mark.parametrize("poison", ["poison_output", "poison_grads"])
def test_nonfinite_raises_and_leaves_everything_untouched(schedule, poison):
    model = PixelLinear(channels=2)
    trainer = Trainer(model, schedule, lr=1e-2, rng=1)
    x0 = _data(c=2)
    for _ in range(3):
        trainer.step(x0)
    before = tuple({k: v.copy() for k, v in d.items()}
                   for d in (model.params, trainer.ema.params, trainer.optimizer.m, trainer.optimizer.v))
    setattr(model, poison, True)
    with pytest.raises(FloatingPointError, match="non-finite") as info:
        trainer.step(x0)
    assert isinstance(info.value, DivergenceError)
    assert trainer.step_count == 3
    after = (model.params, trainer.ema.params, trainer.optimizer.m, trainer.optimizer.v)
    for b, a in zip(before, after):
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])
    setattr(model, poison, False)
    assert math.isfinite(trainer.step(x0)) and trainer.step_count == 4


def test_trainer_warmup_clip_and_options(schedule):
    model = PixelLinear(channels=1)
    trainer = Trainer(model, schedule, lr=1e-2, rng=0, warmup_steps=4, grad_clip=1e-3, optimizer="adamw",
                      weight_decay=0.1, ema_decay=0.0)
    assert isinstance(trainer.optimizer, AdamW) and trainer.optimizer.weight_decay == 0.1
    lrs = []
    for _ in range(5):
        trainer.step(_data())
        lrs.append(trainer.last_lr)
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
    assert trainer.last_grad_norm > 1e-3  # norm before clipping is reported
    for k in model.params:  # ema_decay=0: the EMA model follows the model exactly
        np.testing.assert_array_equal(trainer.ema_model.params[k], model.params[k])
    hp = trainer.hparams()
    assert hp["optimizer"] == "adamw" and hp["warmup_steps"] == 4 and hp["lr"] == 1e-2
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(model, schedule, optimizer="sgd")
    with pytest.raises(ValueError, match="grad_clip"):
        Trainer(model, schedule, grad_clip=0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        Trainer(model, schedule, prediction_type="eps")
    with pytest.raises(TypeError, match="schedule"):
        Trainer(model, None)
    with pytest.raises(ValueError, match="warmup_steps"):
        Trainer(model, schedule, warmup_steps=-1)


# ---- with the real (tiny) U-Net -----------------------------------------------------------------

def _tiny_unet(seed=0, dtype=np.float32):
    from difnumpy.nn.unet import UNet

    # NumPy kernels for the network (no compile time); the optimizer runs the numba adam kernel.
    return UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=2,
                dtype=dtype, rng=seed, backend="numpy")


def test_unet_loss_decreases_and_ema_model_samples(schedule):
    x0 = np.random.default_rng(0).uniform(-1, 1, size=(8, 1, 8, 8)).astype(np.float32)
    trainer = Trainer(_tiny_unet(), schedule, lr=2e-3, rng=0, ema_decay=0.9, backend="cpu")
    losses = [trainer.step(x0) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    out = trainer.ema_model(x0[:2], np.array([0, 99]))
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    assert trainer.ema_model.config == trainer.model.config
    assert trainer.model.params["stem.w"].dtype == np.float32


def test_unet_same_seed_bit_for_bit_and_nan_refused(schedule):
    x0 = np.random.default_rng(1).uniform(-1, 1, size=(4, 1, 8, 8)).astype(np.float32)
    runs = []
    for _ in range(2):
        trainer = Trainer(_tiny_unet(seed=3), schedule, lr=1e-3, rng=11, warmup_steps=2, backend="cpu")
        runs.append(([trainer.step(x0) for _ in range(3)], trainer))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1].model.params:
        np.testing.assert_array_equal(runs[0][1].model.params[k], runs[1][1].model.params[k])
    trainer = runs[0][1]
    trainer.model.params["stem.w"][0, 0, 0, 0] = np.nan  # poisons the output
    before = {k: v.copy() for k, v in trainer.model.params.items()}
    ema_before = {k: v.copy() for k, v in trainer.ema.params.items()}
    with pytest.raises(DivergenceError, match="non-finite loss"):
        trainer.step(x0)
    assert trainer.step_count == 3
    for k in before:
        np.testing.assert_array_equal(trainer.model.params[k], before[k])  # NaN == NaN here
        np.testing.assert_array_equal(trainer.ema.params[k], ema_before[k])


def test_cuda_trainer_without_gpu_is_a_clear_runtime_error():
    # a fresh interpreter without NUMBA_ENABLE_CUDASIM: backend="cuda" must refuse, naming the way out
    code = textwrap.dedent("""
        import numba.cuda
        if numba.cuda.is_available():
            print("HAS_GPU")
        else:
            from difnumpy import Schedule, Trainer, UNet
            model = UNet(base_channels=4, channel_mults=(1,), groups=2, rng=0, backend="cpu")
            try:
                Trainer(model, Schedule.from_name("linear", 10), backend="cuda")
            except RuntimeError as e:
                print("RUNTIMEERROR", e)
            else:
                print("NO ERROR")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "DIFNUMPY_CUDA_COMPILE_ONLY")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "HAS_GPU" in r.stdout:
        pytest.skip("a real GPU is present")
    assert "RUNTIMEERROR" in r.stdout, r.stdout + r.stderr
    assert "backend='cuda'" in r.stdout and "NUMBA_ENABLE_CUDASIM" in r.stdout


# ---------------------------------------------------------------------------------------------------
# reproducible across thread counts (the cpu backend's reductions do not depend on them)


def _five_steps(threads, tmp_path=None, resume_at=None, resume_threads=None):
    import numba

    from difnumpy.checkpoint import load_checkpoint, save_checkpoint

    x = np.random.default_rng(1).uniform(-1, 1, (5, 24, 1, 8, 8)).astype(np.float32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        tr = Trainer(UNet(base_channels=8, channel_mults=(1, 2), groups=4, rng=0, backend="cpu"),
                     Schedule.from_name("cosine", 1000), lr=2e-3, rng=0, ema_decay=0.9)
        for i in range(5):
            if i == resume_at:
                path = tmp_path / "mid.npz"
                save_checkpoint(path, tr)
                numba.set_num_threads(resume_threads)
                tr = load_checkpoint(path)
            tr.step(x[i])
    finally:
        numba.set_num_threads(old)
    opt = tr.optimizer.state_dict()
    return {**{f"p/{k}": v for k, v in tr.model.params.items()}, **{f"e/{k}": v for k, v in tr.ema.params.items()},
            **{k: v for k, v in opt.items() if isinstance(v, np.ndarray)}}


def test_same_seed_same_bits_with_one_and_two_threads(tmp_path):
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    from difnumpy.kernels import cpu
    assert cpu.batch_shares(24) is not None  # the batch is split into shares: the path under test
    one, two = _five_steps(1), _five_steps(2)
    assert set(one) == set(two)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)
    # a run resumed with another thread count continues exactly
    resumed = _five_steps(1, tmp_path, resume_at=3, resume_threads=2)
    for k in one:
        np.testing.assert_array_equal(resumed[k], one[k], err_msg=k)
