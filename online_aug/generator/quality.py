"""Quality gate for a (tiny) Stable Diffusion used as an SDEdit augmenter: do inter-class edits land on the target?

A simple pixel classifier (logistic regression on grayscale pixels at the model's resolution, class-balanced) is
fit on the real *training* images. Training images are then SDEdited toward a random target class != source with
:class:`~online_aug.generator.sdedit.SDEditGenerator`, in both schedule modes (few-step K-step DDIM and diffusers'
grid img2img), at a high strength (s=0.9: the edit should show the target) and a low one (s=0.25: the edit should
keep the source), plus the intermediate 0.7 and 0.5 for information. The rates are the fractions the classifier
judges as target / source.

The gate passes when the high-strength target rate is >= ``TARGET_RATE_MIN`` in every mode. The low-strength
source rate is reported (it should be high) but does not gate: it measures how conservative the schedule is, not
whether the model learned the classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from online_aug.data import Splits

TARGET_RATE_MIN = 0.80  # s=0.9 inter-class edits judged as the target class, in every mode
HIGH_S, LOW_S = 0.9, 0.25


def model_resolution(model_dir: str | Path) -> int:
    """Native pixel resolution of a diffusers SD folder: UNet sample_size x VAE scale factor."""
    d = Path(model_dir)
    unet = json.loads((d / "unet" / "config.json").read_text())
    vae = json.loads((d / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _pixels(x: torch.Tensor, size: int) -> np.ndarray:
    """[M, 3, H, W] in [0, 1] -> [M, size*size] grayscale features (antialiased resize)."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.float().mean(1).flatten(1).numpy()


def _split_images(splits: Splits) -> tuple[torch.Tensor, np.ndarray]:
    tr = splits.train
    if isinstance(tr.images, np.ndarray):
        x = torch.from_numpy(tr.images).permute(0, 3, 1, 2).float().div(255)
    else:
        x = torch.stack([tr[i][0] for i in range(len(tr))])
    return x, tr.labels


def fit_pixel_classifier(x: torch.Tensor, y: np.ndarray, size: int) -> Any:
    """Class-balanced logistic regression on grayscale pixels: balanced so tail targets are not judged unfairly."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced")
    clf.fit(_pixels(x, size), y)
    return clf


def evaluate_edit_quality(
    model_dir: str | Path,
    splits: Splits,
    *,
    prompt: str = "a photo of the digit {name}",
    class_names: list[str] | None = None,
    guidance_scale: float = 4.0,
    n_edits: int = 200,
    steps: int = 4,
    grid_steps: int = 25,
    strengths: tuple[float, ...] = (HIGH_S, 0.7, 0.5, LOW_S),
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run the inter-class SDEdit gate on ``model_dir`` with images from ``splits.train``.

    Returns a JSON-ready dict: per mode ("fewstep", "grid") and strength, ``target_rate``, ``source_rate`` and
    ``finite_rate``; the classifier's training accuracy; the settings; and ``passed``.
    """
    from tqdm.auto import tqdm

    from online_aug.generator import SDEditGenerator, load_sd

    names = list(class_names or splits.class_names)
    res = model_resolution(model_dir)
    x, y = _split_images(splits)
    # Edits run at the model's native resolution so the gate measures the model, not a resize round trip.
    x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    clf = fit_pixel_classifier(x, y, res)
    train_acc = float((clf.predict(_pixels(x, res)) == y).mean())

    rng = np.random.default_rng(seed)
    C = len(names)
    src_idx = rng.integers(0, len(y), size=n_edits)
    src = y[src_idx]
    tgt = (src + rng.integers(1, C, size=n_edits)) % C  # uniform over the C-1 classes != source

    comps = load_sd(str(model_dir), torch.device(device), torch.float32)
    prompts = [prompt.format(name=n) for n in names]
    result: dict[str, Any] = {
        "classifier": f"LogisticRegression(class_weight=balanced) on {res}x{res} grayscale pixels of splits.train",
        "classifier_train_acc": train_acc, "guidance_scale": guidance_scale, "n_edits": n_edits,
        "fewstep_steps": steps, "grid_steps": grid_steps, "scheduler": "ddim", "seed": seed,
        "edits": "splits.train images, target uniform over classes != source", "modes": {},
    }
    jobs = [(m, s) for m in ("fewstep", "grid") for s in strengths]
    for mode, s in tqdm(jobs, desc="quality gate", disable=not show_progress, dynamic_ncols=True):
        gen = SDEditGenerator(comps, prompts, guidance_scale=guidance_scale, schedule=mode, steps=steps,
                              grid_steps=grid_steps, scheduler="ddim", device=device, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        edited, finite = gen.edit(x[src_idx], torch.full((n_edits,), s), torch.from_numpy(tgt), generator=g)
        pred = clf.predict(_pixels(edited, res))
        result["modes"].setdefault(mode, {})[str(s)] = {
            "target_rate": float((pred == tgt).mean()),
            "source_rate": float((pred == src).mean()),
            "finite_rate": float(finite.float().mean()),
        }
    result["target_rate_min"] = TARGET_RATE_MIN
    if HIGH_S in strengths:
        result["passed"] = all(m[str(HIGH_S)]["target_rate"] >= TARGET_RATE_MIN for m in result["modes"].values())
    else:  # a custom strength set cannot be judged by the gate
        result["passed"] = None
    return result


def format_quality_table(q: dict[str, Any]) -> str:
    """A small text table of the gate numbers."""
    lines = [f"quality gate (guidance {q['guidance_scale']}, {q['n_edits']} inter-class edits per cell, "
             f"classifier train acc {q['classifier_train_acc']:.3f})",
             f"{'mode':<10}{'s':>6}{'target':>9}{'source':>9}{'finite':>9}"]
    for mode, cells in q["modes"].items():
        for s, c in cells.items():
            lines.append(f"{mode:<10}{s:>6}{c['target_rate']:>9.3f}{c['source_rate']:>9.3f}{c['finite_rate']:>9.3f}")
    verdict = {True: "PASS", False: "FAIL", None: "not judged"}[q["passed"]]
    lines.append(f"gate: s={HIGH_S} target rate >= {q['target_rate_min']} in every mode -> {verdict}")
    return "\n".join(lines)
