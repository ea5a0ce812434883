"""Offline pipeline: harvest -> label -> train -> evaluate (DESIGN.md, "Layers").

Imports core, dsv4 and transformers; never vLLM.
"""

from vllm_flashmemory.offline.labels import golden_labels

__all__ = ["golden_labels"]
