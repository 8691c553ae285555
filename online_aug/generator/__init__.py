"""The frozen Stable Diffusion of online augmentation: loading, prompts, per-sample schedulers, batched SDEdit, the
CLIP edit filter and the fine-tuned (learned tokens / LoRA) folder format.

SDEdit: Meng et al., ICLR 2022; the grid schedule follows diffusers' ``StableDiffusionImg2ImgPipeline``. Nothing here
knows about data sets or training: callers pass class names, prompts and image tensors.
"""

from online_aug.generator.loading import SDComponents, load_sd, load_taesd
from online_aug.generator.prompts import class_prompts, render_prompt, resolve_class_names
from online_aug.generator.schedulers import PerSampleScheduler, Schedule, fewstep_schedule
from online_aug.generator.sdedit import SDEditGenerator

__all__ = [
    "PerSampleScheduler",
    "SDComponents",
    "SDEditGenerator",
    "Schedule",
    "class_prompts",
    "fewstep_schedule",
    "load_sd",
    "load_taesd",
    "render_prompt",
    "resolve_class_names",
]
