"""Tests for difnumpy.nn.layers and difnumpy.nn.gradcheck.

Every backward is checked in float64 against central differences (rel. error < 1e-6), with
hypothesis drawing shapes, strides, paddings and group counts; every forward against an
independent, loop-by-loop or formula-by-formula implementation.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difnumpy.kernels import reference
from difnumpy.nn import layers as L
from difnumpy.nn.gradcheck import (eval_numerical_gradient, eval_numerical_gradient_array,
                                   eval_numerical_gradient_at, rel_error)

TOL = 1e-6
SETTINGS = settings(max_examples=12, deadline=None)


def _naive_conv(x, w, b, stride, padding):
    """Direct definition: out[n,f,i,j] = b[f] + sum w[f] * xpad[n, :, s*i:s*i+KH, s*j:s*j+KW]."""
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    xp = np.zeros((N, C, H + 2 * padding, W + 2 * padding), dtype=np.float64)
    xp[:, :, padding:padding + H, padding:padding + W] = x
    Ho = (H + 2 * padding - KH) // stride + 1
    Wo = (W + 2 * padding - KW) // stride + 1
    out = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    patch = xp[n, :, stride * i:stride * i + KH, stride * j:stride * j + KW]
                    out[n, f, i, j] = np.sum(patch * w[f]) + b[f]
    return out


def _naive_group_norm(x, gamma, beta, groups, eps):
    N, C, H, W = x.shape
    out = np.empty_like(x, dtype=np.float64)
    cpg = C // groups
    for n in range(N):
        for g in range(groups):
            blk = x[n, g * cpg:(g + 1) * cpg].astype(np.float64)
            mu = blk.mean()
            var = ((blk - mu) ** 2).mean()
            out[n, g * cpg:(g + 1) * cpg] = (blk - mu) / np.sqrt(var + eps)
    return out * gamma[None, :, None, None] + beta[None, :, None, None]


# --------------------------------------------------------------------------------- conv2d

@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    f = draw(st.integers(1, 3))
    kh = draw(st.integers(1, 3))
    kw = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * padding), 6))
    w = draw(st.integers(max(1, kw - 2 * padding), 6))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return (n, c, h, w), (f, c, kh, kw), stride, padding, seed


@SETTINGS
@given(conv_cases())
def test_conv2d_forward_matches_definition_and_backward_gradcheck(case):
    x_shape, w_shape, stride, padding, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    out, cache = L.conv2d_forward(x, w, b, stride, padding)
    expected = _naive_conv(x, w, b, stride, padding)
    assert out.shape == expected.shape and out.dtype == np.float64 and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.conv2d_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(lambda z: L.conv2d_forward(z, w, b, stride, padding)[0], x, dout)
    dw_num = eval_numerical_gradient_array(lambda z: L.conv2d_forward(x, z, b, stride, padding)[0], w, dout)
    db_num = eval_numerical_gradient_array(lambda z: L.conv2d_forward(x, w, z, stride, padding)[0], b, dout)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert rel_error(dx, dx_num) < TOL
    assert rel_error(dw, dw_num) < TOL
    assert rel_error(db, db_num) < TOL


def test_conv2d_float32_keeps_dtype_and_agrees(rng):
    x = rng.standard_normal((2, 3, 7, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    out64, c64 = L.conv2d_forward(x, w, b, 2, 1)
    out32, c32 = L.conv2d_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), 2, 1)
    assert out32.dtype == np.float32
    assert rel_error(out32, out64) < 1e-6
    dout = rng.standard_normal(out64.shape)
    for g32, g64 in zip(L.conv2d_backward(dout.astype(np.float32), c32), L.conv2d_backward(dout, c64)):
        assert g32.dtype == np.float32 and rel_error(g32, g64) < 1e-6


def test_conv2d_validation():
    x = np.zeros((1, 3, 5, 5))
    w = np.zeros((2, 3, 3, 3))
    b = np.zeros(2)
    with pytest.raises(ValueError, match="channels"):
        L.conv2d_forward(x, np.zeros((2, 4, 3, 3)), b)
    with pytest.raises(TypeError, match="w must have the input's dtype"):
        L.conv2d_forward(x, w.astype(np.float32), b)
    with pytest.raises(ValueError, match="b must have shape"):
        L.conv2d_forward(x, w, np.zeros(3))
    with pytest.raises(ValueError, match="stride"):
        L.conv2d_forward(x, w, b, stride=0)
    with pytest.raises(ValueError, match="padding"):
        L.conv2d_forward(x, w, b, padding=-1)
    with pytest.raises(TypeError, match="stride"):
        L.conv2d_forward(x, w, b, stride=1.0)
    with pytest.raises(ValueError, match="x must be 4-D"):
        L.conv2d_forward(np.zeros((3, 5, 5)), w, b)
    with pytest.raises(TypeError, match="x must have dtype"):
        L.conv2d_forward(x.astype(np.int64), w, b)
    with pytest.raises(ValueError, match="larger than the padded input"):
        L.conv2d_forward(np.zeros((1, 3, 2, 2)), w, b)
    with pytest.raises(ValueError, match="backend"):
        L.conv2d_forward(x, w, b, backend="tpu")


# --------------------------------------------------------------------------------- linear

@SETTINGS
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2 ** 32 - 1))
def test_linear_gradcheck(n, d, m, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.standard_normal(m)
    out, cache = L.linear_forward(x, w, b)
    np.testing.assert_allclose(out, np.einsum("nd,md->nm", x, w) + b, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.linear_backward(dout, cache)
    assert rel_error(dx, eval_numerical_gradient_array(lambda z: L.linear_forward(z, w, b)[0], x, dout)) < TOL
    assert rel_error(dw, eval_numerical_gradient_array(lambda z: L.linear_forward(x, z, b)[0], w, dout)) < TOL
    assert rel_error(db, eval_numerical_gradient_array(lambda z: L.linear_forward(x, w, z)[0], b, dout)) < TOL


def test_linear_validation():
    with pytest.raises(ValueError, match="input features"):
        L.linear_forward(np.zeros((2, 3)), np.zeros((4, 5)), np.zeros(4))
    with pytest.raises(ValueError, match="b must have shape"):
        L.linear_forward(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        L.linear_forward([[1.0, 2.0]], np.zeros((4, 2)), np.zeros(4))


# ----------------------------------------------------------------------- group norm (+SiLU)

@st.composite
def gn_cases(draw):
    groups = draw(st.integers(1, 3))
    cpg = draw(st.integers(1, 3))
    n = draw(st.integers(1, 2))
    # at least 4 elements per group: with 1 or 2 the normalised output is (almost) independent of x,
    # dx is O(eps) and its relative error measures only finite-difference noise
    h = draw(st.integers(2, 4))
    w = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return (n, groups * cpg, h, w), groups, seed


@SETTINGS
@given(gn_cases(), st.booleans())
def test_group_norm_silu_forward_and_gradcheck(case, silu):
    shape, groups, seed = case
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.standard_normal(shape) * 2.0 + 0.5
    gamma = rng.standard_normal(C)
    beta = rng.standard_normal(C)
    eps = 1e-5
    if silu:
        out, cache = L.group_norm_silu_forward(x, gamma, beta, groups, eps)
        fwd = lambda x_, g_, b_: L.group_norm_silu_forward(x_, g_, b_, groups, eps)[0]  # noqa: E731
        bwd = L.group_norm_silu_backward
    else:
        out, cache = L.group_norm_forward(x, gamma, beta, groups, eps)
        fwd = lambda x_, g_, b_: L.group_norm_forward(x_, g_, b_, groups, eps)[0]  # noqa: E731
        bwd = L.group_norm_backward
    y = _naive_group_norm(x, gamma, beta, groups, eps)
    expected = y / (1.0 + np.exp(-y)) if silu else y
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)

    dout = rng.standard_normal(shape)
    dx, dgamma, dbeta = bwd(dout, cache)
    assert rel_error(dx, eval_numerical_gradient_array(lambda z: fwd(z, gamma, beta), x, dout)) < TOL
    assert rel_error(dgamma, eval_numerical_gradient_array(lambda z: fwd(x, z, beta), gamma, dout)) < TOL
    assert rel_error(dbeta, eval_numerical_gradient_array(lambda z: fwd(x, gamma, z), beta, dout)) < TOL


def test_group_norm_normalises_each_group(rng):
    x = rng.standard_normal((3, 6, 4, 5)) * 3.0 + 7.0
    out, _ = L.group_norm_forward(x, np.ones(6), np.zeros(6), groups=3, eps=0.0 + 1e-12)
    g = out.reshape(3, 3, -1)
    np.testing.assert_allclose(g.mean(axis=2), 0.0, atol=1e-12)
    np.testing.assert_allclose(g.var(axis=2), 1.0, rtol=1e-9)


def test_group_norm_float32_stats_dtype(rng):
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    out, mean, rstd = reference.group_norm_silu_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32),
                                                        2, 1e-5, True)
    assert out.dtype == mean.dtype == rstd.dtype == np.float32
    assert mean.shape == rstd.shape == (2, 2)
    out64, _ = L.group_norm_silu_forward(x.astype(np.float64), np.ones(4), np.zeros(4), 2)
    assert rel_error(out, out64) < 1e-6


def test_group_norm_validation():
    x = np.zeros((1, 6, 2, 2))
    with pytest.raises(ValueError, match="groups must divide"):
        L.group_norm_forward(x, np.ones(6), np.zeros(6), groups=4)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        L.group_norm_forward(x, np.ones(6), np.zeros(6), groups=0)
    with pytest.raises(ValueError, match="gamma must have shape"):
        L.group_norm_forward(x, np.ones(5), np.zeros(6), groups=3)
    with pytest.raises(TypeError, match="beta must have the input's dtype"):
        L.group_norm_silu_forward(x, np.ones(6), np.zeros(6, np.float32), groups=3)
    with pytest.raises(ValueError, match="eps"):
        L.group_norm_forward(x, np.ones(6), np.zeros(6), groups=3, eps=0.0)


# ------------------------------------------------------------------------ SiLU, upsample, concat

@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 2 ** 32 - 1))
def test_silu_gradcheck(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3.0
    out, cache = L.silu_forward(x)
    np.testing.assert_allclose(out, x / (1.0 + np.exp(-x)), rtol=1e-13, atol=1e-15)
    dout = rng.standard_normal(shape)
    dx = L.silu_backward(dout, cache)
    assert rel_error(dx, eval_numerical_gradient_array(lambda z: L.silu_forward(z)[0], x, dout)) < TOL


def test_sigmoid_extremes_no_overflow():
    with np.errstate(all="raise"):
        s = L.sigmoid(np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32))
    np.testing.assert_allclose(s, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-30)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2 ** 32 - 1))
def test_upsample_nearest_forward_and_gradcheck(backend, n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    out, cache = L.upsample_nearest_forward(x, backend=backend)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, axis=2), 2, axis=3))
    assert out.flags.c_contiguous
    dout = rng.standard_normal(out.shape)
    dx = L.upsample_nearest_backward(dout, cache)
    num = eval_numerical_gradient_array(lambda z: L.upsample_nearest_forward(z, backend=backend)[0], x, dout)
    assert rel_error(dx, num) < TOL


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@SETTINGS
@given(st.integers(1, 2), st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(1, 3),
       st.integers(0, 2 ** 32 - 1))
def test_concat_forward_and_gradcheck(backend, n, channels, hw, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((n, c, hw, hw)) for c in channels]
    out, cache = L.concat_forward(xs, backend=backend)
    np.testing.assert_array_equal(out, np.concatenate(xs, axis=1))
    dout = rng.standard_normal(out.shape)
    dxs = L.concat_backward(dout, cache)
    assert len(dxs) == len(xs)
    for k, x in enumerate(xs):
        def f(z, k=k):
            parts = list(xs)
            parts[k] = z
            return L.concat_forward(parts, backend=backend)[0]
        assert dxs[k].shape == x.shape and dxs[k].flags.c_contiguous
        assert rel_error(dxs[k], eval_numerical_gradient_array(f, x, dout)) < TOL


def test_concat_validation():
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        L.concat_forward([np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 4, 3))])
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        L.concat_forward([np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 3), np.float32)])
    with pytest.raises(TypeError, match="xs"):
        L.concat_forward([])


# ---------------------------------------------------------------------- timestep embedding, MSE

def test_timestep_embedding_formula():
    t = np.array([0, 1, 10, 999])
    dim = 8
    emb = L.timestep_embedding(t, dim)
    assert emb.shape == (4, 8) and emb.dtype == np.float64
    for n, tn in enumerate(t):
        for k in range(dim // 2):
            arg = tn / 10000.0 ** (k / (dim // 2))     # = pos / 10000^(2k/d), Vaswani et al. sec. 3.5
            assert emb[n, k] == pytest.approx(np.sin(arg), abs=1e-12)
            assert emb[n, dim // 2 + k] == pytest.approx(np.cos(arg), abs=1e-12)
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(emb[:, :4] ** 2 + emb[:, 4:] ** 2, 1.0, rtol=1e-12)
    e32 = L.timestep_embedding(t, dim, dtype=np.float32)
    assert e32.dtype == np.float32
    np.testing.assert_array_equal(e32, emb.astype(np.float32))


def test_timestep_embedding_validation():
    with pytest.raises(ValueError, match="dim must be even"):
        L.timestep_embedding([1, 2], 5)
    with pytest.raises(ValueError, match="t must be finite and >= 0"):
        L.timestep_embedding([-1, 2], 4)
    with pytest.raises(ValueError, match="t must be 1-D"):
        L.timestep_embedding([[1, 2]], 4)
    with pytest.raises(TypeError, match="t must hold"):
        L.timestep_embedding(np.array([True]), 4)
    for bad in ([1.0, np.nan], [np.inf, 2.0], [3.0, -np.inf], [2.5, -0.5], np.array([3, -1], np.int8)):
        with pytest.raises(ValueError, match="t must be finite and >= 0"):
            L.timestep_embedding(bad, 4)
    assert L.timestep_embedding(np.zeros(0), 4).shape == (0, 4)
    # the frequencies are cached per (dim, max_period): read-only, so no caller can change later results
    with pytest.raises(ValueError, match="read-only"):
        L._sinusoid_freqs(2, 10000.0)[0] = 0.0


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 2 ** 32 - 1))
def test_mse_loss_value_and_gradcheck(shape, seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.standard_normal(shape), rng.standard_normal(shape)
    loss, dpred = L.mse_loss(pred, target)
    assert loss == pytest.approx(np.mean((pred - target) ** 2), rel=1e-13)
    num = eval_numerical_gradient(lambda z: L.mse_loss(z, target)[0], pred)
    assert rel_error(dpred, num) < TOL
    l32, d32 = L.mse_loss(pred.astype(np.float32), target.astype(np.float32))
    assert isinstance(l32, float) and d32.dtype == np.float32


def test_mse_loss_validation():
    with pytest.raises(ValueError, match="target must have the shape"):
        L.mse_loss(np.zeros((2, 3)), np.zeros((3, 2)))


# ---------------------------------------------------------------------- the checker itself

def test_gradcheck_detects_a_wrong_gradient(rng):
    """The checks above can fail: a deliberately wrong backward scores O(1), not < 1e-6."""
    x = rng.standard_normal((2, 3, 4, 4))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    out, cache = L.group_norm_silu_forward(x, gamma, beta, 3)
    dout = rng.standard_normal(out.shape)
    dx, _, _ = L.group_norm_silu_backward(dout, cache)
    num = eval_numerical_gradient_array(lambda z: L.group_norm_silu_forward(z, gamma, beta, 3)[0], x, dout)
    assert rel_error(dx, num) < TOL
    # treating the group statistics as constants (a classic GroupNorm backward bug) is caught
    _, _, _, mean, rstd, _, _, _ = cache
    xhat = (x - mean[:, :, None, None]) * rstd[:, :, None, None]
    y = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
    s = 1.0 / (1.0 + np.exp(-y))
    wrong = dout * s * (1.0 + y * (1.0 - s)) * gamma[None, :, None, None] * rstd[:, :, None, None]
    assert rel_error(wrong, num) > 1e-2


def test_rel_error_and_numerical_gradient_helpers():
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert rel_error([1.0], [-1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        rel_error(np.zeros(2), np.zeros(3))
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    x0 = x.copy()
    g = eval_numerical_gradient(lambda z: float(np.sum(z ** 3)), x)
    np.testing.assert_allclose(g, 3 * x0 ** 2, rtol=1e-8)
    np.testing.assert_array_equal(x, x0)            # restored after perturbation
    sub = eval_numerical_gradient_at(lambda z: float(np.sum(z ** 3)), x, [(0, 1), 3])
    np.testing.assert_allclose(sub, [3 * 4.0, 3 * 9.0], rtol=1e-8)
    with pytest.raises(TypeError, match="float64"):
        eval_numerical_gradient(lambda z: 0.0, x.astype(np.float32))
