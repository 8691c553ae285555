"""Does the configured generator know each class, and does it vary it or copy it? One table per generator.

For every class: the share of inter-class edits toward it (sources of other classes, ``--strength``) that a judge
calls that class (the target rate, as ``tools/edit_rates.py`` measures it), and, for intra-class edits of its own
training images at ``--intra-strength``, their spread, their distance to the nearest training image (a copy is ~0)
and the spread of real images of the class (online_aug.sdtrain.edit_quality.class_diversity). The generator is loaded
exactly as a run loads it (aug.model, aug.textual_inversion, aug.lora, aug.lora_scale, aug.prompt, guidance, K).

The judge: a pixel classifier fit on the generator pool (``--judge pool``, the default when the config has one: many
images per class, a fair judge of tail classes) or on the classifier's long-tail training split (``--judge train``,
what aug.label_rates uses). Neither sees a validation or test image; nothing here feeds a run.

    python tools/generator_report.py --config configs/diff-mix.yaml --out reports/generators/ft-pool-agnostic.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from online_aug.config import ConfigError, load_config
from online_aug.data import build_splits
from online_aug.devices import pick_device
from online_aug.sdtrain.edit_quality import (
    _resize,
    class_diversity,
    fit_pixel_classifier,
    load_run_generator,
    per_target_rates,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's config (its data and aug sections are used)")
    p.add_argument("--out", default="", help="JSON to write (optional)")
    p.add_argument("--judge", choices=["auto", "pool", "train"], default="auto",
                   help="images the judge is fit on (auto: the pool when the config has one)")
    p.add_argument("--per-class", type=int, default=30, help="edits per class and measurement")
    p.add_argument("--strength", type=float, default=0.9, help="strength of the inter-class (target rate) edits")
    p.add_argument("--intra-strength", type=float, default=0.5, help="strength of the intra-class (spread) edits")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as train.py takes them")
    args = p.parse_intermixed_args(argv)
    try:
        if args.per_class < 2 or not (0 < args.strength <= 1 and 0 < args.intra_strength <= 1):
            raise ConfigError("--per-class must be >= 2 and the strengths in (0, 1]")
        cfg = load_config(args.config, args.overrides)
        splits = build_splits(cfg.data)
        judge = ("pool" if splits.pool is not None else "train") if args.judge == "auto" else args.judge
        if judge == "pool" and splits.pool is None:
            raise ConfigError("--judge pool: this config has no generator pool (data.pool_fraction=0); use --judge "
                              "train")
        device = pick_device(args.device)
        t0 = time.time()
        comps, prompts = load_run_generator(cfg.aug, splits.class_names, device)
        res = int(comps.unet.config.sample_size) * comps.vae_scale_factor
        x, y = splits.train.tensors()
        jx, jy = (splits.pool if judge == "pool" else splits.train).tensors()
        clf = fit_pixel_classifier(_resize(jx.float(), res), jy, res)
        a = cfg.aug
        rates = per_target_rates(comps, prompts, x, y, per_class=args.per_class, strength=args.strength,
                                 guidance_scale=a.guidance_scale, steps=a.steps, seed=cfg.run.seed, device=device,
                                 clf=clf)["target_rate"]
        div = class_diversity(comps, prompts, x, y, reference=(jx, jy) if judge == "pool" else None,
                              per_class=args.per_class, strength=args.intra_strength, guidance_scale=a.guidance_scale,
                              steps=a.steps, seed=cfg.run.seed, device=device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    print(f"| class | train images | target rate (s={args.strength}) | spread (s={args.intra_strength}) | "
          f"distance to nearest train image | real spread |\n|---|---:|---:|---:|---:|---:|")
    for c, name in enumerate(splits.class_names):
        d = div["classes"].get(str(c), {})
        rows.append({"class": name, "target_rate": rates[c], **d})
        real = d.get("real_spread")
        print(f"| {name} | {d.get('n_train', 0)} | {rates[c]:.2f} | {d.get('spread', float('nan')):.3f} | "
              f"{d.get('copy_dist', float('nan')):.3f} | {'-' if real is None else f'{real:.3f}'} |")
    mean = float(np.mean([r["target_rate"] for r in rows]))
    print(f"mean target rate {mean:.2f}; judge: pixel classifier fit on the {judge} split")
    if args.out:
        record = {"model": a.model, "textual_inversion": a.textual_inversion, "lora": a.lora,
                  "lora_scale": a.lora_scale, "prompt": a.prompt, "guidance_scale": a.guidance_scale, "steps": a.steps,
                  "judge": judge, "strength": args.strength, "intra_strength": args.intra_strength,
                  "per_class": args.per_class, "mean_target_rate": mean, "classes": rows,
                  "wall_s": round(time.time() - t0, 1),
                  "command": "python tools/generator_report.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
