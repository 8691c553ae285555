"""The classifier's optimizer and training length: ``train.optimizer`` and ``train.epochs``.

- :func:`build_optimizer`: AdamW (decoupled weight decay) or SGD (momentum, optional Nesterov, L2 weight decay), over
  the parameters that require grad (``model.freeze_backbone`` leaves only the head's).
- :func:`resolve_steps`: the one number of optimizer steps a run trains. ``train.epochs > 0`` decides it as
  ceil(epochs × training images / batch_size), the training images counted after the split protocol (val, pool,
  long-tail, shots, ``train_with_pool``); otherwise ``train.steps`` decides. The config is not changed: the trainer
  records the count in the ``resolved:`` section of the run's ``config.yaml``, so a run directory always says how
  long it trained.
"""

from __future__ import annotations

import math

import torch

from .config import Config, ConfigError


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the classifier has no trainable parameter (check model.freeze_backbone)")
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                               weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def resolve_steps(cfg: Config, num_train: int) -> int:
    """Optimizer steps of the run (see the module doc)."""
    t = cfg.train
    if t.epochs > 0:
        return max(1, math.ceil(t.epochs * num_train / t.batch_size))
    return t.steps
