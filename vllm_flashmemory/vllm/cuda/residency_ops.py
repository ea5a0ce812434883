"""Pure-torch pieces of the CUDA variant: Eq. 6 as candidate blocks, K^IComp reads.

Nothing here imports vLLM, so all of it runs (and is tested) on CPU.

**Eq. 6 through vLLM's own filter.** vLLM 0.33's ``sparse_attn_indexer`` computes
the native indexer logits (DeepGEMM ``fp8_fp4_mqa_logits`` for prefill,
``fp8_fp4_paged_mqa_logits`` for decode) and ranks them inside one custom op, so
no Python code runs between the two. Its only hook between them is the
DeepSeek-V4.1 two-level filter: with ``candidate_blocks`` [T, C] (request-local
block ids, -1 = none) and ``candidate_block_size`` entries per block, it sets every
logit outside the candidate blocks to -inf (``apply_candidate_mask``) right before
``top_k_per_row_prefill`` / ``get_indexer_topk``. With one candidate block per
resident local block, that is Eq. 6: top-k over resident entries only.
``resident_candidate_blocks`` builds that tensor; ``drop_nonresident_topk``
(model_variant) then rewrites the forced picks of a row with fewer than K
resident entries to -1, as on CPU.
"""

from __future__ import annotations

import torch

# Bytes of one cached K^IComp entry's scale word after its Dh fp8 values: an fp32
# scale, or (Blackwell, `mqa_logits_use_mx_scales`) four equal UE8M0 bytes.
_SCALE_BYTES = 4
_FP32_EXPONENT_SHIFT = 23


def resident_candidate_blocks(
    non_resident_blocks: torch.Tensor,
    page_table: torch.Tensor,
    visible_entries: torch.Tensor,
    entries_per_block: int,
) -> torch.Tensor:
    """Eq. 6 as vLLM's candidate-block filter.

    non_resident_blocks: [num_blocks] bool, True = evicted (``ResidencyMap``).
    page_table: [T, max_blocks] int physical block ids of each row's request.
    visible_entries: [T] int, compressed entries the row's request holds after
        this forward (an upper bound on the row's causal length).
    Returns [T, max_blocks] int32: local block id j where block j is resident
    and holds a visible entry, else -1. Blocks past the visible ones stay -1 so
    vLLM never sees a candidate beyond the logits' width (it would keep the
    last column for it).
    """
    resident = ~non_resident_blocks[page_table.long()]  # [T, max_blocks]
    local = torch.arange(page_table.shape[1], device=page_table.device)  # [max_blocks]
    visible_blocks = -(-visible_entries.long() // entries_per_block)  # [T]
    keep = resident & (local[None, :] < visible_blocks[:, None])  # [T, max_blocks]
    return torch.where(keep, local[None, :], -1).to(torch.int32)


def batch_rows(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    token_to_req: torch.Tensor,
    num_tokens: int,
    compress_ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's request page-table row and its request's visible entries.

    block_table: [R, max_blocks] and seq_lens: [R] tokens after this forward (the
    indexer metadata's request-level fields); token_to_req: [>= num_tokens] the
    batch row of each token (compressor metadata). Returns page_table
    [num_tokens, max_blocks] and visible_entries [num_tokens].
    """
    req = token_to_req[:num_tokens].long()  # [T]
    visible = torch.div(seq_lens.long(), compress_ratio, rounding_mode="floor")  # [R]
    return block_table[req], visible[req]


def candidate_buffer(candidates: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows, max_blocks] int32: ``candidates`` on top, -1 below.

    vLLM indexes the tensor by token row (prefill) and by padded decode row, up to
    the batch's padded token count; rows past the real tokens select nothing.
    """
    out = candidates.new_full((num_rows, candidates.shape[1]), -1)
    out[: candidates.shape[0]] = candidates
    return out


def find_request_row(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    token_to_req: torch.Tensor,
    num_tokens: int,
    anchor_block_index: int,
    anchor_block_id: int,
    num_tokens_after: int,
) -> tuple[int, int] | None:
    """(batch row, token row of its last scheduled token) of one request, or None.

    The request is the row holding ``anchor_block_id`` at ``anchor_block_index`` and
    whose length after this forward is ``num_tokens_after`` (a ``RefreshTarget``).
    Its last scheduled token sits at position ``num_tokens_after - 1``.
    """
    match = (
        (block_table[:, anchor_block_index] == anchor_block_id)
        & (seq_lens == num_tokens_after)
    ).nonzero()
    if match.numel() == 0:
        return None
    r = int(match[0, 0])
    rows = (token_to_req[:num_tokens] == r).nonzero()
    if rows.numel() == 0:
        return None
    return r, int(rows[-1, 0])


def read_k_icomp(
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    n_entries: int,
    head_dim: int,
    mx_scales: bool,
) -> torch.Tensor:
    """The first ``n_entries`` K^IComp entries of one request, dequantized: [N, Dh] fp32.

    kv_cache: the layer's index-K cache, [num_blocks, E, Dh + 4] uint8 (CUDA) or
    [num_blocks, 1, E, Dh + 4]; each block holds its E entries' fp8 e4m3 values
    first (E x Dh bytes), then one 4-byte scale word per entry, as vLLM 0.33's
    ``_fused_kv_compress_norm_rope_insert_indexer_attn`` writes it. The word is an
    fp32 power of two, or with ``mx_scales`` that power's biased exponent byte
    repeated four times (``pack_ue8m0_x4``). block_row: [max_blocks] physical ids.
    """
    width = kv_cache.shape[-1]
    per_block = kv_cache.shape[-2]  # E
    if width != head_dim + _SCALE_BYTES or kv_cache.dtype != torch.uint8:
        raise ValueError(
            f"index-K cache of shape {tuple(kv_cache.shape)} and dtype {kv_cache.dtype} "
            f"is not the FP8 layout (uint8, {head_dim} + {_SCALE_BYTES} bytes per "
            "entry); the Memory Indexer cannot read an MXFP4 index-K cache."
        )
    if kv_cache.stride(-1) != 1 or kv_cache.stride(-2) != width:
        raise ValueError(
            f"index-K cache strides {tuple(kv_cache.stride())} are not contiguous "
            "within a block; the reader assumes one flat page per block."
        )
    n_blocks = -(-n_entries // per_block)
    # [n_blocks, E * width]: a copy of the request's pages, bytes in page order.
    pages = kv_cache[block_row[:n_blocks].long()].reshape(n_blocks, -1)
    values = pages[:, : per_block * head_dim].contiguous().view(torch.float8_e4m3fn)
    values = values.view(n_blocks * per_block, head_dim)[:n_entries]  # [N, Dh]
    words = pages[:, per_block * head_dim : per_block * width].contiguous()
    words = words.view(n_blocks * per_block, _SCALE_BYTES)[:n_entries]  # [N, 4]
    if mx_scales:
        exponent = words[:, 0].to(torch.int32)  # biased UE8M0 exponent
        scale = (exponent << _FP32_EXPONENT_SHIFT).view(torch.float32)  # 2^(e-127)
    else:
        scale = words.view(torch.float32).reshape(-1)  # [N]
    return values.float() * scale[:, None]


__all__ = [
    "batch_rows",
    "candidate_buffer",
    "find_request_row",
    "read_k_icomp",
    "resident_candidate_blocks",
]
