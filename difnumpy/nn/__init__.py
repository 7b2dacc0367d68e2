"""Neural-network pieces: layers as forward/backward pairs, gradient-check helpers and the U-Net."""
from difnumpy.nn import gradcheck, layers
from difnumpy.nn.gradcheck import (eval_numerical_gradient, eval_numerical_gradient_array,
                                   eval_numerical_gradient_at, rel_error)
from difnumpy.nn.unet import UNet

__all__ = [
    "UNet",
    "layers",
    "gradcheck",
    "rel_error",
    "eval_numerical_gradient",
    "eval_numerical_gradient_array",
    "eval_numerical_gradient_at",
]
