"""Timing, measured side by side on one machine: one harness, one diffusers baseline, one training benchmark.

- :func:`time_calls`: images/s of a per-batch callable after one warm-up call (which also captures a CUDA graph),
  and optionally the UNet evaluations per image (:class:`UNetCounter`).
- :func:`img2img_baseline`: diffusers' ``StableDiffusionImg2ImgPipeline`` at the papers' setting (25 steps), called
  once per strength group with per-sample prompt embeddings: the best a peer can do with the stock pipeline.
- :func:`bench_generation`: our few-step loop (and its grid mode at equal steps) against that baseline, and the
  distilled generator's rows: K = 1, 2 LCM steps without classifier-free guidance (``lcm_ks``).
- :func:`bench_training`: training images/s plain, online through the prefetch queue and online inside the step,
  and online through the prefetch queue with the distilled generator (``lcm_ks``).

The distilled rows stack ``lcm_lora`` (an LCM-LoRA of ``tools/distill_lcm.py``) on the run's LoRAs; without one they
run the LCM sampler on the teacher's weights: a merged LoRA leaves the UNet's size and so its timing unchanged, only
the edits' quality needs the distilled weights.

Used by ``tools/bench.py`` and ``tools/gpu_check.py``; they print ratios and never assert timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

STRENGTHS = (0.5, 0.7, 0.9)  # the papers' s: each image draws one
BASELINE_STEPS = 25  # the papers' N


class UNetCounter:
    """Counts UNet evaluations per image: each forward adds its batch size (CFG doubles it, as it costs)."""

    def __init__(self, unet: torch.nn.Module):
        self.n = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.n += int(args[0].shape[0] if args else kwargs["sample"].shape[0])

    def remove(self) -> None:
        self.handle.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # benchmark boundary only


def time_calls(fn: Callable[[int], Any], batch: int, repeats: int, device: torch.device,
               unet: torch.nn.Module | None = None) -> tuple[float, float | None]:
    """``(images/s, UNet evaluations per image)`` of ``fn(seed)``, one batch of ``batch`` images per call, over
    ``repeats`` calls after one warm-up call; the UNet count is None without ``unet``."""
    fn(0)
    counter = UNetCounter(unet) if unet is not None else None
    sync(device)
    t0 = time.perf_counter()
    for r in range(repeats):
        fn(r + 1)
    sync(device)
    dt = time.perf_counter() - t0
    if counter is not None:
        counter.remove()
    return repeats * batch / dt, (counter.n / (repeats * batch) if counter is not None else None)


def strength_batch(batch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample strengths drawn from :data:`STRENGTHS` and target classes, the same on every call."""
    g = torch.Generator().manual_seed(0)
    strengths = torch.tensor(STRENGTHS)[torch.randint(len(STRENGTHS), (batch,), generator=g)]
    return strengths, torch.randint(num_classes, (batch,), generator=g)


def img2img_baseline(comps, ref, images: torch.Tensor, strengths: torch.Tensor, targets: torch.Tensor,
                     guidance_scale: float, steps: int = BASELINE_STEPS) -> Callable[[int], None]:
    """``fn(seed)`` editing ``images`` with diffusers' img2img pipeline on the same model (``comps``, DDIM), the
    prompt embeddings of ``ref`` (an SDEditGenerator on it), one pipeline call per strength group: its best case."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                          unet=comps.unet, scheduler=DDIMScheduler.from_config(comps.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    device = images.device
    if images.shape[-1] != ref.resolution:
        images = torch.nn.functional.interpolate(images, size=(ref.resolution, ref.resolution), mode="bilinear",
                                                 antialias=True)

    def once(seed: int) -> None:
        for s in STRENGTHS:
            sel = strengths == s
            if not sel.any():
                continue
            emb = ref.prompt_embeds[targets[sel].to(device)]
            pipe(image=images[sel.to(device)], prompt_embeds=emb,
                 negative_prompt_embeds=ref.uncond_embeds.expand(len(emb), -1, -1), strength=s,
                 num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                 generator=torch.Generator(device).manual_seed(seed))

    return once


def lcm_overrides(cfg, k: int, lcm_lora: str = "") -> list[str]:
    """Config overrides that turn the run's generator into the distilled one at K = ``k`` LCM steps, no CFG."""
    import json

    out = ["aug.scheduler=lcm", f"aug.steps={k}", "aug.guidance_scale=1.0", "aug.schedule=fewstep"]
    if lcm_lora:
        stack = [f"{e.path}:{e.weight:g}" for e in cfg.aug.lora_stack()] + [lcm_lora]
        out.append(f"aug.lora={json.dumps(stack)}")
    return out


def bench_generation(model: str, batch: int, device: torch.device, repeats: int, cfg, lcm_ks: tuple[int, ...] = (),
                     lcm_lora: str = "") -> dict:
    """UNet evaluations per edited image and edited images/s: our few-step loop (K = ``aug.steps``, per-sample
    strength and target in one batch) and its grid mode at 25 steps, against :func:`img2img_baseline`. Same model,
    batch and guidance. ``lcm_ks``: also the distilled generator at each K (LCM, no CFG; ``lcm_lora`` merged)."""
    from ..data import build_splits
    from ..devices import resolve_dtype
    from ..generator import SDEditGenerator, class_prompts, load_sd, resolve_class_names

    dtype = resolve_dtype("auto", device)
    comps = load_sd(model, device, dtype)
    # diffusers' SD 1.x img2img runs the VAE in the UNet's dtype (no force_upcast there); both sides do here
    comps.vae.to(dtype)
    splits = build_splits(cfg.data)
    names = resolve_class_names(cfg.aug.class_names, splits.class_names)
    prompts = class_prompts(cfg.aug.prompt, names)
    images = splits.train.tensors(cfg.data.image_size)[0][:batch].to(device)
    strengths, targets = strength_batch(batch, len(names))
    gs = cfg.aug.guidance_scale

    def ours(schedule: str, steps: int) -> tuple[float, float]:
        gen = SDEditGenerator(comps, prompts, guidance_scale=gs, schedule=schedule, steps=steps, grid_steps=steps,
                              scheduler="ddim", device=device, dtype=dtype)
        ips, evals = time_calls(
            lambda seed: gen.edit(images, strengths, targets, torch.Generator(device).manual_seed(seed)),
            batch, repeats, device, comps.unet)
        return evals, ips

    ref = SDEditGenerator(comps, prompts, guidance_scale=gs, device=device, dtype=dtype)
    d_ips, d_evals = time_calls(img2img_baseline(comps, ref, images, strengths, targets, gs), batch, repeats, device,
                                comps.unet)
    f_evals, f_ips = ours("fewstep", cfg.aug.steps)
    g_evals, g_ips = ours("grid", BASELINE_STEPS)
    out = {
        f"diffusers_img2img_{BASELINE_STEPS}": {"unet_evals_per_image": d_evals, "images_per_s": d_ips},
        f"ours_fewstep_K{cfg.aug.steps}": {"unet_evals_per_image": f_evals, "images_per_s": f_ips},
        f"ours_grid_{BASELINE_STEPS}": {"unet_evals_per_image": g_evals, "images_per_s": g_ips},
        "ratio_fewstep_vs_diffusers": {"unet_evals": d_evals / f_evals, "images_per_s": f_ips / d_ips},
        "ratio_grid_vs_diffusers": {"unet_evals": d_evals / g_evals, "images_per_s": g_ips / d_ips},
    }
    if lcm_ks:
        lcm = comps
        if lcm_lora:  # the distilled generator: the run's LoRAs with the LCM-LoRA on top, merged
            from ..config import LoraEntry
            from ..generator.finetuned import apply_lora_stack

            lcm = load_sd(model, device, dtype)
            lcm.vae.to(dtype)
            apply_lora_stack(lcm.unet, [*cfg.aug.lora_stack(), LoraEntry(lcm_lora, 1.0, "--lcm-lora")])
        for k in lcm_ks:
            gen = SDEditGenerator(lcm, prompts, guidance_scale=1.0, schedule="fewstep", steps=k, scheduler="lcm",
                                  device=device, dtype=dtype)
            ips, evals = time_calls(
                lambda seed, gen=gen: gen.edit(images, strengths, targets, torch.Generator(device).manual_seed(seed)),
                batch, repeats, device, lcm.unet)
            out[f"ours_lcm_K{k}"] = {"unet_evals_per_image": evals, "images_per_s": ips}
            out[f"ratio_lcm_K{k}_vs_diffusers"] = {"unet_evals": d_evals / evals, "images_per_s": ips / d_ips}
    return out


def time_training(config: str, overrides: list[str], name: str, extra: list[str], steps: int,
                  device: torch.device) -> dict:
    """images/s, stall fraction and edits generated per micro-step of ``steps`` training steps after 5 warm-up
    steps (which also let the queue fill, as it would in a long run)."""
    from ..config import load_config
    from ..trainer import Trainer

    # run.out_dir first so that an override can move it; the rest is what makes the variants comparable: the
    # generator edits as configured (the guard could send edits toward fewer classes, or none for a random-weight
    # SD) and its audit, minutes on a CPU, is not part of a training step
    cfg = load_config(config, ["run.out_dir=/tmp/online_aug_bench", *overrides, *extra, f"run.name=bench-{name}",
                               f"train.steps={steps + 5}", "aug.image_every=0", "aug.guard=off", "aug.audit=false"])
    tr = Trainer(cfg, show_progress=False)
    try:
        for _ in range(5):
            tr.train_step(next(tr.source))
        sync(device)
        stall = fresh = 0.0
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps * tr.accum):
            b = next(tr.source)
            stall += b.stats.get("aug/stall_ms", 0.0)
            fresh += b.stats.get("aug/fresh_edits", 0.0)
            tr.train_step(b)
            n += len(b.labels)
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        tr.source.close()
        tr.monitor.close()
    return {"images_per_s": n / dt, "stall_fraction": stall / 1000 / dt,
            "generated_per_step": fresh / (steps * tr.accum)}


def bench_training(config: str, overrides: list[str], steps: int, device: torch.device, rounds: int = 2,
                   reuse: int = 1, lcm_ks: tuple[int, ...] = (), lcm_lora: str = "") -> dict:
    """Each variant ``rounds`` times, interleaved (plain, prefetch, sync, plain, ...), best round kept.

    Interleaving and keeping the best (timeit's rule) stop a one-off disturbance, or whatever ran just before the
    first variant, from deciding a ratio: a single pass once measured plain training slower than augmented.
    """
    variants = {
        "plain": ["aug.alpha=0"],
        "online_prefetch": ["aug.prefetch=true"],
        "online_sync": ["aug.prefetch=false"],
    }
    if reuse > 1:  # aug.reuse: each edit used in `reuse` steps, about 1/reuse of the generator work
        variants[f"online_prefetch_reuse{reuse}"] = ["aug.prefetch=true", f"aug.reuse={reuse}"]
    if lcm_ks:  # the distilled generator (K LCM steps, no CFG) through the prefetch queue
        from ..config import load_config

        cfg = load_config(config, overrides)
        for k in lcm_ks:
            variants[f"online_prefetch_lcm_K{k}"] = ["aug.prefetch=true", *lcm_overrides(cfg, k, lcm_lora)]
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, extra in variants.items():
            runs[name].append(time_training(config, overrides, name, extra, steps, device))
    out: dict = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["images_per_s"])
        out[name] = {**best, "rounds_images_per_s": [round(r["images_per_s"], 2) for r in rs]}
    out["ratio_prefetch_vs_sync"] = out["online_prefetch"]["images_per_s"] / out["online_sync"]["images_per_s"]
    out["ratio_prefetch_vs_plain"] = out["online_prefetch"]["images_per_s"] / out["plain"]["images_per_s"]
    for k in lcm_ks:
        out[f"ratio_prefetch_lcm_K{k}_vs_plain"] = (out[f"online_prefetch_lcm_K{k}"]["images_per_s"]
                                                    / out["plain"]["images_per_s"])
    if reuse > 1:
        r = out[f"online_prefetch_reuse{reuse}"]
        out["ratio_reuse_generated"] = r["generated_per_step"] / max(out["online_prefetch"]["generated_per_step"], 1e-9)
    return out
