"""Per-sample records of `flashmemory eval`, so a killed cell resumes at its next sample.

A cell's row is written only when all its samples are done; a 32K cell of 16 samples
and 12 methods can take longer than a scheduler's time slot, and before this log a
killed cell lost every sample it had finished. Each finished (sample, method) appends
one JSON line to `<json>.samples.jsonl`; a rerun with the same settings takes those
samples back instead of decoding them again, and lines of cells whose rows are in the
results file are pruned when a run ends.

One line: {"task", "context_tokens", "method", "sample", "prompt_sha256", "settings",
"score", "resident_chunks", "total_chunks", "kv_bytes_gpu", "kv_bytes_full", "seconds"}.
A line is reused only where task, length, method, sample index, the prompt's digest and
every setting (window, chunk, tau, threshold, answer limit, n, seed, weights' digests,
...) are equal, so a resumed row never mixes two settings.

Appends are single `os.write` calls on an O_APPEND descriptor: the worker processes of
`--workers` share one log, and a line is either whole or (killed mid-write) unreadable,
in which case it is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vllm_flashmemory.core.atomic import atomic_write_text

logger = logging.getLogger(__name__)

SUFFIX = ".samples.jsonl"
_VALUES = ("score", "resident_chunks", "total_chunks", "kv_bytes_gpu", "kv_bytes_full", "seconds")


def log_path(json_path: str | os.PathLike[str]) -> Path:
    """The sample log beside a results file."""
    return Path(f"{json_path}{SUFFIX}")


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def make_record(
    task: str, length: int, method: str, sample: int, prompt_sha256: str,
    settings: dict[str, Any], values: dict[str, float],
) -> dict[str, Any]:
    missing = [k for k in _VALUES if k not in values]
    if missing:
        raise ValueError(f"a sample record needs {', '.join(missing)}; got {sorted(values)}.")
    return {
        "task": task, "context_tokens": int(length), "method": method, "sample": int(sample),
        "prompt_sha256": prompt_sha256, "settings": settings,
        **{k: float(values[k]) for k in _VALUES},
    }


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every readable line; a torn last line (a killed writer) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    out, torn = [], 0
    for line in p.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(rec, dict) and all(k in rec for k in ("task", "method", "sample", *_VALUES)):
            out.append(rec)
        else:
            torn += 1
    if torn:
        logger.warning("%s: skipped %d unreadable line(s) (a killed writer)", p, torn)
    return out


def _lines(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def _cell_method(r: dict[str, Any]) -> tuple[str, int, str]:
    return (str(r["task"]), int(r["context_tokens"]), str(r["method"]))


def append_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Append the records as one write (whole lines, shared safely between processes)."""
    data = _lines(records).encode()
    if not data:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def cell_records(
    records: Sequence[dict[str, Any]], task: str, length: int, settings_of: dict[str, dict]
) -> dict[tuple[int, str], dict[str, Any]]:
    """(sample, method) -> record of this cell, for the methods in settings_of whose
    settings equal the record's; the last line wins."""
    out = {}
    for r in records:
        if r["task"] != task or int(r["context_tokens"]) != length:
            continue
        want = settings_of.get(r["method"])
        if want is not None and r.get("settings") == want:
            out[(int(r["sample"]), r["method"])] = r
    return out


def prune(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> int:
    """Drop the lines of (task, length, method) that have a row in `rows` (atomic
    rewrite; the file goes when empty); returns how many lines remain. Only a process
    with no workers running may call it."""
    p = Path(path)
    if not p.is_file():
        return 0
    records = read_records(p)
    have = {_cell_method(r) for r in rows}
    keep = [r for r in records if _cell_method(r) not in have]
    if not keep:
        p.unlink()
    elif len(keep) != len(records):
        atomic_write_text(p, _lines(keep))
    return len(keep)
