"""Bytes moved per refresh: incremental fetch vs full re-fetch, under a drift model.

Drift model. After the first refresh, each refresh replaces a fraction `d` of the
previous selection with chunks drawn uniformly from the unselected historical
chunks; the selection size stays at 10% of the historical chunks. d = 0 is a frozen
selection, d = 1 a disjoint one (the worst case, equal to a full re-fetch). Why
this model: the Memory Indexer picks what the next tau = 64 tokens need, and
consecutive windows of one answer share most of their context; the native top-k of
adjacent steps overlaps >= 95% (IndexCache / vllm-ascend, notes/anchors.md), but no
measurement of our indexer's overlap across 64-step windows exists yet, so d is
swept and d = 0.25 (Jaccard ~0.6) is the stated assumption. The ResidencyPlanner
reports the real mean Jaccard (`PlannerStats.mean_jaccard`) to replace it.

The fetch sets come from the real ResidencyPlanner (core/residency_planner.py): its
incremental plan fetches target - resident; "full re-fetch" moves the whole
selection every refresh. Evictions free slots and move no bytes (every chunk is
already in the cold pool); decode writes one new chunk per 256 tokens, stored
device -> host once (counted separately). Pure arithmetic: runs on CPU.

    python bench/bench_refresh_bytes.py --out runs/bench/refresh_bytes.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import CHUNK_BYTES, CONFIG, CONTEXTS, GEOMETRY, meta, write_json
from vllm_flashmemory.core.residency_planner import ResidencyPlanner

SELECTED_FRACTION = 0.10
DRIFTS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
REFRESHES = 16  # 1024 decode tokens


def simulate(tokens: int, drift: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    planner = ResidencyPlanner(CONFIG, GEOMETRY)
    planner.add_request("r", tokens)
    local_first = max(0, tokens - CONFIG.local_window_tokens) // CONFIG.chunk_tokens
    historical = list(range(CONFIG.sink_chunks, local_first))
    k = round(SELECTED_FRACTION * len(historical))
    perm = torch.randperm(len(historical), generator=g).tolist()
    selected = [historical[i] for i in perm[:k]]
    fetched, full, jaccards = [], [], []
    stored_chunks = 0
    for r in range(REFRESHES + 1):
        if r > 0:
            n_new = round(drift * k)
            keep_idx = torch.randperm(k, generator=g)[: k - n_new].tolist()
            sel_set = set(selected)
            pool = [c for c in historical if c not in sel_set]
            new = [pool[i] for i in torch.randperm(len(pool), generator=g)[:n_new].tolist()]
            selected = [selected[i] for i in keep_idx] + new
        scores = torch.zeros(planner.total_chunks("r"))
        scores[torch.tensor(selected, dtype=torch.long)] = 1.0
        plan = planner.refresh("r", chunk_scores=scores)
        planner.complete_fetch("r", plan.fetch_chunks, ok=True)
        planner.complete_evict("r", plan.evict_chunks)
        if r > 0:  # refresh 0 follows prefill, where every chunk is still resident
            fetched.append(len(plan.fetch_chunks))
            full.append(len(plan.selected_chunks))
            if plan.jaccard is not None:
                jaccards.append(plan.jaccard)
        before = planner.total_chunks("r")
        planner.append_tokens("r", CONFIG.tau)
        stored_chunks += planner.total_chunks("r") - before
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    inc_bytes = mean(fetched) * CHUNK_BYTES
    full_bytes = mean(full) * CHUNK_BYTES
    return {
        "drift": drift,
        "selected_chunks": k,
        "historical_chunks": len(historical),
        "mean_fetched_chunks": mean(fetched),
        "incremental_bytes_per_refresh": inc_bytes,
        "full_refetch_bytes_per_refresh": full_bytes,
        "incremental_over_full": inc_bytes / full_bytes,
        "mean_jaccard": mean(jaccards),
        "decode_store_bytes_per_refresh": stored_chunks * CHUNK_BYTES / (REFRESHES + 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/refresh_bytes.json")
    args = ap.parse_args(argv)
    rows = []
    print(f"chunk = {CONFIG.chunk_tokens} tokens = {CHUNK_BYTES} B; tau = {CONFIG.tau}; "
          f"local window {CONFIG.local_window_tokens} tokens; sink {CONFIG.sink_chunks} chunk")
    for name, tokens in CONTEXTS.items():
        for d in DRIFTS:
            row = {"context": name, "tokens": tokens, **simulate(tokens, d)}
            rows.append(row)
            print(
                f"{name:>4} drift {d:4.2f}: Jaccard {row['mean_jaccard']:.3f}  incremental "
                f"{row['incremental_bytes_per_refresh']/1e6:8.1f} MB  full re-fetch "
                f"{row['full_refetch_bytes_per_refresh']/1e6:8.1f} MB  ratio "
                f"{row['incremental_over_full']:.3f}  (+ decode store "
                f"{row['decode_store_bytes_per_refresh']/1e6:.2f} MB/refresh)"
            )
    write_json(args.out, {
        "meta": meta("python bench/bench_refresh_bytes.py " + " ".join(argv or sys.argv[1:])),
        "selected_fraction": SELECTED_FRACTION, "refreshes": REFRESHES,
        "chunk_bytes": CHUNK_BYTES, "tau": CONFIG.tau, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
