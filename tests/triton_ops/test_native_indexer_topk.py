"""native_indexer_topk (Eq. 6: logits over resident chunks, then top-k) vs its ref.

Scenarios:
- fresh random q, w, K^IComp (fp8 e4m3 + scale, bf16, fp32), odd sizes: N = 1,
  chunk - 1, chunk + 1, many chunks with a partial last one; non-power-of-two H, D;
  resident chunks as ids (unordered, int32 and int64) and as a bool mask; top_k 1,
  5 and more than the resident entries: indices and num_valid equal exactly,
  logits within the fixed per-dtype tolerance, padding is (N, -inf);
- ties (duplicated key rows): equal logits come out lower index first;
- all logits zero (q = 0, some w negative, so some are -0.0): lowest indices win;
- no resident chunk at all;
- every refusal names the value.
"""

from __future__ import annotations

import pytest
import torch
from triton_test_utils import DEVICE, assert_close, make_k_icomp

from vllm_flashmemory.triton_ops.native_indexer_topk import (
    native_indexer_topk,
    native_indexer_topk_ref,
)


def _inputs(H, D, N, k_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q_dtype = torch.float32 if k_dtype == torch.float32 else torch.bfloat16
    q = (torch.randn(H, D, generator=g) / D**0.5).to(q_dtype).to(DEVICE)
    w = (torch.randn(H, generator=g) / H**0.5).to(DEVICE)
    k, k_scale = make_k_icomp((N, D), k_dtype, g)
    return q, w, k, k_scale, g


def _resident(n_chunks, kind, g):
    if kind == "mask":
        m = torch.rand(n_chunks, generator=g) < 0.5
        m[0] = True
        return m.to(DEVICE)
    r = max(1, n_chunks // 2)
    ids = torch.randperm(n_chunks, generator=g)[:r]
    return ids.to(torch.int64 if kind == "ids64" else torch.int32).to(DEVICE)


def _check(out, ref, k_dtype, N):
    assert out.indices.dtype == torch.int32
    assert int(out.num_valid) == int(ref.num_valid)
    assert torch.equal(out.indices.cpu(), ref.indices.cpu())
    assert_close("logits", ref.logits.cpu(), out.logits.cpu(), k_dtype)
    n = int(out.num_valid)
    assert (out.indices[n:] == N).all() and (out.logits[n:] == float("-inf")).all()


@pytest.mark.parametrize(
    "k_dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32], ids=str
)
@pytest.mark.parametrize(
    "H, D, N, epc",
    [
        (5, 20, 1, 64),
        (5, 20, 63, 64),
        (5, 20, 65, 64),
        (12, 40, 9 * 64 + 3, 64),
        (3, 16, 50, 7),
        (64, 128, 300, 64),
    ],
)
@pytest.mark.parametrize("kind", ["ids32", "ids64", "mask"])
@pytest.mark.parametrize("top_k", [1, 5, 512])
def test_topk_matches_reference(H, D, N, epc, k_dtype, kind, top_k):
    q, w, k, k_scale, g = _inputs(H, D, N, k_dtype, seed=N + 7 * H + top_k)
    res = _resident(-(-N // epc), kind, g)
    out = native_indexer_topk(q, w, k, res, k_scale, top_k, epc)
    ref = native_indexer_topk_ref(q, w, k, res, k_scale, top_k, epc)
    _check(out, ref, k_dtype, N)


def test_ties_lower_index_first():
    q, w, k, k_scale, g = _inputs(6, 24, 40, torch.bfloat16, seed=5)
    k[20:40] = k[0:20]  # entry s and s + 20 score identically
    res = torch.arange(5, dtype=torch.int32, device=DEVICE)
    out = native_indexer_topk(q, w, k, res, None, 10, 8)
    ref = native_indexer_topk_ref(q, w, k, res, None, 10, 8)
    _check(out, ref, torch.bfloat16, 40)
    idx, lg = out.indices.tolist(), out.logits.tolist()
    for a in range(0, 10, 2):
        assert lg[a] == lg[a + 1] and idx[a] + 20 == idx[a + 1]


def test_all_zero_logits_pick_lowest_indices():
    q, w, k, k_scale, g = _inputs(4, 16, 30, torch.float32, seed=6)
    q = torch.zeros_like(q)
    w = torch.tensor([1.0, -1.0, 2.0, -3.0], device=DEVICE)
    res = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    out = native_indexer_topk(q, w, k, res, None, 4, 7)
    ref = native_indexer_topk_ref(q, w, k, res, None, 4, 7)
    _check(out, ref, torch.float32, 30)
    assert out.indices.tolist() == [7, 8, 9, 10]


def test_no_resident_chunk():
    q, w, k, k_scale, g = _inputs(4, 16, 30, torch.float8_e4m3fn, seed=8)
    for res in (
        torch.zeros(0, dtype=torch.int32, device=DEVICE),
        torch.zeros(5, dtype=torch.bool, device=DEVICE),
    ):
        out = native_indexer_topk(q, w, k, res, k_scale, 3, 7)
        ref = native_indexer_topk_ref(q, w, k, res, k_scale, 3, 7)
        _check(out, ref, torch.float8_e4m3fn, 30)
        assert int(out.num_valid) == 0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.zeros(4)), "q must be"),
        (dict(w=torch.zeros(5)), "w must be"),
        (dict(k=torch.zeros(10, 9)), "k must be"),
        (dict(k_scale=torch.zeros(11)), "k_scale must be"),
        (dict(resident_chunks=torch.zeros(2, dtype=torch.bool)), "n_chunks"),
        (dict(resident_chunks=torch.zeros(2)), "resident_chunks has dtype"),
        (dict(top_k=0), "top_k=0"),
        (dict(entries_per_chunk=-1), "entries_per_chunk=-1"),
    ],
)
def test_refusals(change, match):
    args = dict(
        q=torch.zeros(4, 8),
        w=torch.zeros(4),
        k=torch.zeros(10, 8),
        resident_chunks=torch.zeros(1, dtype=torch.int32),
        k_scale=None,
        top_k=3,
        entries_per_chunk=4,
    )
    args.update(change)
    for fn in (native_indexer_topk, native_indexer_topk_ref):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(**args)
