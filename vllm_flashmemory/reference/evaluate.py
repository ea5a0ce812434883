"""`flashmemory eval`: accuracy vs KV footprint of LSA and its baselines (paper §3).

For every (task, context length) cell it generates RULER-style samples (or reads a
task file), prefills each prompt once through the reference engine and decodes it
greedily with every requested method: `full`, `lsa`, `recency`, `random` (10%),
`oracle` (top 10/25/50% of chunks by the full-KV answer's attention mass, §3.3.2)
and `quest` (per-step page selection at the chunk budget `lsa` kept for that
sample). Each row reports accuracy (mean score, with its standard error),
`resident_chunk_ratio` and `kv_bytes_gpu` / `kv_bytes_full` through the one
footprint definition (core/footprint.py).

`--device cuda` runs the backbone and the Memory Indexer on one GPU, in fp32 like the
CPU default (no autocast; torch's default fp32 matmul precision), so `full` and `lsa` at threshold 0 stay equal to
the unmodified model's greedy tokens on that device; the cold pool stays in host
memory. The local window and the chunk scale with the context in the paper's proportions
(methods.scaled_window), or stay fixed in tokens at every length with
--local-window-tokens / --chunk-tokens (the paper's own protocol: 8K and 256 from 46K to
512K); they are printed with every cell and a results file never mixes two settings.
`lsa<pct>` (e.g. lsa10) is LSA by top-K at oracle<pct>'s footprint. Results are written
atomically after every cell; a rerun with the same --json skips completed cells. Every
row names the weights it measured (`model_sha256`; lsa and quest rows also
`indexer_sha256`), and a rerun with another backbone or Memory Indexer is refused, so
a resumed file never mixes two of them. Each sample decodes with room for every
answer, listed (answer_token_limit, capped by --max-new-tokens), and with --key-room
also for naming each key when the question asks several (a model that answers
" k1 is: v1; k2 is: v2.", as `train-backbone --echo-keys` trains); rows say which rule
they were decoded under (`answer_limit`), and a rerun refuses rows of another rule.

`--workers N` runs the missing rows as jobs of N `flashmemory eval` subprocesses at a
time (the tiny backbone's eval is bound by Python, not the GPU): one job per cell, or,
with fewer cells than workers, the costliest cells split by methods (plan_units). On
CUDA the worker slots spread round-robin over every visible GPU, so one command fills
a multi-GPU host. Each job writes its own shard `<json>.worker<i>.json`; the shards
merge into --json when they finish, or at the start of the next run if this one was
killed.

Every finished sample is kept too: each (sample, method) appends a line to
`<json>.samples.jsonl` (samples_log), and a rerun with the same settings takes those
samples back, so a cell killed at sample 11 of 16 resumes at sample 12. The lines of
cells that have rows are dropped when a run ends.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_flashmemory.core.atomic import atomic_write, atomic_write_text
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.side_by_side import (
    gpu_slot_env,
    run_side_by_side,
    visible_gpus,
    workers_per_gpu,
)
from vllm_flashmemory.reference import samples_log
from vllm_flashmemory.reference.methods import (
    Method,
    MethodSpec,
    parse_methods,
    scaled_window,
)

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent.parent
ASSET_MODEL = _PACKAGE / "assets" / "backbone"
ASSET_INDEXER = _PACKAGE / "assets" / "backbone" / "indexer"
FALLBACK_MODEL = Path("artifacts/tiny")
FALLBACK_INDEXER = Path("artifacts/demo/train/indexer")
RESULTS_FORMAT = "flashmemory-eval/1"
_LENGTH = re.compile(r"^(\d+)([kK]?)$")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation grid; validated before any model work starts."""

    tasks: tuple[str, ...]
    # Context lengths in tokens (the CLI reads 8k as 8192).
    lengths: tuple[int, ...]
    methods: tuple[MethodSpec, ...]
    json_path: str
    plot_path: str | None = None
    # Backbone folder; None = the committed backbone, else artifacts/tiny.
    model: str | None = None
    # Memory Indexer checkpoint; None = the backbone's, else the demo's.
    indexer: str | None = None
    # Samples per cell.
    n: int = 8
    # JSONL of TaskSample records instead of generated samples.
    task_file: str | None = None
    seed: int = 0
    # LSA refresh interval in decode steps (the paper's 64).
    tau: int = 64
    # Memory Indexer threshold (Eq. 5; the paper's 0.5).
    threshold: float = 0.5
    # Always-resident prompt tail and residency unit in tokens, the same at every
    # length; None = scaled with the context (methods.scaled_window).
    local_window_tokens: int | None = None
    chunk_tokens: int | None = None
    # Cap on generated tokens; each sample gets room for every answer below it
    # (answer_token_limit). cwe's ten numbered words need ~125 byte tokens.
    max_new_tokens: int = 160
    # Room to restate each asked key before its values where a question asks several
    # (niah_multiquery): for a backbone trained with `train-backbone --echo-keys`.
    key_room: bool = False
    prefill_chunk_tokens: int = 1024
    progress: bool = True
    # Where the backbone, the Memory Indexer and the device KV run: "cpu" or "cuda".
    device: str = "cpu"
    # Subprocesses that split the missing cells (run() only; run_eval ignores it).
    workers: int = 1
    # Only these (task, length) cells; None = every cell of tasks x lengths.
    cells: tuple[tuple[str, int], ...] | None = None
    # Share of the GPU's memory this process may hold (None: no cap); workers get
    # dsv4.checkpoint.worker_memory_fraction (why: see there).
    cuda_memory_fraction: float | None = None
    # Per-sample records (samples_log); None = `<json_path>.samples.jsonl`. Workers get
    # the parent's, so every job's finished samples survive a kill.
    samples_log: str | None = None

    @property
    def samples_log_path(self) -> Path:
        return Path(self.samples_log) if self.samples_log else samples_log.log_path(self.json_path)

    def __post_init__(self) -> None:
        from vllm_flashmemory.dsv4.checkpoint import check_device, check_memory_fraction

        check_device(self.device)
        if not self.tasks:
            raise ValueError("--tasks is empty; name at least one task, e.g. niah_single_1.")
        if not self.lengths or any(x < 16 for x in self.lengths):
            raise ValueError(
                f"--lengths {list(self.lengths)} must list context lengths of at "
                "least 16 tokens, e.g. 8k,16k,32k."
            )
        if not self.methods:
            raise ValueError("--methods is empty; use e.g. full,lsa,recency,random,oracle,quest.")
        check_memory_fraction(self.cuda_memory_fraction)
        if not isinstance(self.key_room, bool):
            raise ValueError(f"key_room={self.key_room!r} must be True or False (--key-room).")
        for name in ("n", "tau", "max_new_tokens", "prefill_chunk_tokens", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} {v!r} must be a positive integer.")
        for flag, value in (("--local-window-tokens", self.local_window_tokens),
                            ("--chunk-tokens", self.chunk_tokens)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{flag} {value!r} must be a non-negative integer.")
        if self.chunk_tokens is not None and (
            self.chunk_tokens < 4 or self.chunk_tokens % 4
        ):
            raise ValueError(
                f"--chunk-tokens {self.chunk_tokens} must be a positive multiple of 4 "
                "(a chunk holds whole compressed entries of 4 tokens); e.g. 32."
            )
        if self.cells is not None:
            object.__setattr__(self, "cells", tuple((str(t), int(n)) for t, n in self.cells))
            for t, n in self.cells:
                if t not in self.tasks or n not in self.lengths:
                    raise ValueError(
                        f"--cells item {t}@{n} is not a cell of --tasks "
                        f"{','.join(self.tasks)} x --lengths {','.join(map(str, self.lengths))}."
                    )


def parse_lengths(text: str) -> tuple[int, ...]:
    """`8k,16k,2048` -> (8192, 16384, 2048)."""
    out = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        m = _LENGTH.match(raw)
        if m is None:
            raise ValueError(
                f"--lengths item {raw!r} is not a token count; write e.g. 8k or 8192."
            )
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return tuple(out)


def parse_cells(text: str) -> tuple[tuple[str, int], ...]:
    """`niah_single_1@8k,vt@2048` -> (("niah_single_1", 8192), ("vt", 2048))."""
    out = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        task, _, length = raw.rpartition("@")
        if not task or not _LENGTH.match(length):
            raise ValueError(f"--cells item {raw!r} must be task@length, e.g. vt@8192.")
        out.append((task, parse_lengths(length)[0]))
    return tuple(out)


def resolve_model_paths(model: str | None, indexer: str | None) -> tuple[Path, Path | None]:
    """The backbone and indexer to evaluate, with the defaults of the module doc.

    An indexer is only ever paired with the backbone it was trained for: the
    committed backbone with its own `indexer/`, artifacts/tiny with the demo's.
    """
    pairs = ((ASSET_MODEL, ASSET_INDEXER), (FALLBACK_MODEL, FALLBACK_INDEXER))
    if model is None:
        found = [(m, i) for m, i in pairs if (m / "config.json").is_file()]
        if not found:
            raise FileNotFoundError(
                f"no backbone found: neither {ASSET_MODEL} (the committed backbone) "
                f"nor {FALLBACK_MODEL} exists; pass --model DIR, or build the default "
                "with `flashmemory demo` (it writes artifacts/tiny and the indexer)."
            )
        if indexer is not None:
            return found[0][0], Path(indexer)
        with_indexer = [(m, i) for m, i in found if (i / "config.json").is_file()]
        model_path, paired = (with_indexer or found)[0]
        return model_path, paired if (paired / "config.json").is_file() else None
    model_path = Path(model)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r} holds no config.json; pass a model folder such as "
            "one written by `flashmemory make-tiny DIR`."
        )
    if indexer is not None:
        return model_path, Path(indexer)
    candidates = [model_path / "indexer"]
    candidates += [i for m, i in pairs if m.resolve() == model_path.resolve()]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return model_path, candidate
    return model_path, None


# ---- results file -------------------------------------------------------------------


def cell_key(row: dict[str, Any]) -> tuple[str, int, str]:
    return (str(row["task"]), int(row["context_tokens"]), str(row["method"]))


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f"--json {str(p)!r} exists but is not a `flashmemory eval` results file "
            f"(format {RESULTS_FORMAT!r}); pick another path or remove it."
        )
    return list(data["rows"])


def write_rows(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": RESULTS_FORMAT, "rows": list(rows)}, indent=2) + "\n"
    atomic_write_text(p, text)


# ---- per-cell accumulation ------------------------------------------------------------


@dataclass
class _CellStats:
    scores: list[float] = field(default_factory=list)
    resident_chunks: list[float] = field(default_factory=list)
    total_chunks: list[float] = field(default_factory=list)
    kv_bytes_gpu: list[float] = field(default_factory=list)
    kv_bytes_full: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add_values(self, v: dict[str, float]) -> None:
        """One sample from its samples_log record (values()'s keys)."""
        self.scores.append(float(v["score"]))
        self.resident_chunks.append(v["resident_chunks"])
        self.total_chunks.append(v["total_chunks"])
        self.kv_bytes_gpu.append(v["kv_bytes_gpu"])
        self.kv_bytes_full.append(v["kv_bytes_full"])
        self.seconds.append(v["seconds"])

    @staticmethod
    def values(score: float, result: Any, prefill_seconds: float) -> dict[str, float]:
        return {
            "score": float(score),
            "resident_chunks": float(result.resident_chunks),
            "total_chunks": float(result.total_chunks),
            "kv_bytes_gpu": float(result.kv_bytes_gpu),
            "kv_bytes_full": float(result.kv_bytes_full),
            # Wall time of this method for one sample: the shared prefill + its decode.
            "seconds": float(prefill_seconds + result.seconds),
        }

    def row(self, task: str, length: int, label: str, extra: dict[str, Any]) -> dict[str, Any]:
        n = len(self.scores)
        acc = sum(self.scores) / n
        var = sum((s - acc) ** 2 for s in self.scores) / (n - 1) if n > 1 else 0.0
        gpu = sum(self.kv_bytes_gpu) / n
        full = sum(self.kv_bytes_full) / n
        total = sum(self.total_chunks)
        return {
            "task": task,
            "context_tokens": length,
            "method": label,
            "accuracy": acc,
            "accuracy_stderr": math.sqrt(var / n),
            # Summed over requests (DESIGN.md "Footprint").
            "resident_chunk_ratio": sum(self.resident_chunks) / total if total else 1.0,
            "kv_bytes_gpu": gpu,
            "kv_bytes_full": full,
            "kv_bytes_ratio": gpu / full if full else 1.0,
            "n": n,
            "seconds_per_sample": sum(self.seconds) / n,
            **extra,
        }


def _method_order(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """full first (oracle needs its attention), lsa before quest (quest's budget)."""
    rank = {Method.FULL: 0, Method.LSA: 1}
    return sorted(specs, key=lambda s: rank.get(s.method, 2))


def run_eval(
    cfg: EvalConfig,
    *,
    engine_factory: Callable[[LSAConfig], Any] | None = None,
    tokenizer: Any = None,
    print_fn: Callable[[str], None] = print,
    identity: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every missing cell; returns all rows (old and new).

    identity: the weights' digests the rows carry (run_identity); computed from the
    model and indexer folders when the default engine runs, else whatever the caller
    passes with its engine_factory (none: rows carry none and nothing is checked).
    """
    from tqdm import tqdm

    from vllm_flashmemory.offline import tasks as task_lib

    rows = read_rows(cfg.json_path)
    done = {cell_key(r) for r in rows}
    _check_tasks(cfg)
    check_window_rows(cfg, rows)
    check_answer_limit_rows(cfg, rows)
    needs_indexer = _needs_indexer(cfg)
    if engine_factory is None or tokenizer is None:
        identity = run_identity(cfg, needs_indexer)
    identity = identity or {}
    check_identity_rows(cfg, rows, identity)
    todo = _missing_cells(cfg, rows)
    if not todo:
        print_fn(f"every cell is already in {cfg.json_path}; nothing to run.")
        return rows
    if engine_factory is None or tokenizer is None:
        engine_factory, tokenizer = _default_engine(cfg, needs_indexer, print_fn)
    file_samples = None
    if cfg.task_file is not None:
        file_samples = task_lib.read_task_file(cfg.task_file)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text).input_ids)

    for task, length in tqdm(todo, desc="eval cells", disable=not cfg.progress):
        window = cell_window(cfg, length)
        print_fn(f"[{task} @ {length}] {window.describe()}, tau {cfg.tau}")
        lsa = LSAConfig(
            tau=cfg.tau,
            threshold=cfg.threshold,
            local_window_tokens=window.local_window_tokens,
            chunk_tokens=window.chunk_tokens,
            indexer_layers=_indexer_layers(engine_factory),
        )
        engine = engine_factory(lsa)
        specs = _method_order([s for s in cfg.methods if (task, length, s.label) not in done])
        if file_samples is not None:
            samples = _file_cell(file_samples, task, length, cfg.lengths, count_tokens)[: cfg.n]
        else:
            samples = task_lib.generate(task, length, cfg.n, cfg.seed, count_tokens)
        if not samples:
            print_fn(f"[{task} @ {length}] no samples; skipped.")
            continue
        extra = {
            "chunk_tokens": window.chunk_tokens,
            "local_window_tokens": window.local_window_tokens,
            "tau": cfg.tau,
            "threshold": cfg.threshold,
            "answer_limit": answer_limit_rule(task, cfg.key_room),
            "max_new_tokens": cfg.max_new_tokens,
        }
        settings_of = {s.label: sample_settings(cfg, extra, _row_identity(s, identity))
                       for s in specs}
        done_samples = samples_log.cell_records(
            samples_log.read_records(cfg.samples_log_path), task, length, settings_of)
        stats = {s.label: _CellStats() for s in specs}
        bar = tqdm(samples, desc=f"{task}@{length}", leave=False, disable=not cfg.progress)
        for i, sample in enumerate(bar):
            digest = samples_log.prompt_digest(build_prompt(sample))
            have = {s.label: done_samples.get((i, s.label)) for s in specs}
            have = {k: r for k, r in have.items()
                    if r is not None and r.get("prompt_sha256") == digest}
            todo_specs = [s for s in specs if s.label not in have]
            new = (_run_sample(engine, tokenizer, task_lib, sample, todo_specs, cfg)
                   if todo_specs else {})
            samples_log.append_records(cfg.samples_log_path, (
                samples_log.make_record(task, length, label, i, digest, settings_of[label], v)
                for label, v in new.items()))
            for spec in specs:
                stats[spec.label].add_values(have.get(spec.label) or new[spec.label])
            if not cfg.progress or have:  # a worker's log shows how far its job got
                print_fn(f"[{task} @ {length}] sample {i + 1}/{len(samples)}" + (
                    f" ({len(have)} of {len(specs)} methods from {cfg.samples_log_path.name})"
                    if have else ""))
        for spec in specs:
            rows.append(stats[spec.label].row(
                task, length, spec.label, {**extra, **_row_identity(spec, identity)}))
        write_rows(cfg.json_path, rows)
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return rows


def cell_window(cfg: EvalConfig, length: int):
    """The local window and chunk of every method at `length` under cfg."""
    return scaled_window(length, cfg.local_window_tokens, cfg.chunk_tokens)


def check_window_rows(cfg: EvalConfig, rows: Sequence[dict[str, Any]]) -> None:
    """Refuse to resume a results file whose rows used another window or chunk: a
    table must never mix footprints measured under two settings."""
    for r in rows:
        length = int(r["context_tokens"])
        if length not in cfg.lengths or "chunk_tokens" not in r:
            continue
        want = cell_window(cfg, length)
        have = (r["local_window_tokens"], r["chunk_tokens"])
        if have != (want.local_window_tokens, want.chunk_tokens):
            raise ValueError(
                f"--json {cfg.json_path!r} holds {r['method']} rows at {length} tokens "
                f"with local window {have[0]} and chunk {have[1]} tokens, but this run "
                f"uses {want.local_window_tokens} and {want.chunk_tokens}; write to "
                "another --json, or pass the file's --local-window-tokens/--chunk-tokens."
            )


def check_answer_limit_rows(cfg: EvalConfig, rows: Sequence[dict[str, Any]]) -> None:
    """Refuse to resume a results file whose rows were decoded under another answer
    rule than this run's (answer_limit_rule): before "answer_limit" rows stopped at the
    longest answer + 8 tokens, which scored a four-value row at one or two values at
    most; with and without --key-room a multi-key question gets different room. Rows
    whose limit is the same under this run's rule pass (single-answer rows always did)."""
    from vllm_flashmemory.offline import tasks as task_lib

    def current(row: dict[str, Any]) -> bool:
        rule = row.get("answer_limit")
        if rule is None:  # the oldest rows: right only where one answer is written
            rule = ANSWER_LIMIT_RULE if task_lib.single_answer(row["task"]) else None
        return rule == answer_limit_rule(row["task"], cfg.key_room)

    stale = sorted({r["task"] for r in rows if not current(r)})
    if stale:
        rule = ANSWER_LIMIT_KEY_ROOM if cfg.key_room else ANSWER_LIMIT_RULE
        raise ValueError(
            f"--json {cfg.json_path!r} holds rows of {', '.join(stale)} decoded under "
            f"another answer limit than this run's {rule!r} (rows without "
            "answer_limit had room for the longest answer only); delete those rows "
            "from the file (or write to another --json), or rerun with the "
            "--key-room setting they were measured with."
        )


# Methods whose rows depend on the Memory Indexer (quest takes lsa's budget).
_INDEXER_METHODS = (Method.LSA, Method.QUEST)


def _needs_indexer(cfg: EvalConfig) -> bool:
    return any(s.method in _INDEXER_METHODS for s in cfg.methods)


def file_digest(path: Path) -> str:
    """First 16 hex digits of a file's sha256: enough to tell two checkpoints apart."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_identity(cfg: EvalConfig, needs_indexer: bool) -> dict[str, str]:
    """Digests of the backbone (and, for lsa/quest, the Memory Indexer) this run
    evaluates, as rows carry them."""
    from vllm_flashmemory.core.memory_indexer import WEIGHTS_FILE as INDEXER_WEIGHTS
    from vllm_flashmemory.dsv4.checkpoint import WEIGHTS_FILE as MODEL_WEIGHTS

    model_path, indexer_path = resolve_model_paths(cfg.model, cfg.indexer)
    out = {}
    if (model_path / MODEL_WEIGHTS).is_file():
        out["model_sha256"] = file_digest(model_path / MODEL_WEIGHTS)
    if needs_indexer and indexer_path is not None and (indexer_path / INDEXER_WEIGHTS).is_file():
        out["indexer_sha256"] = file_digest(indexer_path / INDEXER_WEIGHTS)
    return out


def _row_identity(spec: MethodSpec, identity: dict[str, str]) -> dict[str, str]:
    """The digests a row of `spec` depends on: the backbone always, the indexer for
    lsa and quest only (a full row stays valid under another indexer)."""
    return {k: v for k, v in identity.items()
            if k != "indexer_sha256" or spec.method in _INDEXER_METHODS}


def check_identity_rows(
    cfg: EvalConfig, rows: Sequence[dict[str, Any]], identity: dict[str, str]
) -> None:
    """Refuse to add rows to a results file made with another backbone, Memory Indexer
    or lsa threshold: a resumed table would mix two settings under one label."""
    flags = {"model_sha256": "--model", "indexer_sha256": "--indexer"}
    for r in rows:
        if r["method"] == Method.LSA.value and "threshold" in r and (
            float(r["threshold"]) != float(cfg.threshold)
        ):
            raise ValueError(
                f"--json {cfg.json_path!r} holds lsa rows at {r['context_tokens']} tokens "
                f"with threshold {r['threshold']}, but this run's is {cfg.threshold}; "
                f"pass --threshold {r['threshold']}, or write to another --json."
            )
        for key, want in identity.items():
            have = r.get(key)
            if have is not None and have != want:
                raise ValueError(
                    f"--json {cfg.json_path!r} holds {r['method']} rows at "
                    f"{r['context_tokens']} tokens made with {key} {have}, but this run's "
                    f"is {want}; write to another --json, or pass the {flags[key]} that "
                    "made them."
                )


def _check_tasks(cfg: EvalConfig) -> None:
    from vllm_flashmemory.offline import tasks as task_lib

    unknown = [t for t in cfg.tasks if t not in task_lib.TASKS]
    if unknown:
        raise ValueError(
            f"--tasks names {unknown}, which are not tasks; choose from "
            f"{', '.join(task_lib.TASKS)}."
        )


def _missing_cells(cfg: EvalConfig, rows: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """(task, length) cells of cfg (only cfg.cells if set) that lack a method's row."""
    done = {cell_key(r) for r in rows}
    return [
        (task, length)
        for task in cfg.tasks
        for length in cfg.lengths
        if (cfg.cells is None or (task, length) in cfg.cells)
        and any((task, length, s.label) not in done for s in cfg.methods)
    ]


# ---- side-by-side workers (--workers) ---------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """One worker's job: some methods of one (task, length) cell."""

    task: str
    length: int
    methods: tuple[MethodSpec, ...]
    # (label, samples still to decode) per method, from the sample log; None = one
    # sample each (cost then counts the passes of one sample).
    left: tuple[tuple[str, int], ...] | None = None
    # Seconds per token of this cell's passes against the grid's mean (cell_weights):
    # cwe's 150-token answers cost more per pass than a needle's 10.
    weight: float = 1.0

    @property
    def passes(self) -> int:
        """Prefill plus decode passes over the cell's samples: full and lsa when
        _base_decodes says so (named or needed), then one per other method."""
        need_full, need_lsa = _base_decodes(self.methods)
        others = [s for s in self.methods if s.label not in ("full", "lsa")]
        return 1 + need_full + need_lsa + len(others)

    @property
    def cost(self) -> float:
        """Tokens times passes still to run, times the cell's weight: a sample costs its
        prefill and the base decodes while any method lacks it, and one pass per method
        that lacks it."""
        left = dict(self.left) if self.left is not None else {s.label: 1 for s in self.methods}
        need_full, need_lsa = _base_decodes(self.methods)
        named = {s.label for s in self.methods}
        extra_base = (need_full and "full" not in named) + (need_lsa and "lsa" not in named)
        passes = max(left.values()) * (1 + extra_base) + sum(left.values())
        return self.length * passes * self.weight

    def _part(self, methods: Sequence[MethodSpec]) -> WorkUnit:
        labels = {s.label for s in methods}
        left = None if self.left is None else tuple(
            (k, v) for k, v in self.left if k in labels)
        return WorkUnit(self.task, self.length, tuple(methods), left, self.weight)

    def halves(self) -> tuple[WorkUnit, WorkUnit]:
        """The split (in method order) whose larger half costs least."""
        ordered = _method_order(self.methods)
        parts = [(self._part(ordered[:k]), self._part(ordered[k:]))
                 for k in range(1, len(ordered))]
        return min(parts, key=lambda ab: (max(ab[0].cost, ab[1].cost), -len(ab[0].methods)))


def plan_units(
    cfg: EvalConfig, rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]] = (),
) -> list[WorkUnit]:
    """The missing rows as worker jobs, costliest first: one per cell (its samples are
    prefilled once for all its methods), and while there are fewer jobs than
    cfg.workers the costliest job splits in two by methods, so a grid with few cells
    and many methods still fills every worker (a split re-runs the prefill). Costs
    count the samples each method still lacks in `records` (the sample log), so a
    half-finished cell is not split before an untouched one."""
    done = {cell_key(r) for r in rows}
    logged: dict[tuple[str, int, str], set[int]] = {}
    for r in records:
        logged.setdefault(cell_key(r), set()).add(int(r["sample"]))
    weights = cell_weights(records)

    def unit(task: str, length: int) -> WorkUnit:
        methods = tuple(_method_order(
            [s for s in cfg.methods if (task, length, s.label) not in done]))
        left = tuple((s.label, max(cfg.n - len(logged.get((task, length, s.label), ())), 0))
                     for s in methods)
        return WorkUnit(task, length, methods, left, weights.get((task, length), 1.0))

    units = [unit(task, length) for task, length in _missing_cells(cfg, rows)]
    while len(units) < cfg.workers:
        splittable = [u for u in units if len(u.methods) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda u: u.cost)
        i = units.index(big)
        units[i : i + 1] = big.halves()
    return sorted(units, key=lambda u: -u.cost)  # stable: ties keep task order


def cell_weights(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(task, length) -> its logged seconds per (sample, method) per token, over the
    mean of that across the logged cells; cells without logged seconds are left out
    (weight 1). A cell whose answers are long (cwe) weighs more than its length says."""
    seconds: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if isinstance(r.get("seconds"), (int, float)) and r["seconds"] > 0:
            cell = (str(r["task"]), int(r["context_tokens"]))
            seconds.setdefault(cell, []).append(float(r["seconds"]))
    rate = {cell: sum(v) / len(v) / cell[1] for cell, v in seconds.items()}
    if not rate:
        return {}
    mean = sum(rate.values()) / len(rate)
    return {cell: r / mean for cell, r in rate.items()}


def merge_rows(
    main: Sequence[dict[str, Any]], shards: Sequence[Sequence[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """main's rows, then each shard row whose cell_key is not yet present."""
    out = list(main)
    seen = {cell_key(r) for r in out}
    for shard in shards:
        for r in shard:
            if cell_key(r) not in seen:
                seen.add(cell_key(r))
                out.append(r)
    return out


def shard_paths(json_path: str) -> list[Path]:
    """Worker shards `<json>.worker<i>.json` present next to json_path."""
    found = glob.glob(glob.escape(json_path) + ".worker*.json")
    return sorted((Path(f) for f in found), key=lambda q: q.name)


def merge_shards(json_path: str) -> list[dict[str, Any]]:
    """Fold every worker shard into json_path (written atomically), then delete the
    shards; returns the merged rows."""
    shards = shard_paths(json_path)
    rows = read_rows(json_path)
    if shards:
        rows = merge_rows(rows, [read_rows(q) for q in shards])
        write_rows(json_path, rows)
        for q in shards:
            q.unlink()
    return rows


def worker_command(
    cfg: EvalConfig, unit: WorkUnit, shard: str, workers_per_gpu: int | None = None
) -> list[str]:
    """`flashmemory eval` for one job: cfg's settings, its cell and methods, its shard.
    workers_per_gpu: processes sharing this worker's GPU (default cfg.workers)."""
    cmd = [
        sys.executable, "-m", "vllm_flashmemory.cli", "eval",
        "--tasks", ",".join(cfg.tasks),
        "--lengths", ",".join(map(str, cfg.lengths)),
        "--methods", ",".join(s.label for s in unit.methods),
        "--json", shard,
        "--cells", f"{unit.task}@{unit.length}",
        "--n", str(cfg.n), "--seed", str(cfg.seed), "--tau", str(cfg.tau),
        "--threshold", repr(cfg.threshold), "--max-new-tokens", str(cfg.max_new_tokens),
        *(["--key-room"] if cfg.key_room else []),
        "--prefill-chunk-tokens", str(cfg.prefill_chunk_tokens),
        "--device", cfg.device, "--no-progress",
        "--samples-log", str(cfg.samples_log_path),
    ]
    for flag, number in (("--local-window-tokens", cfg.local_window_tokens),
                         ("--chunk-tokens", cfg.chunk_tokens)):
        if number is not None:
            cmd += [flag, str(number)]
    if cfg.device == "cuda":
        from vllm_flashmemory.dsv4.checkpoint import worker_memory_fraction

        share = worker_memory_fraction(workers_per_gpu or cfg.workers)
        cmd += ["--cuda-memory-fraction", f"{share:.4f}"]
    for flag, value in (("--model", cfg.model), ("--indexer", cfg.indexer),
                        ("--task-file", cfg.task_file)):
        if value is not None:
            cmd += [flag, value]
    return cmd


def run_workers(
    cfg: EvalConfig, print_fn: Callable[[str], None] = print
) -> tuple[list[dict[str, Any]], list[str]]:
    """Evaluate the missing rows as plan_units jobs, cfg.workers at a time, each
    worker slot on one GPU (round-robin over visible_gpus); returns the merged rows
    and one report per failed job (its exit code and log tail)."""
    _check_tasks(cfg)
    rows = merge_shards(cfg.json_path)  # shards a killed run left behind
    check_window_rows(cfg, rows)
    check_answer_limit_rows(cfg, rows)
    check_identity_rows(cfg, rows, run_identity(cfg, _needs_indexer(cfg)))
    units = plan_units(cfg, rows, samples_log.read_records(cfg.samples_log_path))
    if not units:
        print_fn(f"every cell is already in {cfg.json_path}; nothing to run.")
        return rows, []
    slots = min(cfg.workers, len(units))
    gpus = visible_gpus(cfg.device)
    per_gpu = workers_per_gpu(slots, gpus)
    print_fn(f"{len(units)} jobs, {slots} at a time"
             + (f" over GPUs {','.join(gpus[:slots])}" if gpus else ""))
    commands, logs = [], []
    for i, unit in enumerate(units):
        shard, log = f"{cfg.json_path}.worker{i}.json", f"{cfg.json_path}.worker{i}.log"
        methods = ",".join(s.label for s in unit.methods)
        print_fn(f"job {i}: {unit.task}@{unit.length} {methods} (log {log})")
        commands.append(worker_command(cfg, unit, shard, per_gpu))
        logs.append(log)
    failures = run_side_by_side(
        commands, logs, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
        parallel=slots,
        slot_env=gpu_slot_env(gpus),
        # every finished job is kept, and every finished sample; a rerun runs the rest
        on_stop=lambda: finish_rows(cfg),
    )
    return finish_rows(cfg), failures


def finish_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Merge the worker shards into --json and drop the sample records of cells that
    now have rows (no worker may be running)."""
    rows = merge_shards(cfg.json_path)
    samples_log.prune(cfg.samples_log_path, rows)
    return rows


def _base_decodes(specs: Sequence[MethodSpec]) -> tuple[bool, bool]:
    """Whether a sample needs the full decode (named, or for oracle's attention) and
    the threshold-lsa decode (named, or for quest's budget)."""
    labels = {s.label for s in specs}
    need_full = "full" in labels or any(s.method is Method.ORACLE for s in specs)
    need_lsa = "lsa" in labels or any(s.method is Method.QUEST for s in specs)
    return need_full, need_lsa


def sample_settings(
    cfg: EvalConfig, extra: dict[str, Any], identity: dict[str, str]
) -> dict[str, Any]:
    """What a sample's record must match to be reused: the row's settings (window,
    chunk, tau, threshold, answer limit, weights) and what picks and prefills the
    samples."""
    return {**extra, **identity, "n": cfg.n, "seed": cfg.seed,
            "prefill_chunk_tokens": cfg.prefill_chunk_tokens,
            "samples": cfg.task_file or "generated"}


def _run_sample(engine, tokenizer, task_lib, sample, specs, cfg: EvalConfig) -> dict[str, dict]:
    """Decode one sample with every spec after one prefill; label -> its values."""
    prompt = tokenizer(build_prompt(sample)).input_ids
    keys = task_lib.question_keys(sample) if cfg.key_room else ()
    limit = min(cfg.max_new_tokens, answer_token_limit(
        [len(tokenizer(a).input_ids) for a in sample.answers],
        [len(tokenizer(k).input_ids) for k in keys]))
    prefill = engine.prefill(prompt)
    need_full, need_lsa = _base_decodes(specs)
    full = lsa = None
    out: dict[str, dict] = {}
    if need_full:
        full = engine.generate(prefill, MethodSpec(Method.FULL), max_new_tokens=limit,
                               record_attention=True)
    if need_lsa:
        lsa = engine.generate(prefill, MethodSpec(Method.LSA), max_new_tokens=limit)
    for spec in specs:
        if spec.method is Method.FULL:
            result = full
        elif spec.method is Method.LSA and not spec.top_k:
            result = lsa
        elif spec.method is Method.ORACLE:
            result = engine.generate(prefill, spec, max_new_tokens=limit,
                                     oracle_chunk_mass=full.chunk_attention_mass)
        elif spec.method is Method.QUEST:
            budget = round(lsa.mean_selected_chunks)
            result = engine.generate(
                prefill, MethodSpec(Method.QUEST, quest_budget_chunks=budget),
                max_new_tokens=limit,
            )
        else:
            result = engine.generate(prefill, spec, max_new_tokens=limit)
        text = tokenizer.decode(list(result.tokens), skip_special_tokens=True)
        out[spec.label] = _CellStats.values(task_lib.score(sample, text), result, prefill.seconds)
    return out


# Tokens per answer beyond its own, for what lists it: ", " or cwe's " 10. "; and per
# named key, for " is: " and "; ".
ANSWER_SEPARATOR_TOKENS = 4
# The rules rows carry as "answer_limit" (answer_limit_rule). Rows without it were
# decoded for the longest answer + 8 only, which cut multi-answer rows to one or two
# answers. --key-room adds room for each asked key where a question asks several;
# elsewhere both give the same limit, so those rows keep the plain rule's name.
ANSWER_LIMIT_RULE = "all_answers+8"
ANSWER_LIMIT_KEY_ROOM = "all_answers+keys+8"


def answer_token_limit(answer_tokens: Sequence[int], key_tokens: Sequence[int] = ()) -> int:
    """Decode steps for a sample whose answers take `answer_tokens` tokens each: room
    to write every one, listed, + 8; when its question asks several keys (of
    `key_tokens` tokens each, given with --key-room), room to name each before its
    values too (" k1 is: v1; k2 is: v2.", as `train-backbone --echo-keys` trains). One
    answer: its length + 8, as before."""
    limit = sum(answer_tokens) + ANSWER_SEPARATOR_TOKENS * (len(answer_tokens) - 1) + 8
    if len(key_tokens) > 1:
        limit += sum(key_tokens) + ANSWER_SEPARATOR_TOKENS * len(key_tokens)
    return limit


def tasks_with_key_room() -> frozenset[str]:
    """Generated tasks whose questions ask several keys (with --key-room,
    answer_token_limit gives them room to name each)."""
    from vllm_flashmemory.offline import tasks as task_lib

    return frozenset(t for t, spec in task_lib.NIAH.items() if spec.n_queries > 1)


def answer_limit_rule(task: str, key_room: bool = False) -> str:
    """The answer_limit rows of `task` are decoded under: with --key-room, room for
    the keys where its questions ask several."""
    if key_room and task in tasks_with_key_room():
        return ANSWER_LIMIT_KEY_ROOM
    return ANSWER_LIMIT_RULE


def build_prompt(sample: Any) -> str:
    """The prompt the backbone reads: the context, then the question on a new line."""
    return f"{sample.context}\n{sample.question}"


def _file_cell(samples, task: str, length: int, lengths: Sequence[int], count_tokens) -> list:
    """Task-file samples of `task` whose prompt length is nearest to `length`."""
    out = []
    for s in samples:
        if s.task != task:
            continue
        n = count_tokens(build_prompt(s))
        if min(lengths, key=lambda x: abs(x - n)) == length:
            out.append(s)
    return out


def _indexer_layers(engine_factory) -> tuple[int, ...]:
    layers = getattr(engine_factory, "indexer_layers", None)
    return tuple(layers) if layers else (0,)


def _default_engine(cfg: EvalConfig, needs_indexer: bool, print_fn):
    import torch
    from transformers import AutoTokenizer

    from vllm_flashmemory.core.memory_indexer import MemoryIndexer
    from vllm_flashmemory.dsv4.checkpoint import limit_cuda_memory, load_model_on
    from vllm_flashmemory.reference.engine import EngineConfig, ReferenceEngine

    model_path, indexer_path = resolve_model_paths(cfg.model, cfg.indexer)
    if needs_indexer and indexer_path is None:
        raise FileNotFoundError(
            f"methods lsa/quest need a Memory Indexer and none was found next to "
            f"{model_path}, in {ASSET_INDEXER} or in {FALLBACK_INDEXER}; pass "
            "--indexer DIR or run `flashmemory demo` to train one."
        )
    print_fn(f"model {model_path}, indexer {indexer_path}, device {cfg.device}")
    torch.manual_seed(cfg.seed)
    limit_cuda_memory(cfg.cuda_memory_fraction, cfg.device)
    model = load_model_on(model_path, cfg.device)
    indexer = (
        MemoryIndexer.load(indexer_path, map_location=cfg.device)
        if indexer_path is not None
        else None
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    def factory(lsa: LSAConfig):
        ecfg = EngineConfig(lsa=lsa, prefill_chunk_tokens=cfg.prefill_chunk_tokens,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        return ReferenceEngine(model, ecfg, indexer)

    factory.indexer_layers = (  # type: ignore[attr-defined]
        tuple(indexer.config.layer_ids) if indexer is not None else (0,)
    )
    return factory, tokenizer


# ---- report ---------------------------------------------------------------------------


def method_sort_key(label: str) -> tuple[str, int]:
    """Name first, then percent: lsa, lsa3, lsa10, oracle3 ... (tables read in budget order)."""
    m = re.fullmatch(r"([a-z_]+?)(\d*)", label)
    if m is None:
        return (label, -1)
    return (m.group(1), int(m.group(2)) if m.group(2) else -1)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'task':<18}{'ctx':>7} {'method':<10}{'accuracy':>16}{'resident':>10}"
        f"{'kv_gpu MiB':>12}{'kv ratio':>10}{'n':>4}{'s/sample':>10}{'chunk':>7}{'local':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["task"], r["context_tokens"],
                                         method_sort_key(r["method"]))):
        acc = f"{r['accuracy']:.3f}±{r['accuracy_stderr']:.3f}"
        lines.append(
            f"{r['task']:<18}{r['context_tokens']:>7} {r['method']:<10}{acc:>16}"
            f"{r['resident_chunk_ratio']:>10.3f}{r['kv_bytes_gpu'] / 2**20:>12.2f}"
            f"{r['kv_bytes_gpu'] / r['kv_bytes_full']:>10.3f}{r['n']:>4}"
            f"{r.get('seconds_per_sample', float('nan')):>10.1f}"
            f"{r.get('chunk_tokens', 0):>7}{r.get('local_window_tokens', 0):>7}"
        )
    return "\n".join(lines)


def plot_series(
    rows: Sequence[dict[str, Any]],
) -> list[tuple[str, list[int], list[float], list[float]]]:
    """(label, context lengths, % KV on device, % accuracy) per method, each point
    the mean over the tasks that method has at every one of its lengths, so a line's
    points average one task set. A method with fewer tasks than the grid holds says so
    in its label ("lsa3 (10 of 12 tasks)"): its mean is not comparable with the
    others'."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["context_tokens"]), []).append(r)
    n_tasks = len({r["task"] for r in rows})
    series = []
    for method in sorted({m for m, _ in groups}, key=method_sort_key):
        pts = sorted((ctx, g) for (m, ctx), g in groups.items() if m == method)
        shared = set.intersection(*({r["task"] for r in g} for _, g in pts))
        if not shared:
            continue  # no task at every length: no line to draw
        pts = [(ctx, [r for r in g if r["task"] in shared]) for ctx, g in pts]
        xs = [100 * sum(r["kv_bytes_gpu"] / r["kv_bytes_full"] for r in g) / len(g) for _, g in pts]
        ys = [100 * sum(r["accuracy"] for r in g) / len(g) for _, g in pts]
        label = method if len(shared) == n_tasks else f"{method} ({len(shared)} of {n_tasks} tasks)"
        series.append((label, [ctx for ctx, _ in pts], xs, ys))
    return series


def plot_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Accuracy against KV footprint (kv_bytes_gpu / kv_bytes_full), one series per
    method, one point per context length averaged over tasks (cf. the paper's Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = plot_series(rows)
    # the default cycle repeats after 10 colours (full and recency came out alike)
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    for i, (label, lengths, xs, ys) in enumerate(series):
        ax.plot(xs, ys, marker="o", label=label, color=colors[i % len(colors)])
        for ctx, x, y in zip(lengths, xs, ys):
            ax.annotate(f"{ctx // 1024}K" if ctx >= 1024 else str(ctx), (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KV cache on device, % of full KV (kv_bytes_gpu / kv_bytes_full)")
    ax.set_ylabel("accuracy, % (mean over tasks)")
    settings = sorted({(r.get("context_tokens"), r.get("chunk_tokens"), r.get("local_window_tokens")) for r in rows})
    ax.set_title("Accuracy vs KV footprint; " + "; ".join(
        f"{c}: chunk {ch}, local {lw}" for c, ch, lw in settings), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"),
                     suffix=".png")
    finally:
        plt.close(fig)
    return out


# ---- CLI ------------------------------------------------------------------------------

_D = EvalConfig.__dataclass_fields__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task names (RULER: niah_single_1, vt, cwe, ...)")
    parser.add_argument("--lengths", default="8k,16k,32k",
                        help="comma-separated context lengths, e.g. 8k,16k,32k (default: %(default)s)")
    parser.add_argument("--methods", default="full,lsa,recency,random,oracle,quest",
                        help="comma-separated methods; oracle = oracle10,oracle25,oracle50; "
                        "lsa<pct> (e.g. lsa10) = LSA by top-K at pct%% of the historical "
                        "chunks (default: %(default)s)")
    parser.add_argument("--json", required=True, help="results file; rerun to resume")
    parser.add_argument("--plot", help="accuracy-vs-footprint PNG to write")
    parser.add_argument("--model", help="backbone folder (default: the committed backbone, "
                        "else artifacts/tiny)")
    parser.add_argument("--indexer", help="Memory Indexer checkpoint (default: the "
                        "backbone's, else artifacts/demo/train/indexer)")
    parser.add_argument("--n", type=int, default=_D["n"].default,
                        help="samples per cell (default: %(default)s)")
    parser.add_argument("--task-file", help="JSONL of task samples instead of generated ones")
    parser.add_argument("--seed", type=int, default=_D["seed"].default,
                        help="seed of samples and of the random method (default: %(default)s)")
    parser.add_argument("--tau", type=int, default=_D["tau"].default,
                        help="LSA refresh interval in decode steps (default: %(default)s)")
    parser.add_argument("--threshold", type=float,
                        help="Memory Indexer threshold, Eq. 5 (default: the indexer's "
                        "calibration from `flashmemory train`, else "
                        f"{_D['threshold'].default})")
    parser.add_argument("--local-window-tokens", type=int,
                        help="always-resident prompt tail in tokens at every length "
                        "(default: 1/8 of the context, the paper's 8K of 64K)")
    parser.add_argument("--chunk-tokens", type=int,
                        help="residency unit in tokens at every length, a multiple of 4 "
                        "(default: 1/256 of the context, the paper's 256 of 64K)")
    parser.add_argument("--max-new-tokens", type=int, default=_D["max_new_tokens"].default,
                        help="cap on generated tokens (default: %(default)s)")
    parser.add_argument("--key-room", action="store_true",
                        help="room to restate each asked key before its values where a "
                        "question asks several (niah_multiquery), for a backbone trained "
                        "with `train-backbone --echo-keys`; rows record it as answer_limit "
                        f"{ANSWER_LIMIT_KEY_ROOM!r}")
    parser.add_argument("--prefill-chunk-tokens", type=int,
                        default=_D["prefill_chunk_tokens"].default,
                        help="prompt tokens per prefill forward (default: %(default)s)")
    parser.add_argument("--device", default=_D["device"].default,
                        help="cpu or cuda: where the backbone and Memory Indexer run, "
                        "fp32 either way (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--workers", type=int, default=_D["workers"].default,
                        help="processes that evaluate cells side by side (with fewer "
                        "cells than workers, cells split by methods); on cuda they "
                        "spread over every visible GPU; rows merge into --json "
                        "(default: %(default)s)")
    parser.add_argument("--cells", help=argparse.SUPPRESS)  # a worker's task@length list
    parser.add_argument("--samples-log", help=argparse.SUPPRESS)  # the parent's sample log
    parser.add_argument("--cuda-memory-fraction", type=float, help=argparse.SUPPRESS)


def default_threshold(model: str | None, indexer: str | None) -> tuple[float, str]:
    """The threshold `lsa` uses when --threshold is not given, and where it came from:
    the Memory Indexer's calibration (`flashmemory train --target-resident`), else the
    paper's 0.5. An uncalibrated 0.5 can keep half the history of a trained indexer."""
    from vllm_flashmemory.core.memory_indexer import read_calibration

    paper = EvalConfig.__dataclass_fields__["threshold"].default
    try:
        _, indexer_path = resolve_model_paths(model, indexer)
    except FileNotFoundError:
        return paper, "the paper's default (no model found yet)"
    calibration = read_calibration(indexer_path) if indexer_path is not None else None
    if calibration is None:
        return paper, f"the paper's default; {indexer_path} carries no calibration"
    resident = calibration.get("held_out_resident")
    return float(calibration["threshold"]), (
        f"{indexer_path}'s calibration: {resident:.3f} of held-out historical chunks "
        f"resident at chunk {calibration.get('chunk_tokens')} tokens"
        if isinstance(resident, (int, float)) else f"{indexer_path}'s calibration"
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threshold = args.threshold
    if threshold is None:
        threshold, source = default_threshold(args.model, args.indexer)
        if any(s.method in _INDEXER_METHODS for s in parse_methods(args.methods)):
            print(f"threshold {threshold} ({source}); --threshold overrides it")
    cfg = EvalConfig(
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        lengths=parse_lengths(args.lengths),
        methods=parse_methods(args.methods),
        json_path=args.json,
        plot_path=args.plot,
        model=args.model,
        indexer=args.indexer,
        n=args.n,
        task_file=args.task_file,
        seed=args.seed,
        tau=args.tau,
        threshold=threshold,
        local_window_tokens=args.local_window_tokens,
        chunk_tokens=args.chunk_tokens,
        max_new_tokens=args.max_new_tokens,
        key_room=args.key_room,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        progress=not args.no_progress,
        device=args.device,
        workers=args.workers,
        cells=parse_cells(args.cells) if args.cells is not None else None,
        cuda_memory_fraction=args.cuda_memory_fraction,
        samples_log=args.samples_log,
    )
    t0 = time.perf_counter()
    if cfg.workers > 1:
        rows, failures = run_workers(cfg)
    else:
        rows, failures = run_eval(cfg), []
        if cfg.cells is None:  # a worker leaves pruning to its parent
            samples_log.prune(cfg.samples_log_path, rows)
    print(format_table(rows))
    if cfg.plot_path and rows:
        print(f"plot {plot_rows(rows, cfg.plot_path)}")
    print(f"results {cfg.json_path} ({len(rows)} rows) in {time.perf_counter() - t0:.1f} s")
    for report in failures:
        print(report)
    return 1 if failures else 0
