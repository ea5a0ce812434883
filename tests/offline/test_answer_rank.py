"""bench/answer_rank.py's pieces: answers parsed from each task's completion form, the
chunks an answer occupies (token i = byte i - 1), the historical chunks exactly as the
planner has them, and a bad --fractions refused before any file is read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vllm_flashmemory.core.config import LSAConfig

_PATH = Path(__file__).resolve().parents[2] / "bench" / "answer_rank.py"
_spec = importlib.util.spec_from_file_location("answer_rank", _PATH)
answer_rank = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answer_rank)


def test_answer_strings_read_every_completion_form():
    assert answer_rank.answer_strings(" 1234567.") == ["1234567"]
    assert answer_rank.answer_strings(" 11, 22, 33.") == ["11", "22", "33"]
    assert answer_rank.answer_strings("ABCDE FGHIJ") == ["ABCDE", "FGHIJ"]  # vt


def test_answer_chunks_cover_every_occurrence():
    prompt = bytearray(b"." * 200)
    prompt[63:66] = b"abc"  # tokens 64-66: chunk 2 of 32-token chunks
    prompt[126:130] = b"abc!"  # tokens 127-129: straddles chunks 3 and 4
    assert answer_rank.answer_chunks(bytes(prompt), ["abc"], 32) == {2, 3, 4}
    assert answer_rank.answer_chunks(bytes(prompt), ["zzz"], 32) == set()


def test_historical_matches_planner_definition():
    lsa = LSAConfig(chunk_tokens=32, local_window_tokens=1024, sink_chunks=1)
    hist = answer_rank.historical(4096, lsa)
    # 128 chunks: chunk 0 is the sink, the last 1024 tokens (chunks 96-127) are local
    assert hist == list(range(1, 96))


def test_bad_fractions_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        answer_rank.main(["--harvest", str(tmp_path), "--documents", "x.jsonl",
                          "--indexers", "native", "--fractions", "0.03,3"])
    assert "--fractions 0.03,3 must be shares in (0, 1]" in capsys.readouterr().err


def test_plot_draws_one_panel_per_length_and_share(tmp_path):
    rows = [{"task": t, "prompt_tokens": P, "indexer": i, "fraction": f, "n": 2,
             "answer_chunk_recall": 0.5}
            for t in ("niah_single_1", "vt") for P in (4096, 16384)
            for i in ("native", "a/indexer") for f in (0.03, 0.1)]
    out = answer_rank.plot(rows, ["native", "a/indexer"],
                           {"native": "native", "a/indexer": "a/indexer"}, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_documents_that_do_not_match_the_harvest_are_refused(tmp_path, capsys, monkeypatch):
    """A JSONL without the harvest's documents is named before any scoring."""
    import types

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "other-1", "text": "x"}\n')
    fake = types.SimpleNamespace(documents=[types.SimpleNamespace(doc_id="vt-7", complete=True)])
    monkeypatch.setattr(answer_rank.HarvestManifest, "read", staticmethod(lambda root: fake))
    with pytest.raises(SystemExit):
        answer_rank.main(["--harvest", str(tmp_path), "--documents", str(docs),
                          "--indexers", "native"])
    err = capsys.readouterr().err
    assert "lacks 1 of" in err and "'vt-7'" in err and "pass the JSONL" in err
