"""Peak memory of fine-tuning steps (TI, or TI + LoRA) on Stable Diffusion 1.5's architecture with random weights.

Builds the random SD 1.5 of :mod:`online_aug.sdtrain.sd15` once (``--model`` folder, fp16 on disk), writes a small image
folder at ``--resolution``, and runs ``--steps`` steps of :func:`online_aug.sdtrain.finetune.finetune` (the real code
path: streamed images, autocast, checkpointing, LoRA) while a thread samples the process's resident memory. Prints one
JSON line: the resident memory when training starts (models loaded, tokens and LoRA added), the peak during the steps
and the rise between them (activations, gradients, optimizer state), and on CUDA the same from
``torch.cuda.max_memory_allocated``. docs/finetune-memory.md has the numbers and the estimate at 512 px, batch 8.

Usage::

    python tools/finetune_memory.py --model /tmp/sd15-random --resolution 128 --batch-size 8 --lora-rank 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from online_aug.config import load_config
from online_aug.data import build_splits
from online_aug.sdtrain import finetune as finetune_module
from online_aug.sdtrain.finetune import finetune, recipe_options
from online_aug.sdtrain.sd15 import save_sd15


def _images(root: Path, side: int, classes: int = 2, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"class{c}/{i}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="folder of the random SD 1.5 (built there when missing)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=10)
    p.add_argument("--num-vectors", type=int, default=1)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16", "auto"])
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=2, help="2: the second step runs with the optimizer state allocated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        save_sd15(model)
    device = torch.device(args.device)
    proc, peak, done = psutil.Process(), [0], threading.Event()
    at_start: dict[str, int] = {}
    sampler_cls = finetune_module.StepBatchSampler

    class MarkingSampler(sampler_cls):  # its first batch is the moment training starts: everything is loaded
        def __iter__(self):  # type: ignore[override]
            at_start["rss"] = proc.memory_info().rss
            peak[0] = at_start["rss"]
            if device.type == "cuda":
                at_start["cuda"] = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            return super().__iter__()

    finetune_module.StepBatchSampler = MarkingSampler

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    with tempfile.TemporaryDirectory() as tmp:
        root = _images(Path(tmp) / "images", args.resolution)
        cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=32",
                                 "data.test_fraction=0.25", "data.imbalance_ratio=1", "data.val_per_class=0",
                                 "data.pool_fraction=0", "aug.prompt=a photo of a {name}"])
        splits = build_splits(cfg.data)
        opts = recipe_options("", steps=args.steps, batch_size=args.batch_size, lr=5e-5, lora_rank=args.lora_rank,
                              lora_lr=5e-5, num_vectors=args.num_vectors, resolution=args.resolution,
                              mixed_precision=args.mixed_precision,
                              gradient_checkpointing=args.gradient_checkpointing, show_progress=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = proc.memory_info().rss
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        finetune(cfg, splits, str(model), Path(tmp) / "out", opts, device=device)
        wall = time.perf_counter() - t0
        done.set()
        thread.join()
    gib = 2.0**30
    record = {"device": str(device), "resolution": args.resolution, "batch_size": args.batch_size,
              "lora_rank": args.lora_rank, "num_vectors": args.num_vectors, "mixed_precision": args.mixed_precision,
              "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps,
              "rss_before_load_gib": round(before / gib, 3), "rss_train_start_gib": round(at_start["rss"] / gib, 3),
              "rss_peak_in_steps_gib": round(peak[0] / gib, 3),
              "rss_step_rise_gib": round((peak[0] - at_start["rss"]) / gib, 3), "wall_s": round(wall, 1),
              "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["cuda_train_start_gib"] = round(at_start["cuda"] / gib, 3)
        record["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / gib, 3)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
