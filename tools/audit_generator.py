"""The generator audit a run does before training, as a report: per class, does the configured generator draw the
class, vary it or copy the training images, and would the guard send edits toward it (online_aug/audit.py).

Uses only what a run has (the training split, the generator as the run loads it, the classifier's pretrained
backbone when model.pretrained), so it works on your own data; no test image is read, and the validation split's
images only fill the (real) column (how well the judge knows each class), never a verdict.

    python tools/audit_generator.py --config configs/diff-mix.yaml [key=value ...] [--out reports/guard/audit-x]

``--judge pool`` fits the judge on the generator pool instead (a generator's own evaluation, as
``tools/distill_lcm.py --eval-judge pool``: a judge that knows every class, not the guard's view of a run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from online_aug.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's config (its data, model and aug sections are used)")
    p.add_argument("--out", default="", help="folder for audit.json and audit.md (default: print only)")
    p.add_argument("--judge", choices=["train", "pool"], default="train",
                   help="split part the judge is fit on: train (what a run's guard sees) or pool")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as train.py takes them")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.aug.alpha <= 0:
            raise ConfigError("aug.alpha is 0: this config uses no generator; nothing to audit")
        import torch

        from online_aug.audit import audit_generator
        from online_aug.augment import AUDIT_PER_CLASS, guard_bank, held_out_bank
        from online_aug.data import build_splits
        from online_aug.distributed import resolve_device
        from online_aug.generator import SDEditGenerator
        from online_aug.generator.preflight import check_generator_inputs

        splits = build_splits(cfg.data, None)
        check_generator_inputs(cfg.aug, splits.num_classes)
        device = resolve_device(cfg)
        editor = SDEditGenerator.from_config(cfg.aug, splits.class_names, device)
        judge_bank = (None if args.judge == "train"
                      else guard_bank(splits.part(args.judge), splits.num_classes, AUDIT_PER_CLASS))
        with torch.inference_mode():
            audit = audit_generator(cfg, editor, guard_bank(splits.train, splits.num_classes, AUDIT_PER_CLASS),
                                    splits.class_names, splits.train.class_counts(), device, held_out_bank(splits),
                                    judge_bank=judge_bank)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"judge: {audit.judge}; {audit.edits_per_class} edits per class at s={audit.strength:g}; "
          f"real class spread {audit.real_spread:.3f}; {audit.seconds:.1f} s")
    print(audit.table())
    print(f"guard (aug.guard=on): {audit.summary()}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        audit.write(out)
        print(f"wrote {out / 'audit.md'} and {out / 'audit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
