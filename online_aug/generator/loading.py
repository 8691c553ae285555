"""Load a frozen Stable Diffusion (and optional TAESD) component by component, outside any DeepSpeed engine.

The folder layout is the one ``StableDiffusionPipeline.from_pretrained`` reads (``vae/``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), from a local folder or a Hugging Face hub id. Loading the parts
individually skips the safety checker and feature extractor, which online augmentation never uses.
Every module is frozen (``requires_grad_(False)``, ``eval()``): the generator is inference-only and must never be
handed to ``deepspeed.initialize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from online_aug.config import ConfigError
from online_aug.generator.hub import pretrained_source
from online_aug.generator.preflight import check_unet_class

SD_SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion that SDEdit needs. ``taesd`` replaces the VAE for encode/decode when set."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: Any  # a diffusers SchedulerMixin; only its config (alphas_cumprod, prediction type) is used
    taesd: AutoencoderTiny | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _freeze(module: torch.nn.Module, device: torch.device) -> Any:
    # dtype was set by from_pretrained, which keeps a model's _keep_in_fp32_modules in fp32; a blanket .to(dtype)
    # here would undo that.
    module.to(device=device)
    module.requires_grad_(False)
    return module.eval()


def _load_scheduler(source: str, kw: dict[str, Any]) -> Any:
    config = DDIMScheduler.load_config(source, subfolder="scheduler", **kw)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = DDIMScheduler  # only the noise schedule in the config matters; the update is ours
    return cls.from_config(config)


def load_sd(model: str, device: torch.device, dtype: torch.dtype, taesd: str = "") -> SDComponents:
    """Load vae / unet / text_encoder / tokenizer / scheduler of ``model`` (hub id or local diffusers folder).

    Args:
        model: Hugging Face hub id or a local folder in diffusers format (the ``aug.model`` key).
        device: where the modules live.
        dtype: weight dtype of vae, unet, text encoder (and TAESD).
        taesd: optional ``AutoencoderTiny`` hub id or folder (the ``aug.taesd`` key); empty for none.

    Raises:
        ConfigError: naming ``aug.model`` and the missing subfolder (local folder) or the unreachable hub id.
    """
    src = pretrained_source("aug.model", model, "point aug.model at a local diffusers folder (the layout "
                                                "pipeline.save_pretrained writes) or a Hugging Face hub id")
    if src.local:
        missing = [s for s in SD_SUBFOLDERS if not (Path(src.path) / s).is_dir()]
        if missing:
            raise ConfigError(
                f"aug.model={model!r}: the local folder has no {', '.join(m + '/' for m in missing)} subfolder"
                f"{'s' if len(missing) > 1 else ''}. A diffusers Stable Diffusion folder holds "
                f"{', '.join(s + '/' for s in SD_SUBFOLDERS)} (as written by pipeline.save_pretrained); complete it "
                f"or point aug.model at a complete folder."
            )
    source, kw = src.path, src.kwargs
    part = "unet"
    try:
        check_unet_class(UNet2DConditionModel.load_config(source, subfolder="unet", **kw), model)  # before weights
        part = "scheduler"
        scheduler = _load_scheduler(source, kw)
        part = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        part = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw)
        part = "vae"
        upcast = bool(AutoencoderKL.load_config(source, subfolder="vae", **kw).get("force_upcast", True))  # its default
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype(dtype, upcast, device), **kw)
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kw)
    except ConfigError:
        raise
    except Exception as e:  # every loader failure becomes one actionable message, chained
        raise src.error("Stable Diffusion", e, subfolder=part) from e

    tiny = load_taesd(taesd, device, dtype) if taesd else None
    return SDComponents(
        vae=_freeze(vae, device),
        unet=_freeze(unet, device),
        text_encoder=_freeze(text_encoder, device),
        tokenizer=tokenizer,
        scheduler=scheduler,
        taesd=tiny,
    )


def vae_dtype(dtype: torch.dtype, force_upcast: bool, device: torch.device) -> torch.dtype:
    """The VAE's dtype: a VAE whose config says ``force_upcast`` overflows in fp16 (every edit would come out
    non-finite), so with fp16 it runs in bf16 where the device has it (fp32's range), else in fp32."""
    if dtype != torch.float16 or not force_upcast:
        return dtype
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_taesd(name: str, device: torch.device, dtype: torch.dtype) -> AutoencoderTiny:
    """``AutoencoderTiny`` from a folder or hub id (the ``aug.taesd`` key), frozen."""
    src = pretrained_source("aug.taesd", name, "point aug.taesd at an AutoencoderTiny folder or hub id (e.g. "
                                               "madebyollin/taesd), or leave it empty to use the SD VAE")
    try:
        model = AutoencoderTiny.from_pretrained(src.path, torch_dtype=dtype, **src.kwargs)
    except Exception as e:  # chained, so the original traceback stays visible
        raise src.error("AutoencoderTiny", e) from e
    return _freeze(model, device)
