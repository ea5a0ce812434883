"""`flashmemory train`: fit the Memory Indexer's query encoder (paper §2.3-2.4).

Keys K^IComp are frozen; only W_DQ, the RMSNorm weight, W_IUQ and W_w train (a dual
encoder with a fixed document side). Loss: focal loss with gamma 2 and per-sample
weights, no alpha (Eq. 14-15), on every golden entry of a window plus 3 random
non-golden visible entries per positive (all of them when fewer exist; a window
without positives still draws 3, so it learns to stay quiet). With
`--negatives-per-positive 0` every non-golden visible entry is a negative: the
near-miss entries (a distractor needle beside the real one) that top-K selection must
rank below the golden ones are then in every step's loss, not in 3 of ~80 draws.

Per-sample weight rule (w_{t,s} of Eq. 15): every window carries the same total
weight, split evenly over its samples: w_{t,s} = n_samples / (n_windows * |S_t|)
within a batch. The paper's scheduler weighted positives by their vote count, which
our labels do not keep (golden is boolean), and §2.4 reports that match-count
weighting cost recall. Without this rule, long-context windows (many golden entries)
would dominate the gradient, while the threshold must work at every context length.
`--sample-weighting uniform` gives w = 1 instead.

Outputs in OUT: `indexer/` (checkpoint of the last epoch), `metrics.json`,
`metrics.png`, and `train_state.pt` to resume from the last finished epoch.
metrics.json's `threshold_sweep` holds the final model's held-out recall and resident
fractions at thresholds 0.05-0.9 and at --threshold, to pick the threshold that meets a
resident-fraction target (the paper's ~15%); `topk_sweep` holds golden chunk recall and
golden entry coverage of top-K selection at 1-20% of the chunks (`lsa<pct>` in eval).
`--init-from DIR` starts from a Memory Indexer checkpoint (its shape wins); with
`--epochs 0` it only measures that checkpoint on the held-out documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vllm_flashmemory.core.atomic import atomic_write
from vllm_flashmemory.core.config_format import csa_layer_ids
from vllm_flashmemory.core.memory_indexer import (
    MemoryIndexer,
    MemoryIndexerConfig,
    native_indexer_state,
)
from vllm_flashmemory.dsv4.checkpoint import check_device
from vllm_flashmemory.offline.dataset import (
    DocumentWindows,
    HarvestManifest,
    check_indexer_layers,
    load_document,
    same_backbone,
    split_documents,
)
from vllm_flashmemory.offline.metrics import (
    SWEEP_THRESHOLDS,
    bucket_sort_key,
    calibrate_threshold,
    check_target_resident,
    evaluate_indexer,
    plot_history,
    threshold_sweep,
    topk_sweep,
)

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `flashmemory train`; the CLI reads its defaults from here."""

    # Labelled harvest folders (one str is taken as one folder). Several harvests of one
    # backbone, e.g. one per context length, train one indexer; each is split into
    # train and held-out documents on its own, so every length is evaluated.
    data_dirs: tuple[str, ...]
    out_dir: str
    # Indices among CSA layers; None = every layer whose hidden states were harvested.
    indexer_layers: tuple[int, ...] | None = None
    # Indexer width; None = the backbone's q_lora_rank with init "native" (it copies
    # wq_a), else hidden_size // 2 (the published 4096 -> 2048); heads default to the
    # native indexer's. The published retriever doubles the heads (64 -> 128): pass
    # n_heads for that with init "random", at twice the scoring cost per step.
    rank: int | None = None
    n_heads: int | None = None
    # "native": start every layer as the backbone's own lightning indexer (rank =
    # q_lora_rank; with native_scale 1 its score is sigmoid(native index score), exact
    # to 3e-6); "random": fresh init (the default, which the demo is tuned for). On
    # the committed backbone's question-window harvest native at scale 0.1 and lr 1e-3
    # trained the best indexer (docs/RESULTS.md, "Memory Indexer training").
    init: Literal["native", "random"] = "random"
    # Factor on the copied weights_proj: the native scores are top-k ranking logits
    # (about +-20), on which a sigmoid saturates and focal training stalls (loss 9.8
    # flat over 10 epochs at scale 1).
    native_scale: float = 0.1
    # Backbone folder for init="native"; None = the model the harvest names.
    backbone: str | None = None
    # A Memory Indexer checkpoint to start from instead of `init` (its config wins);
    # with epochs 0 the run only measures it on the held-out documents.
    init_from: str | None = None
    epochs: int = 10
    # Windows per optimizer step (all from one document: they share its keys).
    batch_windows: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    # Negative slope of Eq. 4's ReLU while training, annealed linearly to 0 over the
    # first relu_slope_epochs epochs (evaluation always uses the plain ReLU; the
    # schedule ignores --epochs, so a run extended by --resume continues it exactly).
    # With a plain ReLU a golden entry whose q.k is negative in every head gets no
    # gradient: the committed backbone's first question-window indexer parked golden
    # entries at exactly sigmoid(0) = 0.5 and scored nothing above it.
    relu_slope: float = 0.1
    relu_slope_epochs: int = 5
    # Focusing parameter gamma of Eq. 15 (the paper's 2).
    focal_gamma: float = 2.0
    # Random negatives per positive, drawn from non-golden visible history (§2.4);
    # 0 = every non-golden visible entry.
    negatives_per_positive: int = 3
    sample_weighting: Literal["window", "uniform"] = "window"
    # Selection threshold and routing of the evaluation (Eq. 5, 13).
    threshold: float = 0.5
    # Held-out share of historical chunks the calibrated threshold may keep resident
    # (checkpoint config.json's `calibration`, eval's default threshold); the paper's ~10%.
    target_resident: float = 0.1
    routing: Literal["or", "mean"] = "or"
    # Chunk size for the chunk-level counts of the evaluation.
    chunk_tokens: int = 256
    # Fraction of documents held out for evaluation (at least one).
    val_fraction: float = 0.25
    seed: int = 0
    # Where the indexer trains: "cpu" or "cuda" (one GPU; the keys, hidden states and
    # positions of every document move there, labels and sampling stay on the CPU).
    device: str = "cpu"
    # Continue from OUT/train_state.pt when it exists.
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        dirs = (self.data_dirs,) if isinstance(self.data_dirs, str) else tuple(self.data_dirs)
        object.__setattr__(self, "data_dirs", dirs)
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"data_dirs {list(dirs)} name a harvest twice; pass each once.")
        if self.indexer_layers is not None:
            object.__setattr__(self, "indexer_layers", tuple(self.indexer_layers))
        for name in (
            "epochs",
            "batch_windows",
            "negatives_per_positive",
            "chunk_tokens",
            "relu_slope_epochs",
        ):
            v = getattr(self, name)
            lowest = 0 if name == "negatives_per_positive" or (
                name == "epochs" and self.init_from is not None) else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
                raise ValueError(
                    f"{name}={v!r} must be an integer >= {lowest}"
                    + (" (0 = every non-golden entry)." if name == "negatives_per_positive"
                       else " (0 only with --init-from, to measure a checkpoint)."
                       if name == "epochs" else ".")
                )
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise FileNotFoundError(
                f"--init-from {self.init_from!r} holds no config.json; pass a Memory "
                "Indexer checkpoint folder (OUT/indexer of `flashmemory train`)."
            )
        if not self.lr > 0:
            raise ValueError(
                f"lr={self.lr!r} must be positive; try 3e-3 for the tiny model."
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"val_fraction={self.val_fraction!r} must lie in (0, 1); use 0.25."
            )
        if self.init not in ("native", "random"):
            raise ValueError(f"init={self.init!r} is not an init; use 'native' or 'random'.")
        if self.sample_weighting not in ("window", "uniform"):
            raise ValueError(
                f"sample_weighting={self.sample_weighting!r} is not a rule; use "
                "'window' or 'uniform'."
            )
        if self.routing not in ("or", "mean"):
            raise ValueError(
                f"routing={self.routing!r} is not a routing mode; use 'or' or 'mean'."
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold={self.threshold!r} must lie in [0, 1]; use 0.5."
            )
        if not self.native_scale > 0:
            raise ValueError(f"native_scale={self.native_scale!r} must be > 0; use 0.1.")
        if not 0.0 <= self.relu_slope < 1.0:
            raise ValueError(f"relu_slope={self.relu_slope!r} must lie in [0, 1); use 0.1.")
        check_device(self.device)
        if self.focal_gamma < 0:
            raise ValueError(
                f"focal_gamma={self.focal_gamma!r} must be >= 0; use 2 (the paper's)."
            )
        check_target_resident(self.target_resident)


@dataclass
class TrainResult:
    checkpoint: Path
    metrics_path: Path
    plot_path: Path
    indexer_config: MemoryIndexerConfig
    # Held-out metrics of the last epoch (EvalResult.to_dict()).
    final: dict[str, Any]
    history: list[dict[str, Any]]
    train_documents: list[str]
    val_documents: list[str]
    # Overall held-out metrics of the final model per threshold (metrics.py).
    threshold_sweep: list[dict[str, Any]] = field(default_factory=list)
    # metrics.calibrate_threshold at cfg.target_resident (None: no threshold met it).
    calibration: dict[str, Any] | None = None
    # Held-out top-K chunk recall and golden entry coverage per fraction (metrics.py).
    topk_sweep: list[dict[str, Any]] = field(default_factory=list)


def focal_loss(
    p: torch.Tensor, y: torch.Tensor, w: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """Sample-weighted focal loss, Eq. 14-15: mean of w (1 - p_correct)^gamma BCE(p, "
    "y)."""
    p_correct = p * y + (1 - p) * (1 - y)  # Eq. 14
    # binary_cross_entropy clamps log at -100, so saturated sigmoids stay finite.
    bce = torch.nn.functional.binary_cross_entropy(p, y, reduction="none")  # Eq. 12
    return (w * (1 - p_correct).pow(gamma) * bce).mean()  # Eq. 15


def sample_targets(
    golden: torch.Tensor,
    visible: torch.Tensor,
    neg_per_pos: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mask and labels of a batch of windows.

    golden [B, N], visible [B, N] -> (mask [B, N] bool, y [B, N] float).

    Every golden visible entry is a positive; neg_per_pos x max(1, #pos) negatives are
    drawn uniformly without replacement from the non-golden visible entries; with
    neg_per_pos 0 every visible entry is a sample.
    """
    pos = golden & visible
    if neg_per_pos == 0:
        return visible.clone(), pos.float()
    neg = visible & ~golden
    n_neg = (pos.sum(1).clamp(min=1) * neg_per_pos).clamp(max=neg.sum(1))  # [B]
    r = torch.rand(golden.shape, generator=generator)
    r = r.masked_fill(~neg, 2.0)  # non-candidates sort last
    rank = r.argsort(1).argsort(1)  # rank of each entry among its window's draws
    chosen_neg = neg & (rank < n_neg[:, None])
    return pos | chosen_neg, pos.float()


def sample_weights(mask: torch.Tensor, rule: str) -> torch.Tensor:
    """w_{t,s} per sample [B, N] (see the module docstring for the rule)."""
    if rule == "uniform":
        return mask.float()
    per_window = mask.sum(1, keepdim=True).clamp(min=1).float()  # [B, 1]
    n_windows = (mask.sum(1) > 0).sum().clamp(min=1)
    return mask.float() * mask.sum() / (n_windows * per_window)


def build_indexer_config(
    manifest: HarvestManifest, cfg: TrainConfig
) -> MemoryIndexerConfig:
    """Indexer geometry from the harvest: hidden size, K^IComp width, rope, layers."""
    g = manifest.geometry
    layers = cfg.indexer_layers if cfg.indexer_layers is not None else g.hidden_layers
    check_indexer_layers(g, tuple(layers))
    rope: dict[str, Any] = {}
    if g.rope_dim is not None:
        rope["rope_dim"] = g.rope_dim
    else:
        # DeepSeek-V4 rotates the last 64 of 128 index dims; keep that half for smaller
        # models. Harvests should record index_rope_dim (see the report).
        rope["rope_dim"] = min(64, g.index_head_dim // 2)
        logger.warning(
            "manifest geometry has no index_rope_dim; assuming rope_dim=%d",
            rope["rope_dim"],
        )
    if g.rope_theta is not None:
        rope["rope_theta"] = g.rope_theta
    if g.rope_scaling:
        s = g.rope_scaling
        rope["rope_factor"] = float(s.get("factor", 16.0))
        rope["rope_original_max_position"] = int(
            s.get("original_max_position_embeddings", 65536)
        )
        rope["rope_beta_fast"] = float(s.get("beta_fast", 32.0))
        rope["rope_beta_slow"] = float(s.get("beta_slow", 1.0))
    rank = cfg.rank if cfg.rank is not None else max(1, g.hidden_size // 2)
    if cfg.init == "native":
        q_lora_rank = int(native_backbone(manifest, cfg)[1]["q_lora_rank"])
        if cfg.rank is not None and cfg.rank != q_lora_rank:
            raise ValueError(
                f"rank={cfg.rank} but init='native' copies the backbone's wq_a, whose "
                f"rank is q_lora_rank={q_lora_rank}; drop --rank or use --init random."
            )
        rank = q_lora_rank
        if cfg.n_heads is not None and cfg.n_heads != g.index_n_heads:
            raise ValueError(
                f"n_heads={cfg.n_heads} but init='native' copies the backbone's "
                f"weights_proj, which has index_n_heads={g.index_n_heads} heads; drop "
                "--n-heads or use --init random."
            )
    return MemoryIndexerConfig(
        hidden_size=g.hidden_size,
        rank=rank,
        n_heads=cfg.n_heads if cfg.n_heads is not None else g.index_n_heads,
        head_dim=g.index_head_dim,
        layer_ids=tuple(layers),
        **rope,
    )


def native_backbone(manifest: HarvestManifest, cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """The backbone folder for init='native' and its config.json."""
    path = Path(cfg.backbone if cfg.backbone is not None else manifest.model)
    config = path / "config.json"
    if not config.is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"init='native' needs the harvested backbone's config.json and "
            f"model.safetensors in {str(path)!r}; pass --backbone DIR or --init random."
        )
    return path, json.loads(config.read_text())


def native_init(model: MemoryIndexer, manifest: HarvestManifest, cfg: TrainConfig) -> None:
    from safetensors.torch import load_file

    path, config = native_backbone(manifest, cfg)
    state = native_indexer_state(
        load_file(str(path / "model.safetensors")), model.config.layer_ids, csa_layer_ids(config)
    )
    for lid in model.config.layer_ids:
        state[f"layers.l{lid}.weights_proj.weight"] *= cfg.native_scale
    model.load_state_dict(state)
    logger.info(
        "Memory Indexer starts as the lightning indexer of %s (weights x %g)",
        path, cfg.native_scale,
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate every epoch on held-out documents, checkpoint; see the module "
    "docstring."""
    manifests = [HarvestManifest.read(d) for d in cfg.data_dirs]
    manifest = same_backbone(manifests)
    start = None
    if cfg.init_from is not None:
        start = MemoryIndexer.load(cfg.init_from, map_location="cpu")
        icfg = start.config
        g = manifest.geometry
        check_indexer_layers(g, icfg.layer_ids)
        if (icfg.hidden_size, icfg.head_dim) != (g.hidden_size, g.index_head_dim):
            raise ValueError(
                f"--init-from {cfg.init_from!r} is an indexer of hidden size "
                f"{icfg.hidden_size} and key width {icfg.head_dim}, but the harvest's "
                f"backbone has {g.hidden_size} and {g.index_head_dim}; start from an "
                "indexer trained for this backbone."
            )
    else:
        icfg = build_indexer_config(manifest, cfg)
    train_docs, val_docs = [], []
    for m in manifests:
        tr, va = split_documents(m.labelled_documents(), cfg.val_fraction, cfg.seed)
        train_docs, val_docs = train_docs + tr, val_docs + va
    train_set = [load_document(manifest, d, icfg.layer_ids).to(cfg.device) for d in train_docs]
    val_set = [load_document(manifest, d, icfg.layer_ids).to(cfg.device) for d in val_docs]
    epc = max(1, cfg.chunk_tokens // manifest.geometry.compress_ratio)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model = MemoryIndexer(icfg)
    if start is not None:
        model.load_state_dict(start.state_dict())
    elif cfg.init == "native":
        native_init(model, manifest, cfg)
    model.to(cfg.device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state_path = out / STATE_FILE
    if cfg.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["indexer_config"] != icfg.to_dict():
            raise ValueError(
                f"{state_path} was written for indexer {st['indexer_config']} but "
                "this run "
                f"builds {icfg.to_dict()}; use a fresh --out-dir or the original "
                "settings."
            )
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        rng.setstate(st["python_rng"])
        history, start_epoch = st["history"], st["epoch"] + 1
        logger.info("resuming from %s after epoch %d", state_path, st["epoch"])

    batches = [
        (i, s)
        for i, d in enumerate(train_set)
        for s in range(0, d.n_windows, cfg.batch_windows)
    ]
    from tqdm import tqdm

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng.shuffle(batches)
        model.train()
        total, n = 0.0, 0
        for di, s in tqdm(
            batches,
            desc=f"epoch {epoch}",
            unit="batch",
            disable=not cfg.progress,
            leave=False,
        ):
            doc = train_set[di]
            slope = cfg.relu_slope * max(0.0, 1 - epoch / cfg.relu_slope_epochs)
            loss = _batch_loss(model, doc, slice(s, s + cfg.batch_windows), cfg, gen, slope)
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        ev = evaluate_indexer(model, val_set, cfg.threshold, cfg.routing, epc).to_dict()
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(n, 1),
                "seconds": time.perf_counter() - t0,
                "eval": ev,
            }
        )
        o = ev["overall"]
        logger.info(
            "epoch %d loss %.4f val recall %s precision %s resident %s",
            epoch,
            total / max(n, 1),
            o["recall"],
            o["precision"],
            o["resident_fraction"],
        )
        model.save(out / "indexer")
        atomic_write(
            state_path,
            lambda p, epoch=epoch: torch.save(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "python_rng": rng.getstate(),
                    "history": history,
                    "indexer_config": icfg.to_dict(),
                },
                p,
            ),
        )
        _write_outputs(out, cfg, manifests, icfg, history, train_docs, val_docs)

    if not history:  # --epochs 0: the checkpoint as given
        model.save(out / "indexer")
    sweep = threshold_sweep(
        model, val_set, (*SWEEP_THRESHOLDS, cfg.threshold), cfg.routing, epc
    )
    topk = topk_sweep(model, val_set, routing=cfg.routing, entries_per_chunk=epc)
    calibration = calibrate_threshold(sweep, cfg.target_resident)
    if calibration is None:
        logger.warning("no swept threshold keeps <= %s of held-out chunks resident; the "
                       "checkpoint carries no calibration", cfg.target_resident)
    else:
        calibration = {**calibration, "chunk_tokens": cfg.chunk_tokens,
                       "routing": cfg.routing}
        model.save(out / "indexer", calibration=calibration)
    _write_outputs(out, cfg, manifests, icfg, history, train_docs, val_docs, sweep, topk,
                   calibration)
    return TrainResult(
        checkpoint=out / "indexer",
        metrics_path=out / "metrics.json",
        plot_path=out / "metrics.png",
        indexer_config=icfg,
        final=history[-1]["eval"] if history else evaluate_indexer(
            model, val_set, cfg.threshold, cfg.routing, epc).to_dict(),
        history=history,
        train_documents=[d.doc_id for d in train_docs],
        val_documents=[d.doc_id for d in val_docs],
        threshold_sweep=sweep,
        topk_sweep=topk,
        calibration=calibration,
    )


def _batch_loss(
    model: MemoryIndexer,
    doc: DocumentWindows,
    sl: slice,
    cfg: TrainConfig,
    gen: torch.Generator,
    relu_slope: float = 0.0,
) -> torch.Tensor | None:
    visible = doc.visible_mask()[sl]  # [B, N]
    mask, y = sample_targets(doc.golden[sl], visible, cfg.negatives_per_positive, gen)
    if not bool(mask.any()):
        return None  # windows with no visible history teach nothing
    w = sample_weights(mask, cfg.sample_weighting)
    device = doc.hidden.device
    mask, y, w = mask.to(device), y.to(device), w.to(device)
    scores = model(
        doc.hidden[sl].transpose(0, 1), doc.positions[sl], doc.k_icomp,
        relu_slope=relu_slope,
    )  # [L, B, N]
    # Every layer learns the same targets; serving takes their union (Eq. 13).
    losses = [focal_loss(s[mask], y[mask], w[mask], cfg.focal_gamma) for s in scores]
    return torch.stack(losses).mean()


def _write_outputs(
    out: Path,
    cfg: TrainConfig,
    manifests: list[HarvestManifest],
    icfg: MemoryIndexerConfig,
    history: list[dict[str, Any]],
    train_docs: list,
    val_docs: list,
    sweep: list[dict[str, Any]] | None = None,
    topk: list[dict[str, Any]] | None = None,
    calibration: dict[str, Any] | None = None,
) -> None:
    doc = {
        "train_config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()
        },
        "indexer_config": icfg.to_dict(),
        "harvest": {
            "model": manifests[0].model,
            "labels": manifests[0].labels,
            "prompt_tokens": manifests[0].prompt_tokens,
            "folders": [
                {"path": str(m.root), "prompt_tokens": m.prompt_tokens}
                for m in manifests
            ],
        },
        "train_documents": [d.doc_id for d in train_docs],
        "val_documents": [d.doc_id for d in val_docs],
        "history": history,
        "final": history[-1]["eval"] if history else None,
        "threshold_sweep": sweep,
        "topk_sweep": topk,
        "calibration": calibration,
    }
    atomic_write(
        out / "metrics.json",
        lambda p: Path(p).write_text(json.dumps(doc, indent=2) + "\n"),
    )
    atomic_write(out / "metrics.png", lambda p: plot_history(history, p), suffix=".png")


# ---- CLI -------------------------------------------------------------------------


def _layer_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


# field -> (type, help); defaults come from TrainConfig, never from here.
_FLAGS: dict[str, tuple[Any, str]] = {
    "indexer_layers": (
        _layer_list,
        "comma-separated indices among CSA layers (default: every harvested layer)",
    ),
    "rank": (int, "W_DQ rank r (default: hidden_size / 2; q_lora_rank with init native)"),
    "init": (str, "'native' (start as the backbone's lightning indexer) or 'random'"),
    "backbone": (str, "backbone folder for init native (default: the harvest's model)"),
    "init_from": (str, "Memory Indexer checkpoint to start from (with --epochs 0: "
                  "only measure it)"),
    "native_scale": (float, "factor on the copied head weights under init native"),
    "n_heads": (int, "indexer heads (default: the native indexer's)"),
    "epochs": (int, "passes over the training windows"),
    "batch_windows": (int, "windows per optimizer step"),
    "lr": (float, "AdamW learning rate"),
    "weight_decay": (float, "AdamW weight decay"),
    "relu_slope": (float, "leaky slope of Eq. 4's ReLU in training, annealed to 0"),
    "relu_slope_epochs": (int, "epochs over which relu_slope falls to 0"),
    "focal_gamma": (float, "focusing parameter gamma of Eq. 15"),
    "negatives_per_positive": (int, "random non-golden visible entries per positive "
                               "(0 = every non-golden visible entry)"),
    "sample_weighting": (str, "w of Eq. 15: 'window' (equal per window) or 'uniform'"),
    "threshold": (float, "evaluation threshold of Eq. 5"),
    "target_resident": (float, "held-out share of historical chunks the calibrated "
                        "threshold (written into the checkpoint) may keep resident"),
    "routing": (str, "cross-layer ensemble of Eq. 13: 'or' or 'mean'"),
    "chunk_tokens": (int, "chunk size for the chunk-level counts"),
    "val_fraction": (float, "fraction of documents held out"),
    "seed": (int, "seed of init, split and sampling"),
    "device": (str, "cpu or cuda: where the indexer trains"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig(data_dirs="", out_dir="")
    parser.add_argument("data_dirs", nargs="+", metavar="DATA_DIR",
                        help="output directories of harvest + label (several: e.g. one "
                        "per context length, each split into train and held-out on its own)")
    parser.add_argument(
        "--out-dir",
        required=True,
        help="where indexer/, metrics.json, metrics.png and train_state.pt go",
    )
    for name, (kind, text) in _FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            help=text if default is None else f"{text} (default: %(default)s)",
        )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/train_state.pt"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide tqdm bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    values = {name: getattr(args, name) for name in _FLAGS}
    cfg = TrainConfig(
        data_dirs=tuple(args.data_dirs),
        out_dir=args.out_dir,
        resume=args.resume,
        progress=not args.no_progress,
        **values,
    )
    res = train(cfg)
    print(f"trained on {res.train_documents}, held out {res.val_documents}")
    print(
        f"{'bucket':>8} {'windows':>7} {'recall':>7} {'precision':>9} {'resident':>8}"
    )
    for name, b in {**res.final["buckets"], "all": res.final["overall"]}.items():
        row = (b["recall"], b["precision"], b["resident_fraction"])
        r, p, f = (_fmt(x) for x in row)
        print(f"{name:>8} {b['windows']:>7} {r:>7} {p:>9} {f:>8}")
    print(
        f"threshold {cfg.threshold}, routing {cfg.routing}; checkpoint {res.checkpoint}"
    )
    print("threshold sweep (held-out, all buckets):")
    print(
        f"{'threshold':>9} {'recall':>7} {'resident':>8} {'chunk recall':>12} "
        f"{'chunk resident':>14}"
    )
    for t in res.threshold_sweep:
        r, f, cr, cf = (
            _fmt(t[k])
            for k in (
                "recall",
                "resident_fraction",
                "chunk_recall",
                "chunk_resident_fraction",
            )
        )
        print(f"{t['threshold']:>9} {r:>7} {f:>8} {cr:>12} {cf:>14}")
    buckets = sorted({b for t in res.threshold_sweep for b in t["buckets"]}, key=bucket_sort_key)
    if len(buckets) > 1:
        print("recall @ chunk resident fraction per context bucket (held-out):")
        print(f"{'threshold':>9} " + " ".join(f"{b:>15}" for b in buckets))
        for t in res.threshold_sweep:
            cells = [
                f"{_fmt(t['buckets'][b]['recall'])} @ {_fmt(t['buckets'][b]['chunk_resident_fraction'])}"
                if b in t["buckets"] else "n/a"
                for b in buckets
            ]
            print(f"{t['threshold']:>9} " + " ".join(f"{c:>15}" for c in cells))
    print("top-K chunks (held-out): golden entry coverage / golden chunk recall")
    buckets = sorted({b for t in res.topk_sweep for b in t["buckets"]}, key=bucket_sort_key)
    names = [*buckets, "all"] if len(buckets) > 1 else ["all"]
    print(f"{'top-K':>6} " + " ".join(f"{b:>15}" for b in names))
    for t in res.topk_sweep:
        cells = []
        for b in names:
            row = t if b == "all" else t["buckets"].get(b)
            cells.append("n/a" if row is None else
                         f"{_fmt(row['entry_coverage'])} / {_fmt(row['chunk_recall'])}")
        print(f"{100 * t['fraction']:>5.0f}% " + " ".join(f"{c:>15}" for c in cells))
    tasks = sorted({k for t in res.topk_sweep for k in t.get("tasks", {})})
    if len(tasks) > 1:
        shown = [t for t in res.topk_sweep if t["fraction"] in (0.03, 0.1)] or res.topk_sweep[:2]
        print("top-K chunks per task (held-out): golden entry coverage / golden chunk recall")
        print(f"{'task':<18}" + " ".join(f"{100 * t['fraction']:>14.0f}%" for t in shown))
        for name in tasks:
            cells = [t["tasks"].get(name) for t in shown]
            print(f"{name:<18}" + " ".join(
                f"{'n/a':>15}" if c is None else
                f"{_fmt(c['entry_coverage']) + ' / ' + _fmt(c['chunk_recall']):>15}" for c in cells))
    cal = res.calibration
    print(f"calibrated threshold: {cal['threshold']} (held-out chunk resident "
          f"{_fmt(cal['held_out_resident'])} in {cal['bucket']} <= {cal['target_resident']}; "
          f"in {res.checkpoint}/config.json, eval's default)" if cal else
          f"calibrated threshold: none keeps <= {cfg.target_resident} of held-out chunks "
          "resident; pass --threshold to eval")
    print(f"metrics {res.metrics_path}, plot {res.plot_path}")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = [
    "TrainConfig",
    "TrainResult",
    "focal_loss",
    "sample_targets",
    "sample_weights",
    "train",
]
