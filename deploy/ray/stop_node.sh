#!/usr/bin/env bash
# Stop a Ray node started by deploy/ray/start_node.sh.
#
#   deploy/ray/stop_node.sh NAME      (NAME: head, or the worker's name)
#
# Signals only that node: SIGTERM to its `ray start --block` process, then
# SIGKILL to its process group after 30 s; returns once no live process of the
# group is left.
set -euo pipefail

name="${1:?usage: $0 NAME (head or a worker name)}"
state="${FLASHMEMORY_RAY_STATE:-/tmp/flashmemory-ray}"
pidfile="$state/$name.pid"
if [[ ! -f "$pidfile" ]]; then
    echo "no $pidfile: node '$name' was not started by start_node.sh" >&2
    exit 1
fi
pid="$(cat "$pidfile")"
# Live (non-zombie) members of the node's process group.
alive() { ps -eo pgid=,stat= | awk -v g="$pid" '$1 == g && $2 !~ /^Z/' | grep -q .; }
# `ray start --block` stops its own processes on SIGTERM (about 3 s); a SIGTERM
# to the whole group at once leaves the GCS waiting on the raylet instead.
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 1 60); do
    if ! alive; then
        rm -f "$pidfile"
        echo "ray node '$name' stopped"
        exit 0
    fi
    sleep 0.5
done
kill -KILL -- "-$pid" 2>/dev/null || true
for _ in $(seq 1 20); do
    alive || break
    sleep 0.5
done
rm -f "$pidfile"
echo "ray node '$name' killed after 30 s"
