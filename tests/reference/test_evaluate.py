"""`flashmemory eval` end to end on the tiny model with a stub task library.

Scenarios:
- lengths parse (8k -> 8192) and bad items name the fix.
- a 2-cell grid (full, recency, lsa, quest, oracle10) writes one row per cell and
  method with every key of the results contract, the table and the plot; the
  footprint columns order as they must (full = 1.0, recency below lsa's budget).
- a rerun with the same --json runs nothing (resumable), and adding a method runs
  only the missing cells.
- a foreign JSON file at --json is refused instead of overwritten.
- no backbone anywhere gives a message naming `flashmemory demo`.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest
import torch

import vllm_flashmemory.offline as offline_pkg
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from vllm_flashmemory.dsv4.tiny import TINY, build_model
from vllm_flashmemory.reference import evaluate
from vllm_flashmemory.reference.engine import EngineConfig, ReferenceEngine
from vllm_flashmemory.reference.methods import parse_methods

ROW_KEYS = {
    "task", "context_tokens", "method", "accuracy", "accuracy_stderr",
    "resident_chunk_ratio", "kv_bytes_gpu", "kv_bytes_full", "n",
}


@dataclass(frozen=True)
class _Sample:
    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]


def _stub_tasks() -> types.ModuleType:
    mod = types.ModuleType("vllm_flashmemory.offline.tasks")
    mod.TASKS = ("niah_single_1",)

    def generate(task, context_tokens, n, seed, count_tokens):
        out = []
        for i in range(n):
            key = f"{seed}{i}42"
            filler = "The grass is green. " * (context_tokens // 20)
            ctx = filler[: context_tokens // 2] + f" The magic number is {key}. " + filler
            ctx = ctx[: max(0, context_tokens - 40)]
            out.append(_Sample(f"{task}-{i}", task, ctx, "What is the magic number?", (key,)))
        return out

    mod.generate = generate
    mod.score = lambda sample, prediction: float(sample.answers[0] in prediction)
    mod.read_task_file = lambda path: []
    mod.TaskSample = _Sample
    return mod


class _ByteTokenizer:
    """The tiny model's byte tokenizer without reading files: BOS + one id per byte."""

    def __call__(self, text: str):
        return types.SimpleNamespace(input_ids=[0] + [3 + b for b in text.encode()])

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")


@pytest.fixture
def stub_tasks(monkeypatch):
    mod = _stub_tasks()
    monkeypatch.setitem(sys.modules, "vllm_flashmemory.offline.tasks", mod)
    monkeypatch.setattr(offline_pkg, "tasks", mod, raising=False)
    return mod


@pytest.fixture(scope="module")
def factory():
    model = build_model(TINY, seed=0)
    torch.manual_seed(3)
    indexer = MemoryIndexer(MemoryIndexerConfig(
        hidden_size=model.config.hidden_size, rank=32, n_heads=4,
        rope_original_max_position=4096, layer_ids=(0, 1, 2, 3),
    )).eval()
    calls = {"prefill": 0}

    def make(lsa: LSAConfig):
        eng = ReferenceEngine(model, EngineConfig(lsa=lsa, prefill_chunk_tokens=256), indexer)
        real = eng.prefill

        def counted(ids):
            calls["prefill"] += 1
            return real(ids)

        eng.prefill = counted
        return eng

    make.indexer_layers = (0, 1, 2, 3)
    make.calls = calls
    return make


def _cfg(tmp_path, methods="full,recency,lsa,quest,oracle10", **kw) -> evaluate.EvalConfig:
    return evaluate.EvalConfig(
        tasks=("niah_single_1",), lengths=(128, 256), methods=parse_methods(methods),
        json_path=str(tmp_path / "eval.json"), n=1, max_new_tokens=6, progress=False,
        tau=4, **kw,
    )


def test_parse_lengths():
    assert evaluate.parse_lengths("8k,16K, 2048") == (8192, 16384, 2048)
    with pytest.raises(ValueError, match="write e.g. 8k"):
        evaluate.parse_lengths("8kb")


def test_grid_rows_table_plot_and_resume(tmp_path, stub_tasks, factory):
    cfg = _cfg(tmp_path)
    printed: list[str] = []
    tok = _ByteTokenizer()
    rows = evaluate.run_eval(cfg, engine_factory=factory, tokenizer=tok,
                             print_fn=printed.append)
    assert len(rows) == 2 * 5
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["n"] == 1 and 0.0 <= r["accuracy"] <= 1.0
        assert 0 < r["kv_bytes_gpu"] <= r["kv_bytes_full"]
    by = {(r["context_tokens"], r["method"]): r for r in rows}
    for ctx in (128, 256):
        assert by[(ctx, "full")]["resident_chunk_ratio"] == 1.0
        assert by[(ctx, "recency")]["resident_chunk_ratio"] < 1.0
        assert by[(ctx, "recency")]["kv_bytes_gpu"] < by[(ctx, "full")]["kv_bytes_gpu"]
    assert any("chunk 16 tokens" in line for line in printed)  # scaled values shown
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["rows"]) == 10
    table = evaluate.format_table(rows)
    assert "oracle10" in table and "recency" in table
    png = evaluate.plot_rows(rows, tmp_path / "plot.png")
    assert png.stat().st_size > 1000

    before = factory.calls["prefill"]
    again = evaluate.run_eval(cfg, engine_factory=factory, tokenizer=tok,
                              print_fn=printed.append)
    assert factory.calls["prefill"] == before and len(again) == 10
    more = _cfg(tmp_path, methods="full,recency,lsa,quest,oracle10,random")
    rows3 = evaluate.run_eval(more, engine_factory=factory, tokenizer=tok,
                              print_fn=printed.append)
    assert factory.calls["prefill"] == before + 2  # one sample per missing cell
    assert sorted(r["method"] for r in rows3).count("random") == 2


def test_foreign_json_is_refused(tmp_path, stub_tasks, factory):
    (tmp_path / "eval.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a `flashmemory eval` results file"):
        evaluate.run_eval(_cfg(tmp_path), engine_factory=factory,
                          tokenizer=_ByteTokenizer(), print_fn=lambda s: None)


def test_missing_backbone_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "ASSET_MODEL", tmp_path / "none")
    monkeypatch.setattr(evaluate, "FALLBACK_MODEL", tmp_path / "none2")
    with pytest.raises(FileNotFoundError, match="flashmemory demo"):
        evaluate.resolve_model_paths(None, None)


def test_indexer_is_paired_only_with_its_own_backbone(tmp_path, monkeypatch):
    asset, tiny = tmp_path / "asset", tmp_path / "tiny"
    tiny_indexer = tmp_path / "demo_indexer"
    for folder in (asset, tiny, tiny_indexer):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    monkeypatch.setattr(evaluate, "ASSET_MODEL", asset)
    monkeypatch.setattr(evaluate, "ASSET_INDEXER", asset / "indexer")
    monkeypatch.setattr(evaluate, "FALLBACK_MODEL", tiny)
    monkeypatch.setattr(evaluate, "FALLBACK_INDEXER", tiny_indexer)
    # the committed backbone has no indexer: the default is the pair that is complete
    assert evaluate.resolve_model_paths(None, None) == (tiny, tiny_indexer)
    # an explicit backbone never borrows another model's indexer
    assert evaluate.resolve_model_paths(str(asset), None) == (asset, None)
    assert evaluate.resolve_model_paths(str(tiny), None) == (tiny, tiny_indexer)


def test_device_flag_is_validated(tmp_path):
    """--device takes cpu (the default) or cuda; anything else names the fix."""
    from vllm_flashmemory import cli

    assert _cfg(tmp_path).device == "cpu"
    with pytest.raises(ValueError, match=r"--device 'tpu'.*use --device cpu"):
        _cfg(tmp_path, device="tpu")
    with pytest.raises(ValueError, match=r"--device 'tpu'.*use --device cpu"):
        cli.main(["eval", "--tasks", "niah_single_1", "--json", str(tmp_path / "e.json"),
                  "--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --device cpu"):
            _cfg(tmp_path, device="cuda")
