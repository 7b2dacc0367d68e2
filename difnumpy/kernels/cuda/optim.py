"""Optimizer updates on the device: bias-corrected Adam / AdamW and the EMA of the weights.

Twins: :func:`difnumpy.kernels.reference.adam_update` and ``ema_update``. Both work in place on device
arrays (and on NumPy arrays through a copy up and back down).
"""
from __future__ import annotations

import math

import numpy as np

from difnumpy.kernels.cuda._runtime import _back, _check, _flat, asarray, cuda, grid1d, kernel, to_host


@kernel(lambda t: (t.a1,) * 4 + (t.s,) * 8)
def build_adam(dt):
    """AdamW element update (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019, Alg. 2), in ``dt``."""
    def adam_k(p, g, m, v, lr_wd, b1, omb1, b2, omb2, step_size, rs, eps):
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            gi = g[i]
            pi = p[i] - lr_wd * p[i]
            mi = b1 * m[i] + omb1 * gi
            vi = b2 * v[i] + omb2 * (gi * gi)
            p[i] = pi - step_size * mi / (math.sqrt(vi) * rs + eps)  # rs = (1 - beta2^t)^(-1/2)
            m[i] = mi
            v[i] = vi
    return adam_k


@kernel(lambda t: (t.a1, t.a1, t.s, t.s))
def build_ema(dt):
    """``e = decay e + (1 - decay) p``."""
    def ema_k(e, p, decay, omd):
        for i in range(cuda.grid(1), e.shape[0], cuda.gridsize(1)):
            e[i] = decay * e[i] + omd * p[i]
    return ema_k


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """CUDA twin of :func:`difnumpy.kernels.reference.adam_update` (in place on param, m, v).

    The element arithmetic runs in the arrays' dtype (the NumPy twin uses float64 and rounds once),
    so float32 results agree with the twin to float32 rounding, not bit for bit.
    """
    _check("param", param)
    for name, a in (("grad", grad), ("m", m), ("v", v)):
        _check(name, a, None, param.dtype)
        if tuple(a.shape) != tuple(param.shape):
            raise ValueError(f"{name} must have the shape of param {tuple(param.shape)}, got {tuple(a.shape)}")
    if int(step) < 1:
        raise ValueError(f"step must be the 1-based step count (>= 1), got {step}")
    dt = np.dtype(param.dtype)
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    step_size = lr / (1.0 - beta1 ** int(step))
    rs = 1.0 / math.sqrt(1.0 - beta2 ** int(step))
    d = [asarray(a) for a in (param, grad, m, v)]
    scal = [dt.type(s) for s in (lr * wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, step_size, rs, eps)]
    n = int(np.prod(param.shape))
    if n:
        build_adam(dt)[grid1d(n)](*[_flat(a) for a in d], *scal)
    for host, dev in ((param, d[0]), (m, d[2]), (v, d[3])):
        _back(host, dev)


def ema_update(ema, param, decay):
    """CUDA twin of :func:`difnumpy.kernels.reference.ema_update` (in place on ``ema``).

    ``param`` is cast to ``ema``'s dtype (through the host if it is a device array of another dtype).
    """
    _check("ema", ema)
    _check("param", param)
    if tuple(ema.shape) != tuple(param.shape):
        raise ValueError(f"param must have the shape of ema {tuple(ema.shape)}, got {tuple(param.shape)}")
    dt = np.dtype(ema.dtype)
    d_e = asarray(ema)
    d_p = asarray(param) if np.dtype(param.dtype) == dt else asarray(to_host(param), dt)
    n = int(np.prod(ema.shape))
    if n:
        build_ema(dt)[grid1d(n)](_flat(d_e), _flat(d_p), dt.type(decay), dt.type(1.0 - float(decay)))
    _back(ema, d_e)
