"""Tests of the one footprint definition (core/footprint.py, DESIGN.md "Footprint").

Scenarios:
- a DeepSeek-V4-Flash chunk moves ~21 x 45.8 KB (DESIGN.md "The chunk");
- hand-computed bytes of a 1024-token request: full KV, HCA + SWA fixed part;
- the full-KV baseline (everything resident, no Memory Indexer keys) equals full;
- LSA with everything resident adds no indexer-key bytes (they are already resident);
- a sparse request counts the Memory Indexer's keys of its cold entries;
- Footprint ratios, the empty case, and summing requests with `+`;
- bad input: negative or inconsistent counts, indexer layers beyond the CSA layers;
- a zero compress ratio, chunk_tokens=0 and entries that cannot fit in the resident
  chunks are refused with a ValueError that names the value.
"""

from __future__ import annotations

import pytest

from vllm_flashmemory.core.footprint import Footprint, KVGeometry, request_footprint

FLASH = KVGeometry()
PER_ENTRY = 21 * (584 + 132)  # main KV + indexer key over the 21 CSA layers


def test_flash_chunk_bytes_match_design() -> None:
    assert FLASH.csa_bytes_per_entry == PER_ENTRY
    chunk = FLASH.chunk_bytes(64)
    assert chunk == 64 * PER_ENTRY == 962_304
    assert chunk / 21 == pytest.approx(45.8e3, rel=0.01)


def test_hand_computed_request() -> None:
    # 1024 tokens: 256 CSA entries (m = 4), 8 HCA entries (m' = 128), window 128.
    fixed = 8 * 20 * 584 + 128 * 43 * 584
    assert FLASH.fixed_bytes(1024) == fixed
    full = request_footprint(
        FLASH, 1024, 256, 256, 4, memory_indexer_keys_resident=False
    )
    assert full.kv_bytes_full == 256 * PER_ENTRY + fixed
    assert full.kv_bytes_gpu == full.kv_bytes_full and full.kv_bytes_ratio == 1.0
    assert (full.resident_chunks, full.total_chunks) == (4, 4)


def test_everything_resident_adds_no_indexer_key_bytes() -> None:
    lsa = request_footprint(FLASH, 1024, 256, 256, 4)
    assert lsa.kv_bytes_gpu == lsa.kv_bytes_full


def test_sparse_request_counts_memory_indexer_keys_of_cold_entries() -> None:
    # One of four chunks resident: 64 resident entries, 192 cold.
    sparse = request_footprint(FLASH, 1024, 256, 64, 1)
    fixed = FLASH.fixed_bytes(1024)
    assert sparse.kv_bytes_gpu == 64 * PER_ENTRY + fixed + 192 * 3 * 132
    baseline = request_footprint(
        FLASH, 1024, 256, 64, 1, memory_indexer_keys_resident=False
    )
    assert sparse.kv_bytes_gpu - baseline.kv_bytes_gpu == 192 * 3 * 132
    assert sparse.resident_chunk_ratio == 0.25


def test_partial_last_chunk_counts_as_a_chunk() -> None:
    fp = request_footprint(FLASH, 257, 256, 64, 1)  # 2 chunks, 64 entries
    assert fp.total_chunks == 2 and fp.resident_chunk_ratio == 0.5


def test_footprint_sum_and_ratios() -> None:
    a = Footprint(1, 4, 10, 40)
    b = Footprint(3, 4, 30, 40)
    total = a + b
    assert total == Footprint(4, 8, 40, 80)
    assert total.resident_chunk_ratio == 0.5 and total.kv_bytes_ratio == 0.5
    empty = Footprint(0, 0, 0, 0)
    assert empty.resident_chunk_ratio == 1.0 and empty.kv_bytes_ratio == 1.0


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="must all be non-negative"):
        request_footprint(FLASH, -1, 256, 0, 0)
    with pytest.raises(ValueError, match="resident_entries=300 exceeds the 256"):
        request_footprint(FLASH, 1024, 256, 300, 4)
    with pytest.raises(ValueError, match="resident_chunks=5 exceeds the 4 chunks"):
        request_footprint(FLASH, 1024, 256, 256, 5)
    with pytest.raises(ValueError, match="n_csa_layers=-1 must be a non-negative"):
        KVGeometry(n_csa_layers=-1)
    with pytest.raises(ValueError, match="n_memory_indexer_layers=4 exceeds"):
        KVGeometry(n_csa_layers=3, n_memory_indexer_layers=4)


def test_zero_compress_ratio_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="csa_compress_ratio=0 must be at least 1"):
        KVGeometry(csa_compress_ratio=0)


def test_zero_chunk_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="chunk_tokens=0 must be a positive integer"):
        request_footprint(FLASH, 1024, 0, 0, 0)


def test_entries_must_fit_in_resident_chunks() -> None:
    with pytest.raises(ValueError, match="resident_entries=64 cannot fit"):
        request_footprint(FLASH, 1024, 256, 64, 0)
