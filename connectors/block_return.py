"""Scheduler side of block return: evicted CSA chunks give their blocks to vLLM.

`CSABlockReturn` wraps the `LSACSAManager` of the CSA kv-cache group (found
through `LSAConnector.bind_kv_cache_manager`, the hook vLLM's scheduler calls
once after building its cache manager) and keeps, per request, the positions of
the CSA block-table row that differ from what vLLM's worker holds: holes (the
null block) and restored chunks (new ids). It edits the request's block-id list
that the scheduler half keeps, so every `ChunkBlocks` built after it names the
chunk's current blocks.

Ordering that keeps bytes safe (the worker runs a step's stores, then evictions,
then fetches, for all requests): a chunk is only evicted after its store was
shipped (same step or earlier), so its bytes are in the cold pool before vLLM
can hand its blocks to anyone; a freed block reused in the same step by another
request's restore is written in the worker's fetch phase, after the store phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm_flashmemory.connectors.types import BlockTablePatch

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_flashmemory.vllm.kv_spec import LSACSAManager

logger = init_logger(__name__)


def find_lsa_csa_manager(
    kv_cache_manager: KVCacheManager, csa_group_ids: Sequence[int]
) -> LSACSAManager | None:
    """The manager of the CSA group, or None when the CSA caches are not split off.

    None means the model variant did not report `LSACSASpec` (e.g. a platform
    without the variant): LSA then masks evicted chunks and frees nothing.
    """
    from vllm_flashmemory.vllm.kv_spec import LSACSAManager

    managers = [
        m
        for m in kv_cache_manager.coordinator.single_type_managers
        if isinstance(m, LSACSAManager)
    ]
    if len(managers) != 1 or [managers[0].kv_cache_group_id] != list(csa_group_ids):
        logger.warning(
            "LSA: the CSA caches are not in one LSACSASpec kv-cache group (CSA "
            "groups %s, LSA managers of groups %s); evicted chunks are masked but "
            "their blocks stay allocated.",
            list(csa_group_ids),
            [m.kv_cache_group_id for m in managers],
        )
        return None
    return managers[0]


class CSABlockReturn:
    """Holes and restores in the CSA block lists of running requests."""

    def __init__(self, manager: LSACSAManager) -> None:
        self.manager = manager
        self.null_block_id = int(manager.block_pool.null_block.block_id)
        # request -> {row position: block id it holds now, unknown to vLLM's worker}
        self._overrides: dict[str, dict[int, int]] = {}
        # Blocks handed back after a failed fetch (see `return_failed`).
        self._released: list[int] = []

    def evict(self, req_id: str, block_ids: list[int], indices: Sequence[int]) -> None:
        """Free the blocks at `indices` of the request; `block_ids` is edited in place."""
        freed = self.manager.punch_holes(req_id, indices)
        assert freed == [block_ids[i] for i in indices], (freed, indices)
        overrides = self._overrides.setdefault(req_id, {})
        for i in indices:
            block_ids[i] = self.null_block_id
            overrides[i] = self.null_block_id

    def restore(self, req_id: str, block_ids: list[int], indices: Sequence[int]) -> bool:
        """Fresh blocks for the holes at `indices`, all or none (False: pool short)."""
        new = self.manager.fill_holes(req_id, indices)
        if new is None:
            return False
        overrides = self._overrides.setdefault(req_id, {})
        for i, block in zip(indices, new):
            block_ids[i] = block
            overrides[i] = block
        return True

    def return_failed(self, req_id: str, block_ids: list[int], indices: Sequence[int]) -> None:
        """A fetch into fresh blocks failed: hole them again, and unmask them later."""
        if req_id not in self.manager.req_to_blocks:
            return  # preempted meanwhile: vLLM already freed every block
        live = [i for i in indices if block_ids[i] != self.null_block_id]
        self._released.extend(block_ids[i] for i in live)
        self.evict(req_id, block_ids, live)

    def take_released(self) -> tuple[int, ...]:
        released, self._released = tuple(self._released), []
        return released

    def patch(self, req_id: str, block_ids: list[int]) -> BlockTablePatch | None:
        """Every difference of the request's row from vLLM's view, or None."""
        overrides = self._overrides.get(req_id)
        if not overrides:
            return None
        anchor = len(block_ids) - 1
        assert anchor not in overrides, "the last CSA block is never evicted"
        indices = tuple(sorted(overrides))
        return BlockTablePatch(
            req_id=req_id,
            anchor_block_index=anchor,
            anchor_block_id=block_ids[anchor],
            block_indices=indices,
            block_ids=tuple(overrides[i] for i in indices),
        )

    def forget(self, req_id: str) -> None:
        """The request ended or was preempted: vLLM frees its blocks (holes skipped)."""
        self._overrides.pop(req_id, None)

    def num_holes(self) -> int:
        """Blocks currently handed back to vLLM by all running requests."""
        return sum(
            1
            for overrides in self._overrides.values()
            for b in overrides.values()
            if b == self.null_block_id
        )


__all__ = ["CSABlockReturn", "find_lsa_csa_manager"]
