"""Train an image classifier with online generative augmentation.

    deepspeed [--num_gpus N] train.py --config configs/demo.yaml [section.key=value ...] [--resume latest|PATH]
    python train.py --config configs/demo.yaml            # one process; distributed defaults are filled in

Exit status (README "Faults"): 0 finished; 2 config error; 75 stopped by a signal (SIGTERM, SIGUSR1, Ctrl-C) after a
complete checkpoint; 3 stopped by a fault (producer hung or dead, divergence, checkpoint not writable) after a
checkpoint of the last good step, where one could be written; 128 + signum: a second signal, no checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from online_aug.config import ConfigError, load_config
from online_aug.faults import INJECT_ENV, RunStopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/ and README.md for every key)")
    p.add_argument("--resume", help="'latest' (newest run with this run.name) or a run/checkpoint folder")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 aug.alpha=0.5")
    # options and key=value overrides mix freely, in any order (as torchrun and deepspeed pass them)
    return p.parse_intermixed_args(argv)


def run_config(resume: str) -> str | None:
    """The config.yaml of the run that ``--resume PATH`` names: PATH is the run directory, its checkpoints/ folder or
    one checkpoint tag inside it (online_aug.checkpoint.find_resume); None when none of them holds one."""
    p = Path(resume)
    for run_dir in (p, p.parent, p.parent.parent):
        if (run_dir / "config.yaml").is_file():
            return str(run_dir / "config.yaml")
    return None


def main(argv: list[str] | None = None) -> int:
    if os.environ.get(INJECT_ENV):
        # tests only (tests/test_faults.py): fault injectors for this process; the package never imports them itself
        from online_aug.testing.faults import install

        install()
    args = parse_args(argv)
    config_path = args.config
    if config_path is None and args.resume and args.resume != "latest":
        config_path = run_config(args.resume)  # resuming a run reuses its config
    bar = ""  # before run(), no progress bar is on screen
    try:
        cfg = load_config(config_path, args.overrides)
        from online_aug.trainer import run  # heavy imports (deepspeed, diffusers) after the config is known good

        bar = "\n"  # from here the bar may be on screen, its line unended: the error starts a fresh one
        run(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"{bar}config error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:
        print(f"\n{e}", file=sys.stderr, flush=True)
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
