"""Export a trained run as a timm / Hugging Face folder (``model.safetensors`` + ``config.json``).

    python tools/export.py RUN_DIR [--out DIR] [--tag TAG]

``RUN_DIR`` is a run directory written by ``train.py``; the folder goes to ``RUN_DIR/export`` unless ``--out`` says
otherwise. The weights are those of checkpoint tag ``best`` for a ``train.select=val`` run, else of the latest
checkpoint (``--tag`` picks another). Load the result with ``timm.create_model("local-dir:DIR", pretrained=True)``;
the format is described in :mod:`online_aug.export`.
"""

from __future__ import annotations

import argparse
import json
import sys

from online_aug.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (runs/<date-time>-<name>)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    p.add_argument("--tag", help="checkpoint tag (default: 'best' for train.select=val, else the latest)")
    args = p.parse_args(argv)
    try:
        from online_aug.export import export_run

        out = export_run(args.run_dir, args.out, args.tag)
    except ConfigError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    print(f"exported {cfg['architecture']} ({cfg['num_classes']} classes, step {cfg['online_aug']['step']}, "
          f"tag {cfg['online_aug']['checkpoint_tag']}) to {out}")
    print(f'load: timm.create_model("local-dir:{out}", pretrained=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
