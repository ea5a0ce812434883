"""memory_indexer_select (fused Eq. 4, 5, 13 + compaction) vs its torch reference.

Scenarios:
- fresh random q, w and K^IComp (fp8 e4m3 + scale, bf16, fp32), odd sizes: N = 1,
  chunk - 1, chunk + 1, several chunks plus a partial one; non-power-of-two H and D;
  entries_per_chunk 64 and 7: chunk ids and counts equal exactly, scores within
  the fixed per-dtype tolerance;
- the reference equals memory_indexer_scores_ref + combine_layers_ref + threshold;
- chunk_ids is a stable partition (selected ascending, then unselected ascending);
- routing "mean"; threshold 0 keeps every chunk; threshold 1;
- every refusal names the value (shapes, dtypes, threshold, chunk size, routing).
"""

from __future__ import annotations

import pytest
import torch
from triton_test_utils import DEVICE, assert_close, make_k_icomp

from vllm_flashmemory.triton_ops.memory_indexer_score import (
    combine_layers_ref,
    memory_indexer_scores_ref,
    memory_indexer_select,
    memory_indexer_select_ref,
)

K_DTYPES = [torch.float8_e4m3fn, torch.bfloat16, torch.float32]


def _inputs(L, H, D, N, k_dtype, q_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(L, H, D, generator=g) / D**0.5).to(q_dtype).to(DEVICE)
    w = (torch.randn(L, H, generator=g) * (2.0 / H**0.5)).to(DEVICE)
    k, k_scale = make_k_icomp((L, N, D), k_dtype, g)
    return q, w, k, k_scale


def _check(out, ref, k_dtype, N, epc):
    n_chunks = -(-N // epc)
    assert out.chunk_ids.dtype == torch.int32 and out.counts.dtype == torch.int32
    assert torch.equal(out.counts.cpu(), ref.counts.cpu()), (out.counts, ref.counts)
    assert torch.equal(out.chunk_ids.cpu(), ref.chunk_ids.cpu())
    assert_close("entry_scores", ref.entry_scores, out.entry_scores, k_dtype)
    ids = out.chunk_ids.cpu()
    assert torch.equal(ids.sort().values, torch.arange(n_chunks, dtype=torch.int32))
    n_sel = int(out.counts[0])
    assert torch.equal(ids[:n_sel], ids[:n_sel].sort().values)
    assert torch.equal(ids[n_sel:], ids[n_sel:].sort().values)


@pytest.mark.parametrize("k_dtype", K_DTYPES, ids=str)
@pytest.mark.parametrize(
    "L, H, D, N, epc",
    [
        (3, 5, 20, 1, 64),
        (3, 5, 20, 63, 64),
        (3, 5, 20, 65, 64),
        (2, 24, 48, 3 * 64 + 5, 64),
        (1, 3, 16, 6, 7),
        (3, 17, 33, 8, 7),
        (3, 128, 128, 200, 64),
    ],
)
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_select_matches_reference(L, H, D, N, epc, k_dtype, threshold):
    q_dtype = torch.float32 if k_dtype == torch.float32 else torch.bfloat16
    q, w, k, k_scale = _inputs(L, H, D, N, k_dtype, q_dtype, seed=N * 31 + H)
    out = memory_indexer_select(q, w, k, k_scale, threshold, epc)
    ref = memory_indexer_select_ref(q, w, k, k_scale, threshold, epc)
    _check(out, ref, k_dtype, N, epc)


def test_reference_is_scores_ref_plus_threshold():
    q, w, k, k_scale = _inputs(3, 6, 24, 50, torch.float8_e4m3fn, torch.bfloat16, 1)
    ref = memory_indexer_select_ref(q, w, k, k_scale, 0.6, 8)
    scores = memory_indexer_scores_ref(q[:, None], w[:, None], k, k_scale)
    comb = combine_layers_ref(scores, "or")[0]
    assert torch.equal(ref.entry_scores, comb)
    selected = comb >= 0.6
    assert int(ref.counts[1]) == int(selected.sum())
    chunks = {int(s) // 8 for s in selected.nonzero()[:, 0]}
    assert set(ref.chunk_ids[: int(ref.counts[0])].tolist()) == chunks


def test_mean_routing_and_fp16():
    q, w, k, k_scale = _inputs(3, 9, 40, 77, torch.float16, torch.float16, 2)
    out = memory_indexer_select(q, w, k, k_scale, 0.55, 10, "mean")
    ref = memory_indexer_select_ref(q, w, k, k_scale, 0.55, 10, "mean")
    _check(out, ref, torch.float16, 77, 10)


@pytest.mark.parametrize("threshold, expect_all", [(0.0, True), (1.0, False)])
def test_threshold_edges(threshold, expect_all):
    q, w, k, k_scale = _inputs(3, 5, 20, 130, torch.float8_e4m3fn, torch.bfloat16, 3)
    out = memory_indexer_select(q, w, k, k_scale, threshold, 64)
    ref = memory_indexer_select_ref(q, w, k, k_scale, threshold, 64)
    _check(out, ref, torch.float8_e4m3fn, 130, 64)
    if expect_all:
        assert out.counts.tolist() == [3, 130]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.zeros(3, 4)), "q must be"),
        (dict(w=torch.zeros(3, 5)), "w must be"),
        (dict(k=torch.zeros(3, 10, 9)), "k must be"),
        (dict(k_scale=torch.zeros(3, 11)), "k_scale must be"),
        (dict(k=torch.zeros(3, 10, 8, dtype=torch.int8)), "k has dtype"),
        (dict(threshold=1.5), "threshold=1.5"),
        (dict(entries_per_chunk=0), "entries_per_chunk=0"),
        (dict(routing="max"), "routing='max'"),
    ],
)
def test_refusals(change, match):
    args = dict(
        q=torch.zeros(3, 4, 8),
        w=torch.zeros(3, 4),
        k=torch.zeros(3, 10, 8),
        k_scale=None,
        threshold=0.5,
        entries_per_chunk=4,
        routing="or",
    )
    args.update(change)
    for fn in (memory_indexer_select, memory_indexer_select_ref):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(**args)


def test_leaky_training_scores_match_the_definition():
    """relu_slope > 0 (training only) is sigmoid(sum_h w * leaky_relu(q.k)); 0 is Eq. 4."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, 4, 8, generator=g)  # [L, T, H, D]
    w = torch.randn(2, 3, 4, generator=g)
    k = torch.randn(2, 5, 8, generator=g)
    dots = torch.einsum("lthd,lnd->lthn", q, k)
    want = torch.sigmoid(torch.einsum("lthn,lth->ltn", torch.where(dots > 0, dots, 0.1 * dots), w))
    torch.testing.assert_close(memory_indexer_scores_ref(q, w, k, None, 0.1), want)
    plain = torch.sigmoid(torch.einsum("lthn,lth->ltn", dots.clamp(min=0), w))
    torch.testing.assert_close(memory_indexer_scores_ref(q, w, k), plain)
    assert not torch.allclose(want, plain)
