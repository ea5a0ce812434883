"""The model-side seam of LSA: what the DeepSeek-V4 indexer path calls (Eq. 6).

Contract (also in docs/ARCHITECTURE.md, "Model seam"):

- `current_residency() -> ResidencyMap | None`: the worker's residency map when an
  `LSAConnector` is the process's KV connector, else None. Found through vLLM's
  own accessor `vllm.distributed.kv_transfer.get_kv_transfer_group()` (also inside
  a `MultiConnector`), so there is no new global and no import-order coupling.
- `mask_nonresident_logits(logits, page_table)`: call on the native indexer logits
  right before top-k. logits: [T, S] float over each token's local compressed
  positions; page_table: [T, max_blocks] int32 physical block ids of each token's
  request (the same table the logits kernel reads). Non-resident entries become
  -inf, so top-k ranks only resident chunks (Eq. 6). Returns `logits` itself
  (no copy) when nothing is evicted or no LSAConnector is present.
- `drop_nonresident_topk(topk_indices, page_table)`: call on the top-k output
  [T, K] (local positions, -1 padded). When fewer than K entries are resident a
  top-k still emits -inf picks; this rewrites those to -1, in place.
- `memory_indexer_req_ids()` and `publish_memory_indexer_scores(req_id,
  entry_scores)`: the worker asks for Memory Indexer scores for the requests whose
  refresh is due next step; the model variant runs the Memory Indexer (Eq. 1-4,
  `core.memory_indexer.MemoryIndexer`) on those requests' last-token hidden states
  at the `lsa.indexer_layers` CSA layers against their K^IComp, ORs/maxes over layers
  (Eq. 13) and publishes one [n_entries] score vector per request.

With no LSAConnector configured every function is a no-op and the model is stock.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger

from vllm_flashmemory.connectors.residency import ResidencyMap
from vllm_flashmemory.connectors.startup import extra_config_of
from vllm_flashmemory.connectors.types import RefreshTarget
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer
from vllm_flashmemory.core.residency_planner import chunk_scores_from_entries
from vllm_flashmemory.triton_ops.memory_indexer_score import combine_layers_ref

logger = init_logger(__name__)


def _lsa_connector() -> Any | None:
    from vllm.distributed.kv_transfer import (
        get_kv_transfer_group,
        has_kv_transfer_group,
    )

    if not has_kv_transfer_group():
        return None
    agent = get_kv_transfer_group()
    # MultiConnector keeps its children in `_connectors`.
    for connector in (agent, *getattr(agent, "_connectors", ())):
        # LSAConnector's worker role exposes its ResidencyMap as `residency`.
        if isinstance(getattr(connector, "residency", None), ResidencyMap):
            return connector
    return None


def current_residency() -> ResidencyMap | None:
    connector = _lsa_connector()
    return None if connector is None else connector.residency


def mask_nonresident_logits(logits: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """Eq. 6: native indexer logits restricted to resident chunks. [T, S] -> [T, S]."""
    residency = current_residency()
    if residency is None or not residency.any_blocked:
        return logits
    resident = residency.entry_mask(page_table, logits.shape[1])  # [T, S]
    return logits.masked_fill(~resident, float("-inf"))


def drop_nonresident_topk(topk_indices: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """Rewrite top-k picks of non-resident entries to -1, in place. [T, K] -> [T, K]."""
    residency = current_residency()
    if residency is None or not residency.any_blocked:
        return topk_indices
    width = int(page_table.shape[1]) * residency.entries_per_block
    resident = residency.entry_mask(page_table, width)  # [T, width]
    valid = topk_indices >= 0
    picked = topk_indices.clamp(min=0, max=width - 1).long()
    keep = torch.gather(resident, 1, picked) | ~valid  # [T, K]
    topk_indices.masked_fill_(~keep, -1)
    return topk_indices


def memory_indexer_req_ids() -> tuple[str, ...]:
    """Requests whose Memory Indexer scores the scheduler needs after this forward."""
    connector = _lsa_connector()
    return () if connector is None else connector.memory_indexer_req_ids


def memory_indexer_targets() -> tuple[RefreshTarget, ...]:
    """The same requests, addressed by first indexer block id and sequence length."""
    connector = _lsa_connector()
    return () if connector is None else connector.memory_indexer_targets


def held_key_blocks(req_id: str, cache_name: str) -> tuple[int | None, dict[int, Any]]:
    """(null block id, stored K^IComp blocks by row position) of one request.

    With block return an evicted chunk's row positions hold the null block; the
    Memory Indexer reads those positions' keys from the connector instead.
    (None, {}) without an LSAConnector or without block return.
    """
    connector = _lsa_connector()
    if connector is None:
        return None, {}
    return connector.held_key_blocks(req_id, cache_name)


def publish_memory_indexer_scores(
    req_id: str, entry_scores: torch.Tensor, threshold: float, entries_per_chunk: int
) -> None:
    """Hand one request's Memory Indexer scores (Eq. 4, max over layers) to the
    connector. entry_scores: [n_entries] float sigmoid scores of the request's
    compressed CSA entries."""
    connector = _lsa_connector()
    if connector is None:
        return
    n_chunks = -(-entry_scores.numel() // entries_per_chunk)
    chunk = chunk_scores_from_entries(entry_scores.float().cpu(), entries_per_chunk, n_chunks)
    selected = int((entry_scores >= threshold).sum())
    connector.record_memory_indexer_scores(req_id, tuple(chunk.tolist()), selected)


def lsa_config_of(vllm_config: Any) -> LSAConfig | None:
    """The LSAConfig when the engine's KV connector is the LSAConnector, else None."""
    from vllm_flashmemory.vllm import CONNECTOR_NAME

    kv = vllm_config.kv_transfer_config
    if kv is None or kv.kv_connector != CONNECTOR_NAME:
        return None
    return LSAConfig.from_extra_config(extra_config_of(vllm_config))


# req_id -> (tokens so far, per Memory Indexer layer: (hidden [D], keys [N, Dh]) or None)
PendingScores = dict[str, tuple[int, list[tuple[torch.Tensor, torch.Tensor] | None]]]


def score_and_publish(indexer: MemoryIndexer, pending: PendingScores, cfg: LSAConfig) -> int:
    """Score every request whose Memory Indexer layers were all captured in this
    forward (Eq. 4, layers combined by Eq. 13) and publish; returns how many."""
    published = 0
    for req_id, (num_tokens, per_slot) in pending.items():
        if any(x is None for x in per_slot):
            continue
        n = min(keys.shape[0] for _, keys in per_slot)
        if n == 0:
            continue
        hidden = torch.stack([h for h, _ in per_slot])[:, None, :]  # [L, 1, D]
        keys = torch.stack([k[:n] for _, k in per_slot])  # [L, N, Dh]
        position = torch.tensor([num_tokens - 1], device=hidden.device)  # [1]
        with torch.no_grad():
            scores = indexer(hidden, position, keys)  # [L, 1, N]  Eq. 4
        entry_scores = combine_layers_ref(scores, cfg.routing)[0]  # [N]  Eq. 13
        publish_memory_indexer_scores(req_id, entry_scores, cfg.threshold, cfg.entries_per_chunk)
        published += 1
    return published


__all__ = [
    "PendingScores",
    "current_residency",
    "drop_nonresident_topk",
    "held_key_blocks",
    "lsa_config_of",
    "mask_nonresident_logits",
    "memory_indexer_req_ids",
    "memory_indexer_targets",
    "publish_memory_indexer_scores",
    "score_and_publish",
]
