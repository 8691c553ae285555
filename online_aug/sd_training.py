"""The pieces of Stable-Diffusion training that the tiny-SD builder (:mod:`online_aug.tiny_sd`) and the fine-tuning
of learned tokens / LoRA (:mod:`online_aug.finetune`) share: which images a batch draws, latents sampled from the VAE
posterior, and the denoising loss.

The noising step is the diffusers training recipe (``examples/text_to_image/train_text_to_image.py``): a
``DDPMScheduler`` built from the model's scheduler config (same betas, so the same ``alphas_cumprod``) noises the
latents with ``add_noise`` and gives the v-prediction target with ``get_velocity``. Whatever scheduler class a model
ships for sampling (DDIM, PNDM, Euler), its training noise is this one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def training_scheduler(scheduler_config: Any) -> Any:
    """The DDPM noise schedule of a model, from its (sampling) scheduler's config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config)


def class_uniform_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Per-image sampling weights that make every class equally likely (``1 / n_c``), for ``torch.multinomial``.

    A generator must draw tail classes on request, so it trains on them as often as on head classes.
    """
    counts = torch.bincount(labels, minlength=num_classes).float()
    return 1.0 / counts[labels]


def sample_latents(mean: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
    """One draw from the VAE posterior N(mean, std^2); the noise comes from ``generator`` (a CPU generator)."""
    return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)


def denoising_loss(unet: torch.nn.Module, scheduler: Any, z0: Tensor, encoder_hidden_states: Tensor,
                   generator: torch.Generator) -> Tensor:
    """MSE of the UNet's prediction at a uniform random timestep, against the model's prediction type (eps, v, x0).

    ``scheduler`` is a :func:`training_scheduler`. The draws from ``generator`` are, in this order, the timesteps
    ``[B]`` and the noise (the shape of ``z0``), both on the CPU: a run's numbers do not depend on its device.
    """
    T = int(scheduler.config.num_train_timesteps)
    t = torch.randint(0, T, (len(z0),), generator=generator).to(z0.device)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device)
    zt = scheduler.add_noise(z0, eps, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = eps
    elif kind == "v_prediction":
        target = scheduler.get_velocity(z0, eps, t)
    else:  # "sample"
        target = z0
    pred = unet(zt, t, encoder_hidden_states=encoder_hidden_states).sample
    return F.mse_loss(pred.float(), target.float())
