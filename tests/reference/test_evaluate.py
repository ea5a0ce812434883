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
- each sample decodes with room for every answer (a four-answer row is written whole,
  where the old longest-answer + 8 limit cut it to one or two), and a file holding
  multi-answer rows from that old limit is refused, its single-answer rows kept.
- --workers: the missing cells split round-robin, longest first, each exactly once;
  merged rows keep the main file's row of a cell; --cells restricts run_eval; the
  worker command keeps every setting; a fake two-worker run merges a killed run's
  shard, a finished worker and a dead one's partial shard, reports the dead one
  (exit 1) and a rerun runs only what it missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
from pathlib import Path
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
    mod.single_answer = lambda task: task == "niah_single_1"
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


def test_fixed_window_rows_and_resume_guard(tmp_path, stub_tasks, factory):
    """--local-window-tokens/--chunk-tokens hold at every length; lsa<pct> keeps
    oracle<pct>'s count; a file made under one window refuses another."""
    cfg = _cfg(tmp_path, methods="full,lsa50,oracle50", local_window_tokens=32,
               chunk_tokens=8)
    tok = _ByteTokenizer()
    rows = evaluate.run_eval(cfg, engine_factory=factory, tokenizer=tok, print_fn=lambda s: None)
    assert {(r["local_window_tokens"], r["chunk_tokens"]) for r in rows} == {(32, 8)}
    by = {(r["context_tokens"], r["method"]): r for r in rows}
    for ctx in (128, 256):
        assert by[(ctx, "lsa50")]["resident_chunk_ratio"] == pytest.approx(
            by[(ctx, "oracle50")]["resident_chunk_ratio"])
        assert by[(ctx, "lsa50")]["resident_chunk_ratio"] < 1.0
    with pytest.raises(ValueError, match="local window 32 and chunk 8 tokens"):
        evaluate.run_eval(_cfg(tmp_path, methods="full,lsa50,oracle50,recency"),
                          engine_factory=factory, tokenizer=tok, print_fn=lambda s: None)
    with pytest.raises(ValueError, match="multiple of 4"):
        _cfg(tmp_path, chunk_tokens=6)


def test_plot_series_means_and_flags_partial_methods():
    rows = [_row("a", 128, "full", 1.0), _row("b", 128, "full", 0.0),
            _row("a", 128, "lsa3", 1.0)]
    rows[2]["kv_bytes_gpu"] = 0.5
    series = {label: (lengths, xs, ys) for label, lengths, xs, ys in evaluate.plot_series(rows)}
    assert series["full"] == ([128], [100.0], [50.0])
    assert series["lsa3 (1 of 2 tasks)"] == ([128], [50.0], [100.0])


def test_plot_series_line_averages_one_task_set():
    # b is measured at 128 only: full's line averages task a alone at both lengths,
    # not a+b at 128 and a at 256
    rows = [_row("a", 128, "full", 1.0), _row("b", 128, "full", 0.0),
            _row("a", 256, "full", 0.5), _row("b", 256, "lsa", 1.0)]
    series = {label: (lengths, ys) for label, lengths, _, ys in evaluate.plot_series(rows)}
    assert series["full (1 of 2 tasks)"] == ([128, 256], [100.0, 50.0])
    assert series["lsa (1 of 2 tasks)"] == ([256], [100.0])


def test_tables_list_shares_in_budget_order():
    labels = ["lsa10", "oracle10", "lsa3", "full", "lsa", "oracle3", "recency"]
    assert sorted(labels, key=evaluate.method_sort_key) == [
        "full", "lsa", "lsa3", "lsa10", "oracle3", "oracle10", "recency"]


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


# ---- --workers and --cells --------------------------------------------------------------


def _row(task, ctx, method, acc=0.5):
    return {"task": task, "context_tokens": ctx, "method": method, "accuracy": acc,
            "accuracy_stderr": 0.0, "resident_chunk_ratio": 1.0, "kv_bytes_gpu": 1.0,
            "kv_bytes_full": 1.0, "n": 1}


def test_workers_flag_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"--workers 0 must be a positive integer"):
        _cfg(tmp_path, workers=0)
    with pytest.raises(ValueError, match=r"--cells item vt@128 is not a cell"):
        _cfg(tmp_path, cells=(("vt", 128),))
    assert evaluate.parse_cells("niah_single_1@2k, vt@128") == (
        ("niah_single_1", 2048), ("vt", 128))
    with pytest.raises(ValueError, match="must be task@length"):
        evaluate.parse_cells("niah_single_1")


def _units(plan):
    return [(u.task, u.length, ",".join(s.label for s in u.methods)) for u in plan]


def test_plan_units_one_job_per_missing_cell_costliest_first(tmp_path):
    cfg = evaluate.EvalConfig(
        tasks=("t1", "t2"), lengths=(128, 512, 256), methods=parse_methods("full,lsa"),
        json_path=str(tmp_path / "e.json"), workers=2,
    )
    # t1@512 is done; t2@128 lacks lsa, so it is still missing, with lsa alone.
    rows = [_row("t1", 512, "full"), _row("t1", 512, "lsa"), _row("t2", 128, "full")]
    plan = evaluate.plan_units(cfg, rows)
    assert _units(plan) == [("t2", 512, "full,lsa"), ("t1", 256, "full,lsa"),
                            ("t2", 256, "full,lsa"), ("t1", 128, "full,lsa"),
                            ("t2", 128, "lsa")]
    assert evaluate.plan_units(cfg, rows) == plan  # deterministic
    done = [_row(t, n, m) for t in cfg.tasks for n in cfg.lengths for m in ("full", "lsa")]
    assert evaluate.plan_units(cfg, done) == []


def test_plan_units_splits_cells_by_methods_to_fill_the_workers(tmp_path):
    """One cell, many methods, 4 workers: the costliest job halves until there are 4;
    together they hold each missing method once; oracle jobs without full and quest
    jobs without lsa count the pass they need."""
    methods = "full,lsa,oracle10,oracle25,oracle50,quest,random,recency"
    cfg = evaluate.EvalConfig(tasks=("t",), lengths=(1024,), methods=parse_methods(methods),
                              json_path=str(tmp_path / "e.json"), workers=4)
    plan = evaluate.plan_units(cfg, [_row("t", 1024, "random")])
    assert len(plan) == 4
    labels = [s.label for u in plan for s in u.methods]
    assert sorted(labels) == sorted(set(methods.split(",")) - {"random"})
    assert [u.cost for u in plan] == sorted((u.cost for u in plan), reverse=True)
    assert max(u.passes for u in plan) <= 4  # 8 passes in one job before the split
    oracle_only = evaluate.WorkUnit("t", 1024, parse_methods("oracle25,oracle50"))
    assert oracle_only.passes == 4  # prefill, full's attention, two oracles
    quest = evaluate.WorkUnit("t", 1024, parse_methods("lsa,quest"))
    assert quest.passes == 3
    # one method per cell cannot split further: as many jobs as methods
    many = dataclasses.replace(cfg, workers=50, methods=parse_methods("full,lsa"))
    assert _units(evaluate.plan_units(many, [])) == [("t", 1024, "full"), ("t", 1024, "lsa")]


def test_plan_units_counts_the_samples_left_in_the_log(tmp_path):
    """A 32K cell with 14 of 16 samples logged costs less than an untouched 16K cell,
    so the 16K cell is the one that splits; the halves keep their methods' counts."""
    cfg = evaluate.EvalConfig(tasks=("a", "b"), lengths=(16384, 32768),
                              methods=parse_methods("full,random,recency"),
                              json_path=str(tmp_path / "e.json"), n=16, workers=3)
    rows = [_row("a", 16384, m) for m in ("full", "random", "recency")]
    rows += [_row("b", 32768, m) for m in ("full", "random", "recency")]
    records = [{"task": "a", "context_tokens": 32768, "method": m, "sample": i}
               for m in ("full", "random", "recency") for i in range(14)]
    plan = evaluate.plan_units(cfg, rows, records)
    assert _units(plan) == [("b", 16384, "full,random"), ("b", 16384, "recency"),
                            ("a", 32768, "full,random,recency")]
    assert dict(plan[-1].left) == {"full": 2, "random": 2, "recency": 2}
    assert plan[-1].cost == 32768 * (2 + 6)  # 2 prefills, 6 decodes
    assert dict(plan[0].left) == {"full": 16, "random": 16}
    # without the log the 32K cell is the costliest and splits first
    assert _units(evaluate.plan_units(cfg, rows))[0][0:2] == ("a", 32768)


def test_plan_units_weighs_cells_by_their_logged_seconds(tmp_path):
    """Two cells of one length, one sample logged each: the one whose (sample, method)
    took 5x longer (cwe's long answers) is the costlier and the one that splits."""
    cfg = evaluate.EvalConfig(tasks=("cwe", "vt"), lengths=(16384,),
                              methods=parse_methods("random,recency"),
                              json_path=str(tmp_path / "e.json"), n=16, workers=3)
    records = [{"task": t, "context_tokens": 16384, "method": m, "sample": 0, "seconds": sec}
               for t, sec in (("cwe", 50.0), ("vt", 10.0)) for m in ("random", "recency")]
    weights = evaluate.cell_weights(records)
    assert weights[("cwe", 16384)] == pytest.approx(5 / 3)
    assert weights[("vt", 16384)] == pytest.approx(1 / 3)
    plan = evaluate.plan_units(cfg, [], records)
    assert _units(plan) == [("cwe", 16384, "random"), ("cwe", 16384, "recency"),
                            ("vt", 16384, "random,recency")]
    assert plan[0].weight == plan[1].weight == weights[("cwe", 16384)]
    # records without seconds weigh nothing: every cell keeps weight 1
    assert evaluate.cell_weights([{**r, "seconds": None} for r in records]) == {}


def test_merge_rows_keeps_the_main_files_rows():
    main = [_row("t", 128, "full", acc=1.0)]
    shards = [[_row("t", 128, "full", acc=0.0), _row("t", 128, "lsa")],
              [_row("t", 128, "lsa", acc=0.0), _row("t", 256, "full")]]
    merged = evaluate.merge_rows(main, shards)
    assert [evaluate.cell_key(r) for r in merged] == [
        ("t", 128, "full"), ("t", 128, "lsa"), ("t", 256, "full")]
    assert merged[0]["accuracy"] == 1.0 and merged[1]["accuracy"] == 0.5


def test_cells_restrict_run_eval(tmp_path, stub_tasks, factory):
    cfg = _cfg(tmp_path, methods="full,recency", cells=(("niah_single_1", 256),))
    rows = evaluate.run_eval(cfg, engine_factory=factory, tokenizer=_ByteTokenizer(),
                             print_fn=lambda s: None)
    assert sorted(evaluate.cell_key(r) for r in rows) == [
        ("niah_single_1", 256, "full"), ("niah_single_1", 256, "recency")]


def test_worker_command_keeps_the_settings(tmp_path):
    cfg = _cfg(tmp_path, methods="full,oracle,random,lsa5", threshold=0.25, workers=3,
               model="m", task_file="f.jsonl", local_window_tokens=1024, chunk_tokens=32)
    unit = evaluate.WorkUnit("niah_single_1", 256, parse_methods("oracle,lsa5"))
    cmd = evaluate.worker_command(cfg, unit, "s.json")
    assert cmd[:4] == [sys.executable, "-m", "vllm_flashmemory.cli", "eval"]
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(cmd[4:])
    assert parse_methods(args.methods) == unit.methods  # the job's methods only
    assert evaluate.parse_lengths(args.lengths) == cfg.lengths
    assert evaluate.parse_cells(args.cells) == (("niah_single_1", 256),)
    assert (args.json, args.workers, args.no_progress, args.plot) == ("s.json", 1, True, None)
    assert (args.threshold, args.tau, args.n, args.model, args.indexer, args.task_file) == (
        0.25, 4, 1, "m", None, "f.jsonl")
    assert (args.local_window_tokens, args.chunk_tokens) == (1024, 32)
    assert args.cuda_memory_fraction is None  # a CPU grid caps nothing
    # every job appends its finished samples to the parent's log
    assert args.samples_log == str(tmp_path / "eval.json.samples.jsonl")


def test_cuda_workers_split_the_gpu_memory(tmp_path):
    fields = {f.name for f in dataclasses.fields(evaluate.EvalConfig)}
    assert "cuda_memory_fraction" in fields
    with pytest.raises(ValueError, match="--cuda-memory-fraction 1.5"):
        _cfg(tmp_path, cuda_memory_fraction=1.5)
    cfg = _cfg(tmp_path, workers=3)
    object.__setattr__(cfg, "device", "cuda")  # no GPU needed to build the command
    unit = evaluate.WorkUnit("niah_single_1", 256, cfg.methods)
    cmd = evaluate.worker_command(cfg, unit, "s.json")
    assert cmd[cmd.index("--cuda-memory-fraction") + 1] == "0.3000"
    cmd = evaluate.worker_command(cfg, unit, "s.json", workers_per_gpu=2)  # 2 GPUs
    assert cmd[cmd.index("--cuda-memory-fraction") + 1] == "0.4500"


def test_workers_merge_shards_and_report_failures(tmp_path, stub_tasks, monkeypatch, capsys):
    """--workers 2 with a fake worker command: one worker writes its rows, the other
    writes one row and dies; a killed run's shard is merged first; main rows win."""
    from vllm_flashmemory import cli

    out = tmp_path / "eval.json"
    evaluate.write_rows(out, [_row("niah_single_1", 128, "full", acc=1.0)])
    evaluate.write_rows(f"{out}.worker0.json", [  # left by a killed run
        _row("niah_single_1", 128, "full", acc=0.0), _row("niah_single_1", 128, "recency")])
    launched, failing = [], [("niah_single_1", 256)]

    def fake(cfg, unit, shard, workers_per_gpu=None):
        cells = [(unit.task, unit.length)]
        launched.append(cells)
        rows = [_row(t, n, s.label) for t, n in cells for s in unit.methods]
        fail = any(c in failing for c in cells)
        if fail:
            rows = rows[:1]
        script = (f"from vllm_flashmemory.reference.evaluate import write_rows\n"
                  f"write_rows({shard!r}, {rows!r})\n"
                  f"print('boom' if {fail} else 'ok')\nraise SystemExit(3 if {fail} else 0)")
        return [sys.executable, "-c", script]

    monkeypatch.setattr(evaluate, "worker_command", fake)
    argv = ["eval", "--tasks", "niah_single_1", "--lengths", "128,256,512",
            "--methods", "full,recency", "--json", str(out), "--workers", "2"]
    assert cli.main(argv) == 1
    assert launched == [[("niah_single_1", 512)], [("niah_single_1", 256)]]
    rows = evaluate.read_rows(out)
    assert sorted(evaluate.cell_key(r)[1:] for r in rows) == [
        (128, "full"), (128, "recency"), (256, "full"), (512, "full"), (512, "recency")]
    assert [r["accuracy"] for r in rows if evaluate.cell_key(r)[1:] == (128, "full")] == [1.0]
    assert evaluate.shard_paths(str(out)) == []
    printed = capsys.readouterr().out
    assert "worker 1 exited with 3" in printed and "boom" in printed
    assert "recency" in printed  # the table of the merged rows

    launched.clear()
    failing.clear()
    assert cli.main(argv) == 0  # the rerun only runs the cell the dead worker missed
    assert launched == [[("niah_single_1", 256)]]
    assert len(evaluate.read_rows(out)) == 6


def _killed_after(factory, prefills: int):
    """factory's engines, but the prefill after `prefills` of them raises as a
    scheduler's SIGTERM would (side_by_side turns it into KeyboardInterrupt)."""
    seen = {"n": 0}

    def make(lsa):
        eng = factory(lsa)
        real = eng.prefill

        def prefill(ids):
            seen["n"] += 1
            if seen["n"] > prefills:
                raise KeyboardInterrupt("signal 15")
            return real(ids)

        eng.prefill = prefill
        return eng

    make.indexer_layers = factory.indexer_layers
    return make


_SAMPLE_FIELDS = ("accuracy", "accuracy_stderr", "resident_chunk_ratio", "kv_bytes_gpu",
                  "kv_bytes_full", "n")


def test_a_killed_cell_resumes_at_its_next_sample(tmp_path, stub_tasks, factory):
    """A cell killed after 2 of 3 samples keeps them in <json>.samples.jsonl; the
    rerun prefills only the third, and its rows equal an uninterrupted run's."""
    from vllm_flashmemory.reference import samples_log

    tok = _ByteTokenizer()
    methods = "full,recency,oracle10"
    whole = dataclasses.replace(_cfg(tmp_path, methods=methods), lengths=(128,), n=3,
                                json_path=str(tmp_path / "whole.json"))
    ref = evaluate.run_eval(whole, engine_factory=factory, tokenizer=tok, print_fn=lambda s: None)

    cfg = dataclasses.replace(whole, json_path=str(tmp_path / "eval.json"))
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(cfg, engine_factory=_killed_after(factory, 2), tokenizer=tok,
                          print_fn=lambda s: None)
    assert evaluate.read_rows(cfg.json_path) == []  # the cell never finished
    log = tmp_path / "eval.json.samples.jsonl"
    records = samples_log.read_records(log)
    assert sorted((r["sample"], r["method"]) for r in records) == [
        (i, m) for i in (0, 1) for m in ("full", "oracle10", "recency")]
    with open(log, "a") as f:
        f.write('{"task": "niah_single_1", "sample": 2, "sco')  # torn by the kill

    before = factory.calls["prefill"]
    printed: list[str] = []
    rows = evaluate.run_eval(cfg, engine_factory=factory, tokenizer=tok, print_fn=printed.append)
    assert factory.calls["prefill"] == before + 1  # only sample 3
    assert sum("3 of 3 methods from eval.json.samples.jsonl" in p for p in printed) == 2
    key = lambda r: r["method"]  # noqa: E731
    for a, b in zip(sorted(rows, key=key), sorted(ref, key=key)):
        assert a["method"] == b["method"]
        for k in _SAMPLE_FIELDS:
            assert a[k] == pytest.approx(b[k]), (a["method"], k)

    assert samples_log.prune(log, rows) == 0 and not log.exists()  # the cell has rows


def test_sample_records_of_other_settings_are_not_reused(tmp_path, stub_tasks, factory):
    """Records made at another threshold are left alone (rows carry the threshold,
    records too); a record whose prompt differs (another generator) is not taken."""
    from vllm_flashmemory.reference import samples_log

    tok = _ByteTokenizer()
    cfg = dataclasses.replace(_cfg(tmp_path, methods="full,lsa"), lengths=(128,), n=2,
                              threshold=0.5)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(cfg, engine_factory=_killed_after(factory, 1), tokenizer=tok,
                          print_fn=lambda s: None)
    log = cfg.samples_log_path
    assert len(samples_log.read_records(log)) == 2  # sample 0: full and lsa

    other = dataclasses.replace(cfg, threshold=0.25)
    printed: list[str] = []
    before = factory.calls["prefill"]
    evaluate.run_eval(other, engine_factory=factory, tokenizer=tok, print_fn=printed.append)
    assert factory.calls["prefill"] == before + 2  # the threshold differs: both samples
    assert not any("methods from" in p for p in printed)  # rows carry it, records too

    records = samples_log.read_records(log)
    for r in records:
        r["prompt_sha256"] = "0" * 16
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    again = dataclasses.replace(cfg, json_path=str(tmp_path / "again.json"),
                                samples_log=str(log))
    before = factory.calls["prefill"]
    evaluate.run_eval(again, engine_factory=factory, tokenizer=tok, print_fn=lambda s: None)
    assert factory.calls["prefill"] == before + 2


def test_sample_log_prune_keeps_cells_without_rows(tmp_path):
    from vllm_flashmemory.reference import samples_log

    log = tmp_path / "g.json.samples.jsonl"
    vals = dict(score=1, resident_chunks=2, total_chunks=4, kv_bytes_gpu=1, kv_bytes_full=2,
                seconds=0.1)
    samples_log.append_records(log, [
        samples_log.make_record("vt", 128, m, i, "ab", {"n": 2}, vals)
        for m in ("full", "lsa") for i in (0, 1)])
    assert samples_log.prune(log, [_row("vt", 128, "full")]) == 2
    assert {r["method"] for r in samples_log.read_records(log)} == {"lsa"}
    with pytest.raises(ValueError, match="needs seconds"):
        samples_log.make_record("vt", 128, "full", 0, "ab", {},
                               {k: v for k, v in vals.items() if k != "seconds"})


def test_worker_slots_spread_over_the_gpus(tmp_path, stub_tasks, monkeypatch):
    """3 jobs on 2 slots over GPUs 3 and 7: each job's process sees its slot's GPU
    alone, the first two run on different GPUs, and at most 2 run at once."""
    out = tmp_path / "eval.json"
    monkeypatch.setattr(evaluate, "visible_gpus", lambda device: ["3", "7"])

    def fake(cfg, unit, shard, workers_per_gpu=None):
        rows = [_row(unit.task, unit.length, s.label) for s in unit.methods]
        script = (f"import os\nfrom vllm_flashmemory.reference.evaluate import write_rows\n"
                  f"write_rows({shard!r}, {rows!r})\n"
                  f"print(os.environ['CUDA_VISIBLE_DEVICES'], {workers_per_gpu})")
        return [sys.executable, "-c", script]

    monkeypatch.setattr(evaluate, "worker_command", fake)
    cfg = dataclasses.replace(_cfg(tmp_path, methods="full,recency", workers=2),
                              lengths=(128, 256, 512), json_path=str(out))
    logs = []
    rows, failures = evaluate.run_workers(cfg, print_fn=logs.append)
    assert failures == [] and len(rows) == 6
    assert logs[0] == "3 jobs, 2 at a time over GPUs 3,7"
    seen = []
    for i in range(3):
        gpu, per_gpu = Path(f"{out}.worker{i}.log").read_text().split()
        seen.append(gpu)
        assert per_gpu == "1"  # 2 slots over 2 GPUs: one process per GPU
    assert sorted(seen[:2]) == ["3", "7"] and seen[2] in ("3", "7")


def test_rows_name_their_weights_and_resume_refuses_others(tmp_path, stub_tasks, factory):
    """Rows carry the backbone digest (lsa/quest rows also the indexer's); a rerun
    with another backbone, or another indexer while lsa rows exist, is refused before
    any work; rows of methods without an indexer stay valid under another one."""
    tok, quiet = _ByteTokenizer(), (lambda s: None)
    one = {"model_sha256": "m1", "indexer_sha256": "i1"}
    cfg = _cfg(tmp_path, methods="full,lsa")
    rows = evaluate.run_eval(cfg, engine_factory=factory, tokenizer=tok, print_fn=quiet,
                             identity=one)
    by = {r["method"]: r for r in rows}
    assert by["full"]["model_sha256"] == "m1" and "indexer_sha256" not in by["full"]
    assert by["lsa"]["indexer_sha256"] == "i1"
    before = factory.calls["prefill"]
    with pytest.raises(ValueError, match="lsa rows at 128 tokens made with indexer_sha256 i1"):
        evaluate.run_eval(_cfg(tmp_path, methods="full,lsa,recency"), engine_factory=factory,
                          tokenizer=tok, print_fn=quiet, identity={**one, "indexer_sha256": "i2"})
    with pytest.raises(ValueError, match="model_sha256 m1, but this run's is m2; .*--model"):
        evaluate.run_eval(_cfg(tmp_path, methods="full,recency"), engine_factory=factory,
                          tokenizer=tok, print_fn=quiet, identity={"model_sha256": "m2"})
    assert factory.calls["prefill"] == before  # refused before any prefill
    evaluate.run_eval(_cfg(tmp_path, methods="full,lsa,recency"), engine_factory=factory,
                      tokenizer=tok, print_fn=quiet, identity=one)
    assert factory.calls["prefill"] == before + 2  # same weights: resumes, adds recency


def test_run_identity_digests_the_weight_files(tmp_path):
    model, indexer = tmp_path / "m", tmp_path / "m" / "indexer"
    indexer.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"backbone")
    (indexer / "config.json").write_text("{}")
    (indexer / "memory_indexer.safetensors").write_bytes(b"indexer")
    cfg = evaluate.EvalConfig(tasks=("niah_single_1",), lengths=(128,),
                              methods=parse_methods("full"), json_path=str(tmp_path / "e.json"),
                              model=str(model), indexer=str(indexer))
    got = evaluate.run_identity(cfg, needs_indexer=True)
    assert got == {"model_sha256": evaluate.file_digest(model / "model.safetensors"),
                   "indexer_sha256": evaluate.file_digest(indexer / "memory_indexer.safetensors")}
    assert got["model_sha256"] != got["indexer_sha256"] and len(got["model_sha256"]) == 16
    assert evaluate.run_identity(cfg, needs_indexer=False).keys() == {"model_sha256"}


def test_default_threshold_is_the_indexers_calibration(tmp_path):
    """No --threshold: the checkpoint's calibration, else the paper's 0.5; a malformed
    calibration is refused with the file named."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    indexer = MemoryIndexer(MemoryIndexerConfig(hidden_size=16, rank=8, n_heads=2,
                                                head_dim=16, rope_dim=8, layer_ids=(0,)))
    indexer.save(tmp_path / "plain")
    t, why = evaluate.default_threshold(str(model), str(tmp_path / "plain"))
    assert t == 0.5 and "carries no calibration" in why
    cal = {"threshold": 0.8, "target_resident": 0.1, "held_out_resident": 0.078,
           "bucket": "16K-32K", "chunk_tokens": 32}
    indexer.save(tmp_path / "cal", calibration=cal)
    t, why = evaluate.default_threshold(str(model), str(tmp_path / "cal"))
    assert t == 0.8 and "0.078 of held-out historical chunks" in why and "chunk 32" in why
    assert MemoryIndexer.load(tmp_path / "cal").config == indexer.config  # still loads
    bad = json.loads((tmp_path / "cal" / "config.json").read_text())
    bad["calibration"]["threshold"] = 1.5
    (tmp_path / "cal" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"cal/config.json.*threshold must be a number in \[0, 1\]"):
        evaluate.default_threshold(str(model), str(tmp_path / "cal"))


def test_committed_indexer_is_calibrated():
    cal = evaluate.default_threshold(None, None)
    assert cal[0] == 0.8 and "calibration" in cal[1]


def test_resume_refuses_lsa_rows_of_another_threshold(tmp_path, stub_tasks, factory):
    tok, quiet = _ByteTokenizer(), (lambda s: None)
    evaluate.run_eval(_cfg(tmp_path, methods="full,lsa"), engine_factory=factory,
                      tokenizer=tok, print_fn=quiet)
    with pytest.raises(ValueError, match="lsa rows at 128 tokens with threshold 0.5, but "
                       "this run's is 0.8; pass --threshold 0.5"):
        evaluate.run_eval(_cfg(tmp_path, methods="full,lsa,recency", threshold=0.8),
                          engine_factory=factory, tokenizer=tok, print_fn=quiet)


class _ListingEngine:
    """Writes every answer of the sample, listed, and stops at max_new_tokens: what
    the limit lets through is what gets scored."""

    def __init__(self, text: str):
        self.ids, self.limits = _ByteTokenizer()(text).input_ids[1:], []

    def prefill(self, prompt):
        return types.SimpleNamespace(seconds=0.0)

    def generate(self, prefill, spec, max_new_tokens, **kw):
        self.limits.append(max_new_tokens)
        return types.SimpleNamespace(
            tokens=self.ids[:max_new_tokens], resident_chunks=1, total_chunks=1,
            kv_bytes_gpu=1.0, kv_bytes_full=1.0, seconds=0.0,
            chunk_attention_mass=None, mean_selected_chunks=1.0,
        )


@pytest.mark.parametrize("key_room", [False, True])
@pytest.mark.parametrize("task", ["niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"])
def test_every_answer_fits_the_decode_limit(tmp_path, task, key_room):
    from vllm_flashmemory.offline import backbone, tasks

    sample = tasks.generate(task, 8192, 1, 0, backbone.count_tokens)[0]
    # the backbone's trained form: with --key-room, each asked key named (the longer)
    listed = backbone.answer_text(sample, echo_keys=key_room)
    engine = _ListingEngine(listed)
    cfg = _cfg(tmp_path, methods="full,recency")
    cfg = dataclasses.replace(cfg, max_new_tokens=evaluate.EvalConfig.max_new_tokens,
                              key_room=key_room)
    values = evaluate._run_sample(engine, _ByteTokenizer(), tasks, sample, cfg.methods, cfg)
    assert len(sample.answers) > 1
    keys = tasks.question_keys(sample)
    assert (len(keys) > 1) == (task == "niah_multiquery")
    room_keys = keys if key_room else ()
    assert set(engine.limits) == {min(cfg.max_new_tokens, evaluate.answer_token_limit(
        [len(a.encode()) + 1 for a in sample.answers],
        [len(k.encode()) + 1 for k in room_keys]))}
    assert engine.limits[0] >= len(engine.ids)  # nothing of the listed answer is cut
    assert values["full"]["score"] == 1.0 and values["recency"]["score"] == 1.0


def test_keyed_answer_is_cut_without_key_room(tmp_path):
    # Why --key-room exists: a four-key answer with its keys named does not fit the
    # plain rule's room, so a model trained with --echo-keys would lose its last values.
    from vllm_flashmemory.offline import backbone, tasks

    sample = tasks.generate("niah_multiquery", 8192, 1, 0, backbone.count_tokens)[0]
    engine = _ListingEngine(backbone.answer_text(sample, echo_keys=True))
    cfg = dataclasses.replace(_cfg(tmp_path, methods="full"),
                              max_new_tokens=evaluate.EvalConfig.max_new_tokens)
    values = evaluate._run_sample(engine, _ByteTokenizer(), tasks, sample, cfg.methods, cfg)
    assert engine.limits[0] < len(engine.ids)
    assert values["full"]["score"] < 1.0


def test_answer_token_limit_keeps_the_single_answer_rule():
    assert evaluate.answer_token_limit([8]) == 16  # longest answer + 8, as before
    assert evaluate.answer_token_limit([8, 8, 8, 8]) == 32 + 3 * 4 + 8
    assert evaluate.answer_token_limit([8, 8, 8, 8], [20]) == 32 + 3 * 4 + 8  # one key
    assert evaluate.answer_token_limit([8, 8], [20, 10]) == 16 + 4 + 8 + 30 + 2 * 4
    assert evaluate.answer_limit_rule("niah_multiquery") == evaluate.ANSWER_LIMIT_RULE
    assert evaluate.answer_limit_rule("niah_multiquery", key_room=True) == (
        evaluate.ANSWER_LIMIT_KEY_ROOM)
    assert {evaluate.answer_limit_rule(t, key_room=True)
            for t in ("niah_multivalue", "cwe", "mine")} == {evaluate.ANSWER_LIMIT_RULE}


def test_resume_refuses_rows_of_another_answer_limit(tmp_path):
    from vllm_flashmemory.offline import tasks

    cfg = _cfg(tmp_path)
    old_single = _row("niah_single_1", 128, "full", 1.0)
    old_multi = _row("niah_multivalue", 128, "full", 0.25)
    new_multi = {**old_multi, "answer_limit": evaluate.ANSWER_LIMIT_RULE}
    assert not tasks.single_answer("niah_multivalue")
    evaluate.check_answer_limit_rows(cfg, [old_single, new_multi])  # both kept
    with pytest.raises(ValueError, match="rows of niah_multivalue decoded under another "
                       "answer limit.*delete those rows"):
        evaluate.check_answer_limit_rows(cfg, [old_single, old_multi])
    # Multi-query rows measured with and without --key-room never share a file.
    plain = {**_row("niah_multiquery", 128, "full", 0.5),
             "answer_limit": evaluate.ANSWER_LIMIT_RULE}
    keyed = {**plain, "answer_limit": evaluate.ANSWER_LIMIT_KEY_ROOM}
    evaluate.check_answer_limit_rows(cfg, [old_single, new_multi, plain])
    with pytest.raises(ValueError, match="rows of niah_multiquery.*--key-room"):
        evaluate.check_answer_limit_rows(cfg, [new_multi, keyed])
    key_cfg = dataclasses.replace(cfg, key_room=True)
    evaluate.check_answer_limit_rows(key_cfg, [old_single, new_multi, keyed])
    with pytest.raises(ValueError, match="rows of niah_multiquery"):
        evaluate.check_answer_limit_rows(key_cfg, [plain])


def test_worker_command_passes_key_room(tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path), key_room=True)
    unit = evaluate.WorkUnit("niah_multiquery", 128, cfg.methods)
    cmd = evaluate.worker_command(cfg, unit, str(tmp_path / "shard.json"))
    assert "--key-room" in cmd
    plain = evaluate.worker_command(dataclasses.replace(cfg, key_room=False), unit, "s.json")
    assert "--key-room" not in plain
