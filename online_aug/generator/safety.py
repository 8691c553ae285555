"""Stable Diffusion's safety checker on edits (``aug.safety_checker``; off by default, and then never loaded).

DA-Fusion (Trabucco et al. 2024, App. A) generates with the checker on and samples again when it fires. Online, a
flagged edit is re-sampled once (fresh noise, same source, strength and prompt) by the augmenter; an edit flagged
twice trains as its real image with its hard label, as a non-finite or filtered edit does. The checker is diffusers'
``StableDiffusionSafetyChecker`` and its ``forward`` decides (the pipeline's rule); its CLIP input is made on the
edits' device with the CLIP filter's preprocessing (no PIL round trip).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from online_aug.generator.clip_filter import CLIP_MEAN, CLIP_STD, clip_pixels
from online_aug.generator.hub import pretrained_source

FROM_MODEL = "model"  # aug.safety_checker=model: the safety_checker/ and feature_extractor/ of aug.model


class SafetyChecker:
    """``checker(images [M,3,H,W] in [0,1]) -> [M] bool``, True where the SD safety checker flags the image."""

    def __init__(self, checker: Any, image_mean: tuple[float, ...] = CLIP_MEAN,
                 image_std: tuple[float, ...] = CLIP_STD, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.checker = checker.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.size = int(checker.config.vision_config.image_size)
        self.mean = torch.tensor(image_mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.bool, device=images.device)
        pixels = clip_pixels(images.to(self.device), self.size, self.mean, self.std, self.dtype)
        _, flagged = self.checker(clip_input=pixels, images=images.detach().clone())  # it blacks out its copy
        return torch.as_tensor(flagged, dtype=torch.bool).to(images.device)


def load_safety_checker(name: str, model: str, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
    """The ``aug.safety_checker`` setting: ``model`` (``aug.model``'s ``safety_checker/`` and ``feature_extractor/``),
    or a folder / hub id holding the checker and its ``preprocessor_config.json`` (e.g.
    ``CompVis/stable-diffusion-safety-checker``).

    Raises:
        ConfigError: naming ``aug.safety_checker`` when it cannot be loaded.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from_model = name == FROM_MODEL
    src = pretrained_source("aug.safety_checker", name, "give a folder or hub id with a StableDiffusionSafetyChecker "
                            "(e.g. CompVis/stable-diffusion-safety-checker), 'model' for aug.model's own, or '' (off)",
                            name=model if from_model else name)
    sub_checker, sub_proc = ("safety_checker", "feature_extractor") if from_model else ("", "")
    source, kw = src.path, src.kwargs
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(source, subfolder=sub_checker, **kw)
    except Exception as e:  # every loader failure becomes one actionable message, chained
        raise src.error("StableDiffusionSafetyChecker", e, subfolder=sub_checker) from e
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        proc = CLIPImageProcessor.from_pretrained(source, subfolder=sub_proc, **kw)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except OSError:
        pass  # no preprocessor config: CLIP's own constants (what the released checker uses)
    return SafetyChecker(checker, mean, std, device=device, dtype=dtype)
