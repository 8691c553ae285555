"""The classifier: a timm model by name, with input normalisation built in (images arrive in [0, 1])."""

from __future__ import annotations

import timm
import torch
from torch import nn

from .config import ConfigError, ModelConfig


class Classifier(nn.Module):
    """``timm.create_model`` behind a fixed normalisation, so checkpoints carry their preprocessing."""

    def __init__(self, cfg: ModelConfig, num_classes: int, in_chans: int = 3):
        super().__init__()
        try:
            self.net = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes,
                                         in_chans=in_chans, drop_rate=cfg.drop_rate)
        except RuntimeError as e:
            raise ConfigError(f"model.name={cfg.name!r}: {e}") from e
        dc = self.net.pretrained_cfg if cfg.pretrained else {}
        mean = dc.get("mean", (0.5, 0.5, 0.5))
        std = dc.get("std", (0.5, 0.5, 0.5))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def create_classifier(cfg: ModelConfig, num_classes: int) -> Classifier:
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model (see timm.list_models())")
    return Classifier(cfg, num_classes)
