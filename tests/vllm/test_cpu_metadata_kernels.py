"""Torch ports of DeepSeek-V4's metadata Triton kernels vs. the kernels.

Scenarios, per kernel (token->request map, compressed slot mapping, SWA
indices and lengths, prefill gather lengths, prefill chunk ks/ke):
- a hand-written case with the expected values spelled out;
- batches with empty, decode-like and prefill-like requests, padding (PAD /
  invalid) tokens, replay starts, image visibility, query slices and DCP,
  compared element for element with vLLM's own Triton kernel run under
  ``TRITON_INTERPRET=1`` (the oracle);
- the same launches made through vLLM's real launchers
  (``compute_token_to_req_indices``, ``get_compressed_slot_mapping`` and the
  ``VllmTritonJitKernel`` owners) after ``register()``, so the dispatcher
  routing (argument names, ``num_warps``, launch grid) is covered too;
- outputs outside the rows a launch owns stay untouched.
"""

import pytest
import torch

from vllm_flashmemory.vllm.cpu import metadata_kernels as mk

SENTINEL = -7  # pre-fill of output buffers: cells a kernel must not touch


@pytest.fixture(scope="module")
def plugin_registered() -> None:
    from vllm_flashmemory.vllm import register

    register()


def _batch(
    seq_lens: list[int], query_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    return qsl.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int32)


def _block_table(num_reqs: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_reqs * width + 7, generator=g)[: num_reqs * width]
    return perm.view(num_reqs, width).to(torch.int32)


def _assert_equal(name: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert torch.equal(expected, actual), (
        f"{name} differs:\nexpected {expected.tolist()}\nactual   {actual.tolist()}"
    )


# --- token -> request map ----------------------------------------------------


def test_token_request_mapping_hand_written() -> None:
    qsl = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # request 1 is empty
    out = torch.full((10,), SENTINEL, dtype=torch.int32)
    mk.token_request_mapping(qsl, out, 3, 6, 9)
    assert out.tolist() == [0, 0, 0, 2, 2, 2, 0, 0, 0, SENTINEL]


@pytest.mark.parametrize(
    "query_lens,num_mapped,num_tokens",
    [([1], 1, 1), ([3, 0, 4, 1], 8, 8), ([5, 0, 0, 300, 1], 250, 306), ([2, 2], 3, 11)],
)
def test_token_request_mapping_matches_triton(
    triton_oracle, plugin_registered, query_lens, num_mapped, num_tokens
) -> None:
    from vllm.v1.attention.ops.metadata import (
        _token_request,
        compute_token_to_req_indices,
    )

    kernel = triton_oracle.kernel(
        mk.TOKEN_REQUEST_MAPPING,
        _token_request=triton_oracle.jit(_token_request),
    )
    qsl, _ = _batch([0] * len(query_lens), query_lens)
    expected = torch.full((num_tokens + 5,), SENTINEL, dtype=torch.int32)
    kernel[((num_tokens + 255) // 256,)](
        qsl, expected, len(query_lens), num_mapped, num_tokens
    )
    port = torch.full_like(expected, SENTINEL)
    mk.token_request_mapping(qsl, port, len(query_lens), num_mapped, num_tokens)
    _assert_equal("port", expected, port)
    # vLLM's caller, routed to the port (it passes num_warps=4).
    routed = torch.full_like(expected, SENTINEL)
    compute_token_to_req_indices(qsl, routed, num_mapped, num_tokens)
    _assert_equal("routed", expected, routed)


# --- compressed slot mapping -------------------------------------------------


def test_compressed_slot_mapping_hand_written() -> None:
    # One request: positions 5..12 (seq_len 13, query 8), ratio 4, 2 states per
    # block. Positions 7 and 11 close states 1 and 2 -> block 0 off 1, block 1
    # off 0. Token at position 11 has a PAD slot of its own -> PAD.
    qsl, seq_lens = _batch([13], [8])
    block_table = torch.tensor([[10, 20, 30]], dtype=torch.int32)
    slot_mapping = torch.arange(8, dtype=torch.int64)
    out = torch.full((8,), SENTINEL, dtype=torch.int64)
    args = dict(
        compressed_slot_mapping_ptr=out, query_start_loc_ptr=qsl,
        seq_lens_ptr=seq_lens, block_table_ptr=block_table, block_table_stride=3,
        block_size=2, dcp_world_size=1, cp_interleave=1, COMPRESS_RATIO=4, PAD_ID=-1,
    )
    mk.compressed_slot_mapping(slot_mapping_ptr=slot_mapping, grid=(1,), **args)
    assert out.tolist() == [-1, -1, 21, -1, -1, -1, 40, -1]
    slot_mapping[6] = -1
    mk.compressed_slot_mapping(slot_mapping_ptr=slot_mapping, grid=(1,), **args)
    assert out.tolist() == [-1, -1, 21, -1, -1, -1, -1, -1]


@pytest.mark.parametrize(
    "seq_lens,query_lens,ratio,block_size,dcp_world,interleave",
    [
        ([37, 9, 130, 4], [5, 9, 64, 0], 4, 4, 1, 1),
        ([300, 1], [300, 1], 4, 16, 1, 1),
        ([600, 129], [256, 1], 128, 2, 1, 1),
        ([70, 45], [70, 3], 4, 4, 2, 8),
    ],
)
def test_compressed_slot_mapping_matches_triton(
    triton_oracle, plugin_registered, seq_lens, query_lens, ratio, block_size,
    dcp_world, interleave,
) -> None:
    from vllm.v1.attention.backends.mla.compressor_utils import (
        get_compressed_slot_mapping,
    )

    qsl, seq_lens_t = _batch(seq_lens, query_lens)
    num_tokens = sum(query_lens)
    block_table = _block_table(len(seq_lens), 48, seed=num_tokens)
    g = torch.Generator().manual_seed(1)
    slot_mapping = torch.randint(0, 10_000, (num_tokens,), generator=g)
    slot_mapping[torch.rand(num_tokens, generator=g) < 0.1] = -1  # replayed tokens
    kernel = triton_oracle.kernel(mk.COMPRESSED_SLOT_MAPPING)
    args = dict(
        slot_mapping_ptr=slot_mapping, query_start_loc_ptr=qsl,
        seq_lens_ptr=seq_lens_t, block_table_ptr=block_table,
        block_table_stride=block_table.stride(0), block_size=block_size,
        dcp_world_size=dcp_world, cp_interleave=interleave, COMPRESS_RATIO=ratio,
        PAD_ID=-1,
    )
    expected = torch.full((num_tokens,), -1, dtype=torch.int64)
    kernel[(len(seq_lens),)](
        compressed_slot_mapping_ptr=expected, TRITON_BLOCK_SIZE=1024, **args
    )
    assert (expected >= 0).any(), "case selects no compressed state"
    port = torch.full((num_tokens,), -1, dtype=torch.int64)
    mk.compressed_slot_mapping(
        compressed_slot_mapping_ptr=port, grid=(len(seq_lens),), **args
    )
    _assert_equal("port", expected, port)
    routed = get_compressed_slot_mapping(
        num_tokens, slot_mapping, qsl, seq_lens_t, block_table, block_size, ratio,
        dcp_world_size=dcp_world, cp_interleave=interleave,
    )
    _assert_equal("routed", expected, routed)


# --- SWA indices and lengths -------------------------------------------------


def _swa_inputs(
    seq_lens: list[int], query_lens: list[int], block_size: int, seed: int
) -> dict[str, torch.Tensor]:
    qsl, seq_lens_t = _batch(seq_lens, query_lens)
    num_tokens = sum(query_lens)
    t2r = torch.repeat_interleave(
        torch.arange(len(seq_lens), dtype=torch.int32), torch.tensor(query_lens)
    )
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(num_tokens, generator=g) > 0.15
    t2r = torch.where(valid, t2r, 0)  # padding tokens map to request 0
    width = max(seq_lens) // block_size + 2
    return dict(
        query_start_loc_ptr=qsl, seq_lens_ptr=seq_lens_t,
        token_to_req_indices_ptr=t2r, is_valid_token_ptr=valid,
        block_table_ptr=_block_table(len(seq_lens), width, seed),
        replay_start_ptr=torch.tensor(
            [min(s // 3, 40) for s in seq_lens], dtype=torch.int32
        ),
        left_visible_ptr=torch.randint(0, 20, (num_tokens,), generator=g).int(),
        right_visible_ptr=torch.randint(0, 6, (num_tokens,), generator=g).int(),
    )


def test_swa_indices_hand_written() -> None:
    # One decode token at position 9 (seq_len 10), window 4, block size 4:
    # window positions 6..9 -> blocks 1, 2 -> slots 2*4+2, 2*4+3, 5*4+0, 5*4+1.
    inputs = _swa_inputs([10], [1], 4, seed=0)
    inputs["is_valid_token_ptr"][:] = True
    inputs["replay_start_ptr"][:] = 0
    inputs["block_table_ptr"] = torch.tensor([[7, 2, 5, 9]], dtype=torch.int32)
    indices = torch.full((3, 1, 6), SENTINEL, dtype=torch.int32)
    lens = torch.full((3,), SENTINEL, dtype=torch.int32)
    mk.swa_indices_and_lens(
        swa_indices_ptr=indices, swa_indices_stride=6, swa_lens_ptr=lens,
        window_size=4, index_width=6, block_table_stride=4, block_size=4,
        token_offset=0, HAS_IMAGE=False, grid=(1,), **inputs,
    )
    assert indices[0, 0].tolist() == [10, 11, 20, 21, -1, -1]
    assert lens.tolist() == [4, SENTINEL, SENTINEL]
    assert (indices[1:] == SENTINEL).all()


@pytest.mark.parametrize(
    "seq_lens,query_lens,window,width,token_offset,has_image",
    [
        ([40, 7, 130], [1, 1, 1], 16, 16, 0, False),  # decode rows
        ([40, 300], [1, 120], 16, 24, 1, False),  # prefill rows after a decode
        ([90, 64], [30, 64], 8, 40, 0, True),  # image-widened prefill window
        ([5], [5], 128, 128, 0, False),  # window wider than the sequence
    ],
)
def test_swa_indices_matches_triton(
    triton_oracle, plugin_registered, seq_lens, query_lens, window, width,
    token_offset, has_image,
) -> None:
    from vllm.v1.attention.backends.mla.sparse_swa import (
        _COMPUTE_SWA_INDICES_AND_LENS_KERNEL,
    )

    block_size = 16
    inputs = _swa_inputs(seq_lens, query_lens, block_size, seed=len(seq_lens))
    num_rows = sum(query_lens) - token_offset
    kernel = triton_oracle.kernel(mk.SWA_INDICES_AND_LENS)

    def buffers() -> tuple[torch.Tensor, torch.Tensor]:
        # Longer than the launch, as the builder's decode buffers are.
        return (
            torch.full((num_rows + 3, 1, width), SENTINEL, dtype=torch.int32),
            torch.full((num_rows + 3,), SENTINEL, dtype=torch.int32),
        )

    expected, expected_lens = buffers()
    scalars = dict(
        window_size=window, index_width=width, block_size=block_size,
        token_offset=token_offset,
    )
    kernel[(num_rows,)](
        swa_indices_ptr=expected, swa_indices_stride=expected.stride(0),
        swa_lens_ptr=expected_lens,
        block_table_stride=inputs["block_table_ptr"].stride(0),
        HAS_IMAGE=has_image, TRITON_BLOCK_SIZE=1024, **scalars, **inputs,
    )
    assert (expected_lens[:num_rows] > 0).any()
    port, port_lens = buffers()
    mk.swa_indices_and_lens(
        swa_indices_ptr=port, swa_indices_stride=port.stride(0),
        swa_lens_ptr=port_lens,
        block_table_stride=inputs["block_table_ptr"].stride(0),
        HAS_IMAGE=has_image, grid=(num_rows,), **scalars, **inputs,
    )
    _assert_equal("port lens", expected_lens, port_lens)
    _assert_equal("port indices", expected, port)

    routed, routed_lens = buffers()
    _COMPUTE_SWA_INDICES_AND_LENS_KERNEL(
        routed, routed_lens, window, width, inputs["left_visible_ptr"],
        inputs["right_visible_ptr"], inputs["query_start_loc_ptr"],
        inputs["seq_lens_ptr"], inputs["token_to_req_indices_ptr"],
        inputs["is_valid_token_ptr"], inputs["block_table_ptr"], block_size,
        inputs["replay_start_ptr"], num_tokens=num_rows,
        token_offset=token_offset, has_image=has_image,
    )
    _assert_equal("routed lens", expected_lens, routed_lens)
    _assert_equal("routed indices", expected, routed)


# --- prefill gather lengths --------------------------------------------------


def test_prefill_metadata_hand_written() -> None:
    # Requests: one decode, then prefills (seq, query, replay) = (50, 10, 0),
    # (8, 8, 0), (300, 20, 200): gather 10 + min(40, 15), 8 + 0, 20 + min(80, 15).
    qsl, seq_lens = _batch([5, 50, 8, 300], [1, 10, 8, 20])
    replay = torch.tensor([0, 0, 0, 200], dtype=torch.int32)
    out = torch.full((4,), SENTINEL, dtype=torch.int32)
    mk.prefill_metadata(out, seq_lens, qsl, replay, 3, 1, 16)
    assert out.tolist() == [25, 8, 35, SENTINEL]


@pytest.mark.parametrize("num_decodes,num_prefills", [(0, 1), (2, 3), (1, 5)])
def test_prefill_metadata_matches_triton(
    triton_oracle, plugin_registered, num_decodes, num_prefills
) -> None:
    from vllm.v1.attention.backends.mla.sparse_swa import (
        _COMPUTE_PREFILL_METADATA_KERNEL,
    )

    g = torch.Generator().manual_seed(num_prefills)
    n = num_decodes + num_prefills
    prefill_lens = torch.randint(1, 90, (num_prefills,), generator=g).tolist()
    query_lens = [1] * num_decodes + prefill_lens
    seq_lens = [q + int(torch.randint(0, 200, (1,), generator=g)) for q in query_lens]
    qsl, seq_lens_t = _batch(seq_lens, query_lens)
    replay = torch.randint(0, 100, (n,), generator=g).int()
    kernel = triton_oracle.kernel(mk.PREFILL_METADATA)
    expected = torch.full((num_prefills + 2,), SENTINEL, dtype=torch.int32)
    block = 1 << (num_prefills - 1).bit_length()
    args = (seq_lens_t, qsl, replay, num_prefills, num_decodes, 32)
    kernel[(1,)](expected, *args, block)
    port = torch.full_like(expected, SENTINEL)
    mk.prefill_metadata(port, seq_lens_t, qsl, replay, num_prefills, num_decodes, 32)
    _assert_equal("port", expected, port)
    routed = torch.full_like(expected, SENTINEL)
    _COMPUTE_PREFILL_METADATA_KERNEL(
        routed, seq_lens_t, qsl, replay, num_prefills, num_decodes, 32
    )
    _assert_equal("routed", expected, routed)


# --- prefill chunk ks / ke ---------------------------------------------------


def _chunk_inputs(
    seq_lens: list[int], query_lens: list[int], ratio: int
) -> dict[str, torch.Tensor]:
    qsl, seq_lens_t = _batch(seq_lens, query_lens)
    compressed = torch.tensor([s // ratio for s in seq_lens], dtype=torch.int32)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = compressed.cumsum(0)
    return dict(
        query_start_loc_ptr=qsl, uncompressed_seq_lens_ptr=seq_lens_t,
        cu_compressed_seq_lens_ptr=cu, row_start_cu_compressed_seq_lens_ptr=cu,
    )


def test_prefill_chunk_metadata_hand_written() -> None:
    # Request 0: seq 10, query 3 (positions 7..9), ratio 4 -> lens 2, 2, 2;
    # request 1: seq 8, query 8 -> lens 0,0,0,1,1,1,1,2 from row start 2.
    inputs = _chunk_inputs([10, 8], [3, 8], 4)
    token_to_seq = torch.full((4,), SENTINEL, dtype=torch.int32)
    ks = torch.full((11,), SENTINEL, dtype=torch.int32)
    ke = torch.full((11,), SENTINEL, dtype=torch.int32)
    mk.prefill_chunk_metadata(
        token_to_seq_ptr=token_to_seq, cu_compressed_seq_len_ks_ptr=ks,
        cu_compressed_seq_len_ke_ptr=ke, query_slice_start=0, query_slice_stop=11,
        DCP_RANK=0, DCP_WORLD=1, DCP_INTERLEAVE=1, BLOCK_SIZE=1024,
        COMPRESS_RATIO=4, grid=(2,), **inputs,
    )
    assert token_to_seq.tolist() == [0, 0, 1, 1]
    assert ks.tolist() == [0] * 3 + [2] * 8
    assert ke.tolist() == [2, 2, 2] + [2 + n for n in [0, 0, 0, 1, 1, 1, 1, 2]]


@pytest.mark.parametrize(
    "seq_lens,query_lens,qs_slice,dcp",
    [
        ([600, 33, 256], [600, 1, 200], None, (0, 1, 1)),
        ([600, 33, 256], [600, 1, 200], (100, 650), (0, 1, 1)),
        ([300, 128], [120, 128], None, (1, 2, 2)),
    ],
)
def test_prefill_chunk_metadata_matches_triton(
    triton_oracle, plugin_registered, seq_lens, query_lens, qs_slice, dcp
) -> None:
    from vllm.v1.attention.backends.mla.indexer import (
        _BUILD_PREFILL_CHUNK_METADATA_KERNEL,
    )

    ratio = 4
    inputs = _chunk_inputs(seq_lens, query_lens, ratio)
    total_query = sum(query_lens)
    start, stop = qs_slice or (0, total_query)
    total_compressed = int(inputs["cu_compressed_seq_lens_ptr"][-1])
    kernel = triton_oracle.kernel(mk.PREFILL_CHUNK_METADATA)
    rank, world, interleave = dcp

    def outputs() -> dict[str, torch.Tensor]:
        def filled(n: int) -> torch.Tensor:
            return torch.full((n,), SENTINEL, dtype=torch.int32)

        return dict(
            token_to_seq_ptr=filled(total_compressed),
            cu_compressed_seq_len_ks_ptr=filled(stop - start),
            cu_compressed_seq_len_ke_ptr=filled(stop - start),
        )

    scalars = dict(
        query_slice_start=start, query_slice_stop=stop, DCP_RANK=rank,
        DCP_WORLD=world, DCP_INTERLEAVE=interleave, COMPRESS_RATIO=ratio,
    )
    expected = outputs()
    kernel[(len(seq_lens),)](BLOCK_SIZE=1024, **scalars, **inputs, **expected)
    port = outputs()
    mk.prefill_chunk_metadata(
        BLOCK_SIZE=1024, grid=(len(seq_lens),), **scalars, **inputs, **port
    )
    routed = outputs()
    _BUILD_PREFILL_CHUNK_METADATA_KERNEL(
        *inputs.values(), *routed.values(), start, stop, rank, world, interleave,
        num_reqs=len(seq_lens), COMPRESS_RATIO=ratio,
    )
    for name, tensor in expected.items():
        _assert_equal(f"port {name}", tensor, port[name])
        _assert_equal(f"routed {name}", tensor, routed[name])
