"""CLIP filtering of edited images (Diff-Mix, Wang et al. 2024, supplementary §7.1 "Data-Cleaning Strategy").

Diff-Mix scores every synthetic image with CLIP (openai/clip-vit-base-patch32) against a positive caption
"a photo with a [metaclass] on it" and a negative caption "a photo without a [metaclass] on it", and drops the 10%
with the lowest confidence in the positive caption. The paper filters a cached synthetic set once; online there is
no finished set to rank, so here an edit is dropped when its score falls below a *running* quantile: the
``fraction``-quantile of the last ``history`` scores (this batch included). Dropped edits fall back to the real image
and its hard label (:class:`online_aug.augment.Augmenter` does that with the returned keep mask), and only edited
images are ever scored, so a real sample is never dropped.

Warm-up: the window starts empty and holds every score seen so far until it is full. The first batch is therefore
ranked against itself (exactly ``floor(fraction * M)`` of its M edits are dropped when the scores are distinct), and
the threshold settles as the window fills; from then on it is the quantile of the last ``history`` scores, so a
batch that is worse than recent ones loses more than ``fraction`` of its edits and a better one loses fewer.

The two caption embeddings are computed once at construction; per batch only the vision tower runs. Images are
resized and normalised on their own device (no PIL round trip), as ``CLIPImageProcessor`` would: shortest side to the
model's input size (bicubic), centre crop, mean/std normalisation.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from online_aug.config import ConfigError
from online_aug.devices import resolve_dtype
from online_aug.generator.hub import pretrained_source

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTokenizer

    from online_aug.config import AugConfig

POSITIVE = "a photo with a {metaclass} on it"
NEGATIVE = "a photo without a {metaclass} on it"
HISTORY = 2048  # scores in the running window: ~30 batches of 64 edits; long enough for a stable 10% quantile

# CLIP's own normalisation (transformers.utils.constants.OPENAI_CLIP_MEAN/STD), used when the folder has no
# preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RunningQuantile:
    """Keep mask for a stream of scores: drop those below the ``fraction``-quantile of the last ``history`` scores.

    The threshold is ``sorted(window)[floor(fraction * len(window))]`` with the current batch already in the
    window; a score equal to the threshold is kept, so ties never push the drop rate above ``fraction``.
    Non-finite scores are dropped and never enter the window.
    """

    def __init__(self, fraction: float, history: int = HISTORY) -> None:
        # fraction in [0, 1) is config.validate's check (aug.filter_fraction)
        if history < 1:
            raise ConfigError(f"CLIP filter history must be >= 1, got {history}")
        self.fraction = float(fraction)
        self.window: deque[float] = deque(maxlen=int(history))
        self.threshold = -math.inf

    def __call__(self, scores: Tensor) -> Tensor:
        finite = torch.isfinite(scores)
        self.window.extend(scores[finite].detach().float().cpu().tolist())
        if self.fraction == 0 or not self.window:
            return finite
        ranked = sorted(self.window)
        self.threshold = ranked[int(self.fraction * len(ranked))]
        return finite & (scores >= self.threshold)


class CLIPEditFilter:
    """``(edited [M,3,H,W] in [0,1], target classes [M]) -> keep [M] bool``, the Augmenter's ``edit_filter``.

    ``targets`` are accepted for the hook's signature; Diff-Mix's captions name only the metaclass, so every class
    shares the same two text embeddings.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, metaclass: str, fraction: float, *,
                 history: int = HISTORY, image_mean: tuple[float, ...] = CLIP_MEAN,
                 image_std: tuple[float, ...] = CLIP_STD, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        # an empty metaclass (a caption about nothing) is config.validate's error (aug.filter_metaclass)
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(image_mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.captions = [POSITIVE.format(metaclass=metaclass), NEGATIVE.format(metaclass=metaclass)]
        self.text_embeds = self._encode_text(tokenizer, self.captions)  # [2, D], unit norm, computed once
        self.quantile = RunningQuantile(fraction, history)

    @torch.inference_mode()
    def _encode_text(self, tokenizer: CLIPTokenizer, captions: list[str]) -> Tensor:
        tok = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        # text_model + projection rather than get_text_features: its return type changed across transformers versions
        out = self.model.text_model(input_ids=tok.input_ids.to(self.device),
                                    attention_mask=tok.attention_mask.to(self.device))
        emb = self.model.text_projection(out.pooler_output).float()
        return F.normalize(emb, dim=-1)

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_pixels(images, self.size, self.mean, self.std, self.dtype)

    @torch.inference_mode()
    def scores(self, images: Tensor) -> Tensor:
        """[M] probability of the positive caption (softmax over the two captions at CLIP's logit scale)."""
        if len(images) == 0:
            return torch.zeros(0, device=self.device)
        out = self.model.vision_model(pixel_values=self.preprocess(images.to(self.device)))
        img = F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * img @ self.text_embeds.T
        return logits.softmax(-1)[:, 0]

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        keep = self.quantile(self.scores(images))
        return keep.to(images.device)


def clip_pixels(images: Tensor, size: int, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    """[M,3,H,W] in [0,1] -> CLIP pixel values: shortest side to ``size`` (bicubic), centre crop, normalise
    (``mean`` / ``std`` as [1,3,1,1] on the images' device)."""
    x = images.float().nan_to_num(0.0).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=nh < h or nw < w)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    return ((x - mean) / std).to(dtype)


def load_clip(name: str) -> tuple[CLIPModel, CLIPTokenizer, tuple[float, ...], tuple[float, ...]]:
    """CLIPModel, tokenizer and normalisation (mean, std) from a local folder or hub id (the ``aug.filter_model`` key).

    Raises:
        ConfigError: naming ``aug.filter_model`` when the folder is missing/incomplete or the hub id cannot be
            loaded (with HF_HUB_OFFLINE=1 only the local cache is searched).
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    src = pretrained_source("aug.filter_model", name, "point aug.filter_model at a CLIP folder or a hub id such as "
                                                      "openai/clip-vit-base-patch32, or set aug.filter_fraction=0")
    source, kw = src.path, src.kwargs
    if src.local and not (Path(source) / "config.json").is_file():
        raise ConfigError(f"aug.filter_model={name!r}: the folder has no config.json; save a CLIPModel there with "
                          f"model.save_pretrained(...) and its tokenizer with tokenizer.save_pretrained(...)")
    try:
        model = CLIPModel.from_pretrained(source, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, **kw)
    except Exception as e:  # every loader failure becomes one actionable message, chained
        raise src.error("CLIP model and tokenizer", e) from e
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        proc = CLIPImageProcessor.from_pretrained(source, **kw)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except OSError:
        pass  # no preprocessor_config.json: CLIP's own constants (what every released CLIP uses)
    return model, tokenizer, mean, std


def build_clip_filter(aug: AugConfig, class_names: list[str], device: torch.device) -> CLIPEditFilter:
    """The edit filter of a run (``aug.filter_fraction > 0``), on the generator's device and dtype."""
    model, tokenizer, mean, std = load_clip(aug.filter_model)
    return CLIPEditFilter(model, tokenizer, aug.filter_metaclass, aug.filter_fraction, image_mean=mean,
                          image_std=std, device=device, dtype=resolve_dtype(aug.dtype, device))
