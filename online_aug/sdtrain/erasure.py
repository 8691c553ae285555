"""Model-centric leakage prevention (DA-Fusion §6.1, eq. 8): erase class concepts from a Stable Diffusion's UNet
before it augments a benchmark whose classes it already knew, so that a gain cannot come from leaked knowledge.

ESD (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023), as DA-Fusion writes it (eq. 8)::

    min_θ E ‖ ε_θ(x_t, t, c) − [ ε_θ*(x_t, t) − η (ε_θ*(x_t, t, c) − ε_θ*(x_t, t)) ] ‖²

θ* the frozen original UNet, c the prompt naming the concept, η the negative guidance: the fine-tuned model's
conditional prediction for c is pushed to the negatively guided one, "guiding generation in the opposite direction
of classifier-free guidance". As in ESD, ``x_t`` is the model's own DDIM sample of c (``sample_steps`` steps, CFG
``sample_guidance``) stopped at a random step k, and the loss is taken at that step's timestep (no data needed).
Which weights learn: ``esd-x`` the cross-attention (``attn2``: erases what the prompt says, the other prompts keep
their meaning), ``esd-u`` everything else but the time embedding (ESD's unconditional variant). ``lora_rank > 0``
trains a PEFT LoRA on those layers' attention projections instead of the weights themselves (``esd-u``: the
self-attention ``attn1``).

Written by ``tools/erase_concepts.py``: a full diffusers folder (``lora_rank = 0``, read by ``aug.model``) or a LoRA
folder in :mod:`online_aug.generator.finetuned`'s format (``aug.lora``, with the base model as ``aug.model``), each
with ``erasure.json``. :func:`measure_erasure` judges, per target class, how often edits toward it are recognised
as it (:func:`online_aug.sdtrain.edit_quality.per_target_rates`): an erased class should fall to about chance, the
others should stay. ESD is written out here because neither diffusers nor peft ships it; its pieces are theirs.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from online_aug.config import ConfigError
from online_aug.generator.finetuned import LORA_TARGETS, apply_lora, base_identity, save_lora, write_manifest
from online_aug.generator.loading import SDComponents, load_sd
from online_aug.generator.prompts import render_prompt
from online_aug.generator.sdedit import SDEditGenerator
from online_aug.rng import step_rng
from online_aug.sdtrain.edit_quality import per_target_rates

ESDMethod = Literal["esd-x", "esd-u"]
RECORD = "erasure.json"


@dataclass
class EraseOptions:
    """Everything that shapes the erased weights (recorded in erasure.json)."""

    concepts: list[str] = field(default_factory=list)  # class names to erase, as the prompts name them
    method: ESDMethod = "esd-x"
    steps: int = 300
    batch_size: int = 4  # concepts per step (ESD: 1), each with its own DDIM sample
    lr: float = 1e-3  # ESD uses 1e-5 on SD 1.4's full UNet; the tiny SD's layers are small
    eta: float = 1.0  # negative guidance (ESD's default)
    lora_rank: int = 0  # 0: fine-tune the weights (a diffusers folder); > 0: a LoRA folder
    template: str = "{name}"  # ESD prompts the bare concept; the online loop's template is often the better target
    sample_steps: int = 50  # DDIM steps of the x_t sampler (ESD: 50)
    sample_guidance: float = 3.0  # CFG of the x_t sampler (ESD: start_guidance 3)
    seed: int = 0
    allow_split: bool = False  # accept a name the tokenizer splits into several pieces
    # Not in ESD: concepts to keep, each step's x_t also fits eps_θ(x_t, t, keep) to the frozen eps_θ*(x_t, t, keep)
    # with this weight (the prompts share their template words, so erasing one digit moves the others too).
    preserve: list[str] = field(default_factory=list)
    preserve_weight: float = 1.0


def check_concepts(tokenizer: Any, concepts: list[str], allow_split: bool = False) -> None:
    """ConfigError for a concept the tokenizer does not know: an unknown token, or (unless ``allow_split``) a word
    that is not one token of its vocabulary (the model has no concept under that name to erase)."""
    if not concepts:
        raise ConfigError("erase_concepts: no concepts given; name the class names to erase (e.g. --concepts seven)")
    for name in concepts:
        for word in name.split() or [name]:
            pieces = tokenizer.tokenize(word)
            ids = tokenizer.convert_tokens_to_ids(pieces)
            if not pieces or tokenizer.unk_token_id in ids and tokenizer.unk_token not in word:
                raise ConfigError(f"erase_concepts: {name!r} is not known to the tokenizer (it encodes to "
                                  f"{pieces or 'nothing'}); erase a class name the model was trained with")
            if len(pieces) > 1 and not allow_split:
                raise ConfigError(f"erase_concepts: {name!r} is not a word of the tokenizer's vocabulary (it splits "
                                  f"into {' '.join(pieces)}), so the model has no concept under that name; erase a "
                                  f"class name it knows, or pass --allow-split to erase the split form anyway")


def trainable_names(unet: torch.nn.Module, method: ESDMethod) -> list[str]:
    """The UNet parameters ESD fine-tunes: ``esd-x`` the cross-attention (attn2), ``esd-u`` all but attn2 and the
    time embedding (ESD's "xattn" / "noxattn" selections, in diffusers' parameter names)."""
    names = [n for n, _ in unet.named_parameters()]
    if method == "esd-x":
        return [n for n in names if ".attn2." in n]
    return [n for n in names if ".attn2." not in n and not n.startswith("time_embedding")]


def _add_lora(unet: torch.nn.Module, method: ESDMethod, rank: int, seed: int) -> Any:
    from peft import LoraConfig

    attn = "attn2" if method == "esd-x" else "attn1"
    targets = "|".join(t.replace(".", r"\.") for t in LORA_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=rf".*\.{attn}\.({targets})")
    with torch.random.fork_rng():  # PEFT draws from the global RNG; keep the result a function of seed
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return config


def _eps(unet: torch.nn.Module, z: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    return unet(z, t.expand(len(z)), encoder_hidden_states=emb, return_dict=False)[0].float()


def esd_target(frozen: torch.nn.Module, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, eta: float) -> Tensor:
    """eq. 8's target: ε*(x_t, t) − η (ε*(x_t, t, c) − ε*(x_t, t)), from the frozen original UNet."""
    with torch.no_grad():
        e0 = _eps(frozen, z, t, uncond.expand(len(z), -1, -1))
        ep = _eps(frozen, z, t, cond)
    return e0 - eta * (ep - e0)


def erase(components: SDComponents, opts: EraseOptions, show_progress: bool = False) -> dict[str, Any]:
    """ESD on ``components.unet`` in place (trainable weights or a LoRA); returns losses and settings.

    The draws of each step (concepts, the stop step k, the sampler's start noise) come from
    :func:`online_aug.rng.step_rng` of (seed, step): the result does not depend on the device or the thread count.
    """
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    check_concepts(components.tokenizer, opts.concepts, opts.allow_split)
    if opts.preserve:
        check_concepts(components.tokenizer, opts.preserve, opts.allow_split)
        if set(opts.preserve) & set(opts.concepts):
            raise ConfigError(f"erase_concepts: {sorted(set(opts.preserve) & set(opts.concepts))} are both erased "
                              f"and preserved; drop them from --preserve")
    unet = components.unet
    device = next(unet.parameters()).device
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()  # θ*
    unet.requires_grad_(False)
    lora_config = None
    if opts.lora_rank > 0:
        lora_config = _add_lora(unet, opts.method, opts.lora_rank, opts.seed)
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        wanted = set(trainable_names(unet, opts.method))
        params = [p for n, p in unet.named_parameters() if n in wanted]
        for p in params:
            p.requires_grad_(True)
    prompts = [render_prompt(opts.template, c, None) for c in opts.concepts]
    # the prompt cache of the online generator: the same tokenisation and encoder call as the augmentation uses
    keep = [render_prompt(opts.template, c, None) for c in opts.preserve]
    enc = SDEditGenerator(components, prompts + keep, guidance_scale=opts.sample_guidance, device=device)
    cond_all, uncond = enc.prompt_embeds[:len(prompts)].float(), enc.uncond_embeds.float()
    keep_all = enc.prompt_embeds[len(prompts):].float()
    sampler = DDIMScheduler.from_config(components.scheduler.config)
    sampler.set_timesteps(opts.sample_steps, device=device)
    h = int(unet.config.sample_size)
    c_lat = int(components.vae.config.latent_channels)
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    for step in tqdm(range(opts.steps), desc="erase", disable=not show_progress, dynamic_ncols=True):
        g = step_rng(opts.seed, 0, step)
        which = torch.randint(len(prompts), (opts.batch_size,), generator=g)
        k = int(torch.randint(opts.sample_steps, (1,), generator=g))
        z = torch.randn(opts.batch_size, c_lat, h, h, generator=g).to(device)
        cond = cond_all[which.to(device)]
        with torch.no_grad():  # x_t: the current model's own sample of the concept, stopped at step k (ESD)
            for t in sampler.timesteps[:k]:
                e = _eps(unet, torch.cat([z, z]), t, torch.cat([uncond.expand(len(z), -1, -1), cond]))
                eu, ec = e.chunk(2)
                z = sampler.step(eu + opts.sample_guidance * (ec - eu), t, z).prev_sample
        t = sampler.timesteps[k]
        target = esd_target(frozen, z, t, cond, uncond, opts.eta)
        loss = F.mse_loss(_eps(unet, z, t, cond), target)
        if len(keep_all):
            kc = keep_all[torch.randint(len(keep_all), (opts.batch_size,), generator=g).to(device)]
            with torch.no_grad():
                kept = _eps(frozen, z, t, kc)
            loss = loss + opts.preserve_weight * F.mse_loss(_eps(unet, z, t, kc), kept)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    unet.requires_grad_(False)
    n = max(1, min(20, len(losses) // 5))
    return {"options": asdict(opts), "prompts": prompts, "trainable_params": sum(p.numel() for p in params),
            "loss_first": float(np.mean(losses[:n])), "loss_last": float(np.mean(losses[-n:])), "losses": losses,
            "wall_s": round(time.perf_counter() - t0, 1), "lora_config": lora_config}


def save_erased(components: SDComponents, model: str, out: str | Path, record: dict[str, Any],
                identity: dict[str, Any]) -> Path:
    """Write ``out``: a diffusers folder (weights fine-tuned; ``aug.model=out``) or a LoRA folder with a manifest
    (``aug.lora=out`` over ``aug.model=<model>``), plus ``erasure.json``. ``identity``: the base model's
    :func:`~online_aug.generator.finetuned.base_identity`, taken before erasing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora_config = record.pop("lora_config", None)
    if lora_config is not None:
        entry = save_lora(out, components.unet, lora_config)
        write_manifest(out, {"kind": "erasure", "base_model": model, "base": identity, "lora": entry,
                             "erased": record["options"]["concepts"]})
    else:
        components.unet.save_pretrained(out / "unet")
        components.vae.save_pretrained(out / "vae")
        components.text_encoder.save_pretrained(out / "text_encoder")
        components.tokenizer.save_pretrained(out / "tokenizer")
        components.scheduler.save_pretrained(out / "scheduler")
        src = Path(model)
        for name in ("model_index.json", "build_info.json"):  # build_info's data record keeps the leakage check
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
    (out / RECORD).write_text(json.dumps({"base_model": model, **record}, indent=2, default=str) + "\n")
    return out


def load_erased(model: str, erased: str | Path, device: torch.device | str = "cpu") -> SDComponents:
    """The erased generator as the online loop loads it: ``aug.model=erased``, or ``aug.model=model`` +
    ``aug.lora=erased`` when ``erased`` holds a LoRA."""
    erased = Path(erased)
    if (erased / "unet").is_dir():
        return load_sd(str(erased), torch.device(device), torch.float32)
    comps = load_sd(model, torch.device(device), torch.float32)
    apply_lora(comps.unet, erased)
    return comps


def measure_erasure(base: SDComponents, erased: SDComponents, prompts: list[str], names: list[str],
                    erased_names: list[str], images: Tensor, labels: np.ndarray, *, per_class: int = 50,
                    strength: float = 0.9, guidance_scale: float = 4.0, seed: int = 0) -> dict[str, Any]:
    """Per target class, the share of s=``strength`` edits toward it that the pixel classifier judges as it, for the
    base and the erased model on the same edits; summarised as the erased classes' mean against chance (1/C) and
    the other classes' mean."""
    res = int(base.unet.config.sample_size) * base.vae_scale_factor
    # the judge is fit per call; the fit is deterministic, so both models face the same classifier
    kw = dict(per_class=per_class, strength=strength, guidance_scale=guidance_scale, seed=seed)
    rates = {tag: per_target_rates(comps, prompts, images, labels, **kw)["target_rate"]
             for tag, comps in (("base", base), ("erased", erased))}
    gone = [names.index(n) for n in erased_names]
    kept = [c for c in range(len(names)) if c not in gone]

    def mean(tag: str, cs: list[int]) -> float:
        return float(np.mean([rates[tag][c] for c in cs]))

    return {
        "per_class": {names[c]: {"base": rates["base"][c], "erased": rates["erased"][c]} for c in range(len(names))},
        "erased_classes": erased_names, "chance": 1 / len(names),
        "erased_target_rate": {"base": mean("base", gone), "erased": mean("erased", gone)},
        "other_target_rate": {"base": mean("base", kept), "erased": mean("erased", kept)},
        "edits": f"{per_class} per target class, sources of other classes, few-step K=4 DDIM, s={strength}, "
                 f"CFG {guidance_scale}", "seed": seed,
        # the judge's label as the committed reports/erasure/ records spell it (the module moved, the judge did not)
        "judge": f"LogisticRegression(class_weight=balanced) on {res}x{res} grayscale pixels (online_aug.edit_quality)",
    }


def erase_model(model: str, out: str | Path, opts: EraseOptions, device: torch.device | str = "cpu",
                show_progress: bool = False) -> dict[str, Any]:
    """Load ``model`` (fp32), check the concepts against its tokenizer before any training, erase, save to ``out``;
    returns the record written to ``out/erasure.json``."""
    comps = load_sd(model, torch.device(device), torch.float32)
    check_concepts(comps.tokenizer, opts.concepts, opts.allow_split)
    identity = base_identity(comps)  # before the weights change: what a LoRA folder's manifest names as its base
    record = erase(comps, opts, show_progress=show_progress)
    save_erased(comps, model, out, record, identity)
    return record
