"""Training transforms for real photos: timm's ``create_transform`` (``train.transform=timm``).

The dataset hands the transform the image at its stored resolution (a 500 px photo, not a 224 px copy of it): the
transform's random-resized-crop picks a region of the original and resizes it to ``data.image_size``, then flips,
colour-jitters and applies ``train.randaugment``, as timm's ImageNet training recipe does. Only the PIL stages are used:
to-tensor happens in the dataset and normalisation inside the classifier (:mod:`online_aug.model`), so the generator
and the classifier see the same [0, 1] pixels. Evaluation keeps the plain resize to ``data.image_size`` (what an
exported classifier's ``crop_mode='squash'``, ``crop_pct=1`` describe).
"""

from __future__ import annotations

import random

import torch
from PIL import Image

from ..config import Config


class TimmTrainTransform:
    """PIL → PIL: timm's primary (random-resized-crop, flip) and secondary (RandAugment or colour jitter) stages."""

    full_resolution = True  # LabeledImages skips its resize: the crop comes from the stored image

    def __init__(self, cfg: Config):
        from timm.data import create_transform
        from torchvision import transforms

        t = cfg.train
        primary, secondary, _final = create_transform(
            input_size=cfg.data.image_size, is_training=True, scale=tuple(t.crop_scale), hflip=t.hflip,
            color_jitter=t.color_jitter if t.color_jitter > 0 else None, auto_augment=t.randaugment or None,
            interpolation="bilinear", separate=True)
        self.pipeline = transforms.Compose([*primary.transforms, *secondary.transforms])

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.with_geometry(img)[0]

    def with_geometry(self, img: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int, int]]:
        """The transformed image and its geometry ``(top, left, height, width, flipped)``: the crop box in the
        stored image's pixels and the horizontal flip, what :class:`~online_aug.data.datasets.EditSourceReader`
        repeats at the generator's resolution (``aug.edit_source=full``). The geometric stages draw their randomness
        exactly as timm's own calls would (the same crops for the same seed); the photometric stages follow."""
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision.transforms import RandomHorizontalFlip
        from torchvision.transforms import functional as TF

        top, left, (width, height), flipped = 0, 0, img.size, 0
        rest = []
        for t in self.pipeline.transforms:
            if isinstance(t, RandomResizedCropAndInterpolation) and not rest:
                top, left, height, width = t.get_params(img, t.scale, t.ratio)
                interp = t.interpolation
                if isinstance(interp, (tuple, list)):  # timm's random interpolation, drawn after the box as there
                    interp = random.choice(interp)
                img = TF.resized_crop(img, top, left, height, width, list(t.size), interp)
            elif isinstance(t, RandomHorizontalFlip) and not rest:
                if torch.rand(1) < t.p:  # torchvision's own draw
                    img, flipped = TF.hflip(img), 1
            else:  # the secondary stages (colour jitter, RandAugment) act on the view only: RandAugment's own
                rest.append(t)  # rotations/shears are not repeated on the edit source, which keeps the crop and flip
        for t in rest:
            img = t(img)
        return img, (top, left, height, width, flipped)

    def __repr__(self) -> str:
        return f"TimmTrainTransform({self.pipeline})"


def build_train_transform(cfg: Config):
    """The training split's PIL transform for ``train.transform`` (None: images as stored)."""
    if cfg.train.transform == "timm":
        return TimmTrainTransform(cfg)
    if cfg.train.randaugment:  # transform=none: RandAugment alone, on the image at data.image_size (digits presets)
        from timm.data.auto_augment import rand_augment_transform

        return rand_augment_transform(cfg.train.randaugment, {"translate_const": int(cfg.data.image_size * 0.45)})
    return None
