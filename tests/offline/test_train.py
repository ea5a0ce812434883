"""`flashmemory train` (offline/train.py) and the held-out metrics (offline/metrics.py).

Scenarios:
- focal loss (Eq. 14-15) equals the written-out formula; gamma 0 is weighted BCE;
  confident right answers cost less than under BCE;
- sampling: every golden visible entry is a positive, 3 negatives per positive from
  non-golden visible entries only (all of them when fewer), 3 for a window without
  positives, nothing from invisible entries;
- --negatives-per-positive 0 samples every visible entry, golden ones as positives;
- window weighting gives every window the same total weight, mean weight 1;
- training on a learnable synthetic harvest lifts held-out precision from the untrained
  indexer's base rate to > 0.8 with recall > 0.8, keeps the resident fraction near the golden fraction, and
  writes a loadable checkpoint, metrics.json (matching the result) and a PNG plot;
- metrics.json's threshold sweep covers 0.05-0.9, its resident fractions do not rise
  with the threshold, and its row at cfg.threshold is the final overall metrics;
- resuming after 2 of 3 epochs reproduces the uninterrupted 3-epoch run exactly;
- evaluate_indexer counts by hand on a fixed model; threshold 0 selects everything;
  threshold_sweep sorts and dedupes thresholds and matches evaluate_indexer at each;
- topk_sweep counts by hand: top ceil(f x visible chunks) by best-entry score, golden
  chunk recall and golden entry coverage; at 100% both are 1; the trained indexer's
  coverage at 20% beats an untrained one's;
- --init-from starts from a checkpoint (its shape wins); --epochs 0 only measures it,
  reproducing the trained run's held-out numbers;
- context buckets on power-of-two edges;
- the indexer's rope geometry comes from the manifest, else from the harvested model's
  config.json (tiny model: YaRN over 4096 original positions);
- refusals: an indexer layer without hidden states, bad TrainConfig values, an unknown
  --device;
- several harvests (two context lengths) train one indexer, each split on its own so
  both lengths are held out; harvests of another geometry are refused;
- on a GPU, --device cuda trains to the CPU run's losses, metrics and weights (fp32);
- the CLI runs end to end and prints the bucket table and the threshold sweep;
- init native: the indexer takes the backbone's q_lora_rank and starts
  as its lightning indexer (wq_a, q_norm, indexer.wq_b, indexer.weights_proj of each
  CSA layer), from the harvest's model or --backbone; refused: a --rank or --n-heads
  other than the backbone's, a folder without config.json / model.safetensors
  (naming --backbone), an unknown init.
The synthetic harvest names no backbone, so the other tests train with init random.
"""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from safetensors.torch import save_file
from test_dataset import make_harvest

from vllm_flashmemory.cli import main as cli_main
from vllm_flashmemory.core.memory_indexer import (
    MemoryIndexer,
    MemoryIndexerConfig,
    read_calibration,
)
from vllm_flashmemory.offline.dataset import (
    DocumentWindows,
    HarvestManifest,
    load_document,
)
from vllm_flashmemory.offline.metrics import (
    SWEEP_THRESHOLDS,
    bucket_name,
    bucket_sort_key,
    calibrate_threshold,
    document_task,
    evaluate_indexer,
    threshold_sweep,
    topk_sweep,
)
from vllm_flashmemory.offline.train import (
    TrainConfig,
    build_indexer_config,
    focal_loss,
    native_init,
    sample_targets,
    sample_weights,
    train,
)


def test_focal_loss_formula():
    torch.manual_seed(0)
    p, y, w = (
        torch.rand(50) * 0.98 + 0.01,
        (torch.rand(50) > 0.5).float(),
        torch.rand(50),
    )
    pc = p * y + (1 - p) * (1 - y)
    want = (w * (1 - pc) ** 2 * -(y * p.log() + (1 - y) * (1 - p).log())).mean()
    torch.testing.assert_close(focal_loss(p, y, w, 2.0), want)
    bce = torch.nn.functional.binary_cross_entropy(p, y, weight=w)
    torch.testing.assert_close(focal_loss(p, y, w, 0.0), bce)
    easy = torch.tensor([0.95])
    assert focal_loss(easy, torch.ones(1), torch.ones(1)) < 0.01 * focal_loss(
        easy, torch.ones(1), torch.ones(1), 0.0
    )


def test_sampling_three_negatives_per_positive():
    N = 40
    golden = torch.zeros(4, N, dtype=torch.bool)
    golden[0, [1, 2]] = True  # 2 positives -> 6 negatives
    golden[1, :9] = True  # 9 positives, only 1 non-golden visible entry -> 1 negative
    golden[3, 35] = True  # golden but invisible: not a positive
    visible = torch.arange(N)[None, :] < torch.tensor([30, 10, 20, 30])[:, None]
    mask, y = sample_targets(golden, visible, 3, torch.Generator().manual_seed(0))
    neg = mask & ~y.bool()
    assert torch.equal(y.bool(), golden & visible)
    assert neg.sum(1).tolist() == [
        6,
        1,
        3,
        3,
    ]  # windows 2 and 3 have no positive: 3 each
    assert not bool((neg & golden).any()) and not bool((mask & ~visible).any())
    other, _ = sample_targets(golden, visible, 3, torch.Generator().manual_seed(1))
    assert not torch.equal(mask, other)  # negatives are random, seeded


def test_sampling_every_negative():
    golden = torch.zeros(2, 12, dtype=torch.bool)
    golden[0, [1, 7]] = True
    golden[1, 11] = True  # invisible
    visible = torch.arange(12)[None, :] < torch.tensor([[10], [6]])
    mask, y = sample_targets(golden, visible, 0, torch.Generator().manual_seed(0))
    assert torch.equal(mask, visible) and torch.equal(y.bool(), golden & visible)


def test_window_weighting():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, :2] = True  # window 2 has no sample
    w = sample_weights(mask, "window")
    assert w[0].sum() == pytest.approx(w[1].sum())
    assert w[mask].mean() == pytest.approx(1.0)
    assert torch.equal(sample_weights(mask, "uniform"), mask.float())


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = {
        "data_dirs": str(tmp_path / "h"),
        "out_dir": str(tmp_path / "o"),
        "epochs": 6,
        "progress": False,
        "chunk_tokens": 64,
        # make_harvest's model is "synthetic": no backbone to start from.
        "init": "random",
    }
    return TrainConfig(**{**base, **kw})


def test_train_learns_and_writes_outputs(tmp_path):
    make_harvest(tmp_path / "h", n_docs=4)
    res = train(_cfg(tmp_path, n_heads=4))  # 2 native heads learn this too slowly
    last = res.final["overall"]
    assert len(res.history) == 6 and res.val_documents
    assert not set(res.val_documents) & set(res.train_documents)
    m = HarvestManifest.read(tmp_path / "h")
    val_docs = [d for d in m.documents if d.doc_id in res.val_documents]
    val = [load_document(m, d, (1, 2)) for d in val_docs]
    torch.manual_seed(0)
    untrained = evaluate_indexer(MemoryIndexer(res.indexer_config), val, 0.5, "or", 16)
    assert untrained.overall["precision"] < 0.5  # near the 1-in-4 base rate
    assert last["recall"] > 0.8 and last["precision"] > 0.8
    assert abs(last["resident_fraction"] - last["golden_fraction"]) < 0.1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # The checkpoint fits the harvested geometry and reproduces the reported metrics.
    want = MemoryIndexerConfig(
        hidden_size=32, rank=16, n_heads=4, head_dim=16, rope_dim=8, layer_ids=(1, 2)
    )
    assert res.indexer_config == want
    model = MemoryIndexer.load(res.checkpoint, expected=want)
    assert evaluate_indexer(model, val, entries_per_chunk=16).to_dict() == res.final
    saved = json.loads(res.metrics_path.read_text())
    assert (
        saved["final"] == json.loads(json.dumps(res.final))
        and len(saved["history"]) == 6
    )
    assert res.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = saved["threshold_sweep"]
    assert sweep == json.loads(json.dumps(res.threshold_sweep))
    assert [t["threshold"] for t in sweep] == list(SWEEP_THRESHOLDS)
    resident = [t["resident_fraction"] for t in sweep]
    chunk_resident = [t["chunk_resident_fraction"] for t in sweep]
    assert resident == sorted(resident, reverse=True) and resident[0] > resident[-1]
    assert chunk_resident == sorted(chunk_resident, reverse=True)
    (at_cfg,) = [t for t in sweep if t["threshold"] == 0.5]
    keys = [k for k in at_cfg if k not in ("threshold", "buckets")]
    assert {k: at_cfg[k] for k in keys} == {k: saved["final"]["overall"][k] for k in keys}
    for name, bucket in at_cfg["buckets"].items():  # per bucket, the same numbers
        assert bucket == {k: saved["final"]["buckets"][name][k] for k in bucket}
    assert not [p for p in res.checkpoint.parent.iterdir() if p.name.endswith(".tmp")]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    make_harvest(tmp_path / "h", n_docs=3, n_tokens=384)
    straight = train(_cfg(tmp_path, epochs=3, out_dir=str(tmp_path / "a")))
    train(_cfg(tmp_path, epochs=2, out_dir=str(tmp_path / "b")))
    resumed = train(_cfg(tmp_path, epochs=3, out_dir=str(tmp_path / "b"), resume=True))
    strip = lambda h: [
        {k: v for k, v in e.items() if k != "seconds"} for e in h
    ]
    assert strip(resumed.history) == strip(straight.history)
    a = MemoryIndexer.load(straight.checkpoint).state_dict()
    b = MemoryIndexer.load(resumed.checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="was written for indexer"):
        train(
            _cfg(tmp_path, epochs=4, out_dir=str(tmp_path / "b"), resume=True, rank=8)
        )


def test_evaluate_counts_by_hand():
    torch.manual_seed(0)
    cfg = MemoryIndexerConfig(
        hidden_size=8, rank=4, n_heads=2, head_dim=8, rope_dim=4, layer_ids=(0,)
    )
    model = MemoryIndexer(cfg)
    doc = DocumentWindows(
        doc_id="d",
        n_tokens=40,
        k_icomp=torch.randn(1, 10, 8),
        hidden=torch.randn(2, 1, 8),
        positions=torch.tensor([23, 39]),
        golden=torch.zeros(2, 10, dtype=torch.bool),
        n_visible=torch.tensor([6, 10]),
    )
    doc.golden[0, [0, 5]] = True
    doc.golden[1, [9]] = True
    scores = model(doc.hidden.transpose(0, 1), doc.positions, doc.k_icomp)[0]  # [2, 10]
    sel = (scores >= 0.5) & doc.visible_mask()
    got = evaluate_indexer(model, [doc], entries_per_chunk=4).overall
    hit = int((sel & doc.golden).sum())
    assert got["recall"] == pytest.approx(hit / 3)
    assert got["resident_fraction"] == pytest.approx(int(sel.sum()) / 16)
    everything = evaluate_indexer(
        model, [doc], threshold=0.0, entries_per_chunk=4
    ).overall
    assert everything["recall"] == 1.0 and everything["resident_fraction"] == 1.0
    assert everything["chunk_resident_fraction"] == 1.0 and everything[
        "precision"
    ] == pytest.approx(3 / 16)
    # The sweep scores once and thresholds many times: same numbers, ascending.
    sweep = threshold_sweep(model, [doc], (0.5, 0.0, 0.3, 0.5), entries_per_chunk=4)
    assert [t["threshold"] for t in sweep] == [0.0, 0.3, 0.5]
    for t in sweep:
        one = evaluate_indexer(model, [doc], t["threshold"], entries_per_chunk=4)
        keys = [k for k in t if k not in ("threshold", "buckets")]
        assert {k: t[k] for k in keys} == {k: one.overall[k] for k in keys}
        assert t["buckets"] == {
            name: {k: b[k] for k in t["buckets"][name]} for name, b in one.buckets.items()
        }


def test_topk_sweep_counts_by_hand():
    torch.manual_seed(0)
    cfg = MemoryIndexerConfig(
        hidden_size=8, rank=4, n_heads=2, head_dim=8, rope_dim=4, layer_ids=(0,)
    )
    model = MemoryIndexer(cfg)
    doc = DocumentWindows(
        doc_id="d", n_tokens=64, k_icomp=torch.randn(1, 16, 8),
        hidden=torch.randn(1, 1, 8), positions=torch.tensor([63]),
        golden=torch.zeros(1, 16, dtype=torch.bool), n_visible=torch.tensor([16]),
    )
    doc.golden[0, [0, 1, 2, 9]] = True  # chunk 0 holds 3 golden entries, chunk 2 one
    scores = model(doc.hidden.transpose(0, 1), doc.positions, doc.k_icomp)[0, 0]  # [16]
    best = scores.view(4, 4).amax(1)  # 4 chunks of 4 entries
    order = best.argsort(descending=True, stable=True).tolist()
    rows = topk_sweep(model, [doc], (0.25, 0.5, 1.0), entries_per_chunk=4)
    assert [r["fraction"] for r in rows] == [0.25, 0.5, 1.0]
    for r, k in zip(rows, (1, 2, 4)):
        kept = set(order[:k])
        assert r["chunk_resident_fraction"] == k / 4
        assert r["chunk_recall"] == pytest.approx(len(kept & {0, 2}) / 2)
        assert r["entry_coverage"] == pytest.approx(
            (3 * (0 in kept) + (2 in kept)) / 4)
    assert rows[-1]["chunk_recall"] == 1.0 and rows[-1]["entry_coverage"] == 1.0
    assert set(rows[0]["buckets"]) == {"0-1K"}
    assert rows[0]["tasks"] == {"other": {k: rows[0][k] for k in rows[0]["tasks"]["other"]}}
    # a second document of a RULER task: its own "tasks" row, the overall row sums both
    doc2 = dataclasses.replace(doc, doc_id="niah_multikey_2-niah_multikey_2-4352-7-0-a64")
    doc2.golden.zero_()
    doc2.golden[0, 15] = True
    two = topk_sweep(model, [doc, doc2], (1.0,), entries_per_chunk=4)[0]
    assert set(two["tasks"]) == {"other", "niah_multikey_2"}
    assert two["tasks"]["niah_multikey_2"]["windows"] == 1 and two["windows"] == 2
    assert two["tasks"]["niah_multikey_2"]["chunk_recall"] == 1.0
    assert document_task("vt-vt-4352-1-2-a9") == "vt"
    assert document_task("report-2024") == "other"
    with pytest.raises(ValueError, match="must lie in"):
        topk_sweep(model, [doc], (0.0,))


def test_init_from_and_measure_only(tmp_path):
    make_harvest(tmp_path / "h", n_docs=4)
    res = train(_cfg(tmp_path, n_heads=4, negatives_per_positive=0))
    assert res.final["overall"]["recall"] > 0.5
    top = {r["fraction"]: r for r in res.topk_sweep}
    cover = [r["entry_coverage"] for r in res.topk_sweep]
    assert cover == sorted(cover) and cover[-1] > cover[0]
    m = HarvestManifest.read(tmp_path / "h")
    val = [load_document(m, d, (1, 2)) for d in m.documents if d.doc_id in res.val_documents]
    torch.manual_seed(0)
    untrained = topk_sweep(MemoryIndexer(res.indexer_config), val, entries_per_chunk=16)
    assert top[0.2]["entry_coverage"] > untrained[-1]["entry_coverage"] + 0.05
    saved = json.loads(res.metrics_path.read_text())
    assert saved["topk_sweep"] == json.loads(json.dumps(res.topk_sweep))
    # --epochs 0 --init-from: the same checkpoint measured on the same held-out set.
    again = train(_cfg(tmp_path, out_dir=str(tmp_path / "m"), epochs=0, rank=3,
                       init_from=str(res.checkpoint)))
    assert again.indexer_config == res.indexer_config  # the checkpoint's shape wins
    assert again.history == [] and again.val_documents == res.val_documents
    assert again.final == res.final and again.topk_sweep == res.topk_sweep
    # Fine-tuning from it starts where it ended, not from a fresh init.
    more = train(_cfg(tmp_path, out_dir=str(tmp_path / "f"), epochs=1,
                      init_from=str(res.checkpoint), negatives_per_positive=0))
    assert more.history[0]["eval"]["overall"]["recall"] > 0.5
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        _cfg(tmp_path, init_from=str(tmp_path))


def test_buckets():
    assert [bucket_name(n) for n in (1, 1023, 1024, 2500, 4096, 70000)] == [
        "0-1K",
        "0-1K",
        "1K-2K",
        "2K-4K",
        "4K-8K",
        "64K-128K",
    ]
    names = ["16K-32K", "0-1K", "64K-128K", "2K-4K", "1K-2K"]
    assert sorted(names, key=bucket_sort_key) == ["0-1K", "1K-2K", "2K-4K", "16K-32K", "64K-128K"]


def test_refusals(tmp_path):
    make_harvest(tmp_path / "h", n_docs=2)
    with pytest.raises(
        ValueError, match=r"indexer layer 0 .* harvest holds CSA layers \[1, 2\]"
    ):
        train(_cfg(tmp_path, indexer_layers=(0,)))
    with pytest.raises(ValueError, match=r"epochs=0 must be an integer >= 1 \(0 only with"):
        _cfg(tmp_path, epochs=0)
    with pytest.raises(ValueError, match="negatives_per_positive=-1 must be an integer >= 0"):
        _cfg(tmp_path, negatives_per_positive=-1)
    with pytest.raises(ValueError, match="sample_weighting='votes' is not a rule"):
        _cfg(tmp_path, sample_weighting="votes")
    with pytest.raises(ValueError, match="val_fraction=1.0 must lie in"):
        _cfg(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"--device 'tpu'.*use --device cpu"):
        _cfg(tmp_path, device="tpu")
    with pytest.raises(ValueError, match="target_resident=1.5 must lie in"):
        _cfg(tmp_path, target_resident=1.5)


def test_train_on_harvests_of_two_lengths(tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    make_harvest(short, n_docs=4)  # queries in 0-1K
    make_harvest(long, n_docs=4, n_tokens=1536, prompt_tokens=1100)  # queries in 1K-2K
    res = train(_cfg(tmp_path, n_heads=4, data_dirs=(str(short), str(long))))
    # each harvest is split on its own, so both lengths are held out and evaluated
    assert len(res.val_documents) == 2 and len(res.train_documents) == 6
    assert set(res.final["buckets"]) == {"0-1K", "1K-2K"}
    assert all(set(t["buckets"]) == {"0-1K", "1K-2K"} for t in res.threshold_sweep)
    for bucket in res.final["buckets"].values():
        assert bucket["windows"] > 0 and bucket["recall"] > 0.5
    saved = json.loads(res.metrics_path.read_text())
    assert [f["path"] for f in saved["harvest"]["folders"]] == [str(short), str(long)]
    assert [f["prompt_tokens"] for f in saved["harvest"]["folders"]] == [256, 1100]
    assert saved["train_config"]["data_dirs"] == [str(short), str(long)]
    # the short harvest's split is the one it gets alone
    alone = train(_cfg(tmp_path, n_heads=4, epochs=1, data_dirs=str(short),
                       out_dir=str(tmp_path / "alone")))
    assert alone.val_documents == res.val_documents[:1]


def test_harvests_of_other_backbones_are_refused(tmp_path):
    make_harvest(tmp_path / "a", n_docs=2)
    make_harvest(tmp_path / "b", n_docs=2, hidden_size=48)
    with pytest.raises(ValueError, match=r"differ in geometry.*one backbone"):
        train(_cfg(tmp_path, data_dirs=(str(tmp_path / "a"), str(tmp_path / "b"))))
    with pytest.raises(ValueError, match="name a harvest twice"):
        _cfg(tmp_path, data_dirs=(str(tmp_path / "a"), str(tmp_path / "a")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(tmp_path):
    """Same samples, same steps: the GPU run ends where the CPU run does, up to fp32
    rounding, and writes a CPU checkpoint."""
    make_harvest(tmp_path / "h", n_docs=4)
    cpu = train(_cfg(tmp_path, n_heads=4, epochs=3, out_dir=str(tmp_path / "c")))
    gpu = train(_cfg(tmp_path, n_heads=4, epochs=3, out_dir=str(tmp_path / "g"), device="cuda"))
    for a, b in zip(cpu.history, gpu.history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 * max(1.0, a["train_loss"])
    for k in ("recall", "precision", "resident_fraction"):
        assert abs(cpu.final["overall"][k] - gpu.final["overall"][k]) < 0.02, k
    a = MemoryIndexer.load(cpu.checkpoint).state_dict()
    b = MemoryIndexer.load(gpu.checkpoint).state_dict()
    for k in a:
        assert b[k].device.type == "cpu"
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3)


def test_cli(tmp_path, capsys):
    make_harvest(tmp_path / "h", n_docs=2, n_tokens=320)
    rc = cli_main(
        [
            "train",
            str(tmp_path / "h"),
            "--out-dir",
            str(tmp_path / "o"),
            "--epochs",
            "1",
            "--init",
            "random",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "recall" in out and "0-1K" in out and "threshold 0.5" in out
    assert "threshold sweep" in out and "chunk resident" in out
    assert "per context bucket" not in out  # one bucket: the overall table says it all
    assert "top-K chunks" in out and "\n   20% " in out
    assert "calibrated threshold: " in out
    assert (tmp_path / "o" / "indexer" / "config.json").is_file()


def test_cli_prints_the_sweep_per_bucket_for_several_lengths(tmp_path, capsys):
    make_harvest(tmp_path / "a", n_docs=2, n_tokens=320)
    make_harvest(tmp_path / "b", n_docs=2, n_tokens=1536, prompt_tokens=1100)
    rc = cli_main(["train", str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir",
                   str(tmp_path / "o"), "--epochs", "1", "--init", "random", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out.split("per context bucket (held-out):")[1].splitlines()
    assert table[1].split() == ["threshold", "0-1K", "1K-2K"]
    assert len(table) >= 1 + 1 + 12 and "@" in table[2]



def test_cli_prints_top_k_per_task_for_task_documents(tmp_path, capsys):
    ids = tuple(f"{t}-{t}-512-0-{i}-a255" for i, t in
                enumerate(["vt", "niah_multikey_2"] * 4))
    make_harvest(tmp_path / "h", n_docs=8, doc_ids=ids)
    rc = cli_main(["train", str(tmp_path / "h"), "--out-dir", str(tmp_path / "o"),
                   "--epochs", "1", "--init", "random", "--val-fraction", "0.5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out.split("top-K chunks per task (held-out)")[1].splitlines()
    assert table[1].split() == ["task", "3%", "10%"]
    assert {table[2].split()[0], table[3].split()[0]} == {"niah_multikey_2", "vt"}
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert set(saved["topk_sweep"][0]["tasks"]) == {"niah_multikey_2", "vt"}

def test_rope_geometry_from_model_config(tmp_path):
    root = make_harvest(tmp_path / "h", n_docs=2, head_dim=128)
    man = json.loads((root / "manifest.json").read_text())
    del man["geometry"]["index_rope_dim"]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    yarn = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}
    (model_dir / "config.json").write_text(
        json.dumps(
            {"qk_rope_head_dim": 64, "compress_rope_theta": 1e5, "rope_scaling": yarn}
        )
    )
    man["model"] = str(model_dir)
    (root / "manifest.json").write_text(json.dumps(man))
    icfg = build_indexer_config(HarvestManifest.read(root), _cfg(tmp_path))
    assert (icfg.rope_dim, icfg.rope_theta) == (64, 1e5)
    assert (icfg.rope_factor, icfg.rope_original_max_position) == (16.0, 4096)
    assert icfg.rope_beta_fast == 32.0  # absent keys keep DeepSeek-V4's values


Q_LORA_RANK = 8


def make_backbone(root, hidden_size=32, index_n_heads=2, head_dim=16):
    """An official-name backbone folder fitting make_harvest's geometry (6 layers, CSA
    at 2, 4, 5): config.json plus each CSA layer's indexer query path, in bf16."""
    root.mkdir(parents=True)
    ratios = [0, 0, 4, 128, 4, 4, 0]  # + the MTP slot
    config = {"num_hidden_layers": 6, "compress_ratios": ratios,
              "hidden_size": hidden_size, "q_lora_rank": Q_LORA_RANK,
              "index_n_heads": index_n_heads, "index_head_dim": head_dim}
    (root / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(3)
    shapes = {
        "wq_a.weight": (Q_LORA_RANK, hidden_size),
        "q_norm.weight": (Q_LORA_RANK,),
        "indexer.wq_b.weight": (index_n_heads * head_dim, Q_LORA_RANK),
        "indexer.weights_proj.weight": (index_n_heads, hidden_size),
    }
    weights = {
        f"layers.{layer}.attn.{name}": torch.randn(shape, generator=g).bfloat16()
        for layer in (2, 4, 5)
        for name, shape in shapes.items()
    }
    weights["layers.4.attn.wkv.weight"] = torch.randn(16, hidden_size).bfloat16()  # unused
    save_file(weights, str(root / "model.safetensors"))
    return weights


def _native_expected(weights, lid_to_layer):
    names = {"wq_a.weight": "wq_a.weight", "q_norm_weight": "q_norm.weight",
             "wq_b.weight": "indexer.wq_b.weight",
             "weights_proj.weight": "indexer.weights_proj.weight"}
    return {f"layers.l{lid}.{ours}": weights[f"layers.{layer}.attn.{theirs}"].float()
            for lid, layer in lid_to_layer.items() for ours, theirs in names.items()}


def test_native_init_starts_as_backbone(tmp_path):
    root = make_harvest(tmp_path / "h", n_docs=3, n_tokens=320)
    weights = make_backbone(tmp_path / "backbone")
    want = _native_expected(weights, {1: 4, 2: 5})  # harvested CSA 1, 2 = layers 4, 5
    # The harvest's own model is the default backbone.
    man = json.loads((root / "manifest.json").read_text())
    man["model"] = str(tmp_path / "backbone")
    (root / "manifest.json").write_text(json.dumps(man))
    manifest = HarvestManifest.read(root)
    cfg = _cfg(tmp_path, init="native", native_scale=1.0)
    icfg = build_indexer_config(manifest, cfg)
    assert (icfg.rank, icfg.n_heads, icfg.layer_ids) == (Q_LORA_RANK, 2, (1, 2))
    torch.manual_seed(0)
    model = MemoryIndexer(icfg)
    native_init(model, manifest, cfg)
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # An explicit --backbone works as well. With a
    # vanishing learning rate one epoch leaves the backbone's weights in place.
    res = train(TrainConfig(
        data_dirs=str(root), out_dir=str(tmp_path / "o"), epochs=1, lr=1e-12,
        progress=False, chunk_tokens=64, backbone=str(tmp_path / "backbone"), init="native",
        native_scale=1.0,
    ))
    assert res.indexer_config == icfg
    trained = MemoryIndexer.load(res.checkpoint, expected=icfg).state_dict()
    for k in want:
        torch.testing.assert_close(trained[k], want[k], rtol=0, atol=1e-6)
    # A random init of the same shape is far from it: the check bites.
    rand = train(_cfg(tmp_path, out_dir=str(tmp_path / "r"), epochs=1, rank=Q_LORA_RANK))
    assert rand.indexer_config == icfg
    rand_w = MemoryIndexer.load(rand.checkpoint).state_dict()
    assert not torch.allclose(rand_w["layers.l1.wq_a.weight"], want["layers.l1.wq_a.weight"],
                              atol=1e-3)


def test_native_scale_multiplies_only_the_head_weights(tmp_path):
    root = make_harvest(tmp_path / "h", n_docs=3, n_tokens=320)
    weights = make_backbone(tmp_path / "backbone")
    want = _native_expected(weights, {1: 4, 2: 5})
    manifest = HarvestManifest.read(root)
    cfg = _cfg(tmp_path, init="native", native_scale=0.25, backbone=str(tmp_path / "backbone"))
    model = MemoryIndexer(build_indexer_config(manifest, cfg))
    native_init(model, manifest, cfg)
    got = model.state_dict()
    for k, v in want.items():
        factor = 0.25 if k.endswith("weights_proj.weight") else 1.0
        torch.testing.assert_close(got[k], v * factor, rtol=0, atol=0)
    for bad in ({"native_scale": 0.0}, {"relu_slope": 1.0}, {"relu_slope": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _cfg(tmp_path, **bad)


def test_native_init_refusals(tmp_path):
    root = make_harvest(tmp_path / "h", n_docs=2)
    make_backbone(tmp_path / "backbone")
    manifest = HarvestManifest.read(root)
    native = {"init": "native", "backbone": str(tmp_path / "backbone")}
    with pytest.raises(ValueError, match=r"rank=16 .*q_lora_rank=8"):
        build_indexer_config(manifest, _cfg(tmp_path, rank=16, **native))
    assert build_indexer_config(manifest, _cfg(tmp_path, rank=8, **native)).rank == 8
    with pytest.raises(ValueError, match=r"n_heads=4 .*index_n_heads=2"):
        build_indexer_config(manifest, _cfg(tmp_path, n_heads=4, **native))
    # The synthetic harvest names no model folder; nor does a wrong --backbone hold one.
    with pytest.raises(FileNotFoundError, match=r"'synthetic'.*--backbone"):
        train(_cfg(tmp_path, init="native"))
    with pytest.raises(FileNotFoundError, match=r"nope'.*--backbone"):
        train(_cfg(tmp_path, init="native", backbone=str(tmp_path / "nope")))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*--backbone"):
        train(_cfg(tmp_path, init="native", backbone=str(tmp_path / "no_weights")))
    with pytest.raises(ValueError, match="init='bogus' is not an init"):
        _cfg(tmp_path, init="bogus")
    with pytest.raises(FileNotFoundError, match="--backbone"):
        cli_main(["train", str(root), "--out-dir", str(tmp_path / "o"), "--epochs", "1",
                  "--init", "native", "--backbone", str(tmp_path / "nope"), "--no-progress"])


def test_calibrate_threshold_reads_the_longest_bucket():
    """The lowest swept threshold whose held-out chunk resident fraction, in the
    longest context bucket, meets the target; None when none does."""
    def row(t, short, long):
        return {"threshold": t, "chunk_resident_fraction": 0.0,
                "buckets": {"16K-32K": {"chunk_resident_fraction": long},
                            "0-1K": {"chunk_resident_fraction": short}}}

    sweep = [row(0.9, 0.01, 0.02), row(0.5, 0.05, 0.40), row(0.7, 0.30, 0.08)]
    got = calibrate_threshold(sweep, 0.1)
    # 0.7 meets 10% at 16K-32K though its short bucket keeps 30%; 0.5 keeps 40% there
    assert got == {"threshold": 0.7, "target_resident": 0.1, "held_out_resident": 0.08,
                   "bucket": "16K-32K"}
    assert calibrate_threshold(sweep, 0.01) is None
    flat = [{"threshold": 0.5, "chunk_resident_fraction": None},
            {"threshold": 0.6, "chunk_resident_fraction": 0.05}]
    assert calibrate_threshold(flat, 0.1)["threshold"] == 0.6  # no buckets: the overall
    with pytest.raises(ValueError, match="target_resident=0 must lie in"):
        calibrate_threshold(sweep, 0)


def test_train_writes_the_calibration_into_checkpoint_and_metrics(tmp_path):
    make_harvest(tmp_path / "h", n_docs=4)
    res = train(_cfg(tmp_path, epochs=1, target_resident=1.0))  # any sweep meets 100%
    assert res.calibration is not None and res.calibration["target_resident"] == 1.0
    assert res.calibration["chunk_tokens"] == 64 and res.calibration["routing"] == "or"
    assert read_calibration(res.checkpoint) == res.calibration
    saved = json.loads(res.metrics_path.read_text())["calibration"]
    assert saved == res.calibration
    # the lowest swept threshold, since every one keeps at most 100%
    assert res.calibration["threshold"] == min(r["threshold"] for r in res.threshold_sweep)
