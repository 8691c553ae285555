"""Build a tiny Stable-Diffusion-architecture model on a dataset's long-tail *training* split (or its generator pool).

The model and its training are :mod:`online_aug.sdtrain.tiny_sd` (an ordinary diffusers folder, SD's architecture made
tiny, for tests, CI and the CPU demo). This tool picks the split part (``--data train|pool``), builds into a temporary
folder that replaces ``--out`` only when the build finished, and runs the quality gate
(:func:`online_aug.sdtrain.edit_quality.evaluate_edit_quality`: inter-class SDEdit at s=0.9 must land on the target,
s=0.25 should keep the source) on the same images; the numbers go to ``build_info.json``.

Usage::

    python tools/build_tiny_sd.py --config configs/demo.yaml --out models/tiny-sd-digits --force
    python tools/build_tiny_sd.py data.imbalance_ratio=20 --out /tmp/tiny-sd --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin at barriers while descheduled made this build many times slower.
# Sleeping waits cost nothing when the machine is idle. Must be set before torch loads its OpenMP runtime (the
# imports below load it); an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from online_aug.config import ConfigError, load_config  # noqa: E402
from online_aug.data import build_splits  # noqa: E402
from online_aug.sdtrain.edit_quality import evaluate_edit_quality, format_quality_table  # noqa: E402
from online_aug.sdtrain.tiny_sd import BuildOptions, build_tiny_sd, resolve_prompts, write_build_info  # noqa: E402

# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (data split and prompt come from it)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.imbalance_ratio=20")
    p.add_argument("--out", required=True, help="output diffusers folder")
    d = BuildOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="UNet/text-encoder training steps")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help="VAE training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--resolution", type=int, default=d.resolution, help="image side in pixels (latents are half)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", choices=("train", "pool"), default=d.data,
                   help="split part to train on: the classifier's long-tail training split, or the generator pool "
                        "(data.pool_fraction; images the classifier never sees)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the UNet + text encoder")
    p.add_argument("--prompt", default="", help="prompt template overriding aug.prompt; '{name}' is optional "
                                                "(e.g. 'a photo' trains a class-agnostic model)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale of the quality gate (default: aug.guidance_scale, what training runs will use)")
    p.add_argument("--gate-edits", type=int, default=200, help="edits per (mode, strength) in the quality gate")
    p.add_argument("--skip-gate", action="store_true", help="do not run the quality gate")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: --out {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    if args.resolution % 2 or args.resolution < 8:
        print(f"error: --resolution must be even and >= 8, got {args.resolution}", file=sys.stderr)
        return 2
    opts = BuildOptions(steps=args.steps, vae_steps=args.vae_steps, batch_size=args.batch_size,
                        resolution=args.resolution, seed=args.seed, prompt=args.prompt, lr=args.lr, data=args.data,
                        show_progress=not args.no_progress)
    try:
        cfg = load_config(args.config, args.overrides)
        splits = build_splits(cfg.data)
        # the builder and its gate see only the chosen part (never val or test); build_info.json records its indices
        splits = dataclasses.replace(splits, train=splits.part(args.data))
        template, _, prompts = resolve_prompts(cfg, splits, opts)  # a bad template or names fail before training
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # Build into a sibling temp folder and swap at the end: a failed or interrupted build never destroys a
    # working model already at --out.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = build_tiny_sd(cfg, splits, tmp, opts)
        record["config"] = args.config
        record["overrides"] = list(args.overrides)
        record["command"] = "python tools/build_tiny_sd.py " + " ".join(sys.argv[1:] if argv is None else argv)
        if not args.skip_gate:
            x, y = splits.train.tensors()
            scale = args.guidance_scale if args.guidance_scale is not None else cfg.aug.guidance_scale
            q = evaluate_edit_quality(tmp, x, y, prompts, guidance_scale=scale, n_edits=args.gate_edits,
                                      seed=args.seed, show_progress=opts.show_progress)
            if "{name}" not in template:
                # A class-agnostic model cannot draw a class on request: its s=0.9 target rate is the "before
                # fine-tuning" baseline (about chance), not a pass/fail criterion; tools/finetune_sd.py --eval
                # measures what fine-tuning adds.
                q["passed"] = None
                q["note"] = "class-agnostic prompt: target rates are the before-fine-tuning baseline (about chance)"
            record["quality"] = q
            print(format_quality_table(q))
            if "note" in q:
                print(f"note: {q['note']}; no gate applied")
        record["total_wall_s"] = round(time.perf_counter() - t0, 1)
        write_build_info(tmp, record)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {record['total_wall_s']:.0f} s; params " +
          ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in record["params"].items()))
    if "quality" in record and record["quality"]["passed"] is False:
        print("warning: the quality gate failed (see build_info.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
