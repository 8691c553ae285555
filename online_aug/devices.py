"""Device and dtype names used by the config and the tools, resolved in one place.

``auto`` means CUDA when a device is visible, else CPU; a dtype ``auto`` is fp16 on CUDA (Stable Diffusion's native
inference precision) and fp32 elsewhere. Training precision has its own rule (``distributed.resolve_precision``).
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str, key: str = "run.device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` (``cuda`` picks the launcher's LOCAL_RANK); ConfigError naming ``key``."""
    if name in ("", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but no CUDA device is visible; use auto or cpu")
        return torch.device(name) if ":" in name else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    raise ConfigError(f"{key}={name!r} is not one of auto, cpu, cuda")


def resolve_dtype(name: str, device: torch.device, key: str = "aug.dtype") -> torch.dtype:
    """A generator dtype name; ``auto`` is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]

