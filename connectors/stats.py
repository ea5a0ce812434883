"""Stats and Prometheus metrics of the LSA connector.

Both halves of the connector report through vLLM's connector-stats path
(`get_kv_connector_stats` -> `SchedulerStats.kv_connector_stats` ->
`KVConnectorProm.observe`), never through a process singleton: gauges created in
EngineCore or worker processes would not reach `/metrics`.

The scheduler half reports the residency levels (resident, total and cold CSA
chunks, and the DESIGN.md footprint `kv_bytes_gpu` / `kv_bytes_full` of
`core.footprint.request_footprint`, all summed over the planner's live
requests) and the planner's deltas (evictions,
fallbacks); the worker half reports what it moved (fetched chunks and bytes,
stored chunks, fetch latency samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

# Levels: aggregation keeps only the most recent observation, because summing
# two snapshots of the same pool would double-count it.
LEVEL_KEYS: tuple[str, ...] = (
    "resident_chunks",
    "total_chunks",
    "cold_chunks",
    "kv_bytes_gpu",
    "kv_bytes_full",
)
# Deltas since the previous report: aggregation concatenates, export sums.
DELTA_KEYS: tuple[str, ...] = (
    "fetched_chunks",
    "fetched_bytes",
    "evicted_chunks",
    "stored_chunks",
    "fallbacks",
)
# Per-fetch latency samples, exported as a histogram.
SAMPLE_KEYS: tuple[str, ...] = ("fetch_seconds",)
ALL_KEYS: tuple[str, ...] = LEVEL_KEYS + DELTA_KEYS + SAMPLE_KEYS

# Host-to-device fetch of one fetch set: sub-millisecond on a GPU for a few
# chunks, tens of milliseconds for hundreds of chunks or on CPU.
FETCH_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


def resident_chunk_ratio(resident_chunks: int, total_chunks: int) -> float:
    """DESIGN.md "Footprint": resident / all CSA chunks; 1.0 with no chunks."""
    return resident_chunks / total_chunks if total_chunks else 1.0


@dataclass
class LSAKVConnectorStats(KVConnectorStats):
    """Serializable container of LSA residency levels, transfer deltas and samples.

    Every value is a list so that several snapshots (from several workers or
    steps) can travel in one payload; level keys keep only their last entry on
    aggregation.
    """

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        else:
            for key in ALL_KEYS:
                self.data.setdefault(key, [])

    def reset(self) -> None:
        # Must stay msgspec/pickle serializable: plain lists of numbers only.
        self.data: dict[str, list[int | float]] = {key: [] for key in ALL_KEYS}

    def record_levels(
        self,
        resident_chunks: int,
        total_chunks: int,
        cold_chunks: int,
        *,
        kv_bytes_gpu: int | None = None,
        kv_bytes_full: int | None = None,
    ) -> None:
        """kv_bytes_gpu / kv_bytes_full: `Footprint` of the same live requests
        (DESIGN.md "Footprint"); both or neither."""
        self.data["resident_chunks"].append(resident_chunks)
        self.data["total_chunks"].append(total_chunks)
        self.data["cold_chunks"].append(cold_chunks)
        if (kv_bytes_gpu is None) != (kv_bytes_full is None):
            raise ValueError(
                f"kv_bytes_gpu={kv_bytes_gpu} and kv_bytes_full={kv_bytes_full}: "
                "record both footprint bytes of the same requests, or neither."
            )
        if kv_bytes_gpu is not None:
            self.data["kv_bytes_gpu"].append(kv_bytes_gpu)
            self.data["kv_bytes_full"].append(kv_bytes_full)

    def record_fetch(self, chunks: int, num_bytes: int, seconds: float) -> None:
        self.data["fetched_chunks"].append(chunks)
        self.data["fetched_bytes"].append(num_bytes)
        self.data["fetch_seconds"].append(seconds)

    def record_evictions(self, chunks: int) -> None:
        self.data["evicted_chunks"].append(chunks)

    def record_stores(self, chunks: int) -> None:
        self.data["stored_chunks"].append(chunks)

    def record_fallbacks(self, requests: int) -> None:
        self.data["fallbacks"].append(requests)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not other.is_empty():
            for key, values in other.data.items():
                accumulator = self.data.setdefault(key, [])
                if key in LEVEL_KEYS:
                    if values:
                        accumulator[:] = list(values[-1:])
                else:
                    accumulator.extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {
            "LSA fetched chunks": sum(self.data["fetched_chunks"]),
            "LSA fetched bytes": sum(self.data["fetched_bytes"]),
            "LSA evicted chunks": sum(self.data["evicted_chunks"]),
            "LSA stored chunks": sum(self.data["stored_chunks"]),
            "LSA fallbacks": sum(self.data["fallbacks"]),
        }
        if self.data["total_chunks"]:
            resident = int(self.data["resident_chunks"][-1])
            total = int(self.data["total_chunks"][-1])
            reduced["LSA resident chunks"] = resident
            reduced["LSA total chunks"] = total
            reduced["LSA resident chunk ratio"] = round(
                resident_chunk_ratio(resident, total), 4
            )
        if self.data["kv_bytes_full"]:
            reduced["LSA KV bytes gpu"] = int(self.data["kv_bytes_gpu"][-1])
            reduced["LSA KV bytes full"] = int(self.data["kv_bytes_full"][-1])
        if self.data["fetch_seconds"]:
            samples = self.data["fetch_seconds"]
            reduced["LSA mean fetch ms"] = round(1e3 * sum(samples) / len(samples), 3)
        return reduced

    def is_empty(self) -> bool:
        return all(len(values) == 0 for values in self.data.values())


class LSAPromMetrics(KVConnectorPromMetrics):
    """`vllm:flashmemory_*` series, created in the API-server process."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def gauge(name: str, documentation: str) -> dict[int, Any]:
            metric = self._gauge_cls(
                name=name,
                documentation=documentation,
                # A level, not a delta: several processes must not be summed.
                multiprocess_mode="mostrecent",
                labelnames=labelnames,
            )
            return create_metric_per_engine(metric, self.per_engine_labelvalues)

        def counter(name: str, documentation: str) -> dict[int, Any]:
            # No `_total` suffix here: prometheus-client appends it on export.
            metric = self._counter_cls(
                name=name, documentation=documentation, labelnames=labelnames
            )
            return create_metric_per_engine(metric, self.per_engine_labelvalues)

        self.ratio_gauge = gauge(
            "vllm:flashmemory_resident_chunk_ratio",
            "Resident CSA chunks / all CSA chunks over live requests "
            "(1 = nothing offloaded).",
        )
        # Before the first request nothing is offloaded: read 1, not the 0 a fresh
        # gauge would show (a dashboard would take 0 for "everything offloaded").
        for engine_gauge in self.ratio_gauge.values():
            engine_gauge.set(1.0)
        self.level_gauges: dict[str, dict[int, Any]] = {
            "resident_chunks": gauge(
                "vllm:flashmemory_resident_chunks",
                "CSA chunks resident on the device, summed over live requests.",
            ),
            "cold_chunks": gauge(
                "vllm:flashmemory_cold_chunks",
                "CSA chunks held only in the host cold pool, summed over live "
                "requests.",
            ),
            "kv_bytes_gpu": gauge(
                "vllm:flashmemory_kv_bytes_gpu",
                "KV bytes held on the device, summed over live requests: resident "
                "CSA main KV + resident CSA indexer keys + the Memory Indexer's keys "
                "+ HCA + SWA (DESIGN.md 'Footprint').",
            ),
            "kv_bytes_full": gauge(
                "vllm:flashmemory_kv_bytes_full",
                "KV bytes the same live requests would hold with every CSA chunk "
                "resident (the full-KV baseline; DESIGN.md 'Footprint').",
            ),
        }
        self.counters: dict[str, dict[int, Any]] = {
            "fetched_chunks": counter(
                "vllm:flashmemory_fetched_chunks",
                "CSA chunks loaded from the cold pool into device blocks.",
            ),
            "fetched_bytes": counter(
                "vllm:flashmemory_fetched_bytes",
                "Bytes loaded from the cold pool into device blocks.",
            ),
            "evicted_chunks": counter(
                "vllm:flashmemory_evicted_chunks",
                "CSA chunks made non-resident by a residency refresh.",
            ),
            "stored_chunks": counter(
                "vllm:flashmemory_stored_chunks",
                "Completed CSA chunks written to the cold pool.",
            ),
            "fallbacks": counter(
                "vllm:flashmemory_fallbacks",
                "Requests kept fully resident after a fetch failure or an "
                "oversized selection.",
            ),
        }
        fetch_seconds = self._histogram_cls(
            name="vllm:flashmemory_fetch_seconds",
            documentation="Latency of loading one step's fetch sets.",
            buckets=list(FETCH_SECONDS_BUCKETS),
            labelnames=labelnames,
        )
        self.fetch_seconds = create_metric_per_engine(
            fetch_seconds, self.per_engine_labelvalues
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, counter in self.counters.items():
            for value in transfer_stats_data.get(name, []):
                counter[engine_idx].inc(value)
        for name, gauge in self.level_gauges.items():
            values = transfer_stats_data.get(name, [])
            if values:
                gauge[engine_idx].set(values[-1])
        resident = transfer_stats_data.get("resident_chunks", [])
        total = transfer_stats_data.get("total_chunks", [])
        if resident and total:
            self.ratio_gauge[engine_idx].set(
                resident_chunk_ratio(int(resident[-1]), int(total[-1]))
            )
        for value in transfer_stats_data.get("fetch_seconds", []):
            self.fetch_seconds[engine_idx].observe(value)


__all__ = [
    "LSAKVConnectorStats",
    "LSAPromMetrics",
    "LEVEL_KEYS",
    "DELTA_KEYS",
    "SAMPLE_KEYS",
    "resident_chunk_ratio",
]
