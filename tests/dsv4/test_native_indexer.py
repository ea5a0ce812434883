"""Native init of the Memory Indexer (core/memory_indexer.native_indexer_state).

Scenarios:
- on the tiny DeepSeek-V4 (random weights), a Memory Indexer whose state comes from
  the checkpoint's official-name tensors scores sigmoid(native lightning-indexer
  score) on every causal entry of every CSA layer, fed what the native scorer sees:
  its hidden input, its compressed keys (Hadamard-rotated, as the cache stores them)
  and positions 0..T-1, on fresh random token ids.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vllm_flashmemory.core.memory_indexer import (
    MemoryIndexer,
    MemoryIndexerConfig,
    native_indexer_state,
)
from vllm_flashmemory.dsv4.checkpoint import load_hf_model, save_checkpoint
from vllm_flashmemory.dsv4.tiny import TINY, build_model

T = 96  # tokens: 24 compressed entries per CSA layer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_checkpoint(build_model(TINY, seed=1), TINY.official_config(), folder)
    return folder


def test_native_init_scores_sigmoid_of_native_indexer(tiny_checkpoint):
    model = load_hf_model(tiny_checkpoint).eval()
    csa = TINY.csa_layers
    captured: dict[int, tuple[torch.Tensor, ...]] = {}
    handles = []
    for i, layer in enumerate(csa):
        scorer = model.model.layers[layer].self_attn.compressor.indexer.scorer

        def hook(module, args, out, i=i):
            _q, keys, hidden = args  # [B,S,H,Dk], [B,N,Dk] (unrotated), [B,S,D]
            captured[i] = (keys[0].detach(), hidden[0].detach(), out[0].detach())

        handles.append(scorer.register_forward_hook(hook))
    ids = torch.randint(3, 259, (1, T), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert sorted(captured) == list(range(len(csa)))

    layer_ids = tuple(range(len(csa)))
    mi = MemoryIndexer(
        MemoryIndexerConfig(
            hidden_size=TINY.hidden_size,
            rank=TINY.q_lora_rank,
            n_heads=TINY.index_n_heads,
            head_dim=TINY.index_head_dim,
            rope_dim=TINY.qk_rope_head_dim,
            rope_theta=TINY.compress_rope_theta,
            rope_factor=TINY.yarn_factor,
            rope_original_max_position=TINY.yarn_original_max_position_embeddings,
            layer_ids=layer_ids,
        )
    )
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    mi.load_state_dict(native_indexer_state(weights, layer_ids, csa))

    hidden = torch.stack([captured[i][1] for i in layer_ids])  # [L, T, D]
    keys = torch.stack([captured[i][0] for i in layer_ids]) @ mi.hadamard  # [L, N, Dh]
    with torch.no_grad():
        scores = mi(hidden, torch.arange(T), keys)  # [L, T, N]
    n = keys.shape[1]
    assert n == T // 4
    causal = torch.arange(n)[None, :] < ((torch.arange(T) + 1) // 4)[:, None]
    for i in layer_ids:
        native = captured[i][2]  # [T, N]
        assert native.shape == (T, n)
        want = torch.sigmoid(native)[causal]
        assert want.std() > 0.05  # the native scores are not flat: the check bites
        torch.testing.assert_close(scores[i][causal], want, rtol=0, atol=1e-5)
