"""Distil the run's generator (aug.model + aug.textual_inversion + aug.lora, its prompts and guidance) into an
LCM-LoRA for one- and two-step edits without classifier-free guidance (latent consistency distillation, diffusers'
train_lcm_distill_lora_sd_wds.py recipe; the training is online_aug/sdtrain/lcm_distill.py, whose docstring says where
it deviates from the recipe and why).

Use the result in a run by stacking it on the teacher's LoRAs (the manifest's "use" block says exactly what):
``aug.lora=[<teacher's lora>, <out>] aug.scheduler=lcm aug.steps=2 aug.guidance_scale=1``.

``--data train`` (default) distils on the classifier's training split, ``--data pool`` on the generator pool; the
folder's manifest.json carries the union of the images the teacher's parts and the distillation saw, so a run's
leakage check refuses it wherever it would refuse the teacher. ``--ckpt-every N`` / ``--resume`` as
tools/finetune_sd.py. ``--eval`` audits the teacher (its K, CFG) and the distilled generator at K = 1, 2, 4 (LCM, no
CFG) with the run's generator audit: per class, target rate, spread and copy share, side by side.

    python tools/distill_lcm.py --config configs/demo.yaml --data pool --out models/lcm-digits-pool \\
        --steps 400 --batch-size 32 --lr 1e-3 --lora-rank 8 --eval
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from online_aug.config import ConfigError, load_config
from online_aug.data import build_splits
from online_aug.devices import pick_device
from online_aug.generator.finetuned import read_manifest, write_manifest
from online_aug.generator.preflight import check_generator_inputs
from online_aug.sdtrain.finetune import FinetuneError
from online_aug.sdtrain.lcm_distill import (
    DistillOptions,
    check_options,
    distill,
    evaluate,
    format_eval,
    resolve_precision,
)

FLAGS = {"steps": int, "batch_size": int, "lr": float, "lora_rank": int, "num_ddim_timesteps": int, "w_min": float,
         "w_max": float, "loss": str, "huber_c": float, "ema": float, "cross_class": float, "data": str,
         "resolution": int, "mixed_precision": str, "seed": int, "ckpt_every": int, "num_workers": int}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DistillOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="the run's YAML config (data split, aug.* generator)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. aug.lora=models/ft-digits")
    p.add_argument("--out", required=True, help="output folder (LoRA, manifest.json, checkpoints/)")
    for name, kind in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"default {getattr(d, name)}" + (" (the teacher's aug.guidance_scale)"
                                                            if name.startswith("w_") else ""))
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (without --resume)")
    p.add_argument("--eval", action="store_true", help="audit teacher vs distilled K = 1, 2, 4 after training")
    p.add_argument("--eval-only", action="store_true", help="audit an existing --out; no training")
    p.add_argument("--eval-edits", type=int, default=64, help="edits per class in --eval (aug.audit_edits)")
    p.add_argument("--eval-judge", choices=["train", "pool"], default="train",
                   help="split part the --eval judge is fit on: train (what a run's guard sees) or pool (knows "
                        "every class from ~58 images, so a 1-image class's target rate measures the generator)")
    p.add_argument("--device", default="", help="cpu / cuda (default: run.device)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
        opts = DistillOptions(show_progress=not args.no_progress, **given)
        cfg = load_config(args.config, args.overrides)
        device = pick_device(args.device or cfg.run.device, key="--device" if args.device else "run.device")
        check_options(replace(opts, mixed_precision=resolve_precision(opts.mixed_precision, device)), device)
        splits = build_splits(cfg.data)
        check_generator_inputs(cfg.aug, splits.num_classes)  # model folder, tokens, every LoRA: before any weight
        out = Path(args.out)
        if args.eval_only:
            manifest = read_manifest(out, "--out")
        else:
            if not args.resume and out.exists() and any(out.iterdir()):
                if not args.force:
                    raise FinetuneError(f"--out {out} exists and is not empty; pass --resume to continue it or "
                                        f"--force to replace it")
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            manifest = distill(cfg, splits, out, opts, resume=args.resume, device=device)
            manifest["command"] = "python tools/distill_lcm.py " + " ".join(sys.argv[1:] if argv is None else argv)
            print(f"wrote {out}: LCM-LoRA rank {manifest['lora']['rank']} after {manifest['steps']} steps in "
                  f"{manifest['wall_s']:.0f} s (loss ema {manifest['final_loss_ema']:.5f}); use it with "
                  + " ".join(f"{k}={v}" for k, v in manifest["use"].items() if v not in ("", None)))
        if args.eval or args.eval_only:
            from online_aug.augment import AUDIT_PER_CLASS, guard_bank

            cfg.aug.audit_edits = args.eval_edits
            t0 = time.perf_counter()
            bank = guard_bank(splits.train, splits.num_classes, AUDIT_PER_CLASS)
            judge_bank = (None if args.eval_judge == "train"
                          else guard_bank(splits.part(args.eval_judge), splits.num_classes, AUDIT_PER_CLASS))
            ev = evaluate(cfg, splits, out, bank, device, judge=args.eval_judge, judge_bank=judge_bank)
            ev["wall_s"] = round(time.perf_counter() - t0, 1)
            manifest["eval" if args.eval_judge == "train" else f"eval_{args.eval_judge}"] = ev
            print(format_eval(ev))
        write_manifest(out, {k: v for k, v in manifest.items() if k != "format"})
    except (ConfigError, FinetuneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
