"""Fine-tune a Stable Diffusion on a data set's training split: one textual-inversion token per class, optionally
learned jointly with a UNet LoRA.

TI (DA-Fusion §4.1) with ``--template`` (default ``aug.prompt``; ``{token}`` / ``{name}`` as
:func:`online_aug.generator.prompts.render_prompt` fills them), and TI + LoRA (Diff-Mix §3.3) with ``--lora-rank R``.
The training and the ``--eval`` measurement are :mod:`online_aug.sdtrain.finetune`; this tool parses the command line,
manages ``--out`` and reports.

Output folder (``--out``), in the format of :mod:`online_aug.generator.finetuned` (diffusers reads every file):
``learned_embeds/class_<i>.safetensors`` (``pipe.load_textual_inversion``), ``pytorch_lora_weights.safetensors``
(``pipe.load_lora_weights``), ``manifest.json`` (tokens, base model signature, template, settings, ``--eval``
numbers) and ``checkpoints/step-<n>.pt`` (``--resume`` continues from the last one, also to a larger ``--steps``,
with the same weights as an uninterrupted run). Use it in a run with ``aug.textual_inversion=<out>`` (and
``aug.lora=<out>``).

``--eval`` judges s=0.9 inter-class edits three ways: class names in the template, the tokens at their initial
values ("before"), and the saved folder loaded by the generator ("after"); README has the measured table.

Images stream from the data set's stored originals (an image folder's files), decoded per step and resized /
cropped to ``--resolution`` as diffusers' training scripts do; ``--mixed-precision`` (fp16 / bf16 autocast, fp32
master weights of the tokens and LoRA, frozen UNet / VAE in half precision on CUDA), ``--gradient-checkpointing``
and SDPA attention make SD 1.5 at 512 px fit one GPU (docs/finetune-memory.md). ``--recipe da-fusion`` and
``--recipe diff-mix`` are the papers' settings (:data:`online_aug.sdtrain.finetune.RECIPES`, with their citations).

Usage::

    python tools/finetune_sd.py --config configs/real/diff-mix-cifar10lt-sd15.yaml --recipe diff-mix \
        --template "a photo of a {token} {name}" --out models/ft-cifar10lt-sd15-diffmix --ckpt-every 1000
    python tools/finetune_sd.py --config configs/demo.yaml --out models/ti-digits --steps 600 --eval
    python tools/finetune_sd.py --config configs/demo.yaml --model models/tiny-sd-digits-agnostic \\
        --template "a photo" --out /tmp/ti-lora --steps 3000 --lr 0.05 --lora-rank 10 --lora-lr 1e-2 --eval
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
from online_aug.generator.finetuned import write_manifest
from online_aug.sdtrain.finetune import (
    RECIPES,
    FinetuneError,
    FinetuneOptions,
    check_options,
    evaluate,
    finetune,
    format_eval,
    recipe_options,
    resolve_precision,
)

# ---------------------------------------------------------------- CLI


OPTION_FLAGS = {  # FinetuneOptions field -> its flag; None on the command line keeps the recipe's (or default) value
    "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "lora_rank": "--lora-rank", "lora_lr": "--lora-lr",
    "warmup": "--warmup", "template": "--template", "init_word": "--init-word", "init_split": "--init-split",
    "num_vectors": "--num-vectors", "resolution": "--resolution", "crop": "--crop", "hflip": "--hflip",
    "mixed_precision": "--mixed-precision", "gradient_checkpointing": "--gradient-checkpointing",
    "num_workers": "--num-workers", "seed": "--seed", "ckpt_every": "--ckpt-every",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = FinetuneOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " " + __doc__.split("\n")[1])
    p.add_argument("--config", default=None, help="YAML config (data split, class names, prompt)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.imbalance_ratio=20")
    p.add_argument("--model", default="", help="base SD (hub id or diffusers folder); default aug.model")
    p.add_argument("--out", required=True, help="output folder (tokens, LoRA, manifest.json, checkpoints/)")
    p.add_argument("--recipe", default="", help=f"a paper's settings ({', '.join(RECIPES)}); flags override them")
    p.add_argument("--template", default=None,
                   help="prompt template with {token} (learned token) and/or {name} (class name); default "
                        "aug.prompt. '{name}' alone puts the token in the name's place; a template with neither "
                        "(e.g. 'a photo') gets the token appended")
    p.add_argument("--init-word", default=None, help="initialise every token from this word (default: the "
                                                     "class name)")
    p.add_argument("--init-split", choices=["average", "error"], default=None,
                   help="an initializer the tokenizer splits into several tokens: average their embeddings, or stop")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate of the token embeddings (default {d.lr})")
    p.add_argument("--lora-rank", type=int, default=None, help="also train a UNet LoRA of this rank (0: TI "
                                                               "only; Diff-Mix uses 10)")
    p.add_argument("--lora-lr", type=float, default=None, help=f"default {d.lora_lr}")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (then constant)")
    p.add_argument("--num-vectors", type=int, default=None, help="embedding vectors per class token (default 1)")
    p.add_argument("--resolution", type=int, default=None, help="training image side in px (0: the model's native)")
    p.add_argument("--crop", choices=["center", "random"], default=None, help="square crop after resizing the "
                                                                              "shorter side (default center)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16", "auto"], default=None,
                   help="autocast with fp32 master weights (auto: bf16 where supported, else fp16 on CUDA)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader processes decoding images")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (without --resume)")
    p.add_argument("--eval", action="store_true", help="measure inter-class edit target rates before/after")
    p.add_argument("--eval-edits", type=int, default=200, help="edits per schedule mode in --eval")
    p.add_argument("--eval-guidance", type=float, default=4.0, help="CFG scale in --eval (the quality gate's)")
    p.add_argument("--device", default="", help="cpu / cuda (default: run.device; auto picks cuda when present)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)


def options(args: argparse.Namespace) -> FinetuneOptions:
    """The recipe's settings (if any) under the flags given on the command line."""
    given = {f: getattr(args, f) for f in OPTION_FLAGS if getattr(args, f) is not None}
    return recipe_options(args.recipe, show_progress=not args.no_progress, **given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        opts = options(args)  # an unknown --recipe fails here, before the config or any model is read
        cfg = load_config(args.config, args.overrides)
        device = pick_device(args.device or cfg.run.device, key="--device" if args.device else "run.device")
        check_options(replace(opts, mixed_precision=resolve_precision(opts.mixed_precision, device)), device)
        out = Path(args.out)
        if not args.resume and out.exists() and any(out.iterdir()):
            if not args.force:
                raise FinetuneError(f"--out {out} exists and is not empty; pass --resume to continue it or --force "
                                    f"to replace it")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        model = args.model or cfg.aug.model
        splits = build_splits(cfg.data)
        manifest = finetune(cfg, splits, model, out, opts, resume=args.resume, device=device)
        manifest["command"] = "python tools/finetune_sd.py " + " ".join(sys.argv[1:] if argv is None else argv)
        print(f"wrote {out}: {manifest['num_classes']} tokens"
              f"{' + LoRA rank ' + str(opts.lora_rank) if opts.lora_rank else ''} after {manifest['steps']} steps "
              f"in {manifest['wall_s']:.0f} s (loss ema {manifest['final_loss_ema']:.4f})")
        if args.eval:
            t0 = time.perf_counter()
            ev = evaluate(cfg, splits, model, out, manifest, n_edits=args.eval_edits,
                          guidance_scale=args.eval_guidance, device=device, show_progress=not args.no_progress)
            ev["wall_s"] = round(time.perf_counter() - t0, 1)
            manifest["eval"] = ev
            print(format_eval(ev))
        write_manifest(out, manifest)
    except (ConfigError, FinetuneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

