"""Memory Indexer (core/memory_indexer.py).

Scenarios:
- YaRN inverse frequencies and the query RoPE equal transformers' DeepSeek-V4 compress
  rope (tiny geometry and the Flash geometry, positions past the original 65536).
- Scores equal a hand-written Eq. 1-4 pipeline (explicit butterfly Hadamard, einsum) on
  fresh random inputs, with float keys and with fp8 e4m3 keys plus per-entry scales.
- The Hadamard rotation preserves q . k, so rotated keys score like unrotated ones.
- select: OR = union of per-layer selections (Eq. 13), mean routing, >= at the
  threshold, threshold 0 keeps everything; entries -> chunks (partial last chunk)
  and chunk ids.
- Checkpoint round trip gives identical scores and leaves no temp files.
- load refuses: hidden size, head_dim, rope, layer ids, tampered tensor shape, missing
  files, foreign format tag; config refuses bad values and unknown presets.
- The published retriever layout (torch state dict, `retrievers.l<id>.*`, freqs_cis
  buffers) loads and scores like the same weights in our format; a bare single-layer
  file needs the layer id.
- native_indexer_state maps an official checkpoint's layers.{L}.attn.{wq_a, q_norm,
  indexer.wq_b, indexer.weights_proj} of the CSA layers onto `layers.l<id>.*` (fp32,
  loadable as is); a missing tensor or a non-CSA index is refused, naming it. (Scores
  equal sigmoid(native index score): tests/dsv4/test_native_indexer.py.)
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_flashmemory.core.memory_indexer import (
    MemoryIndexer,
    MemoryIndexerConfig,
    apply_rope,
    entries_to_chunks,
    native_indexer_state,
    select,
    selected_chunk_ids,
    yarn_inv_freq,
)

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config  # noqa: E402
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (  # noqa: E402
    DeepseekV4RotaryEmbedding,
    apply_rotary_pos_emb,
)

TINY = MemoryIndexerConfig.from_values(
    hidden_size=48, rank=24, n_heads=4, head_dim=32, rope_dim=16, layer_ids=[1, 3]
)


def _hf_rotary(main_head_dim: int, rope_dim: int) -> DeepseekV4RotaryEmbedding:
    cfg = DeepseekV4Config(
        hidden_size=64,
        num_attention_heads=2,
        head_dim=main_head_dim,
        qk_rope_head_dim=rope_dim,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "compressed_sparse_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        max_position_embeddings=65536 * 16,
    )
    return DeepseekV4RotaryEmbedding(cfg)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard by butterflies (independent of the module's matrix)."""
    *lead, d = x.shape
    h = x.clone()
    s = 1
    while s < d:
        h = h.view(*lead, d // (2 * s), 2, s)
        h = torch.stack((h[..., 0, :] + h[..., 1, :], h[..., 0, :] - h[..., 1, :]), -2)
        h = h.reshape(*lead, d)
        s *= 2
    return h / math.sqrt(d)


@pytest.mark.parametrize(
    "main_head_dim,rope_dim,head_dim", [(64, 16, 32), (512, 64, 128)]
)
def test_rope_matches_transformers_compress_rope(main_head_dim, rope_dim, head_dim):
    torch.manual_seed(0)
    rot = _hf_rotary(main_head_dim, rope_dim)
    cfg = MemoryIndexerConfig(hidden_size=64, head_dim=head_dim, rope_dim=rope_dim)
    torch.testing.assert_close(
        yarn_inv_freq(cfg), rot.compress_inv_freq, rtol=0, atol=0
    )
    assert rot.compress_attention_scaling == 1.0  # no mscale, as we assume
    pos = torch.tensor([0, 1, 7, 4095, 70000, 300001])
    x = torch.randn(len(pos), 3, head_dim)  # [T, H, Dh]
    cos, sin = rot(x, position_ids=pos[None], layer_type="compress")  # [1, T, rd/2]
    want = apply_rotary_pos_emb(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    got = apply_rope(x, pos, yarn_inv_freq(cfg))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., : head_dim - rope_dim], x[..., : head_dim - rope_dim])


def _manual_scores(model, hidden, pos, k, k_scale, rot):
    """Eq. 1-4 written out, with transformers' rope and a butterfly Hadamard."""
    cfg = model.config
    out = []
    for i, lid in enumerate(cfg.layer_ids):
        lay = model.layers[f"l{lid}"]
        c = hidden[i] @ lay.wq_a.weight.T
        c = (
            c
            / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
            * lay.q_norm_weight
        )
        q = (c @ lay.wq_b.weight.T).view(-1, cfg.n_heads, cfg.head_dim)
        cos, sin = rot(q, position_ids=pos[None], layer_type="compress")
        q = apply_rotary_pos_emb(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        q = _fwht(q)
        w = (
            hidden[i]
            @ lay.weights_proj.weight.T
            / math.sqrt(cfg.n_heads * cfg.head_dim)
        )
        kf = k[i].float() * (k_scale[i][:, None] if k_scale is not None else 1.0)
        logit = torch.einsum("thd,nd->thn", q, kf).clamp_min(0)
        out.append(torch.sigmoid(torch.einsum("thn,th->tn", logit, w)))
    return torch.stack(out)


@pytest.mark.parametrize("fp8", [False, True])
def test_scores_equal_direct_eq4(fp8):
    torch.manual_seed(1 + fp8)
    model = MemoryIndexer(TINY)
    for p in model.parameters():  # non-trivial norm weights too
        torch.nn.init.normal_(p, std=0.5)
    L, T, N = len(TINY.layer_ids), 5, 37
    hidden = torch.randn(L, T, TINY.hidden_size)
    pos = torch.tensor([3, 64, 511, 1000, 90000])
    k = _fwht(torch.randn(L, N, TINY.head_dim))
    k_scale = None
    if fp8:
        k_scale = torch.rand(L, N) + 0.1
        k = (k / k_scale[..., None]).to(torch.float8_e4m3fn)
    got = model(hidden, pos, k, k_scale)
    want = _manual_scores(model, hidden, pos, k, k_scale, _hf_rotary(64, 16))
    assert got.shape == (L, T, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0.05 < (got > 0.5).float().mean() < 0.95  # not a saturated, trivial case


def test_hadamard_preserves_dot_products():
    torch.manual_seed(3)
    model = MemoryIndexer(TINY)
    hidden, pos = torch.randn(2, 4, TINY.hidden_size), torch.arange(4) * 9
    k = torch.randn(2, 11, TINY.head_dim)
    q, w = model.query(hidden, pos)
    q_unrot = q @ model.hadamard  # H H = I undoes the query's rotation
    plain = torch.sigmoid(
        torch.einsum(
            "lthn,lth->ltn", torch.einsum("lthd,lnd->lthn", q_unrot, k).relu(), w
        )
    )
    torch.testing.assert_close(
        model(hidden, pos, _fwht(k)), plain, rtol=1e-5, atol=1e-5
    )


def test_select_or_mean_threshold_semantics():
    s = torch.tensor(
        [[[0.9, 0.2, 0.5, 0.1]], [[0.1, 0.6, 0.49, 0.1]]]
    )  # [L=2, T=1, N=4]
    assert select(s, 0.5, "or").tolist() == [[True, True, True, False]]
    per_layer = (s >= 0.5).any(0)
    assert torch.equal(select(s, 0.5, "or"), per_layer)  # Eq. 13 union
    assert select(s, 0.5, "mean").tolist() == [[True, False, False, False]]
    assert select(s, 0.0).all()
    with pytest.raises(ValueError, match="routing='vote'"):
        select(s, 0.5, "vote")
    with pytest.raises(ValueError, match="threshold=1.5 must lie in"):
        select(s, 1.5)


def test_entries_to_chunks_and_ids():
    m = torch.zeros(10, dtype=torch.bool)
    m[[1, 9]] = True
    assert entries_to_chunks(m, 4).tolist() == [
        True,
        False,
        True,
    ]  # 10 entries -> 3 chunks
    assert selected_chunk_ids(m, 4).tolist() == [0, 2]
    batch = torch.stack([m, torch.zeros(10, dtype=torch.bool)])
    assert entries_to_chunks(batch, 5).tolist() == [[True, True], [False, False]]
    with pytest.raises(ValueError, match="entries_per_chunk=0"):
        entries_to_chunks(m, 0)


def test_round_trip_and_atomic(tmp_path):
    torch.manual_seed(4)
    model = MemoryIndexer(TINY)
    model.save(tmp_path / "ck")
    assert sorted(x.name for x in (tmp_path / "ck").iterdir()) == [
        "config.json",
        "memory_indexer.safetensors",
    ]
    back = MemoryIndexer.load(tmp_path / "ck", expected=TINY)
    assert back.config == TINY
    hidden, pos, k = (
        torch.randn(2, 3, 48),
        torch.tensor([5, 50, 500]),
        torch.randn(2, 9, 32),
    )
    assert torch.equal(model(hidden, pos, k), back(hidden, pos, k))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden_size": 64}, "hidden_size=48 but the model needs hidden_size=64"),
        ({"head_dim": 64}, "head_dim=32 but the model needs head_dim=64"),
        ({"rope_theta": 10000.0}, "rope_theta=160000.0 but the model needs"),
        (
            {"layer_ids": (1, 2)},
            r"layer_ids=\(1, 3\) but the model needs layer_ids=\(1, 2\)",
        ),
    ],
)
def test_load_refuses_mismatched_model(tmp_path, change, match):
    MemoryIndexer(TINY).save(tmp_path)
    expected = MemoryIndexerConfig.from_values(**{**TINY.to_dict(), **change})
    with pytest.raises(ValueError, match=match):
        MemoryIndexer.load(tmp_path, expected=expected)


def test_load_refuses_broken_checkpoints(tmp_path):
    MemoryIndexer(TINY).save(tmp_path)
    st = load_file(str(tmp_path / "memory_indexer.safetensors"))
    st["layers.l1.wq_a.weight"] = torch.zeros(3, 48)
    save_file(st, str(tmp_path / "memory_indexer.safetensors"))
    with pytest.raises(
        ValueError, match=r"'layers.l1.wq_a.weight' has shape \(3, 48\)"
    ):
        MemoryIndexer.load(tmp_path)
    del st["layers.l1.wq_a.weight"]
    save_file(st, str(tmp_path / "memory_indexer.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['layers.l1.wq_a.weight'\]"):
        MemoryIndexer.load(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ValueError, match="format='other/9'"):
        MemoryIndexer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MemoryIndexer.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs config.json"):
        MemoryIndexer.load(tmp_path / "empty")


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="preset 'Flash' does not exist"):
        MemoryIndexerConfig.preset("Flash")
    with pytest.raises(ValueError, match="head_dim=96 must be a power of two"):
        MemoryIndexerConfig(hidden_size=8, head_dim=96, rope_dim=16)
    with pytest.raises(ValueError, match="rope_dim=15 must be even"):
        MemoryIndexerConfig(hidden_size=8, head_dim=32, rope_dim=15)
    with pytest.raises(ValueError, match="repeats a layer"):
        MemoryIndexerConfig(hidden_size=8, layer_ids=(2, 2))
    with pytest.raises(ValueError, match="no field"):
        MemoryIndexerConfig.from_values(hidden_size=8, heads=4)
    assert MemoryIndexerConfig.preset("flash").head_weight_scale == pytest.approx(
        1 / 128
    )


def _published_state(model: MemoryIndexer) -> dict[str, torch.Tensor]:
    out = {
        k.replace("layers.", "retrievers.", 1): v.clone()
        for k, v in model.state_dict().items()
    }
    for lid in model.config.layer_ids:  # the official trainer stores its RoPE table too
        out[f"retrievers.l{lid}.freqs_cis"] = torch.zeros(4, 8, dtype=torch.complex64)
    return out


def test_published_retriever_loads(tmp_path):
    torch.manual_seed(5)
    cfg = MemoryIndexerConfig(
        hidden_size=48, rank=24, n_heads=4, layer_ids=(10, 12, 20)
    )
    model = MemoryIndexer(cfg)
    torch.save(_published_state(model), tmp_path / "top3_joint.pt")
    back = MemoryIndexer.load(tmp_path / "top3_joint.pt", expected=cfg)
    assert back.config == cfg
    hidden, pos, k = (
        torch.randn(3, 2, 48),
        torch.tensor([100, 70000]),
        torch.randn(3, 6, 128),
    )
    assert torch.equal(back(hidden, pos, k), model(hidden, pos, k))
    # Without `expected`, the published geometry (Flash rope, head_dim 128) is assumed.
    assert MemoryIndexer.load(tmp_path / "top3_joint.pt").config == cfg
    with pytest.raises(
        ValueError, match=r"layer_ids=\(10, 12, 20\) but the model needs"
    ):
        MemoryIndexer.load(
            tmp_path / "top3_joint.pt",
            expected=MemoryIndexerConfig(hidden_size=48, layer_ids=(10,)),
        )
    single = {
        k.split(".", 2)[2]: v
        for k, v in _published_state(model).items()
        if ".l12." in k
    }
    torch.save(single, tmp_path / "l12.pt")
    with pytest.raises(ValueError, match="single-layer retriever without a layer id"):
        MemoryIndexer.load(tmp_path / "l12.pt")
    one = MemoryIndexer.load(
        tmp_path / "l12.pt",
        expected=MemoryIndexerConfig(hidden_size=48, layer_ids=(12,)),
    )
    assert torch.equal(one.layers["l12"].wq_b.weight, model.layers["l12"].wq_b.weight)


def _official_indexer_weights(cfg: MemoryIndexerConfig, csa_layers) -> dict:
    """The four query-path tensors of each CSA layer, official names, bf16."""
    g = torch.Generator().manual_seed(7)
    shapes = {
        "wq_a.weight": (cfg.rank, cfg.hidden_size),
        "q_norm.weight": (cfg.rank,),
        "indexer.wq_b.weight": (cfg.n_heads * cfg.head_dim, cfg.rank),
        "indexer.weights_proj.weight": (cfg.n_heads, cfg.hidden_size),
    }
    return {
        f"layers.{layer}.attn.{name}": torch.randn(shape, generator=g).bfloat16()
        for layer in csa_layers
        for name, shape in shapes.items()
    }


def test_native_indexer_state_maps_official_names():
    csa = (2, 4, 6, 8)  # decoder layers of CSA indices 0..3
    weights = _official_indexer_weights(TINY, csa)
    weights["layers.3.attn.wq_a.weight"] = torch.zeros(1)  # an HCA layer: never read
    state = native_indexer_state(weights, TINY.layer_ids, csa)  # CSA 1, 3 -> L 4, 8
    model = MemoryIndexer(TINY)
    model.load_state_dict(state)  # strict: every parameter, right shapes
    assert set(state) == set(model.state_dict())
    for lid, layer in ((1, 4), (3, 8)):
        for ours, theirs in (
            ("wq_a.weight", "wq_a.weight"),
            ("q_norm_weight", "q_norm.weight"),
            ("wq_b.weight", "indexer.wq_b.weight"),
            ("weights_proj.weight", "indexer.weights_proj.weight"),
        ):
            got = state[f"layers.l{lid}.{ours}"]
            assert got.dtype == torch.float32
            assert torch.equal(got, weights[f"layers.{layer}.attn.{theirs}"].float())

    missing = dict(weights)
    del missing["layers.8.attn.indexer.wq_b.weight"]
    with pytest.raises(
        ValueError, match=r"no 'layers\.8\.attn\.indexer\.wq_b\.weight'.*init='random'"
    ):
        native_indexer_state(missing, TINY.layer_ids, csa)
    with pytest.raises(
        ValueError, match=r"indexer layer 4 is not a CSA index.* 4 CSA layers \(0\.\.3\)"
    ):
        native_indexer_state(weights, (1, 4), csa)
