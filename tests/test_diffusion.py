"""Verification tests for the forward process (DDPM eqs. 4, 6, 7; Salimans & Ho 2022 App. D).

Statistical tests derive their tolerance from the sample size: a sample mean of n draws with
standard deviation sd has standard error sd / sqrt(n); a sample variance has standard error
var * sqrt(2 / (n - 1)). We allow Z = 5 standard errors (a false alarm every ~1.7 million runs, and
the seeds are fixed anyway).
"""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from difnumpy import (Schedule, discretized_gaussian_log_likelihood, get_velocity, normal_kl,
                      predict_eps_from_v, predict_eps_from_x0, predict_x0_from_eps, predict_x0_from_v,
                      q_mean_variance, q_posterior_mean_variance, q_sample)

Z = 5.0
SCHED = {name: Schedule.from_name(name, 1000) for name in ("linear", "cosine")}


def mean_tol(sd, n):
    return Z * sd / np.sqrt(n)


def var_tol(var, n):
    return Z * var * np.sqrt(2.0 / (n - 1))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_q_sample_moments(name, t, rng):
    s = SCHED[name]
    n = 200_000
    x0 = np.array([[1.5, -0.7, 0.0]])  # three fixed data values
    xt = q_sample(s, np.repeat(x0, n, axis=0), t, rng=rng)
    abar = s.alphas_cumprod[t]
    sd = np.sqrt(1 - abar)
    assert np.all(np.abs(xt.mean(0) - np.sqrt(abar) * x0[0]) < mean_tol(sd, n))
    assert np.all(np.abs(xt.var(0, ddof=1) - (1 - abar)) < var_tol(1 - abar, n))
    mean, var, log_var = q_mean_variance(s, x0, t)
    np.testing.assert_allclose(mean, np.sqrt(abar) * x0)
    np.testing.assert_allclose(var.ravel(), 1 - abar)
    np.testing.assert_allclose(log_var.ravel(), np.log(1 - abar))


def test_stepwise_chain_reaches_the_closed_form_marginal(rng):
    """Applying q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) t+1 times gives q(x_t | x0) (eq. 4)."""
    s = Schedule.from_name("linear", 300)
    n = 100_000
    x = np.full(n, 0.8)
    for t in range(200):
        x = np.sqrt(1 - s.betas[t]) * x + np.sqrt(s.betas[t]) * rng.standard_normal(n)
    abar = s.alphas_cumprod[199]
    assert abs(x.mean() - np.sqrt(abar) * 0.8) < mean_tol(np.sqrt(1 - abar), n)
    assert abs(x.var(ddof=1) - (1 - abar)) < var_tol(1 - abar, n)
    # and the closed form with the same n draws agrees with the chain in distribution
    y = q_sample(s, np.full((n, 1), 0.8), 199, rng=rng).ravel()
    assert stats.ks_2samp(x, y).pvalue > 1e-6


@pytest.mark.parametrize("t", [0, 100, 999])
def test_unit_variance_data_stays_unit_variance(t, rng):
    n = 200_000
    x0 = rng.standard_normal((n, 2))
    xt = q_sample(SCHED["cosine"], x0, t, rng=rng)
    assert np.all(np.abs(xt.var(0, ddof=1) - 1.0) < var_tol(1.0, n))
    assert np.all(np.abs(xt.mean(0)) < mean_tol(1.0, n))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_equals_brute_force_gaussian_conditional(name, t):
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0.

    Given x0: x_{t-1} ~ N(a' x0, 1 - abar'), x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, so the joint
    covariance is [[v1, sqrt(alpha) v1], [sqrt(alpha) v1, alpha v1 + beta]] and the conditional is the
    textbook Schur complement. This uses no posterior formula from the library.
    """
    s = SCHED[name]
    abar_p, alpha, beta = s.alphas_cumprod[t - 1], s.alphas[t], s.betas[t]
    x0 = np.array([[0.3], [-1.2], [2.0]])
    x_t = np.array([[0.1], [0.5], [-0.4]])
    m1, v1 = np.sqrt(abar_p) * x0, 1 - abar_p
    m2 = np.sqrt(alpha) * m1
    c12, v2 = np.sqrt(alpha) * v1, alpha * v1 + beta
    cond_mean = m1 + c12 / v2 * (x_t - m2)
    cond_var = v1 - c12 ** 2 / v2
    mean, var, log_var = q_posterior_mean_variance(s, x0, x_t, t)
    np.testing.assert_allclose(mean, cond_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var.ravel(), cond_var, rtol=1e-8)
    np.testing.assert_allclose(log_var.ravel(), np.log(cond_var), rtol=1e-8)
    assert np.all(var <= beta)


@given(t=st.integers(0, 999), shape=st.sampled_from([(3, 5), (2, 1, 4, 4), (1, 3, 2, 2), (4,)]),
       name=st.sampled_from(["linear", "cosine"]), dtype=st.sampled_from([np.float32, np.float64]))
def test_eps_x0_v_conversions_round_trip(t, shape, name, dtype):
    s = SCHED[name]
    r = np.random.default_rng(t)
    x0 = r.standard_normal(shape).astype(dtype)
    eps = r.standard_normal(shape).astype(dtype)
    tt = np.full(shape[0], t)
    x_t = q_sample(s, x0, tt, noise=eps)
    rtol, atol = (1e-4, 1e-3) if dtype == np.float32 else (1e-9, 1e-9)
    # x0 from eps amplifies float32 rounding of x_t by 1/sqrt(abar)
    amp = 1.0 / np.sqrt(s.alphas_cumprod[t])
    np.testing.assert_allclose(predict_x0_from_eps(s, x_t, tt, eps), x0, rtol=rtol, atol=atol * amp)
    np.testing.assert_allclose(predict_eps_from_x0(s, x_t, tt, x0), eps, rtol=rtol,
                               atol=atol / np.sqrt(1 - s.alphas_cumprod[t]))
    v = get_velocity(s, x0, eps, tt)
    np.testing.assert_allclose(predict_x0_from_v(s, x_t, tt, v), x0, rtol=rtol, atol=atol)
    np.testing.assert_allclose(predict_eps_from_v(s, x_t, tt, v), eps, rtol=rtol, atol=atol)
    # v is a rotation of (eps, x0): its norm is preserved
    np.testing.assert_allclose(np.sum(v.astype(np.float64) ** 2) + np.sum(x_t.astype(np.float64) ** 2),
                               np.sum(x0.astype(np.float64) ** 2) + np.sum(eps.astype(np.float64) ** 2), rtol=1e-4)


def test_q_sample_dtype_and_noise_argument(rng):
    s = SCHED["linear"]
    x0 = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    assert q_sample(s, x0, 3, rng=rng).dtype == np.float32
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 5, 999, 42])
    expected = (np.sqrt(s.alphas_cumprod[t])[:, None, None, None] * x0
                + np.sqrt(1 - s.alphas_cumprod[t])[:, None, None, None] * eps)
    for backend in ("numpy", "cpu"):
        np.testing.assert_allclose(q_sample(s, x0, t, noise=eps, backend=backend), expected, rtol=1e-6, atol=1e-6)
    a = q_sample(s, x0, t, rng=np.random.default_rng(7))
    b = q_sample(s, x0, t, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_normal_kl_matches_scipy_integration():
    m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(1.7)
    p, q = stats.norm(m1, np.exp(0.5 * lv1)), stats.norm(m2, np.exp(0.5 * lv2))
    x = np.linspace(-12, 12, 200_001)
    dens = p.pdf(x)
    kl_num = np.trapezoid(dens * (p.logpdf(x) - q.logpdf(x)), x)
    assert normal_kl(m1, lv1, m2, lv2) == pytest.approx(kl_num, rel=1e-7)
    assert normal_kl(m1, lv1, m1, lv1) == 0.0
    # entropy-based closed form from scipy: KL = cross-entropy - entropy
    ce = -np.trapezoid(dens * q.logpdf(x), x)
    assert normal_kl(m1, lv1, m2, lv2) == pytest.approx(ce - p.entropy(), rel=1e-7)


@pytest.mark.parametrize("bin_width", [2 / 255, 2 / 16])
def test_discretized_gaussian_log_likelihood_matches_scipy(bin_width):
    levels = np.arange(-1.0, 1.0 + 1e-9, bin_width)
    means = np.array([-0.9, 0.0, 0.37, 0.99])[:, None]
    log_scales = np.log(np.array([0.01, 0.1, 0.5, 2.0]))[:, None]
    lp = discretized_gaussian_log_likelihood(levels[None, :], means, log_scales, bin_width=bin_width)
    d = stats.norm(means, np.exp(log_scales))
    upper = np.where(levels >= 1 - bin_width / 2, np.inf, levels + bin_width / 2)
    lower = np.where(levels <= -1 + bin_width / 2, -np.inf, levels - bin_width / 2)
    # scipy's cdf difference, taken with survival functions above the mean to avoid cancellation
    with np.errstate(divide="ignore"):
        expected = np.where(lower > means, np.log(d.sf(lower) - d.sf(upper)), np.log(d.cdf(upper) - d.cdf(lower)))
    ok = np.isfinite(expected)  # where scipy's difference underflows to 0, ours stays finite
    assert ok.mean() > 0.8
    np.testing.assert_allclose(lp[ok], expected[ok], rtol=1e-7, atol=1e-12)
    # far in the tail the stable form still matches scipy's own log-probabilities
    tail = discretized_gaussian_log_likelihood(np.array([0.5]), 0.0, np.log(0.01), bin_width=bin_width)
    assert tail[0] == pytest.approx(stats.norm(0, 0.01).logsf(0.5 - bin_width / 2), rel=1e-3)
    assert np.all(np.isfinite(lp))
    # the bins partition the real line: probabilities sum to one for every Gaussian
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=1e-9)


def test_bad_input(rng):
    s = SCHED["linear"]
    x0 = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="t must lie"):
        q_sample(s, x0, 1000, rng=rng)
    with pytest.raises(ValueError, match="t must lie"):
        q_sample(s, x0, -1, rng=rng)
    with pytest.raises(TypeError, match="t must be an integer"):
        q_sample(s, x0, 1.5, rng=rng)
    with pytest.raises(TypeError, match="t must be an integer"):
        q_sample(s, x0, np.array([1.0, 2.0]), rng=rng)
    with pytest.raises(ValueError, match=r"t must be an int or an int array of shape \(2,\)"):
        q_sample(s, x0, np.array([1, 2, 3]), rng=rng)
    bad = x0.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x0 contains NaN"):
        q_sample(s, bad, 1, rng=rng)
    with pytest.raises(ValueError, match="noise must have the shape"):
        q_sample(s, x0, 1, noise=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="either noise= or rng="):
        q_sample(s, x0, 1, noise=np.zeros_like(x0), rng=rng)
    with pytest.raises(TypeError, match="x0 must be a numpy ndarray"):
        q_sample(s, [[1.0]], 1, rng=rng)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        q_sample(s, x0.astype(np.int32), 1, rng=rng)
    with pytest.raises(TypeError, match="schedule"):
        q_sample("linear", x0, 1, rng=rng)
    zt = Schedule.from_name("linear", 10, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        predict_x0_from_eps(zt, x0, 9, x0)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_schedules_emit_no_warnings(name, rng):
    """abar_{T-1} == 0 exactly: building the schedule and every forward-process function at any valid t must not
    warn (predict_x0_from_eps used to compute 1/alphas_cumprod over the whole buffer, so every call warned
    "divide by zero" even at t where abar > 0)."""
    T = 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Schedule.from_name(name, T, zero_terminal_snr=True)
        assert s.alphas_cumprod[-1] == 0.0 and np.all(np.isfinite(s.snr))
        x0, eps = rng.standard_normal((3, 2, 2, 2)), rng.standard_normal((3, 2, 2, 2))
        t = np.array([0, T // 2, T - 1])
        x_t = q_sample(s, x0, t, noise=eps)
        np.testing.assert_allclose(x_t[2], eps[2])  # pure noise at T-1
        q_mean_variance(s, x0, t)
        q_posterior_mean_variance(s, x0, x_t, t)
        v = get_velocity(s, x0, eps, t)
        np.testing.assert_allclose(predict_x0_from_v(s, x_t, t, v), x0, atol=1e-12)
        np.testing.assert_allclose(predict_eps_from_v(s, x_t, t, v), eps, atol=1e-12)
        predict_eps_from_x0(s, x_t, t, x0)
        t_ok = np.array([0, T // 2, T - 2])  # eps -> x0 is defined wherever abar > 0
        x_ok = q_sample(s, x0, t_ok, noise=eps)
        np.testing.assert_allclose(predict_x0_from_eps(s, x_ok, t_ok, eps), x0, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="zero terminal SNR"):
            predict_x0_from_eps(s, x_t, t, eps)
