"""Held-out evaluation of a Memory Indexer against golden labels, per length bucket.

For each window (query position p, visible entries s < (p + 1) // m):
    selected = Eq. 5 / 13 selection over the visible entries
    recall    = |selected ∩ golden| / |golden|
    precision = |selected ∩ golden| / |selected|
    resident  = |selected| / |visible|         (entry level; chunk level alongside)
Counts are summed over the windows of a bucket before dividing (micro averages), so a
bucket's numbers are those of all its entries together. Buckets are by the query's
context length in tokens, on power-of-two edges.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from vllm_flashmemory.core.memory_indexer import (
    MemoryIndexer,
    entries_to_chunks,
    select,
)
from vllm_flashmemory.offline.dataset import DocumentWindows


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
    lo = 2 ** int(math.floor(math.log2(context_tokens)))
    return f"{_k(lo)}-{_k(2 * lo)}"


@torch.no_grad()
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
    was_training = model.training
    model.eval()
    overall, buckets = Counts(), {}
    try:
        for doc in documents:
            for start in range(0, doc.n_windows, batch_windows):
                sl = slice(start, start + batch_windows)
                hidden = doc.hidden[sl].transpose(0, 1)  # [L, B, D]
                scores = model(hidden, doc.positions[sl], doc.k_icomp)  # [L, B, N]
                visible = (
                    torch.arange(doc.k_icomp.shape[1])[None, :]
                    < doc.n_visible[sl, None]
                )
                sel = select(scores, threshold, routing) & visible  # [B, N]
                gold = doc.golden[sl] & visible
                for i, pos in enumerate(doc.positions[sl].tolist()):
                    c = _window_counts(sel[i], gold[i], visible[i], entries_per_chunk)
                    overall.add(c)
                    buckets.setdefault(bucket_name(pos + 1), Counts()).add(c)
    finally:
        model.train(was_training)
    ordered = sorted(buckets.items(), key=lambda kv: _bucket_lo(kv[0]))
    return EvalResult(
        threshold=threshold,
        routing=routing,
        entries_per_chunk=entries_per_chunk,
        overall=overall.summary(),
        buckets={k: v.summary() for k, v in ordered},
    )


def _window_counts(
    sel: torch.Tensor, gold: torch.Tensor, vis: torch.Tensor, epc: int
) -> Counts:
    sel_c, gold_c, vis_c = (entries_to_chunks(x, epc) for x in (sel, gold, vis))
    return Counts(
        windows=1,
        visible=int(vis.sum()),
        golden=int(gold.sum()),
        selected=int(sel.sum()),
        hit=int((sel & gold).sum()),
        visible_chunks=int(vis_c.sum()),
        golden_chunks=int(gold_c.sum()),
        selected_chunks=int(sel_c.sum()),
        hit_chunks=int((sel_c & gold_c).sum()),
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


def _bucket_lo(name: str) -> int:
    lo = name.split("-")[0]
    return 0 if lo == "0" else int(lo[:-1])


__all__ = ["Counts", "EvalResult", "bucket_name", "evaluate_indexer", "plot_history"]
