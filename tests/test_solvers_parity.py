"""Parity of the few-step solvers (difnumpy.solvers, through difnumpy.sample) with diffusers' schedulers.

With the same deterministic model function, schedule (the diffusers scheduler is built from the same betas,
``trained_betas=schedule.betas``) and config, diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``
orders 2 and 3, ``sde-dpmsolver++`` order 2), ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and
``HeunDiscreteScheduler`` must call the model at the same timesteps and give the same samples.

Precision: diffusers stores betas, sigmas and (in DPM-Solver and Euler) the sample in float32. The main tests
run diffusers' own code in float64 instead -- its scheduler module sees a ``numpy``/``torch`` whose ``float32``
is ``float64`` (:class:`_Float64`) -- so the comparison is tight (1e-9) and a wrong coefficient cannot hide
in float32 noise; one test runs diffusers unmodified and compares to float32 rounding.

Optional: skipped when torch or diffusers is not installed (CI installs both).
"""
import importlib
import itertools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from difnumpy import Schedule, sample  # noqa: E402
from difnumpy import solvers  # noqa: E402

T = 1000
LIN = Schedule.from_name("linear", T)
COS = Schedule.from_name("cosine", T)
SHAPE = (3, 2, 2, 2)

_MODULES = {
    "dpm": "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "euler": "diffusers.schedulers.scheduling_euler_discrete",
    "euler_ancestral": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "heun": "diffusers.schedulers.scheduling_heun_discrete",
}


def _module_key(method):
    return "dpm" if method.startswith("dpmpp") else method


class _Float64:
    """Stands in for ``numpy`` or ``torch`` inside a diffusers scheduler module: ``float32`` is ``float64``."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        return self._mod.float64 if name == "float32" else getattr(self._mod, name)


@pytest.fixture
def float64_diffusers(monkeypatch):
    for name in _MODULES.values():
        mod = importlib.import_module(name)
        monkeypatch.setattr(mod, "np", _Float64(np))
        monkeypatch.setattr(mod, "torch", _Float64(torch))


def _scheduler(method, schedule, *, prediction_type="epsilon", spacing="linspace", use_karras_sigmas=False, **opts):
    """The diffusers scheduler of ``method`` with the same betas and config (steps_offset 0)."""
    s = diffusers
    common = dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas,
                  prediction_type=prediction_type, timestep_spacing=spacing)
    if method.startswith("dpmpp"):
        return s.DPMSolverMultistepScheduler(
            **common, solver_order=3 if method == "dpmpp_3m" else 2, use_karras_sigmas=use_karras_sigmas,
            algorithm_type="sde-dpmsolver++" if method == "dpmpp_2m_sde" else "dpmsolver++", **opts)
    if method == "euler":
        return s.EulerDiscreteScheduler(**common, use_karras_sigmas=use_karras_sigmas, **opts)
    if method == "heun":
        return s.HeunDiscreteScheduler(**common, use_karras_sigmas=use_karras_sigmas, **opts)
    assert not use_karras_sigmas
    return s.EulerAncestralDiscreteScheduler(**common, **opts)


def make_model(schedule, prediction_type):
    """A deterministic, smooth, nonlinear model of float t: the exact denoiser of N(0.3, 0.6^2) plus a
    nonlinear error, with ``abar`` interpolated linearly at fractional t."""
    abar_train = schedule.alphas_cumprod

    def model(x, t):
        t = np.asarray(t, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        ab = np.interp(t, np.arange(schedule.num_timesteps), abar_train)
        sa, s1 = np.sqrt(ab), np.sqrt(1.0 - ab)
        var = ab * 0.36 + 1.0 - ab
        c = x.astype(np.float64) - sa * 0.3
        eps = s1 / var * c + 0.05 * np.sin(3.0 * x) * s1
        x0 = 0.3 + sa * 0.36 / var * c + 0.05 * np.tanh(x)
        out = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - s1 * x0}[prediction_type]
        return out.astype(x.dtype)
    return model


def _noises(method, sigmas, start, shape, dtype, seed):
    """The noise our solvers draw from ``default_rng(seed)``: one array per step whose noise term is non-zero
    (every step but one to sigma = 0), in step order; None where no noise is drawn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, len(sigmas) - 1):
        out.append(rng.standard_normal(shape, dtype=dtype) if sigmas[i + 1] > 0 else None)
    return out


def run_diffusers(method, schedule, x_T, num_steps, *, start=0, seed=0, model=None, **config):
    """diffusers' sampling loop (as its pipelines run it): returns (model-call timesteps, final sample)."""
    sched = _scheduler(method, schedule, **config)
    sched.set_timesteps(num_steps)
    order = solvers.CALLS_PER_STEP[method]
    timesteps = sched.timesteps[start * order:]
    if start:
        sched.set_begin_index(start * order)
    sig = sched.sigmas.numpy().astype(np.float64)
    sig0 = float(sig[start * order])
    step_sig = np.concatenate([sig[:1], sig[1::2]]) if method == "heun" else sig
    noises = iter(_noises(method, step_sig, start, x_T.shape, x_T.dtype, seed))
    # Euler and Heun work on x_sigma = sqrt(sigma^2 + 1) x_ddpm, DPM-Solver on x_ddpm itself
    latents = torch.from_numpy(x_T * (1.0 if method.startswith("dpmpp") else np.sqrt(sig0 ** 2 + 1.0)))
    mod = importlib.import_module(_MODULES["euler_ancestral"])
    called = []
    for t in timesteps:
        inp = sched.scale_model_input(latents, t)
        called.append(float(t))
        out = torch.from_numpy(model(inp.numpy(), np.full(x_T.shape[0], float(t))))
        if method == "dpmpp_2m_sde":
            z = next(noises)
            z = torch.zeros_like(out) if z is None else torch.from_numpy(z)
            latents = sched.step(out, t, latents, variance_noise=z).prev_sample
        elif method == "euler_ancestral":
            z = next(noises)
            z = torch.zeros_like(out) if z is None else torch.from_numpy(z)
            orig = mod.randn_tensor
            mod.randn_tensor = lambda *a, **k: z
            try:
                latents = sched.step(out, t, latents).prev_sample
            finally:
                mod.randn_tensor = orig
        else:
            latents = sched.step(out, t, latents).prev_sample
    final = latents.numpy().astype(np.float64)
    if config.get("final_sigmas_type") == "sigma_min" and not method.startswith("dpmpp"):
        final = final / np.sqrt(sig[-1] ** 2 + 1.0)  # back to the DDPM scaling
    return np.array(called), final


def run_ours(method, schedule, x_T, num_steps, *, seed=0, model=None, spacing="linspace", **opts):
    called = []

    def recording(x, t):
        assert t.dtype == np.float64 and np.all(t == t[0])
        called.append(float(t[0]))
        return model(x, t)

    rng = np.random.default_rng(seed) if method in ("dpmpp_2m_sde", "euler_ancestral") else None
    x = sample(recording, schedule, x_T.shape, method=method, num_steps=num_steps, spacing=spacing, x_T=x_T,
               rng=rng, backend="numpy", **opts)
    return np.array(called), x


# ---------------------------------------------------------------------------- cases

PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
STEPS = (1, 2, 3, 5, 8, 16)   # 16 >= 15: DPM-Solver's lower_order_final no longer applies


def _cases():
    """Every method x prediction type x spacing x Karras, each with two step counts (cycling through STEPS)."""
    cases = []
    k = 0
    for method in solvers.METHODS:
        for pt, spacing, karras in itertools.product(PREDICTIONS, SPACINGS, (False, True)):
            if method == "euler_ancestral" and (karras or pt == "sample"):
                continue  # diffusers' EulerAncestral has no Karras sigmas and raises for "sample"
            cases.append((method, pt, spacing, karras, STEPS[k % len(STEPS)]))
            cases.append((method, pt, spacing, karras, STEPS[(k + 3) % len(STEPS)]))
            k += 1
    return cases


def _check(method, schedule, num_steps, *, rtol=1e-9, float32=False, seed=0, start=0, **config):
    pt = config.get("prediction_type", "epsilon")
    model = make_model(schedule, pt)
    x_T = np.random.default_rng(100 + num_steps).standard_normal(SHAPE)
    if float32:
        x_T = x_T.astype(np.float32)
    opts = {k: v for k, v in config.items() if k != "spacing"}
    if method == "dpmpp_3m":
        opts["diffusers_d2"] = True  # diffusers' D2 term (see test_default_3m_is_not_diffusers_3m)
    ts_ref, ref = run_diffusers(method, schedule, x_T, num_steps, start=start, seed=seed, model=model, **config)
    if start:
        ts_ours, ours = _solve_from(method, schedule, x_T, num_steps, start, seed, model, config)
    else:
        ts_ours, ours = run_ours(method, schedule, x_T, num_steps, seed=seed, model=model,
                                 spacing=config.get("spacing", "linspace"), **opts)
    assert ts_ours.shape == ts_ref.shape, (ts_ours, ts_ref)
    np.testing.assert_allclose(ts_ours, ts_ref, rtol=0, atol=1e-9 if not float32 else 1e-4)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours.astype(np.float64) - ref).max()) / scale
    assert err <= rtol, f"{method} {config} S={num_steps}: relative error {err:.3g} > {rtol:g}"


def _solve_from(method, schedule, x_T, num_steps, start, seed, model, config):
    called = []

    def recording(x, t):
        called.append(float(t[0]))
        return model(x, t)

    rng = np.random.default_rng(seed)
    opts = {k: v for k, v in config.items() if k != "spacing"}
    if method == "dpmpp_3m":
        opts["diffusers_d2"] = True
    x = None
    for _, _, x, _ in solvers.solve(method, recording, schedule, x_T, num_steps=num_steps,
                                    spacing=config.get("spacing", "linspace"), rng=rng, backend="numpy",
                                    start=start, **opts):
        pass
    return np.array(called), x


@pytest.mark.parametrize("method,prediction_type,spacing,karras,num_steps", _cases())
def test_sample_matches_diffusers(float64_diffusers, method, prediction_type, spacing, karras, num_steps):
    _check(method, LIN, num_steps, prediction_type=prediction_type, spacing=spacing, use_karras_sigmas=karras)


@pytest.mark.parametrize("method,num_steps,config", [
    ("dpmpp_2m", 7, {"thresholding": True, "prediction_type": "sample"}),
    ("dpmpp_3m", 9, {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}),
    ("dpmpp_2m", 6, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_3m", 5, {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_3m", 6, {"lower_order_final": False}),
    ("dpmpp_2m", 20, {"euler_at_final": True, "use_karras_sigmas": True}),
    ("dpmpp_2m", 8, {"solver_type": "heun", "prediction_type": "v_prediction"}),
    ("dpmpp_2m_sde", 8, {"solver_type": "heun"}),
    ("dpmpp_2m_sde", 5, {"final_sigmas_type": "sigma_min", "spacing": "leading"}),
    ("euler", 6, {"final_sigmas_type": "sigma_min", "spacing": "trailing"}),
    ("heun", 5, {"clip_sample": True, "prediction_type": "sample"}),
    ("heun", 4, {"clip_sample": True, "clip_sample_range": 0.5}),
])
def test_options_match_diffusers(float64_diffusers, method, num_steps, config):
    _check(method, LIN, num_steps, **config)


@pytest.mark.parametrize("method", solvers.METHODS)
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_cosine_schedule_matches_diffusers(float64_diffusers, method, spacing):
    """A second schedule (cosine, betas capped at 0.999: sigma_max about 1.6e4)."""
    _check(method, COS, 6, spacing=spacing, prediction_type="v_prediction")


def test_lambda_min_clipped_matches_diffusers(float64_diffusers):
    for spacing in SPACINGS:
        _check("dpmpp_2m", COS, 7, spacing=spacing, lambda_min_clipped=-5.1)


@pytest.mark.parametrize("method,num_steps,start", [
    ("dpmpp_2m", 10, 3), ("dpmpp_3m", 12, 4), ("dpmpp_2m_sde", 8, 2), ("euler", 9, 4),
    ("euler_ancestral", 7, 2), ("heun", 6, 2), ("heun", 5, 4),
])
def test_image_to_image_start_matches_diffusers(float64_diffusers, method, num_steps, start):
    """``start`` (diffusers' img2img: ``set_begin_index(start * order)``, the multistep history empty there)."""
    _check(method, LIN, num_steps, start=start, use_karras_sigmas=method != "euler_ancestral")


@pytest.mark.parametrize("method", solvers.METHODS)
def test_unmodified_diffusers_float32(method):
    """diffusers as shipped (float32 betas, sigmas and, for DPM-Solver / Euler, samples): the same samples to
    float32 rounding (float32 alphas_cumprod alone moves sigma near t = 0 by ~1e-4 relative, so this is looser)."""
    _check(method, LIN, 8, rtol=2e-4, float32=True, prediction_type="v_prediction")


# ---------------------------------------------------------------------------- timesteps and sigmas alone

TIMESTEP_STEPS = list(range(1, 41)) + [50, 61, 99, 100, 103, 121, 250, 333, 500, 999, 1000]


@pytest.mark.parametrize("method", ["dpmpp_2m", "euler", "heun", "euler_ancestral"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_sigmas_match_diffusers(float64_diffusers, method, spacing):
    """Model-call timesteps and sigmas for many step counts. Where diffusers' float ``arange`` of the trailing
    spacing yields an extra, negative timestep (S = 61, 103, 121 with T = 1000) we keep S; where it repeats a
    timestep (a DPM-Solver step of size zero: r0 = 0 divides by zero) we refuse the step count."""
    karras_opts = (False,) if method == "euler_ancestral" else (False, True)
    for karras, S in itertools.product(karras_opts, TIMESTEP_STEPS):
        if karras and S > 100:
            continue
        if spacing == "trailing" and len(np.arange(T, 0, -T / S)) != S and karras:
            continue  # diffusers' extra timestep -1 moves its Karras sigma_min to sigma(0); ours has S timesteps
        sched = _scheduler(method, LIN, spacing=spacing, use_karras_sigmas=karras)
        sched.set_timesteps(S)
        ts_ref = sched.timesteps.numpy().astype(np.float64)
        sig_ref = sched.sigmas.numpy().astype(np.float64)
        step_ref = np.concatenate([sig_ref[:1], sig_ref[1::2]]) if method == "heun" else sig_ref
        try:
            ts, sig = solvers.schedule_sigmas(method, LIN, S, spacing, use_karras_sigmas=karras)
        except ValueError as e:
            assert "repeated noise levels" in str(e)
            assert np.any(np.diff(step_ref[:-1]) >= 0), (method, spacing, karras, S)
            continue
        if ts.shape != ts_ref.shape:
            assert spacing == "trailing" and ts_ref.shape[0] == ts.shape[0] + CALLS(method)
            assert ts_ref[-1] == -1 and np.array_equal(ts, ts_ref[:ts.shape[0]]), (method, S)
            continue
        # integer timesteps exactly, fractional ones to float64 rounding (diffusers' cumprod runs in torch)
        np.testing.assert_allclose(ts, ts_ref, rtol=1e-13, atol=0, err_msg=f"{method} {spacing} karras={karras} S={S}")
        assert np.array_equal(ts == np.round(ts), ts_ref == np.round(ts_ref))
        np.testing.assert_allclose(sig, sig_ref, rtol=1e-13, err_msg=f"{method} {spacing} karras={karras} S={S}")


def CALLS(method):
    return solvers.CALLS_PER_STEP[method]


def test_start_sigma_is_diffusers_add_noise_level(float64_diffusers):
    for method, S, start in [("dpmpp_2m", 10, 3), ("heun", 6, 2), ("euler", 9, 0)]:
        sched = _scheduler(method, LIN, use_karras_sigmas=True)
        sched.set_timesteps(S)
        sched.set_begin_index(start * CALLS(method))
        x0 = torch.zeros(1, dtype=torch.float64)
        noise = torch.ones(1, dtype=torch.float64)
        t, sigma = solvers.start_sigma(method, LIN, S, "linspace", start, use_karras_sigmas=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            noisy = float(sched.add_noise(x0, noise, sched.timesteps[start * CALLS(method):][:1]))
        # DPM-Solver's add_noise is in the DDPM scaling, Euler/Heun's in sigma space
        expect = sigma / np.sqrt(sigma ** 2 + 1.0) if method.startswith("dpmpp") else sigma
        assert noisy == pytest.approx(expect, rel=1e-12)
        assert t == float(sched.timesteps[start * CALLS(method)])


def test_default_3m_is_not_diffusers_3m(float64_diffusers):
    """Our dpmpp_3m weights D2 by the full Taylor coefficient, diffusers by half (see difnumpy.solvers): the
    two agree while no third-order step is taken (S <= 4 with lower_order_final) and differ after."""
    model = make_model(LIN, "epsilon")
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    for S, same in [(3, True), (4, True), (5, False), (20, False)]:
        _, ref = run_diffusers("dpmpp_3m", LIN, x_T, S, model=model)
        _, ours = run_ours("dpmpp_3m", LIN, x_T, S, model=model)
        _, compat = run_ours("dpmpp_3m", LIN, x_T, S, model=model, diffusers_d2=True)
        assert np.abs(compat - ref).max() < 1e-9
        assert (np.abs(ours - ref).max() < 1e-9) == same, S
