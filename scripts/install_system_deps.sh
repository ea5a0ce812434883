#!/usr/bin/env bash
# Debian packages the deploy tests need (tests/deploy):
#   prometheus  - the Prometheus server and promtool (tests/deploy/test_prometheus.py,
#                 test_grafana.py scrape a live `vllm serve` with it).
# Idempotent: installs only what is missing, and runs `apt-get update` only then.
# Needs root (or sudo) on a Debian/Ubuntu machine; elsewhere it says what to install.
set -euo pipefail

packages=(prometheus)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "system packages present: ${packages[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "no apt-get here; install these Debian packages (or equivalents): ${missing[*]}" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends: no node exporter and no service started at install.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "installed: ${missing[*]}"
