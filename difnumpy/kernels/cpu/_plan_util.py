"""Shared pieces of the compiled U-Net programs (:mod:`.plan`, :mod:`.plan_backward`): the buffers of a
workspace, the parameter-derived Winograd transforms a pool worker may make ahead, and the atomics that
hand them over."""
from __future__ import annotations

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from difnumpy.kernels.cpu._threads import _BUSY, _DONE, _TAKEN, _TODO  # (a transform's state: as prefetch()'s)
from difnumpy.kernels.cpu.winograd import _wino4_weights, _wino_weights

_PWINO = 10  # the op code of a transform row: [op, param, F, C, four, buffer, state index, second buffer, flip]
_COLS = 72  # columns of a program row (a ResBlock's backward takes the most)
_ALIGN = 16  # buffers start at multiples of 16 elements (64 bytes in float32)


@intrinsic
def _load_acquire(typingctx, arr, i):
    """``arr[i]`` (int64) loaded atomically with acquire ordering: the stores another thread made before its
    :func:`_store_release` of the entry are seen after it."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ptr = cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, args[0]),
                                       [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(arr, types.intp), codegen


@intrinsic
def _store_release(typingctx, arr, i, v):
    """``arr[i] = v`` (int64) stored atomically with release ordering (see :func:`_load_acquire`)."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ptr = cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, args[0]),
                                       [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()
    return types.void(arr, types.intp, types.int64), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _transform(ws, offs, params, r):
    """A _PWINO row's transform (winograd._wino_transform; the flipped one where ``r[8]``) into buffer ``r[5]``."""
    F, C = r[2], r[3]
    w = params[r[1]].reshape((F, C, 3, 3))
    if r[4] != 0:
        _wino4_weights(w, r[8] != 0, _planes(ws, offs, r[5], True))
    else:
        _wino_weights(w, r[8] != 0, _planes(ws, offs, r[5], False))


@numba.njit(cache=True, nogil=True, inline="always")
def _take_transform(ws, offs, params, state, r):
    """A program's _PWINO row: the worker's transform where it is made, else made here into the row's second
    buffer (``r[7]``, which ``offs`` then names for ``r[5]``: the worker may still be writing the first)."""
    if _load_acquire(state, r[6]) != _DONE:
        state[r[6]] = _TAKEN
        offs[r[5], 0], offs[r[5], 1] = offs[r[7], 0], offs[r[7], 1]
        _transform(ws, offs, params, r)


@numba.njit(cache=True, nogil=True, inline="always")
def _copy_param(src, dst):
    """A parameter, flat, into its buffer (a training program reads the weights at every pass)."""
    for j in range(src.size):
        dst[j] = src[j]


@numba.njit(cache=True, nogil=True)
def _make_transforms(prog, ws, offs, params, state):
    """A pool worker's job: the _PWINO rows' transforms in order, each only if still to do (``state``)."""
    for i in range(prog.shape[0]):
        r = prog[i]
        if r[0] != _PWINO or _load_acquire(state, r[6]) != _TODO:
            continue
        state[r[6]] = _BUSY
        _transform(ws, offs, params, r)
        _store_release(state, r[6], _DONE)


@numba.njit(cache=True, nogil=True, inline="always")
def _b(ws, offs, i):
    """Buffer ``i``: ``ws[offs[i, 0]:offs[i, 1]]`` (1-D)."""
    return ws[offs[i, 0]:offs[i, 1]]


@numba.njit(cache=True, nogil=True, inline="always")
def _b2(ws, offs, i, a, b):
    return ws[offs[i, 0]:offs[i, 1]].reshape((a, b))


@numba.njit(cache=True, nogil=True, inline="always")
def _b3(ws, offs, i, a, b, c):
    return ws[offs[i, 0]:offs[i, 1]].reshape((a, b, c))


@numba.njit(cache=True, nogil=True, inline="always")
def _b4(ws, offs, i, a, b, c, d):
    return ws[offs[i, 0]:offs[i, 1]].reshape((a, b, c, d))


@numba.njit(cache=True, nogil=True, inline="always")
def _planes(ws, offs, i, four):
    """A Winograd transform's buffer as (q, C*F + pad): q = 36 planes for F(4x4) (``four``), 16 for F(2x2)."""
    q = 36 if four else 16
    return ws[offs[i, 0]:offs[i, 1]].reshape((q, (offs[i, 1] - offs[i, 0]) // q))


