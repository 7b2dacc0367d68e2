"""The affine map ``x @ w.T + b`` and its gradients (one thread per output element).

Twins: :func:`difnumpy.kernels.reference.linear_forward` and ``linear_backward``. The U-Net's linear
layers are the small time-embedding MLPs, so these are simple grid-stride kernels, not tiled GEMMs.
"""
from __future__ import annotations

import numpy as np

from difnumpy.kernels.cuda._runtime import _check, _ret, asarray, cuda, grid1d, is_array, kernel


@kernel(lambda t: (t.a2, t.a2, t.a1, t.a2))
def build_linear_fwd(dt):
    """``out[n, m] = b[m] + sum_d x[n, d] w[m, d]``."""
    def linear_fwd_k(x, w, b, out):
        D = x.shape[1]
        M = w.shape[0]
        for i in range(cuda.grid(1), x.shape[0] * M, cuda.gridsize(1)):
            n = i // M
            m = i - n * M
            acc = b[m]
            for d in range(D):
                acc += x[n, d] * w[m, d]
            out[n, m] = acc
    return linear_fwd_k


@kernel(lambda t: (t.a2, t.a2, t.a2))
def build_matmul_nn(dt):
    """``out (P, Q) = a (P, R) @ b (R, Q)``."""
    ZERO = dt.type(0.0)

    def matmul_nn_k(a, b, out):
        R = a.shape[1]
        Q = b.shape[1]
        for i in range(cuda.grid(1), a.shape[0] * Q, cuda.gridsize(1)):
            p = i // Q
            q = i - p * Q
            acc = ZERO
            for r in range(R):
                acc += a[p, r] * b[r, q]
            out[p, q] = acc
    return matmul_nn_k


@kernel(lambda t: (t.a2, t.a2, t.a2))
def build_matmul_tn(dt):
    """``out (P, Q) = a.T @ b`` with ``a`` (R, P), ``b`` (R, Q)."""
    ZERO = dt.type(0.0)

    def matmul_tn_k(a, b, out):
        R = a.shape[0]
        Q = b.shape[1]
        for i in range(cuda.grid(1), a.shape[1] * Q, cuda.gridsize(1)):
            p = i // Q
            q = i - p * Q
            acc = ZERO
            for r in range(R):
                acc += a[r, p] * b[r, q]
            out[p, q] = acc
    return matmul_tn_k


@kernel(lambda t: (t.a2, t.a1))
def build_colsum(dt):
    """``out[j] = sum_i a[i, j]``."""
    ZERO = dt.type(0.0)

    def colsum_k(a, out):
        for j in range(cuda.grid(1), a.shape[1], cuda.gridsize(1)):
            acc = ZERO
            for i in range(a.shape[0]):
                acc += a[i, j]
            out[j] = acc
    return colsum_k


def linear_forward(x, w, b):
    """CUDA twin of :func:`difnumpy.kernels.reference.linear_forward`: ``x @ w.T + b``."""
    _check("x", x, 2)
    _check("w", w, 2, x.dtype)
    N, D = (int(s) for s in x.shape)
    M = int(w.shape[0])
    if int(w.shape[1]) != D:
        raise ValueError(f"w has {int(w.shape[1])} input features but x has {D}")
    _check("b", b, 1, x.dtype, (M,))
    dt = np.dtype(x.dtype)
    out = cuda.device_array((N, M), dtype=dt)
    if N * M:
        build_linear_fwd(dt)[grid1d(N * M)](asarray(x), asarray(w), asarray(b), out)
    return _ret(is_array(x), out)


def linear_backward(dout, x, w):
    """CUDA twin of :func:`difnumpy.kernels.reference.linear_backward`: ``(dx, dw, db)``."""
    _check("dout", dout, 2)
    _check("x", x, 2, dout.dtype)
    _check("w", w, 2, dout.dtype)
    N, M = (int(s) for s in dout.shape)
    D = int(x.shape[1])
    if int(x.shape[0]) != N:
        raise ValueError(f"x must have dout's {N} rows, got shape {tuple(x.shape)}")
    if tuple(w.shape) != (M, D):
        raise ValueError(f"w must have shape {(M, D)} (dout's columns, x's columns), got {tuple(w.shape)}")
    dt = np.dtype(dout.dtype)
    d_do, d_x, d_w = asarray(dout), asarray(x), asarray(w)
    dx = cuda.device_array((N, D), dtype=dt)
    dw = cuda.device_array((M, D), dtype=dt)
    db = cuda.device_array((M,), dtype=dt)
    if N * D:
        build_matmul_nn(dt)[grid1d(N * D)](d_do, d_w, dx)
    if M * D:
        build_matmul_tn(dt)[grid1d(M * D)](d_do, d_x, dw)
    if M:
        build_colsum(dt)[grid1d(M)](d_do, db)
    return _ret(is_array(dout), dx, dw, db)
