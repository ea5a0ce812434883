"""`LSAConnector`: Lookahead Sparse Attention as a vLLM KV connector.

A thin facade: each hook asserts its role and delegates to `LSAConnectorScheduler`
(scheduler.py: residency planning) or `LSAConnectorWorker` (worker.py: chunk bytes
and the residency map). Selected with
`--kv-transfer-config '{"kv_connector":"LSAConnector","kv_role":"kv_both",
"kv_connector_extra_config":{"lsa.tau":64,...}}'`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.logger import init_logger
from vllm_flashmemory.connectors.residency import ResidencyMap
from vllm_flashmemory.connectors.scheduler import LSAConnectorScheduler
from vllm_flashmemory.connectors.startup import build_lsa_startup
from vllm_flashmemory.connectors.stats import LSAKVConnectorStats, LSAPromMetrics
from vllm_flashmemory.connectors.types import LSAConnectorMetadata, RefreshTarget
from vllm_flashmemory.connectors.worker import LSAConnectorWorker

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import geometry_for

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


class LSAConnector(KVConnectorBase_V1, SupportsHMA):
    """Keep only the CSA chunks the Memory Indexer selects attendable; the rest
    live in an LMCache-backed cold pool."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.connector_scheduler: LSAConnectorScheduler | None = None
        self.connector_worker: LSAConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            startup = build_lsa_startup(vllm_config, kv_cache_config)
            self.connector_scheduler = LSAConnectorScheduler(
                startup.config,
                startup.layout,
                startup.cold_pool.capacity_chunks,
                startup.max_model_len,
                geometry=geometry_for(
                    vllm_config.model_config.hf_config,
                    len(startup.config.indexer_layers),
                ),
            )
            cfg = startup.config
            logger.info_once(
                "LSA: tau=%d decode steps, threshold=%s, %d CSA layers, chunk=%d "
                "tokens (%d bytes), cold pool %.2f GiB = %d chunks; steady-state "
                "maximum concurrency for %s tokens per request: %.2fx.",
                cfg.tau,
                cfg.threshold,
                len(startup.layout.layers),
                cfg.chunk_tokens,
                startup.layout.chunk_bytes,
                cfg.cold_pool_gib,
                startup.cold_pool.capacity_chunks,
                f"{startup.max_model_len:,}",
                startup.max_concurrency,
            )
        elif role == KVConnectorRole.WORKER:
            # The scheduler already refused a bad checkpoint; don't load it twice.
            startup = build_lsa_startup(
                vllm_config, kv_cache_config, check_indexer_checkpoint=False
            )
            layers = startup.layout.layers
            self.connector_worker = LSAConnectorWorker(
                startup.layout,
                startup.cold_pool,
                startup.config.compress_ratio,
                key_cache_names=tuple(
                    layers[i].indexer_cache_name for i in startup.config.indexer_layers
                ),
            )
        else:
            raise ValueError(f"Unsupported KV connector role: {role}")
        self._lsa_config = startup.config

    # ---- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.connector_worker is not None
        self.connector_worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.connector_worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LSAConnectorMetadata)
        self.connector_worker.start_step(metadata)
        # Before the first layer reads the CSA block tables (block return).
        self.connector_worker.apply_block_table_patches(forward_context.attn_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Chunks are stored whole, one step after they complete, in start_load_kv.
        return

    def wait_for_save(self) -> None:
        return

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self.connector_worker is not None
        return self.connector_worker.take_worker_meta()

    def shutdown(self) -> None:
        if self.connector_worker is not None:
            self.connector_worker.shutdown()

    # The model-side seam (vllm_flashmemory/vllm/model_variant.py) reaches these
    # through vllm.distributed.kv_transfer.get_kv_transfer_group().

    @property
    def residency(self) -> ResidencyMap | None:
        return None if self.connector_worker is None else self.connector_worker.residency

    @property
    def memory_indexer_req_ids(self) -> tuple[str, ...]:
        assert self.connector_worker is not None
        return self.connector_worker.refresh_req_ids

    @property
    def memory_indexer_targets(self) -> tuple[RefreshTarget, ...]:
        assert self.connector_worker is not None
        return self.connector_worker.refresh_targets

    @property
    def lsa_config(self) -> LSAConfig:
        return self._lsa_config

    def held_key_blocks(
        self, req_id: str, cache_name: str
    ) -> tuple[int | None, dict[int, torch.Tensor]]:
        """(null block id or None, the request's stored K^IComp blocks by row position)."""
        assert self.connector_worker is not None
        worker = self.connector_worker
        return worker.null_block_id, worker.key_store.blocks(req_id, cache_name)

    def record_memory_indexer_scores(
        self, req_id: str, chunk_scores: tuple[float, ...], num_selected_entries: int = 0
    ) -> None:
        assert self.connector_worker is not None
        self.connector_worker.record_scores(req_id, chunk_scores, num_selected_entries)

    # ---- scheduler side --------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self.connector_scheduler is not None
        self.connector_scheduler.bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        # Not a prefix cache: nothing is ever loaded at admission.
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.track_request(request)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        self.connector_scheduler.request_finished(request)
        return False, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        self.connector_scheduler.request_finished(request)
        return False, None

    # ---- stats -----------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.connector_worker is not None:
            return self.connector_worker.get_kv_connector_stats()
        if self.connector_scheduler is not None:
            return self.connector_scheduler.get_kv_connector_stats()
        return None

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return LSAKVConnectorStats(data=data) if data is not None else LSAKVConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return LSAPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


__all__ = ["LSAConnector"]
