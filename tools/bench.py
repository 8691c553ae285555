"""Benchmarks, measured side by side in one run on one machine; prints ratios, never asserts timings.

(a)  UNet evaluations per edited image and edited images/s: our few-step loop (K steps, per-sample strength and
     target in one batch) against diffusers' StableDiffusionImg2ImgPipeline at the papers' setting (N=25 steps,
     s in {0.5, 0.7, 0.9}), called once per strength group with per-sample prompt embeddings: the best a peer can do
     with the stock pipeline. Same model, same batch, same guidance.
(a') The same comparison with our loop in grid mode at equal steps (what the loop itself costs).
(b)  Training images/s: plain training, online augmentation through the prefetch queue, and online augmentation
     done synchronously inside the step; their ratios, and the trainer's stall fraction. With --reuse K also the
     prefetch queue with aug.reuse=K; every variant reports its generator demand (edits generated per micro-step).
Each generator setting gets its pair of lines, "few-step vs diffusers" and "prefetch vs plain": the run's own
(aug.steps, its guidance) and the distilled one at each K of --lcm-steps (default 1,2: LCM steps, no CFG; the
LCM-LoRA of tools/distill_lcm.py given by --lcm-lora, stacked on the run's LoRAs; without it the LCM sampler runs on
the teacher's weights, the same timing: a merged LoRA does not change the UNet's size).

    python tools/bench.py [--batch 32] [--steps 30] [--rounds 2] [--reuse K] [--lcm-lora DIR] [--lcm-steps 1,2]
                          [--out bench.json] [overrides]

The measuring code (timing harness, diffusers baseline, training benchmark) is online_aug/experiments/timing.py,
shared with tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from online_aug.config import load_config
from online_aug.devices import pick_device
from online_aug.experiments.timing import bench_generation, bench_training

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    p.add_argument("--batch", type=int, default=32, help="edited images per generation batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the training variants (best kept)")
    p.add_argument("--reuse", type=int, default=1, help="also time the prefetch queue with aug.reuse=K (K > 1)")
    p.add_argument("--lcm-lora", default="", help="the distilled LCM-LoRA (tools/distill_lcm.py --out) for the "
                                                  "distilled rows")
    p.add_argument("--lcm-steps", default="1,2", help="K of the distilled rows, comma-separated ('' for none)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(a.config, a.overrides)
    lcm_ks = tuple(int(k) for k in a.lcm_steps.split(",") if k.strip())
    lcm_note = "" if a.lcm_lora else " (LCM sampler on the teacher's weights: timing only)"
    device = pick_device(cfg.run.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  "
          f"torch threads: {torch.get_num_threads()}  model: {cfg.aug.model}")
    results: dict = {"device": str(device)}
    if not a.skip_generation:
        gen = bench_generation(cfg.aug.model, a.batch, device, a.repeats, cfg, lcm_ks, a.lcm_lora)
        results["generation"] = gen
        print(f"\n(a) generation, batch {a.batch}, s ~ U{{0.5, 0.7, 0.9}}, guidance {cfg.aug.guidance_scale}")
        print(f"{'':28}{'UNet evals/image':>18}{'images/s':>12}")
        for k in ("diffusers_img2img_25", f"ours_fewstep_K{cfg.aug.steps}", "ours_grid_25",
                  *(f"ours_lcm_K{k}" for k in lcm_ks)):
            print(f"{k:28}{gen[k]['unet_evals_per_image']:>18.2f}{gen[k]['images_per_s']:>12.1f}")
        r = gen["ratio_fewstep_vs_diffusers"]
        print(f"few-step vs diffusers: {r['unet_evals']:.2f}x fewer UNet evals, {r['images_per_s']:.2f}x images/s")
        for k in lcm_ks:
            r = gen[f"ratio_lcm_K{k}_vs_diffusers"]
            print(f"few-step vs diffusers, distilled K={k} LCM no CFG{lcm_note}: {r['unet_evals']:.2f}x fewer UNet "
                  f"evals, {r['images_per_s']:.2f}x images/s")
        r = gen["ratio_grid_vs_diffusers"]
        print(f"(a') grid (equal steps) vs diffusers: {r['unet_evals']:.2f}x UNet evals, "
              f"{r['images_per_s']:.2f}x images/s")
    if not a.skip_training:
        tr = bench_training(a.config, a.overrides, a.steps, device, a.rounds, a.reuse, lcm_ks, a.lcm_lora)
        results["training"] = tr
        print(f"\n(b) training throughput (best of {a.rounds} interleaved rounds of {a.steps} steps)")
        names = ["plain", "online_prefetch", "online_sync"]
        names += [f"online_prefetch_reuse{a.reuse}"] if a.reuse > 1 else []
        names += [f"online_prefetch_lcm_K{k}" for k in lcm_ks]
        for k in names:
            print(f"{k:26}{tr[k]['images_per_s']:>10.1f} images/s   stall {100 * tr[k]['stall_fraction']:5.1f}%   "
                  f"generated/step {tr[k]['generated_per_step']:5.1f}   rounds {tr[k]['rounds_images_per_s']}")
        print(f"prefetch vs sync: {tr['ratio_prefetch_vs_sync']:.2f}x   prefetch vs plain: "
              f"{tr['ratio_prefetch_vs_plain']:.2f}x")
        for k in lcm_ks:
            print(f"prefetch vs plain, distilled K={k} LCM no CFG{lcm_note}: "
                  f"{tr[f'ratio_prefetch_lcm_K{k}_vs_plain']:.2f}x")
        if a.reuse > 1:
            print(f"aug.reuse={a.reuse}: {tr['ratio_reuse_generated']:.2f}x the generator demand of reuse 1")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
