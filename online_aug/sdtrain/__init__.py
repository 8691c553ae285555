"""The SD-training wing: the code that *trains or measures generators*, apart from the classifier's training loop.

- :mod:`~online_aug.sdtrain.tiny_sd`: the tiny SD built from scratch for tests, CI and the CPU demo
  (``tools/build_tiny_sd.py``);
- :mod:`~online_aug.sdtrain.finetune`: learned class tokens (textual inversion) and a UNet LoRA
  (``tools/finetune_sd.py``);
- :mod:`~online_aug.sdtrain.sd_training`: what those two share (batches, VAE latents, the denoising loss);
- :mod:`~online_aug.sdtrain.lcm_distill`: latent consistency distillation of the run's generator into an LCM-LoRA
  (``tools/distill_lcm.py``);
- :mod:`~online_aug.sdtrain.erasure`: concept erasure (ESD, ``tools/erase_concepts.py``);
- :mod:`~online_aug.sdtrain.sd15`: SD 1.5's architecture with random weights (benchmarks, memory checks);
- :mod:`~online_aug.sdtrain.edit_quality`: how well a generator's edits land on their target class (the quality gate,
  ``tools/edit_rates.py``, ``tools/generator_report.py``).

Its door: it imports the frozen-SD package :mod:`online_aug.generator`, the config, the data splits and small shared
helpers (rng, schedules), and never the classifier's runtime (trainer, batch sources, prefetch, augmenter).
tests/test_architecture.py holds that rule. The runtime reads what this wing writes (a diffusers folder, a
``learned_embeds`` / LoRA folder) through :mod:`online_aug.generator` only, never by importing the wing.
"""
