"""Class labels, classifier-free guidance, inpainting (RePaint) and image-to-image (SDEdit).

Verification with exact oracles (difnumpy.testing): class-conditional Gaussians, their mixture, and a
correlated Gaussian whose conditional distribution given one coordinate is known in closed form.
Statistical tolerances are Z standard errors of the sample size.
"""
import numpy as np
import pytest

from difnumpy import Schedule, Trainer, UNet, inference_timesteps, sample
from difnumpy.checkpoint import load_model, read_metadata, save_checkpoint
from difnumpy.nn import layers as L
from difnumpy.nn.gradcheck import eval_numerical_gradient_array, eval_numerical_gradient_at, rel_error
from difnumpy.samplers import guided_output, inpaint, make_model_fn, repaint_timesteps, sample_progressive
from difnumpy.testing import CorrelatedGaussianOracle, GaussianMixtureOracle
from difnumpy.trainer import drop_labels
from test_samplers import chain_moments

Z = 5.0
LIN = Schedule.from_name("linear", 1000)
TINY = dict(base_channels=8, channel_mults=(1, 2), groups=4)


# --------------------------------------------------------------------------------------- the network


def test_class_embedding_size_and_default_unchanged():
    assert UNet(rng=0).num_params() == 410_721
    m = UNet(rng=0, num_classes=10)
    assert m.params["label_emb.w"].shape == (11, 128)
    assert m.num_params() == 410_721 + 11 * 128
    assert list(m.params).index("label_emb.w") == list(m.params).index("time.lin2.b") + 1
    assert UNet(**m.config, rng=0).num_classes == 10


def test_embedding_layer_gradient_float64(rng):
    table = rng.standard_normal((5, 3))
    idx = np.array([4, 0, 4, 2, 4])
    out, cache = L.embedding_forward(table, idx)
    np.testing.assert_array_equal(out, table[idx])
    dout = rng.standard_normal(out.shape)
    dtable = L.embedding_backward(dout, cache)
    num = eval_numerical_gradient_array(lambda tb: L.embedding_forward(tb, idx)[0], table, dout)
    assert rel_error(dtable, num) < 1e-9
    assert np.all(dtable[[1, 3]] == 0)
    with pytest.raises(ValueError, match="idx must lie"):
        L.embedding_forward(table, np.array([5]))


def _random_conditional(rng, backend="numpy", dtype=np.float64):
    m = UNet(**TINY, num_classes=3, backend=backend, dtype=dtype, rng=1)
    m.set_params({k: rng.standard_normal(p.shape) * 0.3 for k, p in m.params.items()})
    return m


def test_conditional_unet_gradient_check_float64(rng):
    m = _random_conditional(rng)
    x = rng.standard_normal((3, 1, 8, 8))
    t = np.array([5, 400, 900])
    y = np.array([0, 3, 2])
    out, cache = m.forward(x, t, class_labels=y)
    dout = rng.standard_normal(out.shape)
    grads = m.backward(dout, cache)

    def f(_):
        return float(np.sum(m(x, t, class_labels=y) * dout))

    key = "label_emb.w"
    idx = np.array([0, 5 * 16 + 3, 3 * 16 + 7, 1 * 16 + 2])  # rows 0, 5 (unused: grad 0), 3 and 1 (unused)
    num = eval_numerical_gradient_at(f, m.params[key], idx)
    assert rel_error(grads[key].ravel()[idx], num) < 1e-6
    assert np.all(grads[key][1] == 0)  # no sample has label 1
    for k in ("time.lin2.w", "stem.w"):
        i = rng.choice(m.params[k].size, 2, replace=False)
        assert rel_error(grads[k].ravel()[i], eval_numerical_gradient_at(f, m.params[k], i)) < 1e-6, k


def test_labels_change_the_output_and_none_means_no_class(rng):
    m = _random_conditional(rng)
    x = rng.standard_normal((2, 1, 8, 8))
    a = m(x, 10, class_labels=np.array([0, 0]))
    b = m(x, 10, class_labels=np.array([1, 1]))
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(m(x, 10), m(x, 10, class_labels=3))
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\]"):
        m(x, 10, class_labels=np.array([0, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**TINY, rng=0)(x, 10, class_labels=np.array([0, 1]))


def test_conditional_checkpoint_round_trip(tmp_path, rng):
    m = UNet(**TINY, num_classes=4, rng=2)
    tr = Trainer(m, LIN, rng=0, label_dropout=0.25)
    x0 = rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    tr.step(x0, np.array([0, 1, 2, 3]))
    path = tmp_path / "c.npz"
    save_checkpoint(path, tr)
    assert read_metadata(path)["num_classes"] == 4
    back = load_model(path, ema=False)
    assert back.num_classes == 4
    np.testing.assert_array_equal(back.params["label_emb.w"], m.params["label_emb.w"])


# --------------------------------------------------------------------------------------- training


def test_label_dropout_rate_is_p_within_binomial_tolerance():
    n, K, p = 40_000, 10, 0.1
    y = np.random.default_rng(0).integers(0, K, n)
    d = drop_labels(y, K, p, np.random.default_rng(1))
    dropped = np.count_nonzero(d == K)
    assert abs(dropped - n * p) < Z * np.sqrt(n * p * (1 - p))
    kept = d != K
    np.testing.assert_array_equal(d[kept], y[kept])   # the others are untouched
    assert np.array_equal(drop_labels(y, K, 0.0, np.random.default_rng(1)), y)


def test_trainer_passes_the_dropped_labels_drawn_after_t_and_eps():
    seen = []

    class Recorder(UNet):
        def forward(self, x, t, class_labels=None):
            seen.append(np.array(class_labels))
            return super().forward(x, t, class_labels=class_labels)

    y = np.arange(8) % 3
    m = Recorder(**TINY, num_classes=3, rng=0, backend="numpy")
    tr = Trainer(m, LIN, rng=5, label_dropout=0.5)
    tr.step(np.zeros((8, 1, 8, 8), np.float32), y)
    g = np.random.default_rng(5)
    g.integers(0, 1000, size=8)
    g.standard_normal((8, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(seen[0], np.where(g.random(8) < 0.5, 3, y))
    with pytest.raises(ValueError, match="label_dropout"):
        Trainer(m, LIN, label_dropout=1.5)
    with pytest.raises(ValueError, match="not class-conditional"):
        Trainer(UNet(**TINY, rng=0), LIN).step(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 1]))


# --------------------------------------------------------------------------------------- guidance


class Recording:
    """A class-conditional toy model (any callable) that records its calls."""

    num_classes = 4

    def __init__(self):
        self.calls = []

    @staticmethod
    def f(x, t, y):
        t = np.asarray(t, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        yy = np.asarray(y, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        return (0.3 * x + 0.1 * np.sin(x * (1 + yy)) + 0.05 * yy - 1e-4 * t).astype(x.dtype)

    def __call__(self, x, t, class_labels=None):
        self.calls.append((x.shape[0], None if class_labels is None else np.array(class_labels)))
        y = np.full(x.shape[0], self.num_classes) if class_labels is None else class_labels
        return self.f(x, t, y)


METHODS = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.5})]


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("method,extra", METHODS)
def test_guidance_is_the_formula_at_every_step_with_one_2n_call(method, extra, pred):
    n, w = 3, 2.5
    y = np.array([0, 2, 1])
    rec = Recording()
    kw = dict(method=method, num_steps=6, prediction_type=pred, clip_sample=False, dtype=np.float64, **extra)
    got = sample(rec, LIN, (n, 2), rng=np.random.default_rng(0), class_labels=y, guidance_scale=w, **kw)
    assert len(rec.calls) == 6 and all(c[0] == 2 * n for c in rec.calls)
    for _, labels in rec.calls:
        np.testing.assert_array_equal(labels, np.concatenate([y, np.full(n, 4)]))

    def guided(x, t):  # the formula, written out: out_u + w (out_c - out_u)
        out_u = Recording.f(x, t, np.full(n, 4))
        return out_u + w * (Recording.f(x, t, y) - out_u)

    want = sample(guided, LIN, (n, 2), rng=np.random.default_rng(0), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # w == 1: one call of N with the labels; no labels: one call of N without
    rec = Recording()
    sample(rec, LIN, (n, 2), rng=np.random.default_rng(0), class_labels=y, **kw)
    assert [c[0] for c in rec.calls] == [n] * 6 and all(np.array_equal(c[1], y) for c in rec.calls)


def test_guidance_rescale_is_lin_et_al_eq_15_16(rng):
    out_c, out_u = rng.standard_normal((3, 1, 4, 4)), rng.standard_normal((3, 1, 4, 4))
    w, phi = 3.0, 0.7
    g = out_u + w * (out_c - out_u)
    std = lambda a: a.reshape(3, -1).std(axis=1, ddof=1).reshape(3, 1, 1, 1)  # diffusers' torch.std
    want = phi * g * std(out_c) / std(g) + (1 - phi) * g
    np.testing.assert_allclose(guided_output(out_c, out_u, w, phi), want, rtol=1e-12)
    np.testing.assert_allclose(guided_output(out_c, out_u, w, 0.0), g, rtol=1e-12)
    with pytest.raises(ValueError, match="guidance_rescale"):
        make_model_fn(Recording(), "numpy", np.zeros(3, int), 2.0, 1.5, 3)
    with pytest.raises(ValueError, match="need class_labels"):
        sample(Recording(), LIN, (3, 2), num_steps=2, rng=np.random.default_rng(0), guidance_scale=2.0)
    with pytest.raises(TypeError, match="class-conditional"):
        sample(lambda x, t: x, LIN, (3, 2), num_steps=2, rng=np.random.default_rng(0), class_labels=0)


MU = np.array([[1.5, -1.0], [-1.0, 0.5], [0.0, 2.0]])
SD = np.array([[0.5, 0.8], [0.6, 0.4], [0.7, 0.6]])


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_guidance_one_gives_each_class_and_zero_the_mixture(pred):
    """Class-conditional Gaussians with the exact denoiser: DDIM with w = 1 reproduces each class's
    moments (exactly propagated through DDIM's affine steps), with w = 0 the mixture's."""
    n, steps = 3000, 50
    oracle = GaussianMixtureOracle(LIN, MU, SD, prediction_type=pred)
    kw = dict(method="ddim", num_steps=steps, clip_sample=False, prediction_type=pred, dtype=np.float64)
    ts = inference_timesteps(1000, steps)
    for k in range(3):
        x = sample(oracle, LIN, (n, 2), rng=np.random.default_rng(k), class_labels=k, guidance_scale=1.0, **kw)
        m, v = chain_moments(LIN, MU[k], SD[k], "ddim", ts)
        assert np.all(np.abs(x.mean(0) - m) < Z * np.sqrt(v / n)), (k, x.mean(0), m)
        assert np.all(np.abs(x.var(0, ddof=1) - v) < Z * v * np.sqrt(2 / (n - 1))), (k, x.var(0), v)
    # w = 0: the unconditional (mixture) model, whatever label is asked for
    x = sample(oracle, LIN, (n, 2), rng=np.random.default_rng(7), class_labels=0, guidance_scale=0.0,
               **dict(kw, num_steps=200))
    mix_mean = MU.mean(0)
    mix_var = (SD ** 2 + MU ** 2).mean(0) - mix_mean ** 2
    assert np.all(np.abs(x.mean(0) - mix_mean) < Z * np.sqrt(mix_var / n)), (x.mean(0), mix_mean)
    # the mixture's variance (larger than any class's): tolerance from the sample size (4th moment)
    m4 = np.mean([np.mean((np.random.default_rng(9).normal(MU[k], SD[k], (20000, 2)) - mix_mean) ** 4, 0)
                  for k in range(3)], axis=0)
    se_var = np.sqrt((m4 - mix_var ** 2) / n)
    assert np.all(np.abs(x.var(0, ddof=1) - mix_var) < Z * se_var + 0.03 * mix_var), (x.var(0), mix_var)
    assert np.all(mix_var > 1.5 * SD.max(0) ** 2)  # and it is not a class's variance: the check can fail


# --------------------------------------------------------------------------------------- inpainting


def test_repaint_timesteps_are_diffusers():
    # RePaintScheduler.set_timesteps(10, jump_length=2, jump_n_sample=2) with T = 100 (written out)
    want = [9, 8, 7, 6, 7, 8, 7, 6, 5, 4, 5, 6, 5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0]
    np.testing.assert_array_equal(repaint_timesteps(100, 10, 2, 2), np.array(want) * 10)
    np.testing.assert_array_equal(repaint_timesteps(100, 10, 2, 1), np.arange(9, -1, -1) * 10)
    with pytest.raises(ValueError, match="jump_length"):
        repaint_timesteps(100, 10, 0, 2)


RHO, A = 0.9, 1.5


def _inpaint_errors(jump_n_sample, n=2000):
    oracle = CorrelatedGaussianOracle(LIN, np.zeros(2), np.array([[1.0, RHO], [RHO, 1.0]]))
    x_known = np.tile(np.array([[A, 0.0]]), (n, 1))
    x = inpaint(oracle, LIN, x_known, np.array([[1.0, 0.0]]), num_steps=50, jump_length=10,
                jump_n_sample=jump_n_sample, rng=np.random.default_rng(3), clip_sample=False)
    np.testing.assert_array_equal(x[:, 0], x_known[:, 0])  # the known coordinate is exact
    m, v = x[:, 1].mean(), x[:, 1].var(ddof=1)
    return m - RHO * A, v - (1 - RHO ** 2), x


def test_repaint_resampling_approaches_the_exact_conditional():
    """x ~ N(0, [[1, rho], [rho, 1]]) with x_1 = a known: the exact conditional is N(rho a, 1 - rho^2)."""
    n = 2000
    e1_m, e1_v, _ = _inpaint_errors(1, n)
    e10_m, e10_v, x = _inpaint_errors(10, n)
    se_m, se_v = np.sqrt((1 - RHO ** 2) / n), (1 - RHO ** 2) * np.sqrt(2 / (n - 1))
    # replacement alone misses the conditional mean by many standard errors; resampling fixes most of it
    assert abs(e1_m) > 10 * se_m
    assert abs(e10_m) < 0.5 * abs(e1_m) and abs(e10_m) + abs(e10_v) < abs(e1_m) + abs(e1_v)
    assert abs(e10_v) < 0.5 * (1 - RHO ** 2) + Z * se_v
    print(f"RePaint mean/variance errors: jump_n_sample=1: {e1_m:+.3f} / {e1_v:+.3f}; "
          f"10: {e10_m:+.3f} / {e10_v:+.3f} (exact: mean {RHO * A}, var {1 - RHO ** 2:.3f})")


def test_inpaint_bad_masks_and_images(rng):
    x = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    model = UNet(**TINY, rng=0, backend="numpy")
    with pytest.raises(ValueError, match="only 0"):
        inpaint(model, LIN, x, np.full((1, 1, 8, 8), 0.5), num_steps=2, rng=0)
    with pytest.raises(ValueError, match="broadcast"):
        inpaint(model, LIN, x, np.ones((1, 1, 4, 4)), num_steps=2, rng=0)
    mask = np.zeros((1, 1, 8, 8))
    mask[..., :4, :] = 1
    out = inpaint(model, LIN, x, mask, num_steps=4, jump_length=2, jump_n_sample=2, rng=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out[..., :4, :], x[..., :4, :])
    assert not np.array_equal(out[..., 4:, :], x[..., 4:, :])


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("labels,w", [(None, 1.0), ([0, 2], 1.0), ([0, 2], 2.5)])
def test_reconstruction_guidance_gradient_is_the_finite_difference(rng, pred, labels, w):
    """Ho et al. 2022 Sec. 3.1: grad = d/dx_t ||m (x_known - x0_hat(x_t))||^2 through the (guided) network, and the
    output's x0_hat is moved by -(w_r sqrt(abar) / 2) (1 - m) grad in the unknown region only."""
    from difnumpy.samplers.inpaint import reconstruction_guided_output
    from difnumpy.samplers.steps import _x0_coefficients
    model = _random_conditional(rng)
    x = rng.standard_normal((2, 1, 8, 8))
    known = rng.uniform(-1, 1, x.shape)
    mask = np.zeros_like(x)
    mask[..., :4, :] = 1
    t, w_r = 300, 3.0
    c_x, c_o = (float(c) for c in _x0_coefficients(LIN, np.asarray(t), pred))
    y = None if labels is None else np.array(labels)

    def loss(xt):
        if y is not None and w != 1.0:
            out = model(xt, np.full(2, t), class_labels=np.full(2, 3))
            out = out + w * (model(xt, np.full(2, t), class_labels=y) - out)
        else:
            out = model(xt, np.full(2, t), class_labels=y)
        return float(np.sum((mask * (known - (c_x * xt + c_o * out))) ** 2))

    out, info = reconstruction_guided_output(model, LIN, x, t, known, mask, w_r, prediction_type=pred,
                                             class_labels=y, guidance_scale=w)
    idx = [(0, 0, 1, 2), (0, 0, 6, 5), (1, 0, 3, 0), (1, 0, 7, 7), (1, 0, 5, 1)]  # known and unknown pixels
    num = eval_numerical_gradient_at(loss, x.copy(), idx)
    assert rel_error(np.array([info["grad"][i] for i in idx]), num) < 1e-6
    x0_out = c_x * x + c_o * out
    want = info["x0_hat"] - (w_r * np.sqrt(LIN.alphas_cumprod[t]) / 2) * (1 - mask) * info["grad"]
    np.testing.assert_allclose(x0_out, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(x0_out[..., :4, :], info["x0_hat"][..., :4, :], rtol=1e-12, atol=1e-12)
    assert np.abs(x0_out - info["x0_hat"])[..., 4:, :].max() > 1e-3  # the unknown region moved


def test_inpaint_with_reconstruction_guidance(rng):
    x = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    model = _random_conditional(rng, dtype=np.float32)  # random weights: a fresh UNet's output layer is zero
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., :4, :] = 1
    kw = dict(num_steps=4, jump_length=2, jump_n_sample=2)
    plain = inpaint(model, LIN, x, mask, rng=0, **kw)
    np.testing.assert_array_equal(inpaint(model, LIN, x, mask, rng=0, reconstruction_guidance=0.0, **kw), plain)
    guided = inpaint(model, LIN, x, mask, rng=0, reconstruction_guidance=4.0, **kw)
    np.testing.assert_array_equal(guided[..., :4, :], x[..., :4, :])  # the known half exact
    assert np.abs(guided - plain)[..., 4:, :].max() > 1e-3
    with pytest.raises(ValueError, match="reconstruction_guidance must be a finite number >= 0"):
        inpaint(model, LIN, x, mask, rng=0, reconstruction_guidance=-1.0, **kw)
    with pytest.raises(TypeError, match="it needs a difnumpy UNet"):
        inpaint(lambda xt, t: np.zeros_like(xt), LIN, x, mask, rng=0, reconstruction_guidance=1.0, **kw)


# --------------------------------------------------------------------------------------- image-to-image


def test_sdedit_starts_from_the_noised_image_at_the_strength_step():
    n, steps, strength = 4, 10, 0.35
    x_init = np.random.default_rng(0).uniform(-1, 1, (n, 2))
    rec = Recording()
    trace = list(sample_progressive(rec, LIN, (n, 2), method="ddim", num_steps=steps, x_init=x_init,
                                    strength=strength, rng=np.random.default_rng(4), class_labels=1,
                                    clip_sample=False, dtype=np.float64))
    ts = inference_timesteps(1000, steps)
    run = int(steps * strength)
    assert [s["t"] for s in trace] == list(ts[steps - run:]) and len(rec.calls) == run
    # the first model input is q_sample(x_init, t_first) with the rng's first draw (DDPM eq. 4)
    ab = LIN.alphas_cumprod[ts[steps - run]]
    eps = np.random.default_rng(4).standard_normal((n, 2))
    first = []
    sample_progressive(lambda x, t, class_labels=None: first.append(x) or x, LIN, (n, 2), method="ddim",
                       num_steps=steps, x_init=x_init, strength=strength, rng=np.random.default_rng(4),
                       clip_sample=False, dtype=np.float64).__next__()
    np.testing.assert_allclose(first[0], np.sqrt(ab) * x_init + np.sqrt(1 - ab) * eps, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="strength"):
        sample(rec, LIN, (n, 2), num_steps=steps, x_init=x_init, strength=0.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="leaves no step"):
        sample(rec, LIN, (n, 2), num_steps=steps, x_init=x_init, strength=0.05, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="x_init"):
        sample(rec, LIN, (n, 2), num_steps=steps, strength=0.5, rng=np.random.default_rng(0))


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_sdedit_with_a_solver_starts_at_its_own_noise_level(method):
    from difnumpy import solvers
    n, steps, strength = 3, 8, 0.5
    x_init = np.random.default_rng(0).uniform(-1, 1, (n, 2))
    calls = []

    def model(x, t):
        calls.append((x.copy(), np.array(t, dtype=np.float64)))
        return 0.1 * x

    sample(model, LIN, (n, 2), method=method, num_steps=steps, x_init=x_init, strength=strength,
           rng=np.random.default_rng(4), dtype=np.float64)
    run = int(steps * strength)
    assert len(calls) == run * solvers.CALLS_PER_STEP[method] - (1 if method == "heun" else 0)
    t0, sigma = solvers.start_sigma(method, LIN, steps, None, steps - run)
    eps = np.random.default_rng(4).standard_normal((n, 2))
    np.testing.assert_allclose(calls[0][0], (x_init + sigma * eps) / np.sqrt(1 + sigma ** 2), rtol=1e-12)
    np.testing.assert_allclose(calls[0][1], t0)
