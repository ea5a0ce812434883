"""The model-side LSA seam (Eq. 6) against a real ResidencyMap.

Scenarios:
- no KV connector: logits and top-k come back untouched (the same object);
- an LSA connector with nothing evicted: untouched;
- evicted blocks: their entries' logits are -inf, a torch top-k then never picks
  them, and drop_nonresident_topk rewrites forced picks to -1;
- Memory Indexer scores become per-chunk max scores on the connector.
"""

from __future__ import annotations

import pytest
import torch

import vllm.distributed.kv_transfer.kv_transfer_state as kv_state
from vllm_flashmemory.connectors.residency import ResidencyMap
from vllm_flashmemory.vllm import model_variant as mv


class _Connector:
    """Stands in for the worker-role LSAConnector (the engine boundary)."""

    def __init__(self, residency: ResidencyMap) -> None:
        self.residency = residency
        self.memory_indexer_req_ids = ("r",)
        self.recorded: list[tuple] = []

    def record_memory_indexer_scores(self, req_id, chunk_scores, n) -> None:
        self.recorded.append((req_id, chunk_scores, n))


@pytest.fixture
def connector(monkeypatch) -> _Connector:
    conn = _Connector(ResidencyMap(num_blocks=8, entries_per_block=4, device=torch.device("cpu")))
    monkeypatch.setattr(kv_state, "_KV_CONNECTOR_AGENT", conn)
    return conn


def test_stock_without_connector(monkeypatch) -> None:
    monkeypatch.setattr(kv_state, "_KV_CONNECTOR_AGENT", None)
    logits = torch.randn(2, 12)
    assert mv.mask_nonresident_logits(logits, torch.zeros(2, 3, dtype=torch.int32)) is logits
    assert mv.memory_indexer_req_ids() == ()


def test_nothing_evicted_is_identity(connector) -> None:
    logits = torch.randn(2, 12)
    assert mv.mask_nonresident_logits(logits, torch.zeros(2, 3, dtype=torch.int32)) is logits


def test_evicted_entries_are_never_picked(connector) -> None:
    # Two requests, 3 logical blocks of 4 entries each; physical blocks differ.
    page_table = torch.tensor([[5, 2, 7], [1, 3, 4]], dtype=torch.int32)  # [T, max_blocks]
    connector.residency.block([2, 4])
    logits = torch.arange(24, dtype=torch.float32).view(2, 12)  # [T, S]
    masked = mv.mask_nonresident_logits(logits, page_table)
    assert torch.isinf(masked[0, 4:8]).all() and torch.isfinite(masked[0, :4]).all()
    assert torch.isinf(masked[1, 8:12]).all() and torch.isfinite(masked[1, :8]).all()
    topk = masked.topk(4, dim=1).indices.int()  # [T, K]
    assert not ((topk[0] >= 4) & (topk[0] < 8)).any()
    assert not (topk[1] >= 8).any()
    # Asking for more picks than resident entries: the -inf picks become -1.
    forced = masked.topk(10, dim=1).indices.int()
    mv.drop_nonresident_topk(forced, page_table)
    assert (forced[0] == -1).sum() == 2 and (forced[1] == -1).sum() == 2
    connector.residency.unblock([2, 4])
    assert mv.mask_nonresident_logits(logits, page_table) is logits


def test_publish_scores_as_chunk_max(connector) -> None:
    scores = torch.tensor([0.1, 0.7, 0.2, 0.3, 0.9, 0.4])
    mv.publish_memory_indexer_scores("r", scores, threshold=0.5, entries_per_chunk=4)
    (req, chunk_scores, n) = connector.recorded[0]
    assert req == "r" and n == 2
    assert chunk_scores == pytest.approx((0.7, 0.9))
