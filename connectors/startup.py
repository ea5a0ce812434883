"""The LSA connector's one translation point from vLLM configuration.

`build_lsa_startup(vllm_config, kv_cache_config)` reads `lsa.*` through
`LSAConfig.from_extra_config` (the only reader of those keys), finds the CSA caches,
checks the Memory Indexer checkpoint against the model and sizes the cold pool.
Every problem raises before serving starts, naming the key, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_flashmemory.connectors.layout import CSALayout, build_csa_layout
from vllm_flashmemory.core.cold_pool import ColdPoolConfig
from vllm_flashmemory.core.config import LSAConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

_GIB = 1 << 30


@dataclass(frozen=True)
class LSAStartup:
    """Everything both connector halves derive from vLLM's configuration."""

    config: LSAConfig
    layout: CSALayout
    cold_pool: ColdPoolConfig
    max_model_len: int

    @property
    def chunks_per_max_len_request(self) -> int:
        return -(-self.max_model_len // self.config.chunk_tokens)

    @property
    def max_concurrency(self) -> float:
        """Requests of `max_model_len` tokens whose chunks the cold pool holds at once."""
        return self.cold_pool.capacity_chunks / self.chunks_per_max_len_request


def extra_config_of(vllm_config: VllmConfig) -> dict[str, Any]:
    kv = vllm_config.kv_transfer_config
    return dict(kv.kv_connector_extra_config or {}) if kv is not None else {}


def build_lsa_startup(
    vllm_config: VllmConfig,
    kv_cache_config: KVCacheConfig,
    *,
    check_indexer_checkpoint: bool = True,
) -> LSAStartup:
    config = LSAConfig.from_extra_config(extra_config_of(vllm_config))
    layout = build_csa_layout(kv_cache_config, config)
    if check_indexer_checkpoint:
        check_memory_indexer(config, vllm_config)
    cold_pool = ColdPoolConfig(capacity_gib=config.cold_pool_gib, chunk_bytes=layout.chunk_bytes)
    startup = LSAStartup(
        config, layout, cold_pool, int(vllm_config.model_config.max_model_len)
    )
    need = startup.chunks_per_max_len_request
    if cold_pool.capacity_chunks < need:
        need_gib = need * cold_pool.slot_bytes / _GIB
        raise ValueError(
            f"'lsa.cold_pool_gib'={config.cold_pool_gib} holds "
            f"{cold_pool.capacity_chunks} chunks of {layout.chunk_bytes} bytes, but one "
            f"request of max_model_len={startup.max_model_len} tokens has {need} "
            f"chunks of {config.chunk_tokens} tokens; raise 'lsa.cold_pool_gib' to at "
            f"least {need_gib:.4f}, or lower --max-model-len."
        )
    return startup


def check_memory_indexer(config: LSAConfig, vllm_config: VllmConfig) -> None:
    """Refuse a missing or mismatched Memory Indexer checkpoint before serving."""
    if config.indexer_path is None:
        if config.threshold > 0:
            raise ValueError(
                f"'lsa.indexer_path' is not set but 'lsa.threshold'={config.threshold} "
                "needs Memory Indexer scores; set 'lsa.indexer_path' to a checkpoint "
                "written by `flashmemory train` (or the published retriever), or set "
                "'lsa.threshold' to 0 to keep every chunk resident."
            )
        return
    from vllm_flashmemory.core.memory_indexer import MemoryIndexer

    MemoryIndexer.load(config.indexer_path, expected=expected_indexer_config(config, vllm_config))


def expected_indexer_config(config: LSAConfig, vllm_config: VllmConfig) -> Any:
    """The Memory Indexer geometry this model needs (hidden size, K^IComp, RoPE)."""
    from vllm_flashmemory.core.memory_indexer import MemoryIndexerConfig

    hf = vllm_config.model_config.hf_config
    rope = dict(getattr(hf, "rope_scaling", None) or getattr(hf, "rope_parameters", None) or {})
    values: dict[str, Any] = {
        "hidden_size": int(hf.hidden_size),
        "head_dim": int(getattr(hf, "index_head_dim", 128)),
        "rope_dim": int(getattr(hf, "qk_rope_head_dim", 64)),
        "rope_theta": float(getattr(hf, "compress_rope_theta", 160000.0)),
        "layer_ids": tuple(config.indexer_layers),
    }
    if rope.get("factor") is not None:
        values["rope_factor"] = float(rope["factor"])
    if rope.get("original_max_position_embeddings") is not None:
        values["rope_original_max_position"] = int(rope["original_max_position_embeddings"])
    if rope.get("beta_fast") is not None:
        values["rope_beta_fast"] = float(rope["beta_fast"])
    if rope.get("beta_slow") is not None:
        values["rope_beta_slow"] = float(rope["beta_slow"])
    return MemoryIndexerConfig.from_values(**values)


__all__ = ["LSAStartup", "build_lsa_startup", "check_memory_indexer"]
