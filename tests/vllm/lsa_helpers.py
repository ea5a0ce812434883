"""Shared helpers of the LSA engine tests: test checkpoints, prompts, configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "artifacts" / "tiny"
# The tiny model's 4 CSA layers (decoder layers 2, 4, 6, 8).
TINY_CSA_LAYERS = (0, 1, 2, 3)


def ensure_tiny_model() -> Path:
    """artifacts/tiny, built by make-tiny (seed 0, ~15 s) when absent."""
    if not (TINY_MODEL / "config.json").is_file():
        from vllm_flashmemory.offline.tiny_model import make_tiny

        make_tiny(str(TINY_MODEL), seed=0)
    return TINY_MODEL


def write_random_indexer(path: Path, seed: int = 0, sharpness: float = 1.0) -> Path:
    """A seeded, untrained Memory Indexer for the tiny model (CSA layers 0-3).

    Untrained scores sit near 0.5 and differ slightly per entry and per query, so
    with `lsa.max_selected_chunks` the top chunks change as the query moves: the
    engine offloads and fetches back. It tests the mechanism, not selection
    quality. `sharpness` scales W_w (the head weights of Eq. 3).
    """
    from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    torch.manual_seed(seed)
    config = MemoryIndexerConfig.preset("tiny", n_heads=64, layer_ids=TINY_CSA_LAYERS)
    model = MemoryIndexer(config)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.weights_proj.weight.mul_(sharpness)
    return model.save(path)


def lsa_extra(indexer: Path | None, **overrides: Any) -> dict[str, Any]:
    """lsa.* keys scaled for the tiny model at 4K-16K tokens."""
    extra: dict[str, Any] = {
        "lsa.tau": 8,
        "lsa.threshold": 0.5,
        "lsa.indexer_layers": list(TINY_CSA_LAYERS),
        "lsa.local_window_tokens": 1024,
        "lsa.chunk_tokens": 256,
        "lsa.cold_pool_gib": 0.25,
    }
    if indexer is not None:
        extra["lsa.indexer_path"] = str(indexer)
    extra.update({f"lsa.{k}": v for k, v in overrides.items()})
    return extra


def kv_transfer_config(extra: dict[str, Any]) -> str:
    return json.dumps(
        {
            "kv_connector": "LSAConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        }
    )


def long_prompt_text(n_tokens: int) -> str:
    """Text of ~n_tokens tokens for the byte-level tokenizer (1 byte = 1 token)."""
    words = [
        "the",
        "memory",
        "indexer",
        "looks",
        "ahead",
        "and",
        "keeps",
        "only",
        "the",
        "chunks",
        "that",
        "the",
        "next",
        "tokens",
        "will",
        "need",
        "while",
        "the",
        "rest",
        "of",
        "the",
        "context",
        "waits",
        "in",
        "the",
        "cold",
        "pool",
    ]
    out, i = [], 0
    while sum(len(w) + 1 for w in out) < n_tokens:
        out.append(f"{words[i % len(words)]}{i % 97}")
        i += 1
    return " ".join(out)[:n_tokens]


def prompt_token_ids(n_tokens: int) -> list[int]:
    return [(i * 7) % 250 + 3 for i in range(n_tokens)]
