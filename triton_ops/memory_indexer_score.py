"""Memory Indexer scoring: Eq. 4 (sigmoid score), Eq. 5 (threshold), Eq. 13 (OR).

`memory_indexer_scores_ref` is the one definition of the score in this repository:
`vllm_flashmemory.core.memory_indexer` calls it on CPU, and the fused Triton kernel
in this file is tested against it.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import check_qwk_dtypes


def dequantize_k_icomp(k: torch.Tensor, k_scale: torch.Tensor | None) -> torch.Tensor:
    """K^IComp as DeepSeek-V4 caches it (fp8 e4m3 + one fp32 scale per entry) -> fp32.

    k: [..., N, D] fp8/bf16/fp32; k_scale: [..., N] fp32, or None when k is already
    real-valued.
    """
    kf = k.float()
    if k_scale is not None:
        kf = kf * k_scale.float().unsqueeze(-1)
    return kf


def memory_indexer_scores_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    relu_slope: float = 0.0,
) -> torch.Tensor:
    """I_{t,s} = sigmoid(sum_h w_{t,h} * ReLU(q_{t,h} . K^IComp_s)), Eq. 4.

    relu_slope > 0 replaces ReLU by a leaky ReLU: training only (Eq. 4 is 0).

    q: [L, T, H, D] indexer queries (L indexer layers, T query positions, H heads)
    w: [L, T, H] head weights (already scaled)
    k: [L, N, D] the layer's compressed indexer keys; k_scale: [L, N] or None
    returns: [L, T, N] float32 scores in (0, 1)
    """
    kf = dequantize_k_icomp(k, k_scale)  # [L, N, D]
    logits = torch.einsum("lthd,lnd->lthn", q.float(), kf)  # [L, T, H, N]
    if relu_slope > 0:
        logits = torch.nn.functional.leaky_relu(logits, relu_slope)
    else:
        logits = logits.relu_()
    fused = torch.einsum("lthn,lth->ltn", logits, w.float())  # [L, T, N]
    return torch.sigmoid(fused)


def combine_layers_ref(scores: torch.Tensor, routing: str = "or") -> torch.Tensor:
    """Cross-layer ensemble of [L, T, N] scores -> [T, N].

    "or" takes the max over layers, so thresholding it equals the union of the
    per-layer selections of Eq. 13; "mean" averages the layers.
    """
    if routing == "or":
        return scores.amax(dim=0)
    if routing == "mean":
        return scores.mean(dim=0)
    raise ValueError(f"routing={routing!r} is not a routing mode; use 'or' or 'mean'.")


# ---- fused kernel: Eq. 4 + Eq. 5 + Eq. 13 + chunk compaction, one request ----------

# Scoring kernel: rows per tile, warps, persistent programs per SM (per layer
# column), software-pipelining depth. Swept on H100 80GB HBM3 at 128K-1M tokens
# (bench/bench_scoring.py --sweep, 2026-11-23; docs/BENCHMARKS.md "Memory Indexer
# scoring"): among 24 settings of rows {64, 128} x warps {4, 8} x programs per SM
# {1, 2, 4} x stages {2, 3}, 64 x 4 x 2 x 3 was fastest at 128K and 500K; a later
# run found 3 programs per SM faster still at all three contexts (--extra).
_SELECT_BLOCK_ROWS = 64
_SELECT_NUM_WARPS = 4
_SELECT_PROGRAMS_PER_SM = 3
_SELECT_NUM_STAGES = 3
# Rows (chunk-padded entries) per program of the combine/threshold kernel.
_COMBINE_ROWS_PER_PROGRAM = 256
# Chunks compacted per step by the single-program compaction kernel.
_COMPACT_BLOCK_CHUNKS = 1024
# q [D, heads] is held in registers for a program's lifetime, next to the [rows,
# heads] accumulator; beyond these the tiles would spill.
_MAX_HEAD_DIM = 256
_MAX_HEADS = 256


class ChunkSelection(NamedTuple):
    """What `memory_indexer_select` returns; every tensor stays on the input's device.

    chunk_ids: [n_chunks] int32, a stable partition of 0..n_chunks-1: the selected
        chunks in ascending order first, then the unselected ones in ascending order.
        `chunk_ids[:counts[0]]` is the selection (the unselected tail is the set a
        planner may evict), so no sentinel value exists.
    counts: [2] int32 = [selected chunks, selected entries].
    entry_scores: [N] float32 ensemble score per compressed entry (max or mean of
        the per-layer sigmoid scores), the value the threshold was applied to.
    """

    chunk_ids: torch.Tensor
    counts: torch.Tensor
    entry_scores: torch.Tensor


def _next_pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(int(x), 1)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(device: torch.device, op: str) -> None:
    """Triton kernels need a CUDA device, or the interpreter for CPU tensors."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    raise ValueError(
        f"{op}: tensors are on {device}, but the Triton kernel needs CUDA tensors; "
        "move them to a GPU, call the `_ref` function, or set TRITON_INTERPRET=1 "
        "before triton_ops is imported to run the kernel on CPU."
    )


def dot_in_fp32(q_dtype: torch.dtype, k_dtype: torch.dtype) -> bool:
    """Whether q . k runs as an fp32 dot instead of a bf16 MMA.

    Only bf16 and fp8 e4m3 values are exact in bf16, so only they take the MMA; fp16
    and fp32 inputs keep an fp32 dot. The interpreter always takes the fp32 dot:
    Triton 3.9's interpreter computes bf16 dots wrongly (seen 2026-11-23), and the
    values are exact in fp32, so the result is the same math.
    """
    exact_in_bf16 = (torch.bfloat16, torch.float8_e4m3fn)
    return (
        _interpreting() or q_dtype not in exact_in_bf16 or k_dtype not in exact_in_bf16
    )


def _check_select_args(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    threshold: float,
    entries_per_chunk: int,
    routing: str,
) -> None:
    op = "memory_indexer_select"
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [L, H, D]; got shape {tuple(q.shape)}.")
    L, H, D = q.shape
    if L < 1 or H < 1 or D < 1:
        raise ValueError(f"{op}: q shape {tuple(q.shape)} has an empty dimension.")
    if tuple(w.shape) != (L, H):
        raise ValueError(
            f"{op}: w must be [L, H] = [{L}, {H}] to match q; got {tuple(w.shape)}."
        )
    if k.dim() != 3 or k.shape[0] != L or k.shape[2] != D:
        raise ValueError(
            f"{op}: k must be [L, N, D] = [{L}, N, {D}] to match q; got "
            f"{tuple(k.shape)}."
        )
    if k_scale is not None and tuple(k_scale.shape) != tuple(k.shape[:2]):
        raise ValueError(
            f"{op}: k_scale must be [L, N] = {list(k.shape[:2])}; got "
            f"{tuple(k_scale.shape)}."
        )
    check_qwk_dtypes(op, q, w, k, k_scale)
    tensors = [q, w, k] + ([k_scale] if k_scale is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"{op}: q, w, k, k_scale must share one device; got {devices}."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{op}: threshold={threshold!r} must be a number in [0, 1].")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(
            f"{op}: threshold={threshold!r} must lie in [0, 1] (it thresholds a "
            "sigmoid score); use 0.5, the paper's value."
        )
    if (
        isinstance(entries_per_chunk, bool)
        or not isinstance(entries_per_chunk, int)
        or entries_per_chunk < 1
    ):
        raise ValueError(
            f"{op}: entries_per_chunk={entries_per_chunk!r} must be a positive "
            "integer; use 64 (256 tokens at CSA ratio 4)."
        )
    if routing not in ("or", "mean"):
        raise ValueError(
            f"{op}: routing={routing!r} is not a routing mode; use 'or' or 'mean'."
        )


def memory_indexer_select_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    threshold: float = 0.5,
    entries_per_chunk: int = 64,
    routing: str = "or",
) -> ChunkSelection:
    """Plain-torch `memory_indexer_select`: Eq. 4 per layer, Eq. 13 ensemble, Eq. 5.

    Same arguments, shapes and result as `memory_indexer_select`.
    """
    _check_select_args(q, w, k, k_scale, threshold, entries_per_chunk, routing)
    N = k.shape[1]
    scores = memory_indexer_scores_ref(q[:, None], w[:, None], k, k_scale)  # [L, 1, N]
    comb = combine_layers_ref(scores, routing)[0]  # [N]
    selected = comb >= threshold  # Eq. 5: I >= threshold
    n_chunks = -(-N // entries_per_chunk)
    padded = torch.zeros(
        n_chunks * entries_per_chunk, dtype=torch.int32, device=k.device
    )
    padded[:N] = selected.to(torch.int32)
    per_chunk = padded.view(n_chunks, entries_per_chunk).sum(dim=1)  # [n_chunks]
    flags = per_chunk > 0
    ids = torch.cat([flags.nonzero()[:, 0], (~flags).nonzero()[:, 0]]).to(torch.int32)
    counts = torch.stack([flags.sum(), selected.sum()]).to(torch.int32)
    return ChunkSelection(ids, counts, comb.float())


@triton.jit
def indexer_logits_rows(
    b_q,
    b_w,
    k_ptr,
    ks_ptr,
    rows,
    row_valid,
    stride_kn,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """sum_h w_h ReLU(q_h . k_row) for a tile of entry rows -> [BLOCK_R] fp32.

    b_q: [BLOCK_D, BLOCK_H] queries, already in the dot dtype (padded heads and dims
    are zero); b_w: [BLOCK_H] fp32 head weights (padded heads zero); rows: [BLOCK_R]
    int64 entry indices into k (row stride stride_kn, last dim contiguous); ks: [N]
    per-entry scale.
    """
    o_d = tl.arange(0, BLOCK_D)
    p_k = k_ptr + rows[:, None] * stride_kn + o_d[None, :]
    b_k = tl.load(p_k, mask=row_valid[:, None] & (o_d[None, :] < D), other=0.0)
    if DOT_FP32:
        b_dot = tl.dot(b_k.to(tl.float32), b_q, input_precision="ieee")
    else:
        # fp8 e4m3 and bf16 values are exact in bf16, so the MMA sees the cache's
        # own values; the per-entry scale is applied to the fp32 accumulator.
        b_dot = tl.dot(b_k.to(tl.bfloat16), b_q)  # [R, BH] fp32
    if HAS_SCALE:
        b_s = tl.load(ks_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
        b_dot = b_dot * b_s[:, None]
    return tl.sum(tl.maximum(b_dot, 0.0) * b_w[None, :], axis=1)


@triton.jit
def load_queries(
    q_ptr,
    w_ptr,
    stride_qh,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """q [H, D] -> [BLOCK_D, BLOCK_H] in the dot dtype, w [H] -> [BLOCK_H] fp32."""
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    p_q = q_ptr + o_h[None, :] * stride_qh + o_d[:, None]
    b_q = tl.load(p_q, mask=(o_h[None, :] < H) & (o_d[:, None] < D), other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
    else:
        b_q = b_q.to(tl.bfloat16)
    b_w = tl.load(w_ptr + o_h, mask=o_h < H, other=0.0).to(tl.float32)
    return b_q, b_w


@triton.jit
def _memory_indexer_layer_scores_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    ks_ptr,
    out_ptr,
    N,
    n_tiles,
    stride_ql,
    stride_qh,
    stride_wl,
    stride_kl,
    stride_kn,
    stride_sl,
    stride_ol,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent over row tiles, one layer per grid column: q and w of the layer are
    # loaded once, and the loop lets the compiler prefetch the next K^IComp tiles
    # while the current one is in the MMA.
    i_p = tl.program_id(0)
    i_l = tl.program_id(1)
    n_p = tl.num_programs(0)
    b_q, b_w = load_queries(
        q_ptr + i_l * stride_ql,
        w_ptr + i_l * stride_wl,
        stride_qh,
        H=H,
        D=D,
        BLOCK_H=BLOCK_H,
        BLOCK_D=BLOCK_D,
        DOT_FP32=DOT_FP32,
    )
    k_l = k_ptr + i_l * stride_kl
    ks_l = ks_ptr + i_l * stride_sl
    for t in tl.range(i_p, n_tiles, n_p, num_stages=NUM_STAGES):
        rows = tl.arange(0, BLOCK_R).to(tl.int64) + t * BLOCK_R
        m_r = rows < N
        logit = indexer_logits_rows(
            b_q,
            b_w,
            k_l,
            ks_l,
            rows,
            m_r,
            stride_kn,
            D=D,
            BLOCK_D=BLOCK_D,
            HAS_SCALE=HAS_SCALE,
            DOT_FP32=DOT_FP32,
        )
        tl.store(out_ptr + i_l * stride_ol + rows, tl.sigmoid(logit), mask=m_r)  # Eq. 4


@triton.jit
def _combine_select_kernel(
    layer_score_ptr,
    score_ptr,
    chunk_count_ptr,
    N,
    n_chunks,
    threshold,
    stride_ol,
    EPC,
    L: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNKS_PER_PROG: tl.constexpr,
    MEAN: tl.constexpr,
):
    # Rows are (chunk, entry) pairs; each chunk is padded to BLOCK_E rows so that the
    # per-chunk OR below is a reshape + reduction.
    i_p = tl.program_id(0)
    o_r = tl.arange(0, BLOCK_E * CHUNKS_PER_PROG)
    o_c = i_p * CHUNKS_PER_PROG + o_r // BLOCK_E
    o_e = o_r % BLOCK_E
    rows = o_c.to(tl.int64) * EPC + o_e
    m_r = (o_e < EPC) & (rows < N)
    comb = tl.zeros([BLOCK_E * CHUNKS_PER_PROG], dtype=tl.float32)
    for l in tl.static_range(L):
        s = tl.load(layer_score_ptr + l * stride_ol + rows, mask=m_r, other=0.0)
        if MEAN:
            comb += s
        else:
            comb = tl.maximum(comb, s)  # Eq. 13: OR of thresholds == max of scores
    if MEAN:
        comb = comb / L
    tl.store(score_ptr + rows, comb, mask=m_r)
    sel = ((comb >= threshold) & m_r).to(tl.int32)  # Eq. 5
    per_chunk = tl.sum(tl.reshape(sel, [CHUNKS_PER_PROG, BLOCK_E]), axis=1)
    o_cc = i_p * CHUNKS_PER_PROG + tl.arange(0, CHUNKS_PER_PROG)
    tl.store(chunk_count_ptr + o_cc, per_chunk, mask=o_cc < n_chunks)


@triton.jit
def _compact_chunks_kernel(
    chunk_count_ptr,
    ids_ptr,
    counts_ptr,
    n_chunks,
    BLOCK_C: tl.constexpr,
):
    # One program: n_chunks is a few thousand (1M tokens = 3907 chunks), so two
    # sequential passes of cumsum cost a few microseconds and keep the order stable.
    zero = tl.sum(tl.zeros([BLOCK_C], dtype=tl.int32), axis=0)
    n_sel = zero
    n_ent = zero
    for c0 in range(0, n_chunks, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        b_n = tl.load(chunk_count_ptr + o_c, mask=o_c < n_chunks, other=0)
        n_sel += tl.sum((b_n > 0).to(tl.int32), axis=0)
        n_ent += tl.sum(b_n, axis=0)
    done_sel = zero
    done_uns = zero
    for c0 in range(0, n_chunks, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < n_chunks
        b_n = tl.load(chunk_count_ptr + o_c, mask=m_c, other=0)
        f_sel = (b_n > 0).to(tl.int32)
        f_uns = ((b_n == 0) & m_c).to(tl.int32)
        pos_sel = done_sel + tl.cumsum(f_sel, axis=0) - 1
        pos_uns = n_sel + done_uns + tl.cumsum(f_uns, axis=0) - 1
        pos = tl.where(f_sel > 0, pos_sel, pos_uns)
        tl.store(ids_ptr + pos, o_c, mask=m_c)
        done_sel += tl.sum(f_sel, axis=0)
        done_uns += tl.sum(f_uns, axis=0)
    tl.store(counts_ptr, n_sel)
    tl.store(counts_ptr + 1, n_ent)


def persistent_programs(
    device: torch.device, n_tiles: int, columns: int, per_sm: int
) -> int:
    """Programs along the tile axis of a persistent grid with `columns` columns."""
    if device.type != "cuda":
        # Interpreter: a few programs, so each one loops over several tiles.
        return max(1, min(n_tiles, 3))
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _sm_count(index)
    return max(1, min(n_tiles, (sms * per_sm) // columns))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_memory_indexer_select(
    q, w, k, k_scale, threshold, entries_per_chunk, routing, *, block_rows, num_warps,
    programs_per_sm, num_stages,
) -> ChunkSelection:
    L, H, D = q.shape
    N = k.shape[1]
    dev = k.device
    n_chunks = -(-N // entries_per_chunk)
    ids = torch.empty(n_chunks, dtype=torch.int32, device=dev)
    counts = torch.zeros(2, dtype=torch.int32, device=dev)
    scores = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return ChunkSelection(ids, counts, scores)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    w = w.contiguous()
    dot_fp32 = dot_in_fp32(q.dtype, k.dtype)
    # Per-layer sigmoid scores [L, N]: 4 B per entry per layer next to the 132 B read.
    layer_scores = torch.empty(L, N, dtype=torch.float32, device=dev)
    ks = k_scale if k_scale is not None else scores  # dummy pointer, never read
    n_tiles = triton.cdiv(N, block_rows)
    n_prog = persistent_programs(dev, n_tiles, L, programs_per_sm)
    _memory_indexer_layer_scores_kernel[(n_prog, L)](
        q,
        w,
        k,
        ks,
        layer_scores,
        N,
        n_tiles,
        q.stride(0),
        q.stride(1),
        w.stride(0),
        k.stride(0),
        k.stride(1),
        ks.stride(0) if k_scale is not None else 0,
        layer_scores.stride(0),
        H=H,
        D=D,
        BLOCK_R=block_rows,
        BLOCK_H=_next_pow2(H),
        BLOCK_D=_next_pow2(D),
        HAS_SCALE=k_scale is not None,
        DOT_FP32=dot_fp32,
        NUM_STAGES=num_stages,
        num_warps=num_warps,
    )
    block_e = _next_pow2(entries_per_chunk, minimum=1)
    chunks_per_prog = max(1, _COMBINE_ROWS_PER_PROGRAM // block_e)
    chunk_count = torch.empty(n_chunks, dtype=torch.int32, device=dev)
    _combine_select_kernel[(triton.cdiv(n_chunks, chunks_per_prog),)](
        layer_scores,
        scores,
        chunk_count,
        N,
        n_chunks,
        float(threshold),
        layer_scores.stride(0),
        entries_per_chunk,
        L=L,
        BLOCK_E=block_e,
        CHUNKS_PER_PROG=chunks_per_prog,
        MEAN=routing == "mean",
        num_warps=4,
    )
    _compact_chunks_kernel[(1,)](
        chunk_count, ids, counts, n_chunks, BLOCK_C=_COMPACT_BLOCK_CHUNKS, num_warps=4
    )
    return ChunkSelection(ids, counts, scores)


def memory_indexer_select(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    threshold: float = 0.5,
    entries_per_chunk: int = 64,
    routing: str = "or",
) -> ChunkSelection:
    """Fused Memory-Indexer selection for one request: Eq. 4, Eq. 13, Eq. 5, compaction.

    Scores every compressed entry s of the request on each indexer layer l,
    I_l[s] = sigmoid(sum_h w[l, h] * ReLU(q[l, h] . K^IComp_l[s])), ensembles the
    layers (routing "or": max, so `>= threshold` is the union of Eq. 13; "mean"),
    thresholds (I >= threshold, Eq. 5) and selects a chunk (entries_per_chunk
    consecutive entries) when any of its entries is selected. Nothing leaves the
    device: the result is compacted there and no host sync happens.

    Args:
        q: [L, H, D] indexer queries (bf16/fp16/fp32) of the current step.
        w: [L, H] head weights, already scaled (Eq. 3).
        k: [L, N, D] K^IComp of the request's N compressed entries per layer,
            float8_e4m3fn as DeepSeek-V4 caches it, or bf16/fp16/fp32. Last dim
            contiguous; D <= 256.
        k_scale: [L, N] float32 per-entry scale of fp8 keys, or None.
        threshold: Eq. 5 threshold on the ensemble score, in [0, 1].
        entries_per_chunk: entries per chunk (64 = 256 tokens at CSA ratio 4).
        routing: "or" (default, Eq. 13) or "mean".

    Returns:
        ChunkSelection(chunk_ids [n_chunks] int32, counts [2] int32 =
        [selected chunks, selected entries], entry_scores [N] float32), where
        n_chunks = ceil(N / entries_per_chunk).

    Examples:
        >>> sel = memory_indexer_select(q, w, k_fp8, k_scale)  # doctest: +SKIP
        >>> n = int(sel.counts[0]); fetch = sel.chunk_ids[:n]  # doctest: +SKIP
    """
    _check_select_args(q, w, k, k_scale, threshold, entries_per_chunk, routing)
    check_triton_device(k.device, "memory_indexer_select")
    if q.shape[2] > _MAX_HEAD_DIM or q.shape[1] > _MAX_HEADS:
        raise ValueError(
            f"memory_indexer_select: H={q.shape[1]} heads x D={q.shape[2]} exceeds "
            f"the kernel's register tile ({_MAX_HEADS} x {_MAX_HEAD_DIM}); use "
            "memory_indexer_select_ref."
        )
    return _launch_memory_indexer_select(
        q,
        w,
        k,
        k_scale,
        threshold,
        entries_per_chunk,
        routing,
        block_rows=_SELECT_BLOCK_ROWS,
        num_warps=_SELECT_NUM_WARPS,
        programs_per_sm=_SELECT_PROGRAMS_PER_SM,
        num_stages=_SELECT_NUM_STAGES,
    )
