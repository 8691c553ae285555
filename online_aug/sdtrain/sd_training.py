"""The pieces of Stable-Diffusion training that the tiny-SD builder (:mod:`online_aug.sdtrain.tiny_sd`) and the
fine-tuning of learned tokens / LoRA (:mod:`online_aug.sdtrain.finetune`) share: which images a batch draws, latents
sampled from the VAE posterior, and the denoising loss; and the image stream of fine-tuning (:class:`StreamedImages`,
:class:`StepBatchSampler`): each step decodes only its batch from the original files, at the generator's resolution.

The noising step is the diffusers training recipe (``examples/text_to_image/train_text_to_image.py``): a
``DDPMScheduler`` built from the model's scheduler config (same betas, so the same ``alphas_cumprod``) noises the
latents with ``add_noise`` and gives the v-prediction target with ``get_velocity``. Whatever scheduler class a model
ships for sampling (DDIM, PNDM, Euler), its training noise is this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler


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


# ---------------------------------------------------------------- the fine-tuning image stream

CROPS = ("center", "random")
_DATA_STREAM = 7  # keys the data draws apart from the noise draws of the same (seed, step)


def resize_crop(img: Tensor, resolution: int, top: float, left: float, flip: bool) -> Tensor:
    """diffusers' train_text_to_image.py preprocessing on a ``[3, H, W]`` image in [0, 1]: resize the shorter side to
    ``resolution`` (bilinear, antialiased, as :meth:`LabeledImages.tensors` resizes), crop a square at the relative
    offsets ``top`` / ``left`` in [0, 1] (0.5, 0.5: the centre crop), optionally flip; returns it in [-1, 1]."""
    h, w = img.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    if size != (h, w):
        img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    y0, x0 = round(top * (size[0] - resolution)), round(left * (size[1] - resolution))
    img = img[:, y0:y0 + resolution, x0:x0 + resolution]
    if flip:
        img = img.flip(-1)
    return img * 2 - 1


class StreamedImages(Dataset):
    """Training images decoded one at a time from the data set's stored originals (``images.pil(i, resize=False)``:
    the file of an image folder, not a copy at the classifier's resolution), resized and cropped to the generator's
    resolution. Indexed by ``(i, top, left, flip)`` as :class:`StepBatchSampler` draws them, so a sample is a
    function of its key: the stream resumes exactly and worker processes change nothing."""

    def __init__(self, images: Any, resolution: int):
        self.images, self.resolution = images, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, float, float, bool]) -> tuple[Tensor, int]:
        i, top, left, flip = key
        arr = np.asarray(self.images.pil(i, resize=False), dtype=np.uint8)
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
        return resize_crop(img, self.resolution, top, left, flip), int(self.images.labels[i])


class StepBatchSampler(Sampler[list[tuple[int, float, float, bool]]]):
    """The keys of steps ``start .. stop - 1``: ``batch_size`` images drawn with ``weights`` (with replacement), each
    with its crop offsets and flip. Step k's draws depend only on (seed, k)."""

    def __init__(self, weights: Tensor, batch_size: int, seed: int, start: int, stop: int, crop: str, hflip: bool):
        w = weights.double().numpy()
        self.p = w / w.sum()
        self.bs, self.seed, self.start, self.stop, self.crop, self.hflip = batch_size, seed, start, stop, crop, hflip

    def keys(self, step: int) -> list[tuple[int, float, float, bool]]:
        rng = np.random.default_rng([self.seed, step, _DATA_STREAM])
        idx = rng.choice(len(self.p), size=self.bs, p=self.p)
        offsets = rng.random((self.bs, 2)) if self.crop == "random" else np.full((self.bs, 2), 0.5)
        flips = rng.random(self.bs) < 0.5 if self.hflip else np.zeros(self.bs, bool)
        return [(int(i), float(t), float(u), bool(f)) for i, (t, u), f in zip(idx, offsets, flips)]

    def __iter__(self) -> Iterator[list[tuple[int, float, float, bool]]]:
        return (self.keys(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
