"""Training windows for the Memory Indexer, read from a labelled harvest directory.

Layout (the agreed `flashmemory-harvest/1` format, written by harvest and label):

    OUT/manifest.json                 geometry, documents, label settings
    OUT/docNNNNN/keys.safetensors     k_icomp f32 [L_csa, N_doc, Dk] (Hadamard-rotated)
    OUT/docNNNNN/shardNNNNN.safetensors
                                      positions i64 [T_s], hidden f32 [T_s, L_h, D],
                                      logits f32 [T_s, L_csa, N_doc] (not read here)
    OUT/docNNNNN/labels.safetensors   golden bool [W, N_doc], query_positions i64 [W]

One window w of a document is one training query: the hidden states at
`query_positions[w]` of each indexer layer, the entries visible there
(s < (p + 1) // m), and its golden targets (Eq. 11) restricted to those entries.
Keys stay frozen: the dual encoder of paper §2.3 trains only the query side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

HARVEST_FORMAT = "flashmemory-harvest/1"


@dataclass(frozen=True)
class HarvestGeometry:
    """The backbone's shape as the harvest recorded it."""

    n_layers: int
    # Decoder ids of the CSA layers; index i here is "CSA layer i" everywhere else.
    csa_layers: tuple[int, ...]
    # Indices AMONG the CSA layers whose hidden states the shards hold, in shard order.
    hidden_layers: tuple[int, ...]
    hidden_size: int
    index_n_heads: int
    # Width Dk of K^IComp; the indexer's head_dim must equal it.
    index_head_dim: int
    compress_ratio: int
    # Optional rope geometry of the compress rope (None = not recorded by harvest).
    rope_dim: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_json(
        cls, g: dict[str, Any], model_config: dict[str, Any] | None = None
    ) -> HarvestGeometry:
        """Read the manifest's geometry; rope fields the manifest lacks come from the
        model's official config.json (`qk_rope_head_dim`, `compress_rope_theta`,
        `rope_scaling`) when it is readable."""
        mc = model_config or {}
        g = {
            **{
                k: mc[k] for k in ("qk_rope_head_dim", "compress_rope_theta") if k in mc
            },
            **({"rope_scaling": mc["rope_scaling"]} if "rope_scaling" in mc else {}),
            **g,
        }
        return cls(
            n_layers=int(g["n_layers"]),
            csa_layers=tuple(int(x) for x in g["csa_layers"]),
            hidden_layers=tuple(int(x) for x in g["hidden_layers"]),
            hidden_size=int(g["hidden_size"]),
            index_n_heads=int(g["index_n_heads"]),
            index_head_dim=int(g["index_head_dim"]),
            compress_ratio=int(g["compress_ratio"]),
            rope_dim=_opt_int(g.get("index_rope_dim", g.get("qk_rope_head_dim"))),
            rope_theta=_opt_float(g.get("compress_rope_theta")),
            rope_scaling=g.get("rope_scaling"),
        )


@dataclass(frozen=True)
class DocumentInfo:
    doc_id: str
    dir: str
    n_tokens: int
    n_shards: int
    complete: bool
    # The harvest folder holding `dir` (training may read several harvests).
    root: Path = Path(".")


@dataclass(frozen=True)
class HarvestManifest:
    root: Path
    model: str
    prompt_tokens: int
    positions_per_shard: int
    geometry: HarvestGeometry
    documents: tuple[DocumentInfo, ...]
    labels: dict[str, Any]

    @classmethod
    def read(cls, root: str | Path) -> HarvestManifest:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; point `flashmemory train` at a directory "
                "written "
                "by `flashmemory harvest` and `flashmemory label`."
            )
        m = json.loads(path.read_text())
        if m.get("format") != HARVEST_FORMAT:
            raise ValueError(
                f"{path} has format={m.get('format')!r}; this version reads "
                f"{HARVEST_FORMAT!r}. Re-run `flashmemory harvest`."
            )
        docs = tuple(
            DocumentInfo(
                doc_id=str(d["doc_id"]),
                dir=str(d["dir"]),
                n_tokens=int(d["n_tokens"]),
                n_shards=int(d["n_shards"]),
                complete=bool(d["complete"]),
                root=root,
            )
            for d in m["documents"]
        )
        return cls(
            root=root,
            model=str(m.get("model", "")),
            prompt_tokens=int(m["prompt_tokens"]),
            positions_per_shard=int(m["positions_per_shard"]),
            geometry=HarvestGeometry.from_json(m["geometry"], _model_config(m)),
            documents=docs,
            # Labels written before --source existed came from the native indexer.
            labels=_label_settings(m),
        )

    def labelled_documents(self) -> list[DocumentInfo]:
        """Complete documents that have a labels file, in manifest order."""
        out = []
        for d in self.documents:
            if not d.complete:
                logger.warning("skipping %s: its harvest is incomplete", d.doc_id)
            elif not (self.root / d.dir / "labels.safetensors").is_file():
                logger.warning(
                    "skipping %s: no labels.safetensors (run `flashmemory label`)",
                    d.doc_id,
                )
            else:
                out.append(d)
        return out


@dataclass
class DocumentWindows:
    """All labelled windows of one document, restricted to the indexer layers."""

    doc_id: str
    n_tokens: int
    k_icomp: torch.Tensor  # [L, N, Dk] frozen keys of the indexer layers
    hidden: torch.Tensor  # [W, L, D] query hidden states
    positions: torch.Tensor  # [W] int64 query positions
    golden: torch.Tensor  # [W, N] bool, already restricted to visible entries
    n_visible: torch.Tensor  # [W] int64 entries visible at each query, (p + 1) // m

    @property
    def n_windows(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: str | torch.device) -> DocumentWindows:
        """The model's inputs (keys, hidden states, positions) on `device`; labels and
        visibility stay on the CPU, where sampling and counting happen."""
        return dataclasses.replace(
            self, k_icomp=self.k_icomp.to(device), hidden=self.hidden.to(device),
            positions=self.positions.to(device),
        )

    def visible_mask(self) -> torch.Tensor:
        """bool [W, N]: entry s is visible to window w iff s < n_visible[w]."""
        n = self.k_icomp.shape[1]
        return torch.arange(n)[None, :] < self.n_visible[:, None]


def check_indexer_layers(
    geometry: HarvestGeometry, layer_ids: tuple[int, ...]
) -> list[int]:
    """Rows of the shards' hidden axis for `layer_ids` (indices among CSA layers)."""
    rows = []
    for lid in layer_ids:
        if lid not in geometry.hidden_layers:
            raise ValueError(
                f"indexer layer {lid} (an index among the {len(geometry.csa_layers)} "
                "CSA "
                f"layers) has no recorded hidden states: the harvest holds CSA layers "
                f"{list(geometry.hidden_layers)}. Pick --indexer-layers from those, or "
                "re-run `flashmemory harvest` recording this layer."
            )
        rows.append(geometry.hidden_layers.index(lid))
    return rows


def load_document(
    manifest: HarvestManifest, doc: DocumentInfo, layer_ids: tuple[int, ...]
) -> DocumentWindows:
    """Read one document's keys, query hidden states and golden labels."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = manifest.geometry
    rows = check_indexer_layers(g, layer_ids)
    d = doc.root / doc.dir
    k_all = load_file(str(d / "keys.safetensors"))["k_icomp"]  # [L_csa, N, Dk]
    if (
        k_all.dim() != 3
        or k_all.shape[0] != len(g.csa_layers)
        or k_all.shape[2] != g.index_head_dim
    ):
        raise ValueError(
            f"{d / 'keys.safetensors'}: k_icomp has shape {tuple(k_all.shape)}; the "
            "manifest "
            f"implies [{len(g.csa_layers)}, N, {g.index_head_dim}]. Re-run the harvest."
        )
    k_icomp = k_all[list(layer_ids)].float().contiguous()  # [L, N, Dk]
    labels = load_file(str(d / "labels.safetensors"))
    golden, qpos = labels["golden"].to(torch.bool), labels["query_positions"].to(
        torch.int64
    )
    n = k_icomp.shape[1]
    if golden.dim() != 2 or golden.shape[1] != n or golden.shape[0] != qpos.shape[0]:
        raise ValueError(
            f"{d / 'labels.safetensors'}: golden {tuple(golden.shape)} and "
            "query_positions "
            f"{tuple(qpos.shape)} do not fit N={n} keys; re-run `flashmemory label`."
        )
    hidden = torch.empty(qpos.shape[0], len(rows), g.hidden_size)  # [W, L, D]
    found = torch.zeros(qpos.shape[0], dtype=torch.bool)
    wanted = {int(p): w for w, p in enumerate(qpos.tolist())}
    for j in range(doc.n_shards):
        with safe_open(str(d / f"shard{j:05d}.safetensors"), framework="pt") as f:
            pos = f.get_tensor("positions").tolist()
            hit = [(i, wanted[p]) for i, p in enumerate(pos) if p in wanted]
            if not hit:
                continue
            h = f.get_tensor("hidden")  # [T_s, L_h, D]
            src = torch.tensor([i for i, _ in hit])
            dst = torch.tensor([w for _, w in hit])
            hidden[dst] = h[src][:, rows].float()
            found[dst] = True
    if not bool(found.all()):
        missing = qpos[~found][:5].tolist()
        raise ValueError(
            f"{doc.doc_id}: query positions {missing} have no recorded hidden state "
            "in its "
            "shards; the labels and the harvest disagree, re-run `flashmemory label`."
        )
    n_visible = ((qpos + 1) // g.compress_ratio).clamp(max=n)  # [W]
    visible = torch.arange(n)[None, :] < n_visible[:, None]
    return DocumentWindows(
        doc_id=doc.doc_id,
        n_tokens=doc.n_tokens,
        k_icomp=k_icomp,
        hidden=hidden,
        positions=qpos,
        golden=golden & visible,  # targets = golden ∩ candidates
        n_visible=n_visible,
    )


def same_backbone(manifests: list[HarvestManifest]) -> HarvestManifest:
    """The first of several harvests after checking that they can train one indexer
    together: same backbone, geometry and label settings (their lengths may differ)."""
    if not manifests:
        raise ValueError("no harvest folder given; pass at least one DATA_DIR.")
    first = manifests[0]
    for m in manifests[1:]:
        for what, a, b in (("model", first.model, m.model),
                           ("geometry", first.geometry, m.geometry),
                           ("label settings", first.labels, m.labels)):
            if a != b:
                raise ValueError(
                    f"harvests {str(first.root)!r} and {str(m.root)!r} differ in {what} "
                    f"({a!r} vs {b!r}); train on harvests of one backbone, labelled with "
                    "the same `flashmemory label` settings."
                )
    return first


def split_documents(
    docs: list[DocumentInfo], val_fraction: float, seed: int
) -> tuple[list[DocumentInfo], list[DocumentInfo]]:
    """Split by document (never by window: windows of a document share their keys)."""
    if len(docs) < 2:
        raise ValueError(
            f"{len(docs)} labelled document(s); training needs at least 2 so one can "
            "be "
            "held out for evaluation. Harvest more documents."
        )
    order = sorted(docs, key=lambda d: (d.doc_id, str(d.root)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    return order[n_val:], order[:n_val]


def _label_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """manifest["labels"] with the defaults of keys older harvests lack: labels came
    from the native indexer with every CSA layer voting."""
    labels = manifest.get("labels")
    if not labels:
        return {}
    n_csa = len(manifest["geometry"]["csa_layers"])
    return {"source": "indexer", "layers": list(range(n_csa)), **labels}


def _model_config(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The harvested model's config.json, if `manifest["model"]` is a readable "
    "directory."""
    path = Path(str(manifest.get("model", ""))) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        logger.warning("cannot read %s; rope geometry falls back to defaults", path)
        return None


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


__all__ = [
    "HARVEST_FORMAT",
    "HarvestGeometry",
    "HarvestManifest",
    "DocumentInfo",
    "DocumentWindows",
    "check_indexer_layers",
    "load_document",
    "same_backbone",
    "split_documents",
]
