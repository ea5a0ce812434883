"""Shared pieces of the bench scripts: shapes, timing, JSON output.

DeepSeek-V4-Flash shapes come from `KVGeometry` (core/footprint.py) and `LSAConfig`
(core/config.py): 21 CSA layers, 584 B main KV + 132 B indexer key per compressed
entry per layer, 64 entries per chunk, Memory Indexer on 3 layers with 128 heads x
128 dims; the native indexer has 64 heads x 128 dims and keeps the top 512 entries.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import KVGeometry

GEOMETRY = KVGeometry()
CONFIG = LSAConfig()
ENTRIES_PER_CHUNK = CONFIG.entries_per_chunk  # 64
CHUNK_BYTES = GEOMETRY.chunk_bytes(ENTRIES_PER_CHUNK)  # 962304 B
CONTEXTS = {"128K": 131072, "500K": 500000, "1M": 1048576}
MEMORY_INDEXER_LAYERS = len(CONFIG.indexer_layers)  # 3
MEMORY_INDEXER_HEADS = 128
NATIVE_INDEXER_HEADS = 64
INDEXER_HEAD_DIM = 128
NATIVE_TOPK = 512
# DeepSeek-V4-Flash activates ~13.3B parameters per token (notes/deepseek_v4.md,
# counted on the meta-device model); at 1 B each (fp8) a decode step reads at least
# this many weight bytes from HBM, whatever the batch.
ACTIVE_WEIGHT_BYTES = 13.3e9


def meta(command: str) -> dict:
    dev = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "python": sys.version.split()[0],
    }


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False))
    print(f"wrote {path}")


def cuda_time_ms(fn, *, reps: int = 20, warmup: int = 3) -> float:
    """Median of `reps` CUDA-event timings of fn() after `warmup` calls, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def random_fp8(shape, device) -> torch.Tensor:
    """Random fp8 e4m3 bytes without NaN codes (0x7f, 0xff), made on the device."""
    mag = torch.randint(0, 0x7E, shape, dtype=torch.uint8, device=device)
    sign = torch.randint(0, 2, shape, dtype=torch.uint8, device=device) << 7
    return (mag | sign).view(torch.float8_e4m3fn)


def hbm_bandwidth_gbs(device="cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of `nbytes`, counting bytes read + written, GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / ms / 1e6


def pcie_bulk_gbs(nbytes: int = 256 << 20) -> dict:
    """cudaMemcpy of one large pinned buffer, each direction, GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = cuda_time_ms(lambda: dev.copy_(host, non_blocking=True), reps=10)
    d2h = cuda_time_ms(lambda: host.copy_(dev, non_blocking=True), reps=10)
    return {"bytes": nbytes, "h2d_gbs": nbytes / h2d / 1e6, "d2h_gbs": nbytes / d2h / 1e6}
