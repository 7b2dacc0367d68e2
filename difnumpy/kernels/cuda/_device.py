"""Device functions shared by the kernel families (``cuda.jit(device=True)``, typed where called).

Constants are arguments (``one``, ``half``), so they keep the dtype of the calling kernel: a float32
kernel passes float32 constants and stays free of ``.f64`` instructions.
"""
from __future__ import annotations

import math

from difnumpy.kernels.cuda._runtime import cuda


@cuda.jit(device=True)
def silu_d(y, half):
    """SiLU ``y * sigmoid(y)`` (Elfwing et al. 2018), ``sigmoid(y) = 1/2 + tanh(y/2)/2`` (no overflow)."""
    return y * (half + half * math.tanh(half * y))


@cuda.jit(device=True)
def silu_grad_d(y, one, half):
    """``d/dy [y sigmoid(y)] = s (1 + y (1 - s))``, ``s = sigmoid(y)``."""
    s = half + half * math.tanh(half * y)
    return s * (one + y * (one - s))


@cuda.jit(device=True)
def block_sum_d(sh, val, tid, nthreads):
    """Sum of ``val`` over the ``nthreads`` (a power of two) threads of the block; all threads get it.

    ``sh`` is a shared array of at least ``nthreads`` elements; every thread of the block must call this.
    """
    sh[tid] = val
    cuda.syncthreads()
    s = nthreads // 2
    while s > 0:
        if tid < s:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r
