"""Fused Memory-Indexer scoring (memory_indexer_select) against its HBM roofline.

Roofline: the kernel must read each indexer layer's K^IComp once, 132 B per entry
per layer (128 fp8 + a 4 B scale), 3 layers; the floor is those bytes over the HBM
bandwidth measured in the same run (a 1 GiB device-to-device copy, read + write
counted). Times are CUDA-graph replays (GPU time, no Python launch cost) and,
separately, eager calls (what a Python caller pays). Input sets rotate so that
L2 (50 MB) cannot serve repeated reads. Sweeps rows-per-program x warps.

    python bench/bench_scoring.py --out runs/bench/scoring.json [--sweep]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from _common import (
    CONTEXTS,
    ENTRIES_PER_CHUNK,
    INDEXER_HEAD_DIM,
    MEMORY_INDEXER_HEADS,
    MEMORY_INDEXER_LAYERS,
    CHUNK_BYTES,
    cuda_time_ms,
    hbm_bandwidth_gbs,
    meta,
    random_fp8,
    write_json,
)
from vllm_flashmemory.triton_ops import memory_indexer_score as mis

L, H, D = MEMORY_INDEXER_LAYERS, MEMORY_INDEXER_HEADS, INDEXER_HEAD_DIM
BYTES_PER_ENTRY_LAYER = D + 4


def make_sets(n_entries: int, n_sets: int, device="cuda"):
    sets = []
    for _ in range(n_sets):
        k = random_fp8((L, n_entries, D), device)
        ks = torch.rand(L, n_entries, device=device) * 0.01 + 0.001
        sets.append((k, ks))
    q = (torch.randn(L, H, D, device=device) / D**0.5).to(torch.bfloat16)
    w = torch.randn(L, H, device=device) / H**0.5
    return q, w, sets


def bf16_matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, reps=10)
    return 2 * n**3 / ms / 1e9


def graph_time_ms(calls, reps=10) -> float:
    """GPU time of running `calls` (list of thunks) once, via a captured CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return cuda_time_ms(g.replay, reps=reps, warmup=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/scoring.json")
    ap.add_argument("--sweep", action="store_true",
                    help="sweep rows x warps x programs/SM x stages (24 settings)")
    ap.add_argument("--extra", action="store_true",
                    help="the current setting next to 5 settings outside the sweep")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    hbm = hbm_bandwidth_gbs()
    print(f"HBM (D2D 1 GiB, read+write) {hbm:.0f} GB/s")
    mma = bf16_matmul_tflops()
    print(f"bf16 matmul 8192^3: {mma:.0f} TFLOP/s")
    current = (mis._SELECT_BLOCK_ROWS, mis._SELECT_NUM_WARPS, mis._SELECT_PROGRAMS_PER_SM,
               mis._SELECT_NUM_STAGES)
    configs = [current]
    if args.sweep:
        configs = [(r, nw, ps, st) for r in (64, 128) for nw in (4, 8) for ps in (1, 2, 4)
                   for st in (2, 3)]
    if args.extra:
        configs = [current, (64, 4, 2, 3), (64, 4, 3, 2), (64, 4, 3, 4), (64, 8, 3, 3),
                   (128, 4, 3, 3), (32, 4, 4, 3)]
    rows = []
    for name, tokens in CONTEXTS.items():
        n = tokens // 4
        set_bytes = L * n * BYTES_PER_ENTRY_LAYER
        n_sets = max(2, math.ceil(4 * 50e6 / set_bytes))
        q, w, sets = make_sets(n, n_sets)
        for cfg in configs:
            rpp, nw, ps, st = cfg

            def call(i, cfg=cfg):
                k, ks = sets[i % n_sets]
                return lambda: mis._launch_memory_indexer_select(
                    q, w, k, ks, 0.5, ENTRIES_PER_CHUNK, "or",
                    block_rows=cfg[0], num_warps=cfg[1], programs_per_sm=cfg[2],
                    num_stages=cfg[3],
                )
            calls = [call(i) for i in range(n_sets * 4)]
            ms = graph_time_ms(calls) / len(calls)
            eager = cuda_time_ms(calls[0], reps=20)
            floor_ms = set_bytes / (hbm * 1e9) * 1e3
            flops = 2 * L * n * H * D
            row = {
                "context": name,
                "tokens": tokens,
                "entries": n,
                "chunks": -(-n // ENTRIES_PER_CHUNK),
                "block_rows": rpp,
                "num_warps": nw,
                "programs_per_sm": ps,
                "num_stages": st,
                "is_current_constants": cfg == current,
                "mma_floor_us": flops / (mma * 1e12) * 1e6,
                "achieved_tflops": flops / ms / 1e9,
                "k_icomp_bytes": set_bytes,
                "gpu_us": ms * 1e3,
                "eager_us": eager * 1e3,
                "achieved_gbs": set_bytes / ms / 1e6,
                "roofline_us": floor_ms * 1e3,
                "fraction_of_roofline": floor_ms / ms,
            }
            rows.append(row)
            print(
                f"{name:>5} N={n:>7} rows={rpp:>3} warps={nw} per_sm={ps} stages={st} gpu {ms*1e3:8.1f} us "
                f"eager {eager*1e3:8.1f} us  {row['achieved_gbs']:7.0f} GB/s  "
                f"{100*row['fraction_of_roofline']:5.1f}% of roofline  "
                f"{row['achieved_tflops']:5.0f} TFLOP/s (MMA floor {row['mma_floor_us']:.1f} us)"
            )
        del sets
        torch.cuda.empty_cache()
    # Batch: B requests scored back to back (one refresh each), at the chosen config.
    batch = []
    for name, tokens in CONTEXTS.items():
        n = tokens // 4
        set_bytes = L * n * BYTES_PER_ENTRY_LAYER
        n_sets = max(2, math.ceil(4 * 50e6 / set_bytes))
        q, w, sets = make_sets(n, n_sets)
        for b in (1, 8, 64):
            calls = [
                (lambda k=sets[i % n_sets][0], ks=sets[i % n_sets][1]: mis.memory_indexer_select(q, w, k, ks))
                for i in range(b)
            ]
            ms = graph_time_ms(calls, reps=10)
            batch.append({"context": name, "batch": b, "gpu_us": ms * 1e3,
                          "fraction_of_roofline": b * set_bytes / (hbm * 1e9) * 1e3 / ms})
            print(f"{name:>5} batch {b:>2}: {ms*1e3:9.1f} us  {100*batch[-1]['fraction_of_roofline']:5.1f}% of roofline")
        del sets
        torch.cuda.empty_cache()
    write_json(args.out, {
        "meta": meta("python bench/bench_scoring.py " + " ".join(argv or sys.argv[1:])),
        "hbm_gbs": hbm,
        "bf16_matmul_tflops": mma,
        "constants": dict(zip(("block_rows", "num_warps", "programs_per_sm", "num_stages"), current)),
        "shape": {"layers": L, "heads": H, "head_dim": D, "entries_per_chunk": ENTRIES_PER_CHUNK,
                  "chunk_bytes": CHUNK_BYTES},
        "single": rows,
        "batch": batch,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
