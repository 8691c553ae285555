"""Build a tiny Stable-Diffusion-architecture model on a dataset's long-tail *training* split.

The result is an ordinary diffusers folder (``model_index.json``, ``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; no safety checker) that ``StableDiffusionImg2ImgPipeline.from_pretrained`` and
:func:`online_aug.generator.loading.load_sd` load like any SD 1.x checkpoint. It stands in for real Stable
Diffusion in tests, CI and the CPU demo, so every part keeps SD's architecture, only tiny:

- ``AutoencoderKL`` with downsample factor 2 (16x16 RGB -> 8x8x4 latents), trained first on reconstruction plus a
  small KL term; its ``scaling_factor`` is set to 1/std of the training latents, the role 0.18215 plays in SD.
- ``UNet2DConditionModel`` (sample_size 8, cross-attention to the prompt), epsilon prediction.
- ``CLIPTextModel`` (hidden 64, 2 layers) with a ``CLIPTokenizer`` whose BPE vocab/merges are built here from the
  prompt words (each word becomes one ``word</w>`` token; single characters stay in the vocab so any other
  lower-case prompt still tokenizes). The text encoder is trained jointly with the UNet.
- ``DDIMScheduler`` with SD 1.x's settings: scaled_linear betas 0.00085..0.012, 1000 train steps, ``clip_sample``
  False, ``set_alpha_to_one`` False, ``steps_offset`` 1, "leading" spacing. Keeping SD's noise schedule keeps the
  meaning of an SDEdit strength s close to what it is on the real model.

Training sees only ``splits.train`` (never a test image): prompts name the class with ``cfg.aug.prompt`` (or
``--prompt``), and 10% of them are dropped to the empty prompt so classifier-free guidance works. Classes are
sampled uniformly (not by frequency) because the generator's job is to draw tail classes on request.

At the end :func:`online_aug.generator.quality.evaluate_edit_quality` runs the quality gate (inter-class SDEdit at
s=0.9 must land on the target, s=0.25 should keep the source) and the numbers go to ``build_info.json``.

Usage::

    python tools/build_tiny_sd.py --config configs/demo.yaml --out models/tiny-sd-digits --force
    python tools/build_tiny_sd.py data.imbalance_ratio=20 --out /tmp/tiny-sd --steps 300
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# On a shared CPU, OpenMP threads that spin at barriers while descheduled made this build 10-20x slower (measured:
# VAE steps at 6 s instead of 0.3 s with other jobs running). Sleeping waits cost nothing when the machine is idle.
# Must be set before torch loads its OpenMP runtime; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from online_aug.config import Config, load_config  # noqa: E402
from online_aug.data import LabeledImages, Splits, build_splits, seen_record  # noqa: E402

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16  # prompts here are ~7 tokens; a short context keeps cross-attention cheap


@dataclass
class BuildOptions:
    """Everything that shapes the trained weights (recorded verbatim in build_info.json)."""

    steps: int = 1000  # UNet + text-encoder optimizer steps
    vae_steps: int = 400
    batch_size: int = 128
    resolution: int = 16
    seed: int = 0
    data: str = "train"  # which split part the model is trained on: train (the classifier's) or pool
    prompt: str = ""  # empty: cfg.aug.prompt
    class_names: list[str] = field(default_factory=list)  # empty: cfg.aug.class_names or the dataset's
    cfg_dropout: float = 0.1
    lr: float = 1e-3
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    ema_decay: float = 0.998
    show_progress: bool = True


# ---------------------------------------------------------------- tokenizer


def prompt_words(prompts: list[str]) -> list[str]:
    """Lower-case words as CLIP's pre-tokenizer splits them (letters runs; digits are single tokens)."""
    import re

    words: list[str] = []
    for p in prompts:
        for w in re.findall(r"[^\W\d_]+|\d|[^\s\w]+", p.lower()):
            if w not in words:
                words.append(w)
    return words


def build_tokenizer(words: list[str]) -> Any:
    """A CLIPTokenizer whose vocab makes each of ``words`` a single ``word</w>`` token.

    Merges are added greedily (the leftmost unmerged pair of a word that still splits) until every word
    tokenizes to one piece. A new merge has the lowest priority, so it never changes a word that already
    tokenizes to one piece: the loop reaches a fixed point.
    """
    from transformers import CLIPTokenizer

    # ByteLevel pre-tokenization maps printable ASCII to itself, so plain characters are valid base symbols.
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: list[str] = [BOS, EOS] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []

    def make() -> Any:
        return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges),
                             model_max_length=MAX_TOKENS)

    tok = make()
    for _ in range(10_000):
        split = next((p for p in (tok.tokenize(w) for w in words) if len(p) > 1), None)
        if split is None:
            return tok
        merges.append((split[0], split[1]))
        if split[0] + split[1] not in vocab:
            vocab.append(split[0] + split[1])
        tok = make()
    raise RuntimeError("tokenizer merges did not converge")  # unreachable for finite words


def save_tokenizer_files(tok: Any, folder: Path) -> None:
    """Write vocab.json + merges.txt (CLIP's format) next to the tokenizer config save_pretrained writes."""
    tok.save_pretrained(folder)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))


# ---------------------------------------------------------------- models


def make_components(vocab_size: int, bos_id: int, eos_id: int, resolution: int) -> dict[str, Any]:
    """Freshly initialised tiny SD parts (initialisation uses torch's global RNG: seed before calling)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=resolution,
    )
    # Cross-attention at both levels (8x8 and 4x4) and in the mid block: class identity has to reach the
    # coarse layout at high noise, which is what an s=0.9 inter-class edit relies on. (Dropping the 8x8
    # attention saves ~25% per step but, at equal compute, left more s=0.25 edits drifting off the source.)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=64, attention_head_dim=4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, projection_dim=64, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=eos_id,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}


def count_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- data


def training_tensors(split: LabeledImages, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images as [N, 3, R, R] in [-1, 1] (antialiased resize) and labels [N]."""
    if isinstance(split.images, np.ndarray):
        x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float().div_(255)
    else:  # files: go through the dataset so reading/resizing matches the classifier's pipeline
        x = torch.stack([split[i][0] for i in range(len(split))])
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1).mul_(2).sub_(1), torch.from_numpy(split.labels).long()


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


# ---------------------------------------------------------------- training


def train_vae(vae: torch.nn.Module, x: torch.Tensor, opts: BuildOptions, gen: torch.Generator) -> dict[str, float]:
    """Reconstruction (MSE) + a small per-element KL so latents stay smooth enough to diffuse."""
    opt = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0)
    vae.train()
    rec = kl = float("nan")
    bar = tqdm(range(opts.vae_steps), desc="vae", disable=not opts.show_progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = opts.vae_lr * cosine_lr(step, opts.vae_steps, warmup=20)
        idx = torch.randint(len(x), (opts.batch_size,), generator=gen)
        batch = x[idx]
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec_loss = F.mse_loss(recon, batch)
        kl_loss = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + opts.kl_weight * kl_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec, kl = rec_loss.item(), kl_loss.item()
        if step % 20 == 0 or step == opts.vae_steps - 1:
            bar.set_postfix(mse=f"{rec:.4f}", kl=f"{kl:.2f}")
    vae.eval()
    return {"vae_final_mse": rec, "vae_final_kl_per_element": kl}


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def train_denoiser(parts: dict[str, Any], z_mean: torch.Tensor, z_std: torch.Tensor, labels: torch.Tensor,
                   prompt_ids: torch.Tensor, num_classes: int, opts: BuildOptions,
                   gen: torch.Generator) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, float]]:
    """Epsilon-prediction MSE for the UNet and text encoder together; returns EMA copies of both.

    ``prompt_ids`` holds one row per class plus a last row for the empty prompt. The C+1 prompts are encoded
    once per step and gathered per sample, so the text encoder costs ~nothing next to the UNet.
    """
    unet, text_encoder, sched = parts["unet"], parts["text_encoder"], parts["scheduler"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    # EMA weights are what gets saved: for a few thousand steps they give visibly cleaner samples.
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    alphas = sched.alphas_cumprod
    # Uniform over classes (weight 1/n_c per image): tail classes must be drawable on request.
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = 1.0 / counts[labels]
    T = sched.config.num_train_timesteps
    loss_avg = float("nan")
    bar = tqdm(range(opts.steps), desc="unet", disable=not opts.show_progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = opts.lr * cosine_lr(step, opts.steps, warmup=min(100, opts.steps // 10 + 1))
        idx = torch.multinomial(weights, opts.batch_size, replacement=True, generator=gen)
        z0 = z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)
        cond = labels[idx].clone()
        drop = torch.rand(opts.batch_size, generator=gen) < opts.cfg_dropout
        cond[drop] = num_classes  # the empty-prompt row
        t = torch.randint(0, T, (opts.batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # = scheduler.add_noise, written out to stay on one dtype
        emb = text_encoder(prompt_ids)[0][cond]
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(opts.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA tracks the model closely
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 20 == 0 or step == opts.steps - 1:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
    return ema_unet, ema_text, {"unet_final_loss_ema": loss_avg}


# ---------------------------------------------------------------- build


def resolve_prompts(cfg: Config, splits: Splits, opts: BuildOptions) -> tuple[str, list[str]]:
    template = opts.prompt or cfg.aug.prompt
    names = opts.class_names or cfg.aug.class_names or splits.class_names
    if len(names) != splits.num_classes:
        raise ValueError(f"aug.class_names has {len(names)} names but the dataset has {splits.num_classes} classes")
    return template, list(names)


def build_tiny_sd(cfg: Config, splits: Splits, out: str | Path, opts: BuildOptions) -> dict[str, Any]:
    """Train the tiny SD on ``splits.train`` and save a diffusers folder at ``out`` (created or overwritten).

    Returns the build record (without quality numbers); it is also written to ``out/build_info.json``.
    """
    from diffusers import StableDiffusionPipeline

    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)  # standalone program: initialisation draws from the global RNG
    gen = torch.Generator().manual_seed(opts.seed)
    template, names = resolve_prompts(cfg, splits, opts)
    prompts = [template.format(name=n) for n in names]
    tok = build_tokenizer(prompt_words(prompts + [template.replace("{name}", "")]))
    parts = make_components(len(tok), tok.bos_token_id, tok.eos_token_id, opts.resolution)

    x, labels = training_tensors(splits.train, opts.resolution)
    info: dict[str, Any] = {}
    info.update(train_vae(parts["vae"], x, opts, gen))
    with torch.no_grad():  # latents of the whole (small) split once: the UNet loop never runs the encoder
        post = parts["vae"].encode(x).latent_dist
        z_mean, z_std = post.mean, post.std
        scaling = float(1.0 / (z_mean + z_std * torch.randn(z_mean.shape, generator=gen)).std())
        recon = parts["vae"].decode(z_mean).sample
        info["vae_recon_mse_01"] = float(F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2))
    parts["vae"].register_to_config(scaling_factor=scaling)

    ids = tok(prompts + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
              return_tensors="pt").input_ids
    unet, text_encoder, losses = train_denoiser(parts, z_mean * scaling, z_std * scaling, labels, ids,
                                                splits.num_classes, opts, gen)
    info.update(losses)

    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=parts["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    save_tokenizer_files(tok, out / "tokenizer")

    record: dict[str, Any] = {
        "data": {**seen_record(cfg.data, splits.train, opts.data), "class_names": splits.class_names},
        "prompt_template": template, "prompt_class_names": names,
        "options": {k: v for k, v in asdict(opts).items() if k != "show_progress"},
        "params": {k: count_params(parts[k]) for k in ("vae", "unet", "text_encoder")},
        "vocab_size": len(tok), "vae_scaling_factor": scaling,
        "scheduler": "DDIMScheduler: scaled_linear 0.00085..0.012, T=1000, clip_sample=False, "
                     "set_alpha_to_one=False, steps_offset=1, leading spacing, epsilon prediction",
        "train_wall_s": round(time.perf_counter() - t_start, 1),
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"),
                     "transformers": _version("transformers"), "python": platform.python_version()},
        **info,
    }
    write_build_info(out, record)
    return record


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def write_build_info(out: Path, record: dict[str, Any]) -> None:
    (Path(out) / "build_info.json").write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (data split and prompt come from it)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.imbalance_ratio=20")
    p.add_argument("--out", required=True, help="output diffusers folder")
    d = BuildOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="UNet/text-encoder training steps")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help="VAE training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--resolution", type=int, default=d.resolution, help="image side in pixels (latents are half)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", choices=("train", "pool"), default=d.data,
                   help="split part to train on: the classifier's long-tail training split, or the generator pool "
                        "(data.pool_fraction; images the classifier never sees)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the UNet + text encoder")
    p.add_argument("--prompt", default="", help="prompt template overriding aug.prompt; '{name}' is optional "
                                                "(e.g. 'a photo' trains a class-agnostic model)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale of the quality gate (default: aug.guidance_scale, what training runs will use)")
    p.add_argument("--gate-edits", type=int, default=200, help="edits per (mode, strength) in the quality gate")
    p.add_argument("--skip-gate", action="store_true", help="do not run the quality gate")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: --out {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    if args.resolution % 2 or args.resolution < 8:
        print(f"error: --resolution must be even and >= 8, got {args.resolution}", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    splits = build_splits(cfg.data)
    # the builder and its gate see only the chosen part (never val or test); build_info.json records its indices
    splits = dataclasses.replace(splits, train=splits.part(args.data))
    opts = BuildOptions(steps=args.steps, vae_steps=args.vae_steps, batch_size=args.batch_size,
                        resolution=args.resolution, seed=args.seed, prompt=args.prompt, lr=args.lr, data=args.data,
                        show_progress=not args.no_progress)
    t0 = time.perf_counter()
    # Build into a sibling temp folder and swap at the end: a failed or interrupted build never destroys a
    # working model already at --out.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = build_tiny_sd(cfg, splits, tmp, opts)
        record["config"] = args.config
        record["overrides"] = list(args.overrides)
        record["command"] = "python tools/build_tiny_sd.py " + " ".join(sys.argv[1:] if argv is None else argv)
        if not args.skip_gate:
            from online_aug.generator.quality import evaluate_edit_quality, format_quality_table

            template, names = resolve_prompts(cfg, splits, opts)
            scale = args.guidance_scale if args.guidance_scale is not None else cfg.aug.guidance_scale
            q = evaluate_edit_quality(tmp, splits, prompt=template, class_names=names, guidance_scale=scale,
                                      n_edits=args.gate_edits, seed=args.seed, show_progress=opts.show_progress)
            if "{name}" not in template:
                # A class-agnostic model cannot draw a class on request: its s=0.9 target rate is the "before
                # fine-tuning" baseline (about chance), not a pass/fail criterion; tools/finetune_sd.py --eval
                # measures what fine-tuning adds.
                q["passed"] = None
                q["note"] = "class-agnostic prompt: target rates are the before-fine-tuning baseline (about chance)"
            record["quality"] = q
            print(format_quality_table(q))
            if "note" in q:
                print(f"note: {q['note']}; no gate applied")
        record["total_wall_s"] = round(time.perf_counter() - t0, 1)
        write_build_info(tmp, record)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {record['total_wall_s']:.0f} s; params " +
          ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in record["params"].items()))
    if "quality" in record and record["quality"]["passed"] is False:
        print("warning: the quality gate failed (see build_info.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
