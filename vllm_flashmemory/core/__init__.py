"""Engine-free LSA: config, Memory Indexer, residency planner, cold and hot pools.

Imports torch and triton_ops only (DESIGN.md, "Layers").
"""

from vllm_flashmemory.core.config import LSAConfig

__all__ = ["LSAConfig"]
