#!/usr/bin/env bash
# GPU tests of triton_ops, then the GPU benches (scoring, fetch, refresh).
# Usage (repo root): OUT=runs/bench [STAGES="tests scoring"] bash bench/run_gpu.sh [--sweep]
# Needs torch + triton with a CUDA GPU; vllm_flashmemory need not be installed.
set -u
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SHIM=$(mktemp -d)
cp -r vllm_flashmemory "$SHIM/"
ln -s "$PWD/triton_ops" "$SHIM/vllm_flashmemory/triton_ops"
ln -s "$PWD/connectors" "$SHIM/vllm_flashmemory/connectors"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
STAGES=${STAGES:-tests scoring fetch refresh}
for stage in $STAGES; do
  case $stage in
    tests) timeout 240 python3 -P -m pytest -q -p no:cacheprovider tests/triton_ops 2>&1 \
             | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    scoring) timeout 150 python3 bench/bench_scoring.py --out "$OUT/scoring.json" "$@" 2>&1 \
             | tee "$OUT/scoring.log" ;;
    fetch) timeout 120 python3 bench/bench_fetch.py --out "$OUT/fetch.json" "$@" 2>&1 \
             | tee "$OUT/fetch.log" ;;
    refresh) timeout 240 python3 bench/bench_refresh.py --out "$OUT/refresh.json" 2>&1 \
             | tee "$OUT/refresh.log" ;;
  esac
done
