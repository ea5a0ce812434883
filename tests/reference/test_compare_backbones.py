"""bench/compare_backbones.py: rows first, logged samples for cells without a row.

Scenarios: a cell with a row reads the row (its logged lines ignored); a cell cut
short is the mean of its logged samples, a repeated sample counted once and a torn
line skipped; the table lists only cells both files have, with the difference.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "compare_backbones.py"
_spec = importlib.util.spec_from_file_location("compare_backbones", _PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _row(task, length, acc, n=16, method="full"):
    return {"task": task, "context_tokens": length, "method": method, "accuracy": acc,
            "accuracy_stderr": 0.1, "n": n, "model_sha256": "aaaa"}


def _rec(task, length, sample, score, method="full"):
    return json.dumps({"task": task, "context_tokens": length, "method": method,
                       "sample": sample, "score": score, "resident_chunks": 8.0,
                       "total_chunks": 8.0, "kv_bytes_gpu": 1.0, "kv_bytes_full": 1.0,
                       "seconds": 1.0, "settings": {"model_sha256": "bbbb"}})


def test_rows_first_then_logged_samples(tmp_path):
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps({"format": "flashmemory-eval/1",
                                "rows": [_row("vt", 16384, 0.25)]}))
    (tmp_path / "cand.json.samples.jsonl").write_text("\n".join([
        _rec("vt", 16384, 0, 1.0),  # the cell has a row: ignored
        _rec("niah_multivalue", 16384, 0, 0.5),
        _rec("niah_multivalue", 16384, 1, 0.0),
        _rec("niah_multivalue", 16384, 1, 0.0),  # the same sample again
        _rec("niah_multivalue", 16384, 2, 1.0, method="lsa"),
        '{"task": "niah_multiv',  # torn by a kill
    ]) + "\n")
    got = compare.cells(cand, "full")
    assert got[("vt", 16384)]["accuracy"] == 0.25 and got[("vt", 16384)]["source"] == "row"
    mv = got[("niah_multivalue", 16384)]
    assert (mv["accuracy"], mv["n"], mv["source"]) == (0.25, 2, "samples")
    assert mv["accuracy_stderr"] == pytest.approx(0.25)
    assert mv["model_sha256"] == "bbbb"

    base = tmp_path / "base.json"
    base.write_text(json.dumps({"format": "flashmemory-eval/1",
                                "rows": [_row("niah_multivalue", 16384, 0.5),
                                         _row("cwe", 16384, 0.1)]}))
    lines = compare.table(compare.cells(base, "full"), got)
    assert len(lines) == 3  # header, rule, the one cell both have
    assert lines[2] == "| niah_multivalue | 16K | 0.500 (16) | 0.250 (2, from the log) | -0.250 |"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--baseline .*nope.json: neither"):
        compare.main(["--baseline", str(tmp_path / "nope.json"),
                      "--candidate", str(tmp_path / "nope.json")])


def test_bad_lengths_are_named(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": "flashmemory-eval/1", "rows": []}))
    with pytest.raises(SystemExit, match="--lengths '16k'.*16384"):
        compare.main(["--baseline", str(path), "--candidate", str(path), "--lengths", "16k"])
