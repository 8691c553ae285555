"""Erase class concepts from a Stable Diffusion (DA-Fusion §6.1 model-centric leakage prevention; ESD-x / ESD-u).

The training and the measurement are :mod:`online_aug.sdtrain.erasure`; this tool parses the command line, writes
``--out`` and reports. ``--lora-rank 0`` (default) writes a full diffusers folder (``aug.model=<out>``);
``--lora-rank R`` writes a LoRA folder (``aug.lora=<out>`` over ``aug.model=<--model>``). ``--measure`` judges edits
toward every class on the base and the erased model (the pixel classifier of :mod:`online_aug.sdtrain.edit_quality`,
fit on ``--data`` images of ``--config``) and writes ``<report>/<tag>.json`` and ``<report>/<tag>.md``.

Usage::

    python tools/erase_concepts.py --model models/tiny-sd-digits-pool --concepts seven three \
        --template "a photo of the digit {name}" --steps 300 --out /tmp/tiny-sd-erased \
        --measure --config configs/demo.yaml --data pool --report reports/erasure
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from online_aug.config import ConfigError, load_config
from online_aug.sdtrain.erasure import RECORD, EraseOptions, erase_model, load_erased, measure_erasure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models/tiny-sd-digits-pool", help="base SD: local diffusers folder or hub id")
    p.add_argument("--concepts", nargs="+", required=True, help="class names to erase, as the prompts name them")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--method", choices=["esd-x", "esd-u"], default="esd-x")
    d = EraseOptions()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eta", type=float, default=d.eta, help="negative guidance of eq. 8")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0: fine-tune the weights; R > 0: a LoRA")
    p.add_argument("--template", default=d.template, help="prompt naming the concept; {name} is the concept")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--sample-guidance", type=float, default=d.sample_guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--allow-split", action="store_true", help="erase a name the tokenizer splits into pieces")
    p.add_argument("--preserve", nargs="*", default=[], help="concepts to keep (not in ESD): their predictions on "
                                                              "each step's x_t are held to the original model's")
    p.add_argument("--preserve-weight", type=float, default=d.preserve_weight)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 on a shared CPU)")
    p.add_argument("--measure", action="store_true", help="judge edits per target class, base vs erased")
    p.add_argument("--config", default="configs/demo.yaml", help="--measure: the data set and class names")
    p.add_argument("--data", default="pool", help="--measure: split part whose images the judge is fit on")
    p.add_argument("--per-class", type=int, default=50, help="--measure: edits toward each class")
    p.add_argument("--report", default="", help="--measure: folder for <tag>.json / <tag>.md")
    p.add_argument("--tag", default="", help="report file name (default: concepts and method)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for key in ("steps", "batch_size", "sample_steps", "per_class"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if a.lora_rank < 0 or a.eta <= 0 or a.lr <= 0:
        p.error("--lora-rank must be >= 0, --eta and --lr > 0")
    return a


def format_report(m: dict, record: dict, command: str) -> str:
    lines = [f"# Concept erasure: {', '.join(m['erased_classes'])} ({record['options']['method']})", "",
             f"Command: `{command}`", "",
             f"ESD loss {record['loss_first']:.4f} -> {record['loss_last']:.4f} over {record['options']['steps']} "
             f"steps ({record['wall_s']} s); judge: {m['judge']}; edits: {m['edits']}."
             + (f" Preserved (not in ESD): {', '.join(record['options']['preserve'])}, weight "
                f"{record['options']['preserve_weight']}." if record["options"].get("preserve") else ""), "",
             "| target class | base | erased |", "|---|---:|---:|"]
    for name, r in m["per_class"].items():
        mark = " (erased)" if name in m["erased_classes"] else ""
        lines.append(f"| {name}{mark} | {r['base']:.2f} | {r['erased']:.2f} |")
    e, o = m["erased_target_rate"], m["other_target_rate"]
    lines += ["", f"Erased classes: edits judged as the target {e['base']:.2f} -> {e['erased']:.2f} "
                  f"(chance {m['chance']:.2f}); other classes {o['base']:.2f} -> {o['erased']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if out.exists():
        print(f"erase_concepts: --out {out} exists; choose a new folder", file=sys.stderr)
        return 2
    opts = EraseOptions(concepts=a.concepts, method=a.method, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                        eta=a.eta, lora_rank=a.lora_rank, template=a.template, sample_steps=a.sample_steps,
                        sample_guidance=a.sample_guidance, seed=a.seed, allow_split=a.allow_split,
                        preserve=a.preserve, preserve_weight=a.preserve_weight)
    torch.manual_seed(a.seed)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        splits = cfg = None
        if a.measure:  # the data first: a bad --config fails before training
            from online_aug.data import build_splits
            from online_aug.generator.prompts import class_prompts, resolve_class_names

            cfg = load_config(a.config)
            splits = build_splits(cfg.data)
            names = resolve_class_names(cfg.aug.class_names, splits.class_names)
            unknown = [c for c in a.concepts if c not in names]
            if unknown:
                raise ConfigError(f"--concepts {unknown} are not class names of {a.config} ({names}); --measure "
                                  f"judges edits toward the data set's classes")
        record = erase_model(a.model, out, opts, a.device, show_progress=not a.no_progress)
    except ConfigError as e:
        print(f"erase_concepts: {e}", file=sys.stderr)
        return 2
    use = f"aug.model={out}" if not a.lora_rank else f"aug.model={a.model} aug.lora={out}"
    print(f"erased {a.concepts} ({a.method}): loss {record['loss_first']:.4f} -> {record['loss_last']:.4f} in "
          f"{record['wall_s']} s; use it with {use}")
    if not a.measure:
        return 0
    from online_aug.generator import load_sd

    t0 = time.perf_counter()
    images, labels = splits.part(a.data).tensors()
    prompts = class_prompts(a.template, names)
    base = load_sd(a.model, torch.device(a.device), torch.float32)
    erased = load_erased(a.model, out, a.device)
    m = measure_erasure(base, erased, prompts, names, a.concepts, images, labels, per_class=a.per_class, seed=a.seed)
    m["measure_wall_s"] = round(time.perf_counter() - t0, 1)
    command = "python tools/erase_concepts.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = format_report(m, record, command)
    print(text)
    rec = json.loads((out / RECORD).read_text())
    rec["measure"] = m
    (out / RECORD).write_text(json.dumps(rec, indent=2) + "\n")
    if a.report:
        report = Path(a.report)
        report.mkdir(parents=True, exist_ok=True)
        tag = a.tag or f"{'-'.join(a.concepts)}-{a.method}{'-lora' if a.lora_rank else ''}" \
                       f"{'-preserve' if a.preserve else ''}"
        summary = {"command": command, "erase": {k: v for k, v in record.items() if k != "losses"}, "measure": m}
        (report / f"{tag}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (report / f"{tag}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
