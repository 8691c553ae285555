"""Whom would the teacher say a generated image shows? The class histogram a trained run's classifier gives images
from the configured generator, beside the one a pixel judge fit on the generator pool gives the same images (the
audit's judge, `--judge pool`): where the two disagree, pseudo-labels from that classifier teach the wrong classes
(docs/ssl.md). The generator is loaded as a run loads it; images from noise with ``aug.gen_from_noise`` and
``ssl.strengths=[1.0]``, else SDEdits of training images at ``ssl.strengths``.

    python tools/pseudo_label_check.py --config configs/ssl-gen.yaml --run <a finished run> [--n 256] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from online_aug.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the generator's settings (aug.*, ssl.strengths)")
    p.add_argument("--run", required=True, help="a finished run folder whose final classifier is the teacher")
    p.add_argument("--n", type=int, default=256, help="images to generate")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    try:
        import numpy as np
        import torch

        from online_aug.audit import fit_judge
        from online_aug.augment import AUDIT_PER_CLASS, guard_bank
        from online_aug.data import build_splits
        from online_aug.export import find_checkpoint, read_state_dict
        from online_aug.generator import SDEditGenerator
        from online_aug.model import create_classifier

        cfg = load_config(args.config, args.overrides)
        run = Path(args.run)
        run_cfg = load_config(run / "config.yaml")
        splits = build_splits(cfg.data, None)
        cpu = torch.device("cpu")
        state, step = read_state_dict(*find_checkpoint(run, run_cfg))
        teacher = create_classifier(run_cfg.model, splits.num_classes)
        teacher.load_state_dict(state)
        teacher.eval()
        pool = guard_bank(splits.part("pool"), splits.num_classes, AUDIT_PER_CLASS)
        judge = fit_judge(cfg, pool, cpu)
        editor = SDEditGenerator.from_config(cfg.aug, splits.class_names, cpu)
        rng = np.random.default_rng(0)
        src = splits.train.tensors(cfg.data.image_size)[0]
        src = src[torch.as_tensor(rng.integers(len(src), size=args.n))]
        strength = torch.as_tensor(rng.choice(cfg.ssl.strengths, size=args.n), dtype=torch.float32)
        target = torch.as_tensor(rng.integers(splits.num_classes, size=args.n))
        with torch.inference_mode():
            images, _ = editor.edit(src, strength, target, generator=torch.Generator().manual_seed(1))
            images = images.float()
            p = torch.softmax(teacher(images), -1)
        conf, said = p.max(-1)
        by_judge = judge.predict(images)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    c = splits.num_classes
    t_hist = np.bincount(said.numpy(), minlength=c)
    j_hist = np.bincount(by_judge, minlength=c)
    agree = float((said.numpy() == by_judge).mean())
    print(f"{args.n} images ({cfg.aug.model}, strengths {cfg.ssl.strengths}); teacher: {run} (step {step})")
    print(f"{'class':<10}{'n_train':>8}{'teacher':>9}{'>=0.95':>8}{'pool judge':>12}")
    counts = splits.train.class_counts()
    for k, name in enumerate(splits.class_names):
        sure = int(((said == k) & (conf >= 0.95)).sum())
        print(f"{name:<10}{counts[k]:>8}{t_hist[k]:>9}{sure:>8}{j_hist[k]:>12}")
    print(f"teacher and pool judge agree on {agree:.0%} of the images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
