"""Engine-free LSA: config, Memory Indexer, residency planner, cold and hot pools.

Imports torch and triton_ops only (DESIGN.md, "Layers"); LMCache is imported lazily,
only when a LMCache-backed ColdPool is built.
"""

from vllm_flashmemory.core.cold_pool import ColdPool, ColdPoolConfig, ColdPoolFullError
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import Footprint, KVGeometry, request_footprint
from vllm_flashmemory.core.hot_pool import HotPool, HotPoolConfig
from vllm_flashmemory.core.residency_planner import ResidencyPlanner

__all__ = [
    "ColdPool",
    "ColdPoolConfig",
    "ColdPoolFullError",
    "Footprint",
    "HotPool",
    "HotPoolConfig",
    "KVGeometry",
    "LSAConfig",
    "ResidencyPlanner",
    "request_footprint",
]
