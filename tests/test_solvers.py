"""Verification tests for the few-step solvers (difnumpy.solvers): measured orders of convergence, the
moments of the stochastic methods, backend agreement and input checks. Parity with diffusers is in
test_solvers_parity.py.

Order of convergence (a textbook test). For Gaussian data N(mu, s^2) the probability-flow ODE has a closed-form
solution: z = (x_t - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar) is constant along it, so the exact x0 of a
trajectory started at x_T is mu + s z_T, and each solver's global error is known. Driven by the exact denoiser
*at the solver's own noise level* (``SigmaOracle``: the k-th model call gets the k-th sigma of
``schedule_sigmas``), the error is the solver's discretisation error alone; its log-log slope against the
number of steps is the order: 1 for DDIM and Euler, 2 for Heun and DPM-Solver++(2M), 3 for DPM-Solver++(3M).

The schedule is log-linear in sigma from 1e-5 to 80 (EDM's sigma_max): the last step of every solver goes from
sigma_min to 0 in one first-order step whose error is z sigma_min^2 / (2 s) -- with the usual sigma_min of
0.01 that floor (5e-5) would hide the third-order error. The solvers use Karras sigmas (Karras et al. eq. 5):
a smooth grid, so the asymptotic slope shows from about 30 steps on.
"""
import numpy as np
import pytest

from difnumpy import Schedule, sample
from difnumpy import solvers
from difnumpy.kernels import get_backend
from difnumpy.samplers import ddim_step, inference_timesteps
from difnumpy.testing import GaussianOracle

T = 1000
Z = 5.0  # standard errors
MU, S_DATA = 0.3, 0.5


def log_sigma_schedule(sigma_min=1e-5, sigma_max=80.0, T=T) -> Schedule:
    """abar_t = 1 / (1 + sigma_t^2) with log sigma_t linear in t."""
    sig = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), T))
    abar = 1.0 / (1.0 + sig ** 2)
    return Schedule(1.0 - abar / np.concatenate([[1.0], abar[:-1]]))


LOGSIG = log_sigma_schedule()
LIN = Schedule.from_name("linear", T)


class SigmaOracle:
    """The exact denoiser of N(mu, sd^2) at the noise level of each model call, in order: call k is at
    ``sigmas[k]`` of :func:`difnumpy.solvers.schedule_sigmas` (and must receive its timestep ``ts[k]``)."""

    def __init__(self, ts, sigmas, mu, sd, prediction_type="epsilon"):
        self.ts, self.sigmas, self.mu, self.sd, self.pt, self.k = ts, sigmas, mu, sd, prediction_type, 0

    def __call__(self, x, t):
        assert t.dtype == np.float64 and np.all(t == self.ts[self.k]), (t, self.ts[self.k])
        sg = self.sigmas[self.k]
        self.k += 1
        ab = 1.0 / (1.0 + sg * sg)
        sa, s1 = np.sqrt(ab), np.sqrt(1.0 - ab)
        var = ab * self.sd ** 2 + 1.0 - ab
        c = x.astype(np.float64) - sa * self.mu
        eps, x0 = s1 / var * c, self.mu + sa * self.sd ** 2 / var * c
        out = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - s1 * x0}[self.pt]
        return out.astype(x.dtype)


def exact_x0(x_T, sigma_T, mu=MU, sd=S_DATA):
    """The end of the probability-flow ODE from x_T (DDPM scaling) at sigma_T: mu + sd z, z constant."""
    ab = 1.0 / (1.0 + sigma_T ** 2)
    return mu + sd * (x_T - np.sqrt(ab) * mu) / np.sqrt(ab * sd ** 2 + 1.0 - ab)


def global_error(method, num_steps, prediction_type="epsilon", n=64, **opts):
    """RMS error of the final sample against the exact x0, float64."""
    x_T = np.random.default_rng(1).standard_normal((n, 1))
    if method == "ddim":
        ts = inference_timesteps(T, num_steps, "linspace")
        oracle = GaussianOracle(LOGSIG, MU, S_DATA, prediction_type)
        x = x_T
        for i, t in enumerate(ts):
            prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
            x, _ = ddim_step(LOGSIG, oracle(x, np.full(n, t)), int(t), prev, x, prediction_type=prediction_type,
                             clip_sample=False)
        sigma_T = float(np.sqrt((1.0 - LOGSIG.alphas_cumprod[ts[0]]) / LOGSIG.alphas_cumprod[ts[0]]))
    else:
        ts, sigmas = solvers.schedule_sigmas(method, LOGSIG, num_steps, prediction_type=prediction_type, **opts)
        oracle = SigmaOracle(ts, sigmas, MU, S_DATA, prediction_type)
        x = None
        for _, _, x, _ in solvers.solve(method, oracle, LOGSIG, x_T, num_steps=num_steps, backend="numpy",
                                        prediction_type=prediction_type, **opts):
            pass
        assert oracle.k == len(ts)
        sigma_T = float(sigmas[0])
    return float(np.sqrt(np.mean((x - exact_x0(x_T, sigma_T)) ** 2)))


STEPS = np.array([32, 45, 64, 91, 128, 181, 256])


def measured_order(method, **kw):
    errors = np.array([global_error(method, int(S), **kw) for S in STEPS])
    slope = np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    return -slope, errors


@pytest.mark.parametrize("method,order,opts", [
    ("ddim", 1, {}),
    ("euler", 1, {"use_karras_sigmas": True}),
    ("heun", 2, {"use_karras_sigmas": True}),
    ("dpmpp_2m", 2, {"use_karras_sigmas": True}),
    ("dpmpp_3m", 3, {"use_karras_sigmas": True}),
])
def test_order_of_convergence(method, order, opts):
    p, errors = measured_order(method, **opts)
    assert abs(p - order) <= 0.3, f"{method}: measured order {p:.2f}, expected {order}; errors {errors}"
    assert np.all(np.diff(errors) < 0), errors


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_order_does_not_depend_on_the_prediction_type(prediction_type):
    for method, opts in [("dpmpp_2m", {"use_karras_sigmas": True}), ("heun", {"use_karras_sigmas": True})]:
        for S in (32, 91):
            a = global_error(method, S, **opts)
            b = global_error(method, S, prediction_type=prediction_type, **opts)
            assert b == pytest.approx(a, rel=1e-6, abs=1e-12)


def test_diffusers_third_order_step_is_second_order():
    """diffusers' DPM-Solver++(3M) (``diffusers_d2=True``) halves the D2 term: no longer third order, and
    falling further behind the full coefficient as the steps grow (5x less accurate at 256 steps)."""
    p_full, e_full = measured_order("dpmpp_3m", use_karras_sigmas=True)
    p_half, e_half = measured_order("dpmpp_3m", use_karras_sigmas=True, diffusers_d2=True)
    assert p_half < 2.4 < p_full
    ratio = e_half / e_full
    assert np.all(np.diff(ratio[2:]) > 0) and ratio[-1] > 5, ratio


# ---------------------------------------------------------------------------- stochastic methods

MU4 = np.array([0.5, -1.0, 0.0, 2.0])
SD4 = np.array([0.3, 1.0, 2.0, 0.5])


def _alpha_sigma(sigma):
    a = 1.0 / np.sqrt(sigma ** 2 + 1.0)
    return a, sigma * a


def chain_moments(method, sigmas, mu=MU4, sd=SD4):
    """Exact mean and variance of the sampler's output for data N(mu, sd^2) and the exact denoiser, from
    x_T ~ N(0, 1), written from the papers' formulas independently of difnumpy.solvers.

    With the exact denoiser every step is affine: the state (x, previous x0 prediction) stays jointly Gaussian
    per coordinate, so its mean (2,) and covariance (2, 2) follow exactly.
    euler_ancestral (Karras et al. Algorithm 2 with the ancestral step of k-diffusion, eta = 1), in sigma space:
    X' = X + (sigma_down - sigma) (X - D) / sigma + sigma_up z. dpmpp_2m_sde (Lu et al. 2022b; diffusers'
    sde-dpmsolver++, midpoint): x' = (sv'/sv) e^-h x + a' (1 - e^-2h) (D + (D - D_prev) / (2 r))
    + sv' sqrt(1 - e^-2h) z.
    """
    n_steps = len(sigmas) - 1
    means, covs = np.zeros((len(mu), 2)), np.zeros((len(mu), 2, 2))
    covs[:, 0, 0] = 1.0
    lam_prev = None
    for i in range(n_steps):
        s, s2 = sigmas[i], sigmas[i + 1]
        a, sv = _alpha_sigma(s)
        # D(x) = mu + K (x - a mu): the posterior mean of x0 given x = a x0 + sv eps
        K = a * sd ** 2 / (a * a * sd ** 2 + sv * sv)
        # new state = A @ (x, Dprev) + b + e z, per coordinate; D = K x + (mu - K a mu)
        d_coef, d_off = K, mu - K * a * mu
        if method == "euler_ancestral":
            s_up = np.sqrt(s2 ** 2 * (s ** 2 - s2 ** 2) / s ** 2)
            s_down = np.sqrt(s2 ** 2 - s_up ** 2)
            c, c2 = np.sqrt(s * s + 1.0), np.sqrt(s2 * s2 + 1.0)
            # X = c x; X' = X (s_down / s) + (1 - s_down / s) D; x' = (X' + s_up z) / c2
            gx = c * s_down / s / c2 + (1.0 - s_down / s) / c2 * d_coef
            gd, off = np.zeros_like(mu), (1.0 - s_down / s) / c2 * d_off
            e = s_up / c2
        else:
            if s2 == 0.0:
                gx, gd, off, e = d_coef, np.zeros_like(mu), d_off, 0.0
            else:
                a2, sv2 = _alpha_sigma(s2)
                lam, lam2 = np.log(a / sv), np.log(a2 / sv2)
                h = lam2 - lam
                base = a2 * (1.0 - np.exp(-2.0 * h))
                if lam_prev is None:   # first step: first order
                    w0, w1 = base, 0.0
                else:
                    r = (lam - lam_prev) / h
                    w0, w1 = base * (1.0 + 0.5 / r), -base * 0.5 / r
                gx = sv2 / sv * np.exp(-h) + w0 * d_coef
                gd, off = np.full_like(mu, w1), w0 * d_off
                e = sv2 * np.sqrt(1.0 - np.exp(-2.0 * h))
            lam_prev = np.log(a / sv)
        A = np.zeros((len(mu), 2, 2))
        A[:, 0, 0], A[:, 0, 1] = gx, gd
        A[:, 1, 0] = d_coef                         # the new "previous prediction" is D(x) of this step
        b = np.stack([off, d_off], axis=1)
        noise = np.zeros((len(mu), 2, 2))
        noise[:, 0, 0] = e ** 2
        means = np.einsum("kij,kj->ki", A, means) + b
        covs = np.einsum("kij,kjl,kml->kim", A, covs, A) + noise
    return means[:, 0], covs[:, 0, 0]


@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_2m_sde"])
def test_stochastic_methods_sample_the_data_distribution(method):
    """With the exact denoiser: the sample moments equal the chain's exact moments (tolerance from the sample
    size), and those approach the data's, N(MU4, SD4^2), as the steps grow."""
    n, S = 8000, 200
    opts = {"use_karras_sigmas": True}
    ts, sigmas = solvers.schedule_sigmas(method, LIN, S, **opts)
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((n, 4))
    oracle = SigmaOracle(ts, sigmas, MU4, SD4)
    x = None
    for _, _, x, _ in solvers.solve(method, oracle, LIN, x_T, num_steps=S, rng=rng, backend="numpy", **opts):
        pass
    m, v = chain_moments(method, sigmas)
    assert np.all(np.abs(x.mean(0) - m) < Z * np.sqrt(v / n)), (x.mean(0), m)
    assert np.all(np.abs(x.var(0, ddof=1) - v) < Z * v * np.sqrt(2 / (n - 1))), (x.var(0, ddof=1), v)
    # the data's moments, within the sample's tolerance plus the method's own bias at S steps ...
    assert np.all(np.abs(x.mean(0) - MU4) < Z * SD4 / np.sqrt(n) + np.abs(m - MU4))
    assert np.all(np.abs(x.var(0, ddof=1) - SD4 ** 2) < Z * SD4 ** 2 * np.sqrt(2 / (n - 1)) + np.abs(v - SD4 ** 2))
    # ... a bias that is small and shrinks with the number of steps (Euler ancestral is weakly first order:
    # its variance is 5-7 % low at 200 steps and the gap halves with every doubling; 2M SDE: 0.2 %)
    bias = np.abs(v / SD4 ** 2 - 1.0)
    assert np.all(bias < (0.08 if method == "euler_ancestral" else 0.005)), bias
    assert np.all(np.abs(m - MU4) < 1e-3 * SD4)
    _, sig4 = solvers.schedule_sigmas(method, LIN, 4 * S, **opts)
    _, v4 = chain_moments(method, sig4)
    assert np.sum(np.abs(v4 / SD4 ** 2 - 1.0)) < np.sum(bias) / 3


def test_stochastic_methods_use_the_rng():
    model = GaussianOracle(LIN, 0.0, 1.0)
    x_T = np.random.default_rng(0).standard_normal((4, 3))
    for method in ("euler_ancestral", "dpmpp_2m_sde"):
        runs = [sample(model, LIN, x_T.shape, method=method, num_steps=5, x_T=x_T, rng=np.random.default_rng(s),
                       backend="numpy", dtype=np.float64) for s in (1, 1, 2)]
        assert np.array_equal(runs[0], runs[1]) and not np.allclose(runs[0], runs[2])


# ---------------------------------------------------------------------------- the loop's contract

def smooth_model(x, t):
    """A deterministic nonlinear model of float t (any prediction type)."""
    t = np.asarray(t, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    return (0.6 * np.tanh(x) + 0.2 * np.cos(t / 300.0) * x).astype(x.dtype)


@pytest.mark.parametrize("method", solvers.METHODS)
def test_yields_and_shapes(method):
    x_T = np.random.default_rng(0).standard_normal((2, 1, 2, 2)).astype(np.float32)
    keep = x_T.copy()
    S = 5
    ts, sigmas = solvers.schedule_sigmas(method, LIN, S)
    out = list(solvers.solve(method, smooth_model, LIN, x_T, num_steps=S, rng=np.random.default_rng(0),
                             backend="numpy"))
    assert len(out) == S and np.array_equal(x_T, keep)
    step_ts = np.concatenate([ts[:1], ts[1::2]]) if method == "heun" else ts
    assert [o[0] for o in out] == list(step_ts) and [o[1] for o in out] == list(step_ts[1:]) + [-1]
    for t, prev_t, x, x0 in out:
        assert isinstance(t, float) and x.shape == x_T.shape and x.dtype == np.float32 and x0.dtype == np.float32
    # arrays are never modified after they are yielded
    snap = [(o[2].copy(), o[3].copy()) for o in out]
    assert all(np.array_equal(a, o[2]) and np.array_equal(b, o[3]) for (a, b), o in zip(snap, out))
    # the last step goes to sigma = 0: x is the model's x0 prediction there
    np.testing.assert_allclose(out[-1][2], out[-1][3], rtol=1e-6, atol=1e-6)


def test_heun_and_euler_call_the_model_at_fractional_t():
    ts, _ = solvers.schedule_sigmas("euler", LIN, 7)
    assert np.any(ts != np.round(ts))
    seen = []
    x_T = np.zeros((1, 2))
    for _ in solvers.solve("heun", lambda x, t: seen.append(t.copy()) or 0 * x, LIN, x_T, num_steps=4,
                           backend="numpy"):
        pass
    assert len(seen) == 7 and all(s.dtype == np.float64 and s.shape == (1,) for s in seen)


def test_schedule_sigmas_shapes_and_karras():
    for method in solvers.METHODS:
        ts, sig = solvers.schedule_sigmas(method, LIN, 6)
        calls = 11 if method == "heun" else 6
        assert ts.shape == (calls,) and sig.shape == (calls + 1,) and sig[-1] == 0.0
        assert ts.dtype == np.float64 and sig.dtype == np.float64
    k = solvers.karras_sigmas(0.002, 80.0, 5)
    assert k[0] == pytest.approx(80.0) and k[-1] == pytest.approx(0.002)
    i = np.arange(5) / 4   # Karras et al. eq. 5 with rho = 7
    np.testing.assert_allclose(k, (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7)
    sig_train = solvers.training_sigmas(LIN)
    np.testing.assert_allclose(sig_train, np.sqrt((1 - LIN.alphas_cumprod) / LIN.alphas_cumprod))
    assert solvers.sigma_to_t(sig_train[[0, 10, 999]], np.log(sig_train)) == pytest.approx([0, 10, 999])


def test_start_continues_a_single_step_solver():
    """Euler and Heun keep no history: starting at step k from the state a full run has after k steps
    finishes exactly as the full run does. DPM-Solver++ restarts its history (first order at ``start``)."""
    x_T = np.random.default_rng(3).standard_normal((3, 2))
    for method, same in [("euler", True), ("heun", True), ("dpmpp_2m", False)]:
        full = list(solvers.solve(method, smooth_model, LIN, x_T, num_steps=8, backend="numpy"))
        rest = list(solvers.solve(method, smooth_model, LIN, full[2][2], num_steps=8, backend="numpy", start=3))
        assert len(rest) == 5 and rest[0][0] == full[3][0]
        assert np.allclose(rest[-1][2], full[-1][2], rtol=1e-12, atol=1e-12) == same
    t, sigma = solvers.start_sigma("heun", LIN, 8, None, 3)
    ts, sig = solvers.schedule_sigmas("heun", LIN, 8)
    assert (t, sigma) == (ts[6], sig[6])
    assert list(solvers.solve("euler", smooth_model, LIN, x_T, num_steps=4, backend="numpy", start=4)) == []


def test_zero_terminal_snr_schedule():
    zsnr = Schedule.from_name("linear", T, zero_terminal_snr=True)
    sig = solvers.training_sigmas(zsnr)
    assert np.isfinite(sig[-1]) and sig[-1] == pytest.approx(np.sqrt(2.0 ** 24 - 1))
    for method in solvers.METHODS:
        x = sample(GaussianOracle(zsnr, 0.2, 0.5, "v_prediction"), zsnr, (16, 2), method=method, num_steps=12,
                   spacing="trailing", rng=np.random.default_rng(0), prediction_type="v_prediction",
                   backend="numpy")
        assert np.all(np.isfinite(x))


def test_thresholding_and_clipping_bound_x0():
    big = lambda x, t: 5.0 * np.ones_like(x)  # noqa: E731  an x0 far outside [-1, 1]
    x_T = np.random.default_rng(0).standard_normal((2, 8))
    for method, opts in [("dpmpp_2m", {"thresholding": True}), ("heun", {"clip_sample": True})]:
        for *_, x0 in solvers.solve(method, big, LIN, x_T, num_steps=4, backend="numpy", prediction_type="sample",
                                    **opts):
            assert np.abs(x0).max() <= 1.0 + 1e-12


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_backends_agree_with_numpy(backend):
    """Every method, every backend: the same samples as the NumPy twins (cuda: under the simulator, tiny)."""
    try:
        kern = get_backend(backend)
    except RuntimeError as e:
        pytest.skip(f"backend {backend!r} not usable here ({e})")
    x_T = np.random.default_rng(0).standard_normal((2, 1, 2, 2))
    for method in solvers.METHODS:
        opts = {"thresholding": True, "sample_max_value": 1.5} if method == "dpmpp_2m" else \
            {"clip_sample": True} if method == "heun" else {}
        ref = list(solvers.solve(method, smooth_model, LIN, x_T, num_steps=3, rng=np.random.default_rng(1),
                                 backend="numpy", **opts))
        got = list(solvers.solve(method, lambda x, t: kern.asarray(smooth_model(kern.to_host(x), t)), LIN,
                                 kern.asarray(x_T), num_steps=3, rng=np.random.default_rng(1), backend=backend,
                                 **opts))
        for (t, pt, x, x0), (t2, pt2, y, y0) in zip(ref, got):
            assert (t, pt) == (t2, pt2) and kern.is_array(y) and kern.is_array(y0)
            np.testing.assert_allclose(kern.to_host(y), x, rtol=1e-10, atol=1e-10, err_msg=method)
            np.testing.assert_allclose(kern.to_host(y0), x0, rtol=1e-10, atol=1e-10, err_msg=method)


# ---------------------------------------------------------------------------- bad input

def test_bad_input():
    x = np.zeros((2, 3))
    ok = dict(num_steps=4, backend="numpy")

    def run(method="euler", model=smooth_model, schedule=LIN, x=x, **kw):
        return list(solvers.solve(method, model, schedule, x, **{**ok, **kw}))

    cases = [
        (ValueError, "method", dict(method="dpm")),
        (TypeError, "unexpected keyword.*thresholding", dict(thresholding=True)),
        (TypeError, "unexpected keyword.*clip_sample", dict(method="dpmpp_2m", clip_sample=True)),
        (ValueError, "prediction_type", dict(prediction_type="x0")),
        (TypeError, "use_karras_sigmas", dict(use_karras_sigmas=1)),
        (ValueError, "final_sigmas_type", dict(final_sigmas_type="min")),
        (ValueError, "solver_type", dict(method="dpmpp_2m", solver_type="rk4")),
        (ValueError, "dynamic_thresholding_ratio", dict(method="dpmpp_2m", dynamic_thresholding_ratio=1.5)),
        (ValueError, "sample_max_value", dict(method="dpmpp_3m", sample_max_value=0.5)),
        (ValueError, "clip_sample_range", dict(method="heun", clip_sample_range=0.0)),
        (TypeError, "num_steps", dict(num_steps=4.0)),
        (ValueError, "num_steps", dict(num_steps=0)),
        (ValueError, "num_steps", dict(num_steps=1001)),
        (ValueError, "spacing", dict(spacing="uniform")),
        (ValueError, "backend", dict(backend="gpu")),
        (TypeError, "model_fn", dict(model=None)),
        (TypeError, "schedule", dict(schedule=np.ones(10))),
        (TypeError, "x must be", dict(x=[[0.0]])),
        (TypeError, "dtype", dict(x=np.zeros((2, 3), dtype=np.int64))),
        (ValueError, "NaN", dict(x=np.full((2, 3), np.nan))),
        (ValueError, "start", dict(start=5)),
        (ValueError, "start", dict(start=-1)),
        (TypeError, "start", dict(start=1.0)),
        (TypeError, "rng", dict(method="euler_ancestral", rng=3)),
        (ValueError, "model_fn must return", dict(model=lambda x, t: np.zeros((2, 4)))),
        (ValueError, "at least 2 timesteps", dict(schedule=Schedule([0.5]), num_steps=1)),
        (ValueError, "repeated noise levels", dict(method="dpmpp_2m", num_steps=1000)),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            run(**kw)
    # validation happens when solve is called, before the first model call
    calls = []
    with pytest.raises(ValueError, match="num_steps"):
        solvers.solve("euler", lambda x, t: calls.append(1), LIN, x, num_steps=0, backend="numpy")
    assert calls == []
    with pytest.raises(ValueError, match="start"):
        solvers.start_sigma("euler", LIN, 4, None, 4)
