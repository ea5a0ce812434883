"""Startup checks and glue of the CUDA variant that need no vLLM model code.

Kept apart from ``model`` (which imports vLLM's CUDA DeepSeek-V4 classes) so they
import, and are tested, anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm_flashmemory.vllm import CONNECTOR_NAME

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def check_lsa_cuda_support(vllm_config: VllmConfig) -> None:
    """Refuse, before serving, what the CUDA variant does not handle."""
    parallel = vllm_config.parallel_config
    dcp = int(getattr(parallel, "decode_context_parallel_size", 1) or 1)
    if dcp != 1:
        raise ValueError(
            f"--decode-context-parallel-size={dcp} is not supported with "
            f"{CONNECTOR_NAME}: vLLM's candidate-block filter, which restricts the "
            "native top-k to resident chunks (Eq. 6), needs 1; drop the flag."
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError(
            f"--speculative-config is not supported with {CONNECTOR_NAME} on CUDA: "
            "the resident-only top-k is built for one query token per decode "
            "request; drop the speculative config."
        )


def rebind_custom_op_forward(op: Any) -> None:
    """Bind a CustomOp's dispatched forward again after its ``__class__`` changed.

    ``CustomOp.__init__`` stores a bound method (``forward_cuda``, or
    ``forward_native`` when the op is disabled) in ``_forward_method``; after a
    class swap it would still call the old class's method.
    """
    name = getattr(op._forward_method, "__name__", "")
    op._forward_method = getattr(
        op, name if name.startswith("forward_") else "forward_cuda"
    )


__all__ = ["check_lsa_cuda_support", "rebind_custom_op_forward"]
