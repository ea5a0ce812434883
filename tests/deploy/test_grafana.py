"""The Grafana dashboard is generated, queries only exported series, and renders.

Scenarios:
- deploy/grafana/flashmemory.json and the datasource provisioning file are
  exactly what deploy/grafana/generate_dashboard.py writes (`--check`);
- Grafana's datasource timeInterval equals Prometheus's scrape_interval;
- every vllm:* series in the dashboard's PromQL is a sample name of a live
  /metrics scrape of a real `vllm serve` with LSA, and its metric family is
  one defined in connectors/stats.py (counters carry the `_total` export
  suffix, the histogram `_bucket`);
- every panel query evaluates without error in a real Prometheus, and the
  panels render to a PNG from query_range results (no Grafana server exists
  in Debian main or on PyPI; see docs/DEPLOY.md); with FLASHMEMORY_DOCS_IMAGE
  set, the PNG is kept at that path (docs/images/flashmemory-dashboard.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from deploy_helpers import DEPLOY, REPO, http_text, prom_query

sys.path.insert(0, str(DEPLOY / "grafana"))
import generate_dashboard  # noqa: E402

SERIES = re.compile(r"\bvllm:[A-Za-z0-9_:]+")
EXPORT_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def dashboard() -> dict:
    return json.loads(generate_dashboard.DASHBOARD_PATH.read_text())


def queried_series() -> set[str]:
    return {
        m
        for expr in generate_dashboard.queries(dashboard())
        for m in SERIES.findall(expr)
    }


def stats_py_families() -> set[str]:
    text = (REPO / "connectors" / "stats.py").read_text()
    return set(re.findall(r'"(vllm:flashmemory_[a-z_]+)"', text))


def family(sample_name: str) -> str:
    for suffix in EXPORT_SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


def test_generated_files_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "generate_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (
        f"{proc.stdout}{proc.stderr}: run python deploy/grafana/generate_dashboard.py"
    )


def test_time_interval_equals_scrape_interval() -> None:
    interval = generate_dashboard.scrape_interval()
    assert interval == "5s"
    datasource = generate_dashboard.DATASOURCE_PATH.read_text()
    assert f"timeInterval: {interval}\n" in datasource


def test_dashboard_covers_the_issue_panels() -> None:
    titles = [p["title"] for p in dashboard()["panels"]]
    assert titles == [t for t, *_ in generate_dashboard.PANELS]
    for needed in (
        "Resident-chunk ratio",
        "Resident vs cold",
        "Fetch rate",
        "p50 / p99",
        "Fallbacks",
        "KV footprint",
        "KV bytes saved",
    ):
        assert any(needed in t for t in titles), (needed, titles)
    ratio = dashboard()["panels"][0]["targets"][0]["legendFormat"]
    assert "{{model_name}}" in ratio and "{{engine}}" in ratio


def test_footprint_panels_use_the_byte_gauges() -> None:
    """DESIGN.md 'Footprint' comes from the connector's byte gauges, not from a
    bytes-per-chunk estimate: ratio = kv_bytes_gpu / kv_bytes_full."""
    panels = {p["title"]: p for p in dashboard()["panels"]}
    ratio = next(p for t, p in panels.items() if "KV footprint" in t)
    (expr,) = [t["expr"] for t in ratio["targets"]]
    assert expr.index("vllm:flashmemory_kv_bytes_gpu{") < expr.index(
        "/ (vllm:flashmemory_kv_bytes_full{"
    )
    assert ratio["fieldConfig"]["defaults"]["unit"] == "percentunit"
    saved = next(p for t, p in panels.items() if "KV bytes saved" in t)
    series = {m for t in saved["targets"] for m in SERIES.findall(t["expr"])}
    assert series == {"vllm:flashmemory_kv_bytes_gpu", "vllm:flashmemory_kv_bytes_full"}


def test_queried_series_are_defined_in_stats_py() -> None:
    defined = stats_py_families()
    assert "vllm:flashmemory_resident_chunk_ratio" in defined
    unknown = {s for s in queried_series() if family(s) not in defined}
    assert not unknown, (
        f"dashboard queries series not defined in connectors/stats.py: {unknown}"
    )


def test_queried_series_are_exported_by_a_live_server(monitored_server) -> None:
    scrape = http_text(f"{monitored_server.url}/metrics")
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in scrape.splitlines()
        if line.startswith("vllm:")
    }
    missing = queried_series() - exported
    assert not missing, (
        f"dashboard queries series the server does not export: {missing}"
    )


def test_panel_queries_evaluate_and_render(prometheus_server, tmp_path) -> None:
    s = prometheus_server
    for _title, _, targets, _, _ in generate_dashboard.PANELS:
        for expr, _ in targets:
            prom_query(s.prometheus_url, render_panels().instantiate(expr, "4s"))
    out = tmp_path / "dashboard.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "grafana" / "render_panels.py"),
            "--prometheus",
            s.prometheus_url,
            "--start",
            f"{s.request_start - 5:.0f}",
            "--end",
            f"{s.request_end + 5:.0f}",
            "--step",
            "1",
            "--rate-interval",
            "4s",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "series" in proc.stdout
    # FLASHMEMORY_DOCS_IMAGE=docs/images/flashmemory-dashboard.png keeps the
    # rendering (how the image in docs/DEPLOY.md is made).
    if os.environ.get("FLASHMEMORY_DOCS_IMAGE"):
        shutil.copyfile(out, REPO / os.environ["FLASHMEMORY_DOCS_IMAGE"])


def render_panels():
    import render_panels as module

    return module
