"""A small U-Net pass as one compiled call (the optional hook ``plan_forward``).

At batch 1-7 every kernel of a U-Net pass runs on one thread, and the Python between the ~20 kernel calls
(argument checks, the Winograd plans, the derived-weight lookups, allocations, numba's dispatch of 10-30
arguments) took ~40 % of the pass (8x8, batch 1: ~0.2 of 0.55 ms, measured 2026-12-01). So the pass is
written down once as a program (one row of ints per op) over flat buffers (the weights as the kernels want
them, the activations: slices of one workspace), and :func:`_run_plan` walks it in one ``nogil`` call.

- An inference plan (a frozen model's, :meth:`difnumpy.nn.unet.UNet.frozen`: the weights do not change)
  derives the weights once, when it is made, and keeps one workspace.
- A training plan reads the weights at every pass (an optimizer changes them between the steps): its first
  rows copy what the ops take from the parameters, and each Winograd filter transform is made right before
  its first use, unless a pool worker, started with the pass, made it already (:func:`._plan_util.
  _make_transforms`: at batch 1 the transforms are ~20 % of a step, and the other thread is idle). Each pass
  gets a new workspace, which its cache keeps; the backward program (:mod:`.plan_backward`) reads it.

The programs run the very kernels the unplanned passes run, on the same arguments, in the same order: the
same bits (tested against the unplanned passes). A pass is planned only if none of its kernels would be
split over the threads (:data:`._threads.SPLIT_MIN_FLOPS`) and every ResBlock would take the fused path.
"""
from __future__ import annotations

import math
import sys
import threading

import numba
import numpy as np
from numba import types
from numba.typed import List

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu import conv as _conv
from difnumpy.kernels.cpu import plan_backward
from difnumpy.kernels.cpu import winograd as _wino
from difnumpy.kernels.cpu._plan_util import (_ALIGN, _COLS, _PWINO, _b, _b2, _b4, _copy_param, _make_transforms,
                                             _planes, _take_transform)
from difnumpy.kernels.cpu.conv import _chunk, _conv_fwd_kernel, _conv_pix_fwd_kernel, _pix_weights, _xp_len
from difnumpy.kernels.cpu.groupnorm import _gn_fwd_kernel, _gn_threads, _repeated
from difnumpy.kernels.cpu.layout import _copy_channels, _up2_fwd
from difnumpy.kernels.cpu.resblock import _fused, _resblock_fwd_kernel
from difnumpy.kernels.cpu.winograd import _WINO_PAD, _wino_conv, _wino_plan

# op codes (column 0 of a program row); the columns of each are written by Plan's builders below
_RES, _WINO, _CONV, _PIX, _GN_SILU, _CONCAT, _UP2 = 1, 2, 3, 4, 5, 6, 7
# a training plan's rows that derive what the ops take from the parameters, again at every pass (the
# transforms, _PWINO, right before their first use; also made ahead by a pool worker: _make_transforms)
_PCOPY, _PREP, _PPIX = 8, 9, 11  # (_PWINO = 10: _plan_util)
@numba.njit(cache=True, nogil=True)
def _run_plan(prog, ws, offs, params, state, groups, eps, fast):
    """Run the program ``prog`` (ops x _COLS int64) over the buffers ``ws[offs[i, 0]:offs[i, 1]]``: each op
    is the call the unplanned pass makes (see the builders of :class:`Plan` for the columns). ``params``: the
    parameters, flat (a training plan's; its rows derive the ops' weights from them); ``state``: its
    transforms' (:func:`_make_transforms` may make them meanwhile: one done is used, any other is made
    here, into the row's second buffer, which ``offs`` then names instead)."""
    for i in range(prog.shape[0]):
        r = prog[i]
        op = r[0]
        if op == _PCOPY:  # a parameter as it is (a bias, a weight reshaped)
            _copy_param(params[r[1]], _b(ws, offs, r[2]))
        elif op == _PREP:  # groupnorm._repeated: each entry repeated H*W times
            src = params[r[1]]
            HW = r[2]
            dst = _b(ws, offs, r[3])
            for c in range(src.size):
                for j in range(HW):
                    dst[c * HW + j] = src[c]
        elif op == _PWINO:
            _take_transform(ws, offs, params, state, r)
        elif op == _PPIX:  # conv._pix_weights: (F, C, KH, KW) -> (KH*KW*C, F), rows in (kh, kw, c) order
            F, C, KH, KW = r[2], r[3], r[4], r[5]
            w = params[r[1]].reshape((F, C, KH, KW))
            dst = _b2(ws, offs, r[6], KH * KW * C, F)
            for kh in range(KH):
                for kw in range(KW):
                    for c in range(C):
                        for f in range(F):
                            dst[(kh * KW + kw) * C + c, f] = w[f, c, kh, kw]
        elif op == _RES:
            N, C, H, W, F, G = r[2], r[3], r[4], r[5], r[6], groups
            skip = r[19] != 0
            sw = _b2(ws, offs, r[17], F, C) if skip else _b2(ws, offs, r[17], 0, 0)
            four = r[20] != 0
            _resblock_fwd_kernel(_b4(ws, offs, r[1], N, C, H, W), _b(ws, offs, r[7]), _b(ws, offs, r[8]),
                                 _planes(ws, offs, r[9], four), _b(ws, offs, r[10]), _b2(ws, offs, r[11], N, F),
                                 _b(ws, offs, r[12]), _b(ws, offs, r[13]), _planes(ws, offs, r[15], four),
                                 _b(ws, offs, r[16]), sw, _b(ws, offs, r[18]), skip, groups, eps, fast, four,
                                 r[21], r[22], r[23], r[24], r[25], r[26],
                                 _b4(ws, offs, r[27], N, C, H, W), _b2(ws, offs, r[28], N, G),
                                 _b2(ws, offs, r[29], N, G), _b4(ws, offs, r[30], N, F, H, W),
                                 _b4(ws, offs, r[31], N, F, H, W), _b2(ws, offs, r[32], N, G),
                                 _b2(ws, offs, r[33], N, G), _b4(ws, offs, r[14], N, F, H, W))
        elif op == _WINO:
            N, C, H, W, F = r[2], r[3], r[4], r[5], r[6]
            _wino_conv(_b4(ws, offs, r[1], N, C, H, W), _planes(ws, offs, r[7], r[9] != 0), F, _b(ws, offs, r[8]),
                       r[9] != 0, r[10], r[11], r[12], r[13], _b4(ws, offs, r[14], N, F, H, W), 0, 1)
        elif op == _CONV:  # im2col, wide rows (mode 0)
            N, C, H, W, F, Ho, Wo = r[2], r[3], r[4], r[5], r[6], r[15], r[16]
            _conv_fwd_kernel(_b4(ws, offs, r[1], N, C, H, W), _b2(ws, offs, r[7], F, r[17]), _b(ws, offs, r[8]),
                             r[9], r[10], r[11], r[12], r[13], Ho, Wo, r[14], r[18], r[19],
                             _b4(ws, offs, r[20], N, F, Ho, Wo), 0, 1)
        elif op == _PIX:  # im2col, pixel-major (mode 2: the stride-2 Downsample)
            N, C, H, W, F, Ho, Wo = r[2], r[3], r[4], r[5], r[6], r[14], r[15]
            _conv_pix_fwd_kernel(_b4(ws, offs, r[1], N, C, H, W), _b2(ws, offs, r[7], r[17], F), _b(ws, offs, r[8]),
                                 r[9], r[10], r[11], r[12], Ho, Wo, r[13], _b4(ws, offs, r[16], N, F, Ho, Wo), 0, 1)
        elif op == _GN_SILU:
            N, C, H, W = r[2], r[3], r[4], r[5]
            _gn_fwd_kernel(_b4(ws, offs, r[1], N, C, H, W), _b(ws, offs, r[6]), _b(ws, offs, r[7]), groups, eps,
                           True, fast, _b4(ws, offs, r[8], N, C, H, W), _b2(ws, offs, r[9], N, groups),
                           _b2(ws, offs, r[10], N, groups), 0, 1)
        elif op == _CONCAT:
            N, Ca, Cb, H, W = r[3], r[4], r[5], r[6], r[7]
            out = _b4(ws, offs, r[8], N, Ca + Cb, H, W)
            _copy_channels(_b4(ws, offs, r[1], N, Ca, H, W), out, 0)
            _copy_channels(_b4(ws, offs, r[2], N, Cb, H, W), out, Ca)
        elif op == _UP2:
            N, C, H, W = r[2], r[3], r[4], r[5]
            _up2_fwd(_b4(ws, offs, r[1], N, C, H, W), _b4(ws, offs, r[6], N, C, 2 * H, 2 * W))


#: a training plan's workspace must be smaller (bytes): it holds every buffer of the pass and its backward at
#: once, and the plan keeps up to _WORKSPACES of them. Larger plans gained little: 2 threads, planned /
#: unplanned step, workspaces reused: 8x8 batch 128 (two shares of 64, 51 MB each) 36.2 / 37.0 ms, 28x28
#: batch 16 (shares of 8, 71 MB) 53.5 / 53.8 ms; while the smaller ones: 8x8 batch 16 (shares of 8, 21 MB)
#: 8.0 / 11.3 ms, batch 1 (18 MB) 3.5 / 4.3 ms. (A new workspace at every pass, above malloc's 32 MiB mmap
#: threshold, made those two larger plans slower: 36.6 / 33.3 and 54.1 / 48.4 ms, its pages faulted in anew.)
MAX_TRAIN_WORKSPACE = 32 << 20
_WORKSPACES = 4  # a training plan keeps at most this many workspaces (a step's and the next one's, two shares)

_NO_PARAMS = {}  # dtype -> an empty typed List (an inference plan's ``params``)
_NO_STATE = np.zeros(0, np.int64)  # (an inference plan has no transforms to make)


def _param_list(params, dtype):
    """The parameters as a typed List of flat views (in-place updates are seen), or an empty one."""
    lst = _NO_PARAMS.get(dtype) if params is None else None
    if lst is None:
        lst = List.empty_list(types.Array(numba.from_dtype(dtype), 1, "C"))
        for a in params or ():
            lst.append(a.reshape(-1))
        if params is None:
            _NO_PARAMS[dtype] = lst
    return lst


def _program(rows):
    """Rows of ints as a program: (rows, _COLS) int64, zero-padded."""
    prog = np.zeros((len(rows), _COLS), np.int64)
    for i, r in enumerate(rows):
        prog[i, :len(r)] = r
    return prog


class Plan:
    """A U-Net pass over ``x_shape`` as one compiled call (see the module docstring).

    ``plan(x, tps) -> out``: ``x`` (N, C, H, W) of the plan's dtype, ``tps`` the ResBlocks' time-embedding
    projections (N, F) in the order the ops list them; ``out`` a new array.

    An inference plan (``params=None``) takes the weights once, when it is made (a frozen model's); it is
    not re-entrant: a call that finds it busy (another thread's pass) returns None, and the caller runs the
    unplanned pass. A training plan (``params``: the parameter arrays, writeable, C-contiguous) derives what
    its ops take from them at every call (they change between the steps) and also returns what each op
    wrote and the call's workspace (``(out, views, ws)``, ``views[i]`` the arrays of op i: see
    :meth:`__call__`), one no earlier caller refers to any more, so that :meth:`backward` can read them.
    """

    def __init__(self, x_shape, dtype, groups: int, eps: float, params=None):
        self.dtype = np.dtype(dtype)
        self.groups, self.eps = int(groups), float(eps)
        self.train = params is not None
        self.pindex = {id(a): i for i, a in enumerate(params)} if self.train else None
        self.params = _param_list(params, self.dtype)
        self.pieces: list = []  # per buffer: a flat array to copy in, a size, or a transform to make (_filters)
        self.pre_rows: list[list[int]] = []  # a training plan's: the weights copied from the parameters
        self.ntransforms = 0  # a training plan's _PWINO rows
        self.rows: list[list[int]] = []
        self.views: list[tuple] = []  # per op: ((buffer index, shape), ...) it writes
        self.info: list[tuple] = []  # per op: (kind, what its backward needs), for plan_backward
        self.shapes: dict[int, tuple] = {}  # slot -> activation shape
        self.slot_buf: dict[int, int] = {}  # slot -> buffer index
        self.tps: list[tuple[int, tuple]] = []  # (buffer index, shape) per ResBlock, in op order
        self._lock = threading.Lock()
        self._pool: list = []  # a training plan's workspaces (_free_workspace)
        self.x_shape = tuple(int(s) for s in x_shape)
        self.shapes[0] = self.x_shape
        self.slot_buf[0] = self._empty(self.x_shape)
        self.out_slot = 0
        self.prog = None

    def _buf(self, a) -> int:
        """A new buffer holding a copy of ``a`` (flattened, C order); its index."""
        self.pieces.append(np.asarray(a).reshape(-1))
        return len(self.pieces) - 1

    def _empty(self, shape) -> int:
        self.pieces.append(math.prod(shape))
        return len(self.pieces) - 1

    def _wcopy(self, a) -> int:
        """A buffer holding the parameter ``a`` flat (a training plan copies it at every call)."""
        if not self.train:
            return self._buf(a)
        i = self._empty(a.shape)
        self._row(_PCOPY, self.pindex[id(a)], i, pre=True)
        return i

    def _wrepeat(self, gamma, beta, HW):
        """Buffers of ``gamma`` and ``beta`` each repeated ``HW`` times (:func:`groupnorm._repeated`)."""
        if not self.train:
            ge, be = _repeated(gamma, beta, HW, self.dtype)
            return self._buf(ge), self._buf(be)
        out = []
        for a in (gamma, beta):
            out.append(self._empty((a.size * HW,)))
            self._row(_PREP, self.pindex[id(a)], HW, out[-1], pre=True)
        return tuple(out)

    def _wpix(self, w) -> int:
        """A buffer of :func:`conv._pix_weights` of ``w``."""
        if not self.train:
            return self._buf(_pix_weights(w))
        F, C, KH, KW = w.shape
        i = self._empty((KH * KW * C, F))
        self._row(_PPIX, self.pindex[id(w)], F, C, KH, KW, i, pre=True)
        return i

    def _filters(self, w, four) -> int:
        """A new buffer for the Winograd transform of ``w``: an inference plan's :meth:`finish` makes it there
        (the store of derived weights then keeps that buffer), or copies it from the store where an earlier
        pass made it (a pass's transforms are megabytes: copying them all cost more than the plan saves on a
        short sampling run); a training plan makes it at every call."""
        F, C = w.shape[0], w.shape[1]
        shape = (36 if four else 16, C * F + _WINO_PAD)
        if not self.train:
            self.pieces.append((w, bool(four), shape))
            return len(self.pieces) - 1
        i = self._empty(shape)
        self._row(_PWINO, self.pindex[id(w)], F, C, four, i, self.ntransforms, self._empty(shape), 0)
        self.ntransforms += 1
        return i

    def _out(self, slot: int, shape, *more) -> int:
        """The buffer of the op's output ``slot``; ``more``: (buffer, shape) of the other arrays it keeps."""
        self.shapes[slot] = tuple(int(s) for s in shape)
        self.slot_buf[slot] = b = self._empty(shape)
        self.out_slot = slot
        self.views.append(((b, self.shapes[slot]),) + more)
        return b

    def _row(self, *vals, pre=False):
        """A program row (``pre``: among a training plan's first rows, which copy from the parameters)."""
        (self.pre_rows if pre else self.rows).append([int(v) for v in vals])

    # ---- the ops (each mirrors the unplanned call's argument preparation) ----

    def conv(self, dst, src, w, b, stride, padding) -> bool:
        N, C, H, W = self.shapes[src]
        F, _, KH, KW = w.shape
        stride, padding = int(stride), int(padding)
        Ho = (H + 2 * padding - KH) // stride + 1
        Wo = (W + 2 * padding - KW) // stride + 1
        mode = _conv._conv_mode(KH, KW, stride, padding, C)
        itemsize = self.dtype.itemsize
        xb = self.slot_buf[src]
        self.info.append(("conv", dict(src=src, dst=dst, w=w, b=b, stride=stride, padding=padding)))
        if mode == 3:  # as winograd._wino_forward
            if _threads._split_threads(N, 32.0 * N * ((H + 1) // 2) * ((W + 1) // 2) * C * F) > 1:
                return False
            four, th, tw, G, nb = _wino_plan(N, C, F, H, W, itemsize)
            U = self._filters(w, four)
            bb = self._wcopy(b)
            ob = self._out(dst, (N, F, H, W))
            self._row(_WINO, xb, N, C, H, W, F, U, bb, four, th, tw, G, nb, ob)
            return True
        if mode == 0:  # as conv._conv_forward_impl's last branch
            Wr = W + padding
            K = C * KH * KW
            G = _chunk(Ho * Wr, N, K, itemsize)
            if _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wr * K * F) > 1:
                return False
            wb = self._wcopy(w)  # (F, C*KH*KW): w's own layout
            bb = self._wcopy(b)
            ob = self._out(dst, (N, F, Ho, Wo))
            self._row(_CONV, xb, N, C, H, W, F, wb, bb, mode, KH, KW, stride, padding, Wr, Ho, Wo, K, G,
                      _xp_len(mode, H, W, padding), ob)
            return True
        if mode == 2:
            K = C * KH * KW
            G = _chunk(Ho * Wo, N, K, itemsize)
            if _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wo * K * F) > 1:
                return False
            wb = self._wpix(w)
            bb = self._wcopy(b)
            ob = self._out(dst, (N, F, Ho, Wo))
            self._row(_PIX, xb, N, C, H, W, F, wb, bb, KH, KW, stride, padding, G, Ho, Wo, ob, K)
            return True
        return False  # (1x1 convs: only inside ResBlocks in the U-Net)

    def res(self, dst, src, gamma1, beta1, w1, b1, gamma2, beta2, w2, b2, skip_w, skip_b) -> bool:
        N, C, H, W = self.shapes[src]
        F = w1.shape[0]
        if not _fused(N, C, F, H, W):
            return False
        dt, g = self.dtype, self.groups
        four, th, tw, G1, nb1 = _wino_plan(N, C, F, H, W, dt.itemsize)
        _, _, _, G2, nb2 = _wino_plan(N, F, F, H, W, dt.itemsize)
        skip = skip_w is not None
        ids = [*self._wrepeat(gamma1, beta1, H * W), self._filters(w1, four), self._wcopy(b1)]
        tp = self._empty((N, F))
        self.tps.append((tp, (N, F)))
        ids += [tp, *self._wrepeat(gamma2, beta2, H * W)]
        shapes = [(N, C, H, W), (N, g), (N, g), (N, F, H, W), (N, F, H, W), (N, g), (N, g)]
        acts = [self._empty(sh) for sh in shapes]  # h0, mean1, rstd1, h1, h2, mean2, rstd2
        out = self._out(dst, (N, F, H, W), *zip(acts, shapes))
        ids += [out, self._filters(w2, four), self._wcopy(b2),
                self._wcopy(skip_w) if skip else self._buf(np.zeros(0, dt)),  # (F, C): skip_w's own layout
                self._wcopy(skip_b) if skip else self._buf(np.zeros(0, dt))]
        self._row(_RES, self.slot_buf[src], N, C, H, W, F, *ids, skip, four, th, tw, G1, nb1, G2, nb2, *acts)
        self.info.append(("res", dict(src=src, dst=dst, gamma1=gamma1, beta1=beta1, w1=w1, b1=b1, gamma2=gamma2,
                                      beta2=beta2, w2=w2, b2=b2, skip_w=skip_w, skip_b=skip_b, ge1=ids[0],
                                      be1=ids[1], ge2=ids[5], be2=ids[6], acts=acts)))
        return True

    def gn_silu(self, dst, src, gamma, beta) -> bool:
        N, C, H, W = self.shapes[src]
        if _gn_threads(N * C * H * W) > 1:
            return False
        gb, bb = self._wrepeat(gamma, beta, H * W)
        stats = [self._empty((N, self.groups)), self._empty((N, self.groups))]
        ob = self._out(dst, (N, C, H, W), *((i, (N, self.groups)) for i in stats))
        self._row(_GN_SILU, self.slot_buf[src], N, C, H, W, gb, bb, ob, *stats)
        self.info.append(("gn_silu", dict(src=src, dst=dst, gamma=gamma, beta=beta, ge=gb, be=bb, stats=stats)))
        return True

    def concat(self, dst, a, b) -> bool:
        N, Ca, H, W = self.shapes[a]
        Cb = self.shapes[b][1]
        ob = self._out(dst, (N, Ca + Cb, H, W))
        self._row(_CONCAT, self.slot_buf[a], self.slot_buf[b], N, Ca, Cb, H, W, ob)
        self.info.append(("concat", dict(dst=dst, a=a, b=b)))
        return True

    def upsample(self, dst, src) -> bool:
        N, C, H, W = self.shapes[src]
        ob = self._out(dst, (N, C, 2 * H, 2 * W))
        self._row(_UP2, self.slot_buf[src], N, C, H, W, ob)
        self.info.append(("upsample", dict(src=src, dst=dst)))
        return True

    def _empty64(self, shape) -> int:
        """A new float64 buffer (a training plan's backward sums), in the second workspace."""
        self.pieces64.append(math.prod(shape))
        return len(self.pieces64) - 1

    @staticmethod
    def _layout(sizes):
        """``(offs, total)``: buffer i at ``offs[i, 0]:offs[i, 1]``, each starting at a multiple of _ALIGN."""
        starts = np.cumsum([0] + [-(-n // _ALIGN) * _ALIGN for n in sizes])
        offs = np.empty((len(sizes), 2), np.int64)
        offs[:, 0] = starts[:-1]
        offs[:, 1] = starts[:-1] + np.array(sizes, np.int64)
        return offs, int(starts[-1])

    def finish(self) -> "Plan":
        self.prog = _program(self.pre_rows + self.rows)
        if self.train:  # the backward program's buffers go into the same workspace (after the forward's)
            self.brows, self.grad_bufs, self.dtps, self.dx_buf, self.pieces64 = [], {}, [], None, []
            self.bprog = None
            if plan_backward.build(self):
                self.bprog = _program(self.brows)
                self.offs64, self.size64 = self._layout(self.pieces64)
        sizes = [p if isinstance(p, int) else math.prod(p[2]) if isinstance(p, tuple) else p.size
                 for p in self.pieces]
        self.offs, self.size = self._layout(sizes)  # buffer i: ws[offs[i, 0]:offs[i, 1]]
        if not self.train:
            self.ws = self._workspace()
            self._x, self._tp_views, self._out_view, _ = self._views(self.ws, False)
        self.pieces = None
        return self

    def _workspace(self):
        """A workspace (activations: written before they are read) with the plan's constant buffers in it."""
        ws = np.empty(self.size, self.dtype)
        for i, p in enumerate(self.pieces):
            if isinstance(p, tuple):  # the pass's (or scope's) transform: made into the buffer, or copied there
                w, four, shape = p
                U = ws[self.offs[i, 0]:self.offs[i, 1]].reshape(shape)
                got = _threads.derived(("wino", four, False), w, lambda: _wino._wino_transform(w, False, four, U))
                if got is not U:
                    U[...] = got
            elif not isinstance(p, int):
                ws[self.offs[i, 0]:self.offs[i, 1]] = p
        return ws

    def _views(self, ws, all_ops: bool):
        offs = self.offs
        view = lambda i, shape: ws[offs[i, 0]:offs[i, 1]].reshape(shape)  # noqa: E731
        ops = [tuple(view(i, sh) for i, sh in v) for v in self.views] if all_ops else None
        return (view(self.slot_buf[0], self.x_shape), [view(i, shape) for i, shape in self.tps],
                view(self.slot_buf[self.out_slot], self.shapes[self.out_slot]), ops)

    def __call__(self, x, tps):
        """Run the pass: ``out`` (inference plan; None if busy), or ``(out, views, ws)`` (training plan) with
        ``views[i]`` the arrays op i wrote: its output first; a ResBlock's then ``h0, mean1, rstd1, h1, h2,
        mean2, rstd2`` (as ``resblock_forward(..., keep=True)``), a GroupNorm+SiLU's ``mean, rstd``; ``ws``
        the workspace they are views of (for :meth:`backward`)."""
        if self.train:
            ws = self._free_workspace()
            xv, tpv, out, views = self._views(ws, True)
            xv[...] = x
            for view, tp in zip(tpv, tps):
                view[...] = tp
            state = np.zeros(self.ntransforms, np.int64)
            if self.ntransforms and _threads.prefetching():  # the idle thread makes the transforms ahead
                _threads._pool(1).submit(_make_transforms, self.prog, ws, self.offs, self.params, state)
            _run_plan(self.prog, ws, self.offs.copy(), self.params, state, self.groups, self.eps,
                      self.dtype == np.float32)
            return out, views, ws
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self._x[...] = x
            for view, tp in zip(self._tp_views, tps):
                view[...] = tp
            _run_plan(self.prog, self.ws, self.offs, self.params, _NO_STATE, self.groups, self.eps,
                      self.dtype == np.float32)
            return self._out_view.copy()
        finally:
            self._lock.release()


    def _free_workspace(self):
        """A workspace for a training pass: one of an earlier pass that nothing refers to any more (its cache,
        outputs and gradients all gone: only this plan's list holds it), else a new one (kept, up to
        :data:`_WORKSPACES`). Reusing them spares a step malloc's work and, above its mmap threshold, the
        page faults of a new mapping (tens of MB a step at 28x28). Its buffers are all written before they
        are read at every call."""
        with self._lock:
            for ws in self._pool:
                if sys.getrefcount(ws) <= 3:  # the list, the loop variable, getrefcount's argument
                    return ws
            ws = np.empty(self.size, self.dtype)
            if len(self._pool) < _WORKSPACES:
                self._pool.append(ws)
            return ws

    def backward(self, ws, dout, input_grad: bool):
        """A training plan's backward pass over the workspace ``ws`` of its forward call: ``(grads, dtps, dx)``,
        ``grads`` {parameter index: gradient} of the parameters the ops read, ``dtps`` the ResBlocks'
        time-embedding projections' gradients (N, F) in the backward's order (the last ResBlock's first),
        ``dx`` the input's gradient or None; all views of ``ws``. None where the backward is not planned."""
        if self.bprog is None:
            return None
        view = lambda i, shape: ws[self.offs[i, 0]:self.offs[i, 1]].reshape(shape)  # noqa: E731
        view(self.dout_buf, self.shapes[self.out_slot])[...] = dout
        w64 = np.empty(self.size64, np.float64)
        state = np.zeros(self.ntransforms, np.int64)
        if self.ntransforms and _threads.prefetching():  # the flipped transforms, ahead on the idle thread
            _threads._pool(1).submit(_make_transforms, self.bprog, ws, self.offs, self.params, state)
        plan_backward._run_backward(self.bprog, ws, self.offs.copy(), w64, self.offs64, self.params, state,
                                    self.groups, self.dtype == np.float32, bool(input_grad))
        return ({j: view(i, shape) for j, (i, shape) in self.grad_bufs.items()},
                [view(i, shape) for i, shape in self.dtps],
                view(self.dx_buf, self.x_shape) if input_grad else None)


def plan_forward(ops, x_shape, dtype, groups: int, eps: float, params=None):
    """The optional hook: a :class:`Plan` of the pass ``ops`` over ``x_shape``, or None.

    Parameters
    ----------
    ops : list of tuples ``(kind, dst, inputs..., weights...)`` in order (slots are ints: slot 0 holds the input
        ``x``, each op writes a new slot ``dst``; the last op's is the output):
        ``("conv", dst, src, w, b, stride, padding)``, ``("res", dst, src, gamma1, beta1, w1, b1, gamma2, beta2,
        w2, b2, skip_w | None, skip_b | None)`` (its time-embedding projection is the plan's argument),
        ``("gn_silu", dst, src, gamma, beta)``, ``("concat", dst, a, b)``, ``("upsample", dst, src)``;
        the weights are the parameters (C-contiguous, ``dtype``), read once here: call only in a frozen scope
        (they must not change while the plan is used), inside the pass's ``step_scope``
    x_shape : (N, C, H, W); dtype : float32 or float64; groups, eps : the GroupNorms'
    params : None (an inference plan: the weights are read once, here) or the model's parameter arrays (a
        training plan: the weights are read at every call; each weight of ``ops`` must be one of them, all
        writeable C-contiguous arrays of ``dtype``)

    Returns None where some kernel of the pass would run on more than one thread (or an op has no planned
    form): the unplanned pass is then the faster (or only) one.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        return None
    if params is not None:
        params = list(params)
        if not all(isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
                   for a in params):
            return None
    plan = Plan(x_shape, dtype, groups, eps, params)
    builders = {"conv": plan.conv, "res": plan.res, "gn_silu": plan.gn_silu, "concat": plan.concat,
                "upsample": plan.upsample}
    for op in ops:
        build = builders.get(op[0])
        if build is None or not build(*op[1:]):
            return None
    plan.finish()
    if plan.train and plan.size * dtype.itemsize >= MAX_TRAIN_WORKSPACE:
        return None
    return plan
