"""The linear layer on the cpu backend: one BLAS GEMM (the NumPy twin), with one row kept on the GEMM path.

BLAS computes a one-row product ``(1, D) @ (D, M)`` with GEMV, which sums in another order than the GEMM
it uses for two rows or more: the same image then gets other bits alone than in a batch (measured: up to
6e-6 apart). A single row is therefore computed as the first row of a two-row GEMM, so a sample's output
never depends on the batch it is in (``difnumpy sample`` is bit-for-bit the same for any batch size or
number of MPI ranks).
"""
from __future__ import annotations

import numpy as np

from difnumpy.kernels import reference as _ref


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ w.T + b``, (N, D) -> (N, M). Twin: :func:`reference.linear_forward`."""
    if x.shape[0] == 1:
        return np.ascontiguousarray(_ref.linear_forward(np.concatenate([x, x]), w, b)[:1])
    return _ref.linear_forward(x, w, b)


def linear_backward(dout: np.ndarray, x: np.ndarray, w: np.ndarray):
    """``(dx, dw, db)`` of :func:`linear_forward`. Twin: :func:`reference.linear_backward`."""
    if dout.shape[0] == 1 and dout.dtype == x.dtype == w.dtype:
        # dx on the GEMM path too; with one row dw is an outer product and db the row itself (the twin's
        # sums of one term, so the same bits), without the twin's second GEMM and float64 sum
        dx = np.matmul(np.concatenate([dout, dout]), w)[:1]
        return np.ascontiguousarray(dx), np.outer(dout[0], x[0]), dout[0].copy()
    return _ref.linear_backward(dout, x, w)
