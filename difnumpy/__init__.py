"""difnumpy: a reference implementation of diffusion models (DDPM, DDIM) in NumPy arrays.

Every equation is traceable to its paper (Ho et al. 2020, Song et al. 2021, Nichol & Dhariwal 2021,
Salimans & Ho 2022, Lin et al. 2023); hot loops are Numba kernels with NumPy twins.
"""
__version__ = "0.1.0"

from difnumpy.schedules import SCHEDULE_NAMES, Schedule, make_betas, rescale_zero_terminal_snr
from difnumpy.diffusion import (
    discretized_gaussian_log_likelihood,
    get_velocity,
    normal_kl,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from difnumpy.samplers import (
    ddim_invert,
    ddim_step,
    ddpm_step,
    inference_timesteps,
    sample,
    sample_progressive,
)
from difnumpy.kernels import BACKENDS, cuda_available, get_backend
# ---- nn / training / app names are added below ----
from difnumpy.nn.unet import UNet
from difnumpy.nn.optim import EMA, Adam, AdamW, clip_grad_norm, lr_at
from difnumpy.trainer import DivergenceError, Trainer, loss_and_grads
from difnumpy.checkpoint import load_checkpoint, load_model, save_checkpoint
