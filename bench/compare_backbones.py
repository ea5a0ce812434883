"""Compare two backbones' accuracy under one method, cell by cell, from eval files.

A candidate backbone is usually measured in pieces: finished cells land as rows in its
`flashmemory eval --json` file, and cells a time limit cut short survive only as
per-sample lines in `<json>.samples.jsonl`. This reads both (rows first; a cell without
a row is the mean of its logged samples, with its n) and prints a markdown table
beside the baseline's rows, so a partly measured candidate is compared without
re-running anything.

    python bench/compare_backbones.py \
        --baseline bench/results/2026-11-24/indexer5/grid.json \
        --candidate bench/results/2026-12-07/stage8_echo_keys/full.json \
        [--method full] [--lengths 16384,8192]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

Cell = tuple[str, int]  # (task, context_tokens)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def _stderr(scores: list[float]) -> float:
    n = len(scores)
    if n < 2:
        return 0.0
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


def cells(json_path: Path, method: str) -> dict[Cell, dict]:
    """(task, length) -> {accuracy, stderr, n, model, source} for `method`: rows of
    the results file, then the sample log's means for cells that have no row."""
    out: dict[Cell, dict] = {}
    for r in _rows(json_path):
        if r["method"] == method:
            out[(r["task"], r["context_tokens"])] = {
                "accuracy": r["accuracy"], "stderr": r.get("accuracy_stderr", 0.0),
                "n": r["n"], "model": r.get("model_sha256"), "source": "row",
            }
    log = json_path.with_name(json_path.name + ".samples.jsonl")
    scores: dict[Cell, dict[int, float]] = defaultdict(dict)
    models: dict[Cell, str | None] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            cell = (rec["task"], rec["context_tokens"])
            if rec["method"] == method and cell not in out:
                scores[cell][rec["sample"]] = rec["score"]
                models[cell] = rec["settings"].get("model_sha256")
    for cell, by_sample in scores.items():
        vals = list(by_sample.values())
        out[cell] = {"accuracy": sum(vals) / len(vals), "stderr": _stderr(vals),
                     "n": len(vals), "model": models[cell], "source": "samples"}
    return out


def table(baseline: dict[Cell, dict], candidate: dict[Cell, dict],
          lengths: list[int] | None = None) -> list[str]:
    """Markdown rows for every cell the candidate has (and the baseline too)."""
    keys = sorted((c for c in candidate if c in baseline
                   and (lengths is None or c[1] in lengths)),
                  key=lambda c: (-c[1], c[0]))
    out = ["| task | context | baseline (n) | candidate (n) | candidate - baseline |",
           "|---|---|---|---|---|"]
    for task, length in keys:
        b, c = baseline[(task, length)], candidate[(task, length)]
        out.append(
            f"| {task} | {length // 1024}K | {b['accuracy']:.3f} ({b['n']}) | "
            f"{c['accuracy']:.3f} ({c['n']}{', from the log' if c['source'] == 'samples' else ''})"
            f" | {c['accuracy'] - b['accuracy']:+.3f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, type=Path, help="baseline eval JSON")
    ap.add_argument("--candidate", required=True, type=Path,
                    help="candidate eval JSON (its .samples.jsonl is read too)")
    ap.add_argument("--method", default="full", help="method to compare (default: full)")
    ap.add_argument("--lengths", help="comma-separated context lengths in tokens")
    args = ap.parse_args(argv)
    for flag, path in (("--baseline", args.baseline), ("--candidate", args.candidate)):
        log = path.with_name(path.name + ".samples.jsonl")
        if not path.is_file() and not log.is_file():
            raise SystemExit(f"{flag} {path}: neither the file nor {log.name} exists.")
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    base, cand = cells(args.baseline, args.method), cells(args.candidate, args.method)
    for name, found in (("baseline", base), ("candidate", cand)):
        models = sorted({str(v["model"]) for v in found.values()})
        print(f"{name}: {len(found)} cells of {args.method}, model_sha256 {', '.join(models)}")
    print("\n".join(table(base, cand, lengths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
