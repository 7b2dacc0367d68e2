"""A training plan's backward pass as one compiled program (see :mod:`.plan`).

:func:`build` writes the program from the forward plan's ops, walked in reverse: each op's backward is the
call the unplanned backward makes (:meth:`difnumpy.nn.unet.UNet._backward_impl` with the cpu backend's
``conv2d_backward_*``, ``group_norm_silu_backward``, ``resblock_backward``, ``split_channels``,
``upsample_nearest2x_backward``, ``add_``), with the same arguments in the same order: the same bits (tested).
The gradient of a slot read by two ops (a skip) is the sum of the two (one addition: the order of the terms
does not change it). What stays in Python: the ResBlocks' time-embedding projections' backward (their
``dtp`` are the program's outputs) and the time MLP's. :func:`_run_backward` walks the program.
"""
from __future__ import annotations

import numba

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu._plan_util import _PWINO, _b, _b2, _b3, _b4, _copy_param, _planes, _take_transform
from difnumpy.kernels.cpu.conv import (_chunk, _conv_bwd_weight_kernel, _conv_fwd_kernel, _conv_mode,
                                       _conv_pix_bwd_input_kernel, _conv_pix_bwd_weight_kernel, _xp_len)
from difnumpy.kernels.cpu.elementwise import _add_kernel, _bias_grad, _sum_rows
from difnumpy.kernels.cpu.groupnorm import _gn_bwd_kernel, _gn_threads
from difnumpy.kernels.cpu.layout import _take_channels, _up2_bwd
from difnumpy.kernels.cpu.resblock import _res_bwd_a, _res_bwd_b
from difnumpy.kernels.cpu.winograd import (_WINO_PAD, _wino_bwd_weight_kernel, _wino_conv, _wino_geometry, _wino_plan,
                                           _wino_weight_grad_finish)

# op codes of the backward rows (_PWINO, 10, is shared: the flipped transforms, made ahead by the worker)
(_ZERO, _ZERO64, _PCOPY, _PFLIP, _PFLIPT, _PT, _B_RES, _B_WINO_IN, _B_CONV_IN, _B_PIX_IN, _B_WINO_W, _B_CONV_W,
 _B_PIX_W, _B_GN, _B_SPLIT, _B_UP2, _B_ADD) = range(20, 37)

# the columns of a _B_RES row: resblock.resblock_backward's arguments of _res_bwd_a and _res_bwd_b, then sizes
_RES_COLS = ("dout", "x", "h1", "h2", "gam2", "ge2", "be2", "m2", "r2", "Ub2f", "zF", "four", "fth", "ftw", "Gi2",
             "nbi2", "th", "tw", "Gw2", "dU2", "dw2", "db2", "skip", "wst", "zC", "dws_parts", "dbs_parts", "dws",
             "dbs", "dx_skip", "dh", "dh_gn", "dgp2", "dbp2", "dgamma2", "dbeta2", "dtp", "h0", "Ub1f", "Gi1",
             "nbi1", "Gw1", "dU1", "dw1", "db1", "gam1", "ge1", "be1", "m1", "r1", "dh1", "dx", "dgp1", "dbp1",
             "dgamma1", "dbeta1", "N", "C", "H", "W", "F", "P2", "P1", "Ps", "sC", "sF")
(_R_DOUT, _R_X, _R_H1, _R_H2, _R_GAM2, _R_GE2, _R_BE2, _R_M2, _R_R2, _R_UB2F, _R_ZF, _R_FOUR, _R_FTH, _R_FTW, _R_GI2,
 _R_NBI2, _R_TH, _R_TW, _R_GW2, _R_DU2, _R_DW2, _R_DB2, _R_SKIP, _R_WST, _R_ZC, _R_DWS_PARTS, _R_DBS_PARTS, _R_DWS,
 _R_DBS, _R_DX_SKIP, _R_DH, _R_DH_GN, _R_DGP2, _R_DBP2, _R_DGAMMA2, _R_DBETA2, _R_DTP, _R_H0, _R_UB1F, _R_GI1,
 _R_NBI1, _R_GW1, _R_DU1, _R_DW1, _R_DB1, _R_GAM1, _R_GE1, _R_BE1, _R_M1, _R_R1, _R_DH1, _R_DX, _R_DGP1, _R_DBP1,
 _R_DGAMMA1, _R_DBETA1, _R_N, _R_C, _R_H, _R_W, _R_F, _R_P2, _R_P1, _R_PS, _R_SC, _R_SF) = range(1, 67)


@numba.njit(cache=True, nogil=True)
def _res_backward(r, ws, offs, w64, offs64, groups, fast):
    """resblock.resblock_backward's two compiled calls (its ``dtp`` is left in its buffer)."""
    N, C, H, W, F = r[_R_N], r[_R_C], r[_R_H], r[_R_W], r[_R_F]
    P2, P1, Ps, sC, sF, G = r[_R_P2], r[_R_P1], r[_R_PS], r[_R_SC], r[_R_SF], groups
    four = r[_R_FOUR] != 0
    x = _b4(ws, offs, r[_R_X], N, C, H, W)
    dh_gn = _b4(ws, offs, r[_R_DH_GN], N, F, H, W)
    dx_skip = _b4(ws, offs, r[_R_DX_SKIP], N, C, H, W)
    _res_bwd_a(_b4(ws, offs, r[_R_DOUT], N, F, H, W), x, _b4(ws, offs, r[_R_H1], N, F, H, W),
               _b4(ws, offs, r[_R_H2], N, F, H, W), _b(ws, offs, r[_R_GAM2]), _b(ws, offs, r[_R_GE2]),
               _b(ws, offs, r[_R_BE2]), _b2(ws, offs, r[_R_M2], N, G), _b2(ws, offs, r[_R_R2], N, G),
               _planes(ws, offs, r[_R_UB2F], four), _b(ws, offs, r[_R_ZF]), four, r[_R_FTH], r[_R_FTW], r[_R_GI2],
               r[_R_NBI2], r[_R_TH], r[_R_TW], r[_R_GW2], _b3(ws, offs, r[_R_DU2], P2, 16, F * F + _WINO_PAD),
               _b4(ws, offs, r[_R_DW2], F, F, 3, 3), _b(ws, offs, r[_R_DB2]), r[_R_SKIP] != 0,
               _b2(ws, offs, r[_R_WST], sC, sF), _b(ws, offs, r[_R_ZC]), _b3(ws, offs, r[_R_DWS_PARTS], Ps, sF, sC),
               _b2(w64, offs64, r[_R_DBS_PARTS], Ps, sF), _b4(ws, offs, r[_R_DWS], sF, sC, 1, 1),
               _b(ws, offs, r[_R_DBS]), groups, fast, dx_skip, _b4(ws, offs, r[_R_DH], N, F, H, W), dh_gn,
               _b2(w64, offs64, r[_R_DGP2], N, F), _b2(w64, offs64, r[_R_DBP2], N, F), _b(ws, offs, r[_R_DGAMMA2]),
               _b(ws, offs, r[_R_DBETA2]), _b2(ws, offs, r[_R_DTP], N, F))
    _res_bwd_b(dh_gn, _b4(ws, offs, r[_R_H0], N, C, H, W), x, _planes(ws, offs, r[_R_UB1F], four),
               _b(ws, offs, r[_R_ZC]), four, r[_R_FTH], r[_R_FTW], r[_R_GI1], r[_R_NBI1], r[_R_TH], r[_R_TW],
               r[_R_GW1], _b3(ws, offs, r[_R_DU1], P1, 16, F * C + _WINO_PAD), _b4(ws, offs, r[_R_DW1], F, C, 3, 3),
               _b(ws, offs, r[_R_DB1]), _b(ws, offs, r[_R_GAM1]), _b(ws, offs, r[_R_GE1]), _b(ws, offs, r[_R_BE1]),
               _b2(ws, offs, r[_R_M1], N, G), _b2(ws, offs, r[_R_R1], N, G), groups, fast,
               _b4(ws, offs, r[_R_DH1], N, C, H, W), _b4(ws, offs, r[_R_DX], N, C, H, W),
               _b2(w64, offs64, r[_R_DGP1], N, C), _b2(w64, offs64, r[_R_DBP1], N, C), _b(ws, offs, r[_R_DGAMMA1]),
               _b(ws, offs, r[_R_DBETA1]), dx_skip)


@numba.njit(cache=True, nogil=True)
def _run_backward(prog, ws, offs, w64, offs64, params, state, groups, fast, input_grad):
    """Run a backward program (rows of :func:`build`) over the buffers of ``ws`` (and the float64 sums' of
    ``w64``); ``input_grad``: also the input's gradient (rows whose column 1 is 1 run only then)."""
    for i in range(prog.shape[0]):
        r = prog[i]
        op = r[0]
        if op == _ZERO:
            _b(ws, offs, r[1])[:] = 0
        elif op == _ZERO64:
            _b(w64, offs64, r[1])[:] = 0
        elif op == _PCOPY:
            _copy_param(params[r[1]], _b(ws, offs, r[2]))
        elif op == _PFLIP:  # conv._flipped: (F, C, KH, KW) -> (C, F, KH, KW), the kernel rotated 180 degrees
            F, C, KH, KW = r[2], r[3], r[4], r[5]
            w = params[r[1]].reshape((F, C, KH, KW))
            d = _b4(ws, offs, r[6], C, F, KH, KW)
            for c in range(C):
                for f in range(F):
                    for u in range(KH):
                        for v in range(KW):
                            d[c, f, u, v] = w[f, c, KH - 1 - u, KW - 1 - v]
        elif op == _PFLIPT:  # conv._pix_weights(w).T: (F, KH*KW*C), columns in (kh, kw, c) order
            F, C, KH, KW = r[2], r[3], r[4], r[5]
            w = params[r[1]].reshape((F, C, KH, KW))
            d = _b2(ws, offs, r[6], F, KH * KW * C)
            for f in range(F):
                for u in range(KH):
                    for v in range(KW):
                        for c in range(C):
                            d[f, (u * KW + v) * C + c] = w[f, c, u, v]
        elif op == _PT:  # (F, C) -> (C, F): the skip conv's flipped 1x1 weights
            F, C = r[2], r[3]
            w = params[r[1]].reshape((F, C))
            d = _b2(ws, offs, r[4], C, F)
            for c in range(C):
                for f in range(F):
                    d[c, f] = w[f, c]
        elif op == _PWINO:
            _take_transform(ws, offs, params, state, r)
        elif op == _B_RES:
            _res_backward(r, ws, offs, w64, offs64, groups, fast)
        elif r[1] != 0 and not input_grad:
            continue  # the input's gradient, not asked for
        elif op == _B_WINO_IN:  # winograd._wino_forward(dout, w, zeros(C), flip=True)
            N, F, H, W, C = r[2], r[3], r[4], r[5], r[6]
            _wino_conv(_b4(ws, offs, r[7], N, F, H, W), _planes(ws, offs, r[8], r[10] != 0), C, _b(ws, offs, r[9]),
                       r[10] != 0, r[11], r[12], r[13], r[14], _b4(ws, offs, r[15], N, C, H, W), 0, 1)
        elif op == _B_CONV_IN:  # conv._conv_forward_impl(dout, _flipped(w), zeros(C), 1, pad), wide rows
            N, F, H, W, C, K = r[2], r[3], r[4], r[5], r[6], r[7]
            _conv_fwd_kernel(_b4(ws, offs, r[8], N, F, H, W), _b2(ws, offs, r[9], C, K), _b(ws, offs, r[10]), 0,
                             r[11], r[12], 1, r[13], H, W, r[14], r[15], r[16], _b4(ws, offs, r[17], N, C, H, W), 0, 1)
        elif op == _B_PIX_IN:  # conv.conv2d_backward_input's col2im branch (the stride-2 Downsample)
            N, F, Ho, Wo, C, H, W, K = r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]
            _conv_pix_bwd_input_kernel(_b4(ws, offs, r[10], N, F, Ho, Wo), _b2(ws, offs, r[11], F, K), r[12], r[13],
                                       r[14], r[15], r[16], _b4(ws, offs, r[17], N, C, H, W), 0, 1)
        elif op == _B_WINO_W:  # winograd._wino_backward_weight
            N, F, H, W, C, P = r[2], r[3], r[4], r[5], r[6], r[7]
            d = _b4(ws, offs, r[8], N, F, H, W)
            dU = _b3(ws, offs, r[12], P, 16, F * C + _WINO_PAD)
            _wino_bwd_weight_kernel(d, _b4(ws, offs, r[9], N, C, H, W), r[10], r[11], r[13], dU, 0, 1)
            _wino_weight_grad_finish(d, dU, F * C, _b4(ws, offs, r[14], F, C, 3, 3), _b(ws, offs, r[15]))
        elif op == _B_CONV_W:  # conv.conv2d_backward_weight's wide-row branch, one part
            N, F, Ho, Wo, C, H, W, K = r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]
            dbp = _b2(w64, offs64, r[21], 1, F)
            _conv_bwd_weight_kernel(_b4(ws, offs, r[10], N, F, Ho, Wo), _b4(ws, offs, r[11], N, C, H, W), r[12],
                                    r[13], r[14], r[15], r[16], Ho, Wo, r[17], r[18], r[19],
                                    _b3(ws, offs, r[20], 1, F, K), dbp, 0, 1)
            db = _b(ws, offs, r[22])
            for f in range(F):
                db[f] = dbp[0, f]
        elif op == _B_PIX_W:  # conv.conv2d_backward_weight's pixel-major branch
            N, F, Ho, Wo, C, H, W, K, KH, KW, P = r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12]
            d = _b4(ws, offs, r[13], N, F, Ho, Wo)
            parts = _b3(ws, offs, r[17], P, K, F)
            _conv_pix_bwd_weight_kernel(d, _b4(ws, offs, r[14], N, C, H, W), KH, KW, r[15], r[16], r[18], parts,
                                        0, 1)
            dwt = _b2(ws, offs, r[19], K, F)
            _sum_rows(parts.reshape(P, K * F), K * F, dwt.reshape(K * F))
            _bias_grad(d, _b(ws, offs, r[21]))
            dw = _b4(ws, offs, r[20], F, C, KH, KW)
            for f in range(F):
                for c in range(C):
                    for u in range(KH):
                        for v in range(KW):
                            dw[f, c, u, v] = dwt[(u * KW + v) * C + c, f]
        elif op == _B_GN:  # groupnorm.group_norm_silu_backward
            N, C, H, W = r[2], r[3], r[4], r[5]
            dgp = _b2(w64, offs64, r[14], N, C)
            dbp = _b2(w64, offs64, r[15], N, C)
            _gn_bwd_kernel(_b4(ws, offs, r[6], N, C, H, W), _b4(ws, offs, r[7], N, C, H, W), _b(ws, offs, r[8]),
                           _b(ws, offs, r[9]), _b(ws, offs, r[10]), _b2(ws, offs, r[11], N, groups),
                           _b2(ws, offs, r[12], N, groups), groups, True, fast, _b4(ws, offs, r[13], N, C, H, W), dgp,
                           dbp, 0, 1)
            _sum_rows(dgp, C, _b(ws, offs, r[16]))
            _sum_rows(dbp, C, _b(ws, offs, r[17]))
        elif op == _B_SPLIT:  # layout.split_channels into two
            N, Ca, Cb, H, W = r[2], r[3], r[4], r[5], r[6]
            d = _b4(ws, offs, r[7], N, Ca + Cb, H, W)
            _take_channels(d, 0, _b4(ws, offs, r[8], N, Ca, H, W))
            _take_channels(d, Ca, _b4(ws, offs, r[9], N, Cb, H, W))
        elif op == _B_UP2:
            N, C, H, W = r[2], r[3], r[4], r[5]
            _up2_bwd(_b4(ws, offs, r[6], N, C, 2 * H, 2 * W), _b4(ws, offs, r[7], N, C, H, W))
        elif op == _B_ADD:  # elementwise.add_
            _add_kernel(_b(ws, offs, r[2]), _b(ws, offs, r[3]))


def _one_thread(units, flops) -> bool:
    return _threads._split_threads(units, flops) == 1


class _Builder:
    """Writes the backward rows of ``plan`` (a training :class:`.plan.Plan`, its forward built)."""

    def __init__(self, plan):
        self.p = plan
        self.dt = plan.dtype
        self.isz = plan.dtype.itemsize
        self.grad: dict[int, int] = {}  # slot -> the buffer of its gradient
        self.zeros: dict[int, int] = {}  # n -> a buffer of n zeros

    def row(self, *vals):
        self.p.brows.append([int(v) for v in vals])

    def empty(self, shape, grad_of=None) -> int:
        """A new buffer; ``grad_of``: the parameter whose gradient it is."""
        i = self.p._empty(shape)
        if grad_of is not None:
            self.p.grad_bufs[self.p.pindex[id(grad_of)]] = (i, tuple(grad_of.shape))
        return i

    def empty64(self, shape, zero=False) -> int:
        i = self.p._empty64(shape)
        if zero:
            self.row(_ZERO64, i)
        return i

    def zero(self, n) -> int:
        if n not in self.zeros:
            self.zeros[n] = self.p._empty((n,))
            self.row(_ZERO, self.zeros[n])
        return self.zeros[n]

    def copy(self, a) -> int:
        i = self.p._empty(a.shape)
        self.row(_PCOPY, self.p.pindex[id(a)], i)
        return i

    def flipped_filters(self, w, four) -> int:
        """The flipped Winograd transform of ``w`` (a _PWINO row: the worker may make it ahead)."""
        p = self.p
        F, C = w.shape[0], w.shape[1]
        shape = (36 if four else 16, C * F + _WINO_PAD)
        i = p._empty(shape)
        self.row(_PWINO, p.pindex[id(w)], F, C, four, i, p.ntransforms, p._empty(shape), 1)
        p.ntransforms += 1
        return i

    def give(self, slot, buf):
        """``buf`` is (a term of) the gradient of ``slot``."""
        if slot in self.grad:
            self.row(_B_ADD, 0, self.grad[slot], buf)
        else:
            self.grad[slot] = buf

    # ---- each op's backward ----

    def conv(self, src, dst, w, b, stride, padding) -> bool:
        p = self.p
        N, C, H, W = p.shapes[src]
        F, _, KH, KW = w.shape
        Ho, Wo = p.shapes[dst][2], p.shapes[dst][3]
        d = self.grad[dst]
        x = p.slot_buf[src]
        isz = self.isz
        # the input's gradient (conv.conv2d_backward_input); the network input's only when asked for
        dx = self.empty((N, C, H, W))
        first = int(src == 0)
        imode = _conv_mode(KH, KW, stride, padding, F)
        if imode == 3:
            four, th, tw, G, nb = _wino_plan(N, F, C, H, W, isz)
            if not _one_thread((N + G - 1) // G * nb, 32.0 * N * ((H + 1) // 2) * ((W + 1) // 2) * F * C):
                return False
            U = self.flipped_filters(w, four)
            self.row(_B_WINO_IN, first, N, F, H, W, C, d, U, self.zero(C), four, th, tw, G, nb, dx)
        elif imode == 0:  # (stride 1)
            Wr = W + padding
            K = F * KH * KW
            G = _chunk(Ho * Wr, N, K, isz)
            if not _one_thread((N + G - 1) // G, 2.0 * N * Ho * Wr * K * C):
                return False
            wf = self.empty((C, K))
            self.row(_PFLIP, p.pindex[id(w)], F, C, KH, KW, wf)
            self.row(_B_CONV_IN, first, N, F, H, W, C, K, d, wf, self.zero(C), KH, KW, padding, Wr, G,
                     _xp_len(0, H, W, padding), dx)
        elif imode == 2:
            K = C * KH * KW
            G = _chunk(Ho * Wo, N, max(F, K), isz)
            if not _one_thread((N + G - 1) // G, 2.0 * N * Ho * Wo * K * F):
                return False
            wt = self.empty((F, K))
            self.row(_PFLIPT, p.pindex[id(w)], F, C, KH, KW, wt)
            self.row(_B_PIX_IN, first, N, F, Ho, Wo, C, H, W, K, d, wt, KH, KW, stride, padding, G, dx)
        else:
            return False
        # the weight and bias gradients (conv.conv2d_backward_weight)
        dw, db = self.empty(w.shape, w), self.empty(b.shape, b)
        wmode = _conv_mode(KH, KW, stride, padding, C)
        if wmode == 3:
            th, tw = (H + 1) // 2, (W + 1) // 2
            G, _, P = _wino_geometry(N, C, F, th, tw, isz)
            if not _one_thread(P, 32.0 * N * th * tw * C * F):
                return False
            self.row(_B_WINO_W, 0, N, F, H, W, C, P, d, x, th, tw, self.empty((P, 16, F * C + _WINO_PAD)), G, dw, db)
        elif wmode == 0:  # (stride 1)
            Wr = W + padding
            K = C * KH * KW
            G = _chunk(Ho * Wr, N, K, isz)
            if _threads._parts((N + G - 1) // G) != 1 or not _one_thread(1, 2.0 * N * Ho * Wr * K * F):
                return False  # (several parts: summed by NumPy in the unplanned call)
            self.row(_B_CONV_W, 0, N, F, Ho, Wo, C, H, W, K, d, x, 0, KH, KW, stride, padding, Wr, G,
                     _xp_len(0, H, W, padding), dw, self.empty64((1, F), zero=True), db)
        elif wmode == 2:
            K = C * KH * KW
            G = _chunk(Ho * Wo, N, K, isz)
            P = _threads._parts((N + G - 1) // G)
            if not _one_thread(P, 2.0 * N * Ho * Wo * K * F):
                return False
            self.row(_B_PIX_W, 0, N, F, Ho, Wo, C, H, W, K, KH, KW, P, d, x, stride, padding, self.empty((P, K, F)),
                     G, self.empty((K, F)), dw, db)
        else:
            return False
        if src != 0:
            self.give(src, dx)
        else:
            self.p.dx_buf = dx
        return True

    def res(self, src, dst, gamma1, beta1, w1, b1, gamma2, beta2, w2, b2, skip_w, skip_b, ge1, be1, ge2, be2,
            acts) -> bool:
        p = self.p
        N, C, H, W = p.shapes[src]
        F = w1.shape[0]
        isz = self.isz
        th, tw = (H + 1) // 2, (W + 1) // 2
        G2, _, P2 = _wino_geometry(N, F, F, th, tw, isz)
        Gw1, _, P1 = _wino_geometry(N, C, F, th, tw, isz)
        four, fth, ftw, Gi2, nbi2 = _wino_plan(N, F, F, H, W, isz)
        _, _, _, Gi1, nbi1 = _wino_plan(N, F, C, H, W, isz)
        h0, m1, r1, h1, h2, m2, r2 = acts
        c = dict(dout=self.grad[dst], x=p.slot_buf[src], h1=h1, h2=h2, m2=m2, r2=r2, ge2=ge2, be2=be2, h0=h0,
                 m1=m1, r1=r1, ge1=ge1, be1=be1, four=four, fth=fth, ftw=ftw, Gi2=Gi2, nbi2=nbi2, th=th, tw=tw,
                 Gw2=G2, Gi1=Gi1, nbi1=nbi1, Gw1=Gw1, N=N, C=C, H=H, W=W, F=F, P2=P2, P1=P1)
        c["gam2"], c["gam1"] = self.copy(gamma2), self.copy(gamma1)
        c["zF"], c["zC"] = self.zero(F), self.zero(C)
        if skip_w is not None:
            Ps = _threads._parts(N)
            c["wst"] = self.empty((C, F))
            self.row(_PT, p.pindex[id(skip_w)], F, C, c["wst"])
            c.update(skip=1, Ps=Ps, sC=C, sF=F, dws_parts=self.empty((Ps, F, C)),
                     dbs_parts=self.empty64((Ps, F), zero=True), dws=self.empty(skip_w.shape, skip_w),
                     dbs=self.empty(skip_b.shape, skip_b), dx_skip=self.empty((N, C, H, W)))
        else:
            c.update(skip=0, Ps=1, sC=0, sF=0, wst=self.empty((0,)), dws_parts=self.empty((0,)),
                     dbs_parts=self.empty64((0,)), dws=self.empty((0,)), dbs=self.empty((0,)), dx_skip=c["dout"])
        c["Ub2f"] = self.flipped_filters(w2, four)
        c.update(dU2=self.empty((P2, 16, F * F + _WINO_PAD)), dw2=self.empty(w2.shape, w2),
                 db2=self.empty(b2.shape, b2), dh=self.empty((N, F, H, W)), dh_gn=self.empty((N, F, H, W)),
                 dgp2=self.empty64((N, F)),
                 dbp2=self.empty64((N, F)), dgamma2=self.empty(gamma2.shape, gamma2),
                 dbeta2=self.empty(beta2.shape, beta2), dtp=self.empty((N, F)))
        c["Ub1f"] = self.flipped_filters(w1, four)
        c.update(dU1=self.empty((P1, 16, F * C + _WINO_PAD)), dw1=self.empty(w1.shape, w1),
                 db1=self.empty(b1.shape, b1), dh1=self.empty((N, C, H, W)), dx=self.empty((N, C, H, W)),
                 dgp1=self.empty64((N, C)),
                 dbp1=self.empty64((N, C)), dgamma1=self.empty(gamma1.shape, gamma1),
                 dbeta1=self.empty(beta1.shape, beta1))
        self.row(_B_RES, *(c[n] for n in _RES_COLS))
        p.dtps.append((c["dtp"], (N, F)))
        self.give(src, c["dx"])
        return True

    def gn_silu(self, src, dst, gamma, beta, ge, be, stats) -> bool:
        p = self.p
        N, C, H, W = p.shapes[src]
        if _gn_threads(N * C * H * W) > 1:
            return False
        dx = self.empty((N, C, H, W))
        self.row(_B_GN, 0, N, C, H, W, self.grad[dst], p.slot_buf[src], self.copy(gamma), ge, be, stats[0], stats[1],
                 dx, self.empty64((N, C)), self.empty64((N, C)), self.empty(gamma.shape, gamma),
                 self.empty(beta.shape, beta))
        self.give(src, dx)
        return True

    def concat(self, dst, a, b) -> bool:
        p = self.p
        N, Ca, H, W = p.shapes[a]
        Cb = p.shapes[b][1]
        da, db = self.empty((N, Ca, H, W)), self.empty((N, Cb, H, W))
        self.row(_B_SPLIT, 0, N, Ca, Cb, H, W, self.grad[dst], da, db)
        self.give(a, da)
        self.give(b, db)
        return True

    def upsample(self, src, dst) -> bool:
        N, C, H, W = self.p.shapes[src]
        dx = self.empty((N, C, H, W))
        self.row(_B_UP2, 0, N, C, H, W, self.grad[dst], dx)
        self.give(src, dx)
        return True


def build(plan) -> bool:
    """Write the backward program of the training ``plan`` (its ``brows``, ``grad_bufs``, ``dtps``, ``dout_buf``,
    ``dx_buf``); False where some op has no planned backward (the unplanned backward then runs)."""
    b = _Builder(plan)
    plan.dout_buf = b.grad[plan.out_slot] = plan._empty(plan.shapes[plan.out_slot])
    for kind, info in reversed(plan.info):
        if not getattr(b, kind)(**info):
            return False
    return plan.dx_buf is not None
