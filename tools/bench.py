"""Benchmarks, measured side by side in one run on one machine; prints ratios, never asserts timings.

(a)  UNet evaluations per edited image and edited images/s: our few-step loop (K steps, per-sample strength and
     target in one batch) against diffusers' StableDiffusionImg2ImgPipeline at the papers' setting (N=25 steps,
     s in {0.5, 0.7, 0.9}), called once per strength group with per-sample prompt embeddings: the best a peer can do
     with the stock pipeline. Same model, same batch, same guidance.
(a') The same comparison with our loop in grid mode at equal steps (what the loop itself costs).
(b)  Training images/s: plain training, online augmentation through the prefetch queue, and online augmentation
     done synchronously inside the step; their ratios, and the trainer's stall fraction. With --reuse K also the
     prefetch queue with aug.reuse=K; every variant reports its generator demand (edits generated per micro-step).

    python tools/bench.py [--batch 32] [--steps 30] [--rounds 2] [--reuse K] [--out bench.json] [overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from online_aug.config import load_config
from online_aug.data import build_splits
from online_aug.devices import pick_device, resolve_dtype
from online_aug.generator import SDEditGenerator, class_prompts, load_sd, resolve_class_names

ROOT = Path(__file__).resolve().parents[1]


class UNetCounter:
    """Counts UNet evaluations per image: each forward adds its batch size (CFG doubles it, as it costs)."""

    def __init__(self, unet: torch.nn.Module):
        self.n = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.n += int(args[0].shape[0] if args else kwargs["sample"].shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # benchmark boundary only


def bench_generation(model: str, batch: int, device: torch.device, repeats: int, cfg) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    dtype = resolve_dtype("auto", device)
    comps = load_sd(model, device, dtype)
    # diffusers' SD 1.x img2img runs the VAE in the UNet's dtype (no force_upcast there); both sides do here
    comps.vae.to(dtype)
    splits = build_splits(cfg.data)
    names = resolve_class_names(cfg.aug.class_names, splits.class_names)
    prompts = class_prompts(cfg.aug.prompt, names)
    images = splits.train.tensors(cfg.data.image_size)[0][:batch].to(device)
    g = torch.Generator().manual_seed(0)
    strengths = torch.tensor([0.5, 0.7, 0.9])[torch.randint(3, (batch,), generator=g)]
    targets = torch.randint(len(names), (batch,), generator=g)
    gs = cfg.aug.guidance_scale
    res = {}

    def run_ours(schedule: str, steps: int) -> tuple[float, float]:
        gen = SDEditGenerator(comps, prompts, guidance_scale=gs, schedule=schedule, steps=steps, grid_steps=steps,
                              scheduler="ddim", device=device, dtype=dtype)
        gen.edit(images, strengths, targets, torch.Generator(device).manual_seed(1))  # warm-up
        counter = UNetCounter(comps.unet)
        _sync(device)
        t0 = time.perf_counter()
        for r in range(repeats):
            gen.edit(images, strengths, targets, torch.Generator(device).manual_seed(r))
        _sync(device)
        dt = time.perf_counter() - t0
        counter.handle.remove()
        return counter.n / (repeats * batch), repeats * batch / dt

    pipe = StableDiffusionImg2ImgPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                          unet=comps.unet, scheduler=DDIMScheduler.from_config(comps.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen_for_embeds = SDEditGenerator(comps, prompts, guidance_scale=gs, device=device, dtype=dtype)
    res_px = gen_for_embeds.resolution

    def run_diffusers() -> tuple[float, float]:
        x = torch.nn.functional.interpolate(images, size=(res_px, res_px), mode="bilinear", antialias=True)
        def once(seed: int) -> None:
            for s in (0.5, 0.7, 0.9):  # one pipeline call per strength group: its best case
                sel = strengths == s
                if not sel.any():
                    continue
                emb = gen_for_embeds.prompt_embeds[targets[sel].to(device)]
                neg = gen_for_embeds.uncond_embeds.expand(len(emb), -1, -1)
                pipe(image=x[sel.to(device)], prompt_embeds=emb, negative_prompt_embeds=neg, strength=s,
                     num_inference_steps=25, guidance_scale=gs, output_type="pt",
                     generator=torch.Generator(device).manual_seed(seed))
        once(0)
        counter = UNetCounter(comps.unet)
        _sync(device)
        t0 = time.perf_counter()
        for r in range(repeats):
            once(r)
        _sync(device)
        dt = time.perf_counter() - t0
        counter.handle.remove()
        return counter.n / (repeats * batch), repeats * batch / dt

    d_evals, d_ips = run_diffusers()
    f_evals, f_ips = run_ours("fewstep", cfg.aug.steps)
    g_evals, g_ips = run_ours("grid", 25)
    res["diffusers_img2img_25"] = {"unet_evals_per_image": d_evals, "images_per_s": d_ips}
    res[f"ours_fewstep_K{cfg.aug.steps}"] = {"unet_evals_per_image": f_evals, "images_per_s": f_ips}
    res["ours_grid_25"] = {"unet_evals_per_image": g_evals, "images_per_s": g_ips}
    res["ratio_fewstep_vs_diffusers"] = {"unet_evals": d_evals / f_evals, "images_per_s": f_ips / d_ips}
    res["ratio_grid_vs_diffusers"] = {"unet_evals": d_evals / g_evals, "images_per_s": g_ips / d_ips}
    return res


def _time_training(config: str, overrides: list[str], name: str, extra: list[str], steps: int,
                   device: torch.device) -> dict:
    from online_aug.trainer import Trainer

    # run.out_dir first so that an override can move it; the rest is what makes the variants comparable
    cfg = load_config(config, ["run.out_dir=/tmp/online_aug_bench", *overrides, *extra, f"run.name=bench-{name}",
                               f"train.steps={steps + 5}", "aug.image_every=0"])
    tr = Trainer(cfg, show_progress=False)
    try:
        for _ in range(5):  # warm-up (and lets the queue fill, as it would in a long run)
            tr.train_step(next(tr.source))
        _sync(device)
        stall = fresh = 0.0
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps * tr.accum):
            b = next(tr.source)
            stall += b.stats.get("aug/stall_ms", 0.0)
            fresh += b.stats.get("aug/fresh_edits", 0.0)
            tr.train_step(b)
            n += len(b.labels)
        _sync(device)
        dt = time.perf_counter() - t0
    finally:
        tr.source.close()
        tr.monitor.close()
    return {"images_per_s": n / dt, "stall_fraction": stall / 1000 / dt,
            "generated_per_step": fresh / (steps * tr.accum)}


def bench_training(config: str, overrides: list[str], steps: int, device: torch.device, rounds: int = 2,
                   reuse: int = 1) -> dict:
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
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, extra in variants.items():
            runs[name].append(_time_training(config, overrides, name, extra, steps, device))
    out: dict = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["images_per_s"])
        out[name] = {**best, "rounds_images_per_s": [round(r["images_per_s"], 2) for r in rs]}
    out["ratio_prefetch_vs_sync"] = out["online_prefetch"]["images_per_s"] / out["online_sync"]["images_per_s"]
    out["ratio_prefetch_vs_plain"] = out["online_prefetch"]["images_per_s"] / out["plain"]["images_per_s"]
    if reuse > 1:
        r = out[f"online_prefetch_reuse{reuse}"]
        out["ratio_reuse_generated"] = r["generated_per_step"] / max(out["online_prefetch"]["generated_per_step"], 1e-9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    p.add_argument("--batch", type=int, default=32, help="edited images per generation batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the training variants (best kept)")
    p.add_argument("--reuse", type=int, default=1, help="also time the prefetch queue with aug.reuse=K (K > 1)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(a.config, a.overrides)
    device = pick_device(cfg.run.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  "
          f"torch threads: {torch.get_num_threads()}  model: {cfg.aug.model}")
    results: dict = {"device": str(device)}
    if not a.skip_generation:
        gen = bench_generation(cfg.aug.model, a.batch, device, a.repeats, cfg)
        results["generation"] = gen
        print(f"\n(a) generation, batch {a.batch}, s ~ U{{0.5, 0.7, 0.9}}, guidance {cfg.aug.guidance_scale}")
        print(f"{'':28}{'UNet evals/image':>18}{'images/s':>12}")
        for k in ("diffusers_img2img_25", f"ours_fewstep_K{cfg.aug.steps}", "ours_grid_25"):
            print(f"{k:28}{gen[k]['unet_evals_per_image']:>18.2f}{gen[k]['images_per_s']:>12.1f}")
        r = gen["ratio_fewstep_vs_diffusers"]
        print(f"few-step vs diffusers: {r['unet_evals']:.2f}x fewer UNet evals, {r['images_per_s']:.2f}x images/s")
        r = gen["ratio_grid_vs_diffusers"]
        print(f"(a') grid (equal steps) vs diffusers: {r['unet_evals']:.2f}x UNet evals, "
              f"{r['images_per_s']:.2f}x images/s")
    if not a.skip_training:
        tr = bench_training(a.config, a.overrides, a.steps, device, a.rounds, a.reuse)
        results["training"] = tr
        print(f"\n(b) training throughput (best of {a.rounds} interleaved rounds of {a.steps} steps)")
        names = ["plain", "online_prefetch", "online_sync"]
        names += [f"online_prefetch_reuse{a.reuse}"] if a.reuse > 1 else []
        for k in names:
            print(f"{k:24}{tr[k]['images_per_s']:>10.1f} images/s   stall {100 * tr[k]['stall_fraction']:5.1f}%   "
                  f"generated/step {tr[k]['generated_per_step']:5.1f}   rounds {tr[k]['rounds_images_per_s']}")
        print(f"prefetch vs sync: {tr['ratio_prefetch_vs_sync']:.2f}x   prefetch vs plain: "
              f"{tr['ratio_prefetch_vs_plain']:.2f}x")
        if a.reuse > 1:
            print(f"aug.reuse={a.reuse}: {tr['ratio_reuse_generated']:.2f}x the generator demand of reuse 1")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
