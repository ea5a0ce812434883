"""gather_chunks / scatter_chunks (pinned host pool <-> GPU slots) vs their references.

Scenarios:
- byte-exact on odd chunk sizes (1, 7, 4095, 4096, 4097, 8200, one DeepSeek-V4-Flash
  chunk of 64 x 716 x 21 = 962304 B) and unaligned word widths, both directions,
  int32 and int64 indices, indices on the CPU and on the device;
- rows and slots not named stay untouched (poisoned pools);
- an empty index list is a no-op;
- refusals: unpinned host pool (on CUDA), chunk size mismatch, index length
  mismatch, out-of-range CPU indices, wrong dtype.
"""

from __future__ import annotations

import pytest
import torch
from triton_test_utils import DEVICE

from vllm_flashmemory.triton_ops.chunk_copy import (
    gather_chunks,
    gather_chunks_ref,
    scatter_chunks,
    scatter_chunks_ref,
)

PIN = DEVICE.type == "cuda"


def _pools(n_host, n_slots, chunk_bytes, seed):
    g = torch.Generator().manual_seed(seed)
    host = torch.randint(0, 256, (n_host, chunk_bytes), dtype=torch.uint8, generator=g)
    slots = torch.randint(
        0, 256, (n_slots, chunk_bytes), dtype=torch.uint8, generator=g
    )
    if PIN:
        host = host.pin_memory()
    return host, slots.to(DEVICE), g


def _fresh(host):
    out = torch.empty(host.shape, dtype=host.dtype, pin_memory=PIN)
    out.copy_(host)
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4095, 4096, 4097, 8200, 962304])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("idx_on_device", [False, True])
def test_gather_scatter_byte_exact(chunk_bytes, idx_dtype, idx_on_device):
    n_host, n_slots = 9, 6
    host, slots, g = _pools(n_host, n_slots, chunk_bytes, seed=chunk_bytes)
    host_idx = torch.randperm(n_host, generator=g)[:4].to(idx_dtype)
    slot_idx = torch.randperm(n_slots, generator=g)[:4].to(idx_dtype)
    if idx_on_device:
        host_idx, slot_idx = host_idx.to(DEVICE), slot_idx.to(DEVICE)

    out = gather_chunks(host, host_idx, slots.clone(), slot_idx)
    ref = gather_chunks_ref(host, host_idx, slots.clone(), slot_idx)
    assert torch.equal(out.cpu(), ref.cpu())

    out_h = scatter_chunks(_fresh(host), host_idx, slots, slot_idx)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    ref_h = scatter_chunks_ref(_fresh(host), host_idx, slots, slot_idx)
    assert torch.equal(out_h, ref_h)


def test_unaligned_pool_base_uses_narrower_words():
    # Rows of 12 B starting 12 B into the allocation: 4-byte words, not 8-byte.
    host, slots, g = _pools(6, 6, 12, seed=3)
    hv, sv = host[1:], slots[1:]
    assert hv.data_ptr() % 8 == 4 and hv.is_contiguous()
    idx = torch.tensor([4, 0, 2])
    out = gather_chunks(hv, idx, sv.clone(), idx.flip(0))
    ref = gather_chunks_ref(hv, idx, sv.clone(), idx.flip(0))
    assert torch.equal(out.cpu(), ref.cpu())


def test_empty_is_noop():
    host, slots, g = _pools(3, 3, 100, seed=4)
    before = slots.clone()
    none = torch.zeros(0, dtype=torch.int64)
    gather_chunks(host, none, slots, none)
    assert torch.equal(slots, before)


@pytest.mark.parametrize(
    "case, match",
    [
        ("width", "differs from"),
        ("length", "one host row per GPU slot"),
        ("range", "pool has 4 rows"),
        ("dtype", "uint8"),
        ("idx_dtype", "int32/int64"),
    ],
)
def test_refusals(case, match):
    host, slots, g = _pools(4, 4, 64, seed=5)
    hi = torch.tensor([0, 1])
    si = torch.tensor([1, 2])
    if case == "width":
        slots = slots[:, :32].contiguous()
    elif case == "length":
        si = torch.tensor([1])
    elif case == "range":
        hi = torch.tensor([0, 4])
    elif case == "dtype":
        host = host.view(torch.int8)
    elif case == "idx_dtype":
        hi = hi.float()
    for fn in (gather_chunks, gather_chunks_ref, scatter_chunks, scatter_chunks_ref):
        with pytest.raises((ValueError, IndexError), match=match):
            fn(host, hi, slots, si)


@pytest.mark.skipif(
    DEVICE.type != "cuda", reason="pinning is only required for CUDA slots"
)
def test_unpinned_host_pool_refused():
    host = torch.zeros(4, 64, dtype=torch.uint8)
    slots = torch.zeros(4, 64, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="not pinned"):
        gather_chunks(host, torch.tensor([0]), slots, torch.tensor([0]))
