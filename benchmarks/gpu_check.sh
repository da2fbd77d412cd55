#!/usr/bin/env bash
# The project's GPU check in one command (a lent GPU is short-lived: one call should do it all).
#   make gpu-prepare                      # on the CPU first: the artefacts the speed tables load (gpu-artefacts/)
#   bash benchmarks/gpu_check.sh [OUT]    # on the GPU: CUDA tests, speed tables (digits, DiT, compiled), whole flow
# Each step has its own time limit and a failing step does not stop the next; OUT (default runs/gpu-check) gets
# at most 8 small files: the test log, speed_gpu.{json,md} per table, gpu_flow.json. PYTHON picks the interpreter.
set -u
out=${1:-runs/gpu-check}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
for folder in gpu-artefacts/digits gpu-artefacts/dit; do
  [ -d "$folder" ] || { echo "$folder is missing: run 'make gpu-prepare' on the CPU first" >&2; exit 2; }
done
step() { echo "== $1" >&2; }
step "CUDA tests"
timeout 150 "$py" -m pytest -q tests/backends/test_cuda.py 2>&1 | tee "$out/pytest_cuda.log" | tail -3
step "digits: FP fp32/bf16/fp16, fake, int8-cuda, per-layer kernels"
timeout 150 "$py" benchmarks/speed_gpu.py --artefacts gpu-artefacts/digits --presets W8A8,W8A8-WSYM,W4A8 \
  --samples 256 --out "$out/digits" 2>&1 | tail -25
step "DiT (guided)"
timeout 120 "$py" benchmarks/speed_gpu.py --model dit --artefacts gpu-artefacts/dit --presets W8A8,W4A8 \
  --samples 256 --out "$out/dit" 2>&1 | tail -16
step "digits under torch.compile"
timeout 200 "$py" benchmarks/speed_gpu.py --artefacts gpu-artefacts/digits --presets W8A8 --batches 64,256 \
  --compile --no-kernels --samples 256 --out "$out/compiled" 2>&1 | tail -14
step "whole flow on CUDA (quick budgets)"
flow=$(mktemp -d)
timeout 300 "$py" benchmarks/gpu_flow.py --quick --samples 256 --out "$flow" 2>&1 | tail -20
cp "$flow/gpu_flow.json" "$out/" 2>/dev/null || echo "gpu_flow wrote no gpu_flow.json" >&2
