"""Generate the vllm-flashmemory Grafana dashboard and its Prometheus datasource.

    python deploy/grafana/generate_dashboard.py          # rewrite the JSON/YAML
    python deploy/grafana/generate_dashboard.py --check  # exit 1 if out of date

Writes `deploy/grafana/flashmemory.json` (the dashboard) and
`deploy/grafana/provisioning/datasources/prometheus.yaml` (Grafana's datasource,
whose `timeInterval` is copied from `scrape_interval` in
`deploy/prometheus/prometheus.yml`). Never edit the outputs by hand:
tests/deploy/test_grafana.py fails when they differ from what this script writes.

Only the standard library is used, so the script runs without the plugin's
environment. Every series queried is one the LSA connector exports from vLLM's
API server (`connectors/stats.py`); counters are queried with the `_total`
suffix that prometheus-client appends on export.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = DEPLOY / "grafana" / "flashmemory.json"
DATASOURCE_PATH = (
    DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
)
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"

DASHBOARD_UID = "vllm-flashmemory"
# Every panel's legend and filter: vLLM labels each series by model and engine.
SELECTOR = 'model_name=~"$model_name", engine=~"$engine"'


def scrape_interval(prometheus_yml: Path = PROMETHEUS_YML) -> str:
    """The global scrape_interval of deploy/prometheus/prometheus.yml (e.g. "5s")."""
    match = re.search(
        r"^global:\s*\n(?:[ \t]+.*\n|\s*\n)*?[ \t]+scrape_interval:\s*(\S+)",
        prometheus_yml.read_text(),
        re.MULTILINE,
    )
    if match is None:
        raise ValueError(f"no global scrape_interval in {prometheus_yml}")
    return match.group(1)


def _target(expr: str, legend: str, ref_id: str) -> dict:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref_id,
    }


def _panel(
    panel_id: int,
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    unit: str,
    grid: tuple[int, int, int, int],
    *,
    minimum: float | None = 0,
    maximum: float | None = None,
) -> dict:
    defaults: dict = {"unit": unit, "custom": {"lineWidth": 2, "fillOpacity": 5}}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    x, y, w, h = grid
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "list",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": [
            _target(expr, legend, chr(ord("A") + i))
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _rate(counter: str) -> str:
    return (
        f"sum by (model_name, engine) (rate({counter}{{{SELECTOR}}}[$__rate_interval]))"
    )


def _quantile(q: float) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, model_name, engine) "
        "(rate(vllm:flashmemory_fetch_seconds_bucket"
        f"{{{SELECTOR}}}[$__rate_interval])))"
    )


# DESIGN.md "Footprint", summed over live requests by the connector's scheduler
# half: every KV byte on the device (resident CSA main + resident CSA indexer
# keys + the Memory Indexer's keys + HCA + SWA) and the full-KV baseline.
KV_BYTES_GPU = f"vllm:flashmemory_kv_bytes_gpu{{{SELECTOR}}}"
KV_BYTES_FULL = f"vllm:flashmemory_kv_bytes_full{{{SELECTOR}}}"

LEGEND = "{{model_name}} engine {{engine}}"

# (title, description, [(PromQL, legend)], unit, extra panel kwargs), laid out
# two per row in this order. The panel order is also the order of the PNG
# rendering in deploy/grafana/render_panels.py.
PANELS: list[tuple[str, str, list[tuple[str, str]], str, dict]] = [
    (
        "Resident-chunk ratio",
        "Resident CSA chunks / all CSA chunks over live requests, per engine and "
        "model (1 = nothing offloaded; DESIGN.md 'Footprint').",
        [(f"vllm:flashmemory_resident_chunk_ratio{{{SELECTOR}}}", LEGEND)],
        "percentunit",
        {"maximum": 1},
    ),
    (
        "Resident vs cold CSA chunks",
        "CSA chunks resident on the device and chunks held only in the host cold "
        "pool, summed over live requests.",
        [
            (f"vllm:flashmemory_resident_chunks{{{SELECTOR}}}", "resident " + LEGEND),
            (f"vllm:flashmemory_cold_chunks{{{SELECTOR}}}", "cold " + LEGEND),
        ],
        "short",
        {},
    ),
    (
        "Fetch rate",
        "CSA chunks per second loaded from the cold pool into device blocks, and "
        "chunks per second stored to and evicted from the device.",
        [
            (_rate("vllm:flashmemory_fetched_chunks_total"), "fetched " + LEGEND),
            (_rate("vllm:flashmemory_stored_chunks_total"), "stored " + LEGEND),
            (_rate("vllm:flashmemory_evicted_chunks_total"), "evicted " + LEGEND),
        ],
        "cps",
        {},
    ),
    (
        "Fetch bandwidth",
        "Bytes per second loaded from the cold pool into device blocks.",
        [(_rate("vllm:flashmemory_fetched_bytes_total"), LEGEND)],
        "Bps",
        {},
    ),
    (
        "Fetch latency p50 / p99",
        "Latency of loading one step's fetch sets (vllm:flashmemory_fetch_seconds).",
        [(_quantile(0.5), "p50 " + LEGEND), (_quantile(0.99), "p99 " + LEGEND)],
        "s",
        {},
    ),
    (
        "Fallbacks",
        "Requests per second kept fully resident after a fetch failure or an "
        "oversized selection (DESIGN.md invariant 3).",
        [(_rate("vllm:flashmemory_fallbacks_total"), LEGEND)],
        "reqps",
        {},
    ),
    (
        "KV footprint: device bytes / full-KV bytes",
        "vllm:flashmemory_kv_bytes_gpu / vllm:flashmemory_kv_bytes_full over live "
        "requests (DESIGN.md 'Footprint': the device side counts the Memory "
        "Indexer's keys, HCA and SWA too). Empty while no request is live.",
        # `> 0` drops the undefined 0/0 of an idle server instead of showing 0.
        [(f"{KV_BYTES_GPU} / ({KV_BYTES_FULL} > 0)", LEGEND)],
        "percentunit",
        {"maximum": 1},
    ),
    (
        "Device KV bytes vs full KV (KV bytes saved)",
        "KV bytes held on the device, the full-KV baseline of the same live "
        "requests, and their difference: the KV bytes saved (DESIGN.md "
        "'Footprint').",
        [
            (KV_BYTES_GPU, "device " + LEGEND),
            (KV_BYTES_FULL, "full KV " + LEGEND),
            (f"{KV_BYTES_FULL} - {KV_BYTES_GPU}", "saved " + LEGEND),
        ],
        "bytes",
        {},
    ),
]


def build_dashboard() -> dict:
    panels = []
    for i, (title, description, targets, unit, kwargs) in enumerate(PANELS):
        grid = ((i % 2) * 12, (i // 2) * 8, 12, 8)
        panels.append(_panel(i + 1, title, description, targets, unit, grid, **kwargs))

    def label_variable(name: str) -> dict:
        values_query = f"label_values(vllm:flashmemory_resident_chunk_ratio, {name})"
        return {
            "name": name,
            "label": name,
            "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {
                "query": values_query,
                "refId": f"{name}-values",
            },
            "definition": values_query,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2,
            "sort": 1,
        }

    return {
        "uid": DASHBOARD_UID,
        "title": "vLLM FlashMemory (LSA)",
        "description": "Lookahead Sparse Attention residency, fetches and fallbacks "
        "of the LSAConnector. Generated by deploy/grafana/generate_dashboard.py; "
        "do not edit by hand.",
        "tags": ["vllm", "flashmemory", "lsa"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                label_variable("model_name"),
                label_variable("engine"),
            ]
        },
        "panels": panels,
    }


def build_datasource(interval: str) -> str:
    return (
        "# Grafana datasource for deploy/prometheus/prometheus.yml. Generated by\n"
        "# deploy/grafana/generate_dashboard.py; do not edit by hand.\n"
        "apiVersion: 1\n"
        "datasources:\n"
        "  - name: Prometheus\n"
        "    type: prometheus\n"
        "    access: proxy\n"
        "    url: http://localhost:9090\n"
        "    isDefault: true\n"
        "    jsonData:\n"
        "      # Equal to scrape_interval in deploy/prometheus/prometheus.yml (the\n"
        "      # generator copies it) so that $__rate_interval covers enough samples.\n"
        f"      timeInterval: {interval}\n"
    )


def render() -> dict[Path, str]:
    """Every generated file and its exact text."""
    return {
        DASHBOARD_PATH: json.dumps(build_dashboard(), indent=2) + "\n",
        DATASOURCE_PATH: build_datasource(scrape_interval()),
    }


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard (panel targets and variables)."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if isinstance(var.get("query"), dict):
            exprs.append(var["query"]["query"])
    return exprs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a generated file differs from the script",
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        verb = "out of date" if args.check else "wrote"
        print(f"{verb}: {path.relative_to(DEPLOY.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
