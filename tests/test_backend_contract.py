"""The backend contract (ARCHITECTURE.md, "Backends"): every backend provides the whole API of
``difnumpy.kernels.api.BACKEND_API`` and every function agrees with its NumPy twin.

One table of cases runs over every backend: "numpy" (the twins against themselves, which checks the
cases), "cpu" (numba) and "cuda" (under numba's CUDA simulator in CI). Shapes are tiny for the simulator.
"""
import sys

import numpy as np
import pytest

from difnumpy.kernels import BACKENDS, cuda_available, get_backend
from difnumpy.kernels import reference as ref
from difnumpy.kernels.api import BACKEND_API, missing_api

pytestmark = [pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]


def _backends():
    out = []
    for name in BACKENDS:
        marks = [] if name != "cuda" or cuda_available() else [pytest.mark.skip(reason="no GPU / simulator")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(autouse=True, scope="module")
def _fast_thread_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)  # the CUDA simulator's blocks are Python threads meeting at barriers
    yield
    sys.setswitchinterval(old)


def _r(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dt)


def _cases(rng, dt):
    """name -> (args, in_place_index or None). Host arrays; each backend gets native copies."""
    N, C, H, W, F = 2, 4, 4, 4, 3
    x = _r(rng, (N, C, H, W), dt)
    w3 = _r(rng, (F, C, 3, 3), dt, 0.3)
    b = _r(rng, (F,), dt)
    dout3 = _r(rng, (N, F, H, W), dt)
    gamma, beta = _r(rng, (C,), dt) + 1, _r(rng, (C,), dt)
    out, mean, rstd = ref.group_norm_silu_forward(x, gamma, beta, 2, 1e-5, True)
    m = _r(rng, (N, 5), dt)
    coef = rng.standard_normal((N, 5))
    lin_x, lin_w, lin_b = _r(rng, (N, 6), dt), _r(rng, (5, 6), dt), _r(rng, (5,), dt)
    p = _r(rng, (3, 4), dt)
    return {
        "q_sample": ((m, _r(rng, (N, 5), dt), rng.uniform(0, 1, N), rng.uniform(0, 1, N)), None),
        "sampler_update": ((m, _r(rng, (N, 5), dt), _r(rng, (N, 5), dt), coef, -np.ones(N), np.ones(N)), None),
        "conv2d_forward": ((x, w3, b, 1, 1), None),
        "conv2d_backward_input": ((dout3, w3, x.shape, 1, 1), None),
        "conv2d_backward_weight": ((dout3, x, w3.shape, 1, 1), None),
        "group_norm_silu_forward": ((x, gamma, beta, 2, 1e-5, True), None),
        "group_norm_silu_backward": ((_r(rng, x.shape, dt), x, gamma, beta, mean, rstd, 2, True), None),
        "linear_forward": ((lin_x, lin_w, lin_b), None),
        "linear_backward": ((_r(rng, (N, 5), dt), lin_x, lin_w), None),
        "silu_forward": ((x,), None),
        "silu_backward": ((_r(rng, x.shape, dt), x), None),
        "add_": ((x.copy(), _r(rng, x.shape, dt)), 0),
        "axpy_": ((x.copy(), _r(rng, x.shape, dt), 0.37), 0),
        "scale_": ((x.copy(), -1.7), 0),
        "add_channel_bias_": ((x.copy(), _r(rng, (N, C), dt)), 0),
        "blend_": ((x.copy(), _r(rng, x.shape, dt), (rng.uniform(size=x.shape) < 0.5).astype(dt)), 0),
        "sum_hw": ((x,), None),
        "embedding_forward": ((_r(rng, (5, 3), dt), np.array([4, 0, 4])), None),
        "embedding_backward": ((_r(rng, (3, 7), dt), np.array([2, 0, 2]), 4), None),
        "sumsq": ((x,), None),
        "mse_loss": ((x, _r(rng, x.shape, dt)), None),
        "upsample_nearest2x_forward": ((x,), None),
        "upsample_nearest2x_backward": ((_r(rng, (N, C, 2 * H, 2 * W), dt),), None),
        "concat_channels": (([x, _r(rng, (N, 2, H, W), dt)],), None),
        "split_channels": ((_r(rng, (N, 6, H, W), dt), (4, 2)), None),
        "adam_update": ((p.copy(), _r(rng, p.shape, dt), np.abs(_r(rng, p.shape, dt)), np.abs(_r(rng, p.shape, dt)),
                         1e-2, 0.9, 0.999, 1e-8, 0.01, 3), (0, 2, 3)),
        "ema_update": ((p.copy(), _r(rng, p.shape, dt), 0.9), 0),
        # the array functions
        "asarray": ((x,), None),
        "to_host": ((x,), None),
        "copy": ((x,), None),
        "copy_into": ((np.zeros_like(x), x), 0),
        "zeros": (((2, 3), dt), None),
        "is_array": ((x,), None),
    }


def _native(kern, a):
    if isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64):
        return kern.asarray(a)
    if isinstance(a, list):
        return [_native(kern, v) for v in a]
    return a


def _host(kern, a):
    if isinstance(a, (tuple, list)):
        return type(a)(_host(kern, v) for v in a)
    if isinstance(a, (float, int, bool, np.floating, np.bool_)) or a is None:
        return a
    return np.asarray(kern.to_host(a))


def test_every_case_is_an_api_function_and_every_function_has_a_case():
    cases = _cases(np.random.default_rng(0), np.float64)
    assert set(cases) == set(BACKEND_API)


@pytest.mark.parametrize("backend", _backends())
def test_backend_provides_the_whole_api(backend):
    assert missing_api(get_backend(backend)) == []


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", _backends())
def test_backend_agrees_with_the_twins(backend, dt):
    kern = get_backend(backend)
    tol = dict(rtol=2e-5, atol=2e-5) if dt == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for name, (args, in_place) in _cases(np.random.default_rng(1), dt).items():
        want_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        want = getattr(ref, name)(*want_args)
        nat = [_native(kern, a) for a in args]
        got = getattr(kern, name)(*nat)
        if name == "is_array":
            assert got is True and kern.is_array(np.zeros(1)) == (backend != "cuda"), name
            continue
        if in_place is not None:
            idx = in_place if isinstance(in_place, tuple) else (in_place,)
            for i in idx:
                np.testing.assert_allclose(_host(kern, nat[i]), want_args[i], **tol, err_msg=f"{backend} {name}[{i}]")
            if name in ("add_", "axpy_", "scale_", "add_channel_bias_", "blend_", "copy_into"):
                assert got is nat[0], f"{name} must return its first argument"
            continue
        got, want = _host(kern, got), _host(ref, want)
        if isinstance(want, tuple):
            assert isinstance(got, tuple) and len(got) == len(want), name
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, **tol, err_msg=f"{backend} {name}")
        else:
            np.testing.assert_allclose(got, want, **tol, err_msg=f"{backend} {name}")
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and got.shape == want.shape, name


def test_the_contract_check_can_fail():
    # a backend missing a function, or computing another value, is caught by the same code
    import types
    broken = types.SimpleNamespace(**{n: getattr(ref, n) for n in BACKEND_API if n != "sum_hw"})
    assert missing_api(broken) == ["sum_hw"]
    a = np.ones((1, 2, 2, 2))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(ref.sum_hw(a) + 1e-6, ref.sum_hw(a), rtol=1e-10, atol=1e-12)
