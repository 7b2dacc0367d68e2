"""The small numba ops of the U-Net graph and the training step (difnumpy.kernels.cpu.elementwise and
.optim) agree with their NumPy twins (difnumpy.kernels.reference), in float32 and float64.

In-place sums and scalings and the EMA do the twins' operations in the twins' order: bit-identical.
Reductions accumulate in float64 in another order than NumPy's pairwise sums: equal to 1e-12 (float64)
or to the last rounding (float32). SiLU's float32 sigmoid is a vectorised exp polynomial (rel. error
< 3e-7): equal to rounding.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difnumpy.kernels import cpu, reference as ref
from difnumpy.kernels.api import BACKEND_API, OPTIONAL_API, missing_api

DTYPES = [np.float32, np.float64]
shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)
nchw = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9))
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)


def _draw(shape, dtype, seed, scale=3.0, k=2):
    r = np.random.default_rng(seed)
    return [(scale * r.standard_normal(shape)).astype(dtype) for _ in range(k)]


def test_cpu_backend_provides_the_whole_api():
    assert missing_api(cpu) == []
    assert set(cpu.__all__) == set(BACKEND_API) | set(OPTIONAL_API)
    for name in ("is_array", "asarray", "to_host", "zeros", "copy", "copy_into"):
        assert getattr(cpu, name) is getattr(ref, name), name  # host arrays: the twins themselves


# ---- SiLU ----


def _assert_silu_close(got, want, dtype, *operands):
    assert got.dtype == dtype and got.shape == want.shape and got.flags.c_contiguous
    # the twin's sigmoid 0.5 + 0.5 tanh(y / 2) cancels for y << 0 (absolute error ~eps/2, so its relative
    # error grows, down to 0 in float32 at y < -17): compare on the scale of the operands there
    scale = float(np.prod([max(1.0, float(np.abs(a).max())) for a in operands]))
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=3e-6, atol=3e-7 * scale)


@given(shape=shapes, dtype=dtypes, seed=seeds)
def test_silu_matches_twin(shape, dtype, seed):
    x, dout = _draw(shape, dtype, seed)
    _assert_silu_close(cpu.silu_forward(x), ref.silu_forward(x), dtype, x)
    _assert_silu_close(cpu.silu_backward(dout, x), ref.silu_backward(dout, x), dtype, x, dout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_at_the_extremes_and_across_blocks(dtype):
    big = np.finfo(dtype).max / 2
    x = np.array([-big, -1e30, -1e4, -100.0, -88.5, -87.0, -30.0, -1.0, -0.0, 0.0, 1.0, 30.0, 88.5, 1e4, big], dtype)
    out = cpu.silu_forward(x)
    want = ref.silu_forward(x)
    assert np.all(np.isfinite(out))
    assert out[-1] == want[-1] and out[-2] == pytest.approx(1e4, rel=1e-6)
    assert np.all(np.abs(out[:4]) < 1e-30)  # silu(y) -> -0 for y << 0 (not y * 1e-38 = -3 at y = -3e38)
    np.testing.assert_allclose(out, want, rtol=3e-6, atol=1e-6)
    d = cpu.silu_backward(np.ones_like(x), x)
    assert np.all(np.isfinite(d)) and d[-1] == 1.0 and np.all(np.abs(d[:4]) < 1e-30)
    # longer than one scratch block (2048), odd length, a non-contiguous input
    y = np.linspace(-20, 20, 2 * 5001, dtype=dtype)[::2]
    _assert_silu_close(cpu.silu_forward(y), ref.silu_forward(y), dtype, y)
    _assert_silu_close(cpu.silu_backward(y[::-1], y), ref.silu_backward(y[::-1], y), dtype, y, y)


# ---- in place: bit-identical ----


@given(shape=shapes, dtype=dtypes, seed=seeds, s=st.floats(-3, 3, allow_nan=False))
def test_inplace_ops_are_bit_identical_to_twins(shape, dtype, seed, s):
    a, b = _draw(shape, dtype, seed)
    for name, args in (("add_", (b,)), ("axpy_", (b, s)), ("scale_", (s,))):
        got, want = a.copy(), a.copy()
        res = getattr(cpu, name)(got, *args)
        assert res is got, name
        getattr(ref, name)(want, *args)
        np.testing.assert_array_equal(got, want, err_msg=name)
    # the second operand in another dtype is cast first, as the twin does
    got, want = a.copy(), a.copy()
    other = b.astype(np.float64 if dtype == np.float32 else np.float32)
    np.testing.assert_array_equal(cpu.add_(got, other), ref.add_(want, other))


@given(shape=shapes, dtype=dtypes, seed=seeds, binary=st.booleans())
def test_blend_is_bit_identical_to_twin(shape, dtype, seed, binary):
    x, known = _draw(shape, dtype, seed)
    r = np.random.default_rng(seed + 1)
    mask = (r.uniform(size=shape) < 0.5) if binary else r.uniform(size=shape)
    mask = mask.astype(dtype)
    got, want = x.copy(), x.copy()
    assert cpu.blend_(got, known, mask) is got
    np.testing.assert_array_equal(got, ref.blend_(want, known, mask))
    if binary:  # each element exactly x or known (RePaint's merge)
        np.testing.assert_array_equal(got, np.where(mask == 1, known, x))


@given(shape=nchw, dtype=dtypes, seed=seeds)
def test_channel_bias_and_sum_hw_match_twins(shape, dtype, seed):
    h, _ = _draw(shape, dtype, seed)
    t = _draw(shape[:2], dtype, seed + 1, k=1)[0]
    got, want = h.copy(), h.copy()
    assert cpu.add_channel_bias_(got, t) is got
    np.testing.assert_array_equal(got, ref.add_channel_bias_(want, t))
    s, s_r = cpu.sum_hw(h), ref.sum_hw(h)
    assert s.dtype == dtype and s.shape == shape[:2]
    scale = np.abs(h).sum(axis=(2, 3))
    if dtype == np.float64:
        np.testing.assert_allclose(s, s_r, rtol=1e-12, atol=1e-14 * scale.max())
    else:  # float64 sums rounded once to float32: the same to the last rounding
        np.testing.assert_allclose(s, s_r, rtol=1.2e-7, atol=1e-12 * scale.max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_ops_on_strided_views_update_the_view(dtype):
    base = np.arange(24, dtype=dtype).reshape(2, 3, 2, 2)
    h = base[:, ::2]  # not C-contiguous: the twins' NumPy ops, in place on the view
    t = np.ones((2, 2), dtype)
    cpu.add_channel_bias_(h, t)
    cpu.add_(h, np.ones_like(h))
    cpu.axpy_(h, np.ones_like(h), 2.0)
    cpu.scale_(h, 0.5)
    want = np.arange(24, dtype=dtype).reshape(2, 3, 2, 2)
    want[:, ::2] = (want[:, ::2] + 4) * 0.5
    np.testing.assert_array_equal(base, want)
    e = np.zeros((4, 4), dtype)[:, ::2]
    cpu.ema_update(e, np.ones((4, 2), dtype), 0.5)
    np.testing.assert_array_equal(e, np.full((4, 2), 0.5, dtype))


# ---- reductions and the loss ----


@given(shape=shapes, dtype=dtypes, seed=seeds)
def test_sumsq_and_mse_match_twins(shape, dtype, seed):
    a, b = _draw(shape, dtype, seed)
    got = cpu.sumsq(a)
    assert isinstance(got, float)
    assert got == pytest.approx(ref.sumsq(a), rel=1e-12, abs=0)
    loss, dpred = cpu.mse_loss(a, b)
    loss_r, dpred_r = ref.mse_loss(a, b)
    assert isinstance(loss, float) and loss == pytest.approx(loss_r, rel=1e-12, abs=0)
    assert dpred.dtype == dtype and dpred.shape == a.shape
    np.testing.assert_array_equal(dpred, dpred_r)  # (pred - target) * (2 / n), rounded as the twin


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_accumulate_in_float64(dtype):
    """A float32 running sum would lose the small terms: 1e8 + 1e6 * 1.0 is 1e8 in float32."""
    a = np.ones(1_000_001, dtype)
    a[0] = 1e4  # 1e8 after squaring
    assert cpu.sumsq(a) == 1e8 + 1e6
    h = a[:1_000_000].reshape(1, 1, 1000, 1000)
    assert float(cpu.sum_hw(h)[0, 0]) == float(np.asarray(1e4 + 999_999, dtype))
    loss, _ = cpu.mse_loss(a, np.zeros_like(a))
    assert loss == pytest.approx((1e8 + 1e6) / a.size, rel=1e-15)
    # a float64 target is cast to float32 first, as the twin does
    x = np.float32([1.0, 2.0])
    tgt = np.float64([1.0 + 1e-9, 2.0])
    assert cpu.mse_loss(x, tgt)[0] == ref.mse_loss(x, tgt)[0] == 0.0


# ---- optim: the EMA ----


@given(shape=shapes, dtype=dtypes, seed=seeds, decay=st.floats(0.0, 1.0))
def test_ema_update_is_bit_identical_to_twin(shape, dtype, seed, decay):
    e, p = _draw(shape, dtype, seed)
    got, want = e.copy(), e.copy()
    assert cpu.ema_update(got, p, decay) is None
    ref.ema_update(want, p, decay)
    np.testing.assert_array_equal(got, want)


# ---- bad input ----


def test_small_ops_refuse_bad_input():
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="b must have the shape of a"):
        cpu.add_(x, np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="x must have the shape of y"):
        cpu.axpy_(x, np.zeros(3, np.float32), 1.0)
    with pytest.raises(ValueError, match="t must have the shape"):
        cpu.add_channel_bias_(x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"h must have shape \(N, C, H, W\)"):
        cpu.sum_hw(x[0])
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        cpu.mse_loss(x, x[:1])
    with pytest.raises(ValueError, match="param must have the shape of ema"):
        cpu.ema_update(x, x[0], 0.9)
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu.silu_forward(np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu.scale_(np.zeros(3, np.int32), 2.0)
    with pytest.raises(TypeError, match="numpy ndarray"):
        cpu.sumsq([1.0, 2.0])


def test_linear_one_row_has_the_bits_it_has_in_a_batch():
    """BLAS sums a one-row product (GEMV) in another order than a GEMM: the cpu backend keeps one row on
    the GEMM path, so a sample's output does not depend on its batch."""
    from difnumpy.kernels import cpu
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((7, 128), (64, 128), (64,)))
    full = cpu.linear_forward(x, w, b)
    for i in range(7):
        np.testing.assert_array_equal(cpu.linear_forward(x[i:i + 1], w, b), full[i:i + 1])
    np.testing.assert_allclose(full, ref.linear_forward(x, w, b), rtol=1e-6, atol=1e-5)
    dout = rng.standard_normal((7, 64)).astype(np.float32)
    dx = cpu.linear_backward(dout, x, w)[0]
    for i in range(7):
        got = cpu.linear_backward(dout[i:i + 1], x[i:i + 1], w)
        np.testing.assert_array_equal(got[0], dx[i:i + 1])
        want = ref.linear_backward(dout[i:i + 1], x[i:i + 1], w)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        for g, r in zip(got[1:], want[1:]):  # one-term sums: the twin's bits exactly
            assert g.dtype == r.dtype and g.shape == r.shape
            np.testing.assert_array_equal(g, r)
