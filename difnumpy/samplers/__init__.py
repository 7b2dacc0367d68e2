"""Reverse-process samplers: DDPM (Ho et al. 2020), DDIM (Song et al. 2021), the few-step solvers of
:mod:`difnumpy.solvers`, classifier-free guidance, inpainting (RePaint) and image-to-image (SDEdit).

- :mod:`.steps`: the timestep lists and one step function per method (:func:`ddpm_step`,
  :func:`ddim_step`), each reducing to the fused update of the backend API;
- :mod:`.loop`: the one sampling loop (:func:`sample`, :func:`sample_progressive`), its model function
  (class labels and guidance), image-to-image, and :func:`ddim_invert`;
- :mod:`.inpaint`: RePaint (:func:`inpaint`).

``model`` is any callable ``model(x_t, t_batch[, class_labels=y]) -> output`` (a :class:`difnumpy.UNet`,
or an analytic oracle of :mod:`difnumpy.testing`). One loop serves every backend: ``x_t`` stays in the
backend's native arrays from the first step to the last (device arrays on "cuda"); noise is drawn on the
host from the ``rng`` on every backend, so the same seed gives the same samples everywhere.
"""
from difnumpy._validation import PREDICTION_TYPES
from difnumpy.samplers.inpaint import inpaint, repaint_timesteps
from difnumpy.samplers.loop import (METHODS, check_class_labels, ddim_invert, guided_output, make_model_fn, sample,
                                    sample_progressive)
from difnumpy.samplers.steps import (SPACINGS, VARIANCE_TYPES, ddim_coefficients, ddim_step, ddpm_coefficients,
                                     ddpm_step, inference_timesteps)

__all__ = [
    "PREDICTION_TYPES", "VARIANCE_TYPES", "SPACINGS", "METHODS",
    "inference_timesteps", "ddpm_coefficients", "ddim_coefficients", "ddpm_step", "ddim_step",
    "sample", "sample_progressive", "ddim_invert", "guided_output", "make_model_fn", "check_class_labels",
    "inpaint", "repaint_timesteps",
]
