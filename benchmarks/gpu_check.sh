#!/usr/bin/env bash
# The project's GPU check in one command (a lent GPU is short-lived: one call should do it all).
#   make gpu-prepare                      # on the CPU first: the artefacts the speed tables load (gpu-artefacts/)
#   bash benchmarks/gpu_check.sh [OUT]    # on the GPU: CUDA tests, speed tables (digits, DiT, compiled), whole flow
# Each step has its own time limit and a failing step does not stop the next. OUT (default runs/gpu-check) gets
# at most 8 small files (a device lease returns no more): the test log, one NAME.json per speed table (its Markdown
# table is printed), gpu_flow.json. PYTHON picks the interpreter.
set -u
out=${1:-runs/gpu-check}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
for folder in gpu-artefacts/digits gpu-artefacts/dit; do
  [ -d "$folder" ] || { echo "$folder is missing: run 'make gpu-prepare' on the CPU first" >&2; exit 2; }
done
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
  echo "no CUDA device visible to $py (torch.cuda.is_available() is False): gpu_check.sh runs on a GPU machine" >&2
  exit 2
}
work=$(mktemp -d)
table() {  # table NAME LIMIT_S ARGS...: one speed_gpu.py table, its JSON kept as OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  echo "== speed table: $name" >&2
  timeout "$limit" "$py" benchmarks/speed_gpu.py "$@" --samples 256 --out "$work/$name" 2>&1 | tail -25
  cp "$work/$name/speed_gpu.json" "$out/$name.json" 2>/dev/null || echo "table $name wrote no result" >&2
}
echo "== CUDA tests" >&2
timeout 150 "$py" -m pytest -q tests/backends/test_cuda.py 2>&1 | tee "$out/pytest_cuda.log" | tail -3
table digits 150 --artefacts gpu-artefacts/digits --presets W8A8,W8A8-WSYM,W4A8
table dit 120 --model dit --artefacts gpu-artefacts/dit --presets W8A8,W4A8
table compiled 200 --artefacts gpu-artefacts/digits --presets W8A8 --batches 64,256 --compile --no-kernels
table graphs 200 --artefacts gpu-artefacts/digits --presets W8A8 --batches 64,256 --compile \
  --compile-mode reduce-overhead --no-kernels
echo "== whole flow on CUDA (quick budgets)" >&2
timeout 300 "$py" benchmarks/gpu_flow.py --quick --samples 256 --out "$work/flow" 2>&1 | tail -20
cp "$work/flow/gpu_flow.json" "$out/" 2>/dev/null || echo "gpu_flow wrote no gpu_flow.json" >&2
