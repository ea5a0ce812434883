"""The LSA DeepSeek-V4 model variant for vLLM 0.33 on CUDA (see docs/CUDA.md).

NOT RUN ON A GPU: it was written against vLLM 0.33.0's source and is imported and
unit-tested on CPU only.

- (``core.config_format``: per-layer compression ratios from either config format,
  shared with the KV footprint)
  (0.32 ``compress_ratios``, 0.33 ``compress_rates`` + ``layer_types``);
- ``residency_ops``: Eq. 6 as vLLM's candidate-block filter, K^IComp reads (torch);
- ``scorer``: the Memory Indexer inside the CUDA forward;
- ``model``: ``LSADeepseekV4CUDAForCausalLM`` (imports vLLM's CUDA DeepSeek-V4
  classes; vLLM's registry imports it lazily, on CUDA only).

``register_cuda_variant`` imports none of them: like ``register()``, it is cheap
and runs in every vLLM process.
"""

from __future__ import annotations

from pathlib import Path

from vllm.logger import init_logger

# vLLM's own architecture name, kept (it is string-matched in many places).
from vllm_flashmemory.vllm import MODEL_ARCH

logger = init_logger(__name__)

CUDA_MODEL_VARIANT = "vllm_flashmemory.vllm.cuda.model:LSADeepseekV4CUDAForCausalLM"
# The vLLM release series the variant was written against (major, minor).
SUPPORTED_VLLM_SERIES = (0, 33)
# vLLM's CUDA DeepSeek-V4 model, relative to the vllm package; checked as a file
# so that registering imports no model code (vLLM's registry imports it lazily).
_CUDA_MODEL_FILE = ("models", "deepseek_v4", "nvidia", "model.py")


def _vllm_series(version: str) -> tuple[int, ...] | None:
    parts = version.split(".")[:2]
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def register_cuda_variant() -> bool:
    """Point ``DeepseekV4ForCausalLM`` at the CUDA variant; True if registered now.

    A no-op (debug log) off CUDA, on a vLLM other than 0.33.x, or when vLLM's CUDA
    DeepSeek-V4 module is absent. Idempotent.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        logger.debug(
            "flashmemory: not on CUDA; the CUDA model variant is not registered"
        )
        return False
    import vllm

    version = str(getattr(vllm, "__version__", ""))
    if _vllm_series(version) != SUPPORTED_VLLM_SERIES:
        logger.debug(
            "flashmemory: vllm %s is not %d.%d.x; the CUDA model variant is not "
            "registered",
            version,
            *SUPPORTED_VLLM_SERIES,
        )
        return False
    if not Path(vllm.__file__).parent.joinpath(*_CUDA_MODEL_FILE).is_file():
        logger.debug(
            "flashmemory: vllm/%s is absent; the CUDA model variant is not registered",
            "/".join(_CUDA_MODEL_FILE),
        )
        return False
    from vllm import ModelRegistry

    module_name, _, class_name = CUDA_MODEL_VARIANT.partition(":")
    current = ModelRegistry.models.get(MODEL_ARCH)
    if (
        getattr(current, "module_name", None) == module_name
        and getattr(current, "class_name", None) == class_name
    ):
        return False
    ModelRegistry.register_model(MODEL_ARCH, CUDA_MODEL_VARIANT)
    logger.debug("flashmemory: %s -> %s", MODEL_ARCH, CUDA_MODEL_VARIANT)
    return True


__all__ = ["CUDA_MODEL_VARIANT", "MODEL_ARCH", "register_cuda_variant"]
