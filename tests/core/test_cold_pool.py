"""ColdPool: admission, storage and release of CSA chunks, on both backends.

Scenarios:
- config validation: chunk_bytes, capacity_gib (non-positive, NaN, bool, too small
  for one chunk, with the size to use), backend, pin_memory; pin_memory=True on a
  machine without CUDA;
- capacity arithmetic: chunks rounded to 64 bytes, same count on both backends;
- round trip: chunks put in one order come back bit-exact in any order, into a
  fresh tensor or a caller's `out`;
- admission: reserve is a total (idempotent), a request that does not fit raises
  ColdPoolFullError naming need, free space and 'lsa.cold_pool_gib', and leaves
  the pool unchanged;
- filling to exact capacity never loses a chunk: every chunk reads back, the
  backend's arena holds exactly capacity x slot bytes, and freeing one request
  readmits another without touching the survivor's bytes;
- misuse raises with a message: put beyond the reservation (nothing stored), put
  or get for an unknown request, get of a missing chunk, double free, duplicate
  ids, wrong dtype or shape, use after close;
- re-putting a chunk replaces its bytes without consuming reservation;
- LMCache wrapper: two pools in one process do not share keys, request ids that
  share a prefix do not collide, a copy that fails mid-batch leaves nothing staged
  in LMCache's arena, a wrong lmcache version is refused, and importing core does
  not import lmcache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
import subprocess
import sys

import pytest
import torch

from vllm_flashmemory.core.cold_pool import (
    ColdPool,
    ColdPoolConfig,
    ColdPoolFullError,
)

HAS_LMCACHE = importlib.util.find_spec("lmcache") is not None
BACKENDS = [
    pytest.param(
        "lmcache",
        marks=pytest.mark.skipif(
            not HAS_LMCACHE,
            reason="lmcache 0.5.6 is not installed; run scripts/install_lmcache.sh",
        ),
    ),
    "torch",
]
CHUNK_BYTES = 100  # not a multiple of 64: exercises slot rounding
SLOT_BYTES = 128


def _gib(chunks: int) -> float:
    return chunks * SLOT_BYTES / (1 << 30)


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, CHUNK_BYTES), dtype=torch.uint8, generator=g)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def pool(backend: str):
    with ColdPool(ColdPoolConfig(_gib(10), CHUNK_BYTES, backend=backend)) as p:
        yield p


# -- config ----------------------------------------------------------------------


def test_config_rejects_bad_chunk_bytes() -> None:
    with pytest.raises(ValueError, match=r"chunk_bytes=0 must be >= 1"):
        ColdPoolConfig(1.0, 0)
    with pytest.raises(TypeError, match=r"chunk_bytes=1.5 must be an int"):
        ColdPoolConfig(1.0, 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("gib", [0, -1.0, math.nan, math.inf])
def test_config_rejects_non_positive_capacity(gib: float) -> None:
    with pytest.raises(ValueError, match=r"'lsa.cold_pool_gib'=.* positive finite"):
        ColdPoolConfig(gib, 100)


def test_config_rejects_bool_capacity() -> None:
    with pytest.raises(TypeError, match=r"'lsa.cold_pool_gib'=True must be a number"):
        ColdPoolConfig(True, 100)  # type: ignore[arg-type]


def test_config_too_small_for_one_chunk_names_the_size() -> None:
    with pytest.raises(ValueError, match=r"holds no chunk of 1000000 bytes; raise it"):
        ColdPoolConfig(1e-4, 1_000_000)


def test_config_rejects_unknown_backend_and_pin_value() -> None:
    with pytest.raises(ValueError, match=r"backend='redis' must be 'lmcache' or"):
        ColdPoolConfig(1.0, 100, backend="redis")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pin_memory='yes' must be True, False"):
        ColdPoolConfig(1.0, 100, pin_memory="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_pin_memory_without_cuda_raises() -> None:
    with pytest.raises(ValueError, match=r"pin_memory=True needs CUDA"):
        ColdPool(ColdPoolConfig(1.0, 100, pin_memory=True, backend="torch"))


def test_capacity_rounds_chunks_to_64_bytes() -> None:
    cfg = ColdPoolConfig(_gib(10), CHUNK_BYTES)
    assert cfg.slot_bytes == SLOT_BYTES
    assert cfg.capacity_chunks == 10
    # DeepSeek-V4-Flash: 21 CSA layers x 64 entries x (584 + 132) B.
    flash = ColdPoolConfig(16.0, 21 * 64 * (584 + 132))
    assert flash.slot_bytes == 962_304
    assert flash.capacity_chunks == (16 << 30) // 962_304


# -- round trip --------------------------------------------------------------------


def test_round_trip_any_order(pool: ColdPool) -> None:
    data = _rows(4, seed=1)
    assert pool.reserve("r", 4) == 4
    pool.batched_put("r", [7, 3, 11, 0], data)
    got = pool.batched_get("r", [0, 11, 7])
    assert torch.equal(got, data[[3, 2, 0]])
    out = torch.full((2, CHUNK_BYTES), 255, dtype=torch.uint8)
    assert pool.batched_get("r", [3, 7], out=out) is out
    assert torch.equal(out, data[[1, 0]])
    assert pool.contains("r", 11) and not pool.contains("r", 1)
    assert pool.request_chunk_ids("r") == frozenset({0, 3, 7, 11})
    assert not pool.pinned or torch.cuda.is_available()


def test_empty_batches_are_noops(pool: ColdPool) -> None:
    pool.reserve("r", 0)
    pool.batched_put("r", [], torch.empty((0, CHUNK_BYTES), dtype=torch.uint8))
    assert pool.batched_get("r", []).shape == (0, CHUNK_BYTES)
    assert pool.free_request("r") == 0


# -- admission ---------------------------------------------------------------------


def test_reserve_is_a_total_and_idempotent(pool: ColdPool) -> None:
    assert pool.reserve("r", 5) == 5
    assert pool.reserve("r", 3) == 0
    assert pool.reserve("r", 5) == 0
    assert pool.reserve("r", 6) == 1
    assert pool.reservation("r") == 6
    assert pool.stats.free_chunks == 4


def test_full_pool_refuses_with_need_free_and_fix(pool: ColdPool) -> None:
    pool.reserve("a", 8)
    before = pool.stats
    msg = (
        r"cannot admit request 'b': it needs 3 more chunks .* only 2 of 10 chunks .*"
        r"raise 'lsa.cold_pool_gib' \(now .*\) to at least (\S+), or serve"
    )
    with pytest.raises(ColdPoolFullError, match=msg) as info:
        pool.reserve("b", 3)
    # The suggested size is a real fix: it holds all 11 chunks.
    suggested = float(re.search(msg, str(info.value)).group(1))
    assert ColdPoolConfig(suggested, CHUNK_BYTES).capacity_chunks == 11
    assert issubclass(ColdPoolFullError, ValueError)
    assert pool.stats == before
    assert not pool.has_request("b")
    # A growing request is refused the same way and keeps what it had.
    with pytest.raises(ColdPoolFullError, match=r"request 'a': it needs 3 more"):
        pool.reserve("a", 11)
    assert pool.reservation("a") == 8


def test_fill_to_capacity_never_loses_a_chunk(pool: ColdPool) -> None:
    cap = pool.capacity_chunks
    a, b = _rows(6, seed=2), _rows(cap - 6, seed=3)
    pool.reserve("a", 6)
    pool.reserve("b", cap - 6)
    pool.batched_put("a", range(6), a)
    pool.batched_put("b", range(cap - 6), b)
    s = pool.stats
    assert (s.stored_chunks, s.reserved_chunks, s.free_chunks) == (cap, cap, 0)
    assert pool.arena_used_bytes() == cap * SLOT_BYTES
    with pytest.raises(ColdPoolFullError):
        pool.reserve("c", 1)
    assert torch.equal(pool.batched_get("a", range(6)), a)
    assert torch.equal(pool.batched_get("b", range(cap - 6)), b)
    # Finishing one request readmits another; the survivor's bytes are untouched.
    assert pool.free_request("a") == 6
    c = _rows(6, seed=4)
    pool.reserve("c", 6)
    pool.batched_put("c", range(6), c)
    assert torch.equal(pool.batched_get("b", range(cap - 6)), b)
    assert torch.equal(pool.batched_get("c", range(6)), c)
    assert pool.arena_used_bytes() == cap * SLOT_BYTES


# -- misuse --------------------------------------------------------------------------


def test_put_beyond_reservation_stores_nothing(pool: ColdPool) -> None:
    pool.reserve("r", 2)
    pool.batched_put("r", [0], _rows(1, seed=5))
    with pytest.raises(
        ValueError, match=r"exceeds its reservation of 2 .*reserve\('r', 3\)"
    ):
        pool.batched_put("r", [1, 2], _rows(2, seed=6))
    assert pool.request_chunk_ids("r") == frozenset({0})
    assert pool.stats.stored_chunks == 1
    assert pool.arena_used_bytes() == SLOT_BYTES


def test_unknown_request_and_double_free_raise(pool: ColdPool) -> None:
    with pytest.raises(ValueError, match=r"no request 'x': it was never reserved"):
        pool.batched_put("x", [0], _rows(1, seed=7))
    with pytest.raises(ValueError, match=r"no request 'x'"):
        pool.batched_get("x", [0])
    pool.reserve("r", 1)
    pool.batched_put("r", [0], _rows(1, seed=7))
    assert pool.free_request("r") == 1
    with pytest.raises(
        ValueError, match=r"already freed; .*free_request\(req_id\) exactly once"
    ):
        pool.free_request("r")
    assert pool.stats.reserved_chunks == 0 and pool.arena_used_bytes() == 0


def test_get_of_missing_chunk_raises(pool: ColdPool) -> None:
    pool.reserve("r", 2)
    pool.batched_put("r", [0], _rows(1, seed=8))
    with pytest.raises(LookupError, match=r"request 'r' has no stored chunks \[1\]"):
        pool.batched_get("r", [0, 1])


def test_bad_ids_and_tensors_raise(pool: ColdPool) -> None:
    pool.reserve("r", 4)
    with pytest.raises(ValueError, match=r"chunk ids \[2\] appear more than once"):
        pool.batched_put("r", [2, 2], _rows(2, seed=9))
    with pytest.raises(ValueError, match=r"chunk id -1 must lie in \[0, 2\*\*63\)"):
        pool.batched_get("r", [-1])
    with pytest.raises(
        ValueError, match=r"data must be uint8 \[2, 100\].*got torch.int32"
    ):
        pool.batched_put("r", [0, 1], torch.zeros((2, CHUNK_BYTES), dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out must be uint8 \[1, 100\].*\[1, 99\]"):
        pool.batched_get("r", [0], out=torch.zeros((1, 99), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"n_chunks=-1 must be an int >= 0"):
        pool.reserve("r", -1)
    with pytest.raises(TypeError, match=r"request id 3 must be a str"):
        pool.reserve(3, 1)  # type: ignore[arg-type]
    assert pool.stats.stored_chunks == 0


def test_use_after_close_raises(backend: str) -> None:
    pool = ColdPool(ColdPoolConfig(_gib(2), CHUNK_BYTES, backend=backend))
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match=r"ColdPool is closed"):
        pool.reserve("r", 1)


def test_reput_replaces_bytes_without_reservation(pool: ColdPool) -> None:
    pool.reserve("r", 2)
    pool.batched_put("r", [0, 1], _rows(2, seed=10))
    new = _rows(2, seed=11)
    pool.batched_put("r", [1, 0], new)
    assert torch.equal(pool.batched_get("r", [1, 0]), new)
    assert pool.stats.stored_chunks == 2
    assert pool.arena_used_bytes() == 2 * SLOT_BYTES


# -- LMCache wrapper -------------------------------------------------------------


@pytest.mark.skipif(not HAS_LMCACHE, reason="lmcache 0.5.6 is not installed")
def test_lmcache_pools_and_prefix_ids_do_not_collide() -> None:
    cfg = ColdPoolConfig(_gib(4), CHUNK_BYTES, backend="lmcache")
    with ColdPool(cfg) as p1, ColdPool(cfg) as p2:
        x, y = _rows(2, seed=12), _rows(2, seed=13)
        for p, rows in ((p1, x), (p2, y)):
            p.reserve("a", 1)
            p.reserve("a\x00\x00\x00\x01", 1)
            p.batched_put("a", [256], rows[:1])
            p.batched_put("a\x00\x00\x00\x01", [0], rows[1:])
        assert torch.equal(p1.batched_get("a", [256]), x[:1])
        assert torch.equal(p1.batched_get("a\x00\x00\x00\x01", [0]), x[1:])
        assert torch.equal(p2.batched_get("a", [256]), y[:1])


@pytest.mark.skipif(not HAS_LMCACHE, reason="lmcache 0.5.6 is not installed")
def test_lmcache_failed_copy_leaves_nothing_staged() -> None:
    from vllm_flashmemory.core.lmcache_store import LMCacheChunkStore

    class FailingRows:
        def __getitem__(self, i: int) -> torch.Tensor:
            raise RuntimeError("copy failed")

    store = LMCacheChunkStore(4, CHUNK_BYTES, 64, "failed-copy-test")
    try:
        with pytest.raises(RuntimeError, match=r"copy failed"):
            store.batched_put([("r", 0), ("r", 1)], FailingRows())  # type: ignore[arg-type]
        assert store.arena_used_bytes() == 0
        rows = _rows(4, seed=14)
        store.batched_put([("r", c) for c in range(4)], rows)  # all 4 still fit
        out = torch.empty_like(rows)
        store.batched_get([("r", c) for c in range(4)], out)
        assert torch.equal(out, rows)
    finally:
        store.close()


@pytest.mark.skipif(not HAS_LMCACHE, reason="lmcache 0.5.6 is not installed")
def test_lmcache_wrong_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_flashmemory.core import lmcache_store

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.7")
    with pytest.raises(
        ImportError, match=r"lmcache==0.5.7 is installed .* exactly 0.5.6"
    ):
        lmcache_store._check_version()


def test_importing_core_does_not_import_lmcache() -> None:
    code = (
        "import sys, vllm_flashmemory.core.cold_pool, vllm_flashmemory.core.hot_pool;"
        "assert 'lmcache' not in sys.modules, 'lmcache imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
