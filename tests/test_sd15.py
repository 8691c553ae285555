"""SD 1.5's architecture (its published UNet/VAE/CLIP configs with random weights, built in code by
online_aug.sdtrain.sd15, at a 64 px sample size) through the real user's paths: one TI + LoRA fine-tuning step, then a
training run that loads the model through ``aug.model`` with the fine-tuned tokens and LoRA and trains one
online-augmented step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from online_aug.config import load_config
from online_aug.data import build_splits
from online_aug.sdtrain.finetune import finetune, recipe_options
from online_aug.sdtrain.sd15 import save_sd15

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64  # px: latents 8 x 8, the smallest SD 1.5's three down-samplings allow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    return save_sd15(tmp_path_factory.mktemp("sd15") / "sd", sample_size=SIDE)  # ~1.7 GB of fp16 weights


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _data(photos: Path) -> list[str]:
    return ["data.dataset=imagefolder", f"data.root={photos}", "data.image_size=32", "data.test_fraction=0.25",
            "data.imbalance_ratio=1", "data.val_per_class=0", "data.pool_fraction=0"]


@pytest.fixture(scope="module")
def tuned(sd15: Path, photos: Path, tmp_path_factory) -> Path:
    cfg = load_config(None, [*_data(photos), "aug.prompt=a photo of a {name}"])
    out = tmp_path_factory.mktemp("ft") / "ti-lora"
    opts = recipe_options("diff-mix", steps=1, batch_size=2, resolution=SIDE, lr=1e-2, lora_lr=1e-2,
                          show_progress=False)
    finetune(cfg, build_splits(cfg.data), str(sd15), out, opts)
    return out


def test_one_ti_lora_step_on_sd15(sd15: Path, tuned: Path) -> None:
    from transformers import CLIPTextModel

    manifest = json.loads((tuned / "manifest.json").read_text())
    assert manifest["steps"] == 1 and manifest["lora"]["rank"] == 10  # Diff-Mix's rank (recipe), at SD 1.5's size
    lora = load_file(tuned / manifest["lora"]["file"])
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # the zero-initialised up-projections moved
    te = CLIPTextModel.from_pretrained(sd15 / "text_encoder", torch_dtype=torch.float32)
    table = te.get_input_embeddings().weight
    for rec in manifest["classes"].values():
        (emb,) = load_file(tuned / rec["file"]).values()
        assert emb.shape[-1] == 768 and emb.reshape(-1, 768).shape[0] >= 1  # CLIP ViT-L's width
        assert not any(torch.allclose(emb.reshape(-1, 768)[0], row) for row in table[:300])  # learned, not a copy


def test_online_step_loads_sd15_through_aug_model(sd15: Path, tuned: Path, photos: Path, tmp_path: Path,
                                                  clean_env: dict[str, str]) -> None:
    out = tmp_path / "runs"
    cmd = [sys.executable, "train.py", "--config", "configs/baseline.yaml", "run.name=sd15", f"run.out_dir={out}",
           *_data(photos), "train.steps=1", "train.eval_every=1", "train.log_every=1", "train.batch_size=8",
           "aug.alpha=0.25", f"aug.model={sd15}", f"aug.textual_inversion={tuned}", f"aug.lora={tuned}",
           "aug.prompt=a photo of a {name}", "aug.steps=1", "aug.strengths=[0.5]", "aug.image_every=0",
           "aug.guidance_scale=1", "aug.guard=off", "aug.audit=false"]  # random weights: no class to audit
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = out.glob("*-sd15")
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in ea.Scalars("aug/effective_alpha")] == [0.25]  # two edits, both finite and kept
    assert ea.Scalars("aug/nonfinite_dropped")[0].value == 0
    assert np.isfinite(ea.Scalars("train/loss")[0].value)
