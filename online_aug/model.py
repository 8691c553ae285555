"""The classifier: a timm model by name, with input normalisation built in (images arrive in [0, 1])."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .config import ConfigError, ModelConfig


class Classifier(nn.Module):
    """``timm.create_model`` behind a fixed normalisation. ``mean`` / ``std`` are persistent buffers, so every
    checkpoint carries its preprocessing (``tools/export.py`` writes them into the exported config.json).

    ``model.freeze_backbone``: only the timm head (``get_classifier()``) trains; the backbone's parameters do not
    require grad and it stays in eval mode (fixed BatchNorm statistics, no dropout) even when the engine trains.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, in_chans: int = 3):
        super().__init__()
        overlay = {"file": cfg.pretrained_file} if cfg.pretrained and cfg.pretrained_file else None
        if overlay and not Path(cfg.pretrained_file).is_file():
            raise ConfigError(f"model.pretrained_file={cfg.pretrained_file!r} is not a file")
        try:
            self.net = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes,
                                         in_chans=in_chans, drop_rate=cfg.drop_rate, pretrained_cfg_overlay=overlay)
        except RuntimeError as e:
            raise ConfigError(f"model.name={cfg.name!r}: {e}") from e
        dc = self.net.pretrained_cfg if cfg.pretrained else {}
        mean = dc.get("mean", (0.5, 0.5, 0.5))
        std = dc.get("std", (0.5, 0.5, 0.5))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.frozen = cfg.freeze_backbone
        if self.frozen:
            head = {id(p) for p in self.net.get_classifier().parameters()}
            if not head:
                raise ConfigError(f"model.freeze_backbone=true: {cfg.name!r} has no classifier head to train")
            for p in self.net.parameters():
                p.requires_grad_(id(p) in head)
            self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if getattr(self, "frozen", False):
            self.net.eval()
            self.net.get_classifier().train(mode)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # checkpoints written before mean/std were persistent lack them: keep the config's values
        for name in ("mean", "std"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def create_classifier(cfg: ModelConfig, num_classes: int) -> Classifier:
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model (see timm.list_models())")
    return Classifier(cfg, num_classes)
