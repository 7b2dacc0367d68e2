"""Verification tests for the noise schedules (DDPM Sec. 2 and 4; Nichol & Dhariwal 2021 eq. 17;
Lin et al. 2023 Algorithm 1)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difnumpy import Schedule, make_betas, rescale_zero_terminal_snr
from difnumpy.schedules import SCHEDULE_NAMES


@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 2000))
def test_derived_buffers_follow_their_definitions(name, T):
    s = Schedule.from_name(name, T)
    assert s.num_timesteps == T
    for k in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
              "posterior_mean_coef1", "posterior_mean_coef2", "snr"):
        arr = getattr(s, k)
        assert arr.dtype == np.float64 and arr.shape == (T,), k
    # abar_t = prod_{s <= t} (1 - beta_s), computed here as a running product in a loop
    abar = 1.0
    for t in range(T):
        abar *= 1.0 - s.betas[t]
        assert s.alphas_cumprod[t] == pytest.approx(abar, rel=1e-12)
    assert np.all(np.diff(s.alphas_cumprod) < 0), "alphas_cumprod must decrease strictly"
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2 + s.sqrt_one_minus_alphas_cumprod ** 2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod), rtol=1e-12)
    # the posterior variance never exceeds the forward variance (DDPM eq. 7), and is 0 at t = 0
    assert s.posterior_variance[0] == 0.0
    assert np.all(s.posterior_variance <= s.betas * (1 + 1e-12))
    assert np.all(np.isfinite(s.posterior_log_variance_clipped))


def test_cosine_schedule_matches_improved_ddpm_values():
    b = make_betas("cosine", 1000)
    assert b[0] == pytest.approx(4.128e-5, rel=1e-3)
    np.testing.assert_allclose(b[-3:], [0.5556, 0.7500, 0.999], atol=6e-5)
    # abar follows cos^2 closely: abar_t = f(t+1)/f(0), f(u) = cos^2((u/T + s)/(1 + s) pi/2)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = np.cumprod(1 - b)
    np.testing.assert_allclose(abar[:990], f[1:991] / f[0], rtol=1e-9)


def test_named_schedules_endpoints():
    T = 1000
    lin = make_betas("linear", T)
    assert lin[0] == 1e-4 and lin[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / (T - 1))
    sl = make_betas("scaled_linear", T)
    np.testing.assert_allclose(np.sqrt(sl), np.linspace(1e-2, np.sqrt(0.02), T))
    sg = make_betas("sigmoid", T)
    assert np.all(np.diff(sg) > 0) and sg[0] > 1e-4 and sg[-1] < 0.02
    np.testing.assert_allclose(sg[T // 2 - 1] + sg[T // 2], 1e-4 + 0.02, rtol=1e-9)  # symmetric about 0


@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 1500))
def test_zero_terminal_snr(name, T):
    b = make_betas(name, T)
    r = rescale_zero_terminal_snr(b)
    abar, abar_r = np.cumprod(1 - b), np.cumprod(1 - r)
    assert abar_r[-1] == 0.0
    assert abar_r[0] == pytest.approx(abar[0], rel=1e-12)
    assert r[-1] == 1.0
    s = Schedule(r)  # beta_T = 1 is a valid schedule
    assert s.snr[-1] == 0.0 and np.all(np.isfinite(s.posterior_variance))


def test_bad_input():
    with pytest.raises(ValueError, match="linear"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 2.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="NaN"):
        Schedule(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        Schedule(np.ones((2, 2)) * 0.1)
    s = Schedule.from_name("linear", 10)
    with pytest.raises(ValueError):
        s.betas[0] = 0.5  # buffers are read-only
