"""The benchmark harness that ``tools/compare.py``, ``tools/bench.py`` and ``tools/gpu_check.py`` drive.

- :mod:`.suites`: what a comparison runs: a suite's rows (a preset plus overrides each), seeds and output folder, and
  the overrides every (row, seed) training gets (:class:`~.suites.Plan`).
- :mod:`.cache`: which finished run a comparison may reuse: same resolved config, same generator files.
- :mod:`.runner`: every row's config checked before the first training, then one ``train.py`` subprocess per
  (row, seed), a failed row recorded while the others go on.
- :mod:`.reports`: ``results.csv``, ``table.md`` and ``plot.png``.
- :mod:`.timing`: one timing harness (images/s, UNet evaluations per image), diffusers' img2img baseline and the
  training-throughput benchmark.

Nothing here imports the trainer at module import time: a comparison trains in subprocesses, and only the timing
benchmark builds a :class:`~online_aug.trainer.Trainer` (lazily).
"""
