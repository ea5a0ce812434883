"""The residency map the native indexer's top-k respects (paper Eq. 6).

The worker half owns one `ResidencyMap` per engine: a bool per physical block of
the CSA kv-cache group, True where the block holds an evicted chunk. It is indexed
by *physical block id*, not by request or batch row, so a top-k implementation that
already walks the block table (every paged indexer does) needs no batch-order
bookkeeping: `blocked = non_resident_blocks[block_table]`.

Reached from model code through vLLM's own worker-side accessor
(`vllm.distributed.kv_transfer.get_kv_transfer_group()`), never a new global; see
`vllm_flashmemory/vllm/model_variant.py` for the model-side contract.
"""

from __future__ import annotations

import torch


class ResidencyMap:
    """Non-resident CSA blocks of the engine, plus Memory Indexer score requests."""

    def __init__(self, num_blocks: int, entries_per_block: int, device: torch.device) -> None:
        # [num_blocks] True = evicted: the block's entries are not attendable.
        self.non_resident_blocks = torch.zeros(num_blocks, dtype=torch.bool, device=device)
        # Compressed CSA entries per block (256 tokens / m=4 = 64 on DeepSeek-V4).
        self.entries_per_block = entries_per_block
        self._num_blocked = 0

    @property
    def any_blocked(self) -> bool:
        """False when everything is resident: callers skip masking entirely."""
        return self._num_blocked > 0

    def block(self, block_ids: list[int]) -> None:
        if block_ids:
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.non_resident_blocks.device)
            self.non_resident_blocks[idx] = True
            self._num_blocked = int(self.non_resident_blocks.sum())

    def unblock(self, block_ids: list[int]) -> None:
        if block_ids:
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.non_resident_blocks.device)
            self.non_resident_blocks[idx] = False
            self._num_blocked = int(self.non_resident_blocks.sum())

    def entry_mask(self, block_table: torch.Tensor, num_entries: int) -> torch.Tensor:
        """Eq. 6's support: True where a local compressed entry may be selected.

        block_table: [R, max_blocks] int physical block ids (rows: tokens or
        requests; padding ids must be valid indices, as vLLM's are).
        Returns [R, num_entries] bool.
        """
        resident = ~self.non_resident_blocks[block_table.long()]  # [R, max_blocks]
        per_entry = resident.repeat_interleave(self.entries_per_block, dim=1)
        if per_entry.shape[1] < num_entries:
            pad = per_entry.new_ones(per_entry.shape[0], num_entries - per_entry.shape[1])
            per_entry = torch.cat([per_entry, pad], dim=1)
        return per_entry[:, :num_entries]  # [R, num_entries]


__all__ = ["ResidencyMap"]
