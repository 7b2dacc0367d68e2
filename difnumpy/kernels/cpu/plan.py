"""A frozen model's small inference pass as one compiled call (the optional hook ``plan_forward``).

At batch 1-7 every kernel of a U-Net pass runs on one thread, and the Python between the ~20 kernel calls
(argument checks, the Winograd plans, the derived-weight lookups, allocations, numba's dispatch of 10-30
arguments) took ~40 % of the pass (8x8, batch 1: ~0.2 of 0.55 ms, measured 2026-12-01). Inside a frozen
scope (:meth:`difnumpy.nn.unet.UNet.frozen`) the weights do not change, so that Python can run once: the
pass is written down as a program (one row of ints per op) over flat buffers (the weights as the kernels
want them, the activations: slices of one array), and :func:`_run_plan` walks it in one ``nogil`` call.

The program runs the very kernels the unplanned pass runs, on the same arguments, in the same order:
the same bits (tested against the unplanned pass). A pass is planned only if none of its kernels would be
split over the threads (:data:`._threads.SPLIT_MIN_FLOPS`) and every ResBlock would take the fused path.
"""
from __future__ import annotations

import math
import threading

import numba
import numpy as np

from difnumpy.kernels.cpu import _threads
from difnumpy.kernels.cpu import conv as _conv
from difnumpy.kernels.cpu.conv import _chunk, _conv_fwd_kernel, _conv_pix_fwd_kernel, _pix_weights, _xp_len
from difnumpy.kernels.cpu.groupnorm import _gn_fwd_kernel, _gn_threads, _repeated
from difnumpy.kernels.cpu.layout import _copy_channels, _up2_fwd
from difnumpy.kernels.cpu.resblock import _fused, _resblock_fwd_kernel
from difnumpy.kernels.cpu import winograd as _wino
from difnumpy.kernels.cpu.winograd import _WINO_PAD, _wino_conv, _wino_plan

# op codes (column 0 of a program row); the columns of each are written by Plan's builders below
_RES, _WINO, _CONV, _PIX, _GN_SILU, _CONCAT, _UP2 = 1, 2, 3, 4, 5, 6, 7
_COLS = 36
_ALIGN = 16  # buffers start at multiples of 16 elements (64 bytes in float32)


@numba.njit(cache=True, nogil=True, inline="always")
def _b(ws, offs, i):
    """Buffer ``i``: ``ws[offs[i, 0]:offs[i, 1]]`` (1-D)."""
    return ws[offs[i, 0]:offs[i, 1]]


@numba.njit(cache=True, nogil=True, inline="always")
def _b2(ws, offs, i, a, b):
    return ws[offs[i, 0]:offs[i, 1]].reshape((a, b))


@numba.njit(cache=True, nogil=True, inline="always")
def _b4(ws, offs, i, a, b, c, d):
    return ws[offs[i, 0]:offs[i, 1]].reshape((a, b, c, d))


@numba.njit(cache=True, nogil=True, inline="always")
def _planes(ws, offs, i, q):
    """A Winograd transform's buffer as (q, C*F + pad): q = 16 (F(2x2)) or 36 (F(4x4)) planes."""
    return ws[offs[i, 0]:offs[i, 1]].reshape((q, (offs[i, 1] - offs[i, 0]) // q))


@numba.njit(cache=True, nogil=True)
def _run_plan(prog, ws, offs, groups, eps, fast):
    """Run the program ``prog`` (ops x _COLS int64) over the buffers ``ws[offs[i, 0]:offs[i, 1]]``: each op
    is the call the unplanned pass makes (see the builders of :class:`Plan` for the columns)."""
    for i in range(prog.shape[0]):
        r = prog[i]
        op = r[0]
        if op == _RES:
            N, C, H, W, F, G = r[2], r[3], r[4], r[5], r[6], groups
            skip = r[19] != 0
            sw = _b2(ws, offs, r[17], F, C) if skip else _b2(ws, offs, r[17], 0, 0)
            _resblock_fwd_kernel(_b4(ws, offs, r[1], N, C, H, W), _b(ws, offs, r[7]), _b(ws, offs, r[8]),
                                 _planes(ws, offs, r[9], r[21]), _b(ws, offs, r[10]), _b2(ws, offs, r[11], N, F),
                                 _b(ws, offs, r[12]), _b(ws, offs, r[13]), _planes(ws, offs, r[15], r[22]),
                                 _b(ws, offs, r[16]), sw, _b(ws, offs, r[18]), skip, groups, eps, fast, r[20] != 0,
                                 r[23], r[24], r[25], r[26], r[27], r[28],
                                 _b4(ws, offs, r[29], N, C, H, W), _b2(ws, offs, r[30], N, G),
                                 _b2(ws, offs, r[31], N, G), _b4(ws, offs, r[32], N, F, H, W),
                                 _b4(ws, offs, r[33], N, F, H, W), _b2(ws, offs, r[34], N, G),
                                 _b2(ws, offs, r[35], N, G), _b4(ws, offs, r[14], N, F, H, W))
        elif op == _WINO:
            N, C, H, W, F = r[2], r[3], r[4], r[5], r[6]
            _wino_conv(_b4(ws, offs, r[1], N, C, H, W), _planes(ws, offs, r[7], r[14]), F, _b(ws, offs, r[8]),
                       r[9] != 0, r[10], r[11], r[12], r[13], _b4(ws, offs, r[15], N, F, H, W), 0, 1)
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


class Plan:
    """A frozen U-Net's inference pass over ``x_shape`` as one compiled call (see the module docstring).

    ``plan(x, tps) -> out``: ``x`` (N, C, H, W) of the plan's dtype, ``tps`` the ResBlocks' time-embedding
    projections (N, F) in the order the ops list them; ``out`` a new array. Not re-entrant: a call that finds
    the plan busy (another thread's pass) returns None, and the caller runs the unplanned pass.
    """

    def __init__(self, x_shape, dtype, groups: int, eps: float):
        self.dtype = np.dtype(dtype)
        self.groups, self.eps = int(groups), float(eps)
        self.pieces: list = []  # per buffer: a flat array to copy in, a size, or a transform to make (_filters)
        self.rows: list[list[int]] = []
        self.shapes: dict[int, tuple] = {}  # slot -> activation shape
        self.slot_buf: dict[int, int] = {}  # slot -> buffer index
        self.tps: list[tuple[int, tuple]] = []  # (buffer index, shape) per ResBlock, in op order
        self._lock = threading.Lock()
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

    def _filters(self, w, four) -> int:
        """A new buffer for the Winograd transform of ``w``: :meth:`finish` makes it there (the store of derived
        weights then keeps that buffer), or copies it from the store where an earlier pass made it (a pass's
        transforms are megabytes: copying them all cost more than the plan saves on a short sampling run)."""
        F, C = w.shape[0], w.shape[1]
        self.pieces.append((w, bool(four), (36 if four else 16, C * F + _WINO_PAD)))
        return len(self.pieces) - 1

    def _out(self, slot: int, shape) -> int:
        self.shapes[slot] = tuple(int(s) for s in shape)
        self.slot_buf[slot] = b = self._empty(shape)
        self.out_slot = slot
        return b

    def _row(self, *vals):
        row = [int(v) for v in vals]
        self.rows.append(row + [0] * (_COLS - len(row)))

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
        if mode == 3:  # as winograd._wino_forward
            if _threads._split_threads(N, 32.0 * N * ((H + 1) // 2) * ((W + 1) // 2) * C * F) > 1:
                return False
            four, th, tw, G, nb = _wino_plan(N, C, F, H, W, itemsize)
            U = self._filters(w, four)
            bb = self._buf(b)
            ob = self._out(dst, (N, F, H, W))
            self._row(_WINO, xb, N, C, H, W, F, U, bb, four, th, tw, G, nb, 36 if four else 16, ob)
            return True
        if mode == 0:  # as conv._conv_forward_impl's last branch
            Wr = W + padding
            K = C * KH * KW
            G = _chunk(Ho * Wr, N, K, itemsize)
            if _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wr * K * F) > 1:
                return False
            wb = self._buf(np.reshape(w, (F, K)))
            bb = self._buf(b)
            ob = self._out(dst, (N, F, Ho, Wo))
            self._row(_CONV, xb, N, C, H, W, F, wb, bb, mode, KH, KW, stride, padding, Wr, Ho, Wo, K, G,
                      _xp_len(mode, H, W, padding), ob)
            return True
        if mode == 2:
            K = C * KH * KW
            G = _chunk(Ho * Wo, N, K, itemsize)
            if _threads._split_threads((N + G - 1) // G, 2.0 * N * Ho * Wo * K * F) > 1:
                return False
            wb = self._buf(_pix_weights(w))
            bb = self._buf(b)
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
        ge1, be1 = _repeated(gamma1, beta1, H * W, dt)
        ge2, be2 = _repeated(gamma2, beta2, H * W, dt)
        skip = skip_w is not None
        ids = [self._buf(ge1), self._buf(be1), self._filters(w1, four), self._buf(b1)]
        tp = self._empty((N, F))
        self.tps.append((tp, (N, F)))
        ids += [tp, self._buf(ge2), self._buf(be2)]
        out = self._out(dst, (N, F, H, W))
        ids += [out, self._filters(w2, four), self._buf(b2),
                self._buf(np.reshape(skip_w, (F, C)) if skip else np.zeros(0, dt)),
                self._buf(skip_b if skip else np.zeros(0, dt))]
        acts = [self._empty((N, C, H, W)), self._empty((N, g)), self._empty((N, g)), self._empty((N, F, H, W)),
                self._empty((N, F, H, W)), self._empty((N, g)), self._empty((N, g))]
        q = 36 if four else 16
        self._row(_RES, self.slot_buf[src], N, C, H, W, F, *ids, skip, four, q, q, th, tw, G1, nb1, G2, nb2, *acts)
        return True

    def gn_silu(self, dst, src, gamma, beta) -> bool:
        N, C, H, W = self.shapes[src]
        if _gn_threads(N * C * H * W) > 1:
            return False
        ge, be = _repeated(gamma, beta, H * W, self.dtype)
        gb, bb = self._buf(ge), self._buf(be)
        ob = self._out(dst, (N, C, H, W))
        self._row(_GN_SILU, self.slot_buf[src], N, C, H, W, gb, bb, ob, self._empty((N, self.groups)),
                  self._empty((N, self.groups)))
        return True

    def concat(self, dst, a, b) -> bool:
        N, Ca, H, W = self.shapes[a]
        Cb = self.shapes[b][1]
        ob = self._out(dst, (N, Ca + Cb, H, W))
        self._row(_CONCAT, self.slot_buf[a], self.slot_buf[b], N, Ca, Cb, H, W, ob)
        return True

    def upsample(self, dst, src) -> bool:
        N, C, H, W = self.shapes[src]
        ob = self._out(dst, (N, C, 2 * H, 2 * W))
        self._row(_UP2, self.slot_buf[src], N, C, H, W, ob)
        return True

    def finish(self) -> "Plan":
        self.prog = np.array(self.rows, dtype=np.int64).reshape(len(self.rows), _COLS)
        sizes = [p if isinstance(p, int) else math.prod(p[2]) if isinstance(p, tuple) else p.size
                 for p in self.pieces]
        starts = np.cumsum([0] + [-(-n // _ALIGN) * _ALIGN for n in sizes])
        self.offs = np.empty((len(sizes), 2), np.int64)  # buffer i: ws[offs[i, 0]:offs[i, 1]]
        self.offs[:, 0] = starts[:-1]
        self.offs[:, 1] = starts[:-1] + np.array(sizes, np.int64)
        self.ws = np.empty(int(starts[-1]), self.dtype)  # (activations: written before they are read)
        for i, p in enumerate(self.pieces):
            if isinstance(p, tuple):  # the pass's (or scope's) transform: made into the buffer, or copied there
                w, four, shape = p
                U = self.ws[self.offs[i, 0]:self.offs[i, 1]].reshape(shape)
                got = _threads.derived(("wino", four, False), w, lambda: _wino._wino_transform(w, False, four, U))
                if got is not U:
                    U[...] = got
            elif not isinstance(p, int):
                self.ws[self.offs[i, 0]:self.offs[i, 1]] = p
        self.pieces = None
        view = lambda i, shape: self.ws[self.offs[i, 0]:self.offs[i, 1]].reshape(shape)  # noqa: E731
        self._x = view(self.slot_buf[0], self.x_shape)
        self._tp_views = [view(i, shape) for i, shape in self.tps]
        self._out_view = view(self.slot_buf[self.out_slot], self.shapes[self.out_slot])
        return self

    def __call__(self, x, tps):
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self._x[...] = x
            for view, tp in zip(self._tp_views, tps):
                view[...] = tp
            _run_plan(self.prog, self.ws, self.offs, self.groups, self.eps, self.dtype == np.float32)
            return self._out_view.copy()
        finally:
            self._lock.release()


def plan_forward(ops, x_shape, dtype, groups: int, eps: float):
    """The optional hook: a :class:`Plan` of the inference pass ``ops`` over ``x_shape``, or None.

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

    Returns None where some kernel of the pass would run on more than one thread (or an op has no planned
    form): the unplanned pass is then the faster (or only) one.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64) or _threads._in_share():
        return None
    plan = Plan(x_shape, dtype, groups, eps)
    builders = {"conv": plan.conv, "res": plan.res, "gn_silu": plan.gn_silu, "concat": plan.concat,
                "upsample": plan.upsample}
    for op in ops:
        build = builders.get(op[0])
        if build is None or not build(*op[1:]):
            return None
    return plan.finish()
