"""The vLLM plugin: ``register()``, the ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (front end, engine core,
each worker), possibly more than once, so every registration is guarded and
nothing heavy is imported at module import time (STYLE A2).

It registers:
- the KV connector name ``LSAConnector`` (lazy: the module is imported only
  when a ``--kv-transfer-config`` names it);
- the LSA DeepSeek-V4 model variant (hook below; not built yet);
- on CPU without triton-cpu only, the DeepSeek-V4 overrides of ``.cpu``.
"""

from vllm.logger import init_logger

logger = init_logger(__name__)

CONNECTOR_NAME = "LSAConnector"
CONNECTOR_MODULE = "vllm_flashmemory.connectors.lsa_connector"
CONNECTOR_CLASS = "LSAConnector"

# The architecture name stays vLLM's: many code paths string-match it.
MODEL_ARCH = "DeepseekV4ForCausalLM"
# MODEL VARIANT HOOK: set to "vllm_flashmemory.vllm.model:<Class>" once the LSA
# DeepSeek-V4 variant exists; register() then points MODEL_ARCH at it lazily.
MODEL_VARIANT: str | None = None


def register() -> None:
    """Register the connector, the model variant and the CPU overrides."""
    _register_connector()
    _register_model_variant()
    _register_cpu_overrides()


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS
        )
    except ValueError:
        # The factory raises on a second registration: already done here.
        logger.debug("%s is already registered", CONNECTOR_NAME)


def _register_model_variant() -> None:
    if MODEL_VARIANT is None:
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


def _register_cpu_overrides() -> None:
    from vllm_flashmemory.vllm.cpu import register_cpu_overrides

    register_cpu_overrides()
