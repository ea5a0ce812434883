"""Native-indexer scoring and top-k restricted to resident chunks, Eq. 6.

Score_native(s) = sum_h w_h ReLU(q_h . K^IComp_s) over the entries of the resident
CSA chunks only (the chunks the Memory Indexer selected plus the always-resident
ones), then the top-k among them. Order: higher logit first; equal logits go to the
lower entry index first, in the kernel and in the reference alike.

The kernel writes one int64 sort key per candidate entry,
key = orderable(logit) * 2^32 + (2^31 - 1 - entry), so a single `torch.topk` over
the keys yields the top-k with that tie order; the keys decode back to the exact
fp32 logit and entry index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import check_qwk_dtypes
from .memory_indexer_score import (
    _MAX_HEAD_DIM,
    _MAX_HEADS,
    _next_pow2,
    check_triton_device,
    dequantize_k_icomp,
    dot_in_fp32,
    indexer_logits_rows,
    load_queries,
    persistent_programs,
)

# Rows per tile, warps, persistent programs per SM, pipelining depth: the Memory
# Indexer kernel's settings (bench/bench_scoring.py --sweep, H100, 2026-11-23),
# taken unchanged; not swept separately for 64 heads.
_TOPK_ROWS_PER_PROGRAM = 64
_TOPK_NUM_WARPS = 4
_TOPK_PROGRAMS_PER_SM = 3
_TOPK_NUM_STAGES = 3
_INT64_MIN = -(2**63)


class NativeTopK(NamedTuple):
    """What `native_indexer_topk` returns; every tensor stays on the input's device.

    indices: [top_k] int32 entry indices, best first. When fewer than top_k entries
        are resident, positions from `num_valid` on hold N (one past the last entry)
        and their logits are -inf; `num_valid` says where that padding starts.
    logits: [top_k] float32 native logits of those entries.
    num_valid: [] int32, min(top_k, resident entries).
    """

    indices: torch.Tensor
    logits: torch.Tensor
    num_valid: torch.Tensor


def _check_topk_args(
    q, w, k, resident_chunks, k_scale, top_k, entries_per_chunk
) -> None:
    op = "native_indexer_topk"
    if q.dim() != 2:
        raise ValueError(f"{op}: q must be [H, D]; got shape {tuple(q.shape)}.")
    H, D = q.shape
    if H < 1 or D < 1:
        raise ValueError(f"{op}: q shape {tuple(q.shape)} has an empty dimension.")
    if tuple(w.shape) != (H,):
        raise ValueError(f"{op}: w must be [H] = [{H}]; got {tuple(w.shape)}.")
    if k.dim() != 2 or k.shape[1] != D:
        raise ValueError(f"{op}: k must be [N, D] = [N, {D}]; got {tuple(k.shape)}.")
    if k_scale is not None and tuple(k_scale.shape) != (k.shape[0],):
        raise ValueError(
            f"{op}: k_scale must be [N] = [{k.shape[0]}]; got {tuple(k_scale.shape)}."
        )
    check_qwk_dtypes(op, q, w, k, k_scale)
    if (
        isinstance(entries_per_chunk, bool)
        or not isinstance(entries_per_chunk, int)
        or entries_per_chunk < 1
    ):
        raise ValueError(
            f"{op}: entries_per_chunk={entries_per_chunk!r} must be a positive "
            "integer; use 64 (256 tokens at CSA ratio 4)."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(
            f"{op}: top_k={top_k!r} must be a positive integer; DeepSeek-V4-Flash "
            "uses 512."
        )
    n_chunks = -(-k.shape[0] // entries_per_chunk)
    if resident_chunks.dim() != 1:
        raise ValueError(
            f"{op}: resident_chunks must be 1-D (chunk ids [R] or a bool mask "
            f"[n_chunks]); got shape {tuple(resident_chunks.shape)}."
        )
    if resident_chunks.dtype == torch.bool:
        if resident_chunks.shape[0] != n_chunks:
            raise ValueError(
                f"{op}: a bool resident_chunks mask must have n_chunks = "
                f"ceil(N / entries_per_chunk) = {n_chunks} entries; got "
                f"{resident_chunks.shape[0]}."
            )
    elif resident_chunks.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"{op}: resident_chunks has dtype {resident_chunks.dtype}; pass int32/"
            "int64 chunk ids or a bool mask."
        )
    tensors = [q, w, k, resident_chunks] + ([k_scale] if k_scale is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"{op}: q, w, k, resident_chunks, k_scale must share one device; got "
            f"{devices}."
        )


def native_indexer_topk_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    resident_chunks: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    top_k: int = 512,
    entries_per_chunk: int = 64,
) -> NativeTopK:
    """Plain-torch `native_indexer_topk` (same arguments, shapes and result), Eq. 6."""
    _check_topk_args(q, w, k, resident_chunks, k_scale, top_k, entries_per_chunk)
    N = k.shape[0]
    dev = k.device
    n_chunks = -(-N // entries_per_chunk)
    kf = dequantize_k_icomp(k, k_scale)  # [N, D]
    logits = (kf @ q.float().T).relu_() @ w.float()  # [N]
    if resident_chunks.dtype == torch.bool:
        chunk_mask = resident_chunks
    else:
        chunk_mask = torch.zeros(n_chunks, dtype=torch.bool, device=dev)
        chunk_mask[resident_chunks.long()] = True
    entry_mask = chunk_mask.repeat_interleave(entries_per_chunk)[:N]  # [N]
    cand = entry_mask.nonzero()[:, 0]  # ascending entry index
    cand_logits = logits[cand]
    # Stable sort on the negated logits: ties keep ascending entry order.
    order = torch.sort(-cand_logits, stable=True).indices[:top_k]
    n_valid = order.shape[0]
    indices = torch.full((top_k,), N, dtype=torch.int32, device=dev)
    out_logits = torch.full((top_k,), float("-inf"), dtype=torch.float32, device=dev)
    indices[:n_valid] = cand[order].to(torch.int32)
    out_logits[:n_valid] = cand_logits[order]
    num_valid = torch.tensor(n_valid, dtype=torch.int32, device=dev)
    return NativeTopK(indices, out_logits, num_valid)


@triton.jit
def _native_indexer_keys_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    ks_ptr,
    res_ptr,
    key_ptr,
    N,
    n_slots,
    n_tiles,
    stride_qh,
    stride_kn,
    EPC,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNKS_PER_PROG: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IS_MASK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent over tiles of CHUNKS_PER_PROG slots. Slot j is the j-th resident
    # chunk id (or chunk j when a mask is given); its entries land at keys[j*EPC + e].
    i_p = tl.program_id(0)
    n_p = tl.num_programs(0)
    b_q, b_w = load_queries(
        q_ptr, w_ptr, stride_qh, H=H, D=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        DOT_FP32=DOT_FP32,
    )
    o_r = tl.arange(0, BLOCK_E * CHUNKS_PER_PROG)
    o_e = o_r % BLOCK_E
    for t in tl.range(i_p, n_tiles, n_p, num_stages=NUM_STAGES):
        o_slot = t * CHUNKS_PER_PROG + o_r // BLOCK_E
        m_slot = o_slot < n_slots
        if IS_MASK:
            resident = tl.load(res_ptr + o_slot, mask=m_slot, other=0) != 0
            chunk = o_slot.to(tl.int64)
        else:
            resident = m_slot
            chunk = tl.load(res_ptr + o_slot, mask=m_slot, other=0).to(tl.int64)
        rows = chunk * EPC + o_e
        m_out = m_slot & (o_e < EPC)
        m_r = m_out & resident & (rows < N)
        logit = indexer_logits_rows(
            b_q, b_w, k_ptr, ks_ptr, rows, m_r, stride_kn, D=D, BLOCK_D=BLOCK_D,
            HAS_SCALE=HAS_SCALE, DOT_FP32=DOT_FP32,
        )
        logit = tl.where(logit == 0.0, 0.0, logit)  # -0.0 -> +0.0: one key per value
        bits = logit.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order == float order
        key = (ordered.to(tl.int64) << 32) + (2147483647 - rows)
        key = tl.where(m_r, key, tl.full(key.shape, -9223372036854775807 - 1, tl.int64))
        o_out = o_slot.to(tl.int64) * EPC + o_e
        tl.store(key_ptr + o_out, key, mask=m_out)


def _decode_keys(keys: torch.Tensor, N: int, top_k: int) -> NativeTopK:
    valid = keys != _INT64_MIN  # [top_k]
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    logits = bits.view(torch.float32)
    entry = (2147483647 - (keys & 0xFFFFFFFF)).to(torch.int32)
    indices = torch.where(valid, entry, torch.full_like(entry, N))
    logits = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    return NativeTopK(indices, logits, valid.sum().to(torch.int32))


def _launch_native_indexer_topk(
    q, w, k, resident_chunks, k_scale, top_k, entries_per_chunk, *, rows_per_program,
    num_warps, programs_per_sm=2, num_stages=3, with_topk=True,
):
    H, D = q.shape
    N = k.shape[0]
    dev = k.device
    is_mask = resident_chunks.dtype == torch.bool
    n_slots = resident_chunks.shape[0]
    n_keys = n_slots * entries_per_chunk
    keys = torch.empty(max(n_keys, top_k), dtype=torch.int64, device=dev)
    if n_keys < top_k:
        keys[n_keys:] = _INT64_MIN
    if n_slots > 0 and N > 0:
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        w = w.contiguous()
        if is_mask:
            res = resident_chunks.to(torch.int8)
        else:
            res = resident_chunks.contiguous()
        block_e = _next_pow2(entries_per_chunk, minimum=1)
        chunks_per_prog = max(1, rows_per_program // block_e)
        if block_e * chunks_per_prog < 16:  # tl.dot needs at least 16 rows
            chunks_per_prog = 16 // block_e
        dot_fp32 = dot_in_fp32(q.dtype, k.dtype)
        ks = k_scale if k_scale is not None else keys  # dummy pointer, never read
        n_tiles = triton.cdiv(n_slots, chunks_per_prog)
        n_prog = persistent_programs(dev, n_tiles, 1, programs_per_sm)
        _native_indexer_keys_kernel[(n_prog,)](
            q,
            w,
            k,
            ks,
            res,
            keys,
            N,
            n_slots,
            n_tiles,
            q.stride(0),
            k.stride(0),
            entries_per_chunk,
            H=H,
            D=D,
            BLOCK_E=block_e,
            CHUNKS_PER_PROG=chunks_per_prog,
            BLOCK_H=_next_pow2(H),
            BLOCK_D=_next_pow2(D),
            HAS_SCALE=k_scale is not None,
            DOT_FP32=dot_fp32,
            IS_MASK=is_mask,
            NUM_STAGES=num_stages,
            num_warps=num_warps,
        )
    elif n_keys > 0:
        keys[:n_keys] = _INT64_MIN
    if not with_topk:
        return keys
    top = torch.topk(keys, top_k, sorted=True).values  # [top_k]
    return _decode_keys(top, N, top_k)


def native_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    resident_chunks: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    top_k: int = 512,
    entries_per_chunk: int = 64,
) -> NativeTopK:
    """Native indexer logits over resident chunks only, then top-k (Eq. 6).

    Score_native(s) = sum_h w[h] * ReLU(q[h] . K^IComp[s]) for every entry s of a
    resident chunk; the top_k best, higher logit first, equal logits lower index
    first. Logits come from a Triton kernel that writes sortable int64 keys; the
    selection is one `torch.topk` over those keys. No host sync.

    Args:
        q: [H, D] native indexer queries of one CSA layer (bf16/fp16/fp32).
        w: [H] native indexer head weights.
        k: [N, D] the layer's K^IComp (float8_e4m3fn with k_scale, or bf16/fp16/
            fp32); last dim contiguous, D <= 256.
        resident_chunks: [R] int32/int64 resident chunk ids (unique; not range-
            checked on the device), or a bool mask [ceil(N / entries_per_chunk)].
            Ids are the fast path: only R chunks are read. A mask reads the mask
            of every chunk and top-k runs over all n_chunks x entries_per_chunk keys.
        k_scale: [N] float32 per-entry scale, or None.
        top_k: entries returned (512 for DeepSeek-V4-Flash).
        entries_per_chunk: entries per chunk (64).

    Returns:
        NativeTopK(indices [top_k] int32, logits [top_k] float32, num_valid [] int32).

    Examples:
        >>> out = native_indexer_topk(q, w, k_fp8, chunk_ids, k_scale)  # doctest: +SKIP
    """
    _check_topk_args(q, w, k, resident_chunks, k_scale, top_k, entries_per_chunk)
    check_triton_device(k.device, "native_indexer_topk")
    if q.shape[1] > _MAX_HEAD_DIM or q.shape[0] > _MAX_HEADS:
        raise ValueError(
            f"native_indexer_topk: H={q.shape[0]} heads x D={q.shape[1]} exceeds the "
            f"kernel's register tile ({_MAX_HEADS} x {_MAX_HEAD_DIM}); use "
            "native_indexer_topk_ref."
        )
    return _launch_native_indexer_topk(
        q,
        w,
        k,
        resident_chunks,
        k_scale,
        top_k,
        entries_per_chunk,
        rows_per_program=_TOPK_ROWS_PER_PROGRAM,
        num_warps=_TOPK_NUM_WARPS,
        programs_per_sm=_TOPK_PROGRAMS_PER_SM,
        num_stages=_TOPK_NUM_STAGES,
    )


__all__ = ["NativeTopK", "native_indexer_topk", "native_indexer_topk_ref"]
