"""`flashmemory demo`: the README's main job, end to end on the tiny model (CPU).

make-tiny (if absent) -> harvest synthetic long documents -> label (Eq. 7-11) ->
train the Memory Indexer (Eq. 14-15) -> a table of held-out recall, precision and
resident fraction, trained against where training starts (the backbone's own
lightning indexer, scoring at the refresh position: the no-lookahead baseline). Every stage resumes: rerunning the
demo after an interruption continues where it stopped.

The paper's proportions are scaled to the demo's 2K-token documents (DESIGN.md,
"The Memory Indexer, concretely"): chunks of 64 tokens (16 entries) instead of 256,
and the values are printed beside the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_flashmemory.core.memory_indexer import MemoryIndexer
from vllm_flashmemory.offline.dataset import (
    HarvestManifest,
    load_document,
    split_documents,
)
from vllm_flashmemory.offline.documents import synthetic_documents
from vllm_flashmemory.offline.harvest import HarvestConfig, harvest, tokenize_documents
from vllm_flashmemory.offline.labels import LabelConfig, label_harvest
from vllm_flashmemory.offline.metrics import evaluate_indexer
from vllm_flashmemory.offline.tiny_model import make_tiny
from vllm_flashmemory.offline.train import (
    TrainConfig,
    build_indexer_config,
    native_init,
    train,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Demo sizes: a few minutes on 2 CPU cores."""

    workdir: str = "artifacts/demo"
    # The tiny model folder; built by make-tiny when absent.
    model: str = "artifacts/tiny"
    documents: int = 6
    tokens: int = 2048
    # The first prompt_tokens of each document are the prompt; the rest are decode
    # positions, refreshed every tau steps.
    prompt_tokens: int = 512
    tau: int = 64
    top_p: float = 0.6
    min_votes: int = 3
    # 64 tokens = 16 compressed entries per chunk: the paper's 256-token chunk scaled
    # to 2K-token documents.
    chunk_tokens: int = 64
    epochs: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.documents < 2:
            raise ValueError(
                f"documents={self.documents} must be at least 2: one is held out "
                "for evaluation."
            )
        if self.tokens <= self.prompt_tokens:
            raise ValueError(
                f"tokens={self.tokens} must exceed prompt_tokens={self.prompt_tokens} "
                "so each document has decode positions."
            )


def run_demo(cfg: DemoConfig, *, progress: bool = True) -> dict:
    """Run every stage; returns the rows of the final table plus timings."""
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        make_tiny(str(model_dir), seed=cfg.seed)
    timings["make-tiny"] = time.perf_counter() - t

    t = time.perf_counter()
    harvest_dir = work / "harvest"
    hcfg = HarvestConfig(model=str(model_dir), out=str(harvest_dir),
                         prompt_tokens=cfg.prompt_tokens)
    docs = synthetic_documents(cfg.documents, cfg.tokens - 1, seed=cfg.seed)
    ids = tokenize_documents(hcfg.model, docs, cfg.tokens)
    harvest(hcfg, docs, ids, progress=progress)
    timings["harvest"] = time.perf_counter() - t

    t = time.perf_counter()
    label_summary = label_harvest(
        harvest_dir, LabelConfig(top_p=cfg.top_p, min_votes=cfg.min_votes, tau=cfg.tau),
        progress=progress,
    )
    timings["label"] = time.perf_counter() - t

    t = time.perf_counter()
    tcfg = TrainConfig(
        data_dirs=str(harvest_dir), out_dir=str(work / "train"), epochs=cfg.epochs,
        chunk_tokens=cfg.chunk_tokens, seed=cfg.seed, resume=True, progress=progress,
    )
    result = train(tcfg)
    timings["train"] = time.perf_counter() - t

    # The same held-out windows through the indexer training starts from (the
    # native lightning indexer under init "native"): what the training itself buys.
    manifest = HarvestManifest.read(harvest_dir)
    icfg = build_indexer_config(manifest, tcfg)
    _, val_docs = split_documents(manifest.labelled_documents(), tcfg.val_fraction, tcfg.seed)
    val_set = [load_document(manifest, d, icfg.layer_ids) for d in val_docs]
    torch.manual_seed(cfg.seed)
    start = MemoryIndexer(icfg)
    if tcfg.init == "native":
        native_init(start, manifest, tcfg)
    untrained = evaluate_indexer(
        start, val_set, threshold=tcfg.threshold, routing=tcfg.routing,
        entries_per_chunk=cfg.chunk_tokens // 4,
    ).overall
    start_name = "native indexer" if tcfg.init == "native" else "untrained indexer"
    rows = {"trained indexer": result.final["overall"], start_name: untrained}
    summary = {
        "config": cfg.__dict__,
        "labels": label_summary,
        "rows": rows,
        "timings_seconds": timings,
        "train_documents": result.train_documents,
        "val_documents": result.val_documents,
        "checkpoint": str(result.checkpoint),
        "plot": str(result.plot_path),
    }
    (work / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summary: dict) -> str:
    cols = ("recall", "precision", "resident_fraction", "chunk_recall",
            "chunk_resident_fraction")
    head = f"{'held-out windows':<18}" + "".join(f"{c:>24}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in summary["rows"].items():
        cells = "".join(
            f"{'n/a' if row[c] is None else format(row[c], '.3f'):>24}" for c in cols
        )
        lines.append(f"{name:<18}{cells}")
    gold = next(iter(summary["rows"].values()))["golden_fraction"]
    c = summary["config"]
    lines.append(
        f"golden fraction of visible history {gold:.3f} | windows "
        f"{next(iter(summary['rows'].values()))['windows']} | tau {c['tau']}, top_p "
        f"{c['top_p']}, min_votes {c['min_votes']}, chunk {c['chunk_tokens']} tokens, "
        f"threshold 0.5, OR routing"
    )
    t = summary["timings_seconds"]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    for name, help_text in (
        ("workdir", "where harvest, labels, checkpoint and demo.json go"),
        ("model", "tiny model folder (built when absent)"),
        ("documents", "synthetic documents (one in four is held out)"),
        ("tokens", "tokens per document"),
        ("prompt_tokens", "prompt length; later positions are decode positions"),
        ("epochs", "training epochs"),
        ("seed", "seed of model, documents and training"),
    ):
        default = getattr(d, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default),
                            default=default, help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = DemoConfig(workdir=args.workdir, model=args.model, documents=args.documents,
                     tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                     epochs=args.epochs, seed=args.seed)
    summary = run_demo(cfg, progress=not args.no_progress)
    print(format_table(summary))
    print(f"checkpoint {summary['checkpoint']}, plot {summary['plot']}, "
          f"summary {Path(cfg.workdir) / 'demo.json'}")
    return 0
