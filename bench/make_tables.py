"""Render the markdown tables of docs/BENCHMARKS.md from the bench JSON files.

    python bench/make_tables.py bench/results/2026-11-23 [--plot]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(d: Path, name: str) -> dict | None:
    p = d / name
    return json.loads(p.read_text()) if p.exists() else None


def scoring(s: dict) -> list[str]:
    out = [f"HBM (1 GiB D2D copy, read+write): {s['hbm_gbs']:.0f} GB/s; bf16 matmul 8192^3: "
           f"{s['bf16_matmul_tflops']:.0f} TFLOP/s. Constants: {s['constants']}.", "",
           "| context | entries | setting (rows, warps, per SM, stages) | GPU time (graph) | "
           "eager call | K^IComp read | achieved | % of HBM roofline | TFLOP/s | MMA floor |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["single"]:
        mark = " (constants)" if r.get("is_current_constants") else ""
        out.append(
            f"| {r['context']} | {r['entries']} | {r['block_rows']}, {r['num_warps']}, "
            f"{r['programs_per_sm']}, {r['num_stages']}{mark} | {r['gpu_us']:.1f} us | "
            f"{r['eager_us']:.0f} us | {r['k_icomp_bytes']/1e6:.1f} MB | "
            f"{r['achieved_gbs']:.0f} GB/s | {100*r['fraction_of_roofline']:.1f}% | "
            f"{r['achieved_tflops']:.0f} | {r['mma_floor_us']:.1f} us |")
    out += ["", "| context | batch | GPU time for the batch | % of HBM roofline |", "|---|---|---|---|"]
    for r in s["batch"]:
        out.append(f"| {r['context']} | {r['batch']} | {r['gpu_us']:.1f} us | "
                   f"{100*r['fraction_of_roofline']:.1f}% |")
    return out


def fetch(f: dict) -> list[str]:
    b = f["pcie_bulk"]
    out = [f"PCIe bulk (256 MiB pinned cudaMemcpy, same run): H2D {b['h2d_gbs']:.1f} GB/s, "
           f"D2H {b['d2h_gbs']:.1f} GB/s. Chunk = {f['chunk_bytes']} B. Byte-exact at bench "
           f"scale: {f['byte_exact']}.", "",
           "| chunks | MB | UVA gather GB/s | % of bulk H2D | cudaMemcpy per chunk GB/s | "
           "bulk memcpy same bytes GB/s | UVA scatter GB/s | % of bulk D2H |",
           "|---|---|---|---|---|---|---|---|"]
    for r in f["rows"]:
        out.append(
            f"| {r['chunks']} | {r['bytes']/1e6:.1f} | {r['uva_gather_gbs']:.1f} | "
            f"{100*r['uva_gather_vs_pcie_bulk']:.1f}% | {r['memcpy_loop_gbs']:.1f} | "
            f"{r['bulk_memcpy_gbs']:.1f} | {r['uva_scatter_gbs']:.1f} | "
            f"{100*r['uva_scatter_vs_pcie_bulk']:.1f}% |")
    if f["sweep"]:
        best = max(f["sweep"], key=lambda r: r["gbs"])
        worst = min(f["sweep"], key=lambda r: r["gbs"])
        out += ["", f"Sweep at 195 chunks ({len(f['sweep'])} settings, 8-128 KB per program x "
                f"4/8/16 warps): {worst['gbs']:.1f} to {best['gbs']:.1f} GB/s."]
    return out


def refresh(r: dict) -> list[str]:
    tw = r["weight_read_floor_ms"]
    out = [f"HBM {r['hbm_gbs']:.0f} GB/s; weight-read floor per decode step "
           f"{r['active_weight_bytes']/1e9:.1f} GB / HBM = {tw:.2f} ms; PCIe bulk H2D "
           f"{r['pcie_bulk']['h2d_gbs']:.1f} GB/s; tau = {r['tau']}; selection "
           f"{100*r['selected_fraction']:.0f}% of historical chunks; incremental = drift "
           f"{r['drift']} of the selection.", "",
           "| context | batch | score (3 layers) | fetch incr. | fetch full | native step, all entries: logits / logits+top-k | native step, resident only (logits+top-k) | refresh incr. / 64 native steps (logits) | refresh full / 64 native steps (logits) | refresh incr. / 64 weight-floor steps | refresh full / 64 weight-floor steps |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        b = x["batch"]
        inc = x["refresh_incremental_ms"]
        full = x["refresh_full_ms"]
        nlog = x["native_full_step_logits_only_ms"]
        out.append(
            f"| {x['context']} | {b} | {x['score_ms']:.3f} ms | {x['fetch_incremental_ms']:.2f} ms "
            f"({b*x['incremental_chunks']} ch) | {x['fetch_full_ms']:.2f} ms ({b*x['selected_chunks']} ch) | "
            f"{nlog:.3f} / {x['native_full_step_ms']:.3f} ms | {x['native_lsa_step_ms']:.3f} ms | "
            f"{100*inc/(64*nlog):.1f}% | {100*full/(64*nlog):.1f}% | "
            f"{100*inc/(64*tw):.2f}% | {100*full/(64*tw):.2f}% |")
    return out


def refresh_bytes(r: dict) -> list[str]:
    out = ["| context | drift | mean Jaccard | incremental MB/refresh | full re-fetch MB/refresh | incremental / full |",
           "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        out.append(f"| {x['context']} | {x['drift']} | {x['mean_jaccard']:.3f} | "
                   f"{x['incremental_bytes_per_refresh']/1e6:.1f} | "
                   f"{x['full_refetch_bytes_per_refresh']/1e6:.1f} | {x['incremental_over_full']:.3f} |")
    return out


def footprint(r: dict) -> list[str]:
    out = ["| context | selected | resident chunks | resident_chunk_ratio | kv_bytes_gpu (LSA) | of which Memory-Indexer keys | HCA+SWA | full KV | kv_bytes ratio | fit in 60 GB: full | fit: LSA | gain | host cold pool at LSA fit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        out.append(
            f"| {x['context']} | {100*x['selected_fraction']:.0f}% | {x['resident_chunks']}/{x['total_chunks']} | "
            f"{100*x['resident_chunk_ratio']:.2f}% | {x['kv_bytes_gpu_lsa']/1e6:.0f} MB | "
            f"{x['memory_indexer_key_bytes']/1e6:.0f} MB | {x['fixed_hca_swa_bytes']/1e6:.0f} MB | "
            f"{x['kv_bytes_full']/1e6:.0f} MB | {100*x['kv_bytes_ratio']:.2f}% | "
            f"{x['concurrency_full']} | {x['concurrency_lsa']} | x{x['concurrency_gain']:.1f} | "
            f"{x['cold_pool_bytes_at_lsa_concurrency']/1e9:.0f} GB |")
    return out


def plot(d: Path, f: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = f["rows"]
    m = [r["chunks"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("uva_gather_gbs", "UVA gather (triton_ops)"),
                       ("memcpy_loop_gbs", "cudaMemcpyAsync per chunk"),
                       ("bulk_memcpy_gbs", "one contiguous cudaMemcpy"),
                       ("uva_scatter_gbs", "UVA scatter (D2H)")):
        ax.plot(m, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(f["pcie_bulk"]["h2d_gbs"], color="k", ls="--", lw=0.8, label="256 MiB bulk H2D")
    ax.set_xscale("log")
    ax.set_xlabel("chunks per call (962304 B each)")
    ax.set_ylabel("GB/s")
    ax.set_title(f"{f['meta']['device']}, {f['meta']['date']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "fetch_throughput.png", dpi=110)
    print(f"wrote {d / 'fetch_throughput.png'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    for name, fn in (("scoring.json", scoring), ("fetch.json", fetch), ("refresh.json", refresh),
                     ("refresh_bytes.json", refresh_bytes), ("footprint.json", footprint)):
        data = load(d, name)
        if data is None:
            continue
        print(f"### {name} ({data['meta']['device']}, {data['meta']['date']}, "
              f"`{data['meta']['command']}`)\n")
        print("\n".join(fn(data)) + "\n")
    if args.plot and load(d, "fetch.json"):
        plot(d, load(d, "fetch.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
