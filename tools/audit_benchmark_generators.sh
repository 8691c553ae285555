#!/usr/bin/env bash
# The generator audit (tools/audit_generator.py) of each long-tail benchmark generator, on the benchmark's split:
# reports/guard/audit-<generator>/audit.{md,json}. What the guard decides for each (docs/guard.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# ONLY=<name> audits one generator; a generator whose audit.json exists is skipped unless FRESH=1
run() {
  local name=$1; shift
  [[ -n "${ONLY:-}" && "$ONLY" != "$name" ]] && return 0
  [[ -z "${FRESH:-}" && -f "reports/guard/audit-$name/audit.json" ]] && return 0
  "$PY" tools/audit_generator.py --config configs/diff-mix.yaml --out "reports/guard/audit-$name" "$@"
}
run pool-class-named aug.model=models/tiny-sd-digits-pool aug.textual_inversion= aug.lora= "aug.prompt=a photo of the digit {name}"
run lt-only aug.model=models/tiny-sd-digits-lt100 aug.textual_inversion= aug.lora= "aug.prompt=a photo of the digit {name}"
run pool-agnostic-no-finetuning aug.model=models/tiny-sd-digits-pool-agnostic aug.textual_inversion= aug.lora= "aug.prompt=a photo"
run pool-agnostic-ti-lora aug.model=models/tiny-sd-digits-pool-agnostic aug.textual_inversion=models/ft-digits-pool-agnostic aug.lora=models/ft-digits-pool-agnostic "aug.prompt=a photo"
run pool-agnostic-ti-lora-5e-3 aug.model=models/tiny-sd-digits-pool-agnostic aug.textual_inversion=models/ft-digits-pool-agnostic-lora5e-3 aug.lora=models/ft-digits-pool-agnostic-lora5e-3 "aug.prompt=a photo"
