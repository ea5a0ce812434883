"""Gather / scatter of CSA chunk bytes between a pinned host pool and GPU slots.

The kernel reads (gather) or writes (scatter) pinned host memory directly through
its unified virtual address: no staging buffer and no copy engine, one launch for
any number of chunks. Each program moves one contiguous piece of one chunk (32 KB
by default; every piece is >= 4 KB except a chunk's short tail), as wide words, so
the PCIe reads arrive as large coalesced requests.

    gather_chunks:  gpu_slots[slot_idx[i]] = host_pool[host_idx[i]]
    scatter_chunks: host_pool[host_idx[i]] = gpu_slots[slot_idx[i]]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .memory_indexer_score import check_triton_device

# Bytes per program and warps. Swept on H100 80GB HBM3 + PCIe Gen5 at 195 chunks
# (bench/bench_fetch.py --sweep, 2026-11-23; docs/BENCHMARKS.md (ii)): all 15
# settings of 8-128 KB x 4/8/16 warps gave 47.2-49.9 GB/s (95-98% of the 51.0 GB/s
# bulk rate), so the setting barely matters; 32 KB x 8 warps is kept.
_COPY_BYTES_PER_PROGRAM = 32768
_COPY_NUM_WARPS = 8
_MAX_PIECES = 65535  # grid axis 1 limit


def _word_dtype(chunk_bytes: int, *ptrs: int) -> torch.dtype:
    for size, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if chunk_bytes % size == 0 and all(p % size == 0 for p in ptrs):
            return dtype
    return torch.uint8


def _check_copy_args(op, host_pool, host_idx, gpu_slots, slot_idx) -> None:
    for name, t in (("host_pool", host_pool), ("gpu_slots", gpu_slots)):
        if t.dim() != 2 or t.dtype != torch.uint8:
            raise ValueError(
                f"{op}: {name} must be a 2-D uint8 tensor [rows, chunk_bytes]; got "
                f"{t.dtype} of shape {tuple(t.shape)}."
            )
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous.")
    if host_pool.shape[1] != gpu_slots.shape[1]:
        raise ValueError(
            f"{op}: host_pool chunk_bytes={host_pool.shape[1]} differs from "
            f"gpu_slots chunk_bytes={gpu_slots.shape[1]}; both pools must use the "
            "same chunk geometry."
        )
    for name, t in (("host_idx", host_idx), ("slot_idx", slot_idx)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{op}: {name} must be a 1-D int32/int64 tensor; got {t.dtype} of "
                f"shape {tuple(t.shape)}."
            )
    if host_idx.shape[0] != slot_idx.shape[0]:
        raise ValueError(
            f"{op}: host_idx has {host_idx.shape[0]} entries but slot_idx has "
            f"{slot_idx.shape[0]}; pass one host row per GPU slot."
        )
    if host_pool.device.type != "cpu":
        raise ValueError(
            f"{op}: host_pool is on {host_pool.device}; it must be a pinned CPU "
            "tensor (torch.empty(..., pin_memory=True))."
        )
    if gpu_slots.device.type == "cuda" and not host_pool.is_pinned():
        raise ValueError(
            f"{op}: host_pool is not pinned; the kernel reads it through its device "
            "address, which only page-locked memory has. Allocate it with "
            "pin_memory=True."
        )
    for name, t, rows in (
        ("host_idx", host_idx, host_pool.shape[0]),
        ("slot_idx", slot_idx, gpu_slots.shape[0]),
    ):
        out_of_range = t.numel() and (int(t.min()) < 0 or int(t.max()) >= rows)
        if t.device.type == "cpu" and out_of_range:
            raise IndexError(
                f"{op}: {name} holds values in [{int(t.min())}, {int(t.max())}] "
                f"but the pool has {rows} rows."
            )
        if t.device.type not in ("cpu", gpu_slots.device.type):
            raise ValueError(
                f"{op}: {name} is on {t.device}; put it on the CPU or on "
                f"{gpu_slots.device}."
            )


def gather_chunks_ref(
    host_pool: torch.Tensor,
    host_idx: torch.Tensor,
    gpu_slots: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch `gather_chunks`: gpu_slots[slot_idx[i]] = host_pool[host_idx[i]]."""
    _check_copy_args("gather_chunks", host_pool, host_idx, gpu_slots, slot_idx)
    rows = host_pool[host_idx.cpu().long()]
    gpu_slots[slot_idx.to(gpu_slots.device).long()] = rows.to(gpu_slots.device)
    return gpu_slots


def scatter_chunks_ref(
    host_pool: torch.Tensor,
    host_idx: torch.Tensor,
    gpu_slots: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch `scatter_chunks`: host_pool[host_idx[i]] = gpu_slots[slot_idx[i]]."""
    _check_copy_args("scatter_chunks", host_pool, host_idx, gpu_slots, slot_idx)
    rows = gpu_slots[slot_idx.to(gpu_slots.device).long()]
    host_pool[host_idx.cpu().long()] = rows.cpu()
    return host_pool


@triton.jit
def _copy_chunks_kernel(
    src_ptr,
    src_idx_ptr,
    dst_ptr,
    dst_idx_ptr,
    words_per_chunk,
    BLOCK: tl.constexpr,
):
    # Program (i, j) copies piece j of the i-th chunk: BLOCK contiguous words.
    i_c = tl.program_id(0)
    i_j = tl.program_id(1)
    src_row = tl.load(src_idx_ptr + i_c).to(tl.int64)
    dst_row = tl.load(dst_idx_ptr + i_c).to(tl.int64)
    o_w = i_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_w = o_w < words_per_chunk
    b_x = tl.load(src_ptr + src_row * words_per_chunk + o_w, mask=m_w)
    tl.store(dst_ptr + dst_row * words_per_chunk + o_w, b_x, mask=m_w)


def _launch_copy(src, src_idx, dst, dst_idx, *, bytes_per_program, num_warps) -> None:
    n = src_idx.shape[0]
    chunk_bytes = src.shape[1]
    if n == 0 or chunk_bytes == 0:
        return
    word = _word_dtype(chunk_bytes, src.data_ptr(), dst.data_ptr())
    word_bytes = torch.empty((), dtype=word).element_size()
    words = chunk_bytes // word_bytes
    block = triton.next_power_of_2(max(1, min(bytes_per_program // word_bytes, words)))
    pieces = triton.cdiv(words, block)
    while pieces > _MAX_PIECES:
        block *= 2
        pieces = triton.cdiv(words, block)
    _copy_chunks_kernel[(n, pieces)](
        src.view(word),
        src_idx,
        dst.view(word),
        dst_idx,
        words,
        BLOCK=block,
        num_warps=num_warps,
    )


def _prepare_idx(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    return idx.to(device, non_blocking=True).contiguous()


def gather_chunks(
    host_pool: torch.Tensor,
    host_idx: torch.Tensor,
    gpu_slots: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Copy chunks host -> GPU in one launch.

    gpu_slots[slot_idx[i]] = host_pool[host_idx[i]] for every i.

    Args:
        host_pool: [n_host, chunk_bytes] uint8, pinned CPU memory (the cold pool).
        host_idx: [M] int32/int64 host rows to read (CPU or GPU tensor; CPU indices
            are range-checked, GPU ones are not, since that would need a sync).
        gpu_slots: [n_slots, chunk_bytes] uint8 CUDA tensor (the hot pool).
        slot_idx: [M] int32/int64 destination slots; must be unique.

    Returns:
        gpu_slots (written in place, asynchronously on the current stream).

    Examples:
        >>> hi, si = torch.tensor([7, 3]), torch.tensor([0, 1])  # doctest: +SKIP
        >>> gather_chunks(cold, hi, hot, si)  # doctest: +SKIP
    """
    _check_copy_args("gather_chunks", host_pool, host_idx, gpu_slots, slot_idx)
    check_triton_device(gpu_slots.device, "gather_chunks")
    _launch_copy(
        host_pool,
        _prepare_idx(host_idx, gpu_slots.device),
        gpu_slots,
        _prepare_idx(slot_idx, gpu_slots.device),
        bytes_per_program=_COPY_BYTES_PER_PROGRAM,
        num_warps=_COPY_NUM_WARPS,
    )
    return gpu_slots


def scatter_chunks(
    host_pool: torch.Tensor,
    host_idx: torch.Tensor,
    gpu_slots: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Copy chunks GPU -> host in one launch.

    host_pool[host_idx[i]] = gpu_slots[slot_idx[i]] for every i.

    Args and shapes as `gather_chunks`; here host_idx must be unique. The host rows
    are complete only after the current stream is synchronized.

    Returns:
        host_pool (written in place).
    """
    _check_copy_args("scatter_chunks", host_pool, host_idx, gpu_slots, slot_idx)
    check_triton_device(gpu_slots.device, "scatter_chunks")
    _launch_copy(
        gpu_slots,
        _prepare_idx(slot_idx, gpu_slots.device),
        host_pool,
        _prepare_idx(host_idx, gpu_slots.device),
        bytes_per_program=_COPY_BYTES_PER_PROGRAM,
        num_warps=_COPY_NUM_WARPS,
    )
    return host_pool


__all__ = ["gather_chunks", "gather_chunks_ref", "scatter_chunks", "scatter_chunks_ref"]
