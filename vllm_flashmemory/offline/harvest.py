"""`flashmemory harvest`: record what the native indexer sees and scores, per decode position.

Runs a transformers DeepSeek-V4 model teacher-forced over long documents (chunked
prefill through the cache) and writes, per document, K^IComp of every CSA layer
(Hadamard-rotated, as vLLM's index-K cache holds it) and shards of
(positions, attention-input hidden states, native indexer logits over all
compressed entries). Format: docs/DATA_FORMAT.md ("flashmemory-harvest/1").

`--device cuda` runs the model on one GPU in fp32 (no autocast), like the CPU default;
the recorded tensors are moved to host memory as they are written.

Resumable: every file is written to a temp name and renamed, completed shards are
kept, and a rerun recomputes the (deterministic) forward but writes only the
missing shards, so its output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_flashmemory.core.atomic import atomic_save_tensors, atomic_write_text
from vllm_flashmemory.core.rotation import hadamard_rotate
from vllm_flashmemory.core.side_by_side import (
    gpu_slot_env,
    run_side_by_side,
    visible_gpus,
    workers_per_gpu,
)
from vllm_flashmemory.dsv4.capture import IndexerCapture, chunked_forward, mask_to_doc
from vllm_flashmemory.dsv4.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_device,
    limit_cuda_memory,
    load_model_on,
    worker_memory_fraction,
)
from vllm_flashmemory.offline.documents import Document, read_jsonl, synthetic_documents

logger = logging.getLogger(__name__)

FORMAT = "flashmemory-harvest/1"
MANIFEST = "manifest.json"
KEYS_FILE = "keys.safetensors"
COMPRESS_RATIO = 4
# Bound on one chunk's scorer intermediate [chunk, H, N_doc] in float32 elements;
# the chunk shrinks as documents grow so memory stays flat (~256 MiB on the CPU,
# ~1 GiB on a GPU, where fewer, larger chunks save kernel launches).
_SCORER_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 28}


@dataclass(frozen=True)
class HarvestConfig:
    """One harvest run; validated before any model work starts."""

    # Model folder in the layout written by `flashmemory make-tiny`.
    model: str
    # Output folder (manifest.json + one folder per document).
    out: str
    # Absolute positions >= prompt_tokens are the recorded "decode positions".
    prompt_tokens: int
    # Decode positions per shard file (the unit of resumption).
    positions_per_shard: int = 256
    # Indices among the CSA layers whose hidden states are recorded; None = all.
    hidden_layers: tuple[int, ...] | None = None
    # Largest prefill chunk; the real chunk also shrinks with document length.
    max_chunk_tokens: int = 256
    # Where the model runs: "cpu" or "cuda" (shards are written from host memory).
    device: str = "cpu"
    # Also record the main attention's probability on every compressed entry (the
    # `attention` tensor of each shard), for `flashmemory label --source attention`.
    attention: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        folder = Path(self.model)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"--model {self.model!r} is not a model folder ({CONFIG_FILE} and "
                f"{WEIGHTS_FILE} expected); build one with `flashmemory make-tiny DIR`."
            )
        for name, value in (
            ("prompt_tokens", self.prompt_tokens),
            ("positions_per_shard", self.positions_per_shard),
            ("max_chunk_tokens", self.max_chunk_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a positive integer.")
        if self.hidden_layers is not None:
            object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))

    def chunk_tokens(self, n_tokens: int, index_heads: int) -> int:
        n_entries = max(1, n_tokens // COMPRESS_RATIO)
        bound = _SCORER_ELEMENTS[self.device]  # "cpu" or "cuda", checked above
        return max(16, min(self.max_chunk_tokens, bound // (index_heads * n_entries)))


def tokenize_documents(model_dir: str, docs: Sequence[Document], n_tokens: int | None) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for doc in docs:
        ids = tok(doc.text).input_ids
        out.append(ids[:n_tokens] if n_tokens is not None else ids)
    return out


def harvest(
    cfg: HarvestConfig,
    docs: Sequence[Document],
    token_ids: Sequence[Sequence[int]],
    *,
    progress: bool = True,
    on_shard_written: Callable[[str, int], None] | None = None,
    model: torch.nn.Module | None = None,
    worker: tuple[int, int] | None = None,
    plan_only: bool = False,
) -> dict:
    """Harvest every document; returns the final manifest.

    `model` may be passed pre-loaded (from `load_hf_model(cfg.model)`) to skip the load.
    `worker=(i, k)` harvests only documents i, i + k, ... and leaves manifest.json to
    the parent (`harvest_side_by_side`), which wrote it with `plan_only=True` and
    marks documents complete by their keys file, the last file a document gets.
    """
    if len(docs) != len(token_ids) or not docs:
        raise ValueError("harvest needs one token list per document and at least one document.")
    for doc, ids in zip(docs, token_ids):
        if len(ids) <= cfg.prompt_tokens:
            raise ValueError(
                f"document {doc.doc_id!r} has {len(ids)} tokens, not more than "
                f"--prompt-tokens {cfg.prompt_tokens}, so it has no decode position; "
                "lower --prompt-tokens or use longer documents."
            )
    with open(Path(cfg.model) / CONFIG_FILE) as fh:
        model_cfg = json.load(fh)
    ratios = list(model_cfg.get("compress_ratios", []))[: model_cfg["num_hidden_layers"]]
    csa_layers = [i for i, r in enumerate(ratios) if r == COMPRESS_RATIO]
    hidden_layers = list(cfg.hidden_layers) if cfg.hidden_layers is not None else list(
        range(len(csa_layers))
    )
    bad = [h for h in hidden_layers if not 0 <= h < len(csa_layers)] or (
        hidden_layers if len(set(hidden_layers)) != len(hidden_layers) else []
    )
    if bad or not hidden_layers:
        raise ValueError(
            f"--hidden-layers {hidden_layers} must be distinct indices among the "
            f"model's {len(csa_layers)} CSA layers (0..{len(csa_layers) - 1})."
        )
    geometry = {
        "n_layers": model_cfg["num_hidden_layers"],
        "csa_layers": csa_layers,
        "hidden_layers": hidden_layers,
        "hidden_size": model_cfg["hidden_size"],
        "index_n_heads": model_cfg["index_n_heads"],
        "index_head_dim": model_cfg["index_head_dim"],
        "compress_ratio": COMPRESS_RATIO,
    }
    manifest = {
        "format": FORMAT,
        "model": str(Path(cfg.model).resolve()),
        "prompt_tokens": cfg.prompt_tokens,
        "positions_per_shard": cfg.positions_per_shard,
        "geometry": geometry,
        "attention": cfg.attention,
        "documents": [
            {
                "doc_id": doc.doc_id,
                "dir": f"doc{i:05d}",
                "n_tokens": len(ids),
                "n_shards": math.ceil((len(ids) - cfg.prompt_tokens) / cfg.positions_per_shard),
                "complete": False,
            }
            for i, (doc, ids) in enumerate(zip(docs, token_ids))
        ],
    }
    out = Path(cfg.out)
    old = _read_manifest(out)
    if old is not None:
        _check_resumable(old, manifest, out)
    elif worker is not None:
        raise ValueError(f"--worker needs the manifest its parent writes in {str(out)!r}.")
    for entry in manifest["documents"]:
        # keys.safetensors is written after every shard of its document
        entry["complete"] = (out / entry["dir"] / KEYS_FILE).is_file()
    if worker is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if plan_only:
        return manifest
    mine = [
        not entry["complete"] and (worker is None or i % worker[1] == worker[0])
        for i, entry in enumerate(manifest["documents"])
    ]

    if model is None:
        model = load_model_on(cfg.model, cfg.device)
    device = next(model.parameters()).device
    total = sum(len(ids) for todo, ids in zip(mine, token_ids) if todo)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", desc="harvest", disable=not progress)
    t0 = time.perf_counter()
    for todo, entry, ids in zip(mine, manifest["documents"], token_ids):
        if not todo:
            continue
        _harvest_document(cfg, model, entry, torch.tensor(ids, device=device), out, geometry,
                          bar, on_shard_written)
        entry["complete"] = True
        if worker is None:
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    bar.close()
    logger.info("harvested %d tokens in %.1f s", total, time.perf_counter() - t0)
    return manifest


@torch.no_grad()
def _harvest_document(cfg, model, entry, ids, out, geometry, bar, on_shard_written) -> None:
    doc_dir = out / entry["dir"]
    doc_dir.mkdir(exist_ok=True)
    n_tokens, p0, per = entry["n_tokens"], cfg.prompt_tokens, cfg.positions_per_shard
    n_entries = n_tokens // COMPRESS_RATIO
    done = {k for k in range(entry["n_shards"]) if (doc_dir / _shard_name(k)).is_file()}
    hidden_slots = geometry["hidden_layers"]
    chunk = cfg.chunk_tokens(n_tokens, geometry["index_n_heads"])
    pending: dict[str, list[torch.Tensor]] = {"positions": [], "hidden": [], "logits": []}
    if cfg.attention:
        pending["attention"] = []
    with IndexerCapture(model, record_attention=cfg.attention) as cap:
        for start, end in chunked_forward(model, ids, chunk, cap):
            bar.update(end - start)
            lo = max(start, p0)
            while lo < end:
                shard = (lo - p0) // per
                hi = min(end, p0 + (shard + 1) * per)
                if shard not in done:
                    rows = slice(lo - start, hi - start)
                    positions = torch.arange(lo, hi, dtype=torch.int64)
                    pending["positions"].append(positions)
                    # [T_s, L_h, D], moved to host memory (a no-op on the CPU)
                    pending["hidden"].append(torch.stack(
                        [cap.layers[h].hidden[rows] for h in hidden_slots], dim=1
                    ).cpu())
                    # [T_s, L_csa, N_doc], -inf where entry s is not visible to p
                    pending["logits"].append(torch.stack(
                        [mask_to_doc(c.logits[rows], positions, n_entries, COMPRESS_RATIO)
                         for c in cap.layers], dim=1
                    ).cpu())
                    if cfg.attention:
                        # [T_s, L_csa, N_doc] probabilities, 0 where s is not visible to p
                        pending["attention"].append(torch.stack(
                            [mask_to_doc(c.attention[rows], positions, n_entries,
                                         COMPRESS_RATIO, fill=0.0)
                             for c in cap.layers], dim=1
                        ).cpu())
                    if hi == p0 + (shard + 1) * per or hi == n_tokens:
                        tensors = {k: torch.cat(v).contiguous() for k, v in pending.items()}
                        atomic_save_tensors(doc_dir / _shard_name(shard), tensors)
                        pending = {k: [] for k in pending}
                        if on_shard_written is not None:
                            on_shard_written(entry["doc_id"], shard)
                lo = hi
        # [L_csa, N_doc, Dk]: all entries are emitted once the last chunk ran.
        k_icomp = torch.stack(
            [hadamard_rotate(c.k_icomp[:n_entries].cpu()) for c in cap.layers]
        )
    atomic_save_tensors(doc_dir / KEYS_FILE, {"k_icomp": k_icomp.contiguous()})


def _shard_name(k: int) -> str:
    return f"shard{k:05d}.safetensors"


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _check_resumable(old: dict, new: dict, out: Path) -> None:
    def key(m: dict) -> tuple:
        docs = [(d["doc_id"], d["dir"], d["n_tokens"]) for d in m["documents"]]
        return (m.get("format"), m["model"], m["prompt_tokens"], m["positions_per_shard"],
                m["geometry"], bool(m.get("attention", False)), docs)

    if key(old) != key(new):
        raise ValueError(
            f"--out {str(out)!r} already holds a harvest with other settings or "
            "documents; rerun with the same arguments to resume, or pick a new --out."
        )


# ---- CLI -------------------------------------------------------------------------

_DEFAULTS = HarvestConfig.__dataclass_fields__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (from `flashmemory make-tiny`)")
    parser.add_argument("--out", required=True, help="output folder; rerun to resume")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--documents", help='JSONL file with one {"id", "text"} per line')
    src.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic documents")
    parser.add_argument("--tokens", type=int, help="tokens per document (required with --synthetic; truncates --documents)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic documents")
    parser.add_argument("--prompt-tokens", type=int, required=True,
                        help="positions >= this are recorded as decode positions")
    parser.add_argument("--positions-per-shard", type=int,
                        default=_DEFAULTS["positions_per_shard"].default,
                        help="decode positions per shard file")
    parser.add_argument("--hidden-layers", type=int, nargs="+",
                        help="indices among the CSA layers whose hidden states are kept (default all)")
    parser.add_argument("--max-chunk-tokens", type=int,
                        default=_DEFAULTS["max_chunk_tokens"].default,
                        help="largest prefill chunk through the cache")
    parser.add_argument("--device", default=_DEFAULTS["device"].default,
                        help="cpu or cuda: where the model runs, fp32 either way "
                        "(default: %(default)s)")
    parser.add_argument("--attention", action="store_true",
                        help="also record the main attention's probability on every "
                        "compressed entry, for `flashmemory label --source attention`")
    parser.add_argument("--workers", type=int, default=1,
                        help="harvest processes side by side on the device; documents are "
                        "dealt round-robin (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "i/k": one worker's share
    parser.add_argument("--cuda-memory-fraction", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_worker(text: str | None) -> tuple[int, int] | None:
    """'i/k' -> (i, k) with 0 <= i < k."""
    if text is None:
        return None
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        i, k = -1, 0
    if not 0 <= i < k:
        raise ValueError(f"--worker {text!r} must be i/k with 0 <= i < k, e.g. 0/4.")
    return i, k


def worker_command(
    args: argparse.Namespace, i: int, workers_per_gpu: int | None = None
) -> list[str]:
    """`flashmemory harvest` for worker i of args.workers: the same documents and
    settings, its own share (--worker i/k), no progress bar. workers_per_gpu:
    processes sharing its GPU (default args.workers)."""
    cmd = [sys.executable, "-m", "vllm_flashmemory.cli", "harvest",
           "--model", args.model, "--out", args.out,
           "--prompt-tokens", str(args.prompt_tokens),
           "--positions-per-shard", str(args.positions_per_shard),
           "--max-chunk-tokens", str(args.max_chunk_tokens), "--device", args.device,
           "--seed", str(args.seed), "--worker", f"{i}/{args.workers}", "--no-progress"]
    if args.attention:
        cmd.append("--attention")
    if args.documents is not None:
        cmd += ["--documents", args.documents]
    else:
        cmd += ["--synthetic", str(args.synthetic)]
    if args.tokens is not None:
        cmd += ["--tokens", str(args.tokens)]
    if args.hidden_layers:
        cmd += ["--hidden-layers", *map(str, args.hidden_layers)]
    if args.device == "cuda":
        # Capped like eval's workers (dsv4.checkpoint.worker_memory_fraction says why).
        share = worker_memory_fraction(workers_per_gpu or args.workers)
        cmd += ["--cuda-memory-fraction", f"{share:.4f}"]
    return cmd


def harvest_side_by_side(
    cfg: HarvestConfig, docs: Sequence[Document], token_ids: Sequence[Sequence[int]],
    args: argparse.Namespace,
) -> tuple[dict, list[str]]:
    """`--workers k`: write the manifest, harvest in k subprocesses, then mark the
    finished documents complete (also when stopped: a rerun does only the rest).
    Returns the manifest and one report per failed worker."""
    harvest(cfg, docs, token_ids, plan_only=True)
    logs = [Path(cfg.out) / f"worker{i}.log" for i in range(args.workers)]
    gpus = visible_gpus(args.device)  # worker i on gpus[i % len(gpus)]
    per_gpu = workers_per_gpu(args.workers, gpus)
    for i, log in enumerate(logs):
        where = f" on GPU {gpus[i % len(gpus)]}" if gpus else ""
        print(f"harvest worker {i}/{args.workers}{where}: log {log}")
    failures = run_side_by_side(
        [worker_command(args, i, per_gpu) for i in range(args.workers)], logs,
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
        slot_env=gpu_slot_env(gpus),
        on_stop=lambda: harvest(cfg, docs, token_ids, plan_only=True),
    )
    return harvest(cfg, docs, token_ids, plan_only=True), failures


def run(args: argparse.Namespace) -> int:
    cfg = HarvestConfig(
        model=args.model, out=args.out, prompt_tokens=args.prompt_tokens,
        positions_per_shard=args.positions_per_shard,
        hidden_layers=tuple(args.hidden_layers) if args.hidden_layers else None,
        max_chunk_tokens=args.max_chunk_tokens, device=args.device,
        attention=args.attention,
    )
    if args.synthetic is not None:
        if args.tokens is None or args.tokens < 2:
            raise ValueError("--synthetic needs --tokens LEN (at least 2).")
        # Byte tokenizer + BOS: LEN - 1 ASCII characters give LEN tokens.
        docs = synthetic_documents(args.synthetic, args.tokens - 1, seed=args.seed)
    else:
        docs = read_jsonl(args.documents)
    if isinstance(args.workers, bool) or args.workers < 1:
        raise ValueError(f"--workers {args.workers!r} must be a positive integer.")
    worker = parse_worker(args.worker)
    limit_cuda_memory(args.cuda_memory_fraction, cfg.device)
    ids = tokenize_documents(cfg.model, docs, args.tokens)
    t0 = time.perf_counter()
    failures: list[str] = []
    if worker is not None:
        manifest = harvest(cfg, docs, ids, progress=False, worker=worker)
    elif args.workers > 1:
        manifest, failures = harvest_side_by_side(cfg, docs, ids, args)
    else:
        manifest = harvest(cfg, docs, ids, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    done = [d for d in manifest["documents"] if d["complete"]]
    n = sum(d["n_tokens"] for d in done)
    print(f"harvested {len(done)} of {len(docs)} documents, {n} tokens, in {seconds:.1f} s "
          f"({seconds / max(n, 1) * 1000:.2f} s per 1K tokens incl. model load) -> {cfg.out}")
    for report in failures:
        print(report)
    return 1 if failures else 0
