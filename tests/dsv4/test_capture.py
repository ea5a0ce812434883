"""Capturing the native indexer through forward hooks.

Scenarios:
- captured logits equal sum_h w_h ReLU(q_h . k_s) recomputed from captured q, w, K^IComp
- chunked prefill through the cache captures the same hidden states, keys and visible
  logits as one call (fp32; tolerance 1e-5 absolute on logits of magnitude ~0.2,
  1e-4 on hidden states of magnitude ~5; measured differences are ~2e-7 and ~3e-6)
- mask_to_doc hides exactly the entries s >= (p + 1) // 4
- the Hadamard rotation is orthonormal, so rotated dot products are unchanged
"""

import pytest
import torch

from vllm_flashmemory.dsv4.capture import (
    IndexerCapture,
    chunked_forward,
    mask_to_doc,
    recompute_logits,
)
from vllm_flashmemory.core.rotation import hadamard_matrix, hadamard_rotate
from vllm_flashmemory.dsv4.tiny import TINY, build_model

N = 128


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=0)


def _run(model, ids, chunk, record_qw=False):
    hidden, logits, checks = [[] for _ in TINY.csa_layers], [[] for _ in TINY.csa_layers], []
    with IndexerCapture(model, record_qw=record_qw) as cap:
        for start, end in chunked_forward(model, ids, chunk, cap):
            pos = torch.arange(start, end)
            for i, c in enumerate(cap.layers):
                hidden[i].append(c.hidden)
                logits[i].append(mask_to_doc(c.logits, pos, N // 4))
                if record_qw and c.logits.shape[1] > 0:
                    checks.append((recompute_logits(c.q, c.weights, c.k_icomp), c.logits))
        keys = [c.k_icomp for c in cap.layers]
    return [torch.cat(h) for h in hidden], [torch.cat(x) for x in logits], keys, checks


def test_logits_match_recomputation(model):
    ids = torch.randint(3, 259, (N,), generator=torch.Generator().manual_seed(1))
    *_, checks = _run(model, ids, 48, record_qw=True)
    assert len(checks) >= len(TINY.csa_layers)
    for ref, got in checks:
        # fp32 summation error grows with the logits' magnitude (TINY scales the
        # head weights so logits are peaky), so the bound is relative to it.
        scale = float(ref.abs().max())
        torch.testing.assert_close(got, ref, atol=1e-6 * scale, rtol=1e-5)
        assert scale > 0


def test_chunked_equals_one_call(model):
    ids = torch.randint(3, 259, (N,), generator=torch.Generator().manual_seed(2))
    h1, l1, k1, _ = _run(model, ids, N)
    h2, l2, k2, _ = _run(model, ids, 40)  # not a multiple of 4 on purpose
    for a, b in zip(h1, h2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for a, b in zip(k1, k2):
        assert a.shape == (N // 4, TINY.index_head_dim)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for a, b in zip(l1, l2):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        fin = torch.isfinite(a)
        scale = float(a[fin].abs().max())
        torch.testing.assert_close(a[fin], b[fin], atol=1e-5 * scale, rtol=0)


def test_mask_to_doc():
    logits = torch.arange(12.0).view(3, 4)
    out = mask_to_doc(logits, torch.tensor([3, 7, 9]), 6)
    assert out.shape == (3, 6)
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 2, 2]
    assert out[1, 1] == 5.0


def test_hadamard():
    h = hadamard_matrix(128)
    torch.testing.assert_close(h @ h.T, torch.eye(128), atol=1e-6, rtol=0)
    q, k = torch.randn(5, 128), torch.randn(7, 128)
    torch.testing.assert_close(hadamard_rotate(q) @ hadamard_rotate(k).T, q @ k.T,
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(100)
