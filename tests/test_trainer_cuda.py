"""Trainer(backend="cuda"): the trainer's one step on device arrays against the CPU Trainer, transfers, resume.

Runs under numba's CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported); skipped
as a whole when neither a GPU nor the simulator is usable (the no-GPU error is checked in test_trainer.py).
The simulator runs one Python thread per CUDA thread, so the U-Net is a one-level one (1.8k parameters)
on 4x4 images, and every test takes as few steps as it can.
"""
import sys

import numpy as np
import pytest

from difnumpy.kernels import get_backend

try:
    ck = get_backend("cuda")
except RuntimeError as e:  # no GPU, no numba-cuda, and the simulator is off
    pytest.skip(f"CUDA backend not usable here ({e})", allow_module_level=True)

import difnumpy.trainer as trainer_mod  # noqa: E402
from difnumpy import Schedule, Trainer, UNet  # noqa: E402
from difnumpy.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from difnumpy.nn.optim import AdamW  # noqa: E402
from difnumpy.trainer import DivergenceError  # noqa: E402

from numba import cuda as nbcuda  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]

# warmup over 2 steps and a small clipping bound: both are active in a 3-step run (checked below)
HP = dict(lr=1e-2, ema_decay=0.9, warmup_steps=2, grad_clip=0.5, weight_decay=0.1)


@pytest.fixture(autouse=True, scope="module")
def _fast_thread_switching():
    # the simulator's blocks are Python threads meeting at barriers: switch the GIL often
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_name("linear", 50)


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).uniform(-1, 1, size=(3, 2, 1, 4, 4)).astype(np.float32)


def _model(seed=3):
    model = UNet(base_channels=4, channel_mults=(1,), groups=2, rng=seed, backend="cpu")
    # non-zero everywhere (the zero-initialised convs would hide errors in their gradients)
    rng = np.random.default_rng(seed + 100)
    for p in model.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.3
    return model


def _trainer(backend, seed=7, **kw):
    return Trainer(_model(), Schedule.from_name("linear", 50), rng=np.random.default_rng(seed), backend=backend,
                   **{**HP, **kw})


def _state(tr):
    """NumPy copies of every array of the trainer's state (copied down from the device on cuda)."""
    opt = tr.optimizer.state_dict()
    return {"params": {k: v.copy() for k, v in tr.model.host_params().items()},
            "ema": {k: v.copy() for k, v in tr.ema_model.host_params().items()},
            "m": {k: opt[f"m/{k}"] for k in tr.model.params},
            "v": {k: opt[f"v/{k}"] for k in tr.model.params}}


def _assert_state_close(got, want):
    # float32 rounding differs between the device kernels and the CPU ones: relative to each array's scale
    for part in want:
        for k, w in want[part].items():
            np.testing.assert_allclose(got[part][k], w, rtol=1e-4, atol=1e-5 * max(float(np.abs(w).max()), 1e-12),
                                       err_msg=f"{part}/{k}")


def _assert_state_equal(got, want):
    for part in want:
        for k, w in want[part].items():
            np.testing.assert_array_equal(got[part][k], w, err_msg=f"{part}/{k}")


def _assert_scalars_equal(tr, ref):
    assert tr.step_count == ref.step_count
    assert tr.optimizer.lr == ref.optimizer.lr and tr.last_lr == ref.last_lr
    assert tr.ema.num_updates == ref.ema.num_updates
    assert tr.rng.bit_generator.state == ref.rng.bit_generator.state


# ---------------------------------------------------------------------------------------------------
# the cuda step is the cpu step


@pytest.mark.parametrize("prediction_type,optimizer", [("epsilon", "adam"), ("sample", "adamw"),
                                                        ("v_prediction", "adam")])
def test_cuda_trainer_matches_cpu_trainer(data, prediction_type, optimizer):
    cpu = _trainer("cpu", prediction_type=prediction_type, optimizer=optimizer)
    gpu = _trainer("cuda", prediction_type=prediction_type, optimizer=optimizer)
    assert isinstance(gpu.optimizer, AdamW) == (optimizer == "adamw")
    lrs, clipped = [], []
    for i in range(3):
        want = cpu.step(data[i])
        got = gpu.step(data[i])
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-5), f"loss of step {i + 1}"
        assert gpu.last_grad_norm == pytest.approx(cpu.last_grad_norm, rel=1e-5), f"grad norm of step {i + 1}"
        assert gpu.last_lr == cpu.last_lr
        lrs.append(cpu.last_lr)
        clipped.append(cpu.last_grad_norm > HP["grad_clip"])
    # the options under test were active: warmup (the lr rose) and clipping (some norm above the bound)
    assert lrs[0] < lrs[-1] == HP["lr"] and any(clipped)
    _assert_scalars_equal(gpu, cpu)
    _assert_state_close(_state(gpu), _state(cpu))


# ---------------------------------------------------------------------------------------------------
# transfers: the state lives on the device; a step moves only the batch, eps and two floats


class _TransferLog:
    """Counts host->device and device->host copies of numba.cuda (real GPU or simulator)."""

    def __init__(self, monkeypatch):
        self.up, self.down = [], []
        dev_cls = type(nbcuda.device_array((1,), dtype=np.float32))
        to_device, copy_to_host, copy_to_device = nbcuda.to_device, dev_cls.copy_to_host, dev_cls.copy_to_device

        def logged_to_device(obj, *a, **kw):
            self.up.append(np.asarray(obj).nbytes)
            return to_device(obj, *a, **kw)

        def logged_copy_to_host(arr, *a, **kw):
            self.down.append(int(arr.nbytes))
            return copy_to_host(arr, *a, **kw)

        def logged_copy_to_device(arr, ary, *a, **kw):
            if isinstance(ary, np.ndarray):  # host to device (device-to-device copies stay on the device)
                self.up.append(ary.nbytes)
            return copy_to_device(arr, ary, *a, **kw)

        monkeypatch.setattr(nbcuda, "to_device", logged_to_device)
        monkeypatch.setattr(dev_cls, "copy_to_host", logged_copy_to_host)
        monkeypatch.setattr(dev_cls, "copy_to_device", logged_copy_to_device)

    def clear(self):
        self.up.clear()
        self.down.clear()


def _ids(tr):
    return {name: {k: id(a) for k, a in arrays.items()}
            for name, arrays in (("params", tr.model.params), ("m", tr.optimizer.m), ("v", tr.optimizer.v),
                                 ("ema", tr.ema.params))}


def test_cuda_state_lives_on_the_device_and_a_step_copies_none_of_it(monkeypatch, data):
    tr = _trainer("cuda")
    for arrays in (tr.model.params, tr.ema_model.params, tr.optimizer.m, tr.optimizer.v):
        assert all(ck.is_array(a) and not isinstance(a, np.ndarray) for a in arrays.values())
    param_bytes = sum(int(p.nbytes) for p in tr.model.params.values())
    batch_bytes = data[0].nbytes
    ids = _ids(tr)
    log = _TransferLog(monkeypatch)
    before = tr.model.host_params()
    log.clear()
    tr.step(data[0])
    # up: the batch, eps and small per-sample arrays (embedding, coefficients); down: a few scalars' partials
    assert sum(log.up) < 4 * batch_bytes + param_bytes / 4, log.up
    assert sum(log.down) < param_bytes / 4, log.down
    assert _ids(tr) == ids  # updated in place: the same device arrays
    after = tr.model.host_params()
    assert any(not np.array_equal(after[k], before[k]) for k in before)  # and they did change
    tr.step(data[1])
    assert _ids(tr) == ids


# ---------------------------------------------------------------------------------------------------
# checkpoints


def test_cuda_checkpoint_resume_matches_straight_run(tmp_path, data):
    straight = _trainer("cuda")
    want = [straight.step(data[i]) for i in range(2)]

    tr = _trainer("cuda")
    losses = [tr.step(data[0])]
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, tr)  # copies the device state of step 1 down
    loaded = load_checkpoint(path)
    assert loaded.backend == "cuda" and loaded.step_count == 1
    _assert_state_equal(_state(loaded), _state(tr))
    losses.append(loaded.step(data[1]))  # must start from the uploaded state

    assert losses == want  # the simulator and the GPU kernels are deterministic (no atomics): bit for bit
    _assert_scalars_equal(loaded, straight)
    _assert_state_equal(_state(loaded), _state(straight))

    # the same file resumes on the CPU, to float32 tolerance
    on_cpu = load_checkpoint(path, backend="cpu")
    assert on_cpu.step(data[1]) == pytest.approx(want[1], rel=1e-5)
    _assert_state_close(_state(on_cpu), _state(straight))


# ---------------------------------------------------------------------------------------------------
# divergence, replaced parameters


def test_cuda_divergence_updates_nothing(monkeypatch, data):
    cpu, gpu = _trainer("cpu"), _trainer("cuda")
    key = "stem.w"
    for tr in (cpu, gpu):
        bad = tr.model.host_params()
        bad = {k: v.copy() for k, v in bad.items()}
        bad[key][0, 0, 0, 0] = np.nan  # poisons the output, hence the loss
        tr.model.params[key] = tr.model.kernels.asarray(bad[key])
    before = _state(gpu)
    for tr in (cpu, gpu):
        with pytest.raises(DivergenceError, match="non-finite loss .* at step 1"):
            tr.step(data[0])
    _assert_state_equal(_state(gpu), before)  # NaN compares equal here
    for tr in (cpu, gpu):
        tr.model.params[key] = tr.model.kernels.asarray(_model().host_params()[key])
    # a non-finite gradient norm (forced) is refused as well
    before = _state(gpu)
    monkeypatch.setattr(trainer_mod, "clip_grad_norm", lambda grads, c, backend: float("inf"))
    for tr in (cpu, gpu):
        with pytest.raises(DivergenceError, match="non-finite gradient norm .* at step 1"):
            tr.step(data[1])
        assert tr.step_count == 0 and tr.last_loss is None and tr.ema.num_updates == 0
    monkeypatch.undo()
    _assert_state_equal(_state(gpu), before)
    # had either refused step changed the params, moments, EMA or counters, this step would differ
    assert gpu.step(data[2]) == pytest.approx(cpu.step(data[2]), rel=1e-5)
    _assert_scalars_equal(gpu, cpu)
    _assert_state_close(_state(gpu), _state(cpu))


def test_cuda_replaced_params_are_picked_up(data):
    cpu, gpu = _trainer("cpu"), _trainer("cuda")
    new = {k: v * 0.5 for k, v in _model(seed=11).params.items()}
    for tr in (cpu, gpu):
        tr.model.set_params(new)  # replaces the params dict: picked up at the next step
        tr.ema_model.set_params(new)
    assert gpu.step(data[0]) == pytest.approx(cpu.step(data[0]), rel=1e-5)
    _assert_scalars_equal(gpu, cpu)
    _assert_state_close(_state(gpu), _state(cpu))


def test_cuda_trainer_refuses_models_it_cannot_move(schedule):
    class Linear:  # the training API, but no settable backend
        config = {}

        def __init__(self):
            self.params = {"w": np.ones(3, np.float32)}

        def forward(self, x, t):
            return x, None

        def backward(self, dout, cache):
            return {"w": np.zeros(3, np.float32)}

    with pytest.raises(TypeError, match="settable .backend"):
        Trainer(Linear(), schedule, backend="cuda")


def test_trainer_backend_moves_the_model(schedule):
    model = _model()
    want = model.host_params()
    tr = Trainer(model, schedule, backend="cuda", rng=0)
    assert model.backend == "cuda" and tr.backend == "cuda"
    for k, v in model.host_params().items():
        np.testing.assert_array_equal(v, want[k])
