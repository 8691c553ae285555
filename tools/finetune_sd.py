"""Fine-tune a Stable Diffusion on a data set's training split: one textual-inversion token per class, optionally
learned jointly with a UNet LoRA.

- TI (DA-Fusion §4.1): a new token ``<name>`` per class, initialised from the class name (or ``--init-word``), learned
  with the frozen model's denoising loss on prompts rendered from ``--template`` (default ``aug.prompt``; see
  :func:`online_aug.generator.finetuned.render_prompt` for how ``{token}`` / ``{name}`` are filled).
- TI + LoRA (Diff-Mix §3.3, Table 7 "TI+DB", rank 10 there): ``--lora-rank R`` also trains a PEFT LoRA on the UNet's
  attention projections (to_q/to_k/to_v/to_out.0), with alpha = R (the scale-1 convention diffusers assumes when it
  loads a LoRA without alphas).

Only ``splits.train`` is used (never a validation or test image). Classes are sampled uniformly, not by frequency, so
tail classes get as many updates as head classes. The initializer: a word the tokenizer splits into several pieces is
averaged over the pieces (``--init-split average``, the default; the pieces are printed and recorded in the
manifest) or refused (``--init-split error``).

Output folder (``--out``), every file in a format diffusers reads:

- ``learned_embeds/class_<i>.safetensors``: ``{token: [D]}``; ``pipe.load_textual_inversion(file)``;
- ``pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(out)`` (written by ``save_lora_weights`` from
  ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``, the diffusers training-script recipe);
- ``manifest.json``: class index -> token and file, num_classes, base model, its UNet / text-encoder signature and a
  weight probe, template, prompts, steps, seed, training settings, and the ``--eval`` numbers;
- ``checkpoints/step-<n>.pt``: every ``--ckpt-every`` steps and at the end; ``--resume`` continues from the last one
  (also to a larger ``--steps``). The per-step RNG is derived from (seed, step), so a resumed run gives the same
  weights as an uninterrupted one.

Use it in a run with ``aug.textual_inversion=<out>`` (and ``aug.lora=<out>``).

``--eval`` judges s=0.9 inter-class edits three ways: class names in the template, the tokens at their initial
values ("before"), and the saved folder loaded by the generator ("after"). On the class-agnostic tiny SD TI alone
stays at chance (its UNet never learned to read its text input) while TI + LoRA reaches 0.885; README has the table.

Usage::

    python tools/finetune_sd.py --config configs/demo.yaml --out models/ti-digits --steps 600 --eval
    python tools/finetune_sd.py --config configs/demo.yaml --model models/tiny-sd-digits-agnostic \\
        --template "a photo" --out /tmp/ti-lora --steps 3000 --lr 0.05 --lora-rank 10 --lora-lr 1e-2 --eval
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from online_aug.config import AugConfig, Config, ConfigError, load_config  # noqa: E402
from online_aug.data import Splits, build_splits  # noqa: E402
from online_aug.generator.finetuned import (  # noqa: E402
    LORA_FILE,
    LORA_TARGETS,
    MANIFEST,
    MANIFEST_FORMAT,
    InitSplit,
    add_tokens,
    apply_finetuned,
    base_identity,
    class_prompts,
    edit_target_rates,
    init_embeddings,
    render_prompt,
    save_learned_embeddings,
    token_strings,
)
from online_aug.generator.loading import load_sd  # noqa: E402

CKPT_DIR = "checkpoints"


@dataclass
class FinetuneOptions:
    """Everything that shapes the learned weights (recorded in manifest.json)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-3  # token embeddings (TI usually runs 1e-4..5e-3; the tiny model's table is small)
    lora_rank: int = 0  # 0: TI only; Diff-Mix uses 10 on SD 1.5
    lora_lr: float = 1e-3
    warmup: int = 20  # linear warm-up, then constant: --resume to a larger --steps continues the same schedule
    template: str = ""  # empty: cfg.aug.prompt
    init_word: str = ""  # empty: each class's name
    init_split: InitSplit = "average"
    seed: int = 0
    ckpt_every: int = 0  # 0: a checkpoint only at the end
    keep_ckpts: int = 2
    show_progress: bool = True


class FinetuneError(RuntimeError):
    """A bad request to the tool (folder in use, resume from another run); the message says what to do."""


# ---------------------------------------------------------------- setup


def class_names_for(cfg: Config, splits: Splits) -> list[str]:
    names = list(cfg.aug.class_names) or list(splits.class_names)
    if len(names) != splits.num_classes:
        raise ConfigError(f"aug.class_names has {len(names)} names but the dataset has {splits.num_classes} classes")
    return names


def run_record(cfg: Config, model: str, identity: dict[str, Any], names: list[str], tokens: list[str],
               template: str, init_words: list[str], opts: FinetuneOptions) -> dict[str, Any]:
    """What must agree for ``--resume`` to continue a run (steps may grow; everything else must match)."""
    return {
        "base_model": model, "base": identity, "data": asdict(cfg.data), "class_names": names, "tokens": tokens,
        "template": template, "init_words": init_words, "init_split": opts.init_split, "lora_rank": opts.lora_rank,
        "lr": opts.lr, "lora_lr": opts.lora_lr, "warmup": opts.warmup, "batch_size": opts.batch_size,
        "seed": opts.seed,
    }


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one step, a function of (seed, step) only: resuming replays the same stream."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def training_images(splits: Splits, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as ``[N, 3, R, R]`` in [-1, 1] (antialiased resize, as the quality gate does) and labels."""
    from online_aug.generator.quality import _split_images

    x, y = _split_images(splits)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.from_numpy(np.asarray(y)).long()


def add_lora(unet: torch.nn.Module, rank: int, seed: int) -> Any:
    """A trainable PEFT LoRA on the attention projections; alpha = rank (scale 1, what diffusers assumes).

    PEFT draws the initial A matrices from torch's global RNG; a forked, seeded RNG makes them a function of
    ``seed`` (a resumed run and an uninterrupted one start from the same LoRA) without touching the caller's RNG.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng():  # CPU and every visible CUDA device
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return config


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


# ---------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / CKPT_DIR).glob("step-*.pt"))


def save_checkpoint(out: Path, step: int, run: dict[str, Any], embeds: torch.Tensor, unet: torch.nn.Module,
                    opt: torch.optim.Optimizer, loss_ema: float, lora: bool, keep: int) -> Path:
    folder = out / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    state = {"step": step, "run": run, "embeds": embeds.detach().cpu().clone(), "opt": opt.state_dict(),
             "lora": lora_state(unet) if lora else None, "loss_ema": loss_ema}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a truncated "last checkpoint"
    for old in checkpoints(out)[:-keep]:
        old.unlink()
    return path


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_resume_state(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The last checkpoint in ``out``, checked to belong to the same run (base model, classes, settings)."""
    found = checkpoints(out)
    if not found:
        raise FinetuneError(f"--resume: {out / CKPT_DIR} holds no checkpoint (step-*.pt); run without --resume")
    state = torch.load(found[-1], map_location="cpu", weights_only=False)
    diffs = _differences(state.get("run", {}), run)
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {_short(state.get('run', {}).get(k))} vs now {_short(run.get(k))}"
                           for k in diffs)
        raise FinetuneError(f"--resume: {found[-1]} is from another run (different {', '.join(diffs)}): {detail}. "
                            f"Use a new --out, or pass the same model / config / flags as that run.")
    return state


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------- training


def finetune(cfg: Config, splits: Splits, model: str, out: str | Path, opts: FinetuneOptions,
             resume: bool = False, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Learn the tokens (and LoRA) on ``splits.train`` and write ``out``; returns the manifest."""
    t_start = time.perf_counter()
    out = Path(out)
    device = torch.device(device)
    comps = load_sd(model, device, torch.float32)
    identity = base_identity(comps)  # before tokens / LoRA change the modules
    names = class_names_for(cfg, splits)
    tokens = token_strings(names)
    init_words = [opts.init_word] * len(names) if opts.init_word else list(names)
    template = opts.template or cfg.aug.prompt
    prompts = class_prompts(template, names, tokens, key="--template")
    try:
        init, pieces = init_embeddings(comps.tokenizer, comps.text_encoder, init_words, opts.init_split)
    except ValueError as e:
        raise ConfigError(f"--init-word: {e}") from e
    split_words = {w: p for w, p in zip(init_words, pieces) if len(p) > 1}
    if split_words and opts.show_progress:
        print(f"note: initializer words split by the tokenizer are averaged over their pieces: {split_words}")
    run = run_record(cfg, model, identity, names, tokens, template, init_words, opts)

    te, unet, tok = comps.text_encoder, comps.unet, comps.tokenizer
    ids = torch.tensor(add_tokens(tok, te, tokens, init, source="--out"))
    table = te.get_input_embeddings().weight
    table.requires_grad_(True)
    # Only the new rows learn: the rest of the table keeps a zero gradient, so (with no weight decay) Adam never
    # moves it, and the saved embeddings are the only thing that changed in the text encoder.
    mask = torch.zeros(table.shape[0], 1, device=device)
    mask[ids] = 1.0
    table.register_hook(lambda g: g * mask)
    groups: list[dict[str, Any]] = [{"params": [table], "lr": opts.lr, "weight_decay": 0.0}]
    lora_config = None
    if opts.lora_rank > 0:
        lora_config = add_lora(unet, opts.lora_rank, opts.seed)
        lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.requires_grad_(True)
        groups.append({"params": lora_params, "lr": opts.lora_lr, "weight_decay": 1e-2})
    opt = torch.optim.AdamW(groups)

    start, loss_ema = 0, float("nan")
    if resume:
        state = load_resume_state(out, run)
        start, loss_ema = int(state["step"]), float(state["loss_ema"])
        with torch.no_grad():
            table[ids] = state["embeds"].to(device)
        if state["lora"] is not None:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(unet, state["lora"])
        opt.load_state_dict(state["opt"])
        if start > opts.steps:
            raise FinetuneError(f"--resume: the checkpoint is at step {start}, beyond --steps {opts.steps}")

    res = int(unet.config.sample_size) * comps.vae_scale_factor
    x, labels = training_images(splits, res)
    counts = torch.bincount(labels, minlength=len(names)).float()
    if (counts == 0).any():
        raise ConfigError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no training image")
    weights = 1.0 / counts[labels]  # uniform over classes
    prompt_ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
    sched = comps.scheduler
    alphas = sched.alphas_cumprod.to(device)
    T = int(sched.config.num_train_timesteps)
    prediction = getattr(sched.config, "prediction_type", "epsilon")
    scaling = comps.vae.config.scaling_factor
    bs = opts.batch_size

    unet.train()  # dropout-free in SD; train() only matters for modules that would have it
    bar = tqdm(range(start, opts.steps), desc="finetune", initial=start, total=opts.steps,
               disable=not opts.show_progress, dynamic_ncols=True)
    for step in bar:
        g = step_generator(opts.seed, step)
        warm = min(1.0, (step + 1) / max(1, opts.warmup))
        for grp, base_lr in zip(opt.param_groups, [opts.lr, opts.lora_lr]):
            grp["lr"] = base_lr * warm
        idx = torch.multinomial(weights, bs, replacement=True, generator=g)
        cls = labels[idx]
        with torch.no_grad():  # the VAE is frozen: latents are data here
            post = comps.vae.encode(x[idx].to(device)).latent_dist
            z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)) * scaling
        t = torch.randint(0, T, (bs,), generator=g).to(device)
        eps = torch.randn(z0.shape, generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0  # v-prediction
        # Encode each class prompt in the batch once, then gather: a batch rarely holds all classes.
        uniq, inv = torch.unique(cls, return_inverse=True)
        emb = te(prompt_ids[uniq.to(device)])[0][inv.to(device)]
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if step == start and loss_ema != loss_ema else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 10 == 0 or step == opts.steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.4f}")
        if opts.ckpt_every and (step + 1) % opts.ckpt_every == 0 and step + 1 < opts.steps:
            save_checkpoint(out, step + 1, run, table[ids], unet, opt, loss_ema, lora_config is not None,
                            opts.keep_ckpts)
    bar.close()
    unet.eval()
    save_checkpoint(out, opts.steps, run, table[ids], unet, opt, loss_ema, lora_config is not None, opts.keep_ckpts)

    classes = save_learned_embeddings(out, tokens, table[ids].detach())
    lora_info = None
    if lora_config is not None:
        from diffusers import StableDiffusionImg2ImgPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionImg2ImgPipeline.save_lora_weights(out, unet_lora_layers=sd, weight_name=LORA_FILE,
                                                         unet_lora_adapter_metadata=lora_config.to_dict())
        lora_info = {"file": LORA_FILE, "rank": opts.lora_rank, "alpha": opts.lora_rank,
                     "target_modules": list(LORA_TARGETS)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "base_model": model,
        "base": identity,
        "num_classes": len(names),
        "class_names": names,
        "classes": classes,
        "template": template,
        "prompts": prompts,
        "init_words": init_words,
        "init_subtokens": pieces,
        "lora": lora_info,
        "steps": opts.steps,
        "seed": opts.seed,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("show_progress",)},
        "data": {"dataset": cfg.data.dataset, "split": "train", "num_train": len(labels),
                 "class_counts": counts.long().tolist(), "config": asdict(cfg.data)},
        "final_loss_ema": loss_ema,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "resumed_from_step": start if resume else None,
    }
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- evaluation


def evaluate(cfg: Config, splits: Splits, model: str, out: Path, manifest: dict[str, Any], *, n_edits: int,
             guidance_scale: float, device: torch.device, show_progress: bool) -> dict[str, Any]:
    """Inter-class edit target rates (s=0.9, both schedules) on the same edits, three ways:

    - ``before``: the base model with the learned tokens at their *initial* values (``init_words``), i.e. what
      the run started from: the fair "before fine-tuning";
    - ``names``: the base model prompted with the class *names* in the same template (what a user gets without the
      tool; on a base model that never learned the names it is also chance);
    - ``after``: ``out`` loaded through the online generator's own path (:func:`apply_finetuned`), so what is
      measured is what a training run would use.
    """
    names, template = manifest["class_names"], manifest["template"]
    kw = dict(n_edits=n_edits, guidance_scale=guidance_scale, steps=cfg.aug.steps, grid_steps=cfg.aug.grid_steps,
              seed=0, device=str(device), show_progress=show_progress)
    base = load_sd(model, device, torch.float32)
    by_name = edit_target_rates(base, [render_prompt(template, n, None) for n in names], splits, **kw)
    tokens = [manifest["classes"][str(i)]["token"] for i in range(len(names))]
    init, _ = init_embeddings(base.tokenizer, base.text_encoder, manifest["init_words"],
                              manifest["options"]["init_split"])
    add_tokens(base.tokenizer, base.text_encoder, tokens, init, source="--eval")
    before = edit_target_rates(base, class_prompts(template, names, tokens), splits, **kw)
    tuned = load_sd(model, device, torch.float32)
    aug = AugConfig(model=model, prompt=template, textual_inversion=str(out),
                    lora=str(out) if manifest["lora"] else "")
    loaded = apply_finetuned(tuned, aug, len(names))
    after = edit_target_rates(tuned, class_prompts(template, names, loaded), splits, **kw)
    return {"before": before, "names": by_name, "after": after, "chance": 1.0 / len(names),
            "guidance_scale": guidance_scale,
            "protocol": "s=0.9 inter-class SDEdit of training images toward a uniform target != source; judged by "
                        "the quality gate's LogisticRegression on grayscale training pixels; before = tokens at "
                        "their initial values, names = class names in the template"}


def format_eval(ev: dict[str, Any]) -> str:
    lines = [f"{'mode':<9}{'s':>5}{'names':>8}{'before':>8}{'after':>8}   (target rate; chance {ev['chance']:.3f}, "
             f"{ev['after']['n_edits']} edits; before = tokens at init)"]
    for mode, cells in ev["after"]["modes"].items():
        for s, c in cells.items():
            n = ev["names"]["modes"][mode][s]["target_rate"]
            b = ev["before"]["modes"][mode][s]["target_rate"]
            lines.append(f"{mode:<9}{s:>5}{n:>8.3f}{b:>8.3f}{c['target_rate']:>8.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = FinetuneOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " " + __doc__.split("\n")[1])
    p.add_argument("--config", default=None, help="YAML config (data split, class names, prompt)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.imbalance_ratio=20")
    p.add_argument("--model", default="", help="base SD (hub id or diffusers folder); default aug.model")
    p.add_argument("--out", required=True, help="output folder (tokens, LoRA, manifest.json, checkpoints/)")
    p.add_argument("--template", default=d.template,
                   help="prompt template with {token} (learned token) and/or {name} (class name); default "
                        "aug.prompt. '{name}' alone puts the token in the name's place; a template with neither "
                        "(e.g. 'a photo') gets the token appended")
    p.add_argument("--init-word", default=d.init_word, help="initialise every token from this word (default: the "
                                                            "class name)")
    p.add_argument("--init-split", choices=["average", "error"], default=d.init_split,
                   help="an initializer the tokenizer splits into several tokens: average their embeddings, or stop")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the token embeddings")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="also train a UNet LoRA of this rank (0: TI "
                                                                      "only; Diff-Mix uses 10)")
    p.add_argument("--lora-lr", type=float, default=d.lora_lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (then constant)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (without --resume)")
    p.add_argument("--eval", action="store_true", help="measure inter-class edit target rates before/after")
    p.add_argument("--eval-edits", type=int, default=200, help="edits per schedule mode in --eval")
    p.add_argument("--eval-guidance", type=float, default=4.0, help="CFG scale in --eval (the quality gate's)")
    p.add_argument("--device", default="", help="cpu / cuda (default: run.device; auto picks cuda when present)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out)
        if args.steps < 1 or args.batch_size < 1 or args.lora_rank < 0 or args.ckpt_every < 0:
            raise FinetuneError("--steps and --batch-size must be >= 1, --lora-rank and --ckpt-every >= 0")
        if not args.resume and out.exists() and any(out.iterdir()):
            if not args.force:
                raise FinetuneError(f"--out {out} exists and is not empty; pass --resume to continue it or --force "
                                    f"to replace it")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        dev = args.device or cfg.run.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(dev)
        model = args.model or cfg.aug.model
        splits = build_splits(cfg.data)
        opts = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora_rank,
                               lora_lr=args.lora_lr, warmup=args.warmup, template=args.template,
                               init_word=args.init_word, init_split=args.init_split, seed=args.seed,
                               ckpt_every=args.ckpt_every, show_progress=not args.no_progress)
        manifest = finetune(cfg, splits, model, out, opts, resume=args.resume, device=device)
        manifest["command"] = "python tools/finetune_sd.py " + " ".join(sys.argv[1:] if argv is None else argv)
        print(f"wrote {out}: {manifest['num_classes']} tokens"
              f"{' + LoRA rank ' + str(args.lora_rank) if args.lora_rank else ''} after {manifest['steps']} steps "
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

