"""Fine-tune a Stable Diffusion on a data set's training split: one textual-inversion token per class, optionally
learned jointly with a UNet LoRA (run by ``tools/finetune_sd.py``; the folder it writes is the format of
:mod:`online_aug.generator.finetuned`, which the online generator reads).

- TI (DA-Fusion §4.1): a new token ``<name>`` per class, initialised from the class name (or an initializer word),
  learned with the frozen model's denoising loss (:mod:`online_aug.sdtrain.sd_training`) on prompts rendered from the
  template (see :func:`online_aug.generator.prompts.render_prompt` for how ``{token}`` / ``{name}`` are filled).
- TI + LoRA (Diff-Mix §3.3, Table 7 "TI+DB", rank 10 there): ``lora_rank > 0`` also trains a PEFT LoRA on the UNet's
  attention projections (to_q/to_k/to_v/to_out.0), with alpha = rank (the scale-1 convention diffusers assumes
  when it loads a LoRA without alphas).

Only ``splits.train`` is used (never a validation or test image). Classes are sampled uniformly, not by frequency, so
tail classes get as many updates as head classes. The initializer: a word the tokenizer splits into several pieces is
averaged over the pieces (``init_split="average"``, the default; the pieces are recorded in the manifest) or refused
(``init_split="error"``).

Besides the folder format, a run writes ``checkpoints/step-<n>.pt`` every ``ckpt_every`` steps and at the end;
``resume`` continues from the last one (also to a larger ``steps``). The per-step RNG is
:func:`online_aug.rng.step_rng` of (seed, step), so a resumed run gives the same weights as an uninterrupted one.

:func:`evaluate` judges s=0.9 inter-class edits (:mod:`online_aug.sdtrain.edit_quality`) three ways: class names in the
template, the tokens at their initial values ("before"), and the saved folder loaded by the generator ("after").
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from online_aug.config import AugConfig, Config, ConfigError
from online_aug.data import Splits, seen_record
from online_aug.generator.finetuned import (
    LORA_TARGETS,
    add_tokens,
    apply_finetuned,
    base_identity,
    save_learned_embeddings,
    save_lora,
    token_phrase,
    token_words,
    write_manifest,
)
from online_aug.generator.loading import load_sd
from online_aug.generator.prompts import class_prompts, render_prompt, resolve_class_names, token_strings
from online_aug.rng import step_rng
from online_aug.schedules import warmup_cosine
from online_aug.sdtrain.edit_quality import edit_target_rates
from online_aug.sdtrain.sd_training import (
    CROPS,
    StepBatchSampler,
    StreamedImages,
    class_uniform_weights,
    denoising_loss,
    sample_latents,
    training_scheduler,
)

InitSplit = Literal["average", "error"]
CKPT_DIR = "checkpoints"


@dataclass
class FinetuneOptions:
    """Everything that shapes the learned weights (recorded in manifest.json)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-3  # token embeddings (TI usually runs 1e-4..5e-3; the tiny model's table is small)
    lora_rank: int = 0  # 0: TI only; Diff-Mix uses 10 on SD 1.5
    lora_lr: float = 1e-3
    warmup: int = 20  # linear warm-up, then constant: resuming to a larger steps continues the same schedule
    template: str = ""  # empty: cfg.aug.prompt
    init_word: str = ""  # empty: each class's name
    init_split: InitSplit = "average"
    num_vectors: int = 1  # embedding vectors per class token (DA-Fusion's later setting: 4)
    resolution: int = 0  # training images' side in pixels; 0: the model's native (UNet sample_size x VAE scale)
    crop: str = "center"  # center | random: the square crop after resizing the shorter side (diffusers' scripts)
    hflip: bool = False  # random horizontal flips (off for digits, whose mirror image is another glyph)
    mixed_precision: str = "no"  # no | fp16 | bf16 | auto: autocast, fp32 master weights of the trained parameters
    gradient_checkpointing: bool = False  # recompute UNet / text-encoder activations in the backward pass
    num_workers: int = 0  # DataLoader processes decoding the images of the next steps
    seed: int = 0
    ckpt_every: int = 0  # 0: a checkpoint only at the end
    keep_ckpts: int = 2
    show_progress: bool = True


MIXED_PRECISION = ("no", "fp16", "bf16", "auto")

# The papers' fine-tuning settings, for tools/finetune_sd.py --recipe (explicit flags override them).
RECIPES: dict[str, dict[str, Any]] = {
    # DA-Fusion (Trabucco et al., 2023), appendix hyperparameter table: textual inversion with batch size 4,
    # learning rate 0.0005, tokens initialised from "the", 512 px, on SD 1.4 ("CompVis/stable-diffusion-v1-4"), 1000
    # steps. The authors later moved to 4 vectors per token and 2000 steps (not in the paper text): those are the
    # recipe's values.
    "da-fusion": dict(steps=2000, batch_size=4, lr=5e-4, lora_rank=0, num_vectors=4, init_word="the",
                      resolution=512, crop="random", hflip=True, mixed_precision="auto",
                      gradient_checkpointing=True),
    # Diff-Mix (Wang et al., 2024), Table 7 "TI+DB": SD 1.5, 35000 optimisation steps, batch size 8, 512 x 512
    # input, learning rate 5e-5 (tokens and LoRA), LoRA rank 10 on the UNet's attention (§3.3, "we set the rank d
    # to 10"); prompts "[Vi] [metaclass]" (Figure 3): use a template such as "a photo of a {token} bird".
    "diff-mix": dict(steps=35000, batch_size=8, lr=5e-5, lora_rank=10, lora_lr=5e-5, num_vectors=1, resolution=512,
                     crop="random", hflip=True, mixed_precision="auto", gradient_checkpointing=True),
}


def recipe_options(name: str, **overrides: Any) -> FinetuneOptions:
    """FinetuneOptions of the recipe ``name`` (empty: the plain defaults) with ``overrides`` on top."""
    if name and name not in RECIPES:
        raise FinetuneError(f"--recipe {name!r} does not exist; choose one of {', '.join(RECIPES)} (or leave it out)")
    return FinetuneOptions(**{**RECIPES.get(name, {}), **overrides})


def resolve_precision(mixed_precision: str, device: torch.device, cpu: str = "bf16") -> str:
    """``auto``: bf16 where the device has it (no loss scaling, fp32's range), else fp16 on CUDA; ``cpu`` on a CPU
    (fine-tuning: bf16; distillation: ``no``, fp32)."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cpu


def check_options(opts: FinetuneOptions, device: torch.device) -> None:
    """One-line errors for settings that cannot work, before any model is loaded."""
    if opts.steps < 1 or opts.batch_size < 1 or opts.num_vectors < 1:
        raise FinetuneError("--steps, --batch-size and --num-vectors must be >= 1")
    if opts.lora_rank < 0 or opts.ckpt_every < 0 or opts.resolution < 0 or opts.num_workers < 0:
        raise FinetuneError("--lora-rank, --ckpt-every, --resolution and --num-workers must be >= 0")
    if opts.crop not in CROPS:
        raise FinetuneError(f"--crop {opts.crop!r}: choose one of {', '.join(CROPS)}")
    if opts.mixed_precision not in MIXED_PRECISION:
        raise FinetuneError(f"--mixed-precision {opts.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}")
    if opts.mixed_precision == "fp16" and device.type != "cuda":
        raise FinetuneError(f"--mixed-precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or "
                            f"no")


class FinetuneError(RuntimeError):
    """A bad request to the tool (folder in use, resume from another run); the message says what to do."""


# ---------------------------------------------------------------- setup


def run_record(cfg: Config, model: str, identity: dict[str, Any], names: list[str], tokens: list[str],
               template: str, init_words: list[str], opts: FinetuneOptions) -> dict[str, Any]:
    """What must agree for ``--resume`` to continue a run (steps may grow; everything else must match)."""
    return {
        "base_model": model, "base": identity, "data": asdict(cfg.data), "class_names": names, "tokens": tokens,
        "template": template, "init_words": init_words, "init_split": opts.init_split, "lora_rank": opts.lora_rank,
        "lr": opts.lr, "lora_lr": opts.lora_lr, "warmup": opts.warmup, "batch_size": opts.batch_size,
        "seed": opts.seed, "num_vectors": opts.num_vectors, "resolution": opts.resolution, "crop": opts.crop,
        "hflip": opts.hflip, "mixed_precision": opts.mixed_precision,
    }


def init_embeddings(tokenizer: Any, text_encoder: torch.nn.Module, words: list[str], on_split: InitSplit = "average"
                    ) -> tuple[Tensor, list[list[str]]]:
    """Initial embedding ``[C, D]`` of each new token: the input embedding of its initializer word.

    A word the tokenizer splits into several sub-tokens ("zero" -> z, e, r, o</w> in a tokenizer that never saw it)
    is averaged over its sub-tokens with ``on_split="average"`` (the sub-tokens are returned so the caller can show
    and record them) or is a ValueError naming the word and its pieces with ``on_split="error"`` (the rule of
    diffusers' textual_inversion.py). Averaging keeps multi-word class names usable ("sea turtle").
    """
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    rows, pieces = [], []
    for w in words:
        ids = tokenizer.encode(w, add_special_tokens=False)
        toks = tokenizer.convert_ids_to_tokens(ids)
        if not ids:
            raise ValueError(f"initializer word {w!r} tokenizes to nothing; choose another with --init-word")
        if len(ids) > 1 and on_split == "error":
            raise ValueError(f"initializer word {w!r} is split by the tokenizer into {len(ids)} tokens {toks}; "
                             f"choose a single-token word with --init-word, or pass --init-split average to "
                             f"initialise from the mean of the sub-token embeddings")
        rows.append(table[ids].mean(0))
        pieces.append(toks)
    return torch.stack(rows), pieces


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


def lora_state(unet: torch.nn.Module) -> dict[str, Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


# ---------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / CKPT_DIR).glob("step-*.pt"))


def save_checkpoint(out: Path, step: int, run: dict[str, Any], embeds: torch.Tensor, unet: torch.nn.Module,
                    opt: torch.optim.Optimizer, loss_ema: float, lora: bool, keep: int,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    folder = out / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    state = {"step": step, "run": run, "embeds": embeds.detach().cpu().clone(), "opt": opt.state_dict(),
             "lora": lora_state(unet) if lora else None, "loss_ema": loss_ema,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
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
    precision = resolve_precision(opts.mixed_precision, device)
    opts = replace(opts, mixed_precision=precision)  # the record holds what ran, not "auto"
    check_options(opts, device)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    # The frozen parts in half precision where the device computes in it (CUDA); a CPU keeps fp32 weights and runs
    # the bf16 autocast. The text encoder stays fp32: its token table is trained (diffusers' textual_inversion.py).
    weight_dtype = amp_dtype if amp_dtype is not None and device.type == "cuda" else torch.float32
    comps = load_sd(model, device, weight_dtype)
    identity = base_identity(comps)  # before tokens / LoRA change the modules
    names = resolve_class_names(cfg.aug.class_names, splits.class_names)
    tokens = token_strings(names)
    nv = opts.num_vectors
    words = [w for t in tokens for w in token_words(t, nv)]
    init_words = [opts.init_word] * len(names) if opts.init_word else list(names)
    template = opts.template or cfg.aug.prompt
    prompts = class_prompts(template, names, [token_phrase(t, nv) for t in tokens], key="--template")
    try:
        init, pieces = init_embeddings(comps.tokenizer, comps.text_encoder, init_words, opts.init_split)
    except ValueError as e:
        raise ConfigError(f"--init-word: {e}") from e
    split_words = {w: p for w, p in zip(init_words, pieces) if len(p) > 1}
    if split_words and opts.show_progress:
        print(f"note: initializer words split by the tokenizer are averaged over their pieces: {split_words}")
    run = run_record(cfg, model, identity, names, tokens, template, init_words, opts)

    te, unet, tok = comps.text_encoder.float(), comps.unet, comps.tokenizer
    # every vector of a class starts from its initializer (diffusers' textual_inversion.py)
    ids = torch.tensor(add_tokens(tok, te, words, init.repeat_interleave(nv, dim=0), source="--out"))
    table = te.get_input_embeddings().weight
    table.requires_grad_(True)
    # Only the new rows learn: the rest of the table keeps a zero gradient, so (with no weight decay) Adam never
    # moves it, and the saved embeddings are the only thing that changed in the text encoder.
    mask = torch.zeros(table.shape[0], 1, device=device)
    mask[ids] = 1.0
    table.register_hook(lambda g: g * mask)
    groups: list[dict[str, Any]] = [{"params": [table], "lr": opts.lr, "weight_decay": 0.0}]
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention (flash / memory-efficient)
    lora_config = None
    if opts.lora_rank > 0:
        lora_config = add_lora(unet, opts.lora_rank, opts.seed)
        lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.data = p.data.float()  # fp32 master weights of the trained parameters over a half-precision UNet
            p.requires_grad_(True)
        groups.append({"params": lora_params, "lr": opts.lora_lr, "weight_decay": 1e-2})
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(groups)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients need loss scaling

    start, loss_ema = 0, float("nan")
    if resume:
        state = load_resume_state(out, run)
        start, loss_ema = int(state["step"]), float(state["loss_ema"])
        with torch.no_grad():
            table[ids] = state["embeds"].to(device, table.dtype)
        if state["lora"] is not None:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(unet, state["lora"])
        opt.load_state_dict(state["opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if start > opts.steps:
            raise FinetuneError(f"--resume: the checkpoint is at step {start}, beyond --steps {opts.steps}")

    multiple = comps.vae_scale_factor * 2 ** (len(unet.config.down_block_types) - 1)
    res = opts.resolution or int(unet.config.sample_size) * comps.vae_scale_factor
    if res % multiple:
        raise FinetuneError(f"--resolution {res} must be a multiple of {multiple} for {model!r} (VAE scale x "
                            f"2^(UNet down blocks - 1)); 0 uses the model's native resolution")
    labels = torch.from_numpy(splits.train.labels).long()
    counts = torch.bincount(labels, minlength=len(names))
    if (counts == 0).any():
        raise ConfigError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no training image")
    # Images are decoded per step from the stored originals (never the whole split at the generator's resolution)
    sampler = StepBatchSampler(class_uniform_weights(labels, len(names)), opts.batch_size, opts.seed, start,
                               opts.steps, opts.crop, opts.hflip)
    loader = torch.utils.data.DataLoader(StreamedImages(splits.train, res), batch_sampler=sampler,
                                         num_workers=opts.num_workers, pin_memory=device.type == "cuda")
    prompt_ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
    noise_schedule = training_scheduler(comps.scheduler.config)
    scaling = comps.vae.config.scaling_factor

    unet.train()  # dropout-free in SD; train() only matters for modules that would have it
    te.train()  # CLIP's dropout is 0; transformers checkpoints activations only in training mode
    bar = tqdm(zip(range(start, opts.steps), loader), desc="finetune", initial=start, total=opts.steps,
               disable=not opts.show_progress, dynamic_ncols=True)
    for step, (x, y) in bar:
        g = step_rng(opts.seed, 0, step)
        # warm-up then constant (min_ratio 1): a step's rate does not depend on opts.steps, so resuming to a
        # larger --steps continues the same schedule
        warm = warmup_cosine(step, opts.warmup, opts.steps, min_ratio=1.0)
        for grp, base_lr in zip(opt.param_groups, [opts.lr, opts.lora_lr]):
            grp["lr"] = base_lr * warm
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            # the VAE is frozen (latents are data here) and runs in its own dtype outside the autocast: load_sd keeps
            # a force_upcast VAE out of fp16, which an fp16 autocast would otherwise bring back
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                post = comps.vae.encode(x.to(device, comps.vae.dtype, non_blocking=True)).latent_dist
                z0 = sample_latents(post.mean.float(), post.std.float(), g) * scaling
            # Encode each class prompt in the batch once, then gather: a batch rarely holds all classes.
            uniq, inv = torch.unique(y, return_inverse=True)
            emb = te(prompt_ids[uniq.to(device)])[0][inv.to(device)]
            loss = denoising_loss(unet, noise_schedule, z0, emb, g)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_ema = loss.item() if step == start and loss_ema != loss_ema else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 10 == 0 or step == opts.steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.4f}")
        if opts.ckpt_every and (step + 1) % opts.ckpt_every == 0 and step + 1 < opts.steps:
            save_checkpoint(out, step + 1, run, table[ids], unet, opt, loss_ema, lora_config is not None,
                            opts.keep_ckpts, scaler)
    bar.close()
    unet.eval()
    te.eval()
    save_checkpoint(out, opts.steps, run, table[ids], unet, opt, loss_ema, lora_config is not None, opts.keep_ckpts,
                    scaler)

    classes = save_learned_embeddings(out, tokens, table[ids].detach().reshape(len(tokens), nv, -1))
    lora_info = save_lora(out, unet, lora_config) if lora_config is not None else None
    manifest = {
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
        # seen_record's indices let a training run refuse tokens / a LoRA learned on its val or test images
        "data": {**seen_record(cfg.data, splits.train, "train"), "split": "train", "num_train": len(labels),
                 "config": asdict(cfg.data)},
        "final_loss_ema": loss_ema,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "resumed_from_step": start if resume else None,
        "resolution": res,
    }
    write_manifest(out, manifest)
    return manifest


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
    x, y = splits.train.tensors()
    kw: dict[str, Any] = dict(n_edits=n_edits, guidance_scale=guidance_scale, steps=cfg.aug.steps,
                              grid_steps=cfg.aug.grid_steps, seed=0, device=str(device), show_progress=show_progress)
    base = load_sd(model, device, torch.float32)
    by_name = edit_target_rates(base, [render_prompt(template, n, None) for n in names], x, y, **kw)
    entries = [manifest["classes"][str(i)] for i in range(len(names))]
    nv = [int(e.get("vectors", 1)) for e in entries]
    init, _ = init_embeddings(base.tokenizer, base.text_encoder, manifest["init_words"],
                              manifest["options"]["init_split"])
    add_tokens(base.tokenizer, base.text_encoder, [w for e, n in zip(entries, nv) for w in token_words(e["token"], n)],
               init.repeat_interleave(torch.tensor(nv), dim=0), source="--eval")
    phrases = [token_phrase(e["token"], n) for e, n in zip(entries, nv)]
    before = edit_target_rates(base, class_prompts(template, names, phrases), x, y, **kw)
    tuned = load_sd(model, device, torch.float32)
    aug = AugConfig(model=model, prompt=template, textual_inversion=str(out),
                    lora=str(out) if manifest["lora"] else "")
    loaded = apply_finetuned(tuned, aug, len(names))
    after = edit_target_rates(tuned, class_prompts(template, names, loaded), x, y, **kw)
    return {"before": before, "names": by_name, "after": after, "chance": 1.0 / len(names),
            "guidance_scale": guidance_scale,
            "protocol": "s=0.9 inter-class SDEdit of training images toward a uniform target != source; judged by "
                        "the quality gate's LogisticRegression on grayscale training pixels; before = tokens at "
                        "their initial values, names = class names in the template"}


def format_eval(ev: dict[str, Any]) -> str:
    """:func:`evaluate`'s target rates as a text table, one row per (mode, strength)."""
    lines = [f"{'mode':<9}{'s':>5}{'names':>8}{'before':>8}{'after':>8}   (target rate; chance {ev['chance']:.3f}, "
             f"{ev['after']['n_edits']} edits; before = tokens at init)"]
    for mode, cells in ev["after"]["modes"].items():
        for s, c in cells.items():
            n = ev["names"]["modes"][mode][s]["target_rate"]
            b = ev["before"]["modes"][mode][s]["target_rate"]
            lines.append(f"{mode:<9}{s:>5}{n:>8.3f}{b:>8.3f}{c['target_rate']:>8.3f}")
    return "\n".join(lines)
