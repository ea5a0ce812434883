"""Official-layout checkpoint: save and read back into transformers.

Scenarios:
- build -> save -> load gives identical logits (bf16-representable weights)
- the file uses official DeepSeek-V4 names (kv_norm kept, experts split, no `model.`)
- hf_to_official and official_to_hf are inverses
- the byte tokenizer loads with AutoTokenizer offline and round-trips text with BOS
- a folder without config/weights is refused with the fix
"""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from vllm_flashmemory.dsv4.checkpoint import (
    hf_to_official,
    load_hf_model,
    official_to_hf,
    save_checkpoint,
)
from vllm_flashmemory.dsv4.tiny import TINY, build_model
from vllm_flashmemory.dsv4.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = build_model(TINY, seed=0)
    save_checkpoint(model, TINY.official_config(), folder)
    save_tokenizer(folder)
    return model, folder


def test_round_trip_logits(saved):
    model, folder = saved
    loaded = load_hf_model(folder)
    ids = torch.randint(3, 259, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    assert torch.equal(a, b)


def test_official_names(saved):
    _, folder = saved
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    for name in (
        "embed.weight", "head.weight", "norm.weight", "hc_head_fn",
        "layers.0.attn.kv_norm.weight", "layers.0.attn.attn_sink",
        "layers.2.attn.compressor.ape", "layers.2.attn.compressor.norm.weight",
        "layers.2.attn.indexer.compressor.wkv.weight", "layers.2.attn.indexer.wq_b.weight",
        "layers.2.attn.indexer.weights_proj.weight", "layers.0.ffn.gate.tid2eid",
        "layers.3.ffn.gate.bias", "layers.3.ffn.experts.127.w3.weight",
        "layers.3.ffn.shared_experts.w2.weight", "layers.3.hc_ffn_base",
    ):
        assert name in names, name
    assert not any(n.startswith("model.") for n in names)


def test_mapping_inverse(saved):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if "inv_freq" not in k}
    back = official_to_hf(hf_to_official(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_tokenizer(saved):
    _, folder = saved
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("naïve text").input_ids
    assert ids[0] == 0 and max(ids) < TINY.vocab_size
    assert len(ids) == 1 + len("naïve text".encode())
    assert tok.decode(ids, skip_special_tokens=True) == "naïve text"


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="make-tiny"):
        load_hf_model(tmp_path / "nope")
