# Convenience targets. `make test` and `make demo` create .venv on first use.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
# Index for the torch/torchvision pins, installed before the rest (CPU only:
# make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu). Empty: PyPI, like everything else.
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/synthetic
DEMO_OUT ?= output/demo

.PHONY: setup test test-slow demo clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(if $(TORCH_INDEX),$(PY) -m pip install $$(grep -E '^(torch|torchvision)==' requirements.txt) \
		--index-url $(TORCH_INDEX))
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

# Pre-train the tiny MultiMAE of cfgs/pretrain/demo.yaml on the synthetic scenes (CPU, ~7 minutes).
# One intra-op thread by default: the matrices are small, and on a busy machine two spinning OpenMP
# threads per process made steps several times slower (set OMP_NUM_THREADS=2 on an idle machine).
demo: setup
	@test -f $(DEMO_DATA)/info.json || $(PY) tools/make_synthetic_dataset.py --output_dir $(DEMO_DATA) \
		--num_train 512 --num_val 64 --image_size 96
	rm -rf $(DEMO_OUT)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) run_pretraining_multimae.py -c cfgs/pretrain/demo.yaml \
		--data_path $(DEMO_DATA)/train --output_dir $(DEMO_OUT)
	@echo "checkpoint:      $(DEMO_OUT)/checkpoint-last.pth"
	@echo "  demos in the browser: $(PY) tools/demo_app.py --checkpoint $(DEMO_OUT)/checkpoint-last.pth --data_path $(DEMO_DATA)/val"
	@echo "reconstructions: $$(ls $(DEMO_OUT)/vis/*.png | tail -n 1)"
	@echo "loss per epoch:  $(DEMO_OUT)/log.txt"

clean:
	rm -rf $(VENV) .pytest_cache
