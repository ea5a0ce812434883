"""bench/key_position_probe.py: key_spans finds each key and value of a keyed answer
exactly as keyed_answer writes it (one value or several per key)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vllm_flashmemory.offline import backbone as bb

_PATH = Path(__file__).resolve().parents[2] / "bench" / "key_position_probe.py"
_spec = importlib.util.spec_from_file_location("key_position_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_key_spans_cut_keyed_answers_at_their_keys_and_values():
    pairs = [("smoggy-sponsorship", ["6026277"]), ("dusty-grey", ["3456225", "9db3991a"]),
             ("tense-dig", ["4145881"])]
    answer = bb.keyed_answer(pairs) + "\n"
    spans = probe.key_spans(answer)
    assert [answer[k0:k1] for k0, k1, _, _ in spans] == [k for k, _ in pairs]
    assert [answer[v0:v1] for _, _, v0, v1 in spans] == [", ".join(v) for _, v in pairs]
    assert answer[spans[1][0] - 2 : spans[1][0]] == "; "  # the byte before a later key


def test_by_window_splits_later_keys_at_the_window():
    stats = {0: {"first": [1.0, 1.0], "whole": [1.0, 1.0], "value": [1.0, 1.0], "back": [10.0, 200.0]},
             1: {"first": [1.0, 0.0, 0.0], "whole": [1.0, 0.0, 0.0], "value": [1.0] * 3,
                 "back": [100.0, 127.0, 130.0]}}
    inside, outside = probe.by_window(stats, 128)  # the first key is left out
    assert (inside["n"], inside["first"]) == (2, 0.5)
    assert (outside["n"], outside["first"]) == (1, 0.0)
    rows = probe.by_position(stats)
    assert [r["key"] for r in rows] == [1, 2] and rows[1]["back"] == 119.0
