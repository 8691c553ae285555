"""Stable Diffusion 1.5's architecture with random weights, built in code (no download): the published UNet, VAE and
CLIP text-encoder configs of ``runwayml/stable-diffusion-v1-5`` (860 M + 84 M + 123 M parameters), at a chosen
sample size. What it is for: measuring the memory and speed of training and generation at SD 1.5's size on a
machine without the weights (``tools/finetune_memory.py``, docs/finetune-memory.md), and loading SD-1.5-shaped
models through ``aug.model`` in tests.

The tokenizer has CLIP's 49,408 entries (so the text encoder's token table, which textual inversion trains, has its
real size) with the special tokens at CLIP's ids; its word pieces are single characters, enough for any prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 49408  # CLIP ViT-L/14's; <|startoftext|> = 49406, <|endoftext|> = 49407
MAX_TOKENS = 77
NATIVE = 512

# runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json (sample sizes set by the builder)
UNET_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", scaling_factor=0.18215,
)
# text_encoder/config.json (CLIP ViT-L/14's text tower)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=768,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)


def sd15_tokenizer() -> Any:
    """A CLIPTokenizer with CLIP's vocabulary size and special-token ids; words split into characters."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = chars + [c + "</w>" for c in chars]
    fill = [f"<|unused{i}|>" for i in range(VOCAB_SIZE - 2 - len(pieces))]
    vocab = {t: i for i, t in enumerate(pieces + fill + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def sd15_components(sample_size: int = NATIVE, seed: int = 0) -> dict[str, Any]:
    """Random-weight SD 1.5 parts keyed as ``StableDiffusionImg2ImgPipeline`` takes them; ``sample_size`` in px
    (a multiple of 64; the UNet's ``sample_size`` is a eighth of it)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if sample_size % 64:
        raise ValueError(f"sample_size={sample_size} must be a multiple of 64 (VAE scale 8 x 2^3 UNet down steps)")
    tok = sd15_tokenizer()
    with torch.random.fork_rng(devices=[]):  # initialisation draws from the global RNG; keep the caller's intact
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=sample_size // 8, **UNET_CONFIG)
        vae = AutoencoderKL(sample_size=sample_size, **VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, bos_token_id=tok.bos_token_id,
                                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tok,
                scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
                image_encoder=None)


def save_sd15(path: str | Path, sample_size: int = NATIVE, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the random SD 1.5 as a diffusers folder that ``aug.model`` / ``load_sd`` read (weights in ``dtype``:
    fp16 halves the 2 GB on disk; loading in fp32 upcasts)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    comps = sd15_components(sample_size, seed)
    for k in ("unet", "vae", "text_encoder"):
        comps[k].to(dtype)
    pipe = StableDiffusionImg2ImgPipeline(**comps, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)
