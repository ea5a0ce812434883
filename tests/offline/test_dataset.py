"""Reading labelled harvests into training windows (offline/dataset.py).

Scenarios:
- a synthetic `flashmemory-harvest/1` directory (built here; `make_harvest` is reused by
  test_train.py) reads back: geometry, documents, rope fields when recorded;
- load_document picks the hidden rows of the query positions from the right shard and
  the right hidden layer, the keys of the indexer layers, visibility (p + 1) // m, and
  golden ∩ visible;
- refusals: missing manifest, foreign format tag, an indexer layer without recorded
  hidden states, query positions absent from the shards, keys of the wrong width;
- incomplete and unlabelled documents are skipped;
- split_documents splits by document, deterministically, and needs two documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_flashmemory.offline.dataset import (
    HarvestManifest,
    check_indexer_layers,
    load_document,
    split_documents,
)


def make_harvest(
    root: Path,
    n_docs: int = 4,
    n_tokens: int = 512,
    prompt_tokens: int = 256,
    tau: int = 16,
    positions_per_shard: int = 100,
    hidden_size: int = 32,
    head_dim: int = 16,
    n_topics: int = 4,
    index_n_heads: int = 2,
    seed: int = 0,
    doc_ids: tuple[str, ...] = (),
) -> Path:
    """A learnable harvest: a window's golden entries are those sharing its topic.

    Keys of topic z point along a fixed direction U[z]; the hidden state of a query
    of topic z is a fixed linear image of z, so a query encoder can learn to map
    it onto U[z]. 3 CSA layers, hidden states recorded for CSA layers 1 and 2.
    """
    g = torch.Generator().manual_seed(seed)
    n_csa, hidden_layers, m = 3, [1, 2], 4
    U = torch.nn.functional.normalize(
        torch.randn(n_topics, head_dim, generator=g), dim=-1
    )
    A = torch.randn(len(hidden_layers), n_topics, hidden_size, generator=g)
    docs = []
    for i in range(n_docs):
        d = root / f"doc{i:05d}"
        d.mkdir(parents=True)
        n = n_tokens // m
        z = torch.randint(n_topics, (n,), generator=g)
        keys = 3.0 * U[z][None].repeat(n_csa, 1, 1) + 0.3 * torch.randn(
            n_csa, n, head_dim, generator=g
        )
        save_file({"k_icomp": keys.contiguous()}, str(d / "keys.safetensors"))
        positions = torch.arange(prompt_tokens, n_tokens)
        hidden = torch.randn(
            len(positions), len(hidden_layers), hidden_size, generator=g
        )
        W = (n_tokens - prompt_tokens) // tau
        qpos = prompt_tokens + tau * torch.arange(W)
        topic = torch.randint(n_topics, (W,), generator=g)
        hidden[qpos - prompt_tokens] = A[:, topic].transpose(0, 1) + 0.1 * torch.randn(
            W, len(hidden_layers), hidden_size, generator=g
        )
        visible = torch.arange(n)[None, :] < ((positions + 1) // m)[:, None]
        logits = torch.randn(len(positions), n_csa, n, generator=g).masked_fill(
            ~visible[:, None], float("-inf")
        )
        n_shards = 0
        for s in range(0, len(positions), positions_per_shard):
            sl = slice(s, s + positions_per_shard)
            save_file(
                {
                    "positions": positions[sl].contiguous(),
                    "hidden": hidden[sl].contiguous(),
                    "logits": logits[sl].contiguous(),
                },
                str(d / f"shard{n_shards:05d}.safetensors"),
            )
            n_shards += 1
        golden = (
            z[None, :] == topic[:, None]
        )  # [W, N]; invisible entries are cut by the reader
        save_file(
            {"golden": golden, "query_positions": qpos}, str(d / "labels.safetensors")
        )
        docs.append(
            {
                "doc_id": doc_ids[i] if doc_ids else f"doc-{i}",
                "dir": d.name,
                "n_tokens": n_tokens,
                "n_shards": n_shards,
                "complete": True,
            }
        )
    manifest = {
        "format": "flashmemory-harvest/1",
        "model": "synthetic",
        "prompt_tokens": prompt_tokens,
        "positions_per_shard": positions_per_shard,
        "geometry": {
            "n_layers": 6,
            "csa_layers": [2, 4, 5],
            "hidden_layers": hidden_layers,
            "hidden_size": hidden_size,
            "index_n_heads": index_n_heads,
            "index_head_dim": head_dim,
            "compress_ratio": m,
            "index_rope_dim": 8,
        },
        "documents": docs,
        "labels": {"top_p": 0.6, "min_votes": 2, "tau": tau},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_manifest_reads_back(tmp_path):
    m = HarvestManifest.read(make_harvest(tmp_path, n_docs=2))
    assert m.geometry.csa_layers == (2, 4, 5) and m.geometry.hidden_layers == (1, 2)
    assert m.geometry.rope_dim == 8 and m.geometry.rope_theta is None
    assert [d.doc_id for d in m.documents] == ["doc-0", "doc-1"]
    assert m.documents[0].n_shards == 3  # 256 decode positions / 100 per shard


def test_load_document_picks_rows_layers_and_visibility(tmp_path):
    m = HarvestManifest.read(make_harvest(tmp_path, n_docs=2))
    doc = m.documents[1]
    w = load_document(m, doc, (2,))
    d = tmp_path / doc.dir
    labels = load_file(str(d / "labels.safetensors"))
    assert torch.equal(w.positions, labels["query_positions"])
    # Window 7 sits at position 256 + 7 * 16 = 368: shard 1, row 12.
    # CSA layer 2 is hidden row 1.
    shard = load_file(str(d / "shard00001.safetensors"))
    assert int(shard["positions"][12]) == 368
    assert torch.equal(w.hidden[7, 0], shard["hidden"][12, 1])
    assert torch.equal(
        w.k_icomp[0], load_file(str(d / "keys.safetensors"))["k_icomp"][2]
    )
    assert w.n_visible.tolist() == [(int(p) + 1) // 4 for p in w.positions]
    vis = w.visible_mask()
    assert torch.equal(w.golden, labels["golden"] & vis)
    assert bool((labels["golden"] & ~vis).any())  # the reader really cut something


def test_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
        HarvestManifest.read(tmp_path)
    root = make_harvest(tmp_path / "h", n_docs=2)
    m = HarvestManifest.read(root)
    with pytest.raises(
        ValueError, match=r"indexer layer 0 .* harvest holds CSA layers \[1, 2\]"
    ):
        check_indexer_layers(m.geometry, (0, 2))
    labels = load_file(str(root / "doc00000" / "labels.safetensors"))
    save_file(
        {**labels, "query_positions": labels["query_positions"] + 1000},
        str(root / "doc00000" / "labels.safetensors"),
    )
    with pytest.raises(ValueError, match="have no recorded hidden state"):
        load_document(m, m.documents[0], (1, 2))
    save_file(
        {"k_icomp": torch.zeros(3, 128, 8)}, str(root / "doc00001" / "keys.safetensors")
    )
    with pytest.raises(ValueError, match=r"k_icomp has shape \(3, 128, 8\)"):
        load_document(m, m.documents[1], (1, 2))
    man = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(
        json.dumps({**man, "format": "flashmemory-harvest/0"})
    )
    with pytest.raises(ValueError, match="format='flashmemory-harvest/0'"):
        HarvestManifest.read(root)


def test_incomplete_and_unlabelled_documents_are_skipped(tmp_path):
    root = make_harvest(tmp_path, n_docs=3)
    man = json.loads((root / "manifest.json").read_text())
    man["documents"][0]["complete"] = False
    (root / "manifest.json").write_text(json.dumps(man))
    (root / "doc00002" / "labels.safetensors").unlink()
    assert [d.doc_id for d in HarvestManifest.read(root).labelled_documents()] == [
        "doc-1"
    ]


def test_split_by_document(tmp_path):
    docs = list(
        HarvestManifest.read(
            make_harvest(tmp_path, n_docs=5, n_tokens=300, prompt_tokens=268)
        ).documents
    )
    tr, va = split_documents(docs, 0.25, seed=3)
    assert len(va) == 1 and len(tr) == 4
    assert {d.doc_id for d in tr}.isdisjoint({d.doc_id for d in va})
    assert split_documents(list(reversed(docs)), 0.25, seed=3) == (
        tr,
        va,
    )  # order-independent
    with pytest.raises(ValueError, match="1 labelled document"):
        split_documents(docs[:1], 0.25, seed=0)
