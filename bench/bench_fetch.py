"""Chunk fetch throughput (gather_chunks, UVA reads of pinned host memory) vs PCIe bulk.

Methods side by side, per number of chunks M fetched in one call (a chunk is one
DeepSeek-V4-Flash CSA chunk, 64 entries x 716 B x 21 layers = 962304 B, random
rows of a pinned host pool into random GPU slots):
  uva_gather   - triton_ops.gather_chunks, one launch;
  memcpy_loop  - one cudaMemcpyAsync (tensor.copy_) per chunk, copy engine;
  bulk_memcpy  - one cudaMemcpy of M x chunk_bytes contiguous bytes (upper bound);
  uva_scatter  - triton_ops.scatter_chunks, GPU -> pinned host (evict/store path).
The PCIe bulk rate is a 256 MiB pinned cudaMemcpy measured in the same run.

    python bench/bench_fetch.py --out runs/bench/fetch.json [--sweep]
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import CHUNK_BYTES, cuda_time_ms, meta, pcie_bulk_gbs, write_json
from vllm_flashmemory.triton_ops import chunk_copy

POOL_CHUNKS = 4096  # 3.9 GB pinned host pool and as many GPU slots
COUNTS = (1, 4, 16, 64, 195, 391, 1024, 4096)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/fetch.json")
    ap.add_argument("--sweep", action="store_true", help="sweep bytes/program x warps")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    bulk = pcie_bulk_gbs()
    print(f"PCIe bulk 256 MiB pinned: H2D {bulk['h2d_gbs']:.1f} GB/s, D2H {bulk['d2h_gbs']:.1f} GB/s")
    host = torch.empty(POOL_CHUNKS, CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
    host.fill_(0x5A)
    slots = torch.empty(POOL_CHUNKS, CHUNK_BYTES, dtype=torch.uint8, device="cuda")
    slots.fill_(0xA5)

    sweep = []
    if args.sweep:
        m = 195
        hi = torch.randperm(POOL_CHUNKS, device="cuda")[:m]
        si = torch.randperm(POOL_CHUNKS, device="cuda")[:m]
        for bpp in (8192, 16384, 32768, 65536, 131072):
            for nw in (4, 8, 16):
                ms = cuda_time_ms(lambda: chunk_copy._launch_copy(
                    host, hi, slots, si, bytes_per_program=bpp, num_warps=nw), reps=10)
                gbs = m * CHUNK_BYTES / ms / 1e6
                sweep.append({"chunks": m, "bytes_per_program": bpp, "num_warps": nw,
                              "gbs": gbs, "fraction_of_bulk": gbs / bulk["h2d_gbs"]})
                print(f"sweep M={m} bpp={bpp:>6} warps={nw:>2}: {gbs:6.1f} GB/s")

    rows = []
    for m in COUNTS:
        hi = torch.randperm(POOL_CHUNKS, device="cuda")[:m]
        si = torch.randperm(POOL_CHUNKS, device="cuda")[:m]
        hi_l, si_l = hi.tolist(), si.tolist()
        nbytes = m * CHUNK_BYTES
        reps = 10 if m <= 1024 else 5

        def loop():
            for h, s in zip(hi_l, si_l):
                slots[s].copy_(host[h], non_blocking=True)

        res = {
            "uva_gather": cuda_time_ms(lambda: chunk_copy.gather_chunks(host, hi, slots, si), reps=reps),
            "memcpy_loop": cuda_time_ms(loop, reps=reps),
            "bulk_memcpy": cuda_time_ms(lambda: slots[:m].copy_(host[:m], non_blocking=True), reps=reps),
            "uva_scatter": cuda_time_ms(lambda: chunk_copy.scatter_chunks(host, hi, slots, si), reps=reps),
        }
        row = {"chunks": m, "bytes": nbytes}
        for k, ms in res.items():
            row[f"{k}_ms"] = ms
            row[f"{k}_gbs"] = nbytes / ms / 1e6
        row["uva_gather_vs_pcie_bulk"] = row["uva_gather_gbs"] / bulk["h2d_gbs"]
        row["uva_scatter_vs_pcie_bulk"] = row["uva_scatter_gbs"] / bulk["d2h_gbs"]
        rows.append(row)
        print(
            f"M={m:>5} ({nbytes/1e6:8.1f} MB): gather {row['uva_gather_gbs']:5.1f} GB/s "
            f"({100*row['uva_gather_vs_pcie_bulk']:5.1f}% of bulk)  memcpy loop "
            f"{row['memcpy_loop_gbs']:5.1f}  bulk {row['bulk_memcpy_gbs']:5.1f}  scatter "
            f"{row['uva_scatter_gbs']:5.1f} ({100*row['uva_scatter_vs_pcie_bulk']:5.1f}%)"
        )
    # Byte-exactness at bench scale: one gather of distinct rows, compared on the host.
    host[:8].copy_(torch.randint(0, 256, (8, CHUNK_BYTES), dtype=torch.uint8))
    chunk_copy.gather_chunks(host, torch.arange(8, device="cuda"), slots,
                             torch.arange(100, 108, device="cuda"))
    exact = bool(torch.equal(slots[100:108].cpu(), host[:8]))
    print(f"byte-exact at bench scale: {exact}")
    write_json(args.out, {
        "meta": meta("python bench/bench_fetch.py " + " ".join(argv or sys.argv[1:])),
        "chunk_bytes": CHUNK_BYTES,
        "pcie_bulk": bulk,
        "sweep": sweep,
        "rows": rows,
        "byte_exact": exact,
        "constants": {"bytes_per_program": chunk_copy._COPY_BYTES_PER_PROGRAM,
                      "num_warps": chunk_copy._COPY_NUM_WARPS},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
