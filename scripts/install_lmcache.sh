#!/usr/bin/env bash
# Install LMCache 0.5.6's storage layer into a venv without touching its torch.
#
# `pip install lmcache==0.5.6` resolves an unpinned `torch` to a CUDA 13 build
# (2.14.x, ~3 GB of nvidia-* wheels, cupy, cuda-python) and caps numpy at 2.2.6,
# replacing the venv's torch (notes/lmcache.md, section 4). ColdPool uses only
# `lmcache.v1.distributed.l1_manager.L1Manager` (see
# vllm_flashmemory/core/lmcache_store.py), which needs none of that. So:
#   1. lmcache itself with --no-deps;
#   2. exactly the pure-Python (or CPU-only) modules that importing the L1 storage
#      layer needs, each only when it is missing, at a pinned version, with the
#      venv's torch and numpy held fixed by a constraints file;
#   3. a smoke test: one object written and read back through L1Manager, and the
#      torch version unchanged.
# `pip check` will still list lmcache's other declared dependencies (cupy, nvtx,
# cufile-python, ...) as missing: they serve LMCache's GPU and remote paths, which
# this project does not use.
#
# Usage: PIP=.venv/bin/pip bash scripts/install_lmcache.sh   (default PIP: .venv/bin/pip)
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
if [[ "$PIP" == */* ]]; then
    # Absolute, because the final check runs from / (lmcache/logging.py would
    # shadow the stdlib from inside the package directory).
    PIP=$(cd "$(dirname "$PIP")" && pwd)/$(basename "$PIP")
    PY=${PYTHON:-$(dirname "$PIP")/python}
else
    PY=${PYTHON:-python}
fi
LMCACHE_VERSION=0.5.6

# Import-time needs of lmcache.v1.distributed.l1_manager on a CPU machine, as
# "module=requirement". Versions are the ones this was verified with (Python 3.11,
# torch 2.13.0+cpu); they are installed only where the module is absent, so a venv
# whose vLLM already brought a newer release keeps it.
DEPS=(
    "numpy=numpy==2.3.5"
    "aiohttp=aiohttp==3.14.5"
    "cachetools=cachetools==8.0.1"
    "cpuinfo=py-cpuinfo==9.0.0"
    "cryptography=cryptography==50.0.2"
    "numba=numba==0.65.0"
    "opentelemetry.metrics=opentelemetry-api==1.45.2"
    "opentelemetry.sdk=opentelemetry-sdk==1.45.2"
    "prometheus_client=prometheus_client==0.26.0"
    "psutil=psutil==7.2.2"
    "requests=requests==2.34.2"
    "sortedcontainers=sortedcontainers==2.4.0"
    "yaml=PyYAML==6.0.3"
)

torch_before=$("$PY" -c "import torch; print(torch.__version__)") || {
    echo "install_lmcache.sh: no torch in $PY; install the venv's torch first" \
        "(scripts/setup.sh does), so LMCache cannot bring its CUDA build." >&2
    exit 1
}
nvidia_before=$("$PIP" list 2>/dev/null | grep -ci '^nvidia-' || true)

installed=$("$PY" -c "import importlib.metadata as m; print(m.version('lmcache'))" \
    2>/dev/null || echo none)
if [[ "$installed" != "$LMCACHE_VERSION" ]]; then
    echo "install_lmcache.sh: lmcache $installed -> $LMCACHE_VERSION (--no-deps)"
    "$PIP" install -q --no-deps "lmcache==$LMCACHE_VERSION"
fi

missing=()
for dep in "${DEPS[@]}"; do
    module=${dep%%=*}
    requirement=${dep#*=}
    "$PY" -c "import $module" 2>/dev/null || missing+=("$requirement")
done
if (( ${#missing[@]} )); then
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    # Hold torch (and numpy, where present) where they are: none of these needs
    # another, and a resolver that thinks otherwise must fail rather than swap them.
    "$PY" - >"$constraints" <<'EOF'
import importlib.metadata as m
for name in ("torch", "numpy"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
    echo "install_lmcache.sh: installing ${missing[*]}"
    "$PIP" install -q -c "$constraints" "${missing[@]}"
fi

# Smoke test outside the repo, because lmcache/logging.py shadows the stdlib's when
# Python runs from inside the package directory, and a repo-local path must not mask
# a broken install.
(cd / && "$PY" - "$torch_before" <<'EOF'
import sys

import torch

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.config import L1ManagerConfig, L1MemoryManagerConfig
from lmcache.v1.distributed.error import L1Error
from lmcache.v1.distributed.l1_manager import L1Manager

if torch.__version__ != sys.argv[1]:
    sys.exit(f"install_lmcache.sh: torch changed from {sys.argv[1]} to "
             f"{torch.__version__}; reinstall the venv's torch.")
l1 = L1Manager(L1ManagerConfig(memory_config=L1MemoryManagerConfig(
    size_in_bytes=4096, use_lazy=False, shm_name="")))
key = ObjectKey(chunk_hash=b"smoke", model_name="install-check", kv_rank=0)
err, obj = l1.reserve_write([key], [False], MemoryLayoutDesc(
    [torch.Size([64])], [torch.uint8]))[key]
assert err == L1Error.SUCCESS, err
obj.tensor.fill_(7)
assert l1.finish_write([key])[key] == L1Error.SUCCESS
err, obj = l1.reserve_read([key])[key]
assert err == L1Error.SUCCESS and int(obj.tensor.sum()) == 7 * 64, err
l1.finish_read([key])
l1.close()
print(f"install_lmcache.sh: lmcache L1 storage OK, torch {torch.__version__}")
EOF
) 2>&1 | grep -v "LMCache INFO"

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
nvidia_after=$("$PIP" list 2>/dev/null | grep -ci '^nvidia-' || true)
if [[ "$torch_after" != "$torch_before" || "$nvidia_after" != "$nvidia_before" ]]; then
    echo "install_lmcache.sh: torch $torch_before -> $torch_after, nvidia-* packages" \
        "$nvidia_before -> $nvidia_after; the install must not change them." >&2
    exit 1
fi
