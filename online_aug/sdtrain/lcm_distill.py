"""Latent consistency distillation of the generator *as a run loads it* (``aug.model`` + ``aug.textual_inversion``
tokens + the ``aug.lora`` stack, prompts, negative prompt and guidance scale) into an LCM-LoRA: a PEFT LoRA on the
student UNet that ``aug.lora=[<teacher's LoRAs>..., <out>]`` stacks on the teacher's own LoRA, run with
``aug.scheduler=lcm aug.steps=1|2 aug.guidance_scale=1`` (one UNet pass per step, no classifier-free guidance).
``tools/distill_lcm.py`` is the command line.

The recipe is diffusers' ``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` (Luo et al., LCM
and LCM-LoRA, 2023):

- skipping-step DDIM solver over the teacher's timesteps (:class:`DDIMSolver`): ``num_ddim_timesteps`` (50) grid
  points ``t_n = (n + 1) * T / N - 1``; a sample starts at a random ``t_{n+k}`` and the teacher's one DDIM step goes
  to ``t_n = t_{n+k} - T / N`` (the grid ``LCMScheduler`` samples with its ``original_inference_steps`` = 50);
- guidance folded in: the teacher's step uses its CFG estimate with a scale ``w ~ U[w_min, w_max]`` per sample. As
  in the LoRA recipe there is **no w-embedding** (the student UNet has no ``time_cond_proj_dim``): the LoRA learns
  the average over the range, so the default range is the teacher's own ``aug.guidance_scale`` (``w_min = w_max``,
  the "fixed w" of LCM-LoRA). ``w`` here is the scale in the convention of ``aug.guidance_scale``
  (``uncond + w * (cond - uncond)``); the recipe's code writes ``cond + w * (cond - uncond)``, i.e. our ``w`` minus 1;
- consistency boundary conditions ``c_skip = s^2 / ((10 t)^2 + s^2)``, ``c_out = 10 t / ((10 t)^2 + s^2)^0.5``
  (``sigma_data`` s = 0.5, ``timestep_scaling`` 10: :func:`boundary_scalings`, what ``LCMScheduler`` and the
  online generator's LCM step apply);
- pseudo-Huber loss ``sqrt(d^2 + c^2) - c`` with ``c = 0.001`` (:func:`huber_loss`), AdamW (weight decay 1e-2),
  gradients clipped at norm 1, constant learning rate;
- the target is the student itself without gradient at ``t_n`` on the teacher's step (the LoRA recipe has no
  separate EMA target network); ``ema > 0`` keeps an EMA of the LoRA as the target, as the full-model recipe keeps
  an EMA UNet (and then the EMA weights are what is saved);
- the LoRA adapts the recipe's modules (:data:`LCM_LORA_TARGETS`: attention, projections, feed-forward, ResNet
  convolutions, up/down samplers, time embedding projections). The teacher is the same UNet with the adapter
  disabled (no second copy in memory).

Where this deviates, and why:

- **data**: the images the generator may see (``data="train"``: the classifier's training split; ``"pool"``: the
  generator pool), streamed per step from the stored originals at the generator's resolution with
  :mod:`online_aug.sdtrain.sd_training`'s sampler (class-uniform, every draw a function of (seed, step)), not a web
  data set; the prompt of an image is its class's prompt from the run's templates (one drawn per sample);
- **cross-class pairs**: the online generator edits an image of one class toward *another* class's prompt
  (Diff-Mix's inter-class SDEdit), so ``cross_class`` (0.5) of the pairs get another class's prompt; the teacher's
  probability-flow ODE is defined for any (latent, prompt) pair, so the targets stay exact;
- **prediction types**: the teacher's CFG estimate is converted to (x0, eps) for epsilon, v and sample prediction
  (the recipe feeds the raw output as the noise, right for epsilon only);
- **save format**: the LoRA is written in PEFT key format (``lora_A`` / ``lora_B``) with its adapter config as
  metadata, which ``load_lora_weights`` reads for every module type; the fine-tuning tool's converted format would
  be read for the attention projections only when other modules are present.

Outputs in ``out``: ``pytorch_lora_weights.safetensors``, ``manifest.json`` (the fine-tuned folder format of
:mod:`online_aug.generator.finetuned`: the base model's identity, so a LoRA for another base is refused; the teacher;
the ``aug.*`` settings to use it; and the leakage record: the union of the images the teacher's parts and this
distillation saw, so the run's leakage check refuses it exactly when it would refuse the teacher) and
``checkpoints/step-<n>.pt`` (``resume``: bit for bit the weights of an uninterrupted run on a CPU).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from online_aug.config import AugConfig, Config, ConfigError
from online_aug.data import Splits, seen_record
from online_aug.generator import SDEditGenerator
from online_aug.generator.finetuned import LORA_FILE, base_identity, write_manifest
from online_aug.generator.loading import load_sd
from online_aug.rng import step_rng
from online_aug.sdtrain.finetune import (
    CKPT_DIR,
    FinetuneError,
    checkpoints,
    load_resume_state,
    lora_state,
)
from online_aug.sdtrain.finetune import resolve_precision as _finetune_precision
from online_aug.sdtrain.sd_training import (
    StepBatchSampler,
    StreamedImages,
    class_uniform_weights,
    sample_latents,
    training_scheduler,
)

# train_lcm_distill_lora_sd_wds.py's LoraConfig target_modules
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
SIGMA_DATA = 0.5
DATA_PARTS = ("train", "pool")
PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass
class DistillOptions:
    """Everything that shapes the distilled weights (recorded in manifest.json)."""

    steps: int = 1000
    batch_size: int = 16  # the recipe's train_batch_size
    lr: float = 1e-4  # the recipe's learning_rate (constant)
    lora_rank: int = 64  # the recipe's; a tiny UNet needs far less (docs/lcm.md uses 8)
    num_ddim_timesteps: int = 50
    w_min: float | None = None  # None: the teacher's aug.guidance_scale
    w_max: float | None = None
    loss: str = "huber"  # huber | l2
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    ema: float = 0.0  # 0: the target is the student without gradient (the LoRA recipe); else an EMA target
    cross_class: float = 0.5  # share of pairs prompted with another class (the online generator's inter-class edits)
    data: str = "train"  # train | pool: the images the generator may see
    resolution: int = 0  # 0: the generator's native resolution
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU
    seed: int = 0
    ckpt_every: int = 0
    keep_ckpts: int = 2
    num_workers: int = 0
    show_progress: bool = True


def check_options(opts: DistillOptions, device: torch.device) -> None:
    """One-line errors for settings that cannot work, before any model is loaded."""
    if opts.steps < 1 or opts.batch_size < 1 or opts.lora_rank < 1 or opts.num_ddim_timesteps < 1:
        raise FinetuneError("--steps, --batch-size, --lora-rank and --num-ddim-timesteps must be >= 1")
    if opts.loss not in ("huber", "l2"):
        raise FinetuneError(f"--loss {opts.loss!r}: choose huber or l2")
    if opts.data not in DATA_PARTS:
        raise FinetuneError(f"--data {opts.data!r}: choose one of {', '.join(DATA_PARTS)}")
    if opts.mixed_precision not in PRECISIONS:
        raise FinetuneError(f"--mixed-precision {opts.mixed_precision!r}: choose one of {', '.join(PRECISIONS)}")
    if opts.mixed_precision in ("fp16", "bf16") and device.type != "cuda":
        raise FinetuneError(f"--mixed-precision {opts.mixed_precision} needs a CUDA device (this run is on "
                            f"{device.type}, which distils in fp32); use auto or no")
    if not 0 <= opts.ema < 1 or not 0 <= opts.cross_class <= 1:
        raise FinetuneError("--ema must be in [0, 1) and --cross-class in [0, 1]")
    if opts.w_min is not None and opts.w_max is not None and opts.w_min > opts.w_max:
        raise FinetuneError(f"--w-min {opts.w_min} > --w-max {opts.w_max}")
    if opts.ckpt_every < 0 or opts.resolution < 0 or opts.num_workers < 0 or opts.huber_c <= 0:
        raise FinetuneError("--ckpt-every, --resolution, --num-workers must be >= 0 and --huber-c > 0")


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the CUDA device has it, else fp16; fp32 (``no``) on a CPU."""
    return _finetune_precision(mixed_precision, device, cpu="no")


# ---------------------------------------------------------------- the recipe's math


def boundary_scalings(t: Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = 10.0
                      ) -> tuple[Tensor, Tensor]:
    """LCM's ``c_skip(t)``, ``c_out(t)`` (``LCMScheduler.get_scalings_for_boundary_condition_discrete``): the
    consistency function ``f(x, t) = c_skip x + c_out x0(x, t)`` is the identity at ``t = 0``."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def huber_loss(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """The recipe's pseudo-Huber loss, ``mean(sqrt((pred - target)^2 + c^2) - c)``."""
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


def x0_eps(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(predicted clean latent, predicted noise) from a UNet output at noise level (alpha, sigma) = (sqrt(a_t),
    sqrt(1 - a_t))."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    raise ConfigError(f"prediction_type {prediction_type!r} is not supported for distillation")


class DDIMSolver:
    """The recipe's skipping-step DDIM solver: ``N`` grid timesteps ``(n + 1) * T // N - 1`` and one eta-0 DDIM step
    from grid point ``n`` to ``t_n - T // N`` (``alphas_cumprod[0]`` below the first)."""

    def __init__(self, alphas_cumprod: Tensor, num_train_timesteps: int = 1000, ddim_timesteps: int = 50):
        ratio = num_train_timesteps // ddim_timesteps
        ac = alphas_cumprod.double().cpu()
        self.skip = ratio
        self.timesteps = (torch.arange(1, ddim_timesteps + 1) * ratio).long() - 1
        self.alpha_prev = torch.cat([ac[:1], ac[self.timesteps[:-1]]])

    def step(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        a_prev = self.alpha_prev[index.cpu()].to(x0.device, torch.float32).view(-1, *([1] * (x0.ndim - 1)))
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


# ---------------------------------------------------------------- setup


def teacher_aug(cfg: Config, dtype: str) -> AugConfig:
    """The run's generator settings, loaded in ``dtype`` (the teacher and, with the LoRA on top, the student)."""
    return replace(cfg.aug, dtype=dtype)


def add_lcm_lora(unet: torch.nn.Module, rank: int, seed: int) -> Any:
    """The recipe's LoRA (alpha = rank: scale 1, what diffusers assumes), initial weights a function of ``seed``."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LCM_LORA_TARGETS))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return config


def save_lcm_lora(folder: Path, unet: torch.nn.Module, config: Any) -> dict[str, Any]:
    """``folder/pytorch_lora_weights.safetensors`` in PEFT key format with the adapter config as metadata (what
    ``load_lora_weights`` reads for every module type; see the module docstring)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from peft.utils import get_peft_model_state_dict

    sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionImg2ImgPipeline.save_lora_weights(folder, unet_lora_layers=sd, weight_name=LORA_FILE,
                                                     unet_lora_adapter_metadata=config.to_dict())
    return {"file": LORA_FILE, "rank": config.r, "alpha": config.lora_alpha, "target_modules": list(LCM_LORA_TARGETS),
            "format": "peft"}


def teacher_records(aug: AugConfig) -> list[tuple[str, dict[str, Any]]]:
    """The leakage records (``data`` blocks with image indices) of the teacher's local parts: the SD folder's
    build_info.json, the tokens' and every LoRA's manifest.json."""
    out = []
    folders = [aug.model, aug.textual_inversion, *(e.path for e in aug.lora_stack())]
    for folder in dict.fromkeys(f for f in folders if f):
        for name in ("build_info.json", "manifest.json"):
            path = Path(folder).expanduser() / name
            if path.is_file():
                try:
                    record = json.loads(path.read_text()).get("data") or {}
                except (OSError, ValueError) as e:
                    raise ConfigError(f"{path} cannot be read as JSON ({e}); rebuild that generator part") from e
                if "indices" in record:
                    out.append((str(path), record))
    return out


def leakage_record(cfg: Config, part: Any, name: str, teacher: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What the distilled LoRA has seen: its own data plus everything its teacher saw (it learns the teacher's
    outputs), as one record :func:`online_aug.data.check_generator_data` reads."""
    own = seen_record(cfg.data, part, name)
    seen = set(own["indices"])
    for _, rec in teacher:
        seen |= {int(i) for i in rec["indices"]}
    return {**own, "part": f"{name} + teacher", "indices": sorted(seen), "num_seen": len(seen),
            "sources": [{"source": "distillation", "part": name, "num_images": own["num_images"]}]
            + [{"source": src, "part": rec.get("part"), "dataset": rec.get("dataset"),
                "num_images": len(rec["indices"])} for src, rec in teacher]}


def run_record(cfg: Config, model: str, identity: dict[str, Any], opts: DistillOptions) -> dict[str, Any]:
    """What must agree for ``--resume`` to continue a run (steps may grow)."""
    o = {k: v for k, v in asdict(opts).items() if k not in ("steps", "ckpt_every", "keep_ckpts", "num_workers",
                                                            "show_progress")}
    a = cfg.aug
    return {"base_model": model, "base": identity, "data": asdict(cfg.data), "options": o,
            "teacher": {"textual_inversion": a.textual_inversion, "lora": [asdict(e) for e in a.lora_stack()],
                        "prompt": a.prompt, "prompts": list(a.prompts), "prompt_file": a.prompt_file,
                        "negative_prompt": a.negative_prompt, "class_names": list(a.class_names)}}


def _save_checkpoint(out: Path, step: int, run: dict[str, Any], unet: torch.nn.Module, opt: torch.optim.Optimizer,
                     ema: list[Tensor] | None, loss_ema: float, scaler: torch.amp.GradScaler, keep: int) -> None:
    folder = out / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    state = {"step": step, "run": run, "lora": lora_state(unet), "opt": opt.state_dict(), "loss_ema": loss_ema,
             "ema": [e.detach().cpu().clone() for e in ema] if ema is not None else None,
             "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a truncated "last checkpoint"
    for old in checkpoints(out)[:-keep]:
        old.unlink()


# ---------------------------------------------------------------- one distillation step


def distill_loss(unet: torch.nn.Module, solver: DDIMSolver, alphas_cumprod: Tensor, prediction_type: str,
                 z0: Tensor, cond: Tensor, uncond: Tensor, index: Tensor, noise: Tensor, w: Tensor,
                 opts: DistillOptions, ema: tuple[list[Tensor], list[Tensor]] | None = None) -> Tensor:
    """The consistency-distillation loss of one batch (Algorithm 1 of LCM with the recipe's choices).

    ``index`` [B]: grid points of the start times; ``noise`` like ``z0``; ``w`` [B] guidance scales; ``cond`` [B, L,
    D] prompt embeddings, ``uncond`` [1, L, D]. The teacher is ``unet`` with its adapter disabled; the target is
    ``unet`` without gradient (or, with ``ema`` = (LoRA parameters, their EMA), the EMA weights swapped in).
    """
    dev = z0.device
    view = (-1, *([1] * (z0.ndim - 1)))
    start = solver.timesteps[index.cpu()]
    end = (start - solver.skip).clamp(min=0)
    ac = alphas_cumprod.double().cpu()

    def noise_level(t: Tensor) -> tuple[Tensor, Tensor]:
        a = ac[t]
        return a.sqrt().float().to(dev).view(view), (1 - a).sqrt().float().to(dev).view(view)

    (cs_s, co_s), (cs_e, co_e) = (boundary_scalings(t, SIGMA_DATA, opts.timestep_scaling) for t in (start, end))
    cs_s, co_s, cs_e, co_e = (c.to(dev).view(view) for c in (cs_s, co_s, cs_e, co_e))
    al_s, si_s = noise_level(start)
    al_e, si_e = noise_level(end)
    x_start = al_s * z0 + si_s * noise
    t_start, t_end = start.to(dev), end.to(dev)
    dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype  # the frozen weights' dtype

    out = unet(x_start.to(dtype), t_start, encoder_hidden_states=cond.to(dtype)).sample.float()
    x0, _ = x0_eps(out, x_start, al_s, si_s, prediction_type)
    model_pred = cs_s * x_start + co_s * x0

    with torch.no_grad():
        unet.disable_adapters()  # the teacher: the run's UNet, without the LoRA being learned
        try:
            both = unet(torch.cat([x_start, x_start]).to(dtype), torch.cat([t_start, t_start]),
                        encoder_hidden_states=torch.cat([uncond.expand(len(cond), -1, -1), cond]).to(dtype)
                        ).sample.float()
        finally:
            unet.enable_adapters()
        u, c = both.chunk(2)
        x0_u, eps_u = x0_eps(u, x_start, al_s, si_s, prediction_type)
        x0_c, eps_c = x0_eps(c, x_start, al_s, si_s, prediction_type)
        wv = w.to(dev).view(view)
        x_prev = solver.step(x0_u + wv * (x0_c - x0_u), eps_u + wv * (eps_c - eps_u), index)

        saved = None
        if ema is not None:
            params, shadow = ema
            saved = [p.detach().clone() for p in params]
            for p, s in zip(params, shadow):
                p.data.copy_(s)
        try:
            out_t = unet(x_prev.to(dtype), t_end, encoder_hidden_states=cond.to(dtype)).sample.float()
        finally:
            if saved is not None:
                for p, s in zip(ema[0], saved):
                    p.data.copy_(s)
        x0_t, _ = x0_eps(out_t, x_prev, al_e, si_e, prediction_type)
        target = cs_e * x_prev + co_e * x0_t
    if opts.loss == "l2":
        return torch.nn.functional.mse_loss(model_pred.float(), target.float())
    return huber_loss(model_pred, target, opts.huber_c)


# ---------------------------------------------------------------- training


def distill(cfg: Config, splits: Splits, out: str | Path, opts: DistillOptions, resume: bool = False,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Distil the run's generator (``cfg.aug``) into an LCM-LoRA in ``out``; returns the manifest."""
    t_start = time.perf_counter()
    out, device = Path(out), torch.device(device)
    precision = resolve_precision(opts.mixed_precision, device)
    opts = replace(opts, mixed_precision=precision)
    check_options(opts, device)
    part = splits.train if opts.data == "train" else splits.pool
    if part is None:
        raise ConfigError("--data pool: this split has no generator pool; set data.pool_fraction or use --data train")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    model = cfg.aug.model
    identity = base_identity(load_sd(model, torch.device("cpu"), torch.float32))  # the base, before tokens / LoRAs
    aug = teacher_aug(cfg, {"fp16": "fp16", "bf16": "bf16"}.get(precision, "fp32"))
    teacher = SDEditGenerator.from_config(aug, splits.class_names, device)  # model + tokens + LoRAs + prompts
    records = teacher_records(cfg.aug)
    w_min = cfg.aug.guidance_scale if opts.w_min is None else opts.w_min
    w_max = w_min if opts.w_max is None else opts.w_max
    opts = replace(opts, w_min=float(w_min), w_max=float(max(w_min, w_max)))
    run = run_record(cfg, model, identity, opts)

    unet = teacher.unet
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    lora_config = add_lcm_lora(unet, opts.lora_rank, opts.seed)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # fp32 master weights over a half-precision UNet
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    shadow = [p.detach().clone() for p in params] if opts.ema > 0 else None

    start, loss_ema = 0, float("nan")
    if resume:
        state = load_resume_state(out, run)
        start, loss_ema = int(state["step"]), float(state["loss_ema"])
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(unet, state["lora"])
        opt.load_state_dict(state["opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if shadow is not None and state.get("ema") is not None:
            shadow = [e.to(device) for e in state["ema"]]
        if start > opts.steps:
            raise FinetuneError(f"--resume: the checkpoint is at step {start}, beyond --steps {opts.steps}")

    res = opts.resolution or teacher.resolution
    labels = torch.from_numpy(np.asarray(part.labels)).long()
    C = len(teacher.class_prompts)
    sampler = StepBatchSampler(class_uniform_weights(labels, C), opts.batch_size, opts.seed, start, opts.steps,
                               "center", False)
    loader = torch.utils.data.DataLoader(StreamedImages(part, res), batch_sampler=sampler,
                                         num_workers=opts.num_workers, pin_memory=device.type == "cuda")
    noise_schedule = training_scheduler(teacher.components.scheduler.config)
    ac = noise_schedule.alphas_cumprod
    solver = DDIMSolver(ac, int(noise_schedule.config.num_train_timesteps), opts.num_ddim_timesteps)
    pred_type = noise_schedule.config.prediction_type
    vae, scaling = teacher.vae, teacher.vae.config.scaling_factor
    embeds, uncond = teacher.prompt_embeds, teacher.uncond_embeds  # [P*C, L, D] (row p*C + c), [1, L, D]
    P = teacher.num_templates

    unet.train()
    bar = tqdm(zip(range(start, opts.steps), loader), desc="distil", initial=start, total=opts.steps,
               disable=not opts.show_progress, dynamic_ncols=True)
    for step, (x, y) in bar:
        g = step_rng(opts.seed, 0, step)
        with torch.no_grad():
            post = vae.encode(x.to(device, vae.dtype)).latent_dist
            z0 = sample_latents(post.mean.float(), post.std.float(), g) * scaling
        B = len(y)
        index = torch.randint(0, opts.num_ddim_timesteps, (B,), generator=g)
        noise = torch.randn(z0.shape, generator=g).to(device)
        w = opts.w_min + (opts.w_max - opts.w_min) * torch.rand(B, generator=g)
        other = torch.rand(B, generator=g) < opts.cross_class
        shift = torch.randint(1, max(C, 2), (B,), generator=g)
        cls = torch.where(other, (y + shift) % C, y) if C > 1 else y
        tpl = torch.randint(0, P, (B,), generator=g)
        cond = embeds[(tpl * C + cls).to(embeds.device)]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = distill_loss(unet, solver, ac, pred_type, z0, cond, uncond, index, noise, w, opts,
                                (params, shadow) if shadow is not None else None)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        if shadow is not None:
            with torch.no_grad():
                for s, p in zip(shadow, params):
                    s.mul_(opts.ema).add_(p.detach(), alpha=1 - opts.ema)
        v = loss.item()
        if not math.isfinite(v):
            raise FinetuneError(f"the distillation loss is {v} at step {step}; lower --lr or use "
                                f"--mixed-precision no")
        loss_ema = v if step == start and loss_ema != loss_ema else 0.98 * loss_ema + 0.02 * v
        if step % 10 == 0 or step == opts.steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.5f}")
        if opts.ckpt_every and (step + 1) % opts.ckpt_every == 0 and step + 1 < opts.steps:
            _save_checkpoint(out, step + 1, run, unet, opt, shadow, loss_ema, scaler, opts.keep_ckpts)
    bar.close()
    unet.eval()
    _save_checkpoint(out, opts.steps, run, unet, opt, shadow, loss_ema, scaler, opts.keep_ckpts)
    if shadow is not None:  # the EMA target is the distilled model (the full-model recipe saves target_unet)
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.data.copy_(s)
    lora_info = save_lcm_lora(out, unet, lora_config)
    use_lora = [f"{e.path}:{e.weight:g}" for e in cfg.aug.lora_stack()] + [str(out)]
    manifest = {
        "kind": "lcm-lora",
        "base_model": model,
        "base": identity,
        "lora": lora_info,
        "teacher": {**run["teacher"], "model": model, "guidance_scale": cfg.aug.guidance_scale,
                    "steps": cfg.aug.steps, "scheduler": cfg.aug.scheduler},
        # how a run uses it: stacked on the teacher's own LoRAs (the LCM-LoRA learned the teacher's weights)
        "use": {"aug.textual_inversion": cfg.aug.textual_inversion, "aug.lora": use_lora, "aug.scheduler": "lcm",
                "aug.steps": 2, "aug.guidance_scale": 1.0, "aug.schedule": "fewstep"},
        "class_names": list(splits.class_names),
        "steps": opts.steps,
        "seed": opts.seed,
        "options": {k: v for k, v in asdict(opts).items() if k != "show_progress"},
        "data": leakage_record(cfg, part, opts.data, records),
        "final_loss_ema": loss_ema,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "resumed_from_step": start if resume else None,
        "resolution": res,
    }
    write_manifest(out, manifest)
    return manifest


# ---------------------------------------------------------------- evaluation


def student_aug(aug: AugConfig, out: str | Path, steps: int) -> AugConfig:
    """``aug`` with the LCM-LoRA stacked on its LoRAs, sampled by K = ``steps`` LCM steps without CFG."""
    stack = [f"{e.path}:{e.weight:g}" for e in aug.lora_stack()] + [str(out)]
    return replace(aug, lora=stack, scheduler="lcm", steps=steps, guidance_scale=1.0, schedule="fewstep")


def evaluate(cfg: Config, splits: Splits, out: str | Path, bank: list[Tensor], device: torch.device,
             ks: tuple[int, ...] = (1, 2, 4), judge: str = "train",
             judge_bank: list[Tensor] | None = None) -> dict[str, Any]:
    """The generator audit (:func:`online_aug.audit.audit_generator`: per-class target rate, spread, copy share)
    of the teacher at its own K / CFG and of the distilled generator at each K of ``ks`` (LCM, no CFG), on the same
    judge, sources and targets. ``bank``: training images per class (``augment.guard_bank``). ``judge``: the part
    of the split the judge is fit on, ``judge_bank`` its images per class (None: ``bank``, what a run's guard sees;
    the generator pool's: a judge fit on one training image of a class recognises few real ones, which makes a
    1-image class's target rate mostly the judge's, not the generator's)."""
    from online_aug.audit import audit_generator

    names, counts = splits.class_names, splits.train.class_counts()
    settings = {f"teacher K={cfg.aug.steps} {cfg.aug.scheduler} CFG {cfg.aug.guidance_scale:g}": cfg.aug}
    settings.update({f"LCM K={k}": student_aug(cfg.aug, out, k) for k in ks})
    res: dict[str, Any] = {}
    for label, aug in settings.items():
        c = copy.copy(cfg)
        c.aug = aug
        editor = SDEditGenerator.from_config(aug, names, device)
        with torch.inference_mode():
            a = audit_generator(c, editor, bank, names, counts, device, judge_bank=judge_bank)
        res[label] = a.to_dict()
    return {"settings": res, "edits_per_class": cfg.aug.audit_edits,
            "protocol": "online_aug.audit.audit_generator: edits toward each class from training images of the "
                        f"other classes at the policy's highest strength, judged by a judge fit on the {judge} "
                        f"split part", "judge": judge}


def format_eval(ev: dict[str, Any]) -> str:
    """Per class: target rate / spread / copy share of every setting, side by side; then the mean |delta| of the
    target rate against the teacher."""
    labels = list(ev["settings"])
    first = ev["settings"][labels[0]]["classes"]
    head = f"{'class':<10}" + "".join(f"{lab:>30}" for lab in labels)
    lines = [f"target rate / spread / copies, {ev['edits_per_class']} edits per class, the judge fit on the "
             f"{ev.get('judge', 'train')} split part", head]
    for i, c in enumerate(first):
        row = f"{c['name']:<10}"
        for lab in labels:
            v = ev["settings"][lab]["classes"][i]
            row += f"{v['target_rate']:>18.2f} /{v['spread']:>5.2f} /{v['copy_share']:>4.2f}"
        lines.append(row)
    teacher = np.array([c["target_rate"] for c in first])
    for lab in labels[1:]:
        rates = np.array([c["target_rate"] for c in ev["settings"][lab]["classes"]])
        d = rates - teacher
        lines.append(f"{lab}: mean target rate {rates.mean():.3f} (teacher {teacher.mean():.3f}); per-class |delta| "
                     f"mean {np.abs(d).mean():.3f}, max {np.abs(d).max():.3f}; classes within 0.05: "
                     f"{int((np.abs(d) <= 0.05).sum())}/{len(d)}")
    return "\n".join(lines)
