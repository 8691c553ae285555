"""online_aug.sdtrain.tiny_sd (run by tools/build_tiny_sd.py): a few-step build loads as an img2img pipeline; the
committed model passes its gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from online_aug.config import ConfigError, load_config
from online_aug.data import build_splits
from online_aug.sdtrain import tiny_sd

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "models" / "tiny-sd-digits"


def test_tokenizer_makes_each_prompt_word_one_token():
    words = tiny_sd.prompt_words(["a photo of the digit seven", "a photo of the digit three"])
    tok = tiny_sd.build_tokenizer(words)
    assert tok.tokenize("a photo of the digit seven") == ["a</w>", "photo</w>", "of</w>", "the</w>", "digit</w>",
                                                         "seven</w>"]
    ids = tok("a photo").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.tokenize("xyz") == ["x", "y", "z</w>"]  # unseen words fall back to characters, never to unk


def test_tiny_build_loads_in_img2img_pipeline(tmp_path: Path):
    from diffusers import StableDiffusionImg2ImgPipeline

    cfg = load_config(None, ["data.imbalance_ratio=20"])
    splits = build_splits(cfg.data)
    opts = tiny_sd.BuildOptions(steps=3, vae_steps=3, batch_size=8, seed=0, prompt="a photo", show_progress=False)
    record = tiny_sd.build_tiny_sd(cfg, splits, tmp_path / "sd", opts)
    assert record["prompt_template"] == "a photo"  # a template without {name} is allowed (class-agnostic)
    assert record["data"]["class_counts"] == splits.train.class_counts()
    assert json.loads((tmp_path / "sd" / "build_info.json").read_text())["options"]["steps"] == 3
    assert (tmp_path / "sd" / "tokenizer" / "vocab.json").is_file()
    assert (tmp_path / "sd" / "tokenizer" / "merges.txt").is_file()

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "sd", safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    out = pipe("a photo", image=image, strength=0.5, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 16, 16)
    assert torch.isfinite(out).all()


def test_build_is_deterministic_for_a_seed(tmp_path: Path):
    from safetensors.torch import load_file

    cfg = load_config(None, ["data.imbalance_ratio=20"])
    splits = build_splits(cfg.data)
    opts = tiny_sd.BuildOptions(steps=2, vae_steps=2, batch_size=8, seed=3, show_progress=False)
    weights = []
    for name in ("a", "b"):
        tiny_sd.build_tiny_sd(cfg, splits, tmp_path / name, opts)
        weights.append(load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_prompts_are_checked_before_training():
    """A template or class names that cannot make one prompt per class fail before any training step."""
    cfg = load_config(None, ["data.imbalance_ratio=20"])
    splits = build_splits(cfg.data)
    with pytest.raises(ConfigError, match=r"--prompt='a \{token\}' uses \{token\}"):
        tiny_sd.resolve_prompts(cfg, splits, tiny_sd.BuildOptions(prompt="a {token}"))
    with pytest.raises(ConfigError, match=r"aug\.class_names has 2 names but the dataset has 10 classes"):
        tiny_sd.resolve_prompts(cfg, splits, tiny_sd.BuildOptions(class_names=["a", "b"]))
    template, names, prompts = tiny_sd.resolve_prompts(cfg, splits, tiny_sd.BuildOptions())
    assert prompts[3] == template.format(name=names[3])


def test_committed_model_meets_quality_gate():
    info_path = COMMITTED / "build_info.json"
    if not info_path.is_file():
        pytest.fail(f"{info_path} is missing: build it with tools/build_tiny_sd.py --config configs/demo.yaml "
                    f"--out {COMMITTED.relative_to(ROOT)} --force")
    info = json.loads(info_path.read_text())
    q = info["quality"]
    assert set(q["modes"]) == {"fewstep", "grid"}
    for mode, cells in q["modes"].items():
        assert cells["0.9"]["target_rate"] >= 0.8, f"{mode}: s=0.9 edits reach the target too rarely: {cells}"
        assert cells["0.25"]["source_rate"] >= 0.5, f"{mode}: s=0.25 edits lose the source too often: {cells}"
        assert cells["0.9"]["finite_rate"] == 1.0
    assert q["passed"]
    assert info["data"]["dataset"] == "digits" and info["data"]["split"].startswith("train")
    size = sum(f.stat().st_size for f in COMMITTED.rglob("*") if f.is_file())
    assert size < 8e6, f"committed tiny SD is {size / 1e6:.1f} MB; keep it a few MB"
