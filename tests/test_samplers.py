"""Verification tests for the samplers: DDPM (Ho et al. 2020, Algorithm 2, eqs. 6-7, 11) and DDIM
(Song et al. 2021, eqs. 12 and 16), checked against formulas written out independently here, against
each other, and against an analytic oracle (the exact denoiser for Gaussian data)."""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difnumpy import Schedule, ddim_invert, ddim_step, ddpm_step, inference_timesteps, sample, sample_progressive
from difnumpy.testing import GaussianOracle

Z = 5.0
LIN = Schedule.from_name("linear", 1000)
COS = Schedule.from_name("cosine", 1000)


# ---------------------------------------------------------------------------- timesteps

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_every_num_steps(spacing):
    T = 1000
    for S in range(1, T + 1):
        ts = inference_timesteps(T, S, spacing)
        assert ts.dtype == np.int64 and ts.shape == (S,), (S, ts.shape)
        assert ts.min() >= 0 and ts.max() <= T - 1, S
        assert np.all(np.diff(ts) < 0), f"not strictly descending for S={S}"
    assert inference_timesteps(T, T, spacing).tolist() == list(range(T - 1, -1, -1))


@given(T=st.integers(1, 300), data=st.data(), spacing=st.sampled_from(["leading", "trailing", "linspace"]))
def test_inference_timesteps_any_T(T, data, spacing):
    S = data.draw(st.integers(1, T))
    ts = inference_timesteps(T, S, spacing)
    assert len(ts) == S and len(set(ts.tolist())) == S and ts.min() >= 0 and ts.max() <= T - 1
    if spacing == "trailing":
        assert ts[0] == T - 1  # trailing always starts from pure noise (Lin et al. 2023)
    if spacing == "linspace":
        assert ts[-1] == 0 and (S == 1 or ts[0] == T - 1)


def test_inference_timesteps_known_values():
    assert inference_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert inference_timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert inference_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert inference_timesteps(10, 4, "linspace").tolist() == [9, 6, 3, 0]
    for S in (61, 103, 121):  # the float-range trap of the plain trailing formula
        ts = inference_timesteps(1000, S, "trailing")
        assert len(ts) == S and ts.min() >= 0
    with pytest.raises(ValueError, match="num_steps"):
        inference_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="num_steps"):
        inference_timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        inference_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps_offset"):
        inference_timesteps(1000, 1000, steps_offset=1)
    with pytest.raises(TypeError, match="num_steps"):
        inference_timesteps(1000, 10.0)


# ---------------------------------------------------------------------------- single steps

def _rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("t", [1, 37, 999])
def test_ddpm_step_is_algorithm_2(t, backend, rng):
    """DDPM Algorithm 2, line 4: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z."""
    x_t, eps, z = (_rand(rng, (3, 2, 4, 4)) for _ in range(3))
    s = LIN
    for variance_type, var in (("fixed_small", s.posterior_variance[t]), ("fixed_large", s.betas[t])):
        x_prev, _ = ddpm_step(s, eps, t, x_t, noise=z, clip_sample=False, variance_type=variance_type,
                              backend=backend)
        expected = (x_t - s.betas[t] / np.sqrt(1 - s.alphas_cumprod[t]) * eps) / np.sqrt(s.alphas[t]) + np.sqrt(var) * z
        np.testing.assert_allclose(x_prev, expected, rtol=1e-10, atol=1e-10)


def test_ddpm_final_step_adds_no_noise(rng):
    x_t, eps = _rand(rng, (4, 3)), _rand(rng, (4, 3))
    a, x0a = ddpm_step(LIN, eps, 0, x_t, noise=_rand(rng, (4, 3)), clip_sample=False)
    b, x0b = ddpm_step(LIN, eps, 0, x_t, noise=100 * _rand(rng, (4, 3)), clip_sample=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, x0a, rtol=1e-12)  # the last step returns the x0 prediction
    c, _ = ddpm_step(LIN, eps, 0, x_t, clip_sample=False)  # and needs no noise source at all
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_agree_for_consistent_outputs(pred, rng):
    """Given the same underlying (x0, eps), every parameterisation must give the same step."""
    s = COS
    t = np.array([5, 300, 800, 999])
    x0, eps, z = _rand(rng, (4, 6)), _rand(rng, (4, 6)), _rand(rng, (4, 6))
    ab = s.alphas_cumprod[t][:, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[pred]
    ref, ref_x0 = ddpm_step(s, eps, t, x_t, noise=z, clip_sample=False)
    got, got_x0 = ddpm_step(s, out, t, x_t, noise=z, clip_sample=False, prediction_type=pred)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    prev = np.array([0, 250, 600, 950])
    ref, _ = ddim_step(s, eps, t, prev, x_t, clip_sample=False)
    got, _ = ddim_step(s, out, t, prev, x_t, clip_sample=False, prediction_type=pred)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_ddim_step_is_equation_12(backend, rng):
    s = LIN
    t, prev = np.array([999, 500, 20]), np.array([979, 480, -1])
    x_t, eps, z = _rand(rng, (3, 5)), _rand(rng, (3, 5)), _rand(rng, (3, 5))
    for eta in (0.0, 0.3, 1.0):
        got, x0 = ddim_step(s, eps, t, prev, x_t, eta=eta, noise=z, clip_sample=False, backend=backend)
        ab = s.alphas_cumprod[t][:, None]
        ap = np.where(prev >= 0, s.alphas_cumprod[np.maximum(prev, 0)], 1.0)[:, None]
        x0_ref = (x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        sigma = eta * np.sqrt((1 - ap) / (1 - ab) * (1 - ab / ap))  # eq. 16
        expected = np.sqrt(ap) * x0_ref + np.sqrt(1 - ap - sigma ** 2) * eps + sigma * z
        np.testing.assert_allclose(x0, x0_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_ddim_eta_one_equals_respaced_ddpm(rng):
    """With eta = 1, DDIM's sigma is the posterior std of the respaced DDPM step, and its mean equals the
    posterior mean: the two steps agree sample by sample given the same noise (DDIM Sec. 4.1)."""
    for s in (LIN, COS):
        t, prev = np.array([999, 700, 40, 3]), np.array([949, 650, 0, -1])
        x_t, out, z = _rand(rng, (4, 1, 3, 3)), _rand(rng, (4, 1, 3, 3)), _rand(rng, (4, 1, 3, 3))
        for clip in (False, True):
            a, a0 = ddim_step(s, out, t, prev, x_t, eta=1.0, noise=z, clip_sample=clip)
            b, b0 = ddpm_step(s, out, t, x_t, prev_t=prev, noise=z, clip_sample=clip)
            np.testing.assert_allclose(a0, b0, rtol=1e-12)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_eta_zero_is_deterministic(rng):
    x_t, eps = _rand(rng, (2, 3)), _rand(rng, (2, 3))
    a, _ = ddim_step(LIN, eps, 500, 400, x_t, eta=0.0)
    b, _ = ddim_step(LIN, eps, 500, 400, x_t, eta=0.0, noise=_rand(rng, (2, 3)))
    np.testing.assert_array_equal(a, b)
    o = GaussianOracle(LIN, np.zeros(3), np.ones(3))
    x1 = sample(o, LIN, (8, 3), method="ddim", num_steps=20, rng=np.random.default_rng(1))
    xT = np.random.default_rng(1).standard_normal((8, 3), dtype=np.float32)
    x2 = sample(o, LIN, (8, 3), method="ddim", num_steps=20, x_T=xT)
    np.testing.assert_array_equal(x1, x2)


def test_learned_range_interpolates_between_fixed_variances(rng):
    x_t, eps, z = _rand(rng, (2, 2, 3, 3)), _rand(rng, (2, 2, 3, 3)), _rand(rng, (2, 2, 3, 3))
    small, _ = ddpm_step(LIN, eps, 400, x_t, noise=z, clip_sample=False)
    large, _ = ddpm_step(LIN, eps, 400, x_t, noise=z, clip_sample=False, variance_type="fixed_large")
    for v, ref in ((-1.0, small), (1.0, large)):
        out = np.concatenate([eps, np.full_like(eps, v)], axis=1)
        got, _ = ddpm_step(LIN, out, 400, x_t, noise=z, clip_sample=False, variance_type="learned_range")
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    # midway: the geometric mean of the two variances (interpolation in log space)
    out = np.concatenate([eps, np.zeros_like(eps)], axis=1)
    mid, _ = ddpm_step(LIN, out, 400, x_t, noise=z, clip_sample=False, variance_type="learned_range")
    mean, _ = ddpm_step(LIN, eps, 400, x_t, noise=np.zeros_like(z), clip_sample=False)
    sd = np.sqrt(np.sqrt(LIN.posterior_variance[400] * LIN.betas[400]))
    np.testing.assert_allclose(mid, mean + sd * z, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("s", [LIN, COS], ids=["linear", "cosine"])
def test_learned_range_respaced_is_equation_15(s, backend, rng):
    """Nichol & Dhariwal 2021 eq. 15, Sigma = exp(v log beta + (1 - v) log beta~), at several t and with
    skipped steps (prev_t != t - 1), where beta and beta~ are those of the respaced step (improved-diffusion
    respace.py): beta = 1 - abar_t / abar_prev, beta~ = (1 - abar_prev) / (1 - abar_t) beta. Written out
    here elementwise, independently of ddpm_step's coefficients."""
    t = np.array([999, 700, 333, 40, 7, 1])
    prev = np.array([949, 500, 300, 0, 2, 0])  # gaps of 50, 200, 33, 40, 5 and 1 (the unrespaced case)
    n, c = len(t), 2
    x_t, eps, z = _rand(rng, (n, c, 3, 3)), _rand(rng, (n, c, 3, 3)), _rand(rng, (n, c, 3, 3))
    v_out = rng.uniform(-1.0, 1.0, (n, c, 3, 3))  # the model's interpolation output, per element
    got, x0 = ddpm_step(s, np.concatenate([eps, v_out], axis=1), t, x_t, prev_t=prev, noise=z, clip_sample=False,
                        variance_type="learned_range", backend=backend)
    for i in range(n):
        ab, ap = s.alphas_cumprod[t[i]], s.alphas_cumprod[prev[i]]
        beta = 1.0 - ab / ap
        beta_tilde = (1.0 - ap) / (1.0 - ab) * beta
        x0_ref = (x_t[i] - np.sqrt(1.0 - ab) * eps[i]) / np.sqrt(ab)  # DDPM eq. 15
        mean = np.sqrt(ap) * beta / (1.0 - ab) * x0_ref + np.sqrt(1.0 - beta) * (1.0 - ap) / (1.0 - ab) * x_t[i]
        frac = (v_out[i] + 1.0) / 2.0  # [-1, 1] -> [0, 1] (improved-diffusion's model_var_values)
        var = np.exp(frac * np.log(beta) + (1.0 - frac) * np.log(beta_tilde))  # eq. 15
        np.testing.assert_allclose(x0[i], x0_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[i], mean + np.sqrt(var) * z[i], rtol=1e-9, atol=1e-12, err_msg=f"t={t[i]}")
    # the respaced variance really differs from the unrespaced one: the test can tell them apart
    assert not np.isclose(1.0 - s.alphas_cumprod[700] / s.alphas_cumprod[500], s.betas[700], rtol=0.1)


def _ddim_eq12(s, eps, x_t, t, ap, eta, z):
    """DDIM eq. 12 with eq. 16's sigma, for given abar_prev ``ap`` (shape (N, 1)), no clipping."""
    ab = s.alphas_cumprod[t][:, None]
    x0 = (x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    sigma = eta * np.sqrt((1 - ap) / (1 - ab) * (1 - ab / ap))
    return np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma ** 2) * eps + sigma * z


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_final_alpha_cumprod_is_abar_prev_of_the_final_step(backend, rng):
    """DDIM eq. 12 with abar_prev = final_alpha_cumprod at prev_t = -1; the other samples of the batch (prev_t
    >= 0) are untouched by it."""
    s = LIN
    t, prev = np.array([300, 300, 150]), np.array([-1, 250, -1])
    x_t, eps, z = _rand(rng, (3, 5)), _rand(rng, (3, 5)), _rand(rng, (3, 5))
    lowest = s.alphas_cumprod[150]  # the smallest value allowed for this batch: the largest final abar_t (0.786)
    for f in (1.0, 0.999, 0.9, lowest):
        ap = np.array([f, s.alphas_cumprod[250], f])[:, None]
        for eta in (0.0, 0.5, 1.0):
            got, _ = ddim_step(s, eps, t, prev, x_t, eta=eta, noise=z, clip_sample=False, final_alpha_cumprod=f,
                               backend=backend)
            np.testing.assert_allclose(got, _ddim_eq12(s, eps, x_t, t, ap, eta, z), rtol=1e-10, atol=1e-10,
                                       err_msg=f"final_alpha_cumprod={f}, eta={eta}")
    # f = abar_t: the final step stays at the noise level of x_t, so (unclipped) it returns x_t itself
    same, _ = ddim_step(s, eps, 150, -1, x_t, eta=1.0, noise=z, clip_sample=False, final_alpha_cumprod=lowest)
    np.testing.assert_allclose(same, x_t, rtol=1e-10, atol=1e-10)
    # and the value matters: 0.9 and 1.0 give different final samples
    a, _ = ddim_step(s, eps, 150, -1, x_t, clip_sample=False, final_alpha_cumprod=0.9)
    b, _ = ddim_step(s, eps, 150, -1, x_t, clip_sample=False)
    assert np.abs(a - b).max() > 0.1


def _diffusers_ddim(model, alphas_cumprod, x_T, timesteps, set_alpha_to_one, eta=0.0, rng=None):
    """diffusers' DDIMScheduler.step loop, written out here (no clipping): the final step's alpha_prod_t_prev is
    ``final_alpha_cumprod = 1.0 if set_alpha_to_one else alphas_cumprod[0]``."""
    final_alpha_cumprod = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    x = x_T.astype(np.float64)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = model(x, np.full(x.shape[0], t, dtype=np.int64))
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            x = x + std * rng.standard_normal(x.shape)
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_final_alpha_cumprod_set_alpha_to_one_false(spacing):
    """diffusers' set_alpha_to_one=False is final_alpha_cumprod = alphas_cumprod[0]: the whole DDIM loop matches
    an independent loop with that rule, and differs from set_alpha_to_one=True (the default, 1.0)."""
    s = LIN
    oracle = GaussianOracle(s, np.array([0.3, -0.5, 0.0]), np.array([0.5, 1.0, 0.2]))
    x_T = np.random.default_rng(0).standard_normal((16, 3))
    ts = inference_timesteps(1000, 10, spacing).tolist()
    ref_false = _diffusers_ddim(oracle, s.alphas_cumprod, x_T, ts, set_alpha_to_one=False)
    ref_true = _diffusers_ddim(oracle, s.alphas_cumprod, x_T, ts, set_alpha_to_one=True)
    got_false, traj = sample(oracle, s, x_T.shape, method="ddim", num_steps=10, spacing=spacing, x_T=x_T,
                             clip_sample=False, final_alpha_cumprod=s.alphas_cumprod[0], return_trajectory=True)
    got_true = sample(oracle, s, x_T.shape, method="ddim", num_steps=10, spacing=spacing, x_T=x_T, clip_sample=False)
    np.testing.assert_allclose(got_false, ref_false, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_true, ref_true, rtol=1e-9, atol=1e-9)
    assert np.abs(got_false - got_true).max() > 1e-4
    if spacing == "leading":  # the last step is t = 0 -> abar_prev = abar_0: it leaves x_t where it is
        np.testing.assert_allclose(traj[-1]["x_t"], traj[-2]["x_t"], rtol=1e-9, atol=1e-12)
    # with eta > 0 too (the noise of the final step is zero for leading spacing, nonzero for trailing)
    g = sample(oracle, s, x_T.shape, method="ddim", num_steps=10, spacing=spacing, x_T=x_T, eta=0.7,
               rng=np.random.default_rng(4), clip_sample=False, final_alpha_cumprod=s.alphas_cumprod[0])
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_final_alpha_cumprod_below_abar_t_is_refused(eta, rng):
    """A final_alpha_cumprod below abar_t of the final step used to give all-NaN samples (eta = 0 included:
    0 * sqrt(negative)); it is a ValueError naming the argument and the abar_t it may not be below."""
    from difnumpy.samplers import ddim_coefficients

    s = LIN
    x = _rand(rng, (2, 3))
    abar0 = s.alphas_cumprod[0]
    with pytest.raises(ValueError, match=r"final_alpha_cumprod=0\.5 is below alphas_cumprod\[t\]=0\.9999"):
        ddim_step(s, x, 0, -1, x, eta=eta, final_alpha_cumprod=0.5, rng=rng if eta else None)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):  # one final sample in the batch is enough
        ddim_step(s, x, np.array([500, 300]), np.array([400, -1]), x, eta=eta, final_alpha_cumprod=0.05,
                  rng=rng if eta else None)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):  # just below abar_t
        ddim_step(s, x, 0, -1, x, eta=eta, final_alpha_cumprod=np.nextafter(abar0, 0.0), rng=rng if eta else None)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):  # the CUDA loop calls the coefficients directly
        ddim_coefficients(s, np.array([0]), np.array([-1]), eta, "epsilon", 0.5)
    o = GaussianOracle(s, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        sample(o, s, (4, 3), method="ddim", num_steps=10, eta=eta, final_alpha_cumprod=0.5,
               rng=np.random.default_rng(0))
    # the same value is fine where no final step is taken, and any value in [abar_t, 1] is fine at the final step
    ddim_step(s, x, 500, 400, x, final_alpha_cumprod=0.5)
    ddim_coefficients(s, np.array([999]), np.array([-1]), eta, "epsilon", 0.5)
    for f in (abar0, 1.0):
        out, _ = ddim_step(s, x, 0, -1, x, eta=eta, final_alpha_cumprod=f, rng=rng if eta else None)
        assert np.all(np.isfinite(out))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="final_alpha_cumprod must lie in"):
            ddim_step(s, x, 0, -1, x, final_alpha_cumprod=bad)
    for bad in ("1.0", None, True):
        with pytest.raises(TypeError, match="final_alpha_cumprod"):
            ddim_step(s, x, 0, -1, x, final_alpha_cumprod=bad)


def test_clipping_and_dynamic_thresholding(rng):
    x_t = 3 * _rand(rng, (4, 50))
    eps = _rand(rng, (4, 50))
    _, x0 = ddpm_step(LIN, eps, 999, x_t, noise=np.zeros_like(x_t))
    assert np.abs(x0).max() <= 1.0 and np.isclose(np.abs(x0).max(), 1.0)
    _, x0 = ddpm_step(LIN, eps, 999, x_t, noise=np.zeros_like(x_t), clip_sample=True, clip_range=2.5)
    assert np.abs(x0).max() <= 2.5
    _, raw = ddpm_step(LIN, eps, 999, x_t, noise=np.zeros_like(x_t), clip_sample=False)
    _, thr = ddpm_step(LIN, eps, 999, x_t, noise=np.zeros_like(x_t), thresholding=True,
                       dynamic_thresholding_ratio=0.9, sample_max_value=50.0)
    s = np.clip(np.quantile(np.abs(raw), 0.9, axis=1), 1.0, 50.0)[:, None]
    np.testing.assert_allclose(thr, np.clip(raw, -s, s) / s, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- analytic oracle

def chain_moments(s, mu, sd, method, ts, variance_type="fixed_small"):
    """Exact mean and variance of the sampler's output for data N(mu, sd^2) and the exact denoiser.

    With the oracle every step is affine in x_t: x_prev = g x_t + h + sigma z, so the moments follow
    m <- g m + h and v <- g^2 v + sigma^2 from x_T ~ N(0, 1). Written from the papers' formulas,
    independently of difnumpy's samplers.
    """
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i, t in enumerate(ts):
        pt = ts[i + 1] if i + 1 < len(ts) else -1
        ab = s.alphas_cumprod[t]
        ap = s.alphas_cumprod[pt] if pt >= 0 else 1.0
        sa, s1 = np.sqrt(ab), np.sqrt(1 - ab)
        var = ab * sd ** 2 + 1 - ab
        k, e = sa * sd ** 2 / var, s1 / var  # E[x0|x_t] = mu + k (x_t - sa mu), E[eps|x_t] = e (x_t - sa mu)
        if method == "ddpm":
            beta = 1 - ab / ap
            c1, c2 = np.sqrt(ap) * beta / (1 - ab), np.sqrt(1 - beta) * (1 - ap) / (1 - ab)  # eq. 7
            g, h = c1 * k + c2, c1 * (mu - k * sa * mu)
            sig2 = 0.0 if pt < 0 else (beta * (1 - ap) / (1 - ab) if variance_type == "fixed_small" else beta)
        else:  # DDIM eq. 12, eta = 0
            g = np.sqrt(ap) * k + np.sqrt(1 - ap) * e
            h = np.sqrt(ap) * (mu - k * sa * mu) - np.sqrt(1 - ap) * e * sa * mu
            sig2 = 0.0
        m, v = g * m + h, g * g * v + sig2
    return m, v


MU = np.array([0.5, -1.0, 0.0, 2.0])
SD = np.array([0.3, 1.0, 2.0, 0.1])


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("method,num_steps", [("ddpm", 1000), ("ddim", 50)])
def test_oracle_samples_have_the_predicted_moments(pred, method, num_steps):
    n = 6_000
    oracle = GaussianOracle(LIN, MU, SD, pred)
    x = sample(oracle, LIN, (n, 4), method=method, num_steps=num_steps, rng=np.random.default_rng(0),
               clip_sample=False, prediction_type=pred, dtype=np.float64)
    m, v = chain_moments(LIN, MU, SD, method, inference_timesteps(1000, num_steps))
    assert np.all(np.abs(x.mean(0) - m) < Z * np.sqrt(v / n)), (x.mean(0), m)
    assert np.all(np.abs(x.var(0, ddof=1) - v) < Z * v * np.sqrt(2 / (n - 1))), (x.var(0), v)
    # the samplers' own discretisation error, from the exact moments (no sampling noise):
    assert np.all(np.abs(m - MU) < 0.01 * np.maximum(SD, 1))
    if method == "ddpm":
        # fixed_small under-disperses a little (DDPM Sec. 3.2: it is optimal for deterministic x0)
        assert np.all((v / SD ** 2 > 0.92) & (v / SD ** 2 < 1.0))
    else:
        # deterministic DDIM-50 contracts narrow distributions most: 0.61 of s^2 at s = 0.1, 0.94 at s = 2
        assert np.all((v / SD ** 2 > 0.55) & (v / SD ** 2 < 1.0))
        m1000, v1000 = chain_moments(LIN, MU, SD, "ddim", inference_timesteps(1000, 1000))
        assert np.all(np.abs(v1000 / SD ** 2 - 1) < 0.04)  # and converges as the steps shrink


def test_fixed_large_is_exact_for_unit_variance_data():
    """DDPM Sec. 3.2: sigma^2 = beta_t is the optimal reverse variance for x0 ~ N(0, I)."""
    m, v = chain_moments(LIN, np.array([0.0, 3.0]), np.array([1.0, 1.0]), "ddpm", np.arange(999, -1, -1),
                         "fixed_large")
    np.testing.assert_allclose(v, 1.0, atol=2e-4)
    n = 6_000
    oracle = GaussianOracle(LIN, np.array([0.0, 3.0]), np.array([1.0, 1.0]))
    x = sample(oracle, LIN, (n, 2), rng=np.random.default_rng(3), clip_sample=False, variance_type="fixed_large",
               dtype=np.float64)
    assert np.all(np.abs(x.var(0, ddof=1) - 1.0) < Z * np.sqrt(2 / (n - 1)))
    assert np.all(np.abs(x.mean(0) - [0.0, 3.0]) < Z / np.sqrt(n))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_invert_then_sample_reconstructs(spacing, rng):
    mu, sd = np.array([0.3, -0.5, 0.0]), np.array([0.5, 1.0, 0.8])
    oracle = GaussianOracle(COS, mu, sd)
    x0 = rng.normal(mu, sd, (16, 3))
    errs = []
    for S in (50, 250):
        xT = ddim_invert(oracle, COS, x0, S, spacing=spacing)
        rec = sample(oracle, COS, x0.shape, method="ddim", num_steps=S, spacing=spacing, x_T=xT, clip_sample=False)
        errs.append(np.abs(rec - x0).max())
        assert xT.shape == x0.shape and np.all(np.isfinite(xT))
    assert errs[0] < 0.08 and errs[1] < errs[0] / 3  # first-order: error shrinks with the step size


def test_sample_progressive_visits_the_timestep_list(rng):
    o = GaussianOracle(LIN, np.zeros(2), np.ones(2))
    steps = list(sample_progressive(o, LIN, (3, 2), method="ddim", num_steps=7, spacing="trailing", rng=rng))
    ts = inference_timesteps(1000, 7, "trailing")
    assert [d["t"] for d in steps] == ts.tolist()
    assert [d["prev_t"] for d in steps] == ts[1:].tolist() + [-1]
    assert all(d["x_t"].shape == (3, 2) and d["x0_pred"].shape == (3, 2) for d in steps)
    x, traj = sample(o, LIN, (3, 2), method="ddpm", num_steps=10, rng=np.random.default_rng(5), return_trajectory=True)
    assert len(traj) == 10 and x is traj[-1]["x_t"] and x.dtype == np.float32
    y = sample(o, LIN, (3, 2), method="ddpm", num_steps=10, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(x, y)  # same seed, same samples
    # a given x_T with an rng for the step noise is reproducible too (DDPM needs noise at every step)
    xT = np.ones((3, 2), np.float32)
    a = sample(o, LIN, (3, 2), num_steps=10, x_T=xT, rng=np.random.default_rng(9))
    b = sample(o, LIN, (3, 2), num_steps=10, x_T=xT, rng=np.random.default_rng(9))
    c = sample(o, LIN, (3, 2), num_steps=10, x_T=xT, rng=np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the model is called with the original (not respaced) timesteps, as an int64 batch
    seen = []
    sample(lambda x, t: seen.append(t.copy()) or np.zeros_like(x), LIN, (2, 1), method="ddim", num_steps=4, rng=rng)
    assert [int(t[0]) for t in seen] == inference_timesteps(1000, 4).tolist()
    assert all(t.dtype == np.int64 and t.shape == (2,) for t in seen)


def test_sampler_bad_input(rng):
    x = _rand(rng, (2, 3))
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm_step(LIN, x, 5, x, prediction_type="score", noise=x)
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step(LIN, x, 5, x, variance_type="learned", noise=x)
    with pytest.raises(ValueError, match="model_output must have shape"):
        ddpm_step(LIN, _rand(rng, (2, 4)), 5, x, noise=x)
    with pytest.raises(ValueError, match="t must lie"):
        ddpm_step(LIN, x, 1000, x, noise=x)
    with pytest.raises(ValueError, match="prev_t must be smaller"):
        ddim_step(LIN, x, 5, 7, x)
    with pytest.raises(ValueError, match="either noise= or rng="):
        ddpm_step(LIN, x, 5, x, noise=x, rng=rng)
    with pytest.raises(ValueError, match="noise must have the shape"):
        ddpm_step(LIN, x, 5, x, noise=_rand(rng, (3, 3)))
    with pytest.raises(ValueError, match="eta"):
        ddim_step(LIN, x, 5, 4, x, eta=-1.0)
    with pytest.raises(ValueError, match="method"):
        sample(lambda x, t: x, LIN, (2, 3), method="rk4", rng=rng)
    with pytest.raises(ValueError, match="num_steps"):
        sample(lambda x, t: x, LIN, (2, 3), method="ddim", num_steps=1001, rng=rng)
    with pytest.raises(ValueError, match="either x_T= or rng="):
        sample(lambda x, t: x, LIN, (2, 3), method="ddim", x_T=x, rng=rng)
    with pytest.raises(ValueError, match="spacing"):
        sample(lambda x, t: x, LIN, (2, 3), spacing="uniform", rng=rng)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sample(lambda x, t: x, LIN, (2, 3), method="ddim", variance_type="fixed_large", rng=rng)
    zt = Schedule.from_name("linear", 10, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ddpm_step(zt, x, 9, x, noise=x)
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="x_t contains NaN"):
        ddpm_step(LIN, x, 5, x_nan, noise=x)


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_zero_terminal_snr_sampling_emits_no_warnings(pred, rng):
    """Steps and whole loops on a zero-terminal-SNR schedule (abar_{T-1} == 0) must not warn: every coefficient is
    computed from the gathered abar_t, never from the whole buffer."""
    zt = Schedule.from_name("linear", 100, zero_terminal_snr=True)
    x = _rand(rng, (3, 2, 2, 2))
    t, prev = np.array([99, 50, 0]), np.array([89, 0, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddpm_step(zt, x, t, x, prev_t=prev, rng=rng, prediction_type=pred)
        ddpm_step(zt, np.concatenate([x, x * 0], axis=1), t, x, prev_t=prev, rng=rng, prediction_type=pred,
                  variance_type="learned_range")
        ddim_step(zt, x, t, prev, x, eta=0.5, rng=rng, prediction_type=pred)
        ddpm_step(zt, x, np.array([5, 6, 7]), x, rng=rng)  # epsilon wherever abar > 0
        for method in ("ddpm", "ddim"):
            out = sample(lambda a, b: np.zeros_like(a), zt, (2, 3), method=method, num_steps=10, spacing="trailing",
                         prediction_type=pred, rng=np.random.default_rng(0))
            assert np.all(np.isfinite(out))
