"""Sample-quality metrics for 8x8 digits, and bits/dim through the variational bound.

Frechet distance
    FID (Heusel et al. 2017) computed in the feature space of a small, fixed digit
    classifier instead of Inception-v3: a scikit-learn ``MLPClassifier`` with hidden
    layers (128, 64), ReLU, ``alpha=1e-2``, Adam, ``max_iter=400``, ``random_state=0``,
    trained on the ``"train"`` split of :func:`difnumpy.data.load_digits` (pixels in
    [-1, 1], flattened to 64) at first use and cached for the process (about a second).
    The features are the 64 activations of the last hidden layer, computed with NumPy
    from the fitted ``coefs_`` / ``intercepts_``. Being a scikit-learn model, its
    weights (so the absolute distances) may shift slightly with the scikit-learn
    version; compare numbers measured with the same version, and always beside the
    floor (train vs test) and the ceiling (noise vs test) that :func:`evaluate_samples`
    reports with them.

Bits per dimension
    The DDPM variational bound (Ho et al. 2020, eq. 5), term by term as
    improved-diffusion's ``calc_bpd_loop`` (Nichol & Dhariwal 2021).

No global RNG: every random draw comes from an explicit ``np.random.Generator``.
"""
from __future__ import annotations

import math
import threading
import warnings

import numpy as np
from scipy import linalg

from difnumpy._validation import PREDICTION_TYPES, check_choice

__all__ = [
    "CLASSIFIER_PARAMS",
    "get_digit_classifier",
    "features",
    "predict_proba",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "evaluate_samples",
    "bits_per_dim",
]

#: The digit classifier's hyper-parameters (scikit-learn ``MLPClassifier`` arguments).
CLASSIFIER_PARAMS = dict(hidden_layer_sizes=(128, 64), activation="relu", solver="adam",
                         alpha=1e-2, max_iter=400, random_state=0)

_LOCK = threading.Lock()
_CACHE: dict = {}


# --------------------------------------------------------------------------------------
# the fixed digit classifier
# --------------------------------------------------------------------------------------
def get_digit_classifier():
    """The fitted digit classifier (trained at the first call, then cached in-process).

    Returns
    -------
    clf : sklearn.neural_network.MLPClassifier
        Fitted with :data:`CLASSIFIER_PARAMS` on ``load_digits("train")`` flattened to
        (1437, 64) float64 in [-1, 1]. Treat it as read-only.
    """
    with _LOCK:
        clf = _CACHE.get("clf")
        if clf is None:
            from sklearn.exceptions import ConvergenceWarning
            from sklearn.neural_network import MLPClassifier

            from difnumpy.data import load_digits

            from threadpoolctl import threadpool_limits  # a scikit-learn dependency

            x, y = load_digits("train", return_labels=True)
            # The matrices are tiny: one BLAS thread is fastest, and avoids OpenBLAS threads
            # spinning against each other on a busy machine (18 s instead of 1 s measured).
            with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = MLPClassifier(**CLASSIFIER_PARAMS).fit(x.reshape(len(x), 64).astype(np.float64), y)
            _CACHE["clf"] = clf
        return clf


def _as_flat_digits(x, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be an ndarray of shape (N, 1, 8, 8) or (N, 64), "
                        f"got {type(x).__name__}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must be a real array, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[0] < 1 or int(np.prod(x.shape[1:], dtype=np.int64)) != 64 \
            or x.ndim not in (2, 4):
        raise ValueError(f"{name} must have shape (N, 1, 8, 8) or (N, 64) with N >= 1, got {x.shape}")
    flat = x.reshape(x.shape[0], 64).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{name} contains NaN or inf")
    return flat


def _forward(flat: np.ndarray):
    clf = get_digit_classifier()
    h = flat
    for w, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
        h = np.maximum(h @ w + b, 0.0)
    logits = h @ clf.coefs_[-1] + clf.intercepts_[-1]
    return h, logits


def features(x: np.ndarray) -> np.ndarray:
    """Classifier features: the activations of the last hidden layer.

    Parameters
    ----------
    x : ndarray, shape (N, 1, 8, 8) or (N, 64), values in [-1, 1]

    Returns
    -------
    feats : ndarray, shape (N, 64), float64
        ``relu(relu(x W1 + b1) W2 + b2)`` with the classifier's fitted weights.
    """
    return _forward(_as_flat_digits(x))[0]


def predict_proba(x: np.ndarray) -> np.ndarray:
    """Class probabilities of the digit classifier (softmax of its logits).

    Parameters
    ----------
    x : ndarray, shape (N, 1, 8, 8) or (N, 64), values in [-1, 1]

    Returns
    -------
    probs : ndarray, shape (N, 10), float64, rows summing to 1
    """
    logits = _forward(_as_flat_digits(x))[1]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------
def _check_features(f, name: str) -> np.ndarray:
    if not isinstance(f, np.ndarray):
        raise TypeError(f"{name} must be an ndarray of shape (N, D), got {type(f).__name__}")
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {f.shape}")
    f = f.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} contains NaN or inf")
    return f


def feature_statistics(feats: np.ndarray):
    """Mean and covariance of a feature set.

    Parameters
    ----------
    feats : ndarray, shape (N, D), N >= 2

    Returns
    -------
    mu : ndarray, shape (D,), float64
    sigma : ndarray, shape (D, D), float64
        Unbiased sample covariance (``np.cov(..., rowvar=False)``, as pytorch-fid).
    """
    f = _check_features(feats, "feats")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Parameters
    ----------
    mu1, mu2 : ndarray, shape (D,)
    sigma1, sigma2 : ndarray, shape (D, D), symmetric positive semi-definite
    eps : float
        Diagonal offset added to both covariances when their product is singular enough
        to make ``sqrtm`` non-finite (pytorch-fid's rule).

    Returns
    -------
    d2 : float
        ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, clamped at 0
        (round-off can make it a tiny negative number for identical inputs).

    Raises
    ------
    ValueError
        Shapes disagree, or ``(sigma1 sigma2)^(1/2)`` has a significant imaginary part
        (max |imag| of its diagonal > 1e-3), which means the inputs are not covariances.

    Notes
    -----
    Dowson & Landau 1982; Heusel et al. 2017 (FID), eq. 6. Singular / complex handling
    follows pytorch-fid's ``calculate_frechet_distance``: the matrix square root of a
    product of PSD matrices has real, non-negative eigenvalues, so a small imaginary part
    is round-off and is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must have shape ({d}, {d}), got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular-matrix notes from sqrtm
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.all(np.isfinite(covmean)):
        raise ValueError("the covariance product has no finite square root even with the eps offset")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component {m:.3g}; "
                             "sigma1 and sigma2 must be covariance matrices")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between two feature sets, each summarised by a Gaussian.

    Parameters
    ----------
    feat_a, feat_b : ndarray, shape (N_a, D) and (N_b, D), N >= 2
    eps : float
        See :func:`frechet_distance_from_stats`.

    Returns
    -------
    d2 : float, >= 0
        The squared Frechet (2-Wasserstein) distance between ``N(mu_a, Sigma_a)`` and
        ``N(mu_b, Sigma_b)`` (FID's formula, Heusel et al. 2017).
    """
    fa = _check_features(feat_a, "feat_a")
    fb = _check_features(feat_b, "feat_b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feat_a and feat_b must have the same feature dimension, "
                         f"got {fa.shape[1]} and {fb.shape[1]}")
    return frechet_distance_from_stats(*feature_statistics(fa), *feature_statistics(fb), eps=eps)


def _test_reference():
    """Cached (features, stats) of the digits test split."""
    with _LOCK:
        ref = _CACHE.get("test_ref")
    if ref is None:
        from difnumpy.data import load_digits

        f = features(load_digits("test"))
        ref = (f, feature_statistics(f))
        with _LOCK:
            _CACHE["test_ref"] = ref
    return ref


# --------------------------------------------------------------------------------------
# evaluate a set of samples
# --------------------------------------------------------------------------------------
def evaluate_samples(samples: np.ndarray, rng: np.random.Generator,
                     confidence_threshold: float = 0.9, floor_repeats: int = 5) -> dict:
    """Score generated 8x8 digits against the test split.

    Parameters
    ----------
    samples : ndarray, shape (N, 1, 8, 8) or (N, 64), values in [-1, 1], N >= 2
    rng : numpy.random.Generator
        Draws the train subset (floor) and the noise images (ceiling).
    confidence_threshold : float in (0, 1]
        A sample counts as confidently classified when its max class probability is
        at least this (default 0.9).
    floor_repeats : int >= 1
        The floor is averaged over this many independent train subsets (default 5): one
        subset's distance varies by about 15 % (std 0.5 around 3.5 at N = 500).

    Returns
    -------
    metrics : dict (JSON-serialisable: floats, ints, lists)
        ``fd``: Frechet distance, samples vs test split (360 images).
        ``fd_floor``: the same distance for a random subset of the train split of the
        same size N (drawn without replacement; all 1437 if N > 1437), averaged over
        ``floor_repeats`` subsets -- what a model that reproduces the training
        distribution would score at this sample size; ``fd_floor_std``: its spread.
        ``fd_noise``: the same for N images of Gaussian noise N(0, 1) clipped to [-1, 1]
        (an untrained model's output) -- the ceiling.
        ``fd_ratio``: ``fd / fd_floor``.
        ``confident_fraction``: fraction of samples whose max class probability >= the
        threshold; ``mean_confidence``: mean max class probability.
        ``class_histogram``: list of 10 fractions (samples per predicted class / N);
        ``class_fraction_min``, ``class_fraction_max``: its extremes.
        ``n_samples``, ``floor_size``, ``confidence_threshold``: what was measured.
    """
    flat = _as_flat_digits(samples, "samples")
    n = flat.shape[0]
    if n < 2:
        raise ValueError(f"samples must hold at least 2 images for a covariance, got N={n}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(floor_repeats, bool) or not isinstance(floor_repeats, (int, np.integer)) or floor_repeats < 1:
        raise ValueError(f"floor_repeats must be an int >= 1, got {floor_repeats!r}")
    if not (isinstance(confidence_threshold, (int, float)) and 0.0 < confidence_threshold <= 1.0):
        raise ValueError(f"confidence_threshold must be a float in (0, 1], got {confidence_threshold!r}")
    from difnumpy.data import load_digits

    _, (mu_ref, sig_ref) = _test_reference()

    def fd_to_test(x):
        return frechet_distance_from_stats(*feature_statistics(features(x)), mu_ref, sig_ref)

    train = load_digits("train").reshape(-1, 64)
    floor_size = min(n, train.shape[0])
    floors = np.array([fd_to_test(train[rng.choice(train.shape[0], size=floor_size, replace=False)])
                       for _ in range(floor_repeats)])
    noise = np.clip(rng.standard_normal((n, 64)), -1.0, 1.0)

    probs = predict_proba(flat)
    conf = probs.max(axis=1)
    hist = np.bincount(probs.argmax(axis=1), minlength=10) / n
    fd = fd_to_test(flat)
    fd_floor = float(floors.mean())
    return {
        "fd": fd,
        "fd_floor": fd_floor,
        "fd_floor_std": float(floors.std()),
        "fd_noise": fd_to_test(noise),
        "fd_ratio": fd / fd_floor if fd_floor > 0 else float("inf"),
        "confident_fraction": float(np.mean(conf >= confidence_threshold)),
        "mean_confidence": float(conf.mean()),
        "class_histogram": [float(v) for v in hist],
        "class_fraction_min": float(hist.min()),
        "class_fraction_max": float(hist.max()),
        "n_samples": int(n),
        "floor_size": int(floor_size),
        "confidence_threshold": float(confidence_threshold),
    }


# --------------------------------------------------------------------------------------
# bits per dimension
# --------------------------------------------------------------------------------------
_LN2 = math.log(2.0)


def _kl_timesteps(T: int, k: int | None):
    """Timesteps in 1..T-1 for the KL terms, and the weight (block size) of each.

    Exact (every t, weight 1) when ``k`` is None or >= T-1. Otherwise 1..T-1 is cut into
    exactly ``k`` contiguous blocks with log-spaced edges -- the terms fall off roughly like 1/t
    (most of the bound sits in the first steps; Nichol & Dhariwal 2021, Fig. 2), so the
    first blocks are single timesteps -- and each block is represented by its
    geometric-mean timestep, weighted by the block's size.

    The edges ``1 = e_0 < e_1 < ... < e_k = T`` are built one at a time: with ``m`` blocks
    left to cover ``[e, T]``, the next edge is the geometric step ``e (T / e)^(1/m)``,
    rounded, and at least ``e + 1``. The geometric step is the smallest of the ``m`` steps
    of a geometric sequence from ``e`` to ``T``, so it is at most ``(T - e) / m`` and always
    leaves one timestep for each of the ``m - 1`` blocks after it: every ``k`` in
    [1, T-2] gives exactly ``k`` distinct timesteps. (Rounding one ``geomspace`` and
    dropping duplicates, as before, could not give more than 423 distinct edges for
    T = 1000.)
    """
    if T < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if k is None or k >= T - 1:
        return np.arange(1, T, dtype=np.int64), np.ones(T - 1)
    edges = np.empty(k + 1, dtype=np.int64)
    edges[0] = 1
    for i in range(1, k + 1):
        e, m = int(edges[i - 1]), k - i + 1  # m blocks still to place over [e, T]
        nxt = max(e + 1, int(round(e * (T / e) ** (1.0 / m))))
        edges[i] = min(nxt, T - (m - 1))  # a no-op by the argument above; kept as a guard
    edges[-1] = T  # blocks [e_i, e_{i+1}) cover 1..T-1 exactly
    lo, hi = edges[:-1], edges[1:] - 1
    ts = np.clip(np.round(np.sqrt(lo * hi)).astype(np.int64), lo, hi)
    return ts, (edges[1:] - edges[:-1]).astype(np.float64)


def bits_per_dim(model, schedule, x0: np.ndarray, rng: np.random.Generator, *,
                 num_timesteps_subsample: int | None = None, prediction_type: str = "epsilon",
                 variance_type: str | None = None, clip_denoised: bool = True,
                 bin_width: float = 2.0 / 255.0, batch_size: int | None = None) -> dict:
    """Negative log-likelihood bound in bits per dimension (DDPM eq. 5).

    Parameters
    ----------
    model : callable
        ``model(x_t, t) -> output`` with ``x_t`` of shape (B, C, ...) in x0's dtype and
        ``t`` int64 of shape (B,). The output has x0's shape (eps, x0 or v) or, for a
        learned variance, twice its channels (prediction, then the interpolation ``v``).
    schedule : Schedule
    x0 : ndarray, shape (N, C, ...), float32 or float64
        Held-out data in [-1, 1], on the centres of bins of width ``bin_width``.
    rng : numpy.random.Generator
        Draws the noise of every ``x_t``.
    num_timesteps_subsample : int, optional
        Evaluate the KL terms at exactly this many timesteps: 1..T-1 is cut into that many
        contiguous blocks with log-spaced edges (single timesteps first, where the terms
        are largest), each block's geometric-mean timestep is evaluated and weighted by
        the block's size. This is an *estimate* of the bound (exact when None or >= T-1;
        about 1 % off with 100 of 1000 on a Gaussian test case, 5 % with 20); the
        decoder term (t = 0) and the prior term are always computed.
    prediction_type : {"epsilon", "sample", "v_prediction"}
    variance_type : {"fixed_small", "fixed_large", "learned_range"}, optional
        Default: "learned_range" when the model returns 2C channels, else "fixed_small".
    clip_denoised : bool
        Clip the predicted x0 to [-1, 1] before forming the reverse mean (as
        ``calc_bpd_loop``'s default).
    bin_width : float
        Width of a data bin in [-1, 1] units: ``2/255`` for 8-bit images, ``2/16`` for the
        17-level 8x8 digits (``x/8 - 1``).
    batch_size : int, optional
        Model calls take at most this many images (default: all N at once).

    Returns
    -------
    result : dict
        ``bpd``: the bound, mean over images; ``bpd_sem``: its standard error over images
        (None when N = 1);
        ``prior_bpd``: ``L_T``; ``decoder_bpd``: ``L_0``; ``kl_bpd``: ``sum_{t>=1} L_{t-1}``
        (scaled estimate when subsampled); ``num_timesteps_evaluated``; ``exact``
        (False when subsampled).

    Notes
    -----
    DDPM eq. 5: ``L = L_T + sum_{t>1} L_{t-1} + L_0`` with
    ``L_T = KL(q(x_T|x0) || N(0, I))``, ``L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t))``
    (Gaussians: eqs. 6-7 against the model's mean and variance) and
    ``L_0 = -log p(x0|x1)`` under the discretized Gaussian decoder (eq. 13). In the
    0-indexed timesteps used here, the KL terms are at t = 1..T-1, the decoder at t = 0.
    Each term is averaged over dimensions and divided by ln 2 (improved-diffusion
    ``_vb_terms_bpd`` / ``calc_bpd_loop`` / ``_prior_bpd``).
    """
    from difnumpy.diffusion import (discretized_gaussian_log_likelihood, normal_kl, predict_x0_from_eps,
                                    predict_x0_from_v, q_mean_variance, q_posterior_mean_variance, q_sample)
    from difnumpy.schedules import Schedule

    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a difnumpy Schedule, got {type(schedule).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    if not isinstance(x0, np.ndarray) or x0.dtype not in (np.float32, np.float64):
        raise TypeError(f"x0 must be a float32 or float64 ndarray, got "
                        f"{getattr(x0, 'dtype', type(x0).__name__)}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (N, C, ...) with N >= 1, got {x0.shape}")
    if not np.all(np.isfinite(x0)):
        raise ValueError("x0 contains NaN or inf")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    if variance_type not in (None, "fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"variance_type must be None, 'fixed_small', 'fixed_large' or 'learned_range', "
                         f"got {variance_type!r}")
    if num_timesteps_subsample is not None and (
            isinstance(num_timesteps_subsample, bool)
            or not isinstance(num_timesteps_subsample, (int, np.integer)) or num_timesteps_subsample < 1):
        raise ValueError(f"num_timesteps_subsample must be an int >= 1 or None, got {num_timesteps_subsample!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if not (isinstance(bin_width, (int, float)) and bin_width > 0):
        raise ValueError(f"bin_width must be a float > 0, got {bin_width!r}")

    T = schedule.num_timesteps
    n = x0.shape[0]
    c = x0.shape[1]
    dims = int(np.prod(x0.shape[1:]))
    bs = n if batch_size is None else int(batch_size)
    x0_64 = x0.astype(np.float64)
    state = {"variance_type": variance_type}

    def run_model(x_t64, t):
        outs = []
        for s in range(0, n, bs):
            xb = x_t64[s:s + bs].astype(x0.dtype)
            out = model(xb, np.full(xb.shape[0], t, dtype=np.int64))
            outs.append(np.asarray(out))
        out = np.concatenate(outs).astype(np.float64)
        vt = state["variance_type"]
        learned_shape = (n, 2 * c) + x0.shape[2:]
        if vt is None:
            vt = "learned_range" if out.shape == learned_shape else "fixed_small"
            state["variance_type"] = vt
        expect = learned_shape if vt == "learned_range" else x0.shape
        if out.shape != expect:
            raise ValueError(f"model output must have shape {expect} for variance_type={vt!r}, got {out.shape}")
        if not np.all(np.isfinite(out)):
            raise ValueError(f"model output contains NaN or inf at t={t}")
        if vt == "learned_range":
            return out[:, :c], out[:, c:], vt
        return out, None, vt

    def terms(t):
        """Per-image bits/dim of L_{t} (KL for t >= 1, decoder NLL for t == 0)."""
        noise = rng.standard_normal(x0.shape)
        x_t = q_sample(schedule, x0_64, t, noise=noise, backend="numpy")
        pred, var_v, vt = run_model(x_t, t)
        tt = np.full(n, t, dtype=np.int64)
        if prediction_type == "epsilon":
            x0_pred = predict_x0_from_eps(schedule, x_t, tt, pred)
        elif prediction_type == "v_prediction":
            x0_pred = predict_x0_from_v(schedule, x_t, tt, pred)
        else:
            x0_pred = pred
        if clip_denoised:
            x0_pred = np.clip(x0_pred, -1.0, 1.0)
        model_mean, _, _ = q_posterior_mean_variance(schedule, x0_pred, x_t, tt)
        shape = (n,) + (1,) * (x0.ndim - 1)
        if vt == "fixed_small":
            model_log_var = np.full(shape, schedule.posterior_log_variance_clipped[t])
        elif vt == "fixed_large":
            large = np.append(schedule.posterior_variance[1] if T > 1 else schedule.betas[0], schedule.betas[1:])
            model_log_var = np.full(shape, np.log(large[t]))
        else:
            min_log = schedule.posterior_log_variance_clipped[t]
            max_log = np.log(schedule.betas[t])
            frac = (var_v + 1.0) / 2.0
            model_log_var = frac * max_log + (1.0 - frac) * min_log
        if t == 0:
            ll = discretized_gaussian_log_likelihood(x0_64, means=model_mean, log_scales=0.5 * model_log_var,
                                                     bin_width=bin_width)
            out = -ll
        else:
            true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0_64, x_t, tt)
            out = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
        out = np.broadcast_to(out, x0.shape).reshape(n, -1).mean(axis=1) / _LN2
        if not np.all(np.isfinite(out)):
            raise ValueError(f"the variational bound term at t={t} is not finite")
        return out

    # prior L_T = KL(q(x_T | x0) || N(0, I))
    mean_T, _, log_var_T = q_mean_variance(schedule, x0_64, T - 1)
    prior = normal_kl(mean_T, log_var_T, 0.0, 0.0)
    prior = np.broadcast_to(prior, x0.shape).reshape(n, -1).mean(axis=1) / _LN2

    ts, weights = _kl_timesteps(T, None if num_timesteps_subsample is None else int(num_timesteps_subsample))
    kl = np.zeros(n)
    for t, w in zip(ts[::-1], weights[::-1]):  # from T-1 down, as calc_bpd_loop
        kl += w * terms(int(t))
    decoder = terms(0)
    total = prior + kl + decoder
    return {
        "bpd": float(total.mean()),
        "bpd_sem": float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "prior_bpd": float(prior.mean()),
        "decoder_bpd": float(decoder.mean()),
        "kl_bpd": float(kl.mean()),
        "num_timesteps_evaluated": int(len(ts) + 1),
        "exact": bool(len(ts) == max(T - 1, 0)),
        "dims": dims,
    }
