"""Answer-chunk recall: does a Memory Indexer keep the chunks that hold the answer?

Golden-label coverage (what `flashmemory train` reports) scores an indexer against the
labels it was trained on, so indexers trained on different labels cannot be compared
by it, and a label set that is mostly diffuse attention hides a miss on the one chunk
that matters. Task documents (scripts/task_documents.py) know their answer, so this
script scores every indexer against the same thing: at the prompt-end refresh (the
harvest's first query, where LSA selects for the answer), the share of the historical
chunks holding an answer occurrence that land in the indexer's top K% of historical
chunks, K as `flashmemory eval`'s lsa<K> keeps them (residency_planner.keep_count),
per task. Documents whose answer lies only in the always-resident tail (no_context)
have nothing to find and are left out.

`native` scores with the backbone's own lightning indexer at that query (the harvest's
logits, max over CSA layers); any other name is a Memory Indexer folder.

Usage (repo root):
  python bench/answer_rank.py --harvest H --documents docs.jsonl \
      --indexers native vllm_flashmemory/assets/backbone/indexer runs/train/indexer \
      [--skip-documents runs/train/metrics.json] [--json out.json] [--plot out.png]
Several --harvest/--documents pairs may be given (in the same order).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, combine_layers
from vllm_flashmemory.core.residency_planner import (
    ResidencyPlanner,
    chunk_scores_from_entries,
    keep_count,
)
from vllm_flashmemory.offline.dataset import HarvestManifest, load_document
from vllm_flashmemory.offline.metrics import document_task

NATIVE = "native"


def answer_strings(tail: str) -> list[str]:
    """The answers of a task document's completion (backbone.answer_text's forms:
    ' a, b.' or vt's 'A B')."""
    return [a for a in re.split(r"[,\s]+", tail.strip().rstrip(".")) if a]


def answer_chunks(prompt: bytes, answers: list[str], chunk_tokens: int) -> set[int]:
    """Chunks holding any byte of any occurrence of an answer. Token i of the prompt is
    byte i - 1 (token 0 is BOS)."""
    chunks: set[int] = set()
    for a in answers:
        ab, start = a.encode(), 0
        while (i := prompt.find(ab, start)) >= 0:
            chunks.update(range((i + 1) // chunk_tokens, (i + len(ab)) // chunk_tokens + 1))
            start = i + 1
    return chunks


def historical(prompt_tokens: int, lsa: LSAConfig) -> list[int]:
    """The chunks LSA selects among after this prompt's prefill, as the planner has them."""
    planner = ResidencyPlanner(lsa)
    planner.add_request("doc", prompt_tokens)
    return list(planner.historical_chunks("doc"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--harvest", nargs="+", required=True)
    p.add_argument("--documents", nargs="+", required=True,
                   help="the JSONL each harvest was made from, in --harvest's order")
    p.add_argument("--indexers", nargs="+", required=True)
    p.add_argument("--skip-documents", default=None,
                   help="a `flashmemory train` metrics.json: its train_documents are left out")
    p.add_argument("--fractions", default="0.03,0.1")
    p.add_argument("--chunk-tokens", type=int, default=32)
    p.add_argument("--local-window-tokens", type=int, default=1024)
    p.add_argument("--sink-chunks", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="bar chart of the recall per task (PNG)")
    args = p.parse_args(argv)
    if len(args.harvest) != len(args.documents):
        p.error(f"--harvest has {len(args.harvest)} folders but --documents "
                f"{len(args.documents)} files; give one JSONL per harvest.")
    fractions = [float(f) for f in args.fractions.split(",")]
    if not all(0 < f <= 1 for f in fractions):
        p.error(f"--fractions {args.fractions} must be shares in (0, 1], e.g. 0.03,0.1.")
    lsa = LSAConfig(chunk_tokens=args.chunk_tokens, local_window_tokens=args.local_window_tokens,
                    sink_chunks=args.sink_chunks)  # validates the three
    skip = set()
    if args.skip_documents:
        skip = set(json.loads(Path(args.skip_documents).read_text())["train_documents"])
    models = {name: None if name == NATIVE else MemoryIndexer.load(name, map_location="cpu").eval()
              for name in args.indexers}
    # recall[(task, prompt_tokens, indexer, fraction)] = per-document recalls
    recall: dict[tuple, list[float]] = defaultdict(list)
    for harvest, docs_path in zip(args.harvest, args.documents):
        texts = {}
        for line in open(docs_path):
            row = json.loads(line)
            texts[row["id"]] = row["text"]
        m = HarvestManifest.read(Path(harvest))
        missing = [d.doc_id for d in m.documents if d.complete and d.doc_id not in texts]
        if missing:
            p.error(f"--documents {docs_path} lacks {len(missing)} of {harvest}'s documents "
                    f"(e.g. {missing[0]!r}); pass the JSONL that harvest was made from.")
        P = m.prompt_tokens + 1  # the query sits on the prompt's last token
        ept = args.chunk_tokens // m.geometry.compress_ratio
        n_chunks = -(-P // args.chunk_tokens)
        hist = historical(P, lsa)  # every document of a harvest has the same prompt length
        for info in m.documents:
            if not info.complete or info.doc_id in skip:
                continue
            text = texts[info.doc_id].encode()
            prompt, tail = text[: P - 1], text[P - 1 :].decode()
            wanted = answer_chunks(prompt, answer_strings(tail), args.chunk_tokens) & set(hist)
            if not wanted:
                continue
            loaded = {}  # layer_ids -> DocumentWindows: read each document once per layer set
            for name, model in models.items():
                if model is None:
                    with safe_open(str(info.root / info.dir / "shard00000.safetensors"), "pt") as f:
                        assert int(f.get_tensor("positions")[0]) == P - 1
                        entry = f.get_tensor("logits")[0].float().amax(0)  # [N]
                else:
                    layer_ids = model.config.layer_ids
                    if layer_ids not in loaded:
                        loaded[layer_ids] = load_document(m, info, layer_ids)
                    doc = loaded[layer_ids]
                    assert int(doc.positions[0]) == P - 1
                    with torch.no_grad():  # [L, 1, N] -> [N]
                        s = model(doc.hidden[:1].transpose(0, 1), doc.positions[:1], doc.k_icomp)
                    entry = combine_layers(s, "or")[0]
                entry = entry[: P // m.geometry.compress_ratio]  # visible at the query
                chunk = chunk_scores_from_entries(entry, ept, n_chunks)[hist]  # [H]
                order = [hist[i] for i in torch.argsort(chunk, descending=True, stable=True)]
                for f in fractions:
                    kept = set(order[: keep_count(f, len(hist))])
                    recall[(document_task(info.doc_id), P, name, f)].append(len(wanted & kept) / len(wanted))
    rows = [{"task": t, "prompt_tokens": P, "indexer": name, "fraction": f, "n": len(v),
             "answer_chunk_recall": sum(v) / len(v)} for (t, P, name, f), v in sorted(recall.items())]
    if not rows:
        print("no document with an answer in historical chunks", file=sys.stderr)
        return 1
    names = list(models)
    short = {n: (n if n == NATIVE else Path(n).parent.name + "/" + Path(n).name)[-22:] for n in names}
    for P in sorted({r["prompt_tokens"] for r in rows}):
        print(f"\nanswer-chunk recall at prompt {P}, top " + " / ".join(f"{f:g}" for f in fractions)
              + " of historical chunks")
        print(f"{'task':18s} {'n':>3s} " + " ".join(f"{short[n]:>22s}" for n in names))
        for t in sorted({r["task"] for r in rows if r["prompt_tokens"] == P}):
            cells = []
            for n in names:
                v = [r for r in rows if (r["task"], r["prompt_tokens"], r["indexer"]) == (t, P, n)]
                cells.append(" / ".join(f"{r['answer_chunk_recall']:.2f}" for r in v))
            n_docs = next(r["n"] for r in rows if (r["task"], r["prompt_tokens"]) == (t, P))
            print(f"{t:18s} {n_docs:3d} " + " ".join(f"{c:>22s}" for c in cells))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        print(f"plot {plot(rows, names, short, args.plot)}")
    return 0


def plot(rows: list[dict], names: list[str], short: dict[str, str], path: str) -> Path:
    """One panel per prompt length and top-K share: bars of answer-chunk recall per task,
    one bar per indexer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["prompt_tokens"], r["fraction"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(names)
    for ax, (P, f) in zip(axes[:, 0], panels):
        tasks = sorted({r["task"] for r in rows if r["prompt_tokens"] == P})
        for k, name in enumerate(names):
            got = {r["task"]: r["answer_chunk_recall"] for r in rows
                   if (r["prompt_tokens"], r["fraction"], r["indexer"]) == (P, f, name)}
            ax.bar([i + k * width for i in range(len(tasks))],
                   [got.get(t, 0.0) for t in tasks], width, label=short[name])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
        ax.set_xticklabels([t.replace("niah_", "") for t in tasks], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("answer-chunk recall")
        ax.set_title(f"prompt {P} tokens, top {f:g} of historical chunks", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=min(len(names), 4))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
