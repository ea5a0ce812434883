"""Golden labels: cross-layer majority voting over native-indexer nuclei (Eq. 7-11).

`--source attention` takes each layer's nucleus over the main attention's probability
on the compressed entries (harvested with `harvest --attention`) instead of the
softmax of the native indexer's logits; voting and the window union are the same.
Why: on the committed tiny backbone the indexer's softmax is flat. Its p = 0.6
nucleus over an answer held 6-50 entries per window and missed the needle's value
entries in 3 of 16 4K documents, while the attention that produced the answer sits
on the needle; the `oracle` rows of `flashmemory eval`, which rank by that attention,
keep full accuracy at 3% of the history (docs/RESULTS.md).

`--layers` restricts the vote to some CSA layers (indices among them). On the same
backbone only the first CSA layer retrieves: it puts 50-60% of its attention on the
needle at every answer position, while the other two read the sink, recent entries
and the same few structural spots in every document, so a vote that needs them
finds nothing (0.1 golden entries per window with all three and min_votes 3).

`golden_labels` is the public contract; `flashmemory label` streams it over
harvested shards (docs/DATA_FORMAT.md) and writes `labels.safetensors` per document.

A window is what one refresh serves. Serving refreshes before the forward of token t
with the hidden state of the last processed token q = t - 1 (reference/engine.py and
the connector decide residency before the forward that reads it), and that residency
holds for the forwards of tokens q + 1 .. q + tau. So window w of a harvest with
prompt_tokens P has query position q_w = P + tau * w and the golden entries of
positions q_w + 1 .. q_w + tau. Harvest question documents with --prompt-tokens one
less than the prompt, so q_0 is the prompt's last token, where serving refreshes at
the end of prefill. (Windows used to start at the query itself: the indexer learned
from the hidden state of the first answer token, which serving never has.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_flashmemory.core.atomic import atomic_save_tensors, atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelConfig:
    """Golden-label filtering (paper §2.2)."""

    # Nucleus mass per (position, layer), Eq. 8; None = DEFAULT_TOP_P[source]: the
    # paper's p = 0.6 over the indexer's softmax, 0.3 over the attention.
    top_p: float | None = None
    # Layers that must agree, Eq. 10; the paper's θ = 3.
    min_votes: int = 3
    # Lookahead window in decode steps, Eq. 11; the paper's τ = 64.
    tau: int = 64
    # What each layer's nucleus is taken over: "indexer" (softmax of the native
    # indexer's logits, the paper's Eq. 7) or "attention" (the main attention's
    # probability on each compressed entry; needs `harvest --attention`).
    source: str = "indexer"
    # CSA layers (indices among them) whose nuclei vote, Eq. 9; None = every one.
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(
                f"source={self.source!r} is not a label source; use 'indexer' (the "
                "paper's) or 'attention' (harvested with --attention)."
            )
        if self.top_p is None:
            object.__setattr__(self, "top_p", DEFAULT_TOP_P[self.source])
        _check_label_args(self.top_p, self.min_votes, self.tau)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or len(set(self.layers)) != len(self.layers) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers
            ):
                raise ValueError(
                    f"layers={list(self.layers)!r} must list distinct CSA layer indices "
                    "(0 = the first CSA layer), e.g. 0 or 0,1,2."
                )
            if self.min_votes > len(self.layers):
                raise ValueError(
                    f"min_votes={self.min_votes} exceeds the {len(self.layers)} voting "
                    f"layers {list(self.layers)}; use --min-votes {len(self.layers)} or less."
                )


LABEL_SOURCES = ("indexer", "attention")
# Nucleus mass by source. The attention is far more peaked than the indexer's softmax:
# on niah_multikey_2 the first CSA layer puts ~0.4 of its history attention on the
# asked needle, so p = 0.6 had to add 15-25 entries of the other needle-shaped lines
# and the indexer trained on them lost the key matching (docs/RESULTS.md, seventh
# session); p = 0.3 keeps 6-8 entries, the needle always among them.
DEFAULT_TOP_P = {"indexer": 0.6, "attention": 0.3}


def _check_label_args(top_p: float, min_votes: int, tau: int) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (
        0.0 < top_p <= 1.0
    ):
        raise ValueError(
            f"top_p={top_p!r} must lie in (0, 1]: it is the probability mass each "
            "layer's nucleus must reach; use 0.6 (the paper's value)."
        )
    if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
        raise ValueError(
            f"min_votes={min_votes!r} must be a positive integer (layers that must "
            "agree); use 3 (the paper's value)."
        )
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(
            f"tau={tau!r} must be a positive integer number of decode steps; use 64."
        )


def golden_entries(
    logits: torch.Tensor,
    visible: torch.Tensor,
    *,
    top_p: float = 0.6,
    min_votes: int = 3,
) -> torch.Tensor:
    """Per-position golden entries A_i (Eq. 7-10).

    logits: [T, L, N] float native indexer logits; visible: [T, N] bool.
    returns: [T, N] bool, True where at least `min_votes` layers put the entry in
    their top-p nucleus. Ties in probability are broken by the lower entry index.
    """
    T, L, N = _check_inputs(logits, visible, top_p, min_votes)
    vis = visible.unsqueeze(1).expand(T, L, N)  # [T, L, N]
    if torch.any(vis & ~torch.isfinite(logits)):
        raise ValueError(
            "logits hold NaN or infinite values at visible entries; only entries "
            "that are not visible may be -inf. Check the harvest (docs/DATA_FORMAT.md)."
        )
    masked = logits.double().masked_fill(~vis, float("-inf"))  # [T, L, N]
    any_visible = visible.any(dim=1)  # [T]
    # Eq. 7: softmax over the visible entries; rows with nothing visible stay zero.
    probs = torch.softmax(masked.masked_fill(~any_visible[:, None, None], 0.0), dim=-1)
    return _nucleus_votes(probs.masked_fill(~vis, 0.0), vis, top_p, min_votes)


def golden_entries_from_attention(
    attention: torch.Tensor,
    visible: torch.Tensor,
    *,
    top_p: float = 0.6,
    min_votes: int = 3,
) -> torch.Tensor:
    """Per-position golden entries with the main attention in place of Eq. 7.

    attention: [T, L, N] float, each layer's attention probability on each compressed
    entry (rows sum to <= 1: the rest is on the sliding window); visible: [T, N] bool.
    Each row is renormalized over the visible entries, so top_p is a share of the
    mass the layer put on compressed history; a row with none has an empty nucleus.
    returns: [T, N] bool, as golden_entries.
    """
    T, L, N = _check_inputs(attention, visible, top_p, min_votes)
    vis = visible.unsqueeze(1).expand(T, L, N)  # [T, L, N]
    a = attention.double()
    if torch.any(~torch.isfinite(a)) or torch.any(a < 0):
        raise ValueError(
            "attention holds negative, NaN or infinite values; it must be the "
            "probabilities `harvest --attention` writes (docs/DATA_FORMAT.md)."
        )
    a = a.masked_fill(~vis, 0.0)
    total = a.sum(dim=-1, keepdim=True)  # [T, L, 1]
    probs = torch.where(total > 0, a / total.clamp(min=1e-300), a)
    return _nucleus_votes(probs, vis & (total > 0), top_p, min_votes)


def _nucleus_votes(
    probs: torch.Tensor, vis: torch.Tensor, top_p: float, min_votes: int
) -> torch.Tensor:
    """Eq. 8-10 on [T, L, N] probabilities: per-layer top-p nucleus, then the vote."""
    # Eq. 8: an entry is in the nucleus iff the mass of the entries before it
    # (sorted by probability, stable so ties keep index order) is still < top_p;
    # that keeps the entry that crosses top_p and never leaves the nucleus empty.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    in_nucleus_sorted = mass_before < top_p
    in_nucleus = torch.zeros_like(in_nucleus_sorted)
    in_nucleus.scatter_(-1, order, in_nucleus_sorted)
    in_nucleus &= vis
    votes = in_nucleus.sum(dim=1)  # [T, N], Eq. 9
    return votes >= min_votes  # Eq. 10


def golden_labels(
    logits: torch.Tensor,
    visible: torch.Tensor,
    *,
    top_p: float = 0.6,
    min_votes: int = 3,
    tau: int = 64,
) -> torch.Tensor:
    """Window labels Y_w = union of golden entries over positions [w*tau, (w+1)*tau), Eq. 11.

    logits: [T, L, N] float (T decode positions, L CSA layers, N compressed entries);
    visible: [T, N] bool. returns: [ceil(T / tau), N] bool.
    """
    _check_label_args(top_p, min_votes, tau)
    golden = golden_entries(logits, visible, top_p=top_p, min_votes=min_votes)
    return windows_union(golden, tau)


def windows_union(golden: torch.Tensor, tau: int) -> torch.Tensor:
    """[T, N] per-position labels -> [ceil(T / tau), N] union per window (Eq. 11)."""
    T, N = golden.shape
    W = math.ceil(T / tau)
    padded = torch.zeros(W * tau, N, dtype=torch.bool)
    padded[:T] = golden
    return padded.view(W, tau, N).any(dim=1)


def _check_inputs(
    logits: torch.Tensor, visible: torch.Tensor, top_p: float, min_votes: int
) -> tuple[int, int, int]:
    _check_label_args(top_p, min_votes, 1)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            f"logits must be a float tensor [T, L, N]; got "
            f"{getattr(logits, 'shape', type(logits).__name__)}."
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point; got {logits.dtype}.")
    T, L, N = logits.shape
    if not isinstance(visible, torch.Tensor) or visible.dtype != torch.bool:
        raise TypeError(
            f"visible must be a bool tensor [T, N]; got "
            f"{getattr(visible, 'dtype', type(visible).__name__)}."
        )
    if tuple(visible.shape) != (T, N):
        raise ValueError(
            f"visible has shape {tuple(visible.shape)} but logits [T, L, N] = "
            f"{(T, L, N)} need it to be {(T, N)}."
        )
    if min_votes > L:
        raise ValueError(
            f"min_votes={min_votes} exceeds the {L} CSA layers in logits, so no "
            f"entry could ever be golden; use min_votes <= {L}."
        )
    return T, L, N


# ---- flashmemory label --------------------------------------------------------------


def label_harvest(root: str | Path, config: LabelConfig, *, progress: bool = True) -> dict:
    """Write labels.safetensors for every complete document of a harvest at `root`.

    Streams one shard at a time, so memory is bounded by a shard, not a document.
    Returns summary statistics (windows, golden entries per window, golden fraction).
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} does not exist; point `flashmemory label` at the "
            "output directory of `flashmemory harvest`."
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "flashmemory-harvest/1":
        raise ValueError(
            f"{manifest_path} has format {manifest.get('format')!r}; expected "
            "'flashmemory-harvest/1' (re-run `flashmemory harvest`)."
        )
    if config.source == "attention" and not manifest.get("attention", False):
        raise ValueError(
            f"--source attention needs the attention the harvest at {root} did not "
            "record; re-run `flashmemory harvest` with --attention into a new --out."
        )
    geometry = manifest["geometry"]
    n_csa = len(geometry["csa_layers"])
    voting = list(config.layers) if config.layers is not None else list(range(n_csa))
    if max(voting) >= n_csa:
        raise ValueError(
            f"--layers {voting} names a CSA layer the harvested model lacks: it has "
            f"{n_csa} (indices 0..{n_csa - 1})."
        )
    if config.min_votes > n_csa:
        raise ValueError(
            f"min_votes={config.min_votes} exceeds the {n_csa} CSA layers of the "
            f"harvested model; use --min-votes {n_csa} or less."
        )
    ratio = int(geometry["compress_ratio"])
    prompt_tokens = int(manifest["prompt_tokens"])
    docs = [d for d in manifest["documents"] if d.get("complete")]
    if not docs:
        raise ValueError(f"{root} holds no complete document; finish the harvest first.")
    n_windows = n_golden = n_visible = 0
    for doc in tqdm(docs, desc="label", unit="doc", disable=not progress):
        doc_dir = root / doc["dir"]
        n_entries = int(doc["n_tokens"]) // ratio
        # positions P + 1 .. n_tokens - 1 are served; P itself is only the first query
        n_served = int(doc["n_tokens"]) - prompt_tokens - 1
        W = math.ceil(n_served / config.tau)
        if W == 0:
            logger.warning("%s: no position after the query at %d; no window",
                           doc["doc_id"], prompt_tokens)
        labels = torch.zeros(W, n_entries, dtype=torch.bool)  # [W, N]
        for j in range(int(doc["n_shards"])):
            shard = load_file(str(doc_dir / f"shard{j:05d}.safetensors"))
            positions = shard["positions"]  # [T_s]
            logits = shard["logits"]  # [T_s, L, N]
            entry = torch.arange(logits.shape[-1])
            visible = entry[None, :] < ((positions + 1) // ratio)[:, None]  # [T_s, N]
            if config.source == "attention":
                golden = golden_entries_from_attention(
                    shard["attention"][:, voting], visible, top_p=config.top_p,
                    min_votes=config.min_votes,
                )
            else:
                golden = golden_entries(
                    logits[:, voting], visible, top_p=config.top_p,
                    min_votes=config.min_votes,
                )
            # position p is served by the window whose query q_w satisfies q_w < p <= q_w + tau
            window = torch.div(positions - prompt_tokens - 1, config.tau, rounding_mode="floor")
            for w in torch.unique(window).tolist():
                if w >= 0:
                    labels[w] |= golden[window == w].any(dim=0)
        query_positions = prompt_tokens + config.tau * torch.arange(W)
        visible_at_query = (
            torch.arange(n_entries)[None, :] < ((query_positions + 1) // ratio)[:, None]
        )
        n_windows += W
        n_golden += int((labels & visible_at_query).sum())
        n_visible += int(visible_at_query.sum())
        atomic_save_tensors(
            doc_dir / "labels.safetensors",
            {"golden": labels, "query_positions": query_positions.to(torch.int64)},
        )
    manifest["labels"] = {
        "top_p": config.top_p,
        "min_votes": config.min_votes,
        "tau": config.tau,
        "source": config.source,
        "layers": voting,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    summary = {
        "documents": len(docs),
        "windows": n_windows,
        "golden_per_window": n_golden / max(n_windows, 1),
        "golden_fraction_of_history": n_golden / max(n_visible, 1),
    }
    logger.info("labelled %s", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = LabelConfig()
    parser.add_argument("harvest_dir", help="output directory of `flashmemory harvest`")
    parser.add_argument(
        "--top-p", type=float, default=None,
        help="nucleus mass per position and layer, Eq. 8 (default: "
        f"{DEFAULT_TOP_P['indexer']} with --source indexer, the paper's; "
        f"{DEFAULT_TOP_P['attention']} with --source attention)",
    )
    parser.add_argument(
        "--min-votes", type=int, default=defaults.min_votes,
        help="CSA layers that must agree for an entry to be golden, Eq. 10 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--tau", type=int, default=defaults.tau,
        help="lookahead window in decode steps, Eq. 11 (default: %(default)s)",
    )
    parser.add_argument(
        "--layers", type=lambda t: tuple(int(x) for x in t.split(",") if x.strip()),
        help="comma-separated CSA layer indices whose nuclei vote (default: all)",
    )
    parser.add_argument(
        "--source", choices=LABEL_SOURCES, default=defaults.source,
        help="nucleus over the native indexer's softmax (the paper's) or over the main "
        "attention (needs `harvest --attention`) (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    config = LabelConfig(top_p=args.top_p, min_votes=args.min_votes, tau=args.tau,
                         source=args.source, layers=args.layers)
    summary = label_harvest(args.harvest_dir, config)
    print(
        f"labelled {summary['documents']} documents, {summary['windows']} windows: "
        f"{summary['golden_per_window']:.1f} golden entries per window "
        f"({100 * summary['golden_fraction_of_history']:.1f}% of visible history)"
    )
    return 0
