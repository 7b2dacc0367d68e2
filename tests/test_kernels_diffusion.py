"""The numba kernels of the forward process and the fused sampler update equal their NumPy twins
(kernels/reference.py), for float32 and float64, on small and large arrays.

Both kernels are serial (one thread streams at copy bandwidth; see difnumpy/kernels/cpu/elementwise.py),
so "large" here exercises the vectorised loop over long rows and many rows, not a parallel path; their
results under several thread counts are compared in tests/test_kernels_threads.py."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difnumpy.kernels import cpu, reference

DTYPES = [np.float32, np.float64]


def _args(rng, n, m, dtype):
    x = rng.standard_normal((n, m)).astype(dtype)
    e = rng.standard_normal((n, m)).astype(dtype)
    return x, e


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (3, 7), (2, 40_000), (600, 1000), (1, 300_000)])
def test_q_sample_kernel_matches_twin(n, m, dtype, rng):
    x, e = _args(rng, n, m, dtype)
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    ref = reference.q_sample(x, e, a, b)
    got = cpu.q_sample(x, e, a, b)
    assert got.dtype == dtype and got.shape == (n, m)
    np.testing.assert_array_equal(got, ref)  # same operations in the same order: bit-identical
    out = np.empty_like(x)
    assert cpu.q_sample(x, e, a, b, out=out) is out
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (4, 33), (3, 100_000), (1, 300_000)])
def test_sampler_update_kernel_matches_twin(n, m, dtype, rng):
    x, mo = _args(rng, n, m, dtype)
    z = rng.standard_normal((n, m)).astype(dtype)
    coef = rng.standard_normal((n, 5))
    lo = np.where(rng.uniform(size=n) < 0.5, -np.inf, -1.0)
    hi = -lo
    ref_prev, ref_x0 = reference.sampler_update(x, mo, z, coef, lo, hi)
    got_prev, got_x0 = cpu.sampler_update(x, mo, z, coef, lo, hi)
    assert got_prev.dtype == dtype and got_x0.dtype == dtype
    # the twin's operations in the twin's order, each rounded in the dtype (no fused multiply-add)
    np.testing.assert_array_equal(got_x0, ref_x0)
    np.testing.assert_array_equal(got_prev, ref_prev)
    clipped = np.isfinite(hi)
    assert np.all(np.abs(got_x0[clipped]) <= 1.0)


@given(n=st.integers(1, 5), m=st.integers(1, 50), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 1000))
def test_sampler_update_property(n, m, dtype, seed):
    r = np.random.default_rng(seed)
    x, mo = _args(r, n, m, dtype)
    coef = r.standard_normal((n, 5))
    lo, hi = np.full(n, -0.5), np.full(n, 0.7)
    ref = reference.sampler_update(x, mo, x, coef, lo, hi)
    got = cpu.sampler_update(x, mo, x, coef, lo, hi)
    for g, rr in zip(got, ref):
        assert g.dtype == dtype
        np.testing.assert_array_equal(g, rr)
