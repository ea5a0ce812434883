"""LSACache: a transformers DeepSeek-V4 cache whose historical CSA chunks really move.

transformers keeps, per CSA layer, the compressed main KV (`C^Comp`, [1, T, 512]) and
the native indexer keys (`K^IComp`, [1, T, 128]) as growing tensors. This cache adds
residency on top: `pack_chunks` reads one chunk's entries of every CSA layer (main KV
and indexer keys together, DESIGN.md "The chunk") into an opaque uint8 row for the
ColdPool / HotPool; `evict` overwrites the entries of evicted chunks in the live
tensors with `cold_fill` (zeros by default; tests poison them) and marks them cold;
`restore` writes fetched bytes back bit-exactly. Every tensor lives on the model's
device (the device of the cache's own tensors). Entry indices never shift, so the
native indexer's positions stay valid; `ResidencyHooks` (hooks.py) keeps cold entries
out of the native top-k (Eq. 6) and out of attention.

The Memory Indexer reads K^IComp of its own layers for *every* chunk each refresh
(DESIGN.md: those keys are always resident), so `evict` keeps a copy of those layers'
keys of the evicted entries and `memory_indexer_keys` serves the full key set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DeepseekV4Config, DynamicCache

from vllm_flashmemory.core.config import CSA_COMPRESS_RATIO

CSA_LAYER_TYPE = "compressed_sparse_attention"
# Entry names transformers uses inside DeepseekV4CSACache's dicts; read only here.
_MAIN, _INDEXER = "compressor", "indexer"


def csa_layer_ids(config: DeepseekV4Config) -> tuple[int, ...]:
    """Decoder layer ids of the CSA layers, in model order."""
    return tuple(i for i, t in enumerate(config.layer_types) if t == CSA_LAYER_TYPE)


class LSACache(DynamicCache):
    """DynamicCache of a DeepSeek-V4 model plus per-chunk residency of its CSA KV."""

    def __init__(
        self,
        config: DeepseekV4Config,
        *,
        chunk_tokens: int,
        memory_indexer_slots: Sequence[int] = (),
        cold_fill: float = 0.0,
    ) -> None:
        super().__init__(config=config)
        if chunk_tokens % CSA_COMPRESS_RATIO or chunk_tokens < CSA_COMPRESS_RATIO:
            raise ValueError(
                f"chunk_tokens={chunk_tokens} must be a positive multiple of "
                f"{CSA_COMPRESS_RATIO} (whole compressed entries); use a power of two."
            )
        self.csa_layers: tuple[int, ...] = csa_layer_ids(config)
        if not self.csa_layers:
            raise ValueError(
                "the model config has no compressed_sparse_attention layer, so there "
                "is no CSA chunk to offload; use a DeepSeek-V4 config with CSA layers."
            )
        bad = [s for s in memory_indexer_slots if not 0 <= s < len(self.csa_layers)]
        if bad:
            raise ValueError(
                f"memory_indexer_slots={list(memory_indexer_slots)} holds {bad}; each "
                f"must index the model's {len(self.csa_layers)} CSA layers."
            )
        self.chunk_tokens: int = chunk_tokens
        self.entries_per_chunk: int = chunk_tokens // CSA_COMPRESS_RATIO
        self.main_dim: int = config.head_dim
        self.index_dim: int = config.index_head_dim
        self.memory_indexer_slots: tuple[int, ...] = tuple(memory_indexer_slots)
        self.cold_fill: float = float(cold_fill)
        self._cold_chunks: set[int] = set()
        # Per Memory Indexer slot: K^IComp of every entry as last seen resident,
        # [T_saved, Dk]; only rows of cold entries are ever read from it.
        self._saved_keys: list[torch.Tensor | None] = [None] * len(
            self.memory_indexer_slots
        )
        # entry_resident_mask cache: (n_entries, residency version) -> mask on the
        # cache's device; the hooks ask for it once per CSA layer per forward.
        self._version = 0
        self._mask_key: tuple[int, int] | None = None
        self._mask: torch.Tensor | None = None

    # ---- geometry -----------------------------------------------------------------

    @property
    def dtype_bytes(self) -> int:
        return self._main(0).element_size()

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk over all CSA layers, main KV + indexer keys, as stored."""
        per_entry = (self.main_dim + self.index_dim) * self.dtype_bytes
        return self.entries_per_chunk * len(self.csa_layers) * per_entry

    @property
    def n_entries(self) -> int:
        """Compressed CSA entries emitted so far (equal in every CSA layer)."""
        return int(self._main(0).shape[1])

    @property
    def cold_chunks(self) -> frozenset[int]:
        return frozenset(self._cold_chunks)

    @property
    def has_cold(self) -> bool:
        """Whether any chunk is cold (a host-side check: no device sync)."""
        return bool(self._cold_chunks)

    @property
    def device(self) -> torch.device:
        """Device of the cache's tensors (the model's); CPU before any entry."""
        try:
            t = self._layer(0).compressed_kv[_MAIN]
        except (IndexError, AttributeError, KeyError):  # no forward has run yet
            t = None
        return torch.device("cpu") if t is None else t.device

    def entry_resident_mask(self, n_entries: int | None = None) -> torch.Tensor:
        """bool [n_entries] on the cache's device: False for entries of cold chunks.

        Built once per (n_entries, residency change) from the host-side cold set, so
        the per-layer hooks neither loop over chunks nor sync the device. The tensor
        is shared between calls: do not modify it in place.
        """
        n = self.n_entries if n_entries is None else n_entries
        key = (n, self._version)
        if self._mask_key != key or self._mask is None:
            e = self.entries_per_chunk
            n_chunks = -(-n // e)
            chunk_ok = torch.ones(n_chunks, dtype=torch.bool)
            cold = [c for c in self._cold_chunks if c < n_chunks]
            if cold:
                chunk_ok[cold] = False
            mask = chunk_ok.repeat_interleave(e)[:n]  # [n]
            self._mask = mask.to(self.device)
            self._mask_key = key
        return self._mask

    # ---- data movement --------------------------------------------------------------

    def pack_chunks(self, chunk_ids: Sequence[int]) -> torch.Tensor:
        """uint8 [n, chunk_bytes]: each chunk's entries of every CSA layer."""
        rows = []
        for c in chunk_ids:
            lo, hi = self._entry_range(c)
            parts = []
            for slot in range(len(self.csa_layers)):
                parts.append(self._main(slot)[0, lo:hi].reshape(-1))  # [E * 512]
                parts.append(self._index(slot)[0, lo:hi].reshape(-1))  # [E * 128]
            rows.append(torch.cat(parts).contiguous().view(torch.uint8))
        if not rows:
            return torch.empty((0, self.chunk_bytes), dtype=torch.uint8, device=self.device)
        return torch.stack(rows)  # [n, chunk_bytes]

    def evict(self, chunk_ids: Sequence[int]) -> None:
        """Drop chunks from the attendable set: fill their entries with `cold_fill`.

        The caller has stored their bytes in the cold pool first (pack_chunks).
        """
        ids = self._check_ids(chunk_ids)
        already = sorted(self._cold_chunks.intersection(ids))
        if already:
            raise ValueError(
                f"chunks {already} are already cold; evict each resident chunk once."
            )
        self._save_memory_indexer_keys()
        for c in ids:
            lo, hi = self._entry_range(c)
            for slot in range(len(self.csa_layers)):
                self._main(slot)[0, lo:hi] = self.cold_fill
                self._index(slot)[0, lo:hi] = self.cold_fill
            self._cold_chunks.add(c)
        self._version += 1

    def restore(self, chunk_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write fetched chunk bytes (uint8 [n, chunk_bytes]) back; they turn resident."""
        ids = self._check_ids(chunk_ids)
        if data.dtype != torch.uint8 or tuple(data.shape) != (len(ids), self.chunk_bytes):
            raise ValueError(
                f"restore got {data.dtype} {tuple(data.shape)}; expected uint8 "
                f"[{len(ids)}, {self.chunk_bytes}] as pack_chunks wrote them."
            )
        not_cold = [c for c in ids if c not in self._cold_chunks]
        if not_cold:
            raise ValueError(
                f"chunks {not_cold} are resident; restore only chunks evicted before."
            )
        dtype = self._main(0).dtype
        e = self.entries_per_chunk
        for row, c in zip(data, ids):
            values = row.contiguous().view(dtype)
            lo, hi = self._entry_range(c)
            off = 0
            for slot in range(len(self.csa_layers)):
                main = values[off : off + e * self.main_dim].view(e, self.main_dim)
                off += e * self.main_dim
                index = values[off : off + e * self.index_dim].view(e, self.index_dim)
                off += e * self.index_dim
                self._main(slot)[0, lo:hi] = main
                self._index(slot)[0, lo:hi] = index
            self._cold_chunks.discard(c)
        self._version += 1

    def memory_indexer_keys(self) -> torch.Tensor:
        """K^IComp of the Memory Indexer's layers over every entry: [L_mi, T, Dk]."""
        cold = ~self.entry_resident_mask()  # [T]
        out = []
        for i, slot in enumerate(self.memory_indexer_slots):
            live = self._index(slot)[0]  # [T, Dk]
            saved = self._saved_keys[i]
            if saved is None or not self._cold_chunks:
                out.append(live.clone())
                continue
            # Cold entries are complete chunks evicted earlier: all < len(saved).
            keep = saved.shape[0]
            keys = live.clone()
            keys[:keep] = torch.where(cold[:keep, None], saved, live[:keep])
            out.append(keys)
        return torch.stack(out)

    # ---- internals ------------------------------------------------------------------

    def _save_memory_indexer_keys(self) -> None:
        cold = ~self.entry_resident_mask()  # [T]
        for i, slot in enumerate(self.memory_indexer_slots):
            live = self._index(slot)[0]  # [T, Dk]
            old = self._saved_keys[i]
            if old is None:
                self._saved_keys[i] = live.clone()
                continue
            keep = old.shape[0]
            # Resident rows are current; cold rows keep their saved copy.
            new = live.clone()
            new[:keep] = torch.where(cold[:keep, None], old, live[:keep])
            self._saved_keys[i] = new

    def _layer(self, slot: int):
        return self.layers[self.csa_layers[slot]]

    def _main(self, slot: int) -> torch.Tensor:
        t = self._layer(slot).compressed_kv[_MAIN]
        if t is None:
            raise RuntimeError(
                "the CSA cache holds no compressed entries yet; prefill the prompt "
                "before moving chunks."
            )
        return t  # [1, T, D]

    def _index(self, slot: int) -> torch.Tensor:
        t = self._layer(slot).compressed_kv[_INDEXER]
        assert t is not None, "indexer keys exist whenever main entries do"
        return t  # [1, T, Dk]

    def _entry_range(self, chunk_id: int) -> tuple[int, int]:
        lo = chunk_id * self.entries_per_chunk
        hi = lo + self.entries_per_chunk
        if hi > self.n_entries:
            raise ValueError(
                f"chunk {chunk_id} spans entries [{lo}, {hi}) but only "
                f"{self.n_entries} are written; only complete chunks move."
            )
        return lo, hi

    def _check_ids(self, chunk_ids: Sequence[int]) -> list[int]:
        ids = [int(c) for c in chunk_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"chunk ids {ids} repeat an id; pass each chunk once.")
        return ids


__all__ = ["LSACache", "csa_layer_ids", "CSA_LAYER_TYPE"]
