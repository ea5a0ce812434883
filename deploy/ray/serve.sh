#!/usr/bin/env bash
# Serve across a Ray cluster: run on the head node after start_node.sh has
# started the head and every worker.
#
#   deploy/ray/serve.sh HEAD_IP:PORT MODEL_DIR [vllm serve argument ...]
#
# Adds `--distributed-executor-backend ray` and RAY_ADDRESS to deploy/serve.sh;
# pass --tensor-parallel-size / --pipeline-parallel-size as usual (TP = devices
# per node, PP = nodes). The environment of this shell reaches every vLLM Ray
# worker through vLLM's own copy rules, so set VLLM_*, LMCACHE_*, HF_* (and
# VLLM_PLUGINS, if you set it at all) here, not on the workers. Before serving,
# deploy/ray/check_nodes.py confirms every node can load the plugin.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 HEAD_IP:PORT MODEL_DIR [vllm serve argument ...]" >&2
    exit 2
fi
export RAY_ADDRESS="$1"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"${PYTHON:-python3}" "$here/check_nodes.py"
exec "$here/../serve.sh" "$@" --distributed-executor-backend ray
