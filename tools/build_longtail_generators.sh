#!/usr/bin/env bash
# Builds the long-tail benchmark's generators (README "Long-tail benchmark"); each is skipped when already built.
#   models/tiny-sd-digits-pool            pretrained on the generator pool, class-named prompts ("SD knows the classes")
#   models/tiny-sd-digits-pool-agnostic   pretrained on the pool with one prompt, "a photo" (knows the domain only)
#   models/ft-digits-pool-agnostic        TI + LoRA (rank 10) of the agnostic model on the classifier's LT subset
#   models/tiny-sd-digits-lt100           trained on the classifier's LT subset only (the ablation)
# Usage: bash tools/build_longtail_generators.sh [PYTHON]   (about 30 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CFG=configs/demo.yaml
built() { [ -f "$1/build_info.json" ] || [ -f "$1/manifest.json" ]; }
built models/tiny-sd-digits-pool || OMP_NUM_THREADS=1 $PY tools/build_tiny_sd.py --config $CFG --data pool \
  --out models/tiny-sd-digits-pool --no-progress &
built models/tiny-sd-digits-pool-agnostic || OMP_NUM_THREADS=1 $PY tools/build_tiny_sd.py --config $CFG --data pool \
  --prompt "a photo" --out models/tiny-sd-digits-pool-agnostic --no-progress &
wait
built models/tiny-sd-digits-lt100 || OMP_NUM_THREADS=1 $PY tools/build_tiny_sd.py --config $CFG --data train \
  --out models/tiny-sd-digits-lt100 --no-progress &
built models/ft-digits-pool-agnostic || OMP_NUM_THREADS=1 $PY tools/finetune_sd.py --config $CFG \
  --model models/tiny-sd-digits-pool-agnostic --template "a photo" --steps 2000 --lora-rank 10 --lr 0.005 \
  --lora-lr 0.001 --eval --out models/ft-digits-pool-agnostic --force --no-progress &
wait
