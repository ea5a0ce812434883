"""LSAConfig: the one configuration boundary of Lookahead Sparse Attention.

Every `lsa.*` key of vLLM's `kv_connector_extra_config`, every CLI flag and every
engine-free component reads its values from this frozen dataclass. Validation runs
at construction, so a bad value stops the server before any work starts, with an
error that names the key, the value, the rule and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Routing = Literal["or", "mean"]

# DeepSeek-V4-Flash: CSA layers are decoder layers 2, 4, ..., 42; the paper's indexer
# layers 10, 12, 20 are indices among those 21 CSA layers (decoder layers 22, 26, 42).
FLASH_INDEXER_LAYERS: tuple[int, ...] = (10, 12, 20)
CSA_COMPRESS_RATIO = 4  # m of CSA: 4 tokens per compressed entry


@dataclass(frozen=True)
class LSAConfig:
    """Lookahead Sparse Attention settings (paper §2.1, §2.4; DESIGN.md "Naming")."""

    # Memory Indexer refresh interval in decode steps (τ, paper §2.1).
    tau: int = 64
    # Selection threshold on the sigmoid score I_{t,s} (Eq. 5); 0 keeps every chunk.
    # from_extra_config without 'lsa.threshold' takes the indexer checkpoint's
    # calibration (`flashmemory train --target-resident`) when it has one.
    threshold: float = 0.5
    # Indices among the model's CSA layers that carry a Memory Indexer (Eq. 13).
    indexer_layers: tuple[int, ...] = FLASH_INDEXER_LAYERS
    # Cross-layer ensemble: "or" = union of per-layer selections (Eq. 13, max of
    # scores), "mean" = threshold on the mean score over layers.
    routing: Routing = "or"
    # Always-resident tail of the prompt: the CSA chunks covering its last tokens.
    local_window_tokens: int = 8192
    # Tokens per CSA chunk, the unit of residency (one vLLM compressed-cache block).
    chunk_tokens: int = 256
    # Always-resident attention-sink chunks at the start of the prompt.
    sink_chunks: int = 1
    # Pinned host memory for the cold pool, per engine.
    cold_pool_gib: float = 16.0
    # Memory Indexer checkpoint directory (safetensors + JSON); None = untrained.
    indexer_path: str | None = None
    # Optional cap on selected historical chunks per request (highest scores kept).
    max_selected_chunks: int | None = None
    # The same cap as a share of the request's historical chunks, max(1, round(f * H));
    # with a low threshold (e.g. 0.001) it is top-K selection, `lsa<pct>` of eval.
    # Both caps set: the smaller wins.
    max_selected_fraction: float | None = None
    # A selection covering more than this fraction of a request's historical
    # chunks keeps the request fully resident: offloading it saves too little.
    fallback_selected_fraction: float = 1.0
    # CSA compression ratio m (entries per token window); 4 for every DeepSeek-V4.
    compress_ratio: int = CSA_COMPRESS_RATIO

    # Keys of kv_connector_extra_config, each mapped to its field.
    EXTRA_CONFIG_PREFIX = "lsa."

    def __post_init__(self) -> None:
        object.__setattr__(self, "indexer_layers", tuple(self.indexer_layers))
        _check_int("tau", self.tau, minimum=1, fix="use the paper's 64")
        if isinstance(self.threshold, bool) or not isinstance(
            self.threshold, (int, float)
        ):
            raise TypeError(
                f"'lsa.threshold'={self.threshold!r} must be a number in [0, 1]; "
                "use 0.5 (the paper's value) or 0 to keep every chunk resident."
            )
        if not (0.0 <= float(self.threshold) <= 1.0) or math.isnan(self.threshold):
            raise ValueError(
                f"'lsa.threshold'={self.threshold!r} must lie in [0, 1] because it "
                "thresholds a sigmoid score; use 0.5 (the paper's value) or 0 to "
                "keep every chunk resident."
            )
        if len(self.indexer_layers) == 0:
            raise ValueError(
                "'lsa.indexer_layers'=[] must name at least one CSA layer index; "
                "use [10, 12, 20] for DeepSeek-V4-Flash."
            )
        for layer in self.indexer_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(
                    f"'lsa.indexer_layers'={list(self.indexer_layers)!r} holds "
                    f"{layer!r}; every entry must be a non-negative index among "
                    "the model's CSA layers (0 = first CSA layer)."
                )
        if len(set(self.indexer_layers)) != len(self.indexer_layers):
            raise ValueError(
                f"'lsa.indexer_layers'={list(self.indexer_layers)!r} repeats a "
                "layer; list each CSA layer index once."
            )
        if self.routing not in ("or", "mean"):
            raise ValueError(
                f"'lsa.routing'={self.routing!r} is not a routing mode; use 'or' "
                "(union over layers, Eq. 13) or 'mean'."
            )
        _check_int("compress_ratio", self.compress_ratio, minimum=1, fix="use 4")
        _check_int(
            "chunk_tokens",
            self.chunk_tokens,
            minimum=self.compress_ratio,
            fix="use 256 (one vLLM compressed-cache block)",
        )
        if self.chunk_tokens % self.compress_ratio != 0:
            good = _round_up(self.chunk_tokens, self.compress_ratio)
            raise ValueError(
                f"'lsa.chunk_tokens'={self.chunk_tokens} must be a multiple of the "
                f"CSA compression ratio ({self.compress_ratio}) so a chunk holds "
                f"whole compressed entries; use {good} instead."
            )
        _check_int(
            "local_window_tokens",
            self.local_window_tokens,
            minimum=0,
            fix="use 8192 (the paper's local window)",
        )
        _check_int("sink_chunks", self.sink_chunks, minimum=0, fix="use 1")
        if isinstance(self.cold_pool_gib, bool) or not isinstance(
            self.cold_pool_gib, (int, float)
        ) or not self.cold_pool_gib > 0:
            raise ValueError(
                f"'lsa.cold_pool_gib'={self.cold_pool_gib!r} must be a positive "
                "number of GiB of pinned host memory; size it for the longest "
                "contexts you serve (see docs/ARCHITECTURE.md)."
            )
        if self.max_selected_chunks is not None:
            _check_int(
                "max_selected_chunks",
                self.max_selected_chunks,
                minimum=1,
                fix="use null for no cap",
            )
        cap = self.max_selected_fraction
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 < cap <= 1.0
        ):
            raise ValueError(
                f"'lsa.max_selected_fraction'={cap!r} must lie in (0, 1]; e.g. 0.05 keeps "
                "the 5% of historical chunks the Memory Indexer scores highest, or null "
                "for no cap."
            )
        frac = self.fallback_selected_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (
            0.0 < frac <= 1.0
        ):
            raise ValueError(
                f"'lsa.fallback_selected_fraction'={frac!r} must lie in (0, 1]; use "
                "1.0 to never fall back, or e.g. 0.5 to keep a request fully "
                "resident when half its history is selected anyway."
            )
        if self.indexer_path is not None and not isinstance(self.indexer_path, str):
            raise TypeError(
                f"'lsa.indexer_path'={self.indexer_path!r} must be a directory path "
                "string holding a Memory Indexer checkpoint."
            )

    # ---- derived quantities ------------------------------------------------------

    @property
    def entries_per_chunk(self) -> int:
        """Compressed CSA entries in one chunk (64 for 256 tokens at m = 4)."""
        return self.chunk_tokens // self.compress_ratio

    @property
    def local_window_chunks(self) -> int:
        """Chunks that cover the last `local_window_tokens` of a prompt."""
        return -(-self.local_window_tokens // self.chunk_tokens)

    # ---- the kv_connector_extra_config boundary ---------------------------------

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> LSAConfig:
        """Read every `lsa.*` key once; unknown `lsa.*` keys are an error. Without
        'lsa.threshold', a calibrated indexer checkpoint sets the threshold."""
        extra = dict(extra or {})
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in extra.items():
            if not key.startswith(cls.EXTRA_CONFIG_PREFIX):
                continue  # other connectors' keys (e.g. lmcache.*) are not ours
            name = key[len(cls.EXTRA_CONFIG_PREFIX) :]
            if name not in known:
                close = sorted(known, key=lambda k: _edit_distance(k, name))[0]
                raise ValueError(
                    f"'{key}' in kv_connector_extra_config is not an LSA setting; "
                    f"did you mean 'lsa.{close}'? Known keys: "
                    f"{', '.join('lsa.' + k for k in sorted(known))}."
                )
            kwargs[name] = value
        if "indexer_layers" in kwargs:
            layers = kwargs["indexer_layers"]
            if isinstance(layers, str):
                layers = [int(x) for x in layers.replace(" ", "").split(",") if x]
            if not isinstance(layers, (list, tuple)):
                raise TypeError(
                    f"'lsa.indexer_layers'={layers!r} must be a list of CSA layer "
                    "indices such as [10, 12, 20]."
                )
            kwargs["indexer_layers"] = tuple(layers)
        if "threshold" not in kwargs and kwargs.get("indexer_path"):
            from vllm_flashmemory.core.memory_indexer import read_calibration

            calibration = read_calibration(kwargs["indexer_path"])
            if calibration is not None:
                kwargs["threshold"] = float(calibration["threshold"])
        return cls(**kwargs)

    def to_extra_config(self) -> dict[str, Any]:
        """The inverse of `from_extra_config`, for building --kv-transfer-config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            out[self.EXTRA_CONFIG_PREFIX + f.name] = value
        return out

    def replace(self, **changes: Any) -> LSAConfig:
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: Any, *, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'lsa.{name}'={value!r} must be an integer; {fix}.")
    if value < minimum:
        raise ValueError(
            f"'lsa.{name}'={value} must be at least {minimum}; {fix}."
        )


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


__all__ = ["LSAConfig", "FLASH_INDEXER_LAYERS", "CSA_COMPRESS_RATIO", "Routing"]
