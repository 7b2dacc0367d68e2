"""The ``"cpu"`` backend: ``numba.njit`` kernels on host NumPy arrays (see ARCHITECTURE.md, "Backends").

It provides every function of :data:`difnumpy.kernels.api.BACKEND_API` and the optional hooks
``step_scope``, ``batch_shares``, ``run_shares``, ``resblock_forward``, ``resblock_backward``,
``adam_update_many``, ``prefetch_conv3x3_filters`` and ``plan_forward``. Every compiled kernel has a NumPy twin with the same
signature in :mod:`difnumpy.kernels.reference` and a test asserting that they agree. All kernels are
compiled with ``cache=True``: the first call compiles (seconds), later calls and processes reuse the
cached machine code. No result depends on ``numba.get_num_threads()`` (see :mod:`._threads`).

Modules, one per op family:

- :mod:`._threads`: the worker pool, BLAS held to one thread, the batch split into shares;
- :mod:`._malloc`: glibc's malloc kept from returning freed pages between passes (set on import);
- :mod:`.elementwise`: forward process, sampler update, SiLU, in-place sums, reductions, MSE loss;
- :mod:`.conv` (im2col, 1x1 and the dispatch) and :mod:`.winograd` (F(2x2, 3x3); F(4x4, 3x3) forward);
- :mod:`.groupnorm`: fused GroupNorm + SiLU;
- :mod:`.layout`: channel concat / split, nearest 2x upsampling;
- :mod:`.optim`: Adam (also all arrays in one call, the hook ``adam_update_many``) and the EMA;
- :mod:`.resblock`: the U-Net's ResBlock forward in one compiled call and its backward in two (the hooks
  ``resblock_forward`` and ``resblock_backward``);
- :mod:`.plan` (with :mod:`.plan_backward` and :mod:`._plan_util`): a small U-Net pass as one compiled program
  (the hook ``plan_forward``): a frozen model's inference pass, a training pass's forward and backward.

The array functions are the NumPy twins themselves; the linear layer is the twin's BLAS GEMM (:mod:`.linear`).
"""
from __future__ import annotations

from difnumpy.kernels.cpu._malloc import tune_malloc
from difnumpy.kernels.cpu._threads import batch_shares, run_shares, step_scope
from difnumpy.kernels.cpu.conv import (conv2d_backward_input, conv2d_backward_weight, conv2d_forward,
                                       prefetch_conv3x3_filters)
from difnumpy.kernels.cpu.elementwise import (add_, add_channel_bias_, axpy_, blend_, embedding_backward,
                                              embedding_forward, mse_loss, q_sample,
                                              sampler_update, scale_, silu_backward, silu_forward, sum_hw, sumsq)
from difnumpy.kernels.cpu.groupnorm import group_norm_silu_backward, group_norm_silu_forward
from difnumpy.kernels.cpu.layout import (concat_channels, split_channels, upsample_nearest2x_backward,
                                         upsample_nearest2x_forward)
from difnumpy.kernels.cpu.linear import linear_backward, linear_forward
from difnumpy.kernels.cpu.optim import adam_update, adam_update_many, ema_update
from difnumpy.kernels.cpu.plan import plan_forward
from difnumpy.kernels.cpu.resblock import resblock_backward, resblock_forward
from difnumpy.kernels.reference import asarray, copy, copy_into, is_array, to_host, zeros

tune_malloc()  # a pass reuses the last pass's pages instead of faulting them in again (see ._malloc)

__all__ = [
    # arrays
    "is_array", "asarray", "to_host", "zeros", "copy", "copy_into",
    # diffusion
    "q_sample", "sampler_update",
    # nn
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
    "group_norm_silu_forward", "group_norm_silu_backward", "linear_forward", "linear_backward",
    "silu_forward", "silu_backward", "add_", "axpy_", "scale_", "add_channel_bias_", "blend_", "sum_hw",
    "embedding_forward", "embedding_backward", "sumsq",
    "mse_loss", "upsample_nearest2x_forward", "upsample_nearest2x_backward", "concat_channels",
    "split_channels",
    # optim
    "adam_update", "ema_update",
    # optional hooks
    "step_scope", "batch_shares", "run_shares", "resblock_forward", "resblock_backward", "adam_update_many",
    "prefetch_conv3x3_filters", "plan_forward",
]
