"""Render the dashboard's panels to one PNG from Prometheus `query_range` results.

    python deploy/grafana/render_panels.py --prometheus http://localhost:9090 \
        --start UNIX_TS --end UNIX_TS --out docs/images/flashmemory-dashboard.png

The stand-in for a Grafana screenshot where no Grafana server can be installed
(it is neither in Debian main nor on PyPI). It runs exactly the PromQL of
deploy/grafana/flashmemory.json (panels in the same order and layout), with
$model_name and $engine set to "all" and $__rate_interval set to
--rate-interval (Grafana uses max(4 x scrape interval, step + scrape interval)).
Needs matplotlib (the project's `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate_dashboard  # noqa: E402


def instantiate(expr: str, rate_interval: str) -> str:
    """Grafana's variable substitution for the "All" selection."""
    return (
        expr.replace('=~"$model_name"', '=~".*"')
        .replace('=~"$engine"', '=~".*"')
        .replace("$__rate_interval", rate_interval)
    )


def query_range(
    base: str, expr: str, start: float, end: float, step: float
) -> list[dict]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(
        f"{base}/api/v1/query_range?{params}", timeout=30
    ) as resp:
        reply = json.loads(resp.read())
    if reply.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {reply}")
    return reply["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prometheus", default="http://localhost:9090", help="Prometheus base URL"
    )
    now = time.time()
    parser.add_argument(
        "--start",
        type=float,
        default=now - 1800,
        help="unix seconds (default: 30 min ago)",
    )
    parser.add_argument(
        "--end", type=float, default=now, help="unix seconds (default: now)"
    )
    parser.add_argument(
        "--step", type=float, default=5.0, help="query_range step in seconds"
    )
    parser.add_argument(
        "--rate-interval",
        default="20s",
        help="value of $__rate_interval (default: 4 x the 5 s scrape interval)",
    )
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = generate_dashboard.build_dashboard()["panels"]
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    plotted = 0
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            expr = instantiate(target["expr"], args.rate_interval)
            for series in query_range(
                args.prometheus, expr, args.start, args.end, args.step
            ):
                ts = [float(t) - args.start for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                ax.plot(ts, vs, label=legend(target["legendFormat"], series["metric"]))
                plotted += 1
        ax.set_xlim(0, args.end - args.start)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        ax.set_title(f"{panel['title']} [{unit}]", fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(
                0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes
            )
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        generate_dashboard.build_dashboard()["title"] + " (PromQL of flashmemory.json)"
    )
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}: {len(panels)} panels, {plotted} series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
