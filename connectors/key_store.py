"""`IndexerKeyStore`: the Memory Indexer layers' K^IComp of every stored chunk.

A refresh scores every chunk of a request with the Memory Indexer, which reads
the native indexer keys K^IComp of its `lsa.indexer_layers` (DESIGN: "the Memory
Indexer's own keys ... always resident"). With block return an evicted chunk's
blocks belong to vLLM again, so the worker copies those layers' key blocks here
when it stores the chunk; the model variant reads a hole's keys from here.
Bytes per chunk: `len(lsa.indexer_layers) x blocks_per_chunk x 64 x 132` B on
DeepSeek-V4 (8.4 KB per layer-block), held in host memory beside the cold pool.
"""

from __future__ import annotations

import torch


class IndexerKeyStore:
    """request -> indexer cache name -> block position in the request's row -> bytes."""

    def __init__(self, cache_names: tuple[str, ...]) -> None:
        # Indexer caches (`model.layers.<i>.attn.indexer.k_cache`) of the Memory
        # Indexer's layers; others are never read at refresh time.
        self.cache_names = cache_names
        self._keys: dict[str, dict[str, dict[int, torch.Tensor]]] = {}

    def put(
        self,
        req_id: str,
        block_index: int,
        caches: dict[str, torch.Tensor],
        block_id: int,
    ) -> None:
        """Copy block `block_id` of each key cache as the request's block `block_index`."""
        per_cache = self._keys.setdefault(req_id, {})
        for name in self.cache_names:
            per_cache.setdefault(name, {})[block_index] = caches[name][block_id].clone()

    def blocks(self, req_id: str, cache_name: str) -> dict[int, torch.Tensor]:
        """The stored key blocks of one request and cache, by row position."""
        return self._keys.get(req_id, {}).get(cache_name, {})

    def free_request(self, req_id: str) -> None:
        self._keys.pop(req_id, None)

    @property
    def num_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for per_cache in self._keys.values()
            for blocks in per_cache.values()
            for t in blocks.values()
        )


__all__ = ["IndexerKeyStore"]
