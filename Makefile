# Two commands do all the set-up on a fresh machine: `make run` (main job) and `make test` (tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.tadq-installed

.PHONY: setup run bench-full test test-slow quality bench bench-report bench-perf clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # the CPU build; installed first so nothing pulls a CUDA torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The headline (runs/main): the shipped digits model at W8A8, W4A8 and W4A4, each preset's naive-PTQ baseline against
# its best recipe as measured in docs/results/digits.md (`best`: TFMQ-DM model-wide FSC + TAC at W8A8, Q-Diffusion + TAC at W4A8, SVDQuant + TAC at W4A4), with
# tadq run's defaults: the Q-Diffusion bases rounded by GPTQ (no iterations; docs/methods/qdiffusion.md#gptq-rounding)
# without the activation phase, the input and output convs kept in float in every row
# (docs/methods/qdiffusion.md#what-limits-w8a8); samples.png and per_step_error.png. 256 samples: PSNR/SSIM vs FP
# hold there, FD-digits needs about 1000. Measured from an empty calibration cache with torch's default threads on
# these 2 cores: 9 min 16 s (README, "The headline"; the TAC fits share their FP trajectories).
run: $(STAMP)
	$(BIN)/tadq run --methods naive,best --num-samples 256 --batch-size 256

# The complete matrix of the main table (docs/results/digits.md) (1000 samples) with the setting it was measured with (AdaRound
# 1000 / 400 iterations per unit, every layer quantized; runs/main-full): naive/Q-Diffusion/PTQD at W8A8/W4A8/W4A4
# (≈ 45 min here with --threads 1), then the correction rows at W4A8/W4A4 in the same folder (≈ 55 min): ≈ 100 min
# from a fresh clone.
bench-full: $(STAMP)
	$(BIN)/tadq run --recon-rounding adaround --recon-activation-iters 400 --fp-layers none --out runs/main-full
	$(BIN)/tadq run --methods naive,qdiffusion,ptqd,tac,tcec,ibc,ner,tac+tcec --presets W4A4,W4A8 --recon-rounding adaround --recon-activation-iters 400 --fp-layers none --out runs/main-full

# every test runs with one torch thread (tests/conftest.py), so the suite is spread over the cores: one pytest-xdist
# worker per core (at most 4), each test file on one worker (its module fixtures built once)
PARALLEL = -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PARALLEL)

# The backend and CLI tests as on CPUs this one stands in for (docs/backends.md#cpus-without-vnni-or-amx-avx2):
# oneDNN capped at AVX2 (torch's kernels too) and at AVX-512 without VNNI, each with its own Inductor cache (the
# cache does not key on ATEN_CPU_CAPABILITY)
.PHONY: test-cpu-kinds
test-cpu-kinds: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-avx2 \
		$(BIN)/python -m pytest -q $(PARALLEL) tests/backends tests/cli
	ONEDNN_MAX_CPU_ISA=AVX512_CORE TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-avx512-core \
		$(BIN)/python -m pytest -q $(PARALLEL) tests/backends tests/cli

# The whole default suite on the oldest release of each dependency that pyproject.toml accepts (its floors), in a venv
# of its own: what the floors are measured with (README, "Two commands"). PyPI's torch 2.8.0 is its CUDA build (it
# runs on a CPU; with its nvidia-* wheels it is a few GB).
FLOORS = torch==2.8.0 diffusers==0.35.2 transformers==5.0.0 safetensors==0.4.3 scikit-learn==1.3.0 \
	scikit-image==0.22.0 torchmetrics==1.4.2 scipy==1.10.0 typer==0.16.0 tqdm==4.66.0 matplotlib==3.7.0 numpy==1.24.0 \
	threadpoolctl==3.0.0
.PHONY: test-floors
test-floors:
	$(PYTHON) -m venv .venv-floors
	.venv-floors/bin/python -m pip install -q $(FLOORS) "pytest>=8" "pytest-xdist>=3"
	.venv-floors/bin/python -m pip install -q --no-deps -e .
	.venv-floors/bin/python -m pip check
	.venv-floors/bin/python -m pytest -q $(PARALLEL)

bench: $(STAMP)
	$(BIN)/python benchmarks/reconstruction_budget.py

bench-report: $(STAMP)
	$(BIN)/tadq bench --quick --recon-rounding adaround --recon-activation-iters 400 --fp-layers none --threads 1 --out runs/bench --models-dir runs/main-full/models

bench-perf: $(STAMP)
	$(BIN)/python benchmarks/perf.py --threads 1

.PHONY: bench-speed
bench-speed: $(STAMP)   # FP fp32/bf16 vs fake-quant vs int8 on the shipped model (docs/backends.md)
	$(BIN)/python benchmarks/speed.py --threads 1

.PHONY: gpu-prepare
gpu-prepare: $(STAMP)   # CPU: the artefacts benchmarks/gpu_check.sh measures on a GPU (docs/backends.md)
	$(BIN)/python benchmarks/speed_gpu.py --prepare --presets W8A8,W8A8-WSYM,W4A8 --artefacts gpu-artefacts/digits
	$(BIN)/python benchmarks/speed_gpu.py --prepare --model dit --presets W8A8,W4A8 --artefacts gpu-artefacts/dit

.PHONY: gpu-check
gpu-check: $(STAMP)   # GPU: CUDA tests, GPU speed tables, the whole flow on CUDA (after gpu-prepare)
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh runs/gpu-check

.PHONY: browser
browser:   # Debian's Chromium, for the test that renders the bench report headless (skipped without it)
	apt-get install -y chromium || echo "could not install chromium: the report test checks the HTML structure only"

quality: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs .cache
