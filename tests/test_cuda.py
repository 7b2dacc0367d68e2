"""The CUDA backend (difnumpy.kernels.cuda) against its NumPy twins and the CPU path.

Runs under numba's CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is imported,
see .ci/run); skipped as a whole when neither a GPU nor the simulator is usable. The simulator runs one
Python thread per CUDA thread, so every shape here is tiny. Tests marked ``gpu`` need a real GPU. Every
registered kernel is compiled for real hardware by tests/test_cuda_ptx.py.
"""
import ast
import copy as copy_mod
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from difnumpy.kernels import get_backend
from difnumpy.kernels import reference as ref
from difnumpy.kernels.api import BACKEND_API, missing_api

try:
    ck = get_backend("cuda")
except RuntimeError as e:  # no GPU, no numba-cuda, and the simulator is off
    pytest.skip(f"CUDA backend not usable here ({e})", allow_module_level=True)

from difnumpy import UNet  # noqa: E402
from difnumpy.kernels.cuda import _runtime as rt  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning"),
]

needs_gpu = pytest.mark.skipif(ck.SIMULATOR, reason="needs a real NVIDIA GPU (the CUDA simulator is on)")
DTYPES = [np.float32, np.float64]
PACKAGE = Path(ck.__file__).parent


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
# availability, the API, errors


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


def test_package_provides_exactly_the_backend_api():
    assert missing_api(ck) == []
    assert ck.__all__[:len(BACKEND_API)] == list(BACKEND_API)
    assert all(hasattr(ck, name) for name in ck.__all__)
    # every public function of the family modules is an API function (no private extras sneak out)
    for mod in ("elementwise", "conv", "groupnorm", "linear", "layout", "optim"):
        tree = ast.parse((PACKAGE / f"{mod}.py").read_text())
        public = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
                  and not n.name.startswith("build_")}
        assert public <= set(BACKEND_API), (mod, public - set(BACKEND_API))


def test_bad_arguments_name_the_argument(rng):
    f32 = np.float32
    x = randn(rng, (1, 2, 3, 3), f32)
    z2 = np.zeros(2, f32)
    with pytest.raises(TypeError, match="w must have dtype float32"):
        ck.conv2d_forward(x, randn(rng, (2, 2, 3, 3), np.float64), z2, 1, 1)
    with pytest.raises(TypeError, match="x must be a numpy ndarray or a numba.cuda device array"):
        ck.conv2d_forward([1.0], x, x, 1, 1)
    with pytest.raises(ValueError, match="b must have shape"):
        ck.conv2d_forward(x, randn(rng, (2, 2, 3, 3), f32), np.zeros(3, f32), 1, 1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ck.conv2d_forward(x, randn(rng, (2, 2, 3, 3), f32), z2, 0, 1)
    with pytest.raises(ValueError, match="dout must have shape"):
        ck.conv2d_backward_input(randn(rng, (1, 2, 2, 2), f32), randn(rng, (2, 2, 3, 3), f32), x.shape, 1, 1)
    with pytest.raises(ValueError, match="w_shape has 3 input channels"):
        ck.conv2d_backward_weight(randn(rng, (1, 2, 3, 3), f32), x, (2, 3, 3, 3), 1, 1)
    with pytest.raises(ValueError, match="groups must divide"):
        ck.group_norm_silu_forward(x, np.ones(2, f32), z2, 3, 1e-5, True)
    with pytest.raises(ValueError, match="gamma must have shape"):
        ck.group_norm_silu_forward(x, np.ones(3, f32), z2, 1, 1e-5, True)
    with pytest.raises(ValueError, match="rstd must have shape"):
        ck.group_norm_silu_backward(x, x, np.ones(2, f32), z2, np.zeros((1, 1), f32), np.zeros((1, 2), f32), 1, True)
    with pytest.raises(ValueError, match="step must be"):
        p = np.zeros(3, f32)
        ck.adam_update(p, p.copy(), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="sqrt_1m_ab must have shape"):
        ck.q_sample(np.zeros((2, 3), f32), np.zeros((2, 3), f32), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="coef must have shape"):
        a = np.zeros((2, 3), f32)
        ck.sampler_update(a, a, a, np.zeros((2, 4)), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="b must have shape"):
        ck.add_(np.zeros(3, f32), np.zeros(4, f32))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        ck.axpy_(np.zeros(3, f32), np.zeros(3), 2.0)
    with pytest.raises(ValueError, match="t must have shape"):
        ck.add_channel_bias_(x, np.zeros((1, 3), f32))
    with pytest.raises(ValueError, match="h must be 4-D"):
        ck.sum_hw(np.zeros((2, 3), f32))
    with pytest.raises(ValueError, match="w must have shape"):
        ck.linear_backward(np.zeros((2, 3), f32), np.zeros((2, 4), f32), np.zeros((3, 5), f32))
    with pytest.raises(ValueError, match="channels .* do not add up"):
        ck.split_channels(x, (1, 2))
    with pytest.raises(ValueError, match=r"xs\[1\] has shape"):
        ck.concat_channels([x, np.zeros((2, 2, 3, 3), f32)])
    with pytest.raises(ValueError, match="src must have the shape of dst"):
        ck.copy_into(ck.zeros((2, 3), f32), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="pred must not be empty"):
        ck.mse_loss(np.zeros(0, f32), np.zeros(0, f32))


# ---------------------------------------------------------------------------------------------------
# the array functions


@pytest.mark.parametrize("dt", DTYPES)
def test_array_functions(dt, rng):
    h = randn(rng, (2, 3), dt)
    d = ck.asarray(h)
    assert ck.is_array(d) and not ck.is_array(h) and d.dtype == dt
    assert ck.asarray(d) is d and ck.asarray(d, dt) is d             # no copy for a native array
    d32 = ck.asarray(d, np.float32 if dt == np.float64 else np.float64)
    np.testing.assert_allclose(ck.to_host(d32), h, rtol=1e-6)
    np.testing.assert_array_equal(ck.to_host(ck.asarray([[1, 2]], dt)), np.array([[1, 2]], dt))
    assert isinstance(ck.to_host(d), np.ndarray) and ck.to_host(h) is h
    np.testing.assert_array_equal(ck.to_host(d), h)
    z = ck.zeros((2, 3), dt)
    assert ck.is_array(z) and z.dtype == dt and z.shape == (2, 3)
    np.testing.assert_array_equal(ck.to_host(z), ref.zeros((2, 3), dt))
    assert ck.zeros(4, dt).shape == (4,)
    c = ck.copy(d)
    assert ck.is_array(c) and c is not d
    ck.scale_(c, 2.0)
    np.testing.assert_array_equal(ck.to_host(d), h)                   # the copy is a new array
    hc = ck.copy(h)
    assert isinstance(hc, np.ndarray) and hc is not h
    np.testing.assert_array_equal(hc, h)
    assert ck.copy_into(z, h) is z                                     # host -> device
    np.testing.assert_array_equal(ck.to_host(z), h)
    ck.copy_into(z, c)                                                 # device -> device
    np.testing.assert_array_equal(ck.to_host(z), 2 * h)
    ck.copy_into(z, h.astype(np.float64 if dt == np.float32 else np.float32))   # cast to dst's dtype
    np.testing.assert_allclose(ck.to_host(z), h, rtol=1e-6)
    host = np.zeros((2, 3), dt)
    assert ck.copy_into(host, c) is host                               # device -> host
    np.testing.assert_array_equal(host, 2 * h)


# ---------------------------------------------------------------------------------------------------
# every compute function of the API against its NumPy twin, with NumPy and with device arrays

COEF_ARGS = {"q_sample": (2, 3), "sampler_update": (3, 4, 5),     # host arrays in the API on every backend
             "embedding_forward": (1,), "embedding_backward": (1,)}
IN_PLACE = {"add_": (0,), "axpy_": (0,), "scale_": (0,), "add_channel_bias_": (0,), "blend_": (0,),
            "adam_update": (0, 2, 3), "ema_update": (0,)}


def api_cases(rng, dt):
    """name -> arguments of one call (tiny shapes), for every compute function of the backend API."""
    def r(*shape):
        return randn(rng, shape, dt)
    x4, gamma, beta = r(2, 4, 3, 3) * 2 + 1, r(4), r(4)
    _, mean, rstd = ref.group_norm_silu_forward(x4, gamma, beta, 2, 1e-5, True)
    w = r(3, 4, 3, 3)
    cx = r(2, 4, 5, 6)
    return {
        "q_sample": (r(3, 7), r(3, 7), rng.uniform(0.1, 1, 3), rng.uniform(0.1, 1, 3)),
        "sampler_update": (r(3, 7), r(3, 7), r(3, 7), rng.standard_normal((3, 5)),
                           np.array([-1.0, -np.inf, -0.5]), np.array([1.0, np.inf, 0.2])),
        "conv2d_forward": (cx, w, r(3), 1, 1),
        "conv2d_backward_input": (r(2, 3, 5, 6), w, cx.shape, 1, 1),
        "conv2d_backward_weight": (r(2, 3, 5, 6), cx, w.shape, 1, 1),
        "group_norm_silu_forward": (x4, gamma, beta, 2, 1e-5, True),
        "group_norm_silu_backward": (r(2, 4, 3, 3), x4, gamma, beta, mean, rstd, 2, True),
        "linear_forward": (r(3, 5), r(4, 5), r(4)),
        "linear_backward": (r(3, 4), r(3, 5), r(4, 5)),
        "silu_forward": (r(2, 3, 4) * 4,),
        "silu_backward": (r(2, 3, 4), r(2, 3, 4) * 4),
        "add_": (r(2, 3), r(2, 3)),
        "axpy_": (r(5), r(5), 0.3),
        "scale_": (r(2, 2, 3), -1.7),
        "add_channel_bias_": (r(2, 3, 2, 2), r(2, 3)),
        "blend_": (r(2, 3, 2, 2), r(2, 3, 2, 2), (rng.uniform(size=(2, 3, 2, 2)) < 0.5).astype(dt)),
        "sum_hw": (r(2, 3, 2, 3),),
        "embedding_forward": (r(5, 3), np.array([4, 0, 4, 2])),
        "embedding_backward": (r(4, 3), np.array([2, 0, 2, 2]), 5),
        "sumsq": (r(4, 5),),
        "mse_loss": (r(2, 1, 3, 3), r(2, 1, 3, 3)),
        "upsample_nearest2x_forward": (r(2, 3, 2, 3),),
        "upsample_nearest2x_backward": (r(2, 3, 4, 6),),
        "concat_channels": ([r(2, 3, 2, 3), r(2, 4, 2, 3), r(2, 1, 2, 3)],),
        "split_channels": (r(2, 8, 2, 3), (3, 4, 1)),
        "adam_update": (r(3, 4), r(3, 4), r(3, 4) * 0.1, np.abs(r(3, 4)) * 0.1, 1e-2, 0.9, 0.999, 1e-8, 0.1, 2),
        "ema_update": (r(7), r(7), 0.9),
    }


COMPUTE = [n for n in BACKEND_API if n not in ("is_array", "asarray", "to_host", "zeros", "copy", "copy_into")]


def test_the_cases_cover_every_compute_function():
    assert sorted(api_cases(np.random.default_rng(0), np.float32)) == sorted(COMPUTE)


def _to_device(name, args):
    out = []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray) and i not in COEF_ARGS.get(name, ()):
            a = ck.asarray(a)
        elif isinstance(a, list):
            a = [ck.asarray(v) for v in a]
        out.append(a)
    return out


def _results(name, args, ret):
    """What a call produced: its return value, and its in-place arguments."""
    if name in IN_PLACE:
        return [ck.to_host(args[i]) for i in IN_PLACE[name]]
    return list(ret) if isinstance(ret, tuple) else [ret]


def _assert_close(name, got, want, dt):
    kw = tol(dt)
    if name == "adam_update" and dt == np.float32:   # float32 arithmetic against the twin's float64
        kw = dict(rtol=2e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, float):
            assert isinstance(g, float), name
            np.testing.assert_allclose(g, w, rtol=1e-6 if dt == np.float32 else 1e-12, err_msg=name)
        else:
            assert g.dtype == dt and g.shape == w.shape, name
            np.testing.assert_allclose(g, w, **kw, err_msg=name)


@pytest.mark.parametrize("on_device", [False, True], ids=["numpy", "device"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", COMPUTE)
def test_api_function_agrees_with_twin(name, dt, on_device, rng):
    args = api_cases(rng, dt)[name]
    want = _results(name, twin := copy_mod.deepcopy(args), getattr(ref, name)(*twin))
    call = _to_device(name, args) if on_device else copy_mod.deepcopy(args)
    ret = getattr(ck, name)(*call)
    if name.endswith("_"):
        assert ret is call[0]                              # in place, returns its first argument
    outs = [ret] if not isinstance(ret, tuple) else list(ret)
    for o in outs:
        if o is not None and not isinstance(o, float):
            assert ck.is_array(o) == on_device, f"{name} returned {type(o).__name__}"
    got = [ck.to_host(g) if not isinstance(g, float) else g for g in _results(name, call, ret)]
    _assert_close(name, got, want, dt)


CONV_CASES = [(4, 3, 1, 1), (5, 3, 2, 1), (3, 1, 1, 0), (2, 5, 1, 2), (3, 2, 3, 0)]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("F,K,stride,pad", CONV_CASES)
@pytest.mark.parametrize("block_reductions", [False, True])
def test_conv2d_forward_and_backward(dt, F, K, stride, pad, block_reductions, rng, monkeypatch):
    # covers the tiled kernel (K <= 3, stride <= 2), the direct one, and both weight-gradient kernels
    monkeypatch.setattr(rt, "USE_BLOCK_REDUCTIONS", block_reductions)
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
    monkeypatch.setattr(rt, "USE_BLOCK_REDUCTIONS", block_reductions)
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


def test_in_place_functions_update_numpy_arguments_that_are_not_contiguous(rng):
    a = randn(rng, (4, 6), np.float32)
    view, b = a[:, ::2], randn(rng, (4, 3), np.float32)
    want = view + b
    ck.add_(view, b)
    np.testing.assert_allclose(a[:, ::2], want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the kernel registry: every kernel comes from a registered builder, and is launched as registered


def test_kernels_are_made_only_by_registered_builders():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "jit":
                where = f"{path.name}:{node.lineno}"
                # cuda.jit appears in two places only: the registry's getter, and device functions
                assert path.name in ("_runtime.py", "_device.py"), f"cuda.jit outside the registry at {where}"
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("build_")):
            decos = [d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "kernel"]
            assert decos, f"{path.name}: {fn.name} is not registered with @kernel(argtypes)"
    dev = ast.parse((PACKAGE / "_device.py").read_text())
    for fn in (n for n in dev.body if isinstance(n, ast.FunctionDef)):
        assert any("device=True" in ast.unparse(d) for d in fn.decorator_list), fn.name
    assert len(rt.KERNELS) == len({s.build for s in rt.KERNELS.values()})


def _launch_everything(rng):
    """Call every function of the backend, through every branch that picks a different kernel."""
    for dt in DTYPES:
        for name, args in api_cases(rng, dt).items():
            getattr(ck, name)(*args)
        ck.zeros((2, 3), dt)
        x, w5, b = randn(rng, (1, 2, 6, 6), dt), randn(rng, (2, 2, 5, 5), dt), randn(rng, (2,), dt)
        ck.conv2d_forward(x, w5, b, 1, 0)                                   # the direct forward kernel
        d = randn(rng, (1, 2, 2, 2), dt)
        for block in (False, True):
            rt.USE_BLOCK_REDUCTIONS = block
            ck.conv2d_backward_weight(d, x, w5.shape, 1, 0)                 # direct dw, both db kernels
            ck.conv2d_backward_weight(*api_cases(rng, dt)["conv2d_backward_weight"])
            ck.group_norm_silu_backward(*api_cases(rng, dt)["group_norm_silu_backward"])


def test_every_launch_is_a_registered_kernel_with_its_registered_argument_types(rng, monkeypatch):
    log = []
    monkeypatch.setattr(rt, "LAUNCH_LOG", log)
    monkeypatch.setattr(rt, "USE_BLOCK_REDUCTIONS", rt.USE_BLOCK_REDUCTIONS)   # restored afterwards
    _launch_everything(rng)
    for name, dt, types in log:
        assert name in rt.KERNELS
        want = tuple(rt.KERNELS[name].argtypes(rt.kernel_types(dt)))
        assert types == want, f"{name} ({dt}) launched with {types}, registered {want}"
    launched = {(name, dt) for name, dt, _ in log}
    assert launched == {(n, np.dtype(dt)) for n in rt.KERNELS for dt in DTYPES}, "a registered kernel is dead"


# ---------------------------------------------------------------------------------------------------
# real GPU only


@pytest.mark.gpu
@needs_gpu
def test_gpu_default_unet_forward_matches_cpu():
    model = UNet(rng=0, backend="cpu")
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    t = np.arange(8) * 100
    want = model(x, t)
    gpu = model.copy()
    gpu.backend = "cuda"
    got = gpu(x, t)
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


@pytest.mark.skipif(not ck.SIMULATOR, reason="the CUDA simulator's allocator (a real GPU has real shared memory)")
def test_simulator_shared_arrays_are_one_array_per_block():
    """The simulator's ``cuda.shared.array`` did an unlocked check-then-set: under load, threads of one block
    got different "shared" arrays (measured: 4 of 20 rounds of 32 threads; kernels then read garbage, the
    cause of rare cuda-vs-cpu mismatches). ``_runtime`` serialises it; every thread must get the one array."""
    import threading

    from numba.cuda.simulator import kernelapi
    assert rt.SIMULATOR_SHARED_LOCKED
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to hit the window if it is there
    try:
        for _ in range(40):
            sh = kernelapi.FakeCUDAShared(0)
            start, got = threading.Barrier(32), []

            def work():
                start.wait()
                got.append(id(sh.array(4, np.float32)))
                got.append(id(sh.array(2, np.float64)))  # a second call site: its own array

            threads = [threading.Thread(target=work) for _ in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(set(got)) == 2, "threads of one block got different shared arrays"
    finally:
        sys.setswitchinterval(old)
