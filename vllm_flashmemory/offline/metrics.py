"""Held-out evaluation of a Memory Indexer against golden labels, per length bucket.

For each window (query position p, visible entries s < (p + 1) // m):
    selected = Eq. 5 / 13 selection over the visible entries
    recall    = |selected ∩ golden| / |golden|
    precision = |selected ∩ golden| / |selected|
    resident  = |selected| / |visible|         (entry level; chunk level alongside)
Counts are summed over the windows of a bucket before dividing (micro averages), so a
bucket's numbers are those of all its entries together. Buckets are by the query's
context length in tokens, on power-of-two edges.

`topk_sweep` is the same held-out measure for top-K selection (`lsa<pct>` in
`flashmemory eval`): per window the ceil(f x visible chunks) chunks whose best entry
scores highest (layers combined as in Eq. 13), and the share of golden chunks and of
golden entries they hold. A needle's chunk holds many golden entries, so entry coverage
is the closer proxy of what an answer loses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vllm_flashmemory.core.memory_indexer import (
    MemoryIndexer,
    combine_layers,
    entries_to_chunks,
    select,
)
from vllm_flashmemory.offline.dataset import DocumentWindows
from vllm_flashmemory.offline.tasks import TASKS


@dataclass
class Counts:
    """Summed entry and chunk counts of a set of windows."""

    windows: int = 0
    visible: int = 0
    golden: int = 0
    selected: int = 0
    hit: int = 0
    visible_chunks: int = 0
    golden_chunks: int = 0
    selected_chunks: int = 0
    hit_chunks: int = 0

    def add(self, other: Counts) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def summary(self) -> dict[str, float | int | None]:
        """Recall, precision and resident fractions; None where the denominator is 0."""
        return {
            "windows": self.windows,
            "recall": _ratio(self.hit, self.golden),
            "precision": _ratio(self.hit, self.selected),
            "resident_fraction": _ratio(self.selected, self.visible),
            "golden_fraction": _ratio(self.golden, self.visible),
            "chunk_recall": _ratio(self.hit_chunks, self.golden_chunks),
            "chunk_resident_fraction": _ratio(
                self.selected_chunks, self.visible_chunks
            ),
            "golden_entries": self.golden,
            "selected_entries": self.selected,
            "visible_entries": self.visible,
        }


@dataclass
class EvalResult:
    threshold: float
    routing: str
    entries_per_chunk: int
    overall: dict[str, float | int | None]
    buckets: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_name(context_tokens: int) -> str:
    """Power-of-two bucket of a context length: 2500 -> '2K-4K', 700 -> '0-1K'."""
    if context_tokens < 1024:
        return "0-1K"
    lo = 2 ** math.floor(math.log2(context_tokens))
    return f"{_k(lo)}-{_k(2 * lo)}"


def bucket_sort_key(name: str) -> int:
    """Lower edge in K of a bucket_name: '0-1K' -> 0, '16K-32K' -> 16, for ordering."""
    lo = name.split("-")[0]
    return 0 if lo == "0" else int(lo[:-1])


# Denser above 0.5: a ReLU-gated Eq. 4 puts every score with no active head at exactly
# 0.5, so trained scores crowd just above it (the committed backbone's indexer: 0.5-0.7).
SWEEP_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)
SWEEP_KEYS = (
    "recall",
    "precision",
    "resident_fraction",
    "chunk_recall",
    "chunk_resident_fraction",
)


def evaluate_indexer(
    model: MemoryIndexer,
    documents: list[DocumentWindows],
    threshold: float = 0.5,
    routing: str = "or",
    entries_per_chunk: int = 64,
    batch_windows: int = 64,
) -> EvalResult:
    """Recall, precision and resident fraction of golden entries (Eq. 5, 13) per "
    "bucket."""
    return evaluate_thresholds(
        model, documents, (threshold,), routing, entries_per_chunk, batch_windows
    )[0]


@torch.no_grad()
def evaluate_thresholds(
    model: MemoryIndexer,
    documents: list[DocumentWindows],
    thresholds: tuple[float, ...] | list[float],
    routing: str = "or",
    entries_per_chunk: int = 64,
    batch_windows: int = 64,
) -> list[EvalResult]:
    """evaluate_indexer at every threshold, scoring each window once."""
    overall = [Counts() for _ in thresholds]
    buckets: list[dict[str, Counts]] = [{} for _ in thresholds]
    for scores, visible, gold, names, _ in _scored_batches(model, documents, batch_windows):
        for t, threshold in enumerate(thresholds):
            sel = select(scores, threshold, routing) & visible  # [B, N]
            counts = _batch_counts(sel, gold, visible, entries_per_chunk)
            for name, c in zip(names, counts):
                overall[t].add(c)
                buckets[t].setdefault(name, Counts()).add(c)
    results = []
    for threshold, total, per_bucket in zip(thresholds, overall, buckets):
        ordered = sorted(per_bucket.items(), key=lambda kv: bucket_sort_key(kv[0]))
        results.append(
            EvalResult(
                threshold=threshold,
                routing=routing,
                entries_per_chunk=entries_per_chunk,
                overall=total.summary(),
                buckets={k: v.summary() for k, v in ordered},
            )
        )
    return results


def threshold_sweep(
    model: MemoryIndexer,
    documents: list[DocumentWindows],
    thresholds: tuple[float, ...] | list[float] = SWEEP_THRESHOLDS,
    routing: str = "or",
    entries_per_chunk: int = 64,
) -> list[dict[str, float | None]]:
    """Recall and resident fractions per threshold (ascending), overall and under
    "buckets" per context-length bucket: a threshold that meets a footprint target at
    4K need not at 16K, where more entries can fire."""
    ordered = sorted(set(thresholds))
    results = evaluate_thresholds(model, documents, ordered, routing, entries_per_chunk)
    return [
        {
            "threshold": r.threshold,
            **{k: r.overall[k] for k in SWEEP_KEYS},
            "buckets": {
                name: {k: b[k] for k in SWEEP_KEYS} for name, b in r.buckets.items()
            },
        }
        for r in results
    ]


def check_target_resident(target_resident: Any) -> None:
    """Refuse a calibration target outside (0, 1] (or not a number) before any work."""
    if isinstance(target_resident, bool) or not (
        isinstance(target_resident, (int, float)) and 0 < target_resident <= 1
    ):
        raise ValueError(
            f"target_resident={target_resident!r} must lie in (0, 1]; use 0.1 for the "
            "paper's ~10% of chunks."
        )


def calibrate_threshold(
    sweep: list[dict[str, Any]], target_resident: float
) -> dict[str, Any] | None:
    """The lowest swept threshold whose held-out chunk resident fraction is at most
    `target_resident`, read in the longest context bucket (more entries fire there, so
    a threshold that meets the target at 16K meets it at 4K); None when none does.

    Lowest, because among thresholds that meet the footprint it keeps the most chunks.
    """
    check_target_resident(target_resident)
    for row in sorted(sweep, key=lambda r: r["threshold"]):
        buckets = row.get("buckets") or {}
        name = max(buckets, key=bucket_sort_key) if buckets else "all"
        resident = (buckets[name] if buckets else row)["chunk_resident_fraction"]
        if resident is not None and resident <= target_resident:
            return {"threshold": row["threshold"], "target_resident": target_resident,
                    "held_out_resident": resident, "bucket": name}
    return None


# Shares of the visible chunks a top-K selection keeps (lsa1 .. lsa20).
TOPK_FRACTIONS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


@torch.no_grad()
def topk_sweep(
    model: MemoryIndexer,
    documents: list[DocumentWindows],
    fractions: tuple[float, ...] | list[float] = TOPK_FRACTIONS,
    routing: str = "or",
    entries_per_chunk: int = 64,
    batch_windows: int = 64,
) -> list[dict[str, object]]:
    """Golden chunk recall and golden entry coverage of top-K chunk selection, per
    fraction (ascending), overall, under "buckets" per context-length bucket and under
    "tasks" per document_task (which kind of question the indexer misses)."""
    ordered = sorted(set(fractions))
    for f in ordered:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"top-K fraction {f!r} must lie in (0, 1], e.g. 0.05.")
    # per fraction: ("overall",) | ("bucket", name) | ("task", task) ->
    #   [windows, golden_chunks, hit_chunks, golden, covered, kept, vis_c]
    sums: list[dict[tuple[str, ...], list[int]]] = [{} for _ in ordered]
    for scores, vis, gold, names, task in _scored_batches(model, documents, batch_windows):
        n = vis.shape[1]
        entry = combine_layers(scores, routing).float().masked_fill(~vis, float("-inf"))
        n_chunks = -(-n // entries_per_chunk)
        pad = n_chunks * entries_per_chunk - n
        chunk_score = torch.nn.functional.pad(entry, (0, pad), value=float("-inf")).view(
            -1, n_chunks, entries_per_chunk
        ).amax(2)  # [B, C]: a chunk scores its best entry
        gold_per_chunk = torch.nn.functional.pad(gold.long(), (0, pad)).view(
            -1, n_chunks, entries_per_chunk
        ).sum(2)  # [B, C]
        vis_c = entries_to_chunks(vis, entries_per_chunk).sum(1)  # [B]
        order = chunk_score.argsort(dim=1, descending=True, stable=True)  # [B, C]
        rank = order.argsort(dim=1, stable=True)  # rank of each chunk
        for t, f in enumerate(ordered):
            keep = (vis_c.float() * f).ceil().long().clamp(min=1)  # [B]
            kept = (rank < keep[:, None]) & (chunk_score > float("-inf"))
            rows = torch.stack([
                torch.ones_like(keep),
                (gold_per_chunk > 0).sum(1),
                ((gold_per_chunk > 0) & kept).sum(1),
                gold_per_chunk.sum(1),
                (gold_per_chunk * kept).sum(1),
                kept.sum(1),
                vis_c,
            ], dim=1)  # [B, 7]
            for name, row in zip(names, rows.tolist()):
                for key in (("overall",), ("bucket", name), ("task", task)):
                    acc = sums[t].setdefault(key, [0] * 7)
                    for i, v in enumerate(row):
                        acc[i] += v

    def summary(c: list[int]) -> dict[str, float | int | None]:
        return {
            "windows": c[0],
            "chunk_recall": _ratio(c[2], c[1]),
            "entry_coverage": _ratio(c[4], c[3]),
            "chunk_resident_fraction": _ratio(c[5], c[6]),
        }

    out = []
    for f, per in zip(ordered, sums):
        names = sorted((k[1] for k in per if k[0] == "bucket"), key=bucket_sort_key)
        tasks = sorted(k[1] for k in per if k[0] == "task")
        out.append({
            "fraction": f,
            **summary(per.get(("overall",), [0] * 7)),
            "buckets": {k: summary(per[("bucket", k)]) for k in names},
            "tasks": {k: summary(per[("task", k)]) for k in tasks},
        })
    return out


def document_task(doc_id: str) -> str:
    """The RULER task a document was made from: `scripts/task_documents.py` names its
    documents `<task>-<sample id>`; any other document counts as "other"."""
    head = doc_id.split("-", 1)[0]
    return head if head in TASKS else "other"


def _scored_batches(
    model: MemoryIndexer, documents: list[DocumentWindows], batch_windows: int
):
    """Held-out windows in batches, scored once in eval mode: yields scores [L, B, N]
    (host), visible [B, N], golden & visible [B, N], each window's bucket name and
    the batch's document_task (a batch holds one document's windows)."""
    was_training = model.training
    model.eval()
    try:
        for doc in documents:
            task = document_task(doc.doc_id)
            for start in range(0, doc.n_windows, batch_windows):
                sl = slice(start, start + batch_windows)
                hidden = doc.hidden[sl].transpose(0, 1)  # [L, B, D]
                scores = model(hidden, doc.positions[sl], doc.k_icomp).cpu()  # [L, B, N]
                visible = (
                    torch.arange(doc.k_icomp.shape[1])[None, :]
                    < doc.n_visible[sl, None].cpu()
                )
                names = [bucket_name(pos + 1) for pos in doc.positions[sl].tolist()]
                yield scores, visible, doc.golden[sl] & visible, names, task
    finally:
        model.train(was_training)


def _batch_counts(
    sel: torch.Tensor, gold: torch.Tensor, vis: torch.Tensor, epc: int
) -> list[Counts]:
    """Counts of each window of a batch: sel, gold, vis bool [B, N]."""
    sel_c, gold_c, vis_c = (entries_to_chunks(x, epc) for x in (sel, gold, vis))
    # Column order = _COUNT_FIELDS.
    columns = torch.stack(
        [
            vis.sum(1),
            gold.sum(1),
            sel.sum(1),
            (sel & gold).sum(1),
            vis_c.sum(1),
            gold_c.sum(1),
            sel_c.sum(1),
            (sel_c & gold_c).sum(1),
        ],
        dim=1,
    )  # [B, 8]
    return [Counts(windows=1, **dict(zip(_COUNT_FIELDS, row))) for row in columns.tolist()]


_COUNT_FIELDS = (
    "visible", "golden", "selected", "hit",
    "visible_chunks", "golden_chunks", "selected_chunks", "hit_chunks",
)


def plot_history(history: list[dict], path: str) -> None:
    """Recall, precision and resident fraction of the held-out set vs epoch "
    "(matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("recall", "recall"),
        ("precision", "precision"),
        ("resident_fraction", "resident fraction (entries)"),
    ):
        ys = [h["eval"]["overall"][key] for h in history]
        ax.plot(
            epochs,
            [float("nan") if y is None else y for y in ys],
            marker="o",
            label=label,
        )
    golden = [h["eval"]["overall"]["golden_fraction"] for h in history]
    golden = [float("nan") if y is None else y for y in golden]
    ax.plot(epochs, golden, ls="--", color="gray", label="golden fraction (oracle)")
    thr = history[-1]["eval"]["threshold"] if history else 0.5
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Memory Indexer on held-out windows (threshold {thr})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratio(a: int, b: int) -> float | None:
    return None if b == 0 else a / b


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K"


__all__ = [
    "SWEEP_THRESHOLDS",
    "TOPK_FRACTIONS",
    "Counts",
    "EvalResult",
    "bucket_name",
    "bucket_sort_key",
    "document_task",
    "evaluate_indexer",
    "evaluate_thresholds",
    "plot_history",
    "threshold_sweep",
    "topk_sweep",
]
