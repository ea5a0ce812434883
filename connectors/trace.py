"""Opt-in decision trace of the LSA connector, for replay tests and debugging.

Set `VLLM_FLASHMEMORY_TRACE_DIR=<dir>` and each connector half appends one JSON
object per line to `<dir>/<role>-<pid>.jsonl`:

- scheduler, one line per refresh: the Memory Indexer chunk scores it used (or
  null), the request's prompt and current token counts, and the resident set the
  planner converges to (`target`) with its fetch/evict difference;
- worker, one line per step that fetched or evicted for a request: the stored
  chunks and which of them its residency map leaves attendable.

A fresh `ResidencyPlanner` fed the same scores must reproduce `target`, and the
worker's attendable chunks must equal `target` restricted to stored chunks
(tests/vllm/test_serve_e2e.py). Off by default: nothing is written or kept.
"""

from __future__ import annotations

import json
import os
from typing import Any

TRACE_DIR_ENV = "VLLM_FLASHMEMORY_TRACE_DIR"


class LSATrace:
    """Appends JSON lines when `VLLM_FLASHMEMORY_TRACE_DIR` is set, else no-op."""

    def __init__(self, role: str) -> None:
        folder = os.environ.get(TRACE_DIR_ENV)
        self.path: str | None = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.path = os.path.join(folder, f"{role}-{os.getpid()}.jsonl")

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


__all__ = ["TRACE_DIR_ENV", "LSATrace"]
