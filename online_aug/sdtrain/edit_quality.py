"""Do inter-class SDEdits land on their target? The measurement behind the tiny-SD builder's quality gate and
``tools/finetune_sd.py --eval``.

A simple pixel classifier (logistic regression on grayscale pixels at the model's resolution, class-balanced) is
fit on the given real images (the builder's or the fine-tuning's training images, never a test image). Images are
then SDEdited toward a random target class != source with :class:`~online_aug.generator.sdedit.SDEditGenerator`, in
each schedule mode (few-step K-step DDIM and diffusers' grid img2img) and strength; the rates are the fractions the
classifier judges as target / source. The draws of sources and targets are a function of the seed only, so two
models (a base model and its fine-tuned version) are compared on exactly the same edits.

The gate (:func:`evaluate_edit_quality`) runs a high strength (s=0.9: the edit should show the target), a low one
(s=0.25: the edit should keep the source) and 0.7, 0.5 for information, and passes when the high-strength target
rate is >= ``TARGET_RATE_MIN`` in every mode. The low-strength source rate is reported (it should be high) but does
not gate: it measures how conservative the schedule is, not whether the model learned the classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from online_aug.config import AugConfig
from online_aug.duplicates import NearDuplicateGuard
from online_aug.generator import SDComponents, SDEditGenerator, load_sd, resolve_class_names
from online_aug.generator.finetuned import apply_finetuned
from online_aug.generator.prompts import class_prompts

TARGET_RATE_MIN = 0.80  # s=0.9 inter-class edits judged as the target class, in every mode
HIGH_S, LOW_S = 0.9, 0.25
GATE_STRENGTHS = (HIGH_S, 0.7, 0.5, LOW_S)
MODES = ("fewstep", "grid")


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def pixel_features(x: Tensor, size: int) -> np.ndarray:
    """[M, 3, H, W] in [0, 1] -> [M, size*size] grayscale features (antialiased resize)."""
    return _resize(x.float(), size).mean(1).flatten(1).numpy()


def fit_pixel_classifier(x: Tensor, y: np.ndarray, size: int) -> Any:
    """Class-balanced logistic regression on grayscale pixels: balanced so tail targets are not judged unfairly."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced")
    clf.fit(pixel_features(x, size), y)
    return clf


def inter_class_edits(labels: np.ndarray, num_classes: int, n_edits: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image index, source class, target class)`` of ``n_edits`` edits; the target is uniform over the other
    classes."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(labels), size=n_edits)
    source = labels[index]
    target = (source + rng.integers(1, num_classes, size=n_edits)) % num_classes
    return index, source, target


def edit_target_rates(
    components: SDComponents,
    prompts: list[str],
    images: Tensor,
    labels: np.ndarray,
    *,
    strengths: tuple[float, ...] = (HIGH_S,),
    modes: tuple[str, ...] = MODES,
    n_edits: int = 200,
    guidance_scale: float = 4.0,
    steps: int = 4,
    grid_steps: int = 25,
    seed: int = 0,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    desc: str = "edit eval",
) -> dict[str, Any]:
    """Edit ``images`` (``[N, 3, H, W]`` in [0, 1], classes ``labels [N]``) toward ``prompts`` (one per class).

    Edits run at the model's native resolution (the images are resized to it), so the rates measure the model, not a
    resize round trip. Returns a JSON-ready dict: per mode and strength ``target_rate``, ``source_rate`` and
    ``finite_rate``, the classifier's training accuracy and the settings.
    """
    from tqdm.auto import tqdm

    res = int(components.unet.config.sample_size) * components.vae_scale_factor
    x = _resize(images.float(), res)
    y = np.asarray(labels)
    clf = fit_pixel_classifier(x, y, res)
    index, source, target = inter_class_edits(y, len(prompts), n_edits, seed)
    out: dict[str, Any] = {"classifier_train_acc": float((clf.predict(pixel_features(x, res)) == y).mean()),
                           "n_edits": n_edits, "guidance_scale": guidance_scale, "seed": seed, "modes": {}}
    jobs = [(m, s) for m in modes for s in strengths]
    for mode, s in tqdm(jobs, desc=desc, disable=not show_progress, dynamic_ncols=True):
        gen = SDEditGenerator(components, prompts, guidance_scale=guidance_scale, schedule=mode,  # type: ignore[arg-type]
                              steps=steps, grid_steps=grid_steps, scheduler="ddim", device=device,
                              dtype=components.unet.dtype)
        g = torch.Generator().manual_seed(seed)
        edited, finite = gen.edit(x[index].to(device), torch.full((n_edits,), s), torch.from_numpy(target),
                                  generator=g)
        pred = clf.predict(pixel_features(edited.cpu(), res))
        out["modes"].setdefault(mode, {})[str(s)] = {"target_rate": float((pred == target).mean()),
                                                     "source_rate": float((pred == source).mean()),
                                                     "finite_rate": float(finite.float().mean())}
    return out


def per_target_rates(
    components: SDComponents,
    prompts: list[str],
    images: Tensor,
    labels: np.ndarray,
    *,
    per_class: int = 50,
    strength: float = HIGH_S,
    guidance_scale: float = 4.0,
    steps: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    clf: Any = None,
) -> dict[str, Any]:
    """For every class c: ``per_class`` few-step edits of images of other classes toward c at ``strength``, and the
    share the pixel classifier judges as c (a per-target breakdown of :func:`edit_target_rates`: does the model
    still draw c?). The sources are a function of ``seed`` only, so two models are judged on the same edits; pass
    ``clf`` (:func:`fit_pixel_classifier` on ``images`` at the model's resolution) to judge them with one classifier."""
    res = int(components.unet.config.sample_size) * components.vae_scale_factor
    x = _resize(images.float(), res)
    y = np.asarray(labels)
    clf = clf if clf is not None else fit_pixel_classifier(x, y, res)
    rng = np.random.default_rng(seed)
    gen = SDEditGenerator(components, prompts, guidance_scale=guidance_scale, steps=steps, scheduler="ddim",
                          device=device, dtype=components.unet.dtype)
    rates = {}
    for c in range(len(prompts)):
        index = rng.choice(np.flatnonzero(y != c), size=per_class)
        edited, _ = gen.edit(x[index].to(device), torch.full((per_class,), strength),
                             torch.full((per_class,), c, dtype=torch.long),
                             generator=torch.Generator().manual_seed(seed + c))
        rates[c] = float((clf.predict(pixel_features(edited.cpu(), res)) == c).mean())
    return {"target_rate": rates, "per_class": per_class, "strength": strength, "guidance_scale": guidance_scale,
            "steps": steps, "seed": seed}


def class_diversity(
    components: SDComponents,
    prompts: list[str],
    images: Tensor,
    labels: np.ndarray,
    *,
    reference: tuple[Tensor, np.ndarray] | None = None,
    per_class: int = 30,
    strength: float = 0.5,
    guidance_scale: float = 4.0,
    steps: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Does the generator vary a class or copy it? For every class c: ``per_class`` intra-class edits of c's
    images (cycled) toward c at ``strength``, measured in the near-duplicate guard's feature space (8x8 grayscale,
    RMS distance; :class:`~online_aug.duplicates.NearDuplicateGuard`): ``spread``, the mean pairwise distance of the
    edits; ``copy_dist``, the mean distance of an edit to its nearest training image of c (~0: a copy); and
    ``real_spread``, the mean pairwise distance of real images of c (``reference``, e.g. the generator pool, else
    ``images``; None below 2 images). A generator that learned a 1-image class by heart has a spread far below the
    class's real spread."""
    feat, size = NearDuplicateGuard.features, NearDuplicateGuard.SIZE
    res = int(components.unet.config.sample_size) * components.vae_scale_factor
    x, y = _resize(images.float(), res), np.asarray(labels)
    rx, ry = (x, y) if reference is None else (_resize(reference[0].float(), res), np.asarray(reference[1]))
    gen = SDEditGenerator(components, prompts, guidance_scale=guidance_scale, steps=steps, scheduler="ddim",
                          device=device, dtype=components.unet.dtype)
    out: dict[str, Any] = {"strength": strength, "per_class": per_class, "seed": seed, "classes": {}}
    for c in range(len(prompts)):
        own = np.flatnonzero(y == c)
        if not len(own):
            continue
        index = np.resize(own, per_class)
        edited, _ = gen.edit(x[index].to(device), torch.full((per_class,), strength),
                             torch.full((per_class,), c, dtype=torch.long),
                             generator=torch.Generator().manual_seed(seed + c))
        f, f_train, f_real = feat(edited.cpu()), feat(x[own]), feat(rx[ry == c])
        out["classes"][str(c)] = {
            "n_train": int(len(own)),
            "spread": float(torch.pdist(f).mean()) / size,
            "copy_dist": float(torch.cdist(f, f_train).min(1).values.mean()) / size,
            "real_spread": float(torch.pdist(f_real).mean()) / size if len(f_real) > 1 else None,
        }
    return out


def load_run_generator(aug: AugConfig, class_names: list[str], device: str | torch.device = "cpu"
                       ) -> tuple[SDComponents, list[str]]:
    """The generator exactly as a run loads it (``aug.model`` + ``aug.textual_inversion`` / ``aug.lora`` at
    ``aug.lora_scale``), in fp32, and its class prompts (``aug.prompt`` with the learned tokens)."""
    components = load_sd(aug.model, device, torch.float32)
    names = resolve_class_names(aug.class_names, class_names)
    tokens = apply_finetuned(components, aug, len(names))
    return components, class_prompts(aug.prompt, names, tokens)


def generator_label_rates(aug: AugConfig, class_names: list[str], images: Tensor, labels: np.ndarray, *,
                          per_class: int = 50, strength: float = HIGH_S, seed: int = 0,
                          device: str | torch.device = "cpu") -> dict[str, Any]:
    """The per-class target rates behind ``aug.label_rates``: :func:`per_target_rates` of the generator exactly as
    a run loads it (``aug.model`` + ``aug.textual_inversion`` / ``aug.lora``, ``aug.prompt``, guidance, K), judged
    by the pixel classifier fit on ``images`` -- the classifier's own training split, so the calibration uses no
    image the classifier does not see."""
    components, prompts = load_run_generator(aug, class_names, device)
    out = per_target_rates(components, prompts, images, labels, per_class=per_class, strength=strength,
                           guidance_scale=aug.guidance_scale, steps=aug.steps, seed=seed, device=device)
    out.update(model=aug.model, textual_inversion=aug.textual_inversion, lora=aug.lora, prompt=aug.prompt,
               judge="LogisticRegression on grayscale pixels of the classifier's training split",
               chance=1.0 / len(prompts))
    return out


def evaluate_edit_quality(
    model_dir: str | Path,
    images: Tensor,
    labels: np.ndarray,
    prompts: list[str],
    *,
    guidance_scale: float = 4.0,
    n_edits: int = 200,
    steps: int = 4,
    grid_steps: int = 25,
    strengths: tuple[float, ...] = GATE_STRENGTHS,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """The quality gate of the model at ``model_dir`` (loaded in fp32), on the images it was trained on.

    Returns :func:`edit_target_rates`' numbers for both modes with the settings and ``passed`` (None when
    ``strengths`` lacks the gate's high strength).
    """
    comps = load_sd(str(model_dir), torch.device(device), torch.float32)
    rates = edit_target_rates(comps, prompts, images, labels, strengths=strengths, modes=MODES, n_edits=n_edits,
                              guidance_scale=guidance_scale, steps=steps, grid_steps=grid_steps, seed=seed,
                              device=device, show_progress=show_progress, desc="quality gate")
    res = int(comps.unet.config.sample_size) * comps.vae_scale_factor
    result: dict[str, Any] = {
        "classifier": f"LogisticRegression(class_weight=balanced) on {res}x{res} grayscale pixels of the training "
                      f"images",
        "classifier_train_acc": rates["classifier_train_acc"], "guidance_scale": guidance_scale, "n_edits": n_edits,
        "fewstep_steps": steps, "grid_steps": grid_steps, "scheduler": "ddim", "seed": seed,
        "edits": "training images, target uniform over classes != source", "modes": rates["modes"],
        "target_rate_min": TARGET_RATE_MIN,
    }
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
