"""GPU-resident KV bytes vs full KV (iv) and concurrency in a fixed KV budget (v).

Every figure goes through core/footprint.py (`request_footprint`, the one footprint
definition) with DeepSeek-V4-Flash geometry (`KVGeometry()` defaults). The LSA
resident set is the ResidencyPlanner's target after one refresh (sink chunk + the
chunks of the last 8K prompt tokens + the selected historical chunks), with the
selection a given fraction of the historical chunks. kv_bytes_gpu counts resident
CSA main KV + resident CSA indexer keys + the Memory Indexer's keys for every chunk
(3 layers x 132 B per entry) + HCA + SWA; full KV keeps everything and no Memory
Indexer keys. Concurrency = floor(budget / kv_bytes_gpu per request), KV only
(weights, activations and decode growth are outside the budget). LSA also needs the
cold pool in pinned host memory: every CSA chunk of every request. Pure arithmetic:
runs on CPU.

    python bench/bench_footprint.py --out runs/bench/footprint.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import CONFIG, CONTEXTS, ENTRIES_PER_CHUNK, GEOMETRY, meta, write_json
from vllm_flashmemory.core.footprint import request_footprint
from vllm_flashmemory.core.residency_planner import ResidencyPlanner

BUDGET_BYTES = 60e9  # 60 GB (decimal) of GPU memory for KV
FRACTIONS = (0.05, 0.10, 0.20)


def lsa_resident(tokens: int, fraction: float) -> tuple[int, int]:
    """(resident entries, resident chunks) of the planner's target set."""
    planner = ResidencyPlanner(CONFIG, GEOMETRY)
    planner.add_request("r", tokens)
    n = planner.total_chunks("r")
    local_first = max(0, tokens - CONFIG.local_window_tokens) // CONFIG.chunk_tokens
    historical = list(range(CONFIG.sink_chunks, local_first))
    k = round(fraction * len(historical))
    g = torch.Generator().manual_seed(0)
    pick = [historical[i] for i in torch.randperm(len(historical), generator=g)[:k].tolist()]
    scores = torch.zeros(n)
    scores[torch.tensor(pick, dtype=torch.long)] = 1.0
    target = planner.refresh("r", chunk_scores=scores).target_chunks
    entries = GEOMETRY.csa_entries(tokens)
    resident_entries = sum(
        min(ENTRIES_PER_CHUNK, entries - c * ENTRIES_PER_CHUNK) for c in target
    )
    return resident_entries, len(target)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/footprint.json")
    args = ap.parse_args(argv)
    rows = []
    print(f"chunk {CONFIG.chunk_tokens} tokens, local window {CONFIG.local_window_tokens} "
          f"tokens, sink {CONFIG.sink_chunks} chunk; budget {BUDGET_BYTES/1e9:.0f} GB")
    for name, tokens in CONTEXTS.items():
        entries = GEOMETRY.csa_entries(tokens)
        n_chunks = -(-tokens // CONFIG.chunk_tokens)
        full = request_footprint(GEOMETRY, tokens, CONFIG.chunk_tokens, entries, n_chunks,
                                 memory_indexer_keys_resident=False)
        cold_pool_bytes = entries * GEOMETRY.csa_bytes_per_entry
        for frac in FRACTIONS:
            res_entries, res_chunks = lsa_resident(tokens, frac)
            lsa = request_footprint(GEOMETRY, tokens, CONFIG.chunk_tokens, res_entries,
                                    res_chunks)
            row = {
                "context": name, "tokens": tokens, "selected_fraction": frac,
                "total_chunks": lsa.total_chunks, "resident_chunks": lsa.resident_chunks,
                "resident_chunk_ratio": lsa.resident_chunk_ratio,
                "kv_bytes_full": full.kv_bytes_gpu, "kv_bytes_gpu_lsa": lsa.kv_bytes_gpu,
                "kv_bytes_ratio": lsa.kv_bytes_ratio,
                "memory_indexer_key_bytes": (entries - res_entries)
                * GEOMETRY.n_memory_indexer_layers * GEOMETRY.csa_indexer_bytes_per_entry,
                "fixed_hca_swa_bytes": GEOMETRY.fixed_bytes(tokens),
                "concurrency_full": int(BUDGET_BYTES // full.kv_bytes_gpu),
                "concurrency_lsa": int(BUDGET_BYTES // lsa.kv_bytes_gpu),
                "cold_pool_bytes_per_request": cold_pool_bytes,
            }
            row["concurrency_gain"] = row["concurrency_lsa"] / max(1, row["concurrency_full"])
            row["cold_pool_bytes_at_lsa_concurrency"] = row["concurrency_lsa"] * cold_pool_bytes
            rows.append(row)
            print(
                f"{name:>4} sel {frac:4.0%}: resident chunks {res_chunks:>5}/{lsa.total_chunks:<5}"
                f" ({lsa.resident_chunk_ratio:6.2%})  kv_bytes_gpu {lsa.kv_bytes_gpu/1e9:6.3f} GB"
                f" / full {full.kv_bytes_gpu/1e9:6.3f} GB = {lsa.kv_bytes_ratio:6.2%}  |  "
                f"60 GB fits {row['concurrency_full']:>4} full vs {row['concurrency_lsa']:>4} LSA"
                f" (x{row['concurrency_gain']:.1f}; host cold pool "
                f"{row['cold_pool_bytes_at_lsa_concurrency']/1e9:.0f} GB)"
            )
    write_json(args.out, {
        "meta": meta("python bench/bench_footprint.py " + " ".join(argv or sys.argv[1:])),
        "budget_bytes": BUDGET_BYTES, "geometry": GEOMETRY.__dict__,
        "chunk_tokens": CONFIG.chunk_tokens, "local_window_tokens": CONFIG.local_window_tokens,
        "sink_chunks": CONFIG.sink_chunks, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
