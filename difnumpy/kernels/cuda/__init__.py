"""``numba.cuda`` kernels: the GPU backend (``backend="cuda"``), split by op family.

The package provides the backend API (:data:`difnumpy.kernels.api.BACKEND_API`, ARCHITECTURE.md
"Backends"); every function has a NumPy twin with the same signature in
:mod:`difnumpy.kernels.reference` and a test asserting that they agree (``tests/test_cuda.py``, run
under numba's CUDA simulator in CI).

Modules: :mod:`._runtime` (availability, launch configuration, the kernel registry, native arrays),
:mod:`.elementwise` (diffusion updates, SiLU, in-place sums, reductions, MSE), :mod:`.conv`,
:mod:`.groupnorm`, :mod:`.linear`, :mod:`.layout` (upsampling, channel concat/split), :mod:`.optim`
(Adam, EMA). Every kernel has a builder ``build_<name>(dt)`` registered in
:data:`._runtime.KERNELS`.

Transfers: every function accepts NumPy arrays *or* device arrays. NumPy in -> copied up, computed,
copied down, NumPy out. Device arrays in -> device arrays out; in-place functions (``add_``, ``axpy_``,
``scale_``, ``add_channel_bias_``, ``adam_update``, ``ema_update``) update device arrays on the device.

Importing this package where numba-cuda or a GPU is missing raises a RuntimeError that says why
(``get_backend("cuda")`` passes it on). Set ``NUMBA_ENABLE_CUDASIM=1`` *before numba is imported* to run
every kernel on numba's CUDA simulator (slow: one Python thread per CUDA thread; launch sizes are reduced
then, the maths is the same). Set ``DIFNUMPY_CUDA_COMPILE_ONLY=1`` to import it without a GPU for
``numba.cuda.compile_ptx`` only (kernels cannot be launched then).
"""
from __future__ import annotations

from difnumpy.kernels.cuda._runtime import (KERNELS, SIMULATOR, asarray, copy, copy_into, cuda, cuda_available,
                                            is_array, to_host, zeros)
from difnumpy.kernels.cuda.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from difnumpy.kernels.cuda.elementwise import (add_, add_channel_bias_, axpy_, blend_, embedding_backward,
                                               embedding_forward, mse_loss, q_sample, sampler_update,
                                               scale_, silu_backward, silu_forward, sum_hw, sumsq)
from difnumpy.kernels.cuda.groupnorm import group_norm_silu_backward, group_norm_silu_forward
from difnumpy.kernels.cuda.layout import (concat_channels, split_channels, upsample_nearest2x_backward,
                                          upsample_nearest2x_forward)
from difnumpy.kernels.cuda.linear import linear_backward, linear_forward
from difnumpy.kernels.cuda.optim import adam_update, ema_update

__all__ = [
    # the backend API (the order of difnumpy.kernels.api.BACKEND_API; a test checks they agree)
    "is_array", "asarray", "to_host", "zeros", "copy", "copy_into",
    "q_sample", "sampler_update",
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
    "group_norm_silu_forward", "group_norm_silu_backward", "linear_forward", "linear_backward",
    "silu_forward", "silu_backward", "add_", "axpy_", "scale_", "add_channel_bias_", "blend_", "sum_hw", "embedding_forward", "embedding_backward", "sumsq", "mse_loss",
    "upsample_nearest2x_forward", "upsample_nearest2x_backward", "concat_channels", "split_channels",
    "adam_update", "ema_update",
    # the backend's own
    "SIMULATOR", "cuda_available", "cuda", "KERNELS",
]
