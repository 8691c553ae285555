"""A tiny, randomly initialised Stable Diffusion built in code, for tests (no network, < 2 s).

The layout mirrors the diffusers test suite's tiny pipelines: an ``AutoencoderKL`` with two blocks (latent scale
factor 2), a ``UNet2DConditionModel`` with cross-attention, a two-layer ``CLIPTextModel`` and a character-level
``CLIPTokenizer`` whose vocab/merges are written to a temporary folder and read back, and a ``DDIMScheduler`` with
the Stable Diffusion v1 noise schedule. ``sample_size`` is the native *pixel* resolution; the UNet's
``config.sample_size`` is ``sample_size // 2`` latents, as in SD (64 latents x 8 = 512 px).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_TOKENS = 32  # tokenizer.model_max_length == text encoder max_position_embeddings

SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _write_tokenizer_files(folder: Path) -> None:
    """A byte-level BPE vocabulary: every byte alone and as a word end, two merges, and CLIP's special tokens."""
    chars = _bytes_to_unicode()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + ["ph", "pho"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\np h\nph o\n")


def build_tiny_tokenizer() -> CLIPTokenizer:
    """Write the tiny vocab.json / merges.txt to a temporary folder and read them back as a CLIPTokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)


def build_tiny_sd_components(seed: int = 0, sample_size: int = 16) -> dict[str, Any]:
    """Components of a random tiny SD, keyed as ``StableDiffusionImg2ImgPipeline`` expects them.

    Args:
        seed: seeds a local ``torch.Generator`` used for all weights (the global RNG is not touched).
        sample_size: native pixel resolution (even); latents are ``sample_size // 2`` square.
    """
    # diffusers/transformers initialise weights with the global RNG; fork it so tests stay independent of each other.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=sample_size,
        )
        # As SD's 0.18215 does for its VAE, scale latents to unit standard deviation (here measured on random
        # images): otherwise a random VAE's small latents drown in even the smallest add_noise level.
        probe = torch.rand(8, 3, sample_size, sample_size) * 2 - 1
        with torch.no_grad():
            latent_std = vae.encode(probe).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=round(1.0 / latent_std, 4))
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=32,
            )
        )
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    for m in (unet, vae, text_encoder):
        m.eval()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def tiny_pipeline(seed: int = 0, sample_size: int = 16) -> StableDiffusionImg2ImgPipeline:
    comps = build_tiny_sd_components(seed, sample_size)
    pipe = StableDiffusionImg2ImgPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(path: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Write a diffusers folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/, model_index.json).

    ``StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None)`` and ``load_sd(path, ...)`` read it.
    """
    path = Path(path)
    tiny_pipeline(seed, sample_size).save_pretrained(path)
    return path
