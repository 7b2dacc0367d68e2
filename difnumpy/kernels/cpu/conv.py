"""Convolution kernels: im2col around one BLAS GEMM per chunk of images, 1x1 convs, and the dispatch
(twins in :mod:`difnumpy.kernels.reference`; Winograd F(2x2, 3x3) and F(4x4, 3x3) in :mod:`.winograd`).

Design (measured on the 2-core Xeon (Sapphire Rapids, AVX-512) dev machine, float32, batch 128):
- 3x3 / stride-1 / pad-1 convs (all but three of the U-Net's convs) use Winograd F(2x2, 3x3) in all
  three passes (forward, backward-input as a forward with flipped weights, backward-weight): 2.25x
  fewer multiplies, about 2x faster than the im2col path below; the forward and backward-input passes on
  8x8 and 28x28 images use F(4x4, 3x3) (4x fewer). :data:`USE_WINOGRAD` turns Winograd off.
- Every other conv is "im2col around one GEMM" per chunk of images, with the column matrix kept small
  (about 1k columns, it stays in L2) instead of one huge (C*KH*KW, N*Ho*Wo) matrix, and the GEMM is
  BLAS (``np.dot`` inside numba calls scipy's OpenBLAS sgemm/dgemm).
- 3x3/pad-1/stride-1 ("same") convs use a *wide-row* column matrix: each image is copied once into a
  padded buffer whose rows are W+p long (the p zero columns between two rows serve as the right pad of
  one row and the left pad of the next), so every row of the column matrix is ONE contiguous slice of
  that buffer (a memcpy of H*(W+p) elements) instead of H short, unvectorisable copies of W elements.
  The GEMM then computes p wasted output columns per row (3.6 % at 28x28, 12.5 % at 8x8) that the
  bias/crop pass drops. Measured: the classic im2col (H copies of W) cost as much time as the GEMM
  itself (10.7 ms vs 15 ms at 32->32, 28x28); the wide copy costs ~1/8 of the GEMM.
- 1x1 convs need no column matrix at all (the image rows *are* the columns; the weight gradient gathers
  several small images per GEMM); backward-input of 1x1 and of "same" convs is a forward conv with the
  transposed / flipped weights (a gather, no scatter-add).
- Other convs (the stride-2 Downsample) use a pixel-major column matrix built from an HWC copy of each
  image (one row per output pixel, KH contiguous runs of KW*C values) and the matching col2im for the
  input gradient; the channel-major im2col before it copied Wo values at a time (4 at 4x4 outputs).
- Threads (:mod:`._threads`): chunks of images are split over the threads; chunk sizes depend on the
  shapes only. Outputs are written per chunk; weight gradients are summed per fixed part of chunks
  (:func:`._threads._parts`) and then in part order, so no result depends on the thread count.
"""
from __future__ import annotations

import numba
import numpy as np

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu.elementwise import _bias_grad, _sum_rows
from difnumpy.kernels.cpu.winograd import _prefetch_filters, _wino4_ok, _wino_backward_weight, _wino_forward

USE_WINOGRAD = True  # False: 3x3 stride-1 convs use the im2col path (read by _conv_mode; tests patch it here)
_CHUNK_COLS = 1024  # at most this many columns in the per-chunk column matrix ...
_CHUNK_BYTES = 1 << 19  # ... and at most about this many bytes (K rows): it stays in L2 next to BLAS's packs


#: input channels from which a 3x3 conv uses Winograd: with fewer its 16 GEMMs have K = C and the tile
#: transforms dominate; the wide-row im2col is faster (measured, 1 thread, 1 -> 32 channels: 8x8 x64
#: forward 646 -> 70 us, weight gradient 183 -> 123 us; 28x28 x16 601 -> 194 us; 3 -> 32: 269 -> 120 us;
#: at 8 -> 32 Winograd is as fast or faster). The U-Net's stem, and its output conv's input gradient.
_WINO_MIN_C = 5


def _conv_mode(KH, KW, stride, padding, C=None):
    """0: 'same' stride-1 conv (wide rows), 1: 1x1 stride-1 pad-0, 2: general im2col, 3: Winograd 3x3.

    ``C``: the input channels of the (forward-form) conv, when known (Winograd from :data:`_WINO_MIN_C`)."""
    if (USE_WINOGRAD and stride == 1 and KH == 3 and KW == 3 and padding == 1
            and (C is None or C >= _WINO_MIN_C)):
        return 3
    if stride == 1 and KH == KW and KH == 2 * padding + 1 and padding >= 1:
        return 0
    if stride == 1 and KH == 1 and KW == 1 and padding == 0:
        return 1
    return 2


@numba.njit(cache=True)
def _fill_cols(x, n, g, mode, KH, KW, stride, pad, Ho, Wo, Wr, xp, cols):
    """Write the column block of image ``n`` into ``cols[:, g*Ho*Wr:(g+1)*Ho*Wr]``."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    L = Ho * Wr
    c0 = g * L
    if mode == 1:
        for c in range(C):
            src = x[n, c].ravel()
            dst = cols[c, c0:c0 + L]
            for l in range(L):
                dst[l] = src[l]
        return
    if mode == 0:
        # padded image with shared zero columns: pixel (i, j) at (i + pad) * Wr + pad + j
        for c in range(C):
            for i in range(H):
                o = (i + pad) * Wr + pad
                drow = xp[c, o:o + W]
                srow = x[n, c, i]
                for j in range(W):
                    drow[j] = srow[j]
        for c in range(C):
            for kh in range(KH):
                for kw in range(KW):
                    dst = cols[(c * KH + kh) * KW + kw, c0:c0 + L]
                    s0 = kh * Wr + kw
                    src = xp[c, s0:s0 + L]
                    for l in range(L):
                        dst[l] = src[l]
        return


def _xp_len(mode, H, W, pad):
    if mode == 0:
        return (H + 2 * pad) * (W + pad) + 2 * pad
    if mode == 1:
        return 1
    return (H + 2 * pad) * (W + 2 * pad)


@numba.njit(cache=True, nogil=True)
def _conv_fwd_kernel(x, w2, b, mode, KH, KW, stride, pad, Ho, Wo, Wr, G, xplen, out, t, nthreads):
    N, C = x.shape[0], x.shape[1]
    F, K = w2.shape
    L = Ho * Wr
    nchunks = (N + G - 1) // G
    xp = np.zeros((C, xplen), x.dtype)
    colbuf = np.empty(K * G * L, x.dtype)
    tmpbuf = np.empty(F * G * L, x.dtype)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        cols = colbuf[:K * g * L].reshape(K, g * L)
        tmp = tmpbuf[:F * g * L].reshape(F, g * L)
        for gg in range(g):
            _fill_cols(x, n0 + gg, gg, mode, KH, KW, stride, pad, Ho, Wo, Wr, xp, cols)
        np.dot(w2, cols, tmp)
        for gg in range(g):
            for f in range(F):
                bf = b[f]
                for i in range(Ho):
                    s0 = gg * L + i * Wr
                    src = tmp[f, s0:s0 + Wo]
                    dst = out[n0 + gg, f, i]
                    for j in range(Wo):
                        dst[j] = src[j] + bf



@numba.njit(cache=True, nogil=True)
def _conv1x1_fwd_kernel(x, w2, b, out, t, nthreads):
    """1x1 stride-1 conv: one GEMM per image, ``out[n] (F, HW) = w2 (F, C) @ x[n] (C, HW) + b``.

    No column matrix: the image is its own. Measured 1.2-4x faster than the chunked copy + GEMM
    (batch 128; 4x at 4x4 images, where the copy loops dominated).
    """
    N, C = x.shape[0], x.shape[1]
    F = w2.shape[0]
    L = x.shape[2] * x.shape[3]
    for n in range(t * N // nthreads, (t + 1) * N // nthreads):
        o = out[n].reshape(F, L)
        np.dot(w2, x[n].reshape(C, L), o)
        for f in range(F):
            bf = b[f]
            for l in range(L):
                o[f, l] += bf


#: columns (images x pixels) per GEMM of the 1x1 weight gradient (see :func:`_conv1x1_bwd_weight_kernel`)
_1X1_COLS = 512


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _conv1x1_bwd_weight_kernel(dout, x, dw_parts, db_parts, t, nthreads):
    """Part p of P: dw_parts[p] (F, C) = sum over its chunks (in order) of (x_chunk (C, G*HW) @ dout_chunk^T
    (G*HW, F))^T, a chunk = G consecutive images of the part (G = :data:`_1X1_COLS` // HW, at least 1);
    db_parts[p, f] = sum of dout[n, f] over its images (float64). Thread ``t`` computes parts t, t + nt, ...

    Why this form: both GEMM operands row-major ("NN"); ``dout (F, K) @ x^T`` with x's K contiguous ("NT")
    ran at 2/3 of the rate in OpenBLAS (F = 32, C = 96, K = 4096: 470 vs 285 us). dout is the one transposed
    while it is gathered (the smaller side in two of the U-Net's three skip convs, 96 -> 32 and 128 -> 64);
    x's rows are copied as they are (one image: not copied). Several images per GEMM: at 4x4 one image gives K = 16. The whole weight gradient,
    1 thread, before / after: 96 -> 32 at 28x28, 8 images 730 / 564 us; 32 -> 64 at 4x4, 64 images 148 / 108 us;
    128 -> 64 at 4x4 439 / 349 us; at 8x8 and 14x14 the same (530 / 532, 406 / 412 us).
    """
    N, C = x.shape[0], x.shape[1]
    F = dout.shape[1]
    L = x.shape[2] * x.shape[3]
    P = dw_parts.shape[0]
    G = max(1, min(N, _1X1_COLS // max(L, 1)))
    tmp = np.empty((C, F), x.dtype)
    dbuf = np.empty(G * L * F, x.dtype)
    xbuf = np.empty(C * G * L if G > 1 else 0, x.dtype)
    for p in range(t, P, nthreads):
        acc = dw_parts[p]
        n0 = p * N // P
        n1 = (p + 1) * N // P
        for c0 in range(n0, n1, G):
            g = min(G, n1 - c0)
            K = g * L
            dT = dbuf[:K * F].reshape(K, F)
            for gg in range(g):
                dn = dout[c0 + gg].reshape(F, L)
                for l in range(L):
                    row = dT[gg * L + l]
                    for f in range(F):
                        row[f] = dn[f, l]
            if g == 1:
                xs = x[c0].reshape(C, L)
            else:
                xs = xbuf[:C * K].reshape(C, K)
                for gg in range(g):
                    xn = x[c0 + gg].reshape(C, L)
                    for c in range(C):
                        xs[c, gg * L:(gg + 1) * L] = xn[c]
            np.dot(xs, dT, tmp)
            if c0 == n0:
                for f in range(F):
                    for c in range(C):
                        acc[f, c] = tmp[c, f]
            else:
                for f in range(F):
                    for c in range(C):
                        acc[f, c] += tmp[c, f]
        for n in range(n0, n1):
            dn = dout[n].reshape(F, L)
            for f in range(F):
                s = 0.0
                for l in range(L):
                    s += dn[f, l]
                db_parts[p, f] += s


@numba.njit(cache=True, nogil=True)
def _conv1x1_bwd_weight_finish(dw_parts, db_parts, dw, db):
    """dw (F, C, 1, 1) and db (F,) from the parts of :func:`_conv1x1_bwd_weight_kernel`, summed in part order."""
    F, C = dw_parts.shape[1], dw_parts.shape[2]
    _sum_rows(dw_parts.reshape(dw_parts.shape[0], F * C), F * C, dw.reshape(F * C))
    _sum_rows(db_parts, F, db)


# ---- general convs (the stride-2 Downsample): a pixel-major column matrix ----
# Each image is transposed into a zero-bordered HWC buffer; the column matrix has one row per output pixel,
# (kh, kw, c) along it, so that every row is KH contiguous copies of KW*C values (one per kernel row) and
# the GEMM is (pixels, K) @ (K, F). The channel-major im2col it replaced copied Wo values at a time (4 at the
# 8x8 U-Net's 4x4 output). Measured, 32 -> 32 stride 2, 1 thread, forward / input grad / weight grad: 8x8,
# 64 images 623 / 696 / 654 -> 242 / 263 / 314 us; 28x28, 16 images 1291 / 1303 / 1320 -> 797 / 838 / 959 us.

@numba.njit(cache=True, nogil=True)
def _to_hwc(xn, pad, xf):
    """Pixel (i, j) of ``xn`` (C, H, W) into the flat HWC buffer ``xf`` at row (i + pad) * (W + 2 pad) + j + pad
    (C values each); the border rows / columns are left as they are (zero)."""
    C, H, W = xn.shape
    Wp = W + 2 * pad
    for i in range(H):
        for j in range(W):
            o = ((i + pad) * Wp + j + pad) * C
            row = xf[o:o + C]
            for c in range(C):
                row[c] = xn[c, i, j]


@numba.njit(cache=True, nogil=True)
def _pix_cols(xf, C, KH, KW, stride, Wp, Ho, Wo, cols, r0):
    """cols[r0 + i*Wo + j, (kh*KW + kw)*C + c] = xpad[c, i*stride + kh, j*stride + kw] (``xf``: :func:`_to_hwc`)."""
    n = KW * C
    for i in range(Ho):
        for j in range(Wo):
            dst = cols[r0 + i * Wo + j]
            for kh in range(KH):
                o = ((i * stride + kh) * Wp + j * stride) * C
                src = xf[o:o + n]
                d = dst[kh * n:(kh + 1) * n]
                for q in range(n):
                    d[q] = src[q]


@numba.njit(cache=True, nogil=True)
def _conv_pix_fwd_kernel(x, wt, b, KH, KW, stride, pad, Ho, Wo, G, out, t, nthreads):
    """out = conv(x) + b for chunks of G images: ``cols (G*Ho*Wo, K) @ wt (K, F)``, K = KH*KW*C in (kh, kw, c) order."""
    N, C, H, W = x.shape
    F = wt.shape[1]
    K = KH * KW * C
    L = Ho * Wo
    Wp = W + 2 * pad
    nchunks = (N + G - 1) // G
    xf = np.zeros((H + 2 * pad) * Wp * C, x.dtype)
    colbuf = np.empty(G * L * K, x.dtype)
    obuf = np.empty(G * L * F, x.dtype)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        cols = colbuf[:g * L * K].reshape(g * L, K)
        o = obuf[:g * L * F].reshape(g * L, F)
        for gg in range(g):
            _to_hwc(x[n0 + gg], pad, xf)
            _pix_cols(xf, C, KH, KW, stride, Wp, Ho, Wo, cols, gg * L)
        np.dot(cols, wt, o)
        for gg in range(g):
            on = out[n0 + gg]
            for i in range(Ho):
                for j in range(Wo):
                    src = o[gg * L + i * Wo + j]
                    for f in range(F):
                        on[f, i, j] = src[f] + b[f]


@numba.njit(cache=True, nogil=True)
def _conv_pix_bwd_input_kernel(dout, wtt, KH, KW, stride, pad, G, dx, t, nthreads):
    """dx for chunks of G images: ``dcols (G*Ho*Wo, K) = dout_pixels (G*Ho*Wo, F) @ wtt (F, K)``, then each row's
    KH runs of KW*C values added into a zero-bordered HWC buffer (col2im) and the interior transposed to dx."""
    N, F, Ho, Wo = dout.shape
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    K = wtt.shape[1]
    L = Ho * Wo
    Wp = W + 2 * pad
    n = KW * C
    nchunks = (N + G - 1) // G
    dxf = np.empty((H + 2 * pad + stride) * Wp * C, dout.dtype)
    dpbuf = np.empty(G * L * F, dout.dtype)
    dcbuf = np.empty(G * L * K, dout.dtype)
    for ch in range(t, nchunks, nthreads):
        n0 = ch * G
        g = min(G, N - n0)
        dp = dpbuf[:g * L * F].reshape(g * L, F)
        dcols = dcbuf[:g * L * K].reshape(g * L, K)
        for gg in range(g):  # the output gradient pixel-major: an HWC copy without border
            _to_hwc(dout[n0 + gg], 0, dpbuf[gg * L * F:(gg + 1) * L * F])
        np.dot(dp, wtt, dcols)
        for gg in range(g):
            dxf[:] = 0
            for i in range(Ho):
                for j in range(Wo):
                    src = dcols[gg * L + i * Wo + j]
                    for kh in range(KH):
                        o = ((i * stride + kh) * Wp + j * stride) * C
                        d = dxf[o:o + n]
                        s = src[kh * n:(kh + 1) * n]
                        for q in range(n):
                            d[q] += s[q]
            dn = dx[n0 + gg]
            for i in range(H):
                for j in range(W):
                    o = ((i + pad) * Wp + j + pad) * C
                    row = dxf[o:o + C]
                    for c in range(C):
                        dn[c, i, j] = row[c]


@numba.njit(cache=True, nogil=True)
def _conv_pix_bwd_weight_kernel(dout, x, KH, KW, stride, pad, G, dw_parts, t, nthreads):
    """Part p of P: dw_parts[p] (K, F) = sum over its chunks (in order) of cols^T (K, G*Ho*Wo) @ dout_pixels
    (G*Ho*Wo, F). Thread t computes parts t, t + nt, ..."""
    N, C, H, W = x.shape
    F, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3]
    K = KH * KW * C
    L = Ho * Wo
    Wp = W + 2 * pad
    nchunks = (N + G - 1) // G
    P = dw_parts.shape[0]
    xf = np.zeros((H + 2 * pad) * Wp * C, x.dtype)
    colbuf = np.empty(G * L * K, x.dtype)
    dpbuf = np.empty(G * L * F, x.dtype)
    tmp = np.empty((K, F), x.dtype)
    for p in range(t, P, nthreads):
        acc = dw_parts[p]
        c0 = p * nchunks // P
        for ch in range(c0, (p + 1) * nchunks // P):
            n0 = ch * G
            g = min(G, N - n0)
            cols = colbuf[:g * L * K].reshape(g * L, K)
            dp = dpbuf[:g * L * F].reshape(g * L, F)
            for gg in range(g):
                _to_hwc(x[n0 + gg], pad, xf)
                _pix_cols(xf, C, KH, KW, stride, Wp, Ho, Wo, cols, gg * L)
                _to_hwc(dout[n0 + gg], 0, dpbuf[gg * L * F:(gg + 1) * L * F])
            if ch == c0:
                np.dot(cols.T, dp, acc)
            else:
                np.dot(cols.T, dp, tmp)
                acc += tmp


def _pix_weights(w):
    """(F, C, KH, KW) -> wt (KH*KW*C, F), rows in (kh, kw, c) order (the pixel-major column matrix's)."""
    F, C, KH, KW = w.shape
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(KH * KW * C, F))


def _chunk(L, N, K=1, itemsize=4):
    """Images per chunk: about min(_CHUNK_COLS, _CHUNK_BYTES / (K * itemsize)) columns, >= 128, whole images.

    Measured (float32, 1 thread, batch 128): 32->32 3x3 8x8 2.7 -> 2.3 ms, 64->64 8x8 7.9 -> 6.6 ms,
    96->32 8x8 10.3 -> 7.0 ms going from 1024 to 256-512 columns for K = 288..864 (the GEMM reaches
    85-107 instead of 60-93 GFLOP/s, and the column fill stays in L2).
    """
    cols = max(128, min(_CHUNK_COLS, _CHUNK_BYTES // max(K * itemsize, 1)))
    return max(1, min(N, cols // max(L, 1)))


def _conv_forward_impl(x, w, b, stride, padding):
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    Ho = (H + 2 * padding - KH) // stride + 1
    Wo = (W + 2 * padding - KW) // stride + 1
    mode = _conv_mode(KH, KW, stride, padding, C)
    if mode == 3:  # the filters' transform is kept per pass (or frozen scope), not made per call and share
        return _wino_forward(x, w, b)
    if mode == 1:
        out = np.empty((N, F, Ho, Wo), x.dtype)
        _threads._run_split(_conv1x1_fwd_kernel, _threads._split_threads(N, 2.0 * N * Ho * Wo * C * F), True, x,
                            np.ascontiguousarray(w.reshape(F, C)), b, out)
        return out
    if mode == 2:
        G = _chunk(Ho * Wo, N, C * KH * KW, x.itemsize)
        out = np.empty((N, F, Ho, Wo), x.dtype)
        _threads._run_split(_conv_pix_fwd_kernel, _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wo * C * KH * KW * F),
                            True, x, _pix_weights(w), b, KH, KW, stride, padding, Ho, Wo, G, out)
        return out
    Wr = W + padding
    G = _chunk(Ho * Wr, N, C * KH * KW, x.itemsize)
    nt = _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wr * C * KH * KW * F)
    out = np.empty((N, F, Ho, Wo), x.dtype)
    w2 = np.ascontiguousarray(w.reshape(F, C * KH * KW))
    _threads._run_split(_conv_fwd_kernel, nt, True, x, w2, np.ascontiguousarray(b), mode, KH, KW, stride,
                        padding, Ho, Wo, Wr, G, _xp_len(mode, H, W, padding), out)
    return out


def _check_conv_args(name, x, w):
    if x.dtype not in (np.float32, np.float64) or w.dtype != x.dtype:
        raise TypeError(f"{name}: arrays must be float32 or float64 of one dtype, got {x.dtype} and {w.dtype}")


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """2-D cross-correlation, NCHW (numba; twin of :func:`difnumpy.kernels.reference.conv2d_forward`).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``x``
    b : ndarray, shape (F,), dtype of ``x``
    stride : int >= 1
    padding : int >= 0

    Returns
    -------
    out : ndarray, shape (N, F, Ho, Wo), dtype of ``x``.

    Notes
    -----
    ``out[n, f, i, j] = b[f] + sum_{c,u,v} w[f, c, u, v] * xp[n, c, i*stride + u, j*stride + v]``,
    computed as im2col (wide rows for "same" convs) + one BLAS GEMM per chunk of images.
    """
    _check_conv_args("conv2d_forward", x, w)
    x = np.ascontiguousarray(x)
    return _conv_forward_impl(x, np.ascontiguousarray(w), np.ascontiguousarray(b, dtype=x.dtype),
                              int(stride), int(padding))


def conv2d_backward_input(dout: np.ndarray, w: np.ndarray, x_shape: tuple, stride: int,
                          padding: int) -> np.ndarray:
    """Gradient of :func:`conv2d_forward` with respect to ``x`` (numba twin of the reference).

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), float32 or float64
    w : ndarray, shape (F, C, KH, KW), dtype of ``dout``
    x_shape : tuple (N, C, H, W)
    stride, padding : as in the forward pass

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``dout``.

    Notes
    -----
    ``dxp[n, c, i*stride + u, j*stride + v] += sum_f dout[n, f, i, j] * w[f, c, u, v]``. For "same"
    stride-1 convs and 1x1 convs this is a forward conv of ``dout`` with the weights transposed
    (F <-> C) and flipped (u -> KH-1-u, v -> KW-1-v); otherwise GEMM + col2im.
    """
    _check_conv_args("conv2d_backward_input", dout, w)
    dout = np.ascontiguousarray(dout)
    N, C, H, W = (int(s) for s in x_shape)
    F, _, KH, KW = w.shape
    stride, padding = int(stride), int(padding)
    mode = _conv_mode(KH, KW, stride, padding, F)  # a forward conv of dout's F channels
    if mode != 2:
        if mode == 3:
            return _wino_forward(dout, w, np.zeros(C, dout.dtype), flip=True)
        return _conv_forward_impl(dout, _flipped(w), np.zeros(C, dout.dtype), 1, padding)
    Ho, Wo = dout.shape[2], dout.shape[3]
    G = _chunk(Ho * Wo, N, max(F, C * KH * KW), dout.itemsize)
    nt = _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wo * C * KH * KW * F)
    dx = np.empty((N, C, H, W), dout.dtype)
    _threads._run_split(_conv_pix_bwd_input_kernel, nt, True, dout, np.ascontiguousarray(_pix_weights(w).T), KH, KW,
                        stride, padding, G, dx)
    return dx


def prefetch_conv3x3_filters(convs, n: int, backward: bool = False) -> int:
    """Start the Winograd filter transforms a pass will ask for on an idle worker thread (optional hook).

    Parameters
    ----------
    convs : iterable of ``(w, H, W)``: the weights (F, C, 3, 3) of a pass's 3x3 stride-1 "same" convs and
        their image sizes, in the order the pass uses them (others are skipped)
    n : int, the images of the pass
    backward : bool, the input gradients' (flipped) filters instead of the forward's

    Only where the conv takes the Winograd path and the transform is not yet in the pass's store; only in
    a pass's scope, outside batch shares, with two or more threads (:func:`._threads.prefetch`). A hint:
    the results are the same bits with or without it. Returns how many transforms were started.
    """
    if not _threads.prefetching():  # (before the plans: ~50 us a pass otherwise)
        return 0
    specs = []
    for w, H, W in convs:
        F, C, KH, KW = w.shape
        cin = F if backward else C
        if (KH, KW) == (3, 3) and _conv_mode(3, 3, 1, 1, cin) == 3:
            specs.append((w, _wino4_ok(n, H, W), backward))  # (_wino_plan's choice of F(4x4))
    return _prefetch_filters(specs)


def _flipped(w):
    """The weights of the input gradient as a forward conv: (F, C, KH, KW) -> (C, F, KH, KW), flipped."""
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _conv_bwd_weight_kernel(dout, x, mode, KH, KW, stride, pad, Ho, Wo, Wr, G, xplen,
                            dw_parts, db_parts, t, nthreads):
    """Part p of P: dw_parts[p] (F, K) = sum over its chunks (in order) of dout_chunk (F, L) @ cols.T (L, K);
    db_parts[p, f] = sum of dout[:, f] over its images. Thread ``t`` computes parts t, t + nt, ...
    """
    N, C = x.shape[0], x.shape[1]
    F = dout.shape[1]
    K = C * KH * KW
    L = Ho * Wr
    nchunks = (N + G - 1) // G
    P = dw_parts.shape[0]
    xp = np.zeros((C, xplen), x.dtype)
    colbuf = np.empty(K * G * L, x.dtype)
    dchbuf = np.empty(F * G * L, x.dtype)
    tmp = np.empty((F, K), x.dtype)
    for p in range(t, P, nthreads):
        acc = dw_parts[p]
        c0 = p * nchunks // P
        for ch in range(c0, (p + 1) * nchunks // P):
            n0 = ch * G
            g = min(G, N - n0)
            cols = colbuf[:K * g * L].reshape(K, g * L)
            dch = dchbuf[:F * g * L].reshape(F, g * L)
            for gg in range(g):
                _fill_cols(x, n0 + gg, gg, mode, KH, KW, stride, pad, Ho, Wo, Wr, xp, cols)
                for f in range(F):
                    s = 0.0
                    for i in range(Ho):
                        o = gg * L + i * Wr
                        src = dout[n0 + gg, f, i]
                        dst = dch[f, o:o + Wr]
                        for j in range(Wo):
                            v = src[j]
                            dst[j] = v
                            s += v
                        for j in range(Wo, Wr):  # wide columns (mode 0) contribute nothing
                            dst[j] = 0
                    db_parts[p, f] += s
            if ch == c0:
                np.dot(dch, cols.T, acc)
            else:
                np.dot(dch, cols.T, tmp)
                acc += tmp


def conv2d_backward_weight(dout: np.ndarray, x: np.ndarray, w_shape: tuple, stride: int,
                           padding: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d_forward` with respect to ``w`` and ``b`` (numba twin).

    Parameters
    ----------
    dout : ndarray, shape (N, F, Ho, Wo), float32 or float64
    x : ndarray, shape (N, C, H, W), dtype of ``dout``
    w_shape : tuple (F, C, KH, KW)
    stride, padding : as in the forward pass

    Returns
    -------
    dw : ndarray, shape (F, C, KH, KW), dtype of ``dout``
    db : ndarray, shape (F,), dtype of ``dout`` (accumulated in float64)

    Notes
    -----
    ``dw[f, c, u, v] = sum_{n,i,j} dout[n, f, i, j] * xp[n, c, i*stride + u, j*stride + v]``: per chunk
    of images one GEMM ``dout_chunk (F, L) @ cols.T (L, C*KH*KW)``; ``db[f] = sum_{n,i,j} dout``.
    """
    _check_conv_args("conv2d_backward_weight", dout, x)
    dout = np.ascontiguousarray(dout)
    x = np.ascontiguousarray(x)
    F, C, KH, KW = (int(s) for s in w_shape)
    N, _, H, W = x.shape
    stride, padding = int(stride), int(padding)
    Ho, Wo = dout.shape[2], dout.shape[3]
    mode = _conv_mode(KH, KW, stride, padding, C)
    if mode == 3:
        return _wino_backward_weight(dout, x)
    if mode == 1:
        P = _threads._parts(N)  # fixed parts of images, summed in part order (any thread count: same bits)
        dw_parts = (np.empty if N else np.zeros)((P, F, C), x.dtype)  # each part's first image writes it whole
        db_parts = np.zeros((P, F), np.float64)
        _threads._run_split(_conv1x1_bwd_weight_kernel, _threads._split_threads(P, 2.0 * N * H * W * C * F), True,
                            dout, x, dw_parts, db_parts)
        dw = np.empty((F, C, 1, 1), x.dtype)
        db = np.empty(F, x.dtype)
        _conv1x1_bwd_weight_finish(dw_parts, db_parts, dw, db)
        return dw, db
    if mode == 2:
        G = _chunk(Ho * Wo, N, C * KH * KW, x.itemsize)
        P = _threads._parts((N + G - 1) // G)  # fixed parts of chunks, summed in part order
        K = C * KH * KW
        dw_parts = (np.empty if N else np.zeros)((P, K, F), x.dtype)  # each part's first chunk writes it
        _threads._run_split(_conv_pix_bwd_weight_kernel, _threads._split_threads(P, 2.0 * N * Ho * Wo * K * F), True,
                            dout, x, KH, KW, stride, padding, G, dw_parts)
        dwt = np.empty((K, F), x.dtype)
        db = np.empty(F, x.dtype)
        _sum_rows(dw_parts.reshape(P, K * F), K * F, dwt.reshape(K * F))  # parts in part order
        _bias_grad(dout, db)  # float64 sums, as the Winograd path's
        return np.ascontiguousarray(dwt.reshape(KH, KW, C, F).transpose(3, 2, 0, 1)), db
    Wr = W + padding
    G = _chunk(Ho * Wr, N, C * KH * KW, x.itemsize)
    P = _threads._parts((N + G - 1) // G)  # fixed parts of chunks, summed in part order
    dw_parts = (np.empty if N else np.zeros)((P, F, C * KH * KW), x.dtype)  # each part's first chunk writes it
    db_parts = np.zeros((P, F), np.float64)
    _threads._run_split(_conv_bwd_weight_kernel, _threads._split_threads(P, 2.0 * N * Ho * Wr * C * KH * KW * F),
                        True, dout, x, mode, KH, KW, stride, padding, Ho, Wo, Wr, G, _xp_len(mode, H, W, padding),
                        dw_parts, db_parts)
    dw = dw_parts.sum(axis=0) if P > 1 else dw_parts[0]
    return (np.ascontiguousarray(dw.reshape(F, C, KH, KW), dtype=x.dtype),
            db_parts.sum(axis=0).astype(x.dtype))
