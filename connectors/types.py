"""Messages between the LSA connector's scheduler and worker halves.

Scheduler -> worker: `LSAConnectorMetadata`, built once per step by
`LSAConnectorScheduler.build_connector_meta`. Worker -> scheduler:
`LSAConnectorWorkerMetadata`, returned by `build_connector_worker_meta` and
merged over workers by vLLM before `update_connector_output`.

A chunk is addressed by (request id, chunk index); its device location is one
`ChunkBlocks`: for each CSA kv-cache group the connector moves (main compressed
KV and native indexer keys may sit in different groups), the block ids that hold
the chunk's entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(frozen=True)
class ChunkBlocks:
    """Device blocks of one CSA chunk of one request."""

    chunk_id: int
    # One entry per CSA kv-cache group, in `CSAGroupLayout.group_ids` order: the
    # block ids (blocks_per_chunk of them) that hold this chunk's entries.
    block_ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class LSARequestStep:
    """What the worker does for one request before this step's forward."""

    req_id: str
    # Completed chunks whose bytes go to the cold pool (their blocks are still
    # intact: the chunk finished in an earlier forward).
    store: tuple[ChunkBlocks, ...] = ()
    # Chunks selected by the last refresh: cold pool -> their device blocks.
    fetch: tuple[ChunkBlocks, ...] = ()
    # Chunks that stop being attendable from this step on.
    evict: tuple[ChunkBlocks, ...] = ()
    # Cold-pool chunks to reserve for this request (admission; 0 = unchanged).
    reserve_chunks: int = 0


@dataclass(frozen=True)
class RefreshTarget:
    """Where the model variant finds one request whose Memory Indexer scores are due.

    The worker does not know the model runner's batch order, so a request is named
    by what the attention metadata carries: the physical id of one of its blocks
    in the native indexer's kv-cache group, at a position that is never a hole
    (its last block: decode chunks are always resident; ids are unique among live
    requests because LSA serves without prefix caching), and its sequence length
    after this step's forward.
    """

    req_id: str
    anchor_block_id: int
    num_tokens: int
    # Position of `anchor_block_id` in the request's block-table row.
    anchor_block_index: int = 0


@dataclass(frozen=True)
class BlockTablePatch:
    """Where a request's CSA block-table row differs from what vLLM's runner holds.

    vLLM's worker block tables are append-only; evicted chunks hold the null
    block and restored chunks hold new block ids, which only the connector knows.
    The scheduler ships every difference every step the request runs (so a row
    the runner rebuilt from its own bookkeeping is corrected too); the worker
    writes them into the step's attention metadata before the forward.
    """

    req_id: str
    # A never-holed block of the request (its last), to find its batch row.
    anchor_block_index: int
    anchor_block_id: int
    # Row positions and the block ids they hold now (the null block id = a hole).
    block_indices: tuple[int, ...]
    block_ids: tuple[int, ...]


@dataclass
class LSAConnectorMetadata(KVConnectorMetadata):
    """One step's plan: per-request store/fetch/evict sets and finished requests."""

    requests: tuple[LSARequestStep, ...] = ()
    # Requests whose cold-pool chunks and residency state are freed this step.
    finished_req_ids: tuple[str, ...] = ()
    # Requests whose Memory Indexer selection the worker should report after
    # this step's forward (a τ boundary or the end of prefill).
    refresh_req_ids: tuple[str, ...] = ()
    # The same requests, addressed for the model variant (see RefreshTarget).
    refresh_targets: tuple[RefreshTarget, ...] = ()
    # Block return (None: evicted chunks are only masked, blocks stay allocated).
    # vLLM's null block id: what a hole in a CSA block-table row holds.
    null_block_id: int | None = None
    block_table_patches: tuple[BlockTablePatch, ...] = ()
    # Blocks that went back to vLLM's pool after a failed fetch into them: the
    # worker drops their mask before vLLM hands them to another request.
    released_block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChunkSelection:
    """Memory Indexer output for one request (Eq. 5/13): chunks the next τ tokens need."""

    req_id: str
    # [n_chunks] max Memory Indexer score (Eq. 4, OR/max over indexer layers,
    # Eq. 13) over each chunk's entries; the planner thresholds it (Eq. 5).
    chunk_scores: tuple[float, ...]
    # Compressed entries at or above the threshold, for entry-level reports.
    num_selected_entries: int = 0


@dataclass
class LSAConnectorWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: selections, and requests whose fetch failed."""

    selections: dict[str, ChunkSelection] = field(default_factory=dict)
    failed_fetch_req_ids: tuple[str, ...] = ()

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LSAConnectorWorkerMetadata)
        # Every worker (tensor-parallel rank) scores the same requests; the max
        # keeps a chunk any rank needs, and any rank's failure is a failure.
        merged = dict(self.selections)
        for req_id, sel in other.selections.items():
            mine = merged.get(req_id)
            if mine is None:
                merged[req_id] = sel
            else:
                n = max(len(mine.chunk_scores), len(sel.chunk_scores))
                pad = (-float("inf"),)
                merged[req_id] = ChunkSelection(
                    req_id,
                    tuple(
                        max((mine.chunk_scores + pad * n)[i], (sel.chunk_scores + pad * n)[i])
                        for i in range(n)
                    ),
                    max(mine.num_selected_entries, sel.num_selected_entries),
                )
        failed = tuple(sorted({*self.failed_fetch_req_ids, *other.failed_fetch_req_ids}))
        return LSAConnectorWorkerMetadata(merged, failed)


__all__ = [
    "BlockTablePatch",
    "ChunkBlocks",
    "ChunkSelection",
    "LSAConnectorMetadata",
    "LSAConnectorWorkerMetadata",
    "LSARequestStep",
    "RefreshTarget",
]
