"""Process-group setup and the DeepSpeed config, built in one place from the run config.

``python train.py`` (one process, no launcher) gets RANK/WORLD_SIZE/MASTER_* defaults: without them DeepSpeed
falls back to mpi4py discovery and dies. ``deepspeed train.py`` sets them itself.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from .config import Config
from .devices import pick_device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_env_defaults() -> None:
    """Single-process defaults for the variables torch.distributed's env:// rendezvous reads."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(device: torch.device) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, local_rank, world_size)."""
    import deepspeed

    fill_env_defaults()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def resolve_device(cfg: Config) -> torch.device:
    """``run.device`` as a device; ``cuda`` is this rank's LOCAL_RANK (see :func:`online_aug.devices.pick_device`)."""
    return pick_device(cfg.run.device)


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """``train.precision``: auto is bf16 on CUDA where supported, else fp16 on CUDA, fp32 on CPU.

    ``Config.validate`` already refused fp16 without CUDA.
    """
    p = cfg.train.precision
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return p


def micro_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient accumulation steps).

    Arithmetic only: the trainer has run ``cfg.train.check_world_size(world_size)`` (the batch splits evenly).
    """
    per_rank = cfg.train.batch_size // world_size
    mb = cfg.train.micro_batch_size or per_rank
    return mb, per_rank // mb


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """The one DeepSpeed config of a run. Nothing in it may synchronise the whole device per step (the producer's
    stream shares it): the throughput timer is off, ZeRO 1/2 without overlap_comm, ZeRO-3 without
    memory_efficient_linear (tests/test_cuda_path.py)."""
    mb, accum = micro_batch(cfg, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "timers": {"throughput": {"enabled": False}},
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,  # our monitor logs; keep DeepSpeed quiet
        "zero_allow_untested_optimizer": True,
    }
    if cfg.train.zero_stage == 3:
        # small models: partition every parameter so sharding is real even for the tiny demo classifier.
        # memory_efficient_linear (on by default) makes zero.Init replace torch.nn.functional.linear for the whole
        # process: the frozen SD and CLIP built later would run every linear through a Python autograd.Function.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9,
                                        "memory_efficient_linear": False})
    elif cfg.train.zero_stage in (1, 2):
        # overlap_comm makes DeepSpeed synchronize the whole device in every backward epilogue, which would wait
        # for the generator's UNet work queued on the producer's stream
        ds["zero_optimization"]["overlap_comm"] = False
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds
