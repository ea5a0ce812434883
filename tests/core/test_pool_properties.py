"""Property-based tests of ColdPool and HotPool (hypothesis state machines).

Each machine runs random sequences of events against a pool and a plain-dict model
of what the pool must hold, and checks after every step:

ColdPool (both backends; a 12-chunk pool, request ids that share prefixes):
- events: reserve (fits or pool-full), put (within or beyond the reservation,
  including re-puts), get (stored, missing, unknown request), finish and abort
  (free_request, including double frees), and an explicit pool-full probe that
  asks for one chunk more than is free;
- no chunk is ever lost: every chunk the model holds reads back bit-exact, and
  nothing the model lacks is reported as stored;
- capacity accounting is exact: reserved, stored and free counts equal the model's,
  reserved never exceeds capacity, and the backend's allocator holds exactly
  stored x slot bytes;
- a refused event (pool full, beyond reservation, unknown request, double free)
  changes nothing.

HotPool (5 slots):
- events: allocate, batched_allocate (fits or pressure), free (valid or double),
  batched_free, free_request;
- slots are never shared: the (request, chunk) -> slot map is injective, used and
  free slots partition the arena, and every held slot still carries the tag its
  owner wrote (so no other owner wrote into it);
- allocation under pressure returns None and changes nothing; a double free raises
  and changes nothing; stats equal the model's.
"""

from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vllm_flashmemory.core.cold_pool import ColdPool, ColdPoolConfig, ColdPoolFullError
from vllm_flashmemory.core.hot_pool import HotPool, HotPoolConfig

HAS_LMCACHE = importlib.util.find_spec("lmcache") is not None
CHUNK_BYTES = 40  # rounds to a 64-byte slot
SLOT_BYTES = 64
CAPACITY_CHUNKS = 12
REQUESTS = st.sampled_from(["a", "b", "ab", "a\x00\x00\x00\x01", "c"])
CHUNK_IDS = st.lists(st.integers(0, 9), unique=True, max_size=5)
SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _row(req_id: str, chunk_id: int, version: int) -> torch.Tensor:
    # Bytes that differ per (request, chunk, version), so a swapped or stale chunk
    # cannot read back as the right one.
    seed = zlib.crc32(f"{req_id!r}/{chunk_id}/{version}".encode())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8, generator=g)


class ColdPoolMachine(RuleBasedStateMachine):
    backend = "torch"

    def __init__(self) -> None:
        super().__init__()
        gib = CAPACITY_CHUNKS * SLOT_BYTES / (1 << 30)
        self.pool = ColdPool(ColdPoolConfig(gib, CHUNK_BYTES, backend=self.backend))
        self.reserved: dict[str, int] = {}
        self.stored: dict[tuple[str, int], torch.Tensor] = {}
        self.version = 0

    def teardown(self) -> None:
        self.pool.close()

    def _free(self) -> int:
        return CAPACITY_CHUNKS - sum(self.reserved.values())

    def _stored_of(self, req_id: str) -> set[int]:
        return {c for (r, c) in self.stored if r == req_id}

    @rule(req_id=REQUESTS, n=st.integers(0, 14))
    def reserve(self, req_id: str, n: int) -> None:
        need = n - self.reserved.get(req_id, 0)
        if need > self._free():
            with pytest.raises(ColdPoolFullError, match=rf"needs {need} more chunks"):
                self.pool.reserve(req_id, n)
            return
        assert self.pool.reserve(req_id, n) == max(need, 0)
        self.reserved[req_id] = max(n, self.reserved.get(req_id, 0))

    @rule(req_id=st.sampled_from(["p1", "p2"]))
    def pool_full(self, req_id: str) -> None:
        if req_id in self.reserved:
            return
        with pytest.raises(ColdPoolFullError, match=r"raise 'lsa.cold_pool_gib'"):
            self.pool.reserve(req_id, self._free() + 1)

    @rule(req_id=REQUESTS, ids=CHUNK_IDS)
    def put(self, req_id: str, ids: list[int]) -> None:
        self.version += 1
        rows = [_row(req_id, c, self.version) for c in ids]
        data = (
            torch.stack(rows)
            if rows
            else torch.empty((0, CHUNK_BYTES), dtype=torch.uint8)
        )
        if req_id not in self.reserved:
            with pytest.raises(
                ValueError, match=r"never reserved or was already freed"
            ):
                self.pool.batched_put(req_id, ids, data)
            return
        new = set(ids) - self._stored_of(req_id)
        if len(self._stored_of(req_id)) + len(new) > self.reserved[req_id]:
            with pytest.raises(ValueError, match=r"exceeds its reservation"):
                self.pool.batched_put(req_id, ids, data)
            return
        self.pool.batched_put(req_id, ids, data)
        for c, row in zip(ids, rows, strict=True):
            self.stored[(req_id, c)] = row

    @rule(req_id=REQUESTS, ids=CHUNK_IDS)
    def get(self, req_id: str, ids: list[int]) -> None:
        if req_id not in self.reserved:
            with pytest.raises(ValueError, match=r"no request"):
                self.pool.batched_get(req_id, ids)
        elif not set(ids) <= self._stored_of(req_id):
            with pytest.raises(LookupError, match=r"has no stored chunks"):
                self.pool.batched_get(req_id, ids)
        else:
            got = self.pool.batched_get(req_id, ids)
            for i, c in enumerate(ids):
                assert torch.equal(got[i], self.stored[(req_id, c)])

    def _free_request(self, req_id: str) -> None:
        if req_id not in self.reserved:
            with pytest.raises(ValueError, match=r"already freed"):
                self.pool.free_request(req_id)
            return
        mine = self._stored_of(req_id)
        assert self.pool.free_request(req_id) == len(mine)
        for c in mine:
            del self.stored[(req_id, c)]
        del self.reserved[req_id]

    @rule(req_id=REQUESTS)
    def finish(self, req_id: str) -> None:
        self._free_request(req_id)

    @rule(req_id=REQUESTS)
    def abort(self, req_id: str) -> None:
        self._free_request(req_id)

    @invariant()
    def accounting_is_exact(self) -> None:
        s = self.pool.stats
        assert s.capacity_chunks == CAPACITY_CHUNKS
        assert s.reserved_chunks == sum(self.reserved.values()) <= CAPACITY_CHUNKS
        assert s.stored_chunks == len(self.stored)
        assert s.free_chunks == self._free()
        assert s.num_requests == len(self.reserved)
        assert s.stored_bytes == len(self.stored) * CHUNK_BYTES
        assert self.pool.arena_used_bytes() == len(self.stored) * SLOT_BYTES

    @invariant()
    def no_chunk_is_lost(self) -> None:
        for req_id in ["a", "b", "ab", "a\x00\x00\x00\x01", "c"]:
            mine = sorted(self._stored_of(req_id))
            assert self.pool.request_chunk_ids(req_id) == frozenset(mine)
            assert self.pool.reservation(req_id) == self.reserved.get(req_id, 0)
            if mine:
                got = self.pool.batched_get(req_id, mine)
                for i, c in enumerate(mine):
                    assert torch.equal(got[i], self.stored[(req_id, c)])


class LMCacheColdPoolMachine(ColdPoolMachine):
    backend = "lmcache"


ColdPoolMachine.TestCase.settings = SETTINGS
LMCacheColdPoolMachine.TestCase.settings = SETTINGS
TestColdPoolTorch = ColdPoolMachine.TestCase
TestColdPoolLMCache = pytest.mark.skipif(
    not HAS_LMCACHE,
    reason="lmcache 0.5.6 is not installed; run scripts/install_lmcache.sh",
)(LMCacheColdPoolMachine.TestCase)


NUM_SLOTS = 5


def _tag(req_id: str, chunk_id: int) -> int:
    return (zlib.crc32(f"{req_id!r}/{chunk_id}".encode()) & 0xFF) or 1


class HotPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = HotPool(HotPoolConfig(NUM_SLOTS, 8, device="cpu"))
        self.held: dict[tuple[str, int], int] = {}  # model: (req, chunk) -> slot

    def _claim(self, req_id: str, ids: list[int], slots: list[int]) -> None:
        for c, s in zip(ids, slots, strict=True):
            assert s not in self.held.values(), f"slot {s} handed out twice"
            self.held[(req_id, c)] = s
            self.pool.buffer[s].fill_(_tag(req_id, c))  # the owner's bytes

    @rule(req_id=REQUESTS, chunk_id=st.integers(0, 6))
    def allocate(self, req_id: str, chunk_id: int) -> None:
        if (req_id, chunk_id) in self.held:
            with pytest.raises(ValueError, match=r"already hold slots"):
                self.pool.allocate(req_id, chunk_id)
            return
        slot = self.pool.allocate(req_id, chunk_id)
        if len(self.held) == NUM_SLOTS:
            assert slot is None
        else:
            assert slot is not None
            self._claim(req_id, [chunk_id], [slot])

    @rule(req_id=REQUESTS, ids=CHUNK_IDS)
    def batched_allocate(self, req_id: str, ids: list[int]) -> None:
        if any((req_id, c) in self.held for c in ids):
            with pytest.raises(ValueError, match=r"already hold slots"):
                self.pool.batched_allocate(req_id, ids)
            return
        slots = self.pool.batched_allocate(req_id, ids)
        if len(ids) > NUM_SLOTS - len(self.held):
            assert slots is None
        else:
            assert slots is not None and len(slots) == len(ids)
            self._claim(req_id, ids, slots)

    @rule(req_id=REQUESTS, chunk_id=st.integers(0, 6))
    def free(self, req_id: str, chunk_id: int) -> None:
        if (req_id, chunk_id) not in self.held:
            with pytest.raises(ValueError, match=r"double free"):
                self.pool.free(req_id, chunk_id)
            return
        assert self.pool.free(req_id, chunk_id) == self.held.pop((req_id, chunk_id))

    @rule(req_id=REQUESTS, ids=CHUNK_IDS)
    def batched_free(self, req_id: str, ids: list[int]) -> None:
        if not all((req_id, c) in self.held for c in ids):
            with pytest.raises(ValueError, match=r"double free"):
                self.pool.batched_free(req_id, ids)
            return
        expect = [self.held.pop((req_id, c)) for c in ids]
        assert self.pool.batched_free(req_id, ids) == expect

    @rule(req_id=REQUESTS)
    def free_request(self, req_id: str) -> None:
        mine = [k for k in self.held if k[0] == req_id]
        assert self.pool.free_request(req_id) == len(mine)
        for k in mine:
            del self.held[k]

    @invariant()
    def slots_partition_the_arena(self) -> None:
        used = list(self.held.values())
        assert len(set(used)) == len(used)
        s = self.pool.stats
        assert (s.used_slots, s.free_slots) == (len(used), NUM_SLOTS - len(used))
        assert s.num_requests == len({r for r, _ in self.held})
        assert self.pool.num_free == NUM_SLOTS - len(used)
        for (req_id, c), slot in self.held.items():
            assert self.pool.slot_of(req_id, c) == slot
            assert int(self.pool.buffer[slot, 0]) == _tag(req_id, c)
        for req_id in {r for r, _ in self.held}:
            ids = sorted(c for r, c in self.held if r == req_id)
            assert self.pool.resident_chunk_ids(req_id) == frozenset(ids)
            assert self.pool.slots_for(req_id, ids).tolist() == [
                self.held[(req_id, c)] for c in ids
            ]


HotPoolMachine.TestCase.settings = SETTINGS
TestHotPool = HotPoolMachine.TestCase
