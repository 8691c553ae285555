"""Moved to :mod:`online_aug.edit_quality` (which works on tensors, not on a ``Splits``).

Temporary: generator builds started before the move import these names when they reach their quality gate. Delete
this file once no such run is left.
"""

from __future__ import annotations

from typing import Any

from online_aug.edit_quality import HIGH_S, LOW_S, TARGET_RATE_MIN, fit_pixel_classifier, format_quality_table
from online_aug.edit_quality import evaluate_edit_quality as _evaluate
from online_aug.edit_quality import pixel_features as _pixels
from online_aug.generator.prompts import class_prompts, resolve_class_names

__all__ = ["HIGH_S", "LOW_S", "TARGET_RATE_MIN", "_pixels", "_split_images", "evaluate_edit_quality",
           "fit_pixel_classifier", "format_quality_table"]


def _split_images(splits: Any) -> Any:
    tr = splits.train
    if hasattr(tr, "tensors"):
        return tr.tensors()
    import torch  # a LabeledImages loaded before tensors() existed

    return torch.stack([tr[i][0] for i in range(len(tr))]), tr.labels


def evaluate_edit_quality(model_dir: Any, splits: Any, *, prompt: str = "a photo of the digit {name}",
                          class_names: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    names = resolve_class_names(list(class_names or []), splits.class_names)
    x, y = _split_images(splits)
    return _evaluate(model_dir, x, y, class_prompts(prompt, names), **kw)
