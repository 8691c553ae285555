"""Frozen Stable Diffusion for online augmentation: loading, prompt cache and batched per-sample SDEdit.

SDEdit: Meng et al., ICLR 2022; the grid schedule follows diffusers' ``StableDiffusionImg2ImgPipeline``.
"""

from online_aug.generator.loading import SDComponents, load_sd, load_taesd
from online_aug.generator.schedulers import PerSampleScheduler, Schedule, fewstep_schedule
from online_aug.generator.sdedit import SDEditGenerator, resolve_dtype

__all__ = [
    "PerSampleScheduler",
    "SDComponents",
    "SDEditGenerator",
    "Schedule",
    "fewstep_schedule",
    "load_sd",
    "load_taesd",
    "resolve_dtype",
]
