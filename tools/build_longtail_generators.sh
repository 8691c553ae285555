#!/usr/bin/env bash
# Builds the long-tail benchmark's generators (README "Long-tail benchmark"); each is skipped when already built.
#   models/tiny-sd-digits-pool            pretrained on the generator pool, class-named prompts ("SD knows the classes")
#   models/tiny-sd-digits-pool-agnostic   pretrained on the pool with one prompt, "a photo" (knows the domain only)
#   models/ft-digits-pool-agnostic        TI + LoRA (rank 10) of the agnostic model on the classifier's LT subset
#                                         (Diff-Mix's fine-tuning; the Diff-* presets and the demo)
#   models/ft-digits-pool-agnostic-lora5e-3  the same with a 5x LoRA learning rate: draws every class, copies the
#                                         1-image ones (the issue-15 investigation, configs/suites/longtail-tune.yaml)
#   models/ti-digits-pool                 TI on the class-named pool model, tokens from the class names (DA-Fusion:
#                                         TI needs a UNet that reads its text, as real SD does; README fine-tuning)
#   models/ti-digits-pool-leakage-free    the same, tokens from the word "a", prompt without the class name (§6.1)
#   models/tiny-sd-digits-lt100           trained on the classifier's LT subset only (the ablation)
# Usage: bash tools/build_longtail_generators.sh [PYTHON]   (about 40 min on 2 CPU cores; two jobs at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CFG=configs/demo.yaml
built() { [ -f "$1/build_info.json" ] || [ -f "$1/manifest.json" ]; }
tiny() {  # OUT DATA [extra args]: one thread per job, two jobs share the 2 cores
  local out=$1 data=$2; shift 2
  built "$out" || OMP_NUM_THREADS=1 $PY tools/build_tiny_sd.py --config $CFG --data "$data" --out "$out" \
    --no-progress --force "$@"
}
tune() {  # OUT BASE [extra args]: fine-tune a pool model on the classifier's long-tail subset
  local out=$1 base=$2; shift 2
  built "$out" || OMP_NUM_THREADS=1 $PY tools/finetune_sd.py --config $CFG --model "$base" --eval --out "$out" \
    --force --no-progress "$@"
}
tiny models/tiny-sd-digits-pool pool &
tiny models/tiny-sd-digits-pool-agnostic pool --prompt "a photo" &
wait
tiny models/tiny-sd-digits-lt100 train &
tune models/ft-digits-pool-agnostic models/tiny-sd-digits-pool-agnostic --template "a photo" --steps 2000 \
  --lora-rank 10 --lr 0.005 --lora-lr 0.001 &
wait
tune models/ft-digits-pool-agnostic-lora5e-3 models/tiny-sd-digits-pool-agnostic --template "a photo" --steps 2000 \
  --lora-rank 10 --lr 0.005 --lora-lr 0.005 &
wait
tune models/ti-digits-pool models/tiny-sd-digits-pool --template "a photo of the digit {token}" --steps 600 &
tune models/ti-digits-pool-leakage-free models/tiny-sd-digits-pool --template "a photo of a {token}" \
  --init-word a --init-split error --steps 400 --lr 0.05 &
wait
