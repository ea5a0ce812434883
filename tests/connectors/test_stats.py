"""LSA connector stats and Prometheus metrics.

Scenarios:
- an empty container resets to every key and is empty; a payload round-trips;
- aggregation keeps the last level and concatenates deltas and samples;
- reduce() gives the log-line summary including the resident-chunk ratio;
- observe() with injected fake metric classes: counters increment by each delta,
  gauges take the last level, the ratio is resident / total, latency is observed;
- observe() with the real prometheus_client classes on a private registry:
  the exported text holds every `vllm:flashmemory_*` name (counters with _total).
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

from vllm_flashmemory.connectors.stats import (
    LSAKVConnectorStats,
    LSAPromMetrics,
    resident_chunk_ratio,
)

VLLM_CONFIG = SimpleNamespace(kv_transfer_config=None)


class _NamedFake:
    """Stands in for a prometheus metric; records what observe() does."""

    created: dict[str, _NamedFake] = {}

    def __init__(self, name: str, documentation: str = "", **kwargs: Any) -> None:
        self.name = name
        self.kwargs = kwargs
        self.increments: list[float] = []
        self.sets: list[float] = []
        self.observations: list[float] = []
        _NamedFake.created[name] = self

    def labels(self, *labelvalues: object) -> _NamedFake:
        return self

    def inc(self, value: float = 1) -> None:
        self.increments.append(value)

    def set(self, value: float) -> None:
        self.sets.append(value)

    def observe(self, value: float) -> None:
        self.observations.append(value)


@pytest.fixture
def fake_metrics() -> tuple[LSAPromMetrics, dict[str, _NamedFake]]:
    _NamedFake.created = {}
    metrics = LSAPromMetrics(
        VLLM_CONFIG,  # type: ignore[arg-type]
        {Gauge: _NamedFake, Counter: _NamedFake, Histogram: _NamedFake},
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    return metrics, _NamedFake.created


def test_empty_and_round_trip() -> None:
    stats = LSAKVConnectorStats()
    assert stats.is_empty()
    stats.record_levels(3, 10, 7)
    stats.record_fetch(2, 2048, 0.003)
    assert not stats.is_empty()
    rebuilt = LSAKVConnectorStats(data=pickle.loads(pickle.dumps(stats.to_dict())))
    assert rebuilt.data == stats.data
    stats.reset()
    assert stats.is_empty()


def test_aggregate_keeps_last_level_and_sums_deltas() -> None:
    scheduler = LSAKVConnectorStats()
    scheduler.record_levels(3, 10, 7, kv_bytes_gpu=500, kv_bytes_full=900)
    scheduler.record_levels(4, 12, 8, kv_bytes_gpu=600, kv_bytes_full=1000)
    scheduler.record_evictions(2)
    scheduler.record_fallbacks(1)
    worker = LSAKVConnectorStats()
    worker.record_fetch(2, 200, 0.01)
    worker.record_fetch(1, 100, 0.02)
    worker.record_stores(5)
    merged = worker.aggregate(scheduler)
    assert merged.data["resident_chunks"] == [4]
    assert merged.data["total_chunks"] == [12]
    assert merged.data["kv_bytes_gpu"] == [600]
    assert merged.data["kv_bytes_full"] == [1000]
    assert merged.data["fetched_chunks"] == [2, 1]
    assert merged.data["evicted_chunks"] == [2]
    reduced = merged.reduce()
    assert reduced["LSA fetched chunks"] == 3
    assert reduced["LSA fetched bytes"] == 300
    assert reduced["LSA stored chunks"] == 5
    assert reduced["LSA fallbacks"] == 1
    assert reduced["LSA resident chunk ratio"] == pytest.approx(4 / 12, abs=1e-4)
    assert reduced["LSA KV bytes gpu"] == 600
    assert reduced["LSA KV bytes full"] == 1000


def test_footprint_bytes_are_recorded_together() -> None:
    stats = LSAKVConnectorStats()
    stats.record_levels(1, 2, 1)  # no footprint: no byte levels
    assert stats.data["kv_bytes_gpu"] == [] and "LSA KV bytes gpu" not in stats.reduce()
    with pytest.raises(ValueError, match="kv_bytes_full=None"):
        stats.record_levels(1, 2, 1, kv_bytes_gpu=10)


def test_aggregate_with_empty_is_identity() -> None:
    stats = LSAKVConnectorStats()
    stats.record_levels(1, 2, 1)
    before = {k: list(v) for k, v in stats.data.items()}
    stats.aggregate(LSAKVConnectorStats())
    assert stats.data == before


def test_ratio_without_chunks_is_one() -> None:
    assert resident_chunk_ratio(0, 0) == 1.0
    assert resident_chunk_ratio(1, 4) == 0.25


def test_observe_with_fake_metric_classes(fake_metrics) -> None:
    metrics, created = fake_metrics
    stats = LSAKVConnectorStats()
    stats.record_levels(3, 12, 9, kv_bytes_gpu=7000, kv_bytes_full=20000)
    stats.record_fetch(2, 4096, 0.004)
    stats.record_fetch(1, 2048, 0.002)
    stats.record_evictions(4)
    stats.record_fallbacks(1)
    metrics.observe(stats.to_dict(), engine_idx=0)

    assert created["vllm:flashmemory_fetched_chunks"].increments == [2, 1]
    assert created["vllm:flashmemory_fetched_bytes"].increments == [4096, 2048]
    assert created["vllm:flashmemory_evicted_chunks"].increments == [4]
    assert created["vllm:flashmemory_fallbacks"].increments == [1]
    assert created["vllm:flashmemory_resident_chunks"].sets == [3]
    assert created["vllm:flashmemory_cold_chunks"].sets == [9]
    assert created["vllm:flashmemory_kv_bytes_gpu"].sets == [7000]
    assert created["vllm:flashmemory_kv_bytes_full"].sets == [20000]
    assert created["vllm:flashmemory_resident_chunk_ratio"].sets == [1.0, 0.25]
    assert created["vllm:flashmemory_fetch_seconds"].observations == [0.004, 0.002]
    for name in (
        "vllm:flashmemory_resident_chunk_ratio",
        "vllm:flashmemory_resident_chunks",
        "vllm:flashmemory_cold_chunks",
        "vllm:flashmemory_kv_bytes_gpu",
        "vllm:flashmemory_kv_bytes_full",
    ):
        assert created[name].kwargs["multiprocess_mode"] == "mostrecent"
    # Counters never carry the suffix prometheus-client adds on export.
    assert not any(name.endswith("_total") for name in created)


def test_observe_without_levels_leaves_gauges_alone(fake_metrics) -> None:
    metrics, created = fake_metrics
    # the ratio starts at 1 (nothing offloaded), not at a fresh gauge's 0
    assert created["vllm:flashmemory_resident_chunk_ratio"].sets == [1.0]
    stats = LSAKVConnectorStats()
    stats.record_stores(2)
    metrics.observe(stats.to_dict())
    assert created["vllm:flashmemory_resident_chunk_ratio"].sets == [1.0]
    assert created["vllm:flashmemory_stored_chunks"].increments == [2]


def test_real_prometheus_registry_exports_every_name() -> None:
    registry = CollectorRegistry()

    def bind(cls: type) -> type:
        class _Bound(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("registry", registry)
                super().__init__(*args, **kwargs)

        return _Bound

    metrics = LSAPromMetrics(
        VLLM_CONFIG,  # type: ignore[arg-type]
        {Gauge: bind(Gauge), Counter: bind(Counter), Histogram: bind(Histogram)},
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    stats = LSAKVConnectorStats()
    stats.record_levels(1, 4, 3, kv_bytes_gpu=123456, kv_bytes_full=654321)
    stats.record_fetch(1, 1000, 0.003)
    stats.record_fallbacks(1)
    metrics.observe(stats.to_dict(), 0)
    text = generate_latest(registry).decode()
    for series in (
        "vllm:flashmemory_resident_chunk_ratio{",
        "vllm:flashmemory_resident_chunks{",
        "vllm:flashmemory_cold_chunks{",
        "vllm:flashmemory_kv_bytes_gpu{",
        "vllm:flashmemory_kv_bytes_full{",
        "vllm:flashmemory_fetched_chunks_total{",
        "vllm:flashmemory_fetched_bytes_total{",
        "vllm:flashmemory_fallbacks_total{",
        "vllm:flashmemory_fetch_seconds_bucket{",
    ):
        assert series in text, series
    assert 'vllm:flashmemory_resident_chunk_ratio{engine="0",model_name="tiny"} 0.25' in text
    assert 'vllm:flashmemory_kv_bytes_gpu{engine="0",model_name="tiny"} 123456.0' in text
    assert 'vllm:flashmemory_kv_bytes_full{engine="0",model_name="tiny"} 654321.0' in text
