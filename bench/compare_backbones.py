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
from collections import defaultdict
from pathlib import Path

from vllm_flashmemory.reference import samples_log
from vllm_flashmemory.reference.evaluate import _CellStats, read_rows

Cell = tuple[str, int]  # (task, context_tokens)


def cells(json_path: Path, method: str) -> dict[Cell, dict]:
    """(task, length) -> an eval row of `method` plus its "source": the results file's
    rows, then, for cells that have no row, one made from the sample log the way eval
    makes it (_CellStats, so accuracy and its standard error are the same figures)."""
    out: dict[Cell, dict] = {
        (r["task"], r["context_tokens"]): {**r, "source": "row"}
        for r in read_rows(json_path) if r["method"] == method
    }
    logged: dict[Cell, dict[int, dict]] = defaultdict(dict)
    for rec in samples_log.read_records(samples_log.log_path(json_path)):
        cell = (rec["task"], rec["context_tokens"])
        if rec["method"] == method and cell not in out:
            logged[cell][rec["sample"]] = rec  # a sample logged twice counts once
    for cell, by_sample in logged.items():
        stats = _CellStats()
        for rec in by_sample.values():
            stats.add_values(rec)
        model = next(iter(by_sample.values()))["settings"].get("model_sha256")
        out[cell] = {**stats.row(*cell, method, {"model_sha256": model}), "source": "samples"}
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
        log = samples_log.log_path(path)
        if not path.is_file() and not log.is_file():
            raise SystemExit(f"{flag} {path}: neither the file nor {log.name} exists.")
    try:
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    except ValueError:
        raise SystemExit(f"--lengths {args.lengths!r}: give context lengths in tokens, "
                         "e.g. 16384,8192.") from None
    base, cand = cells(args.baseline, args.method), cells(args.candidate, args.method)
    for name, found in (("baseline", base), ("candidate", cand)):
        models = sorted({str(v.get("model_sha256")) for v in found.values()})
        print(f"{name}: {len(found)} cells of {args.method}, model_sha256 {', '.join(models)}")
    print("\n".join(table(base, cand, lengths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
