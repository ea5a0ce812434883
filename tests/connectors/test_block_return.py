"""Block return: evicted CSA chunks give their blocks back to vLLM's `BlockPool`.

Real objects: vLLM's `BlockPool`, `LSACSAManager` (through vLLM's spec registry),
the connector's scheduler and worker halves, `ColdPool`; only the engine's
scheduler output is faked (tests/connectors/conftest.py).
Scenarios:
- registry: `LSACSASpec` maps to `LSACSAManager`, vLLM's built-in specs survive;
- manager: punching holes frees exactly those blocks, a second punch or a fill of
  a non-hole raises, a fill takes fresh blocks or returns None when the pool is
  short (holes untouched), `free()` returns every real block and skips holes;
- round trip: the first refresh frees the evicted chunks' blocks (pool count up)
  and ships holes as the null block; the Memory Indexer's keys of the evicted
  chunks stay readable (`IndexerKeyStore`); a later refresh restores a chunk into
  new blocks with its original bytes (old blocks were scrubbed and reused), and
  ships the new ids; resident + cold == all chunks at every step;
- pool exhausted at a fetch (a block freed by the same refresh's eviction is
  reused, but two chunks need two): the fetch fails cleanly (holes stay, attention
  masks them), the request falls back to full residency and refetches once
  blocks free;
- block-table patch: a request's row is found by its anchor, other rows untouched.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec
from vllm_flashmemory.connectors.block_table import patch_block_tables
from vllm_flashmemory.connectors.types import BlockTablePatch

from tests.connectors.conftest import NUM_BLOCKS, FakeEngine
from tests.connectors.test_scheduler import PROMPT, Harness, _step_of, lsa_config
from vllm_flashmemory.core.residency_planner import RequestMode
from vllm_flashmemory.vllm.kv_spec import (
    LSACSAManager,
    LSACSASpec,
    register_lsa_kv_cache_spec,
)

CSA_GROUP = 1  # the compressed group of tests/connectors/conftest.py


def _spec() -> LSACSASpec:
    return LSACSASpec(
        block_size=256, num_kv_heads=1, head_size=132, dtype=torch.uint8,
        tokens_per_state=4,
    )


def _manager(num_blocks: int = NUM_BLOCKS) -> LSACSAManager:
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=256)
    return LSACSAManager(
        kv_cache_spec=_spec(), block_pool=pool, enable_caching=False,
        kv_cache_group_id=CSA_GROUP, scheduler_block_size=256,
    )


def test_registry_maps_spec_to_manager() -> None:
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_lsa_kv_cache_spec()
    register_lsa_kv_cache_spec()  # idempotent
    assert KVCacheSpecRegistry.get_manager_class(_spec()) is LSACSAManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(_spec()) is LSACSASpec
    stock = MLAAttentionSpec(block_size=256, num_kv_heads=1, head_size=132, dtype=torch.uint8)
    assert KVCacheSpecRegistry.get_manager_class(stock) is FullAttentionManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(stock) is FullAttentionSpec


def test_manager_holes_free_and_refill() -> None:
    m = _manager(16)
    pool = m.block_pool
    m.req_to_blocks["r"] = pool.get_new_blocks(6)
    ids = [b.block_id for b in m.req_to_blocks["r"]]
    free = pool.get_num_free_blocks()  # 16 - null - 6 = 9
    assert free == 9
    assert m.punch_holes("r", [1, 3]) == [ids[1], ids[3]]
    assert pool.get_num_free_blocks() == free + 2 and m.num_holes("r") == 2
    with pytest.raises(AssertionError, match="already a hole"):
        m.punch_holes("r", [1])
    with pytest.raises(AssertionError, match="not a hole"):
        m.fill_holes("r", [0])
    new = m.fill_holes("r", [1])
    assert new is not None and len(new) == 1 and m.num_holes("r") == 1
    # Pool short: nothing taken, the hole stays.
    hog = pool.get_new_blocks(pool.get_num_free_blocks())
    assert m.fill_holes("r", [3]) is None and m.num_holes("r") == 1
    pool.free_blocks(hog)
    m.free("r")
    assert pool.get_num_free_blocks() == 15  # every block but the null block


class PoolEngine(FakeEngine):
    """FakeEngine whose block ids come from the manager's real BlockPool."""

    def __init__(self, manager: LSACSAManager) -> None:
        super().__init__()
        self.manager = manager

    def allocate(self, req_id: str, tokens: int) -> list[int]:
        have = self.block_ids.setdefault(req_id, [])
        need = -(-tokens // 256) - len(have)
        blocks = self.manager.block_pool.get_new_blocks(max(0, need))
        self.manager.req_to_blocks[req_id].extend(blocks)
        new = [b.block_id for b in blocks]
        have.extend(new)
        return new


def _harness(kv_cache_config) -> tuple[Harness, LSACSAManager]:
    h = Harness(kv_cache_config, lsa_config())
    manager = _manager()
    h.engine = PoolEngine(manager)
    h.worker.key_store.cache_names = ("model.layers.2.attn.indexer.k_cache",)
    kv_cache_manager = SimpleNamespace(
        coordinator=SimpleNamespace(single_type_managers=(manager,))
    )
    h.scheduler.bind_kv_cache_manager(kv_cache_manager)
    assert h.scheduler.block_return is not None
    return h, manager


def test_round_trip_frees_and_restores_blocks(kv_cache_config) -> None:
    h, manager = _harness(kv_cache_config)
    pool = manager.block_pool
    null = pool.null_block.block_id
    h.add("r")
    h.scores["r"] = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0]
    h.step({"r": PROMPT})
    old = {c: h.engine.block_ids["r"][c] for c in range(6)}
    free_before = pool.get_num_free_blocks()
    first = h.step({"r": 1})
    step = _step_of(first, "r")
    assert [c.chunk_id for c in step.evict] == [1, 3, 4]
    assert [c.block_ids[0] for c in step.evict] == [(old[1],), (old[3],), (old[4],)]
    # 3 evicted blocks back; the decode token took a new block (chunk 6).
    assert pool.get_num_free_blocks() == free_before + 3 - 1
    (patch,) = first.block_table_patches
    assert first.null_block_id == null
    assert patch.block_indices == (1, 3, 4) and patch.block_ids == (null, null, null)
    assert patch.anchor_block_id == h.engine.block_ids["r"][-1]
    # The null block is masked; the freed blocks are not (vLLM reuses them).
    residency = h.worker.residency
    assert residency.non_resident_blocks[null]
    assert not residency.non_resident_blocks[old[3]]
    # The Memory Indexer's keys of evicted chunks stay readable.
    keys = h.worker.key_store.blocks("r", "model.layers.2.attn.indexer.k_cache")
    original = h.original["model.layers.2.attn.indexer.k_cache"]
    assert torch.equal(keys[3], original[old[3]])

    # Another request takes the freed blocks; the scrub already zeroed them.
    h.scores["r"] = [0.0, 0.0, 0.0, 0.95, 0.0, 0.0, 0.0]
    metas = [h.step({"r": 1}) for _ in range(4)]
    refresh = _step_of(metas[-1], "r")
    assert [c.chunk_id for c in refresh.fetch] == [3]
    (new3,) = refresh.fetch[0].block_ids[0]
    assert new3 != null
    for name, cache in h.caches.items():
        assert torch.equal(cache[new3], h.original[name][old[3]]), name
    patch = metas[-1].block_table_patches[0]
    assert dict(zip(patch.block_indices, patch.block_ids)) == {
        1: null, 2: null, 3: new3, 4: null
    }
    h.step({"r": 1})  # settles the fetch
    assert h.scheduler.planner.resident_chunks("r") == (0, 3, 5, 6)

    h.scheduler.request_finished(SimpleNamespace(request_id="r"))
    manager.free("r")  # what vLLM's KVCacheManager.free does next
    meta = h.scheduler.build_connector_meta(h.engine.step({}, {}))
    h.worker.start_step(meta)
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert not residency.any_blocked
    assert h.worker.key_store.num_bytes == 0
    assert h.scheduler.block_return.num_holes() == 0


def test_fetch_without_free_blocks_falls_back(kv_cache_config) -> None:
    h, manager = _harness(kv_cache_config)
    pool = manager.block_pool
    h.add("r")
    h.scores["r"] = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0]
    h.step({"r": PROMPT})
    h.step({"r": 1})  # evicts 1, 3, 4
    # Next: fetch 1 and 3, evict 2; one freed block cannot hold two chunks.
    h.scores["r"] = [0.0, 0.9, 0.0, 0.9, 0.0, 0.0, 0.0]
    hog = pool.get_new_blocks(pool.get_num_free_blocks())
    metas = [h.step({"r": 1}) for _ in range(4)]
    step = _step_of(metas[-1], "r")
    assert [c.chunk_id for c in step.evict] == [2]
    assert step.fetch == ()  # all or nothing: no blocks, nothing fetched
    planner = h.scheduler.planner
    assert h.scheduler.block_return.num_holes() == 4  # chunks 1, 3, 4 and 2
    (patch,) = metas[-1].block_table_patches
    assert set(patch.block_ids) == {pool.null_block.block_id}  # holes stay holes
    pool.free_blocks(hog)
    # Next planning: the refused fetch settles as failed, the request falls back
    # to full residency and refetches every cold chunk at once.
    again = _step_of(h.step({"r": 1}), "r")
    assert planner.mode("r") is RequestMode.FULL_RESIDENT
    assert [c.chunk_id for c in again.fetch] == [1, 2, 3, 4]
    h.step({"r": 1})
    assert planner.cold_chunks("r") == ()
    assert h.scheduler.block_return.num_holes() == 0
    assert not h.worker.residency.any_blocked


def test_patch_finds_rows_by_anchor() -> None:
    table = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=torch.int32)
    meta = SimpleNamespace(block_table=table, decode=SimpleNamespace(block_table=table[1:]))
    patch = BlockTablePatch("r", 3, 12, (0, 2), (0, 40))
    patch_block_tables({"csa": meta}, ["csa"], (patch,))
    assert table.tolist() == [[5, 6, 7, 8], [0, 10, 40, 12]]
    miss = BlockTablePatch("x", 3, 99, (1,), (0,))
    patch_block_tables({"csa": meta}, ["csa"], (miss,))
    assert table.tolist() == [[5, 6, 7, 8], [0, 10, 40, 12]]
