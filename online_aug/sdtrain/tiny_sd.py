"""A tiny Stable-Diffusion-architecture model trained from scratch on a data set's images (``tools/build_tiny_sd.py``).

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

Training sees only the part of the split it is given (``splits.train``; the builder passes the training split or
the generator pool, never a test image): prompts name the class with the template, and 10% of them are dropped to
the empty prompt so classifier-free guidance works. Classes are sampled uniformly (not by frequency) because the
generator's job is to draw tail classes on request. The denoising loss, noising and schedules are
:mod:`online_aug.sdtrain.sd_training`'s and :mod:`online_aug.schedules`', shared with fine-tuning.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from online_aug.config import Config
from online_aug.data import Splits, seen_record
from online_aug.generator.prompts import class_prompts, resolve_class_names
from online_aug.schedules import warmup_cosine
from online_aug.sdtrain.sd_training import class_uniform_weights, denoising_loss, sample_latents, training_scheduler

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16  # prompts here are ~7 tokens; a short context keeps cross-attention cheap
MIN_LR_RATIO = 0.1  # the cosine schedules of both training stages decay to this fraction of the peak rate


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
    class_names: list[str] = field(default_factory=list)  # empty: cfg.aug.class_names, then the dataset's
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
    # attention is cheaper per step but, at equal compute, left more s=0.25 edits drifting off the source.)
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


# ---------------------------------------------------------------- training


def train_vae(vae: torch.nn.Module, x: torch.Tensor, opts: BuildOptions, gen: torch.Generator) -> dict[str, float]:
    """Reconstruction (MSE) + a small per-element KL so latents stay smooth enough to diffuse."""
    opt = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0)
    vae.train()
    rec = kl = float("nan")
    bar = tqdm(range(opts.vae_steps), desc="vae", disable=not opts.show_progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = opts.vae_lr * warmup_cosine(step, 20, opts.vae_steps, MIN_LR_RATIO)
        idx = torch.randint(len(x), (opts.batch_size,), generator=gen)
        batch = x[idx]
        post = vae.encode(batch).latent_dist
        z = sample_latents(post.mean, post.std, gen)
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
    """The denoising loss for the UNet and text encoder together; returns EMA copies of both.

    ``prompt_ids`` holds one row per class plus a last row for the empty prompt. The C+1 prompts are encoded
    once per step and gathered per sample, so the text encoder costs little next to the UNet.
    """
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    noise_schedule = training_scheduler(parts["scheduler"].config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    # EMA weights are what gets saved: for a few thousand steps they give visibly cleaner samples.
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    weights = class_uniform_weights(labels, num_classes)
    warmup = min(100, opts.steps // 10 + 1)
    loss_avg = float("nan")
    bar = tqdm(range(opts.steps), desc="unet", disable=not opts.show_progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = opts.lr * warmup_cosine(step, warmup, opts.steps, MIN_LR_RATIO)
        idx = torch.multinomial(weights, opts.batch_size, replacement=True, generator=gen)
        z0 = sample_latents(z_mean[idx], z_std[idx], gen)
        cond = labels[idx].clone()
        drop = torch.rand(opts.batch_size, generator=gen) < opts.cfg_dropout
        cond[drop] = num_classes  # the empty-prompt row
        emb = text_encoder(prompt_ids)[0][cond]
        loss = denoising_loss(unet, noise_schedule, z0, emb, gen)
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


def resolve_prompts(cfg: Config, splits: Splits, opts: BuildOptions) -> tuple[str, list[str], list[str]]:
    """The template, the class names and the prompt of each class the model is trained on (and gated with)."""
    template = opts.prompt or cfg.aug.prompt
    names = resolve_class_names(opts.class_names or cfg.aug.class_names, splits.class_names)
    return template, names, class_prompts(template, names, key="--prompt" if opts.prompt else "aug.prompt")


def build_tiny_sd(cfg: Config, splits: Splits, out: str | Path, opts: BuildOptions) -> dict[str, Any]:
    """Train the tiny SD on ``splits.train`` and save a diffusers folder at ``out`` (created or overwritten).

    Returns the build record (without quality numbers); it is also written to ``out/build_info.json``.
    """
    from diffusers import StableDiffusionPipeline

    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)  # standalone program: initialisation draws from the global RNG
    gen = torch.Generator().manual_seed(opts.seed)
    template, names, prompts = resolve_prompts(cfg, splits, opts)
    tok = build_tokenizer(prompt_words(prompts + [template.replace("{name}", "")]))
    parts = make_components(len(tok), tok.bos_token_id, tok.eos_token_id, opts.resolution)

    x, y = splits.train.tensors(opts.resolution)
    x, labels = x * 2 - 1, torch.from_numpy(y).long()  # the VAE's range
    info: dict[str, Any] = {}
    info.update(train_vae(parts["vae"], x, opts, gen))
    with torch.no_grad():  # latents of the whole (small) split once: the UNet loop never runs the encoder
        post = parts["vae"].encode(x).latent_dist
        z_mean, z_std = post.mean, post.std
        scaling = float(1.0 / sample_latents(z_mean, z_std, gen).std())
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


def write_build_info(out: str | Path, record: dict[str, Any]) -> None:
    (Path(out) / "build_info.json").write_text(json.dumps(record, indent=2) + "\n")


