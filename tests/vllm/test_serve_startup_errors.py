"""Real `vllm serve` startups that LSA must stop, each error naming the fix (slow).

Three plain `vllm serve` (api_server) processes on the tiny model, started in
parallel, each with one problem: a bad lsa.* value (lsa.tau=0), a Memory Indexer
checkpoint that does not fit the model (hidden_size 128 vs 256), and a cold pool
too small for one max_model_len request. Each must exit non-zero before serving,
with the connector's message in its log. The remaining refusals go through the
same startup function in tests/connectors/test_startup.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lsa_helpers import (
    ensure_tiny_model,
    kv_transfer_config,
    lsa_extra,
    write_random_indexer,
)

from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig


@pytest.mark.slow
def test_bad_configs_stop_vllm_serve(tmp_path) -> None:
    model = ensure_tiny_model()
    good = write_random_indexer(tmp_path / "good")
    wrong = MemoryIndexer(
        MemoryIndexerConfig.preset(
            "tiny", hidden_size=128, n_heads=64, layer_ids=(0, 1, 2, 3)
        )
    ).save(tmp_path / "wrong")
    cases = {
        "bad_value": (lsa_extra(good, tau=0), r"'lsa.tau'=0 must be at least 1"),
        "mismatched_indexer": (
            lsa_extra(wrong),
            "has hidden_size=128 but the model needs hidden_size=256",
        ),
        "cold_pool_too_small": (
            lsa_extra(good, cold_pool_gib=0.001),
            "raise 'lsa.cold_pool_gib' to at least",
        ),
    }
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    procs = {}
    for name, (extra, _) in cases.items():
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            "0",
            "--max-model-len",
            "12288",
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--kv-transfer-config",
            kv_transfer_config(extra),
        ]
        procs[name] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name}: the server did not stop within 600 s")
        assert proc.returncode != 0, f"{name}: the server started:\n{out[-3000:]}"
        assert cases[name][1] in out, f"{name}:\n{out[-5000:]}"
        (tmp_path / f"{name}.log").write_text(out)
    print({name: json.dumps(cases[name][1]) for name in cases})
