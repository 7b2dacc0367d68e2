"""The numba nn kernels (difnumpy.kernels.cpu) agree with their NumPy twins (difnumpy.kernels.reference).

Small shapes only: compilation dominates; the checks themselves run in well under a second.
"""
import numba
import numpy as np
import pytest

from difnumpy.kernels import cpu, reference as ref
from difnumpy.kernels.cpu import _threads, conv as cpu_conv, groupnorm as cpu_gn, winograd as cpu_wino

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
DTYPES = [np.float32, np.float64]

# (N, C, H, W, F, K, stride, padding): "same" 3x3 (wide-row path), 1x1 (no im2col), general path
CONV_CASES = [
    (2, 3, 6, 6, 4, 3, 1, 1),
    (3, 4, 5, 7, 2, 3, 1, 1),
    (2, 5, 4, 4, 3, 1, 1, 0),
    (2, 3, 6, 6, 4, 3, 2, 1),
    (3, 2, 7, 5, 3, 3, 2, 0),
    (2, 3, 5, 5, 2, 3, 1, 0),
    (1, 2, 5, 6, 3, 1, 2, 1),
    (2, 2, 6, 6, 3, 5, 1, 2),
    (40, 2, 2, 2, 3, 3, 1, 1),   # many images per chunk, a partial last chunk
    (300, 3, 4, 4, 5, 1, 1, 0),  # 1x1 weight gradient: parts of several multi-image chunks, partial last ones
    (3, 2, 20, 30, 3, 1, 1, 0),  # 1x1 weight gradient: one image per chunk (HW > its 512 columns)
]


def _close(a, b, dtype):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a / scale, b / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_kernels_match_reference(case, dtype):
    N, C, H, W, F, K, s, p = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, K, K)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    out = cpu.conv2d_forward(x, w, b, s, p)
    out_ref = ref.conv2d_forward(x, w, b, s, p)
    assert out.dtype == dtype and out.shape == out_ref.shape and out.flags.c_contiguous
    _close(out, out_ref, dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = cpu.conv2d_backward_input(dout, w, x.shape, s, p)
    assert dx.dtype == dtype and dx.shape == x.shape
    _close(dx, ref.conv2d_backward_input(dout, w, x.shape, s, p), dtype)
    dw, db = cpu.conv2d_backward_weight(dout, x, w.shape, s, p)
    dw_ref, db_ref = ref.conv2d_backward_weight(dout, x, w.shape, s, p)
    assert dw.dtype == dtype and db.dtype == dtype and dw.shape == w.shape and db.shape == (F,)
    _close(dw, dw_ref, dtype)
    _close(db, db_ref, dtype)


# 3x3 / stride 1 / pad 1: the Winograd F(2x2, 3x3) path. Odd sizes leave partial 2x2 tiles; 1-pixel images
# are all padding but the centre; N = 70 at 8x8 spans several chunks (and both threads of a 2-core run).
WINO_CASES = [(1, 1, 1, 1, 1), (2, 3, 1, 5, 2), (2, 2, 5, 1, 3), (3, 5, 7, 9, 4), (2, 4, 4, 4, 6),
              (70, 3, 8, 8, 5), (3, 17, 6, 10, 33), (2, 3, 7, 6, 4), (2, 9, 12, 8, 7), (1, 24, 28, 28, 16)]
# (odd heights and widths: the weight gradient's output-gradient transform reads the zero row / column
# past the image). The forward (and input gradient) takes F(4x4, 3x3) on whole 4x4 tiles from
# _WINO4_MIN_TILES tiles: every case runs with F(2x2) (that threshold out of reach), those of whole tiles
# also with F(4x4) (the threshold at 1).
WINO_RUNS = [(c, False) for c in WINO_CASES] + [(c, True) for c in WINO_CASES if c[2] % 4 == 0 and c[3] % 4 == 0]


def _wino4_everywhere(monkeypatch, four):
    monkeypatch.setattr(cpu_wino, "_WINO4_MIN_TILES", 1 if four else 1 << 40)


def test_few_input_channels_take_the_wide_row_path():
    """3x3 convs with fewer than _WINO_MIN_C input channels (the U-Net's stem; its output conv's input gradient,
    a forward conv of 1 channel) use the wide-row im2col, the others Winograd; both agree with the reference."""
    lo = cpu_conv._WINO_MIN_C - 1
    assert cpu_conv._conv_mode(3, 3, 1, 1, lo) == 0 and cpu_conv._conv_mode(3, 3, 1, 1, lo + 1) == 3
    rng = np.random.default_rng(11)
    for C, F in ((1, 6), (6, 1)):
        x = rng.standard_normal((3, C, 7, 8))
        w = rng.standard_normal((F, C, 3, 3))
        b = rng.standard_normal(F)
        d = rng.standard_normal((3, F, 7, 8))
        got = (cpu.conv2d_forward(x, w, b, 1, 1), cpu.conv2d_backward_input(d, w, x.shape, 1, 1),
               *cpu.conv2d_backward_weight(d, x, w.shape, 1, 1))
        want = (ref.conv2d_forward(x, w, b, 1, 1), ref.conv2d_backward_input(d, w, x.shape, 1, 1),
                *ref.conv2d_backward_weight(d, x, w.shape, 1, 1))
        for g, r in zip(got, want):
            _close(g, r, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,four", WINO_RUNS)
def test_winograd_conv_matches_reference_and_im2col(case, four, dtype, monkeypatch):
    N, C, H, W, F = case
    monkeypatch.setattr(cpu_conv, "_WINO_MIN_C", 1)  # Winograd for every C here (the U-Net's stem skips it)
    assert cpu_conv._conv_mode(3, 3, 1, 1, C) == 3 and cpu_conv._conv_mode(3, 3, 1, 1, F) == 3
    _wino4_everywhere(monkeypatch, four)
    assert cpu_wino._wino_plan(N, C, F, H, W, np.dtype(dtype).itemsize)[0] == four
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    dout = rng.standard_normal((N, F, H, W)).astype(dtype)
    got = (cpu.conv2d_forward(x, w, b, 1, 1), cpu.conv2d_backward_input(dout, w, x.shape, 1, 1),
           *cpu.conv2d_backward_weight(dout, x, w.shape, 1, 1))
    want = (ref.conv2d_forward(x, w, b, 1, 1), ref.conv2d_backward_input(dout, w, x.shape, 1, 1),
            *ref.conv2d_backward_weight(dout, x, w.shape, 1, 1))
    monkeypatch.setattr(cpu_conv, "USE_WINOGRAD", False)  # the flag is read in cpu.conv
    assert cpu_conv._conv_mode(3, 3, 1, 1) == 0
    im2col = (cpu.conv2d_forward(x, w, b, 1, 1), cpu.conv2d_backward_input(dout, w, x.shape, 1, 1),
              *cpu.conv2d_backward_weight(dout, x, w.shape, 1, 1))
    for g, r, i in zip(got, want, im2col):
        assert g.dtype == dtype and g.shape == r.shape and g.flags.c_contiguous
        _close(g, r, dtype)
        _close(i, r, dtype)


_BAND_CASES = [((1, 40, 27, 29, 40), False), ((2, 64, 28, 28, 64), False), ((1, 64, 32, 32, 64), True)]


@numba.njit
def _gemm(a, b, out):
    np.dot(a, b, out)  # the BLAS the kernels call (numba's np.dot: scipy's), not NumPy's own


def _blas_rows_invariant(dtype, M=210, K=40, F=40):
    """Whether this BLAS computes each row of ``a @ b`` with the same bits whatever block of rows it is
    given (rows split in halves, thirds, quarters). Not every OpenBLAS build does on every CPU: scipy
    1.10's on an AMD EPYC (Zen 4) does not; scipy 1.17's there and both on the Xeon do."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, F)).astype(dtype)
    full = np.empty((M, F), dtype)
    _gemm(a, b, full)
    for step in (M // 2, M // 3, M // 4):
        for r0 in range(0, M, step):
            part = np.empty((min(step, M - r0), F), dtype)
            _gemm(np.ascontiguousarray(a[r0:r0 + step]), b, part)
            if not np.array_equal(part, full[r0:r0 + step]):
                return False
    return True


def _banded_conv(case, four, dtype, monkeypatch):
    """The case's forward conv and input gradient, computed in bands of tile rows (asserted), with its inputs."""
    N, C, H, W, F = case
    isz = np.dtype(dtype).itemsize
    _wino4_everywhere(monkeypatch, four)
    for shape in ((C, F), (F, C)):  # the forward and the input gradient's conv
        plan = cpu_wino._wino_plan(N, *shape, H, W, isz)
        assert plan[0] == four and plan[3] == 1 and plan[4] >= 2
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    dout = rng.standard_normal((N, F, H, W)).astype(dtype)
    return (cpu.conv2d_forward(x, w, b, 1, 1), cpu.conv2d_backward_input(dout, w, x.shape, 1, 1)), (x, w, b, dout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,four", _BAND_CASES)
def test_winograd_forward_in_bands_of_tile_rows(case, four, dtype, monkeypatch):
    """Images whose tiles exceed the L2 budget are computed in bands of tile rows: the same result as the
    reference (odd sizes: partial tiles at a band's last row)."""
    got, (x, w, b, dout) = _banded_conv(case, four, dtype, monkeypatch)
    assert got[0].shape == dout.shape and got[1].shape == x.shape and got[0].dtype == got[1].dtype == dtype
    _close(got[0], ref.conv2d_forward(x, w, b, 1, 1), dtype)
    _close(got[1], ref.conv2d_backward_input(dout, w, x.shape, 1, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,four", _BAND_CASES)
def test_winograd_bands_give_the_bits_of_one_band(case, four, dtype, monkeypatch):
    """Bands of tile rows give the same bits as one band per image, where the BLAS computes a GEMM's rows
    alike in any block of rows (each band is a GEMM over fewer rows: the kernels add nothing else)."""
    if not _blas_rows_invariant(dtype):
        pytest.skip("this BLAS's GEMM rows depend on how many rows it is given")
    got, (x, w, b, dout) = _banded_conv(case, four, dtype, monkeypatch)
    N, C, H, W, F = case
    monkeypatch.setattr(cpu_wino, "_wino4_tiles" if four else "_wino_bands", lambda *a: 1 << 30 if four else 1)
    assert cpu_wino._wino_plan(N, C, F, H, W, np.dtype(dtype).itemsize)[4] == 1
    one_band = cpu.conv2d_forward(x, w, b, 1, 1), cpu.conv2d_backward_input(dout, w, x.shape, 1, 1)
    for g, o in zip(got, one_band):
        np.testing.assert_array_equal(g, o)


def test_winograd_transform_matrices_reproduce_a_direct_tile():
    """Y = A^T [(G g G^T) * (B^T d B)] A equals the 2x2 valid correlation of one 4x4 tile (Lavin & Gray eq. 8)."""
    rng = np.random.default_rng(1)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    Gm = cpu_wino._WINO_G
    Bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float)
    At = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)
    y = At @ ((Gm @ g @ Gm.T) * (Bt @ d @ Bt.T)) @ At.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(y, direct, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("hw", [(4, 4), (8, 8), (12, 8), (6, 6)])
def test_winograd_image_gets_the_same_bits_in_any_batch(hw):
    """The F(4x4) / F(2x2) choice and the per-image arithmetic depend on the image size only: an image's
    output and input gradient are the same bits alone and in a batch (sharded sampling relies on it)."""
    H, W = hw
    rng = np.random.default_rng(H * W)
    x = rng.standard_normal((9, 8, H, W)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    d = rng.standard_normal((9, 6, H, W)).astype(np.float32)
    assert cpu_wino._wino_plan(9, 8, 6, H, W, 4)[0] == cpu_wino._wino_plan(1, 8, 6, H, W, 4)[0] == (H * W >= 64)
    batch = cpu.conv2d_forward(x, w, b, 1, 1), cpu.conv2d_backward_input(d, w, x.shape, 1, 1)
    for n in (0, 4, 8):
        one = (cpu.conv2d_forward(x[n:n + 1], w, b, 1, 1),
               cpu.conv2d_backward_input(d[n:n + 1], w, (1,) + x.shape[1:], 1, 1))
        for g, o in zip(batch, one):
            np.testing.assert_array_equal(g[n:n + 1], o)


def test_winograd4_transform_matrices_reproduce_a_direct_tile():
    """F(4x4, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A equals the 4x4 valid correlation of one 6x6 tile."""
    rng = np.random.default_rng(2)
    d, g = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    Gm, Bt, At = cpu_wino._WINO4_G, cpu_wino._WINO4_BT, cpu_wino._WINO4_AT
    y = At @ ((Gm @ g @ Gm.T) * (Bt @ d @ Bt.T)) @ At.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flip", [False, True])
def test_winograd4_filter_transform_is_g_w_gt(flip):
    """_wino_transform(four=True): plane 6k + l holds (G w G^T)[k, l] laid out (C_in, F_out); flipped, the
    input gradient's filters w~[c, f] = w[f, c] rotated 180 degrees."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3, 3, 3))
    wt = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1] if flip else w  # (F_out, C_in, 3, 3) of the conv
    Gm = cpu_wino._WINO4_G
    want = np.einsum("ku,fcuv,lv->klcf", Gm, wt, Gm).reshape(36, -1)
    got = cpu_wino._wino_transform(w, flip=flip, four=True)
    assert got.shape == (36, w.shape[0] * w.shape[1] + cpu_wino._WINO_PAD)
    np.testing.assert_allclose(got[:, :want.shape[1]], want, rtol=1e-14, atol=1e-14)
    # float32 filters: each entry is G w G^T (of the float32 values) rounded once, from float64 math: within
    # half a float32 ulp of it (plus float64's rounding)
    w32 = w.astype(np.float32)
    wt32 = w32.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1] if flip else w32
    want32 = np.einsum("ku,fcuv,lv->klcf", Gm, wt32.astype(np.float64), Gm).reshape(36, -1)
    got32 = cpu_wino._wino_transform(w32, flip=flip, four=True)[:, :want.shape[1]]
    assert got32.dtype == np.float32
    half_ulp = 0.5 * np.spacing(np.abs(want32).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got32 - want32) <= half_ulp + 8 * np.spacing(np.abs(want32)))


def test_winograd4_g_is_its_integer_part_scaled():
    """The filter transform computes G w G^T as D (Gi w Gi^T) D: G = diag(1 / _WINO4_D) Gi, Gi's rows those of
    _g4i_rows (small integers), and _WINO4_S[6k + l] = 1 / (d_k d_l)."""
    Gi = np.array([cpu_wino._g4i_rows.py_func(*np.eye(3)[:, j]) for j in range(3)]).T  # (6, 3)
    assert np.array_equal(Gi, np.round(Gi)) and np.abs(Gi).max() == 4
    np.testing.assert_allclose(Gi / cpu_wino._WINO4_D[:, None], cpu_wino._WINO4_G, rtol=1e-15, atol=0)
    np.testing.assert_allclose(cpu_wino._WINO4_S.reshape(6, 6) * np.outer(cpu_wino._WINO4_D, cpu_wino._WINO4_D), 1.0,
                               rtol=1e-15)


def test_conv2d_forward_is_not_trivially_equal():
    """The comparison can fail: a wrong weight layout is caught."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = np.zeros(4)
    wrong = cpu.conv2d_forward(x, np.ascontiguousarray(w[:, :, ::-1, ::-1]), b, 1, 1)
    assert not np.allclose(wrong, ref.conv2d_forward(x, w, b, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 4, 3, 5), 2), ((3, 6, 4, 4), 3), ((2, 8, 2, 2), 8),
                                          ((1, 4, 5, 5), 1)])
def test_group_norm_silu_match_reference(shape, groups, silu, dtype):
    rng = np.random.default_rng(sum(shape) + groups)
    N, C, H, W = shape
    x = (3.0 * rng.standard_normal(shape) + 1.5).astype(dtype)
    gamma = rng.standard_normal(C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    out, mean, rstd = cpu.group_norm_silu_forward(x, gamma, beta, groups, 1e-5, silu)
    out_r, mean_r, rstd_r = ref.group_norm_silu_forward(x, gamma, beta, groups, 1e-5, silu)
    for a, r in ((out, out_r), (mean, mean_r), (rstd, rstd_r)):
        assert a.dtype == dtype and a.shape == r.shape
        _close(a, r, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    got = cpu.group_norm_silu_backward(dout, x, gamma, beta, mean_r, rstd_r, groups, silu)
    want = ref.group_norm_silu_backward(dout, x, gamma, beta, mean_r, rstd_r, groups, silu)
    for a, r in zip(got, want):
        assert a.dtype == dtype and a.shape == r.shape
        _close(a, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_reaches_the_extremes(dtype):
    """GroupNorm+SiLU at |y| up to 1e4 (float32: the vectorised exp saturates without inf/NaN).

    gamma = std and beta = mean undo the normalisation, so the SiLU sees y = x itself (up to rounding):
    +-1e4, +-100, +-30 are reached, not normalised to about +-2.
    """
    x = np.array([-1e4, -100.0, -88.5, -87.0, -30.0, -1.0, 0.0, 1.0, 30.0, 87.0, 100.0, 1e4], dtype)
    x = x.reshape(1, 1, 1, -1)
    gam = np.array([x.std()], dtype)
    bet = np.array([x.mean()], dtype)
    out, mean, rstd = cpu.group_norm_silu_forward(x, gam, bet, 1, 0.0, True)
    out_r, _, _ = ref.group_norm_silu_forward(x, gam, bet, 1, 0.0, True)
    assert np.all(np.isfinite(out))
    y = (x - mean[0, 0]) * rstd[0, 0] * gam[0] + bet[0]
    np.testing.assert_allclose(y, x, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-3)  # y spans +-1e4
    assert out.ravel()[-1] == pytest.approx(1e4, rel=1e-5) and abs(out.ravel()[0]) < 1e-30
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, out_r, **tol)
    # the backward at the extremes: SiLU'(y) -> 1 for y >> 0 and -> 0 for y << 0
    dout = np.ones_like(x)
    got = cpu.group_norm_silu_backward(dout, x, gam, bet, mean, rstd, 1, True)
    want = ref.group_norm_silu_backward(dout, x, gam, bet, mean, rstd, 1, True)
    for a, r in zip(got, want):
        assert np.all(np.isfinite(a))
        _close(a, r, dtype)
    # a wide sweep through the region where the float32 exp polynomial changes exponent
    y = np.linspace(-120, 120, 4001).astype(dtype).reshape(1, 1, 1, -1)
    gam, bet = np.array([y.std()], dtype), np.array([y.mean()], dtype)
    o, _, _ = cpu.group_norm_silu_forward(y, gam, bet, 1, 0.0, True)
    o_r, _, _ = ref.group_norm_silu_forward(y, gam, bet, 1, 0.0, True)
    assert np.all(np.isfinite(o)) and o.max() > 119.0 and o.min() < -0.27
    np.testing.assert_allclose(o, o_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nthreads", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_silu_parallel_path_matches_reference(silu, dtype, nthreads, monkeypatch):
    """Above _GN_PARALLEL_MIN elements the (image, group) blocks are split over the threads: the split
    path agrees with the twin and with the one-thread path bit for bit (whatever the machine's cores:
    the kernels' threads are a pool of Python threads)."""
    shape, groups = (5, 16, 32, 32), 4  # 81,920 elements, above the threshold set here
    monkeypatch.setattr(cpu_gn, "_GN_PARALLEL_MIN", 1 << 16)
    assert np.prod(shape) >= cpu_gn._GN_PARALLEL_MIN
    rng = np.random.default_rng(7)
    x = (2.0 * rng.standard_normal(shape) - 0.5).astype(dtype)
    gamma = rng.standard_normal(shape[1]).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)

    def run():
        fwd = cpu.group_norm_silu_forward(x, gamma, beta, groups, 1e-5, silu)
        return fwd + cpu.group_norm_silu_backward(dout, x, gamma, beta, fwd[1], fwd[2], groups, silu)

    monkeypatch.setattr(_threads, "_nthreads", lambda: 1)
    assert cpu_gn._gn_threads(x.size) == 1
    one = run()
    monkeypatch.setattr(_threads, "_nthreads", lambda: nthreads)
    assert cpu_gn._gn_threads(x.size) == nthreads
    many = run()
    fwd = ref.group_norm_silu_forward(x, gamma, beta, groups, 1e-5, silu)
    want = fwd + ref.group_norm_silu_backward(dout, x, gamma, beta, fwd[1], fwd[2], groups, silu)
    for a, b, r in zip(one, many, want):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == dtype and b.shape == r.shape
        _close(b, r, dtype)
    # and with the threshold lowered (module attribute read at call time), a small shape splits too
    monkeypatch.setattr(cpu_gn, "_GN_PARALLEL_MIN", 1)
    xs = x[:3, :, :5, :7].copy()
    assert cpu_gn._gn_threads(xs.size) == nthreads
    o, m, r = cpu.group_norm_silu_forward(xs, gamma, beta, groups, 1e-5, silu)
    o_r, m_r, r_r = ref.group_norm_silu_forward(xs, gamma, beta, groups, 1e-5, silu)
    for a, b in ((o, o_r), (m, m_r), (r, r_r)):
        _close(a, b, dtype)


def test_bad_input_raises():
    x = np.zeros((1, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="groups"):
        cpu.group_norm_silu_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32), 3, 1e-5, True)
    with pytest.raises(TypeError):
        cpu.conv2d_forward(x.astype(np.int32), np.zeros((1, 4, 3, 3), np.int32), np.zeros(1, np.int32), 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (3, 2, 7, 1)])
def test_layout_kernels_match_reference(shape, dtype):
    """Upsample x2 (forward/backward), channel concat and split: numba == NumPy twin."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    up = cpu.upsample_nearest2x_forward(x)
    np.testing.assert_array_equal(up, ref.upsample_nearest2x_forward(x))
    d = rng.standard_normal(up.shape).astype(dtype)
    _close(cpu.upsample_nearest2x_backward(d), ref.upsample_nearest2x_backward(d), dtype)
    y = rng.standard_normal((shape[0], 4) + shape[2:]).astype(dtype)
    cat = cpu.concat_channels([x, y])
    np.testing.assert_array_equal(cat, ref.concat_channels([x, y]))
    for a, b in zip(cpu.split_channels(cat, (shape[1], 4)), ref.split_channels(cat, (shape[1], 4))):
        assert a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
