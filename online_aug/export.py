"""Export a trained run as a timm / Hugging Face folder: ``model.safetensors`` + ``config.json``.

The folder is what ``timm``'s own ``save_for_hf`` writes (and ``push_to_hf_hub`` uploads): ``config.json`` holds
``architecture``, ``num_classes``, ``label_names`` and a ``pretrained_cfg`` with the preprocessing the run trained
with (``mean`` / ``std`` from the checkpoint's classifier, ``input_size`` = ``data.image_size``, ``crop_pct`` 1 and
``crop_mode`` 'squash': the evaluation resizes the whole image to the input size). Copies of ``mean``, ``std`` and
``input_size`` sit at the top level too, with an ``online_aug`` block recording where the weights came from. Load it
with either of::

    timm.create_model("local-dir:EXPORT", pretrained=True)
    cfg = json.load(open("EXPORT/config.json"))
    timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="EXPORT/model.safetensors"))

and preprocess with ``timm.data.create_transform(**timm.data.resolve_data_config(model=m))``. The overlay must carry
the export's ``pretrained_cfg``, not only ``file``: with ``file`` alone timm keeps the architecture's registry config,
compares N with its 1000 classes and drops the trained head, and resolves ImageNet's mean/std instead of the run's.

Weights come from the run's DeepSpeed checkpoint: ZeRO stage 0 saves the whole module in
``mp_rank_00_model_states.pt``; stages 1-3 are consolidated with DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``. The tag is ``best`` for a ``train.select=val`` run (the weights its final
metrics describe), else the newest complete one (:func:`online_aug.checkpoint.final_tag`, the rule a resume uses).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CKPT, final_tag
from .config import Config, ConfigError, DataConfig, ModelConfig, load_config, planned_steps


def find_checkpoint(run_dir: Path, cfg: Config, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) of the weights to export; a one-line ConfigError naming the folder otherwise."""
    ckpt = run_dir / CKPT
    if tag is None:
        tag = final_tag(ckpt, cfg.train.select)
        if tag is None:
            raise ConfigError(f"{run_dir}: no checkpoint to export ({ckpt / 'latest'} is missing; did the run "
                              f"finish?)")
    if not (ckpt / tag / "mp_rank_00_model_states.pt").is_file():
        raise ConfigError(f"{ckpt / tag}: no DeepSpeed checkpoint (mp_rank_00_model_states.pt) in this folder")
    return ckpt, tag


def read_state_dict(ckpt: Path, tag: str) -> tuple[dict[str, torch.Tensor], int]:
    """(the classifier's state dict: ``net.*``, ``mean``, ``std``; the step it was saved at) from a DeepSpeed
    checkpoint; ZeRO 1-3 give DeepSpeed's consolidated fp32 master weights."""
    states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    step = int(states.get("step", -1))
    if any((ckpt / tag).glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)), step
    return dict(states["module"]), step


def config_preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    """mean / std as :class:`online_aug.model.Classifier` derives them from the config (no weights loaded)."""
    import timm

    dc = timm.create_model(cfg.name, pretrained=False).pretrained_cfg if cfg.pretrained else {}
    return [float(v) for v in dc.get("mean", (0.5,) * 3)], [float(v) for v in dc.get("std", (0.5,) * 3)]


def _carried(sd: dict[str, torch.Tensor], name: str, exact: list[float]) -> list[float]:
    """The checkpoint's ``mean`` / ``std`` buffer. A bf16/fp16 run stores them rounded: the config's exact values
    are used when they round to the stored ones (a checkpoint from before the buffers were saved: the config's)."""
    buf = sd.get(name)
    if buf is None:
        return exact
    if buf.dtype != torch.float32 and torch.equal(torch.tensor(exact).to(buf.dtype), buf.flatten()):
        return exact
    return [float(v) for v in buf.float().flatten()]


def class_names(cfg: Config) -> list[str]:
    """The run's class names without building its splits (no image is decoded)."""
    if cfg.aug.class_names:
        return list(cfg.aug.class_names)
    d: DataConfig = cfg.data
    if d.dataset == "digits":
        from .data import DIGIT_NAMES

        return list(DIGIT_NAMES)
    if d.dataset == "imagefolder":
        root = Path(d.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={d.root!r} (the class names) is not a folder here; export where it is")
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    import torchvision

    cls = torchvision.datasets.CIFAR10 if d.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return list(cls(d.root, train=False, download=False).classes)
    except RuntimeError as e:
        raise ConfigError(f"data.root={d.root!r}: {d.dataset} not found (its class names): {e}") from e


def _final_row(run_dir: Path, steps: int) -> dict[str, Any]:
    path = run_dir / "summary.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or int(rows[-1]["step"]) != steps:
        return {}
    return {k: float(v) if k.startswith("eval_") and v not in ("", None) else v for k, v in rows[-1].items()}


def export_run(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None) -> Path:
    """Write ``out`` (default ``RUN_DIR/export``) from the run's checkpoint; returns the folder."""
    import timm
    from timm.models import save_for_hf

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    ckpt, tag = find_checkpoint(run_dir, cfg, tag)
    sd, step = read_state_dict(ckpt, tag)
    exact_mean, exact_std = config_preprocessing(cfg.model)
    mean, std = _carried(sd, "mean", exact_mean), _carried(sd, "std", exact_std)
    net = {k.removeprefix("net."): v.float() if v.is_floating_point() else v for k, v in sd.items()
           if k.startswith("net.")}
    names = class_names(cfg)
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=len(names))
    try:
        model.load_state_dict(net, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{ckpt / tag}: the weights do not fit {cfg.model.name} with {len(names)} classes "
                          f"({str(e).splitlines()[0]})") from e
    model.eval()
    size = (3, cfg.data.image_size, cfg.data.image_size)
    data_config = {"input_size": size, "mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0,
                   "crop_mode": "squash", "interpolation": "bilinear"}
    final = _final_row(run_dir, planned_steps(run_dir / "config.yaml", cfg))
    provenance = {"run_dir": str(run_dir.resolve()), "checkpoint_tag": tag, "step": step,
                  "select": cfg.train.select, "eval_split": cfg.train.eval_split,
                  "metrics": {k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_")}}
    out = Path(out) if out is not None else run_dir / "export"
    save_for_hf(model, str(out), safe_serialization=True, data_config=data_config,
                model_config={"label_names": names, "mean": list(mean), "std": list(std), "input_size": list(size),
                              "online_aug": provenance})
    # safetensors writes model.safetensors through a private (0600) temporary file; the folder is meant to be shared
    # (and uploaded) like config.json, so both get the mode the umask gives a new file
    mode = 0o666 & ~_umask()
    for name in ("model.safetensors", "config.json"):
        if (out / name).is_file():
            (out / name).chmod(mode)
    return out


def _umask() -> int:
    import os

    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
