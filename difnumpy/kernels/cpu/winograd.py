"""Winograd F(2x2, 3x3) for 3x3 / stride-1 / pad-1 convs: forward and backward-weight; F(4x4, 3x3) for the
forward on images of whole 4x4 tiles from 8x8 up (:func:`_wino_plan` chooses, by the image size only).

The backward-input pass is a forward conv with flipped weights (:func:`.conv.conv2d_backward_input`).
Dispatched from :mod:`.conv` (its ``USE_WINOGRAD`` flag); measured about 2x faster than the im2col path.

Threads (:mod:`._threads`): chunks of images (sizes from the shapes only) are split over the threads.
The forward writes each chunk's outputs; the weight gradient's transformed dU is summed per fixed part
of chunks (:func:`._threads._parts`, chunks in order within a part), then the parts in part order, so no
result depends on the thread count.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu.elementwise import _bias_grad, _sum_rows

# Lavin & Gray 2016 (arXiv 1509.09308), Sec. 4.1, eq. 8-10: each 2x2 output tile Y of one (image, filter) is
#     Y = A^T [ sum_c (G g_fc G^T) ⊙ (B^T d_c B) ] A,   d_c the 4x4 input tile of channel c,
# i.e. 16 GEMMs (one per position k of the 4x4 tile) of the transformed weights U[k] (F, C) with the
# transformed tiles V[k] (C, tiles): 16 multiplies per 2x2 outputs instead of 36, 2.25x fewer flops.
# Layout (measured choices, 2-core AVX-512 machine, float32, batch 128):
# - the input tile transform vectorises over channels: each image is first transposed into a zero-
#   padded HWC buffer with even and odd columns stored apart, so that every step of B^T d B is one
#   contiguous vector loop over (tiles of a row) x channels. Vectorised over the 4-8 tiles of a row
#   instead, it ran 4x slower at 8x8.
# - all inner loops index slices (views) with the loop counter: computed offsets (``a[o + i]``) kept
#   LLVM from vectorising them (numba's negative-index handling), 6-10x slower.
# - the 16 planes lie _WINO_PAD elements more than a power of two apart (L1 set conflicts);
# - the transformed tiles of a chunk (about _WINO_TILES tiles) stay in L2 next to BLAS's packs.
# Exactness: float64 and float32 agree with the direct conv to rounding (tests); F(2x2, 3x3) uses only
# the points 0, +-1 (and 1/2 in G), so it is as accurate as the direct sum.

_WINO_TILES = 256
_WINO_PAD = 48
_WINO_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


@numba.njit(cache=True, inline="always")
def _axpby(a, sa, b, sb, out):
    for i in range(out.size):
        out[i] = sa * a[i] + sb * b[i]


@numba.njit(cache=True, inline="always")
def _sum3(a, b, sb, d, sd, out):
    for i in range(out.size):
        out[i] = a[i] + sb * b[i] + sd * d[i]


@numba.njit(cache=True, inline="always")
def _fwd_unit(u, nb, th, tw, G, N):
    """Unit ``u`` of a forward kernel (chunk u // nb, band u % nb): its tile rows ti0..ti1, tiles per image
    TT, first image n0 and images g."""
    ch = u // nb
    ti0 = th * (u - ch * nb) // nb
    ti1 = th * (u - ch * nb + 1) // nb
    n0 = ch * G
    return ti0, ti1, (ti1 - ti0) * tw, n0, min(G, N - n0)


@numba.njit(cache=True, inline="always")
def _plane_gemms(Vf, PV, Ub, nk, T, C, F, Mf, PM):
    """M[k] (T, F) = V[k] (T, C) @ U[k]^T (C, F) for the nk planes; (F, T) = U @ V^T measured 1.8x slower
    in OpenBLAS."""
    for k in range(nk):
        np.dot(Vf[k * PV:k * PV + T * C].reshape(T, C), Ub[k, :C * F].reshape(C, F),
               Mf[k * PM:k * PM + T * F].reshape(T, F))


@numba.njit(cache=True, inline="always")
def _scatter_tiles(Mf, PM, m, sh, b, out, n0, g, TT, ti0, ti1, tw):
    """out[n0 + gg, f, m*ti + a, m*tj + c] = Y_{ac}[tile, f] + b[f]: output tiles of m x m (m = 1 << sh),
    plane m*a + c of Y at ``Mf[(m*a + c) * PM]``, tile p at ``p * F``."""
    F = b.shape[0]
    H, W = out.shape[2], out.shape[3]
    mask = m - 1
    for gg in range(g):
        on = out[n0 + gg]
        for i in range(m * ti0, min(H, m * ti1)):
            s = m * (i & mask) * PM + (gg * TT + ((i >> sh) - ti0) * tw) * F
            for j in range(W):
                o = s + (j & mask) * PM + (j >> sh) * F
                src = Mf[o:o + F]
                for f in range(F):
                    on[f, i, j] = src[f] + b[f]


@numba.njit(cache=True, nogil=True)
def _wino_input(xn, th, tw, ti0, ti1, xh, rt, Vf, PV, p0):
    """V[k][p0 + (ti - ti0)*tw + tj, :] = (B^T d B)[k] for the 4x4 tiles of tile rows ti0 <= ti < ti1 of
    image ``xn`` (C, H, W).

    ``xh``: (2*th+2) rows of (2*tw+2) pixels x C, zero border, columns 2J and 2J+1 stored at J and
    tw+1+J (only the rows these tiles read are written); ``rt``: 4 rows scratch; plane k of V starts at
    ``Vf[k * PV]``, row p at ``p * C``.
    """
    C, H, W = xn.shape
    Wp = 2 * tw + 2
    half = tw + 1
    RC = Wp * C
    L = tw * C
    one = xh.dtype.type(1.0)
    for i in range(max(0, 2 * ti0 - 1), min(H, 2 * ti1 + 1)):
        for j in range(W):
            jj = j + 1
            o = (i + 1) * RC + ((jj & 1) * half + (jj >> 1)) * C
            row = xh[o:o + C]
            for c in range(C):
                row[c] = xn[c, i, j]
    for ti in range(ti0, ti1):
        r = 2 * ti * RC
        d0 = xh[r:r + RC]
        d1 = xh[r + RC:r + 2 * RC]
        d2 = xh[r + 2 * RC:r + 3 * RC]
        d3 = xh[r + 3 * RC:r + 4 * RC]
        # B^T d (rows): d0 - d2, d1 + d2, d2 - d1, d1 - d3
        _axpby(d0, one, d2, -one, rt[0:RC])
        _axpby(d1, one, d2, one, rt[RC:2 * RC])
        _axpby(d2, one, d1, -one, rt[2 * RC:3 * RC])
        _axpby(d1, one, d3, -one, rt[3 * RC:4 * RC])
        # (.) B (columns a0..a3 = even[J], odd[J], even[J+1], odd[J+1]): a0 - a2, a1 + a2, a2 - a1, a1 - a3
        o = (p0 + (ti - ti0) * tw) * C
        for q in range(4):
            e = q * RC
            od = e + half * C
            e0 = rt[e:e + L]
            e1 = rt[e + C:e + C + L]
            o0 = rt[od:od + L]
            o1 = rt[od + C:od + C + L]
            k = 4 * q * PV + o
            _axpby(e0, one, e1, -one, Vf[k:k + L])
            _axpby(o0, one, e1, one, Vf[k + PV:k + PV + L])
            _axpby(e1, one, o0, -one, Vf[k + 2 * PV:k + 2 * PV + L])
            _axpby(o0, one, o1, -one, Vf[k + 3 * PV:k + 3 * PV + L])


@numba.njit(cache=True, nogil=True)
def _wino_fwd_kernel(x, Ub, F, b, th, tw, G, nb, out, t, nthreads):
    """Units of work: chunks of G images, each cut in ``nb`` bands of tile rows (``nb > 1`` only for
    G = 1: one image shared by the threads); thread ``t`` computes units t, t + nt, ..."""
    N, C, H, W = x.shape
    nchunks = (N + G - 1) // G
    TTb = ((th + nb - 1) // nb) * tw  # tiles of one image in one band, at most
    PV = G * TTb * C + _WINO_PAD
    PM = G * TTb * F + _WINO_PAD
    xh = np.zeros((2 * th + 2) * (2 * tw + 2) * C, x.dtype)
    rt = np.empty(4 * (2 * tw + 2) * C, x.dtype)
    Vf = np.empty(16 * PV, x.dtype)
    Mf = np.empty(16 * PM, x.dtype)
    Sf = np.empty(8 * PM, x.dtype)
    one = x.dtype.type(1.0)
    for u in range(t, nchunks * nb, nthreads):
        ti0, ti1, TT, n0, g = _fwd_unit(u, nb, th, tw, G, N)
        FT = F * g * TT
        for gg in range(g):
            _wino_input(x[n0 + gg], th, tw, ti0, ti1, xh, rt, Vf, PV, gg * TT)
        _plane_gemms(Vf, PV, Ub, 16, g * TT, C, F, Mf, PM)
        # A^T M: S_p = m_p + m_{4+p} + m_{8+p}, D_p = m_{4+p} - m_{8+p} - m_{12+p}
        for p in range(4):
            _sum3(Mf[p * PM:p * PM + FT], Mf[(4 + p) * PM:(4 + p) * PM + FT], one,
                  Mf[(8 + p) * PM:(8 + p) * PM + FT], one, Sf[p * PM:p * PM + FT])
            _sum3(Mf[(4 + p) * PM:(4 + p) * PM + FT], Mf[(8 + p) * PM:(8 + p) * PM + FT], -one,
                  Mf[(12 + p) * PM:(12 + p) * PM + FT], -one, Sf[(4 + p) * PM:(4 + p) * PM + FT])
        # (.) A: Y_{a0} = r_0 + r_1 + r_2, Y_{a1} = r_1 - r_2 - r_3 (r = S for a = 0, D for a = 1)
        for a in range(2):
            s = 4 * a * PM
            _sum3(Sf[s:s + FT], Sf[s + PM:s + PM + FT], one, Sf[s + 2 * PM:s + 2 * PM + FT], one,
                  Mf[2 * a * PM:2 * a * PM + FT])
            _sum3(Sf[s + PM:s + PM + FT], Sf[s + 2 * PM:s + 2 * PM + FT], -one,
                  Sf[s + 3 * PM:s + 3 * PM + FT], -one, Mf[(2 * a + 1) * PM:(2 * a + 1) * PM + FT])
        _scatter_tiles(Mf, PM, 2, 1, b, out, n0, g, TT, ti0, ti1, tw)


# ---- F(4x4, 3x3) forward (Lavin & Gray 2016, Sec. 4.2 and the F(4x4, 3x3) matrices of Sec. 5) ----
# 6x6 input tiles at a stride of 4, 36 GEMMs: 36 multiplies per 4x4 outputs, 2.25 per output against 4 for
# F(2x2, 3x3), at costlier transforms (points 0, +-1, +-2) and a few times F(2x2)'s float32 rounding
# (~5e-6 of the output's scale, tested). Used for the forward (and the input gradient, a forward conv) where
# the image is a whole number of 4x4 tiles, at least _WINO4_MIN_TILES of them (see :func:`_wino4_ok`):
# 1 thread, float32, against F(2x2): 32 -> 32 at 28x28, 1 image 96 -> 69 us, 64 -> 64 276 -> 195 us;
# 32 -> 32 at 8x8, 64 images 479 -> 357 us, 1 image 14 -> 13 us. 14x14 (partial tiles) and 4x4 images
# (one tile each: 64 -> 64, 1 image 9 -> 15 us; 64 images 334 -> 251 us) stay on F(2x2).
# B^T rows: (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
#           (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1);
# A^T rows: (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1).
_WINO4_G = np.array([[1 / 4, 0.0, 0.0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0.0, 0.0, 1.0]])
_WINO4_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                      [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=float)
_WINO4_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                     dtype=float)
_WINO4_MIN_TILES = 4  # 4x4 tiles per image from which F(4x4) is used (8x8 images: a tie at batch 1, faster from 2)


@numba.njit(cache=True, inline="always")
def _bt_row0(d0, d2, d4, out):
    """4 d0 - 5 d2 + d4 (rows 0 and 5 of B^T, the latter on d1, d3, d5)."""
    four = out.dtype.type(4.0)
    five = out.dtype.type(5.0)
    for i in range(out.size):
        out[i] = four * d0[i] - five * d2[i] + d4[i]


@numba.njit(cache=True, inline="always")
def _bt_rows12(d1, d2, d3, d4, o1, o2):
    """Rows 1, 2 of B^T: (d4 - 4 d2) +- (d3 - 4 d1)."""
    four = o1.dtype.type(4.0)
    for i in range(o1.size):
        a = d4[i] - four * d2[i]
        b = d3[i] - four * d1[i]
        o1[i] = a + b
        o2[i] = a - b


@numba.njit(cache=True, inline="always")
def _bt_rows34(d1, d2, d3, d4, o3, o4):
    """Rows 3, 4 of B^T: (d4 - d2) +- 2 (d3 - d1)."""
    two = o3.dtype.type(2.0)
    for i in range(o3.size):
        a = d4[i] - d2[i]
        b = two * (d3[i] - d1[i])
        o3[i] = a + b
        o4[i] = a - b


@numba.njit(cache=True, inline="always")
def _bt6(d0, d1, d2, d3, d4, d5, o0, o1, o2, o3, o4, o5):
    """(o0 .. o5) = B^T (d0 .. d5), elementwise over equal-length vectors."""
    _bt_row0(d0, d2, d4, o0)
    _bt_rows12(d1, d2, d3, d4, o1, o2)
    _bt_rows34(d1, d2, d3, d4, o3, o4)
    _bt_row0(d1, d3, d5, o5)


@numba.njit(cache=True, inline="always")
def _at6(m0, m1, m2, m3, m4, m5, o0, o1, o2, o3):
    """(o0 .. o3) = A^T (m0 .. m5), elementwise over equal-length vectors."""
    two = o0.dtype.type(2.0)
    four = o0.dtype.type(4.0)
    eight = o0.dtype.type(8.0)
    for i in range(o0.size):
        a = m1[i] + m2[i]
        b = m1[i] - m2[i]
        c = m3[i] + m4[i]
        d = m3[i] - m4[i]
        o0[i] = m0[i] + a + c
        o1[i] = b + two * d
        o2[i] = a + four * c
        o3[i] = b + eight * d + m5[i]


@numba.njit(cache=True, nogil=True)
def _wino4_input(xn, th, tw, ti0, ti1, xh, rt, Vf, PV, p0):
    """V[k][p0 + (ti - ti0)*tw + tj, :] = (B^T d B)[k] for the 6x6 tiles of tile rows ti0 <= ti < ti1 of
    image ``xn`` (C, H, W); tile (ti, tj) reads rows 4ti-1 .. 4ti+4 and columns 4tj-1 .. 4tj+4.

    As :func:`_wino_input`, vectorised over channels: ``xh`` holds (4*th+2) padded rows, each as 4 planes
    of (tw+1) pixels x C (padded column jj = 4J + r at plane r, position J; zero border), so that each of
    a tile's 6 columns is one contiguous run over the row's tiles: planes 0..3 at J, planes 0, 1 at J+1.
    """
    C, H, W = xn.shape
    Q = (tw + 1) * C
    RC = 4 * Q
    L = tw * C
    for i in range(max(0, 4 * ti0 - 1), min(H, 4 * ti1 + 1)):
        for j in range(W):
            jj = j + 1
            o = (i + 1) * RC + (jj & 3) * Q + (jj >> 2) * C
            row = xh[o:o + C]
            for c in range(C):
                row[c] = xn[c, i, j]
    for ti in range(ti0, ti1):
        r = 4 * ti * RC
        _bt6(xh[r:r + RC], xh[r + RC:r + 2 * RC], xh[r + 2 * RC:r + 3 * RC], xh[r + 3 * RC:r + 4 * RC],
             xh[r + 4 * RC:r + 5 * RC], xh[r + 5 * RC:r + 6 * RC],
             rt[0:RC], rt[RC:2 * RC], rt[2 * RC:3 * RC], rt[3 * RC:4 * RC], rt[4 * RC:5 * RC], rt[5 * RC:6 * RC])
        o = (p0 + (ti - ti0) * tw) * C
        for q in range(6):
            e = q * RC
            k = 6 * q * PV + o
            _bt6(rt[e:e + L], rt[e + Q:e + Q + L], rt[e + 2 * Q:e + 2 * Q + L], rt[e + 3 * Q:e + 3 * Q + L],
                 rt[e + C:e + C + L], rt[e + Q + C:e + Q + C + L],
                 Vf[k:k + L], Vf[k + PV:k + PV + L], Vf[k + 2 * PV:k + 2 * PV + L], Vf[k + 3 * PV:k + 3 * PV + L],
                 Vf[k + 4 * PV:k + 4 * PV + L], Vf[k + 5 * PV:k + 5 * PV + L])


@numba.njit(cache=True, nogil=True)
def _wino4_fwd_kernel(x, Ub, F, b, th, tw, G, nb, out, t, nthreads):
    """F(4x4, 3x3) forward: :func:`_wino_fwd_kernel`'s units of work (chunks of G images, ``nb`` bands of
    tile rows), ``th`` x ``tw`` tiles of 4x4 outputs, ``Ub`` (36, >= C*F) from :func:`_wino4_transform`."""
    N, C, H, W = x.shape
    nchunks = (N + G - 1) // G
    TTb = ((th + nb - 1) // nb) * tw
    PV = G * TTb * C + _WINO_PAD
    PM = G * TTb * F + _WINO_PAD
    xh = np.zeros((4 * th + 2) * 4 * (tw + 1) * C, x.dtype)
    rt = np.empty(24 * (tw + 1) * C, x.dtype)
    Vf = np.empty(36 * PV, x.dtype)
    Mf = np.empty(36 * PM, x.dtype)
    Sf = np.empty(24 * PM, x.dtype)
    for u in range(t, nchunks * nb, nthreads):
        ti0, ti1, TT, n0, g = _fwd_unit(u, nb, th, tw, G, N)
        FT = F * g * TT
        for gg in range(g):
            _wino4_input(x[n0 + gg], th, tw, ti0, ti1, xh, rt, Vf, PV, gg * TT)
        _plane_gemms(Vf, PV, Ub, 36, g * TT, C, F, Mf, PM)
        # A^T M: S[6a + l] = row a of A^T applied to M[6p + l], p = 0..5
        for l in range(6):
            _at6(Mf[l * PM:l * PM + FT], Mf[(6 + l) * PM:(6 + l) * PM + FT], Mf[(12 + l) * PM:(12 + l) * PM + FT],
                 Mf[(18 + l) * PM:(18 + l) * PM + FT], Mf[(24 + l) * PM:(24 + l) * PM + FT],
                 Mf[(30 + l) * PM:(30 + l) * PM + FT],
                 Sf[l * PM:l * PM + FT], Sf[(6 + l) * PM:(6 + l) * PM + FT], Sf[(12 + l) * PM:(12 + l) * PM + FT],
                 Sf[(18 + l) * PM:(18 + l) * PM + FT])
        # (.) A: Y[4a + c] (into M's first 16 planes) from S[6a + l], l = 0..5
        for a in range(4):
            s = 6 * a * PM
            y = 4 * a * PM
            _at6(Sf[s:s + FT], Sf[s + PM:s + PM + FT], Sf[s + 2 * PM:s + 2 * PM + FT], Sf[s + 3 * PM:s + 3 * PM + FT],
                 Sf[s + 4 * PM:s + 4 * PM + FT], Sf[s + 5 * PM:s + 5 * PM + FT],
                 Mf[y:y + FT], Mf[y + PM:y + PM + FT], Mf[y + 2 * PM:y + 2 * PM + FT], Mf[y + 3 * PM:y + 3 * PM + FT])
        _scatter_tiles(Mf, PM, 4, 2, b, out, n0, g, TT, ti0, ti1, tw)


@numba.njit(cache=True, nogil=True)
def _wino_conv(x, Ub, F, b, four, th, tw, G, nb, out, t, nthreads):
    """The Winograd forward of :func:`_wino_plan`'s choice: F(4x4, 3x3) when ``four``, else F(2x2, 3x3)."""
    if four:
        _wino4_fwd_kernel(x, Ub, F, b, th, tw, G, nb, out, t, nthreads)
    else:
        _wino_fwd_kernel(x, Ub, F, b, th, tw, G, nb, out, t, nthreads)


@numba.njit(cache=True, nogil=True)
def _wino_dz(dn, th, tw, dh, rz, Zf, PM, p0):
    """Z[k][p0 + ti*tw + tj, :] = (A y A^T)[k] for the 2x2 output-gradient tiles y of image ``dn`` (F, H, W).

    Like :func:`_wino_input`, vectorised over channels: the image is first transposed into ``dh`` (2*th
    rows of 2*tw pixels x F, columns 2J and 2J+1 stored at J and tw+J; zero outside the image, which
    only odd sizes read), so that every step is one contiguous loop over a tile row's tw*F values.
    Rows R_0 = y_0, R_1 = y_0 + y_1, R_2 = y_0 - y_1, R_3 = -y_1, then Z_{q0} = R_{q0}, Z_{q1} = R_{q0} + R_{q1},
    Z_{q2} = R_{q0} - R_{q1}, Z_{q3} = -R_{q1}. Plane k of Z starts at ``Zf[k * PM]``, tile p at ``p * F``;
    ``rz``: 2*tw*F scratch. Against the earlier (F, tiles) planes (per-tile scalar stores up to 8 wide, a
    strided gather and 24 plane passes above), the whole weight gradient, 1 thread: 64 -> 64 at 4x4, 64
    images 584 -> 404 us; 32 -> 32 at 8x8 636 -> 484 us; 32 -> 32 at 28x28, 16 images 1696 -> 1411 us.
    """
    F, H, W = dn.shape
    L = tw * F
    RW = 2 * L
    for i in range(H):
        for j in range(W):
            o = i * RW + ((j & 1) * tw + (j >> 1)) * F
            row = dh[o:o + F]
            for f in range(F):
                row[f] = dn[f, i, j]
    one = dh.dtype.type(1.0)
    zero = dh.dtype.type(0.0)
    r0 = rz[0:L]
    r1 = rz[L:2 * L]
    for ti in range(th):
        r = 2 * ti * RW
        y00 = dh[r:r + L]
        y01 = dh[r + L:r + RW]
        y10 = dh[r + RW:r + RW + L]
        y11 = dh[r + RW + L:r + 2 * RW]
        o = (p0 + ti * tw) * F
        for q in range(4):
            # R_q = sa * (row 0) + sb * (row 1): (1, 0), (1, 1), (1, -1), (0, -1)
            sa = zero if q == 3 else one
            sb = zero if q == 0 else (one if q == 1 else -one)
            _axpby(y00, sa, y10, sb, r0)
            _axpby(y01, sa, y11, sb, r1)
            k = 4 * q * PM + o
            _axpby(r0, one, r1, zero, Zf[k:k + L])
            _axpby(r0, one, r1, one, Zf[k + PM:k + PM + L])
            _axpby(r0, one, r1, -one, Zf[k + 2 * PM:k + 2 * PM + L])
            _axpby(r0, zero, r1, -one, Zf[k + 3 * PM:k + 3 * PM + L])


@numba.njit(cache=True, nogil=True)
def _wino_bwd_weight_kernel(dout, x, th, tw, G, dU_parts, t, nthreads):
    """dU_parts[p, k, :F*C] = sum over the chunks of part p (in chunk order) of Z[k] (F, T) @ V[k] (T, C).

    ``P = dU_parts.shape[0]`` fixed parts (:func:`._threads._parts`); thread ``t`` computes parts t, t + nt, ...
    """
    N, C, H, W = x.shape
    F = dout.shape[1]
    TT = th * tw
    nchunks = (N + G - 1) // G
    PV = G * TT * C + _WINO_PAD
    PM = G * TT * F + _WINO_PAD
    xh = np.zeros((2 * th + 2) * (2 * tw + 2) * C, x.dtype)
    rt = np.empty(4 * (2 * tw + 2) * C, x.dtype)
    Vf = np.empty(16 * PV, x.dtype)
    dh = np.zeros(4 * th * tw * F, x.dtype)
    rz = np.empty(2 * tw * F, x.dtype)
    Zf = np.empty(16 * PM, x.dtype)
    tmp = np.empty((F, C), x.dtype)
    P = dU_parts.shape[0]
    for p in range(t, P, nthreads):
        dU = dU_parts[p]  # (16, >= F*C)
        for ch in range(p * nchunks // P, (p + 1) * nchunks // P):
            _wino_bwd_weight_chunk(dout, x, th, tw, G, ch, ch == p * nchunks // P, dU, xh, rt, Vf, dh, rz, Zf, tmp,
                                   PV, PM)


@numba.njit(cache=True, nogil=True)
def _wino_bwd_weight_chunk(dout, x, th, tw, G, ch, first, dU, xh, rt, Vf, dh, rz, Zf, tmp, PV, PM):
    """Chunk ``ch``'s term of dU: written into ``dU`` when ``first``, else added to it."""
    N, C = x.shape[0], x.shape[1]
    F = dout.shape[1]
    TT = th * tw
    n0 = ch * G
    g = min(G, N - n0)
    T = g * TT
    for gg in range(g):
        _wino_input(x[n0 + gg], th, tw, 0, th, xh, rt, Vf, PV, gg * TT)
        _wino_dz(dout[n0 + gg], th, tw, dh, rz, Zf, PM, gg * TT)
    for k in range(16):
        # dU[k] (F, C) += Z[k]^T (F, T) @ V[k] (T, C); Z[k] is stored (T, F), a transposed operand for BLAS
        Zk = Zf[k * PM:k * PM + T * F].reshape(T, F).T
        Vk = Vf[k * PV:k * PV + T * C].reshape(T, C)
        if first:
            np.dot(Zk, Vk, dU[k, :F * C].reshape(F, C))
        else:
            np.dot(Zk, Vk, tmp)
            dU[k, :F * C] += tmp.ravel()


@numba.njit(cache=True, inline="always")
def _g_rows(g0, g1, g2, h):
    """G (g0, g1, g2)^T: the 4 entries of G g for one column of a 3x3 kernel."""
    return g0, h * (g0 + g1 + g2), h * (g0 - g1 + g2), g2


@numba.njit(cache=True, inline="always")
def _gt_rows(u0, u1, u2, u3, h):
    """G^T (u0, u1, u2, u3)^T: the adjoint of :func:`_g_rows`."""
    return u0 + h * (u1 + u2), h * (u1 - u2), h * (u1 + u2) + u3


@numba.njit(cache=True, inline="always")
def _filter_taps(w, w2, a, flip, g):
    """g[q, bb] = tap q (row-major 3x3) of the filter of output row ``a`` and entry ``bb`` (stored in g's
    dtype): w[bb, a] (F, C, 3, 3), or with ``flip`` the input gradient's w~[bb, a] = w[a, bb] rotated 180
    degrees. ``w2`` is w viewed (F, C*9)."""
    B = g.shape[1]
    if flip:
        wa = w[a].reshape(B, 9)  # the 9 taps of w[a, bb] are contiguous: read them in order
        for bb in range(B):
            for q in range(9):
                g[8 - q, bb] = wa[bb, q]
    else:
        for bb in range(B):
            for q in range(9):
                g[q, bb] = w2[bb, 9 * a + q]


@numba.njit(cache=True, nogil=True)
def _wino_weights(w, flip, Ub):
    """Ub[4k + l, c*F + f] = (G w[f, c] G^T)[k, l]: plane k of ``Ub`` (16, >= C*F) is U[k]^T, shape (C, F).

    ``flip``: the transform of the input gradient's filters instead, ``w~[c, f, u, v] = w[f, c, 2-u, 2-v]``
    (an F -> C conv): Ub[4k + l, f*C + c] = (G w~[c, f] G^T)[k, l], without building ``w~``.
    Vectorised over the output row (f, or c when flipped): the 9 taps of one input channel are gathered
    into rows of ``g`` first, then every plane's row is one contiguous loop (the same arithmetic, so the same
    bits, as per-filter scalar stores into the 16 planes, which took 0.79 ms for the default U-Net's filters
    and 0.90 ms for the flipped ones after a flipped copy; now 0.37 and 0.29 ms, measured).
    """
    F, C = w.shape[0], w.shape[1]
    A, B = (F, C) if flip else (C, F)
    h = w.dtype.type(0.5)
    g = np.empty((9, B), w.dtype)
    r = np.empty((12, B), w.dtype)  # G g: rows 4 * column + k
    w2 = w.reshape(F, C * 9)
    for a in range(A):
        _filter_taps(w, w2, a, flip, g)
        for col in range(3):  # column col of G g: _g_rows(g[col], g[3 + col], g[6 + col])
            g0 = g[col]
            g1 = g[3 + col]
            g2 = g[6 + col]
            r0 = r[4 * col]
            r1 = r[4 * col + 1]
            r2 = r[4 * col + 2]
            r3 = r[4 * col + 3]
            for bb in range(B):
                r0[bb] = g0[bb]
                r1[bb] = h * (g0[bb] + g1[bb] + g2[bb])
                r2[bb] = h * (g0[bb] - g1[bb] + g2[bb])
                r3[bb] = g2[bb]
        o = a * B
        for k in range(4):  # row k of (G g) G^T: _g_rows over the three columns' entry k
            x0 = r[k]
            x1 = r[4 + k]
            x2 = r[8 + k]
            u0 = Ub[4 * k, o:o + B]
            u1 = Ub[4 * k + 1, o:o + B]
            u2 = Ub[4 * k + 2, o:o + B]
            u3 = Ub[4 * k + 3, o:o + B]
            for bb in range(B):
                u0[bb] = x0[bb]
                u1[bb] = h * (x0[bb] + x1[bb] + x2[bb])
                u2[bb] = h * (x0[bb] - x1[bb] + x2[bb])
                u3[bb] = x2[bb]


@numba.njit(cache=True, inline="always")
def _g4i_rows(g0, g1, g2):
    """Gi (g0, g1, g2)^T: the 6 entries for one column of a 3x3 kernel, Gi the integer part of F(4x4, 3x3)'s
    G = diag(:data:`_WINO4_D`)^-1 Gi, rows (1, 0, 0), (1, 1, 1), (1, -1, 1), (1, 2, 4), (1, -2, 4), (0, 0, 1)."""
    a = g0 + g2
    b = 2.0 * g1
    c = g0 + 4.0 * g2
    return g0, a + g1, a - g1, c + b, c - b, g2


_WINO4_D = np.array([4.0, -6.0, -6.0, 24.0, 24.0, 1.0])  # G's row k is Gi's row k / _WINO4_D[k]
_WINO4_S = (1.0 / np.outer(_WINO4_D, _WINO4_D)).ravel()  # U[k, l] = (Gi w Gi^T)[k, l] * _WINO4_S[6k + l]


@numba.njit(cache=True, nogil=True)
def _wino4_weights(w, flip, Ub):
    """Ub[6k + l, c*F + f] = (G w[f, c] G^T)[k, l] for F(4x4, 3x3): plane k of ``Ub`` (36, >= C*F) is U[k]^T.

    ``flip`` as in :func:`_wino_weights` (the input gradient's filters, an F -> C conv). G w G^T =
    D (Gi w Gi^T) D with Gi's small integers (:func:`_g4i_rows`) and D = diag(1 / :data:`_WINO4_D`): the
    integer part is summed in float64 (exact for float32 filters of like magnitudes), then scaled once by
    1 / (d_k d_l) and rounded once to ``Ub``'s dtype (G's 1/6, 1/12, 1/24 are inexact in binary). Against
    G applied with its fractions (45 divisions a filter), the default U-Net's filters: 1.86 -> 0.93 ms
    (1.79 -> 0.85 flipped), no less accurate. Vectorised over the output row like :func:`_wino_weights`.
    """
    F, C = w.shape[0], w.shape[1]
    A, B = (F, C) if flip else (C, F)
    S = _WINO4_S
    g = np.empty((9, B), np.float64)
    r = np.empty((18, B), np.float64)  # Gi g: rows 6 * column + k
    w2 = w.reshape(F, C * 9)
    for a in range(A):
        _filter_taps(w, w2, a, flip, g)
        for col in range(3):
            x0, x1, x2 = g[col], g[3 + col], g[6 + col]
            r0, r1, r2, r3, r4, r5 = (r[6 * col], r[6 * col + 1], r[6 * col + 2], r[6 * col + 3], r[6 * col + 4],
                                      r[6 * col + 5])
            for bb in range(B):
                r0[bb], r1[bb], r2[bb], r3[bb], r4[bb], r5[bb] = _g4i_rows(x0[bb], x1[bb], x2[bb])
        o = a * B
        for k in range(6):  # row k of (Gi g) Gi^T, scaled
            x0, x1, x2 = r[k], r[6 + k], r[12 + k]
            s0, s1, s2, s3, s4, s5 = S[6 * k], S[6 * k + 1], S[6 * k + 2], S[6 * k + 3], S[6 * k + 4], S[6 * k + 5]
            u0, u1, u2 = Ub[6 * k, o:o + B], Ub[6 * k + 1, o:o + B], Ub[6 * k + 2, o:o + B]
            u3, u4, u5 = Ub[6 * k + 3, o:o + B], Ub[6 * k + 4, o:o + B], Ub[6 * k + 5, o:o + B]
            for bb in range(B):
                v0, v1, v2, v3, v4, v5 = _g4i_rows(x0[bb], x1[bb], x2[bb])
                u0[bb] = v0 * s0
                u1[bb] = v1 * s1
                u2[bb] = v2 * s2
                u3[bb] = v3 * s3
                u4[bb] = v4 * s4
                u5[bb] = v5 * s5


@numba.njit(cache=True, nogil=True)
def _wino_weight_grad(dUb, dw):
    """dw[f, c] = G^T dU[f, c] G, the adjoint of :func:`_wino_weights`; plane 4k + l of ``dUb`` is dU[k, l] (F, C)."""
    F, C = dw.shape[0], dw.shape[1]
    h = dw.dtype.type(0.5)
    for f in range(F):
        for c in range(C):
            q = f * C + c
            # column l of G^T dU
            p0, p1, p2 = _gt_rows(dUb[0, q], dUb[4, q], dUb[8, q], dUb[12, q], h)
            q0, q1, q2 = _gt_rows(dUb[1, q], dUb[5, q], dUb[9, q], dUb[13, q], h)
            r0, r1, r2 = _gt_rows(dUb[2, q], dUb[6, q], dUb[10, q], dUb[14, q], h)
            s0, s1, s2 = _gt_rows(dUb[3, q], dUb[7, q], dUb[11, q], dUb[15, q], h)
            dw[f, c, 0, 0], dw[f, c, 0, 1], dw[f, c, 0, 2] = _gt_rows(p0, q0, r0, s0, h)
            dw[f, c, 1, 0], dw[f, c, 1, 1], dw[f, c, 1, 2] = _gt_rows(p1, q1, r1, s1, h)
            dw[f, c, 2, 0], dw[f, c, 2, 1], dw[f, c, 2, 2] = _gt_rows(p2, q2, r2, s2, h)


def _wino_tiles(C, F, itemsize):
    """Tiles per unit of work: its 16 planes of C + F rows take about 1 MiB (they stay in L2)."""
    return max(32, min(2 * _WINO_TILES, (1 << 20) // (16 * itemsize * max(C + F, 1))))


def _wino_chunk(TT, N, C, F, itemsize):
    """Images per chunk (:func:`_wino_tiles` tiles, whole images, at least one)."""
    return max(1, min(N, _wino_tiles(C, F, itemsize) // TT))


def _wino_bands(th, tw, C, F, itemsize):
    """Bands of tile rows per image for the forward kernel: more than one where one image's tiles exceed
    :func:`_wino_tiles` (64 -> 64 channels at 28x28: 196 tiles for 128; its planes spilled out of L2, and
    in two bands the conv ran at twice the rate). A function of the shapes only."""
    return max(1, min(th, -(-(th * tw) // _wino_tiles(C, F, itemsize))))


def _wino_transform(w, flip=False, four=False, out=None):
    """The transformed filters of ``w`` (F, C, 3, 3): ``Ub`` (16, C*F + pad), plane k = U[k]^T (C, F); with
    ``flip`` those of the input gradient's conv (C -> F channels swapped, the kernel rotated 180 degrees);
    with ``four`` F(4x4, 3x3)'s (36 planes, :func:`_wino4_weights`). ``out``: an array of that shape to write."""
    F, C = w.shape[0], w.shape[1]
    Ub = np.empty((36 if four else 16, C * F + _WINO_PAD), w.dtype) if out is None else out
    (_wino4_weights if four else _wino_weights)(np.ascontiguousarray(w), bool(flip), Ub)
    return Ub


_GEOMETRY = {}  # (shapes, the rules in force) -> geometry: a pass asks ~12 times, ~3 us of Python each


def _wino_geometry(N, C, F, th, tw, itemsize):
    """How a Winograd conv of N images, C -> F channels, th x tw tiles is cut: ``(G, nb, P)`` = images per
    chunk, bands of tile rows per image (forward), fixed parts of the weight gradient. Shapes only (cached;
    the key holds the rule functions too, so a test that patches one gets its own entries)."""
    key = (N, C, F, th, tw, itemsize, _wino_chunk, _wino_bands, _wino_tiles, _WINO_TILES, _threads._parts)
    geo = _GEOMETRY.get(key)
    if geo is None:
        G = _wino_chunk(th * tw, N, C, F, itemsize)
        nb = _wino_bands(th, tw, C, F, itemsize) if G == 1 else 1
        geo = _GEOMETRY[key] = (G, nb, _threads._parts((N + G - 1) // G))
        if len(_GEOMETRY) > 4096:  # bounded: a long run over many shapes starts afresh
            _GEOMETRY.clear()
            _GEOMETRY[key] = geo
    return geo


def _wino4_ok(N, H, W):
    """Whether a forward Winograd conv of N images of H x W takes F(4x4, 3x3): images of whole 4x4 tiles
    (14x14 would compute 16x16, a wash against F(2x2), measured), at least :data:`_WINO4_MIN_TILES` of
    them. A function of the image size only, never of N or the thread count: an image gets the same bits
    in any batch (sharded sampling relies on it) and fused and unfused calls choose alike."""
    return H % 4 == 0 and W % 4 == 0 and (H // 4) * (W // 4) >= _WINO4_MIN_TILES


def _wino4_tiles(C, F, itemsize):
    """F(4x4) tiles per unit of work: its 36 planes of C + F rows take about 1 MiB (measured against 2 MiB:
    the same or faster at 4x4, 8x8 and 28x28)."""
    return max(8, (1 << 20) // (36 * itemsize * max(C + F, 1)))


def _wino_plan(N, C, F, H, W, itemsize):
    """The forward Winograd conv of N images of H x W, C -> F channels: ``(four, th, tw, G, nb)`` = whether
    F(4x4, 3x3) (:func:`_wino4_ok`), tiles per column and row, images per chunk, bands of tile rows."""
    if not _wino4_ok(N, H, W):
        th, tw = (H + 1) // 2, (W + 1) // 2
        G, nb, _ = _wino_geometry(N, C, F, th, tw, itemsize)
        return False, th, tw, G, nb
    th, tw = (H + 3) // 4, (W + 3) // 4
    per = _wino4_tiles(C, F, itemsize)
    G = max(1, min(N, per // (th * tw)))
    nb = max(1, min(th, -(-(th * tw) // per))) if G == 1 else 1
    return True, th, tw, G, nb


def _wino_filters(w, four=False, flip=False):
    """``w``'s transform (:func:`_wino_transform`), computed once per pass or frozen scope (:func:`._threads.derived`)."""
    return _threads.derived(("wino", bool(four), bool(flip)), w, lambda: _wino_transform(w, flip, four))


def _prefetch_filters(specs):
    """Start :func:`_wino_filters` ``(w, four, flip)`` for ``specs`` = ``[(w, four, flip)]`` on an idle thread, in
    one compiled call (:func:`._threads.prefetch`); those already made or started are skipped."""
    if not _threads.prefetching():
        return 0
    todo = [(w, bool(four), bool(flip)) for w, four, flip in specs
            if w.flags.c_contiguous and _threads.missing(("wino", bool(four), bool(flip)), w)]
    if not todo:
        return 0
    ws = tuple(w for w, _, _ in todo)
    if len({(w.dtype, w.ndim) for w in ws}) != 1:
        return 0  # one compiled call takes one array type
    outs = tuple(np.empty((36 if four else 16, w.shape[0] * w.shape[1] + _WINO_PAD), w.dtype) for w, four, _ in todo)
    fours = np.array([four for _, four, _ in todo])
    flips = np.array([flip for _, _, flip in todo])
    return _threads.prefetch([(("wino", four, flip), w, out) for (w, four, flip), out in zip(todo, outs)],
                             lambda state: _wino_transform_many(ws, fours, flips, outs, state))


@intrinsic
def _release_fence(typingctx):
    """An LLVM release fence: the stores before it are visible to another thread before those after it."""
    def codegen(context, builder, signature, args):
        builder.fence("release")
        return context.get_dummy_value()
    return types.void(), codegen


@numba.njit(cache=True, nogil=True)
def _wino_transform_many(ws, fours, flips, Ubs, state):
    """:func:`_wino_transform` of each ``ws[i]`` into ``Ubs[i]`` (C-contiguous filters; F(4x4)'s where
    ``fours[i]``), in order, each only if ``state[i]`` is 0 (to do): then 1 while made, 2 once made
    (:func:`._threads.prefetch`)."""
    for i in range(len(ws)):
        if state[i] != 0:
            continue
        state[i] = 1
        if fours[i]:
            _wino4_weights(ws[i], flips[i], Ubs[i])
        else:
            _wino_weights(ws[i], flips[i], Ubs[i])
        _release_fence()
        state[i] = 2


def _wino_forward(x, w, b, flip=False):
    """Winograd forward conv of ``x`` (N, C, H, W) with the filters ``w`` (F, C, 3, 3) and the bias ``b`` (F,),
    F(4x4, 3x3) or F(2x2, 3x3) as :func:`_wino_plan` says. With ``flip``: the input gradient's conv of ``w``
    (F, C, 3, 3), ``x`` then has F channels and ``b`` C entries."""
    N, C, H, W = x.shape
    F = b.shape[0]
    four, th, tw, G, nb = _wino_plan(N, C, F, H, W, x.itemsize)
    Ub = _wino_filters(w, four, flip)
    units = (N + G - 1) // G * nb
    # split by F(2x2)'s GEMM flops (the size of the conv), the same rule as the fused ResBlock's
    nt = _threads._split_threads(units, 32.0 * N * ((H + 1) // 2) * ((W + 1) // 2) * C * F)
    out = np.empty((N, F, H, W), x.dtype)
    _threads._run_split(_wino_conv, nt, True, x, Ub, F, b, four, th, tw, G, nb, out)
    return out


def _wino_backward_weight(dout, x):
    N, C, H, W = x.shape
    F = dout.shape[1]
    th, tw = (H + 1) // 2, (W + 1) // 2
    G, _, P = _wino_geometry(N, C, F, th, tw, x.itemsize)  # P fixed parts, summed in part order: any thread count
    dU_parts = (np.empty if N else np.zeros)((P, 16, F * C + _WINO_PAD), x.dtype)  # each part's first chunk writes it
    _threads._run_split(_wino_bwd_weight_kernel, _threads._split_threads(P, 32.0 * N * th * tw * C * F), True,
                        dout, x, th, tw, G, dU_parts)
    dw = np.empty((F, C, 3, 3), x.dtype)
    db = np.empty(F, x.dtype)
    _wino_weight_grad_finish(dout, dU_parts, F * C, dw, db)
    return dw, db


@numba.njit(cache=True, nogil=True)
def _wino_weight_grad_finish(dout, dU_parts, n, dw, db):
    """dw from the parts of dU (summed in part order, :func:`_wino_weight_grad`) and db (float64 sums)."""
    P = dU_parts.shape[0]
    if P == 1:
        _wino_weight_grad(dU_parts[0], dw)
    else:
        dU = np.empty((16, n), dU_parts.dtype)
        for k in range(16):
            _sum_rows(dU_parts[:, k, :], n, dU[k])
        _wino_weight_grad(dU, dw)
    _bias_grad(dout, db)
