"""Tests for difnumpy.metrics: the digit classifier, Frechet distance, sample scores, bits/dim."""
import json
import math

import numpy as np
import pytest
from scipy import special

from difnumpy import metrics
from difnumpy.data import load_digits


# ----------------------------------------------------------------------------- classifier
def test_classifier_accuracy_on_test_split():
    x, y = load_digits("test", return_labels=True)
    probs = metrics.predict_proba(x)
    assert probs.shape == (360, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    acc = float(np.mean(probs.argmax(axis=1) == y))
    assert acc > 0.9, acc


def test_numpy_forward_matches_sklearn():
    clf = metrics.get_digit_classifier()
    assert clf is metrics.get_digit_classifier()  # cached
    x = load_digits("test")[:50]
    np.testing.assert_allclose(metrics.predict_proba(x), clf.predict_proba(x.reshape(50, 64).astype(np.float64)),
                               rtol=1e-10, atol=1e-12)
    f = metrics.features(x)
    assert f.shape == (50, 64) and f.dtype == np.float64 and f.min() >= 0.0
    np.testing.assert_array_equal(f, metrics.features(x.reshape(50, 64)))  # both layouts


def test_classifier_input_validation():
    with pytest.raises(ValueError, match="x must have shape"):
        metrics.features(np.zeros((3, 1, 7, 7)))
    with pytest.raises(TypeError, match="x must be an ndarray"):
        metrics.features([[0.0] * 64])
    bad = np.zeros((2, 64))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.predict_proba(bad)


# ----------------------------------------------------------------------------- Frechet distance
def test_fd_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((300, 8)) * 2.0 + 1.0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    d_ab, d_ba = metrics.frechet_distance(a, b), metrics.frechet_distance(b, a)
    assert d_ab > 1.0
    assert d_ab == pytest.approx(d_ba, rel=1e-8)


def test_fd_shifted_equal_covariance_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    # same samples shifted: identical sample covariance, mean difference exactly delta
    assert metrics.frechet_distance(a, a + delta) == pytest.approx(delta @ delta, rel=1e-7)


def test_fd_from_stats_closed_forms():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    # commuting (diagonal, then jointly rotated) covariances: sum of (sqrt(l1) - sqrt(l2))^2
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expect, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fd_singular_covariances_stay_finite():
    rng = np.random.default_rng(3)
    a = np.zeros((10, 20))  # N < D and a dead feature: rank-deficient covariances
    a[:, :5] = rng.standard_normal((10, 5))
    b = a.copy()
    b[:, :5] += 0.5
    d = metrics.frechet_distance(a, b)
    assert np.isfinite(d) and d == pytest.approx(5 * 0.25, rel=1e-3)


def test_fd_rejects_non_covariance_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance_from_stats(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="feature dimension"):
        metrics.frechet_distance(np.ones((5, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="sigma1"):
        metrics.frechet_distance_from_stats(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- evaluate_samples
def test_real_data_scores_better_than_noise():
    rng = np.random.default_rng(0)
    train = load_digits("train")
    real = train[rng.choice(len(train), 300, replace=False)]
    noise = np.clip(rng.standard_normal((300, 1, 8, 8)), -1, 1).astype(np.float32)
    m_real = metrics.evaluate_samples(real, np.random.default_rng(1))
    m_noise = metrics.evaluate_samples(noise, np.random.default_rng(1))
    json.dumps(m_real)  # JSON-serialisable
    for m in (m_real, m_noise):
        assert m["n_samples"] == 300 and m["floor_size"] == 300
        assert len(m["class_histogram"]) == 10
        assert sum(m["class_histogram"]) == pytest.approx(1.0)
        assert m["fd_noise"] > 20 * m["fd_floor"] > 0
    # real digits: near the floor, confidently classified, all classes present
    assert m_real["fd"] < 2.0 * m_real["fd_floor"]
    assert m_real["confident_fraction"] > 0.9
    assert 0.05 < m_real["class_fraction_min"] and m_real["class_fraction_max"] < 0.15
    # noise: far away and unsure
    assert m_noise["fd"] > 10 * m_real["fd"]
    assert m_noise["confident_fraction"] < 0.5
    assert m_noise["mean_confidence"] < m_real["mean_confidence"]
    # the same rng seed gives the same numbers
    assert metrics.evaluate_samples(real, np.random.default_rng(1)) == m_real


def test_evaluate_samples_validation():
    x = load_digits("test")[:10]
    with pytest.raises(TypeError, match="rng"):
        metrics.evaluate_samples(x, 0)
    with pytest.raises(ValueError, match="N=1"):
        metrics.evaluate_samples(x[:1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="samples must have shape"):
        metrics.evaluate_samples(np.zeros((10, 1, 28, 28)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="confidence_threshold"):
        metrics.evaluate_samples(x, np.random.default_rng(0), confidence_threshold=0.0)
    with pytest.raises(ValueError, match="floor_repeats"):
        metrics.evaluate_samples(x, np.random.default_rng(0), floor_repeats=0)


# ----------------------------------------------------------------------------- bits per dim
def _schedule(T=1000, name="linear"):
    from difnumpy.schedules import Schedule

    return Schedule.from_name(name, T)


def _oracle(schedule, s, shape, prediction_type="epsilon"):
    from difnumpy.testing import GaussianOracle

    return GaussianOracle(schedule, np.zeros(shape), np.full(shape, s), prediction_type=prediction_type)


def _expected_kl_bits(schedule, x0, s):
    """E over the noise of sum_{t>=1} KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for the exact
    Gaussian-data denoiser (no clipping), in bits per dim: the means differ by
    coef1_t (x0 - k_t x_t) with k_t = sqrt(abar) s^2 / (abar s^2 + 1 - abar), variances are equal."""
    ab = schedule.alphas_cumprod[1:]
    k = np.sqrt(ab) * s**2 / (ab * s**2 + 1.0 - ab)
    m2 = np.mean(x0.astype(np.float64) ** 2)
    err = (1.0 - k * np.sqrt(ab)) ** 2 * m2 + k**2 * (1.0 - ab)
    kl = 0.5 * schedule.posterior_mean_coef1[1:] ** 2 * err / schedule.posterior_variance[1:]
    return kl.sum() / math.log(2)


def test_bpd_kl_terms_match_closed_form_for_gaussian_oracle():
    sch = _schedule()
    s = 0.3
    x0 = s * np.random.default_rng(0).standard_normal((128, 1, 4, 4))
    expect = _expected_kl_bits(sch, x0, s)
    r = metrics.bits_per_dim(_oracle(sch, s, (1, 4, 4)), sch, x0, np.random.default_rng(1), clip_denoised=False)
    assert r["exact"] and r["num_timesteps_evaluated"] == 1000 and r["dims"] == 16
    assert r["kl_bpd"] == pytest.approx(expect, rel=0.02)
    # log-spaced subsampling: an estimate within a few percent with 10x fewer model calls
    r100 = metrics.bits_per_dim(_oracle(sch, s, (1, 4, 4)), sch, x0, np.random.default_rng(2),
                                clip_denoised=False, num_timesteps_subsample=100)
    assert not r100["exact"] and r100["num_timesteps_evaluated"] == 101
    assert r100["kl_bpd"] == pytest.approx(expect, rel=0.03)
    # every prediction type gives the same bound for the same (exact) denoiser and noise
    for pt in ("sample", "v_prediction"):
        r_pt = metrics.bits_per_dim(_oracle(sch, s, (1, 4, 4), pt), sch, x0, np.random.default_rng(2),
                                    clip_denoised=False, num_timesteps_subsample=100, prediction_type=pt)
        assert r_pt["bpd"] == pytest.approx(r100["bpd"], rel=1e-9)


def test_bpd_subsample_gives_exactly_k_timesteps_for_every_k():
    """num_timesteps_subsample=k evaluates exactly k KL timesteps for every k in 1..T-2 (T = 1000): distinct,
    ascending, log-spaced blocks that cover 1..T-1 once. Rounding one geomspace used to cap this at 423 (any
    k from 424 to 998 gave 423). k >= T-1 is the exact bound over all T-1 KL terms."""
    T = 1000
    for k in range(1, T + 1):
        ts, w = metrics._kl_timesteps(T, k)
        expect = min(k, T - 1)
        assert ts.shape == (expect,) and w.shape == (expect,), (k, ts.shape)
        assert np.all(np.diff(ts) > 0) and ts[0] >= 1 and ts[-1] <= T - 1, k
        # blocks [e_i, e_i + w_i) tile 1..T-1 and each timestep lies inside its own block
        edges = np.concatenate([[1], 1 + np.cumsum(w)]).astype(np.int64)
        assert edges[-1] == T and np.all(w >= 1), k
        assert np.all((ts >= edges[:-1]) & (ts < edges[1:])), k
        if k < T - 1:
            assert np.all(np.diff(w) >= -1), k  # block sizes grow (log spacing), up to rounding
    assert metrics._kl_timesteps(T, 10)[0][:2].tolist() == [1, 2]  # small t (largest terms) sampled singly


def test_bpd_reports_the_number_of_timesteps_it_evaluated():
    sch = _schedule(1000)
    x0 = np.zeros((1, 1, 1, 1))
    for k in (1, 423, 424, 700, 998, 999, 1000):
        calls = []
        model = lambda x, t: calls.append(int(t[0])) or np.zeros_like(x)  # noqa: E731
        r = metrics.bits_per_dim(model, sch, x0, np.random.default_rng(0), num_timesteps_subsample=k)
        kl_calls = min(k, 999)
        assert len(calls) == kl_calls + 1 and len(set(calls)) == kl_calls + 1, k  # + the decoder at t = 0
        assert r["num_timesteps_evaluated"] == kl_calls + 1 and r["exact"] == (k >= 999), k


def test_bpd_on_zero_terminal_snr_schedule_emits_no_warnings():
    import warnings

    from difnumpy.schedules import Schedule

    zt = Schedule.from_name("cosine", 50, zero_terminal_snr=True)
    x0 = np.random.default_rng(0).uniform(-1, 1, (4, 1, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for vt in ("fixed_small", "fixed_large"):
            r = metrics.bits_per_dim(lambda x, t: np.zeros_like(x), zt, x0, np.random.default_rng(1),
                                     prediction_type="v_prediction", variance_type=vt)
            assert math.isfinite(r["bpd"])


def test_bpd_prior_term_closed_form():
    sch = _schedule(100)
    x0 = np.random.default_rng(0).uniform(-1, 1, (8, 1, 2, 2))
    r = metrics.bits_per_dim(lambda x, t: np.zeros_like(x), sch, x0, np.random.default_rng(0),
                             num_timesteps_subsample=3)
    ab = sch.alphas_cumprod[-1]
    kl = 0.5 * (-1.0 - np.log1p(-ab) + (1.0 - ab) + ab * x0**2)  # KL(N(sqrt(ab) x0, 1-ab) || N(0, 1))
    assert r["prior_bpd"] == pytest.approx(kl.mean() / math.log(2), rel=1e-10)


def test_bpd_perfect_x0_model_has_zero_kl_and_closed_form_decoder():
    """A model that returns the true x0 makes every KL term exactly zero; the decoder term is then
    -log2 P(bin) of a Gaussian centred on the bin with std sqrt(posterior_variance[1])."""
    sch = _schedule(200)
    rng = np.random.default_rng(0)
    x0 = (rng.integers(0, 17, size=(32, 1, 4, 4)) / 8.0 - 1.0).astype(np.float32)
    x0[0, 0, 0, :2] = (-1.0, 1.0)  # both edge bins present
    cheat = lambda x_t, t: x0.copy()  # noqa: E731 - sees the whole batch in order
    for bin_width in (2.0 / 16.0, 2.0 / 255.0):
        r = metrics.bits_per_dim(cheat, sch, x0, np.random.default_rng(1), prediction_type="sample",
                                 bin_width=bin_width, num_timesteps_subsample=10)
        assert r["kl_bpd"] == pytest.approx(0.0, abs=1e-9)
        sd = math.sqrt(sch.posterior_variance[1])
        h = bin_width / 2.0 / sd
        x = x0.astype(np.float64)
        inner = -np.log2(special.erf(h / math.sqrt(2)))
        edge = -np.log2(special.ndtr(h))
        expect = np.where((x <= -1.0) | (x >= 1.0), edge, inner).mean()
        assert r["decoder_bpd"] == pytest.approx(expect, rel=1e-6, abs=1e-9)
        assert r["bpd"] == pytest.approx(r["prior_bpd"] + r["decoder_bpd"], rel=1e-12)


def test_bpd_oracle_beats_bad_models_and_respects_entropy_bound():
    sch = _schedule(1000)
    s = 0.2
    x0 = s * np.random.default_rng(0).standard_normal((64, 1, 4, 4))
    kw = dict(num_timesteps_subsample=50)
    good = metrics.bits_per_dim(_oracle(sch, s, (1, 4, 4)), sch, x0, np.random.default_rng(1), **kw)
    zero = metrics.bits_per_dim(lambda x, t: np.zeros_like(x), sch, x0, np.random.default_rng(1), **kw)
    noisy = metrics.bits_per_dim(lambda x, t: np.random.default_rng(int(t[0])).standard_normal(x.shape),
                                 sch, x0, np.random.default_rng(1), **kw)
    assert good["bpd"] + 0.5 < zero["bpd"] < noisy["bpd"]
    # E[bound] >= cross-entropy >= entropy of the 8-bit-binned Gaussian data
    entropy = 0.5 * math.log2(2 * math.pi * math.e * s * s) - math.log2(2.0 / 255.0)
    assert good["bpd"] > entropy - 3 * good["bpd_sem"]
    assert good["bpd"] < entropy + 1.5


def test_bpd_learned_range_at_minus_one_equals_fixed_small():
    sch = _schedule(100)
    s = 0.3
    x0 = s * np.random.default_rng(0).standard_normal((16, 2, 3, 3)).astype(np.float32)
    orc = _oracle(sch, s, (2, 3, 3))
    learned = lambda x, t: np.concatenate([orc(x, t), -np.ones_like(x)], axis=1)  # noqa: E731
    a = metrics.bits_per_dim(orc, sch, x0, np.random.default_rng(5))
    b = metrics.bits_per_dim(learned, sch, x0, np.random.default_rng(5))  # inferred from 2C channels
    c = metrics.bits_per_dim(learned, sch, x0, np.random.default_rng(5), batch_size=5)
    assert b["bpd"] == pytest.approx(a["bpd"], rel=1e-6) and c["bpd"] == pytest.approx(a["bpd"], rel=1e-6)
    large = metrics.bits_per_dim(orc, sch, x0, np.random.default_rng(5), variance_type="fixed_large")
    assert large["bpd"] != pytest.approx(a["bpd"], rel=1e-3)


def test_bpd_validation():
    sch = _schedule(10)
    x0 = np.zeros((2, 1, 2, 2))
    zero = lambda x, t: np.zeros_like(x)  # noqa: E731
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="prediction_type"):
        metrics.bits_per_dim(zero, sch, x0, rng, prediction_type="x0")
    with pytest.raises(ValueError, match="num_timesteps_subsample"):
        metrics.bits_per_dim(zero, sch, x0, rng, num_timesteps_subsample=0)
    with pytest.raises(TypeError, match="rng"):
        metrics.bits_per_dim(zero, sch, x0, 0)
    with pytest.raises(TypeError, match="schedule"):
        metrics.bits_per_dim(zero, "linear", x0, rng)
    with pytest.raises(ValueError, match="model output must have shape"):
        metrics.bits_per_dim(lambda x, t: np.zeros((2, 3, 2, 2)), sch, x0, rng)
    with pytest.raises(ValueError, match="NaN"):
        metrics.bits_per_dim(lambda x, t: np.full_like(x, np.nan), sch, x0, rng)
    with pytest.raises(ValueError, match="bin_width"):
        metrics.bits_per_dim(zero, sch, x0, rng, bin_width=0.0)
