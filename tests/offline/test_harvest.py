"""`flashmemory harvest` and its documents.

Scenarios:
- output follows flashmemory-harvest/1: manifest fields, shard tensor names, dtypes,
  shapes, consecutive positions from P, -inf exactly where s >= (p + 1) // 4, keys
  Hadamard-rotated (rotating back gives what the native indexer scored against)
- an exception injected after the first shard leaves only whole shards; a rerun
  finishes, and every file is byte-identical to an uninterrupted run
- bad input is refused before work: missing model dir, prompt_tokens >= doc length,
  hidden layer out of range, resuming into an --out with other settings
- synthetic documents are deterministic and plant recalled facts; JSONL is validated
- what training reads: a Memory Indexer built from the manifest with init native
  (offline/train.py) scores sigmoid(recorded logits) on every visible entry, from the
  recorded hidden states, keys and positions
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_flashmemory.core.memory_indexer import MemoryIndexer
from vllm_flashmemory.core.rotation import hadamard_rotate
from vllm_flashmemory.dsv4.checkpoint import load_hf_model
from vllm_flashmemory.offline.dataset import HarvestManifest
from vllm_flashmemory.offline.documents import read_jsonl, synthetic_documents
from vllm_flashmemory.offline.harvest import HarvestConfig, harvest, tokenize_documents
from vllm_flashmemory.offline.tiny_model import make_tiny
from vllm_flashmemory.offline.train import (
    TrainConfig,
    build_indexer_config,
    native_init,
)

N_TOKENS, P, S = 96, 32, 24


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = make_tiny(str(tmp_path_factory.mktemp("model")), seed=0)
    docs = synthetic_documents(1, N_TOKENS - 1, seed=0)
    ids = tokenize_documents(str(model_dir), docs, N_TOKENS)
    return str(model_dir), docs, ids, load_hf_model(model_dir)


def _cfg(model_dir, out, **kw):
    return HarvestConfig(model=model_dir, out=str(out), prompt_tokens=P,
                         positions_per_shard=S, max_chunk_tokens=32, **kw)


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    model_dir, docs, ids, model = setup
    out = tmp_path_factory.mktemp("full")
    harvest(_cfg(model_dir, out), docs, ids, progress=False, model=model)
    return out


def test_format(setup, full_run):
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["format"] == "flashmemory-harvest/1"
    assert manifest["prompt_tokens"] == P and manifest["positions_per_shard"] == S
    geo = manifest["geometry"]
    assert geo["csa_layers"] == [2, 4, 6, 8] and geo["hidden_layers"] == [0, 1, 2, 3]
    assert geo["compress_ratio"] == 4 and geo["index_head_dim"] == 128
    (doc,) = manifest["documents"]
    assert doc["complete"] and doc["n_tokens"] == N_TOKENS and doc["n_shards"] == 3
    n_doc = N_TOKENS // 4
    keys = load_file(str(full_run / "doc00000" / "keys.safetensors"))["k_icomp"]
    assert keys.dtype == torch.float32 and keys.shape == (4, n_doc, 128)
    positions = []
    for k in range(3):
        shard = load_file(str(full_run / "doc00000" / f"shard{k:05d}.safetensors"))
        assert set(shard) == {"positions", "hidden", "logits"}
        t = shard["positions"].shape[0]
        assert shard["positions"].dtype == torch.int64
        assert shard["hidden"].shape == (t, 4, 256)
        assert shard["logits"].shape == (t, 4, n_doc)
        visible = torch.isfinite(shard["logits"])
        expect = torch.arange(n_doc)[None, :] < ((shard["positions"] + 1) // 4)[:, None]
        assert torch.equal(visible, expect[:, None, :].expand_as(visible))
        positions.append(shard["positions"])
    assert torch.equal(torch.cat(positions), torch.arange(P, N_TOKENS))
    # rotated keys: H is symmetric orthonormal, so rotating twice gives them back
    back = hadamard_rotate(keys)
    assert not torch.allclose(back, keys)
    torch.testing.assert_close(hadamard_rotate(back), keys, atol=1e-5, rtol=0)


def test_resume_is_byte_identical(setup, full_run, tmp_path):
    model_dir, docs, ids, model = setup
    out = tmp_path / "resumed"

    def stop_after_first(doc_id, shard):
        raise Interrupt

    with pytest.raises(Interrupt):
        harvest(_cfg(model_dir, out), docs, ids, progress=False, model=model,
                on_shard_written=stop_after_first)
    files = sorted(p.name for p in (out / "doc00000").iterdir())
    assert files == ["shard00000.safetensors"]  # no half-written shard, no temp file
    assert not json.loads((out / "manifest.json").read_text())["documents"][0]["complete"]
    written = []
    harvest(_cfg(model_dir, out), docs, ids, progress=False, model=model,
            on_shard_written=lambda d, k: written.append(k))
    assert written == [1, 2]  # the kept shard is not rewritten
    for name in ["manifest.json", "doc00000/keys.safetensors",
                 *[f"doc00000/shard{k:05d}.safetensors" for k in range(3)]]:
        if name == "manifest.json":
            continue  # holds the output path; compared below without it
        assert (out / name).read_bytes() == (full_run / name).read_bytes(), name
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((full_run / "manifest.json").read_text())
    assert a == b


def test_bad_input(setup, tmp_path):
    model_dir, docs, ids, model = setup
    with pytest.raises(ValueError, match="make-tiny"):
        _cfg(str(tmp_path / "missing"), tmp_path / "o")
    with pytest.raises(ValueError, match="no decode position"):
        cfg = HarvestConfig(model=model_dir, out=str(tmp_path / "o"),
                            prompt_tokens=N_TOKENS)
        harvest(cfg, docs, ids, progress=False, model=model)
    with pytest.raises(ValueError, match="hidden-layers"):
        harvest(_cfg(model_dir, tmp_path / "o", hidden_layers=(4,)), docs, ids,
                progress=False, model=model)
    with pytest.raises(ValueError, match="prompt-tokens"):
        HarvestConfig(model=model_dir, out="x", prompt_tokens=0)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_resume_with_other_settings_refused(setup, full_run):
    model_dir, docs, ids, model = setup
    cfg = HarvestConfig(model=model_dir, out=str(full_run), prompt_tokens=P + 4,
                        positions_per_shard=S)
    with pytest.raises(ValueError, match="pick a new --out"):
        harvest(cfg, docs, ids, progress=False, model=model)


def test_documents(tmp_path):
    a = synthetic_documents(2, 3000, seed=5)
    assert a == synthetic_documents(2, 3000, seed=5)
    assert a != synthetic_documents(2, 3000, seed=6)
    assert all(len(d.text) == 3000 for d in a)
    assert "Recall: the" in a[0].text
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n\n{"id": "b", "text": "x"}\n')
    assert [d.doc_id for d in read_jsonl(path)] == ["a", "b"]
    path.write_text('{"id": 3, "text": "hello"}\n')
    with pytest.raises(ValueError, match="string fields 'id' and 'text'"):
        read_jsonl(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")


def test_device_flag_is_validated(setup, tmp_path):
    model_dir = setup[0]
    assert _cfg(model_dir, tmp_path).device == "cpu"
    with pytest.raises(ValueError, match=r"--device 'tpu'.*use --device cpu"):
        _cfg(model_dir, tmp_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --device cpu"):
            _cfg(model_dir, tmp_path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_harvest_matches_cpu(setup, full_run, tmp_path):
    """The same shards on the GPU (fp32), up to float rounding."""
    model_dir, docs, ids, _ = setup
    harvest(_cfg(model_dir, tmp_path, device="cuda"), docs, ids, progress=False)
    for f in sorted(full_run.glob("doc*/*.safetensors")):
        cpu, gpu = load_file(f), load_file(tmp_path / f.relative_to(full_run))
        assert cpu.keys() == gpu.keys()
        for k in cpu:
            assert gpu[k].device.type == "cpu" and gpu[k].dtype == cpu[k].dtype
            if k == "positions":
                assert torch.equal(gpu[k], cpu[k])
            else:
                torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-3, atol=1e-3)


def test_native_init_reproduces_recorded_logits(full_run):
    manifest = HarvestManifest.read(full_run)  # its model folder is the backbone
    cfg = TrainConfig(data_dirs=str(full_run), out_dir="unused", init="native",
                      native_scale=1.0)
    mi = MemoryIndexer(build_indexer_config(manifest, cfg))
    assert mi.config.layer_ids == (0, 1, 2, 3)
    native_init(mi, manifest, cfg)
    keys = load_file(str(full_run / "doc00000" / "keys.safetensors"))["k_icomp"]
    for k in range(3):
        shard = load_file(str(full_run / "doc00000" / f"shard{k:05d}.safetensors"))
        with torch.no_grad():
            got = mi(shard["hidden"].transpose(0, 1), shard["positions"], keys)
        want = torch.sigmoid(shard["logits"].transpose(0, 1))  # [L, t, N]; 0 if hidden
        visible = torch.isfinite(shard["logits"].transpose(0, 1))
        assert visible.any() and want[visible].std() > 0.05
        torch.testing.assert_close(got[visible], want[visible], rtol=0, atol=1e-5)


def _cli_harvest(model_dir, out, *extra):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vllm_flashmemory.cli", "harvest", "--model", model_dir,
           "--out", str(out), "--synthetic", "3", "--tokens", str(N_TOKENS), "--seed", "5",
           "--prompt-tokens", str(P), "--positions-per-shard", str(S),
           "--max-chunk-tokens", "32", "--no-progress", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*.safetensors"))}


def test_workers_match_one_process_and_resume(setup, tmp_path):
    model_dir = setup[0]
    one, two = tmp_path / "one", tmp_path / "two"
    _cli_harvest(model_dir, one)
    printed = _cli_harvest(model_dir, two, "--workers", "2")
    assert "harvested 3 of 3 documents" in printed
    assert sorted(p.name for p in two.glob("worker*.log")) == ["worker0.log", "worker1.log"]
    assert _files(two) == _files(one) and len(_files(one)) == 3 * 4  # 3 shards + keys each
    manifest = json.loads((two / "manifest.json").read_text())
    assert [d["complete"] for d in manifest["documents"]] == [True, True, True]
    assert manifest == json.loads((one / "manifest.json").read_text()) | {"model": manifest["model"]}
    # A worker stopped inside document 1: its keys and last shard are missing. The rerun
    # marks it incomplete, redoes only that shard and the keys, and ends identical.
    (two / "doc00001" / "keys.safetensors").unlink()
    (two / "doc00001" / "shard00002.safetensors").unlink()
    kept = (two / "doc00000" / "shard00000.safetensors").stat().st_mtime_ns
    _cli_harvest(model_dir, two, "--workers", "2")
    assert _files(two) == _files(one)
    assert (two / "doc00000" / "shard00000.safetensors").stat().st_mtime_ns == kept


def test_cuda_workers_split_the_gpu_memory():
    """Each GPU worker is capped at 0.9/k of the device, so one long document's cache
    growth cannot starve the others; CPU workers get no cap."""
    import argparse

    from vllm_flashmemory.offline.harvest import add_arguments, worker_command

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--out", "o", "--documents", "d.jsonl",
                              "--prompt-tokens", "8", "--workers", "4", "--device", "cuda"])
    cmd = worker_command(args, 1)
    again = parser.parse_args(cmd[4:])
    assert again.cuda_memory_fraction == pytest.approx(0.225)
    assert (again.worker, again.device) == ("1/4", "cuda")
    two_gpus = parser.parse_args(worker_command(args, 1, workers_per_gpu=2)[4:])
    assert two_gpus.cuda_memory_fraction == pytest.approx(0.45)  # 4 workers on 2 GPUs
    cpu = parser.parse_args(["--model", "m", "--out", "o", "--documents", "d.jsonl",
                             "--prompt-tokens", "8", "--workers", "4"])
    assert "--cuda-memory-fraction" not in worker_command(cpu, 0)
    from vllm_flashmemory.dsv4.checkpoint import limit_cuda_memory

    with pytest.raises(ValueError, match="--cuda-memory-fraction 1.5 must lie in"):
        limit_cuda_memory(1.5, "cpu")  # a worker refuses a bad share before any work


def test_worker_flag_is_validated():
    from vllm_flashmemory.offline.harvest import parse_worker

    assert parse_worker("1/4") == (1, 4) and parse_worker(None) is None
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(ValueError, match="must be i/k"):
            parse_worker(bad)


def test_attention_capture_is_what_the_layer_read(setup, full_run, tmp_path):
    """--attention adds each CSA layer's head-mean attention probability on every
    compressed entry: non-negative, at most 1 per row, zero where the entry is not
    visible, nonzero only on the native top-k (index_topk = 64) of that position's
    logits; every other tensor stays byte-identical, and labels --source attention
    pick only entries the attention read."""
    from vllm_flashmemory.offline.labels import LabelConfig, label_harvest

    model_dir, _, _, model = setup
    docs = synthetic_documents(1, 383, seed=3)
    ids = tokenize_documents(model_dir, docs, 384)
    plain, with_attn = tmp_path / "plain", tmp_path / "attn"
    cfg = dict(model=model_dir, prompt_tokens=300, positions_per_shard=64,
               max_chunk_tokens=128)
    harvest(HarvestConfig(out=str(plain), **cfg), docs, ids, progress=False, model=model)
    harvest(HarvestConfig(out=str(with_attn), attention=True, **cfg), docs, ids,
            progress=False, model=model)
    assert json.loads((with_attn / "manifest.json").read_text())["attention"] is True
    n_doc = 384 // 4
    for f in sorted(plain.glob("doc*/*.safetensors")):
        a, b = load_file(f), load_file(with_attn / f.relative_to(plain))
        assert set(b) - set(a) <= {"attention"}
        for k in a:
            assert torch.equal(a[k], b[k])
        if "attention" not in b:
            continue
        att, logits, pos = b["attention"], b["logits"], b["positions"]
        assert att.shape == (pos.shape[0], 4, n_doc) and att.dtype == torch.float32
        visible = torch.arange(n_doc)[None, :] < ((pos + 1) // 4)[:, None]  # [t, N]
        assert bool((att >= 0).all()) and bool((att.sum(-1) <= 1 + 1e-5).all())
        assert bool((att.sum(-1) > 0).all())  # every layer reads some history here
        assert not bool((att * ~visible[:, None, :]).any())
        top = logits.topk(64, dim=-1).indices  # [t, L, 64]
        in_top = torch.zeros_like(att, dtype=torch.bool).scatter_(-1, top, True)
        assert not bool(((att > 0) & ~in_top).any())
        assert int((att[0, 0] > 0).sum()) <= 64 < int(visible[0].sum())
    with pytest.raises(ValueError, match="needs the attention"):
        label_harvest(plain, LabelConfig(tau=16, source="attention"), progress=False)
    label_harvest(with_attn, LabelConfig(tau=16, source="attention"), progress=False)
    golden = load_file(with_attn / "doc00000" / "labels.safetensors")["golden"]
    read = torch.zeros(n_doc, dtype=torch.bool)
    for f in sorted((with_attn / "doc00000").glob("shard*.safetensors")):
        read |= (load_file(f)["attention"] > 0).any(0).any(0)
    assert golden.any() and not bool((golden & ~read).any())
    with pytest.raises(ValueError, match="other settings"):  # resume keeps the setting
        harvest(HarvestConfig(out=str(plain), attention=True, **cfg), docs, ids,
                progress=False, model=model)
