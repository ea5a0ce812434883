"""Every Triton op and its torch reference share one signature (STYLE "Do this" 10).

Scenarios:
- memory_indexer_select / _ref, native_indexer_topk / _ref, gather_chunks / _ref,
  scatter_chunks / _ref: same parameter names, order, kinds and defaults.
"""

from __future__ import annotations

import inspect

import pytest

from vllm_flashmemory.triton_ops import chunk_copy, memory_indexer_score, native_indexer_topk

PAIRS = [
    (memory_indexer_score, "memory_indexer_select"),
    (native_indexer_topk, "native_indexer_topk"),
    (chunk_copy, "gather_chunks"),
    (chunk_copy, "scatter_chunks"),
]


@pytest.mark.parametrize("module, name", PAIRS, ids=[p[1] for p in PAIRS])
def test_reference_signature_matches(module, name):
    op = inspect.signature(getattr(module, name))
    ref = inspect.signature(getattr(module, name + "_ref"))
    assert [(p.name, p.kind, p.default) for p in op.parameters.values()] == [
        (p.name, p.kind, p.default) for p in ref.parameters.values()
    ]
