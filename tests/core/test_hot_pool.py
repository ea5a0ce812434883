"""HotPool: the fixed device slot arena for resident chunks (on the CPU device here).

Scenarios:
- config validation: num_slots and chunk_bytes (zero, bool, float), an unparsable
  device, CUDA requested on a machine without it;
- the arena is one zeroed uint8 [num_slots, chunk_bytes] buffer whose identity and
  shape never change;
- allocate hands out the lowest free slot, returns None under pressure and changes
  nothing; batched_allocate is all-or-nothing;
- allocating a chunk that already holds a slot, or listing a chunk twice, raises;
- free returns the slot; a double free, a free of a never-allocated chunk, and a
  batched_free with one bad id raise and free nothing;
- free_request releases every slot of one request only, and returns 0 for a
  request that holds none;
- slots_for gives int64 slot indices in the caller's order that gather the right
  rows out of the buffer, and raises for a chunk that is not resident;
- stats count slots and requests exactly.
"""

from __future__ import annotations

import pytest
import torch

from vllm_flashmemory.core.hot_pool import HotPool, HotPoolConfig

CHUNK_BYTES = 48


@pytest.fixture
def pool() -> HotPool:
    return HotPool(HotPoolConfig(num_slots=4, chunk_bytes=CHUNK_BYTES, device="cpu"))


@pytest.mark.parametrize("field", ["num_slots", "chunk_bytes"])
@pytest.mark.parametrize("value", [0, True, 2.0])
def test_config_rejects_bad_sizes(field: str, value: object) -> None:
    kwargs = {"num_slots": 4, "chunk_bytes": 8, "device": "cpu", field: value}
    with pytest.raises(
        ValueError, match=rf"HotPoolConfig.{field}=.* must be an int >= 1"
    ):
        HotPoolConfig(**kwargs)  # type: ignore[arg-type]


def test_config_rejects_bad_device() -> None:
    with pytest.raises(ValueError, match=r"device='gpu0' is not a torch device"):
        HotPoolConfig(4, 8, "gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_config_rejects_cuda_without_gpu() -> None:
    with pytest.raises(ValueError, match=r"device='cuda' but torch.cuda.is_available"):
        HotPoolConfig(4, 8, "cuda")


def test_arena_is_static_and_zeroed(pool: HotPool) -> None:
    buf = pool.buffer
    assert buf.shape == (4, CHUNK_BYTES) and buf.dtype == torch.uint8
    assert buf.device.type == "cpu" and int(buf.sum()) == 0
    assert pool.config.arena_bytes == 4 * CHUNK_BYTES
    pool.batched_allocate("r", [0, 1, 2])
    pool.free_request("r")
    assert pool.buffer is buf and buf.shape == (4, CHUNK_BYTES)


def test_allocate_lowest_first_and_none_under_pressure(pool: HotPool) -> None:
    assert [pool.allocate("a", c) for c in (5, 6, 7, 8)] == [0, 1, 2, 3]
    assert pool.allocate("b", 0) is None
    assert pool.stats.used_slots == 4 and not pool.contains("b", 0)
    assert pool.free("a", 6) == 1
    assert pool.allocate("b", 0) == 1


def test_batched_allocate_is_all_or_nothing(pool: HotPool) -> None:
    assert pool.batched_allocate("a", [0, 1, 2]) == [0, 1, 2]
    assert pool.batched_allocate("b", [0, 1]) is None
    assert pool.resident_chunk_ids("b") == frozenset()
    assert pool.num_free == 1
    assert pool.batched_allocate("b", [9]) == [3]


def test_allocating_twice_raises(pool: HotPool) -> None:
    pool.allocate("a", 3)
    with pytest.raises(
        ValueError, match=r"chunks \[3\] of request 'a' already hold slots \[0\]"
    ):
        pool.allocate("a", 3)
    with pytest.raises(
        ValueError, match=r"chunk ids \[5\] of request 'a' appear more than once"
    ):
        pool.batched_allocate("a", [5, 5])
    assert pool.stats.used_slots == 1


def test_double_free_raises_and_frees_nothing(pool: HotPool) -> None:
    pool.batched_allocate("a", [0, 1])
    assert pool.free("a", 0) == 0
    with pytest.raises(ValueError, match=r"double free: chunks \[0\] of request 'a'"):
        pool.free("a", 0)
    with pytest.raises(ValueError, match=r"double free: chunks \[7\] of request 'z'"):
        pool.free("z", 7)
    with pytest.raises(ValueError, match=r"double free: chunks \[2\]"):
        pool.batched_free("a", [1, 2])
    assert pool.slot_of("a", 1) == 1  # the good id of the bad batch stays allocated
    with pytest.raises(ValueError, match=r"listed twice"):
        pool.batched_free("a", [1, 1])
    assert pool.batched_free("a", [1]) == [1]
    assert pool.stats.used_slots == 0


def test_free_request_releases_only_that_request(pool: HotPool) -> None:
    pool.batched_allocate("a", [0, 1])
    pool.batched_allocate("b", [0])
    assert pool.free_request("a") == 2
    assert pool.free_request("a") == 0
    assert pool.free_request("never") == 0
    assert pool.slot_of("b", 0) == 2 and pool.slot_of("a", 0) is None
    assert pool.stats.num_requests == 1 and pool.num_free == 3


def test_slots_for_addresses_rows_for_gather(pool: HotPool) -> None:
    slots = pool.batched_allocate("r", [10, 20, 30])
    assert slots is not None
    data = (
        torch.arange(3 * CHUNK_BYTES, dtype=torch.int64).remainder(251).to(torch.uint8)
    )
    data = data.view(3, CHUNK_BYTES)
    pool.buffer[torch.tensor(slots)] = data  # what the fetch kernel does
    idx = pool.slots_for("r", [30, 10])
    assert idx.dtype == torch.long and idx.device == pool.buffer.device
    assert idx.tolist() == [2, 0]
    assert torch.equal(pool.buffer.index_select(0, idx), data[[2, 0]])
    with pytest.raises(
        LookupError, match=r"chunks \[40\] of request 'r' are not resident"
    ):
        pool.slots_for("r", [10, 40])


def test_stats_are_exact(pool: HotPool) -> None:
    pool.batched_allocate("a", [0, 1])
    pool.allocate("b", 0)
    s = pool.stats
    assert (s.num_slots, s.used_slots, s.free_slots, s.num_requests) == (4, 3, 1, 2)
