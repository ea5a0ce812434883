"""One LSA refresh (score + select + incremental fetch) vs 64 decode steps of native indexing.

Per context (128K / 500K / 1M tokens) and batch B (requests refreshed back to back):
  refresh       = memory_indexer_select on the 3 Memory-Indexer layers (fused Eq. 4,
                  5, 13 + compaction) for each of B requests, then one gather_chunks
                  of the chunks to fetch, from a pinned host pool into GPU slots.
                  "incremental": the chunks new since the last refresh under the drift
                  model of bench_refresh_bytes.py (DRIFT of the selected set replaced);
                  "full": the whole selected set re-fetched.
  native_full   = one decode step of the full-KV model's native indexer: 21 CSA layers
                  x native_indexer_topk over every chunk (64 heads x 128, top-512), B
                  requests. The per-step work LSA removes is native_full - native_lsa.
  native_lsa    = the same over the resident chunks only (Eq. 6).
Selection: 10% of the historical chunks, chosen at random, fed to the ResidencyPlanner
(core/residency_planner.py), whose target set (selection + sink + 8K local window) is
the resident set. Times are CUDA-graph replays (GPU time), fetches are eager calls.
Decode-step lower bound: ACTIVE_WEIGHT_BYTES / measured HBM bandwidth + native_lsa.

    python bench/bench_refresh.py --out runs/bench/refresh.json
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from _common import (
    ACTIVE_WEIGHT_BYTES,
    CHUNK_BYTES,
    CONFIG,
    CONTEXTS,
    ENTRIES_PER_CHUNK,
    GEOMETRY,
    INDEXER_HEAD_DIM,
    NATIVE_INDEXER_HEADS,
    NATIVE_TOPK,
    cuda_time_ms,
    hbm_bandwidth_gbs,
    meta,
    pcie_bulk_gbs,
    random_fp8,
    write_json,
)
from bench_scoring import graph_time_ms, make_sets
from vllm_flashmemory.core.residency_planner import ResidencyPlanner
from vllm_flashmemory.triton_ops import chunk_copy
from vllm_flashmemory.triton_ops import memory_indexer_score as mis
from vllm_flashmemory.triton_ops import native_indexer_topk as nit

SELECTED_FRACTION = 0.10
DRIFT = 0.25  # fraction of the selected set replaced per refresh (bench_refresh_bytes.py)
BATCHES = (1, 8, 64)
POOL_CHUNKS = 2048  # pinned host rows and GPU slots (1.97 GB each)
TAU = CONFIG.tau


def planned_sets(tokens: int, seed: int = 0):
    """(selected chunk ids, resident chunk ids) through the ResidencyPlanner."""
    planner = ResidencyPlanner(CONFIG, GEOMETRY)
    planner.add_request("r", tokens)
    n = planner.total_chunks("r")
    closed = tokens // CONFIG.chunk_tokens
    local_first = max(0, tokens - CONFIG.local_window_tokens) // CONFIG.chunk_tokens
    historical = [c for c in range(CONFIG.sink_chunks, local_first)]
    g = torch.Generator().manual_seed(seed)
    k = round(SELECTED_FRACTION * len(historical))
    pick = torch.tensor(historical)[torch.randperm(len(historical), generator=g)[:k]]
    scores = torch.zeros(n)
    scores[pick] = 1.0
    plan = planner.refresh("r", chunk_scores=scores)
    assert closed <= n
    return list(plan.selected_chunks), list(plan.target_chunks), n


def timed_gather(host, slots, n_chunks: int, reps: int) -> float:
    """ms to gather n_chunks random host rows into slots, <= POOL_CHUNKS per launch."""
    if n_chunks == 0:
        return 0.0
    pieces = []
    left = n_chunks
    while left > 0:
        m = min(left, POOL_CHUNKS)
        pieces.append((torch.randperm(POOL_CHUNKS, device="cuda")[:m],
                       torch.randperm(POOL_CHUNKS, device="cuda")[:m]))
        left -= m

    def run():
        for hi, si in pieces:
            chunk_copy.gather_chunks(host, hi, slots, si)

    return cuda_time_ms(run, reps=reps, warmup=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/refresh.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    hbm = hbm_bandwidth_gbs()
    bulk = pcie_bulk_gbs()
    t_weights_ms = ACTIVE_WEIGHT_BYTES / (hbm * 1e9) * 1e3
    print(f"HBM {hbm:.0f} GB/s -> weight-read floor per decode step {t_weights_ms:.2f} ms; "
          f"PCIe bulk H2D {bulk['h2d_gbs']:.1f} GB/s")
    host = torch.empty(POOL_CHUNKS, CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
    host.fill_(0x5A)
    slots = torch.empty(POOL_CHUNKS, CHUNK_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    for name, tokens in CONTEXTS.items():
        n_entries = tokens // 4
        selected, resident, n_chunks = planned_sets(tokens)
        c_full = len(selected)
        c_inc = math.ceil(DRIFT * c_full)
        # Memory Indexer inputs, rotated so L2 cannot serve repeats.
        set_bytes = 3 * n_entries * (INDEXER_HEAD_DIM + 4)
        n_sets = max(2, math.ceil(4 * 50e6 / set_bytes))
        q, w, sets = make_sets(n_entries, n_sets)
        # Native indexer: one K^IComp buffer per CSA layer, shared by the batch (21
        # layers x 4-35 MB cycle through L2 between two uses of one buffer).
        layers = [(random_fp8((n_entries, INDEXER_HEAD_DIM), "cuda"),
                   torch.rand(n_entries, device="cuda") * 0.01 + 1e-3)
                  for _ in range(GEOMETRY.n_csa_layers)]
        nq = (torch.randn(NATIVE_INDEXER_HEADS, INDEXER_HEAD_DIM, device="cuda") / 11.3).to(torch.bfloat16)
        nw = torch.randn(NATIVE_INDEXER_HEADS, device="cuda") / 8.0
        all_ids = torch.arange(n_chunks, dtype=torch.int32, device="cuda")
        res_ids = torch.tensor(resident, dtype=torch.int32, device="cuda")

        def native_calls(b, ids, with_topk):
            return [
                (lambda k=k, ks=ks: nit._launch_native_indexer_topk(
                    nq, nw, k, ids, ks, NATIVE_TOPK, ENTRIES_PER_CHUNK,
                    rows_per_program=nit._TOPK_ROWS_PER_PROGRAM,
                    num_warps=nit._TOPK_NUM_WARPS, programs_per_sm=nit._TOPK_PROGRAMS_PER_SM,
                    num_stages=nit._TOPK_NUM_STAGES, with_topk=with_topk))
                for _ in range(b) for (k, ks) in layers
            ]

        for b in BATCHES:
            reps = 10 if b * n_entries < 4e6 else 5
            score = graph_time_ms(
                [(lambda k=sets[i % n_sets][0], ks=sets[i % n_sets][1]:
                  mis.memory_indexer_select(q, w, k, ks)) for i in range(b)], reps=reps)
            fetch_inc = timed_gather(host, slots, b * c_inc, reps)
            fetch_full = timed_gather(host, slots, b * c_full, reps)
            nf = graph_time_ms(native_calls(b, all_ids, True), reps=reps)
            nf_logits = graph_time_ms(native_calls(b, all_ids, False), reps=reps)
            nl = graph_time_ms(native_calls(b, res_ids, True), reps=reps)
            step_lsa = t_weights_ms + nl
            row = {
                "context": name, "tokens": tokens, "batch": b, "chunks": n_chunks,
                "selected_chunks": c_full, "resident_chunks": len(resident),
                "incremental_chunks": c_inc, "drift": DRIFT,
                "score_ms": score, "fetch_incremental_ms": fetch_inc, "fetch_full_ms": fetch_full,
                "refresh_incremental_ms": score + fetch_inc, "refresh_full_ms": score + fetch_full,
                "native_full_step_ms": nf, "native_full_step_logits_only_ms": nf_logits,
                "native_lsa_step_ms": nl,
                "native_removed_per_step_ms": nf - nl,
                "refresh_incremental_vs_64_native_full": (score + fetch_inc) / (TAU * nf),
                "refresh_full_vs_64_native_full": (score + fetch_full) / (TAU * nf),
                "refresh_incremental_vs_64_native_logits_only": (score + fetch_inc) / (TAU * nf_logits),
                "step_lower_bound_ms": step_lsa,
                "refresh_incremental_pct_of_64_steps": 100 * (score + fetch_inc) / (TAU * step_lsa),
                "refresh_full_pct_of_64_steps": 100 * (score + fetch_full) / (TAU * step_lsa),
            }
            rows.append(row)
            print(
                f"{name:>4} B={b:>2}: score {score:7.3f} ms  fetch inc {fetch_inc:8.2f} "
                f"full {fetch_full:8.2f} ms | native step full {nf:7.3f} (logits {nf_logits:7.3f}) "
                f"lsa {nl:6.3f} ms | refresh/64 native: inc {row['refresh_incremental_vs_64_native_full']:.4f} "
                f"full {row['refresh_full_vs_64_native_full']:.4f} | % of 64 steps: inc "
                f"{row['refresh_incremental_pct_of_64_steps']:.2f}% full {row['refresh_full_pct_of_64_steps']:.2f}%"
            )
        del sets, layers
        torch.cuda.empty_cache()
        # Written after every context, so a run cut short still leaves its rows.
        write_json(args.out, {
            "meta": meta("python bench/bench_refresh.py " + " ".join(argv or sys.argv[1:])),
            "hbm_gbs": hbm, "pcie_bulk": bulk, "tau": TAU,
            "selected_fraction": SELECTED_FRACTION, "drift": DRIFT,
            "active_weight_bytes": ACTIVE_WEIGHT_BYTES, "weight_read_floor_ms": t_weights_ms,
            "chunk_bytes": CHUNK_BYTES, "native_topk": NATIVE_TOPK,
            "native_heads": NATIVE_INDEXER_HEADS, "rows": rows,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
