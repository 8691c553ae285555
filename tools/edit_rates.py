"""Measure how often the configured generator draws each class: the file behind ``aug.label_rates``.

For every class c, ``--per-class`` few-step edits of training images of other classes toward c at ``--strength``, judged
by a pixel classifier fit on the classifier's own training split (online_aug.sdtrain.edit_quality); the generator is
loaded exactly as a run loads it (aug.model, aug.textual_inversion, aug.lora, aug.prompt, aug.guidance_scale,
aug.steps). A run with ``aug.label_rates=<out>`` then labels an edit toward c with s^gamma * rate(c) on c.

    python tools/edit_rates.py --config configs/diff-mix.yaml --out models/ft-digits-pool-agnostic/label_rates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from online_aug.config import ConfigError, load_config
from online_aug.data import build_splits
from online_aug.devices import pick_device
from online_aug.sdtrain.edit_quality import generator_label_rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's config (its data and aug sections are used)")
    p.add_argument("--out", required=True, help="JSON to write (aug.label_rates)")
    p.add_argument("--per-class", type=int, default=50, help="edits toward each class")
    p.add_argument("--strength", type=float, default=0.9, help="SDEdit strength of the measured edits")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as train.py takes them")
    args = p.parse_intermixed_args(argv)
    try:
        if args.per_class < 1 or not 0 < args.strength <= 1:
            raise ConfigError("--per-class must be >= 1 and --strength in (0, 1]")
        cfg = load_config(args.config, args.overrides)
        splits = build_splits(cfg.data)
        x, y = splits.train.tensors()
        t0 = time.time()
        out = generator_label_rates(cfg.aug, splits.class_names, x, y, per_class=args.per_class,
                                    strength=args.strength, seed=cfg.run.seed, device=pick_device(args.device))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.update(wall_s=round(time.time() - t0, 1),
               command="python tools/edit_rates.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    rates = out["target_rate"]
    print("target rate per class: " + " ".join(f"{n}={rates[c]:.2f}" for c, n in enumerate(splits.class_names)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
