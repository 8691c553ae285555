# Two commands do all the setup on a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC pins the torch build installed when the venv has none (override on a GPU machine if needed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-hard test lint bench gpu-check clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) train.py --config configs/demo.yaml

# the hard regime: a generator that must learn the tail classes from 1-2 images; the audit's verdict decides
demo-hard: install
	$(PY) train.py --config configs/demo-hard.yaml

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check online_aug tools tests train.py

bench: install
	$(PY) tools/bench.py

# the CUDA path on a GPU, under 10 min on one H100: pytest -m gpu, sync audit, profiler trace, benchmarks ->
# reports/gpu/gpu_check.{json,md}; without CUDA it says so and exits 0
gpu-check: install
	$(PY) tools/gpu_check.py

clean:
	rm -rf $(VENV) runs build *.egg-info
