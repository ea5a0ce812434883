"""One LLM(...) run of the tiny DeepSeek-V4 for the engine tests; prints JSON.

usage: lsa_llm_script.py OUT.json [--lsa EXTRA_JSON] --prompt-tokens N --max-tokens M
"""

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--lsa", default=None, help="kv_connector_extra_config JSON")
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=8192)
    args = p.parse_args()

    from lsa_helpers import ensure_tiny_model, prompt_token_ids
    from vllm import LLM, SamplingParams

    kv = None
    if args.lsa is not None:
        kv = {
            "kv_connector": "LSAConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": json.loads(args.lsa),
        }
    t0 = time.perf_counter()
    llm = LLM(
        model=str(ensure_tiny_model()),
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        dtype="bfloat16",
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=kv,
    )
    t1 = time.perf_counter()
    prompt = {"prompt_token_ids": prompt_token_ids(args.prompt_tokens)}
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )
    out = llm.generate([prompt], params)
    t2 = time.perf_counter()
    result = {
        "tokens": list(out[0].outputs[0].token_ids),
        "startup_s": t1 - t0,
        "generate_s": t2 - t1,
    }
    # In-process engine: the worker-side connector and model are reachable.
    from vllm.distributed.kv_transfer import (
        get_kv_transfer_group,
        has_kv_transfer_group,
    )

    if has_kv_transfer_group():
        conn = get_kv_transfer_group()
        w = conn.connector_worker
        result["blocked_blocks"] = int(w.residency.non_resident_blocks.sum())
    print("RESULT", json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
