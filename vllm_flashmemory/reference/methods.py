"""Generation methods of the reference engine and the paper's proportions at small scale.

Every method keeps the same always-resident set (paper §3.1): HCA, the sliding
window, the sink chunk(s), the CSA chunks of the last `local_window_tokens` of the
prompt and every chunk written during decode. They differ only in which *historical*
CSA chunks (complete prompt chunks outside that set) are resident:

- `full`: all of them (the unmodified model);
- `lsa`: the Memory Indexer's selection (Eq. 4, 5, 13), refreshed at the end of
  prefill and every `tau` decode steps;
- `lsa<pct>` (e.g. `lsa10`): the same refreshes, but by top-K (DESIGN.md "Selection
  by threshold or top-K"): the `pct`% of historical chunks with the highest Memory
  Indexer score (an entry's cross-layer max, a chunk's max over its entries). It
  keeps oracle<pct>'s footprint exactly, so the two rows compare the indexer's
  ranking with the backbone's own;
- `recency`: none;
- `random`: a seeded random `random_fraction` of them, fixed for the request;
- `oracle`: the top `oracle_fraction` by the backbone's own attention mass over its
  full-KV answer (paper §3.3.2), fixed for the request;
- `quest`: Quest-style per-step, per-layer page selection from per-chunk key
  min/max bounds, at a chunk budget matched to what `lsa` kept for the sample.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vllm_flashmemory.core.config import CSA_COMPRESS_RATIO


class Method(enum.Enum):
    FULL = "full"
    LSA = "lsa"
    RECENCY = "recency"
    RANDOM = "random"
    ORACLE = "oracle"
    QUEST = "quest"


# The paper's oracle sweep (§3.3.2): the top 10%, 25% and 50% of chunks.
ORACLE_FRACTIONS: tuple[float, ...] = (0.10, 0.25, 0.50)
# The paper's random control keeps 10% of the historical chunks (§3.1).
RANDOM_FRACTION = 0.10


@dataclass(frozen=True)
class MethodSpec:
    """One generation method with its parameter; `label` names it in tables."""

    method: Method
    # Fraction of historical chunks kept by `random` / `oracle` / top-K `lsa`; None
    # otherwise (plain `lsa` selects by threshold).
    fraction: float | None = None
    # Historical chunks `quest` may pick per step and layer; None = match `lsa`
    # (the engine's caller resolves it per sample before generating).
    quest_budget_chunks: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method):
            raise TypeError(
                f"MethodSpec.method={self.method!r} must be a Method; parse names "
                "with parse_methods()."
            )
        needs_fraction = self.method in (Method.RANDOM, Method.ORACLE)
        if needs_fraction or (self.method is Method.LSA and self.fraction is not None):
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (
                0.0 < f <= 1.0
            ):
                raise ValueError(
                    f"MethodSpec({self.method.value}).fraction={f!r} must lie in "
                    "(0, 1]; use 0.1 for random, 0.1/0.25/0.5 for oracle, "
                    "e.g. 0.1 for top-K lsa."
                )
        elif self.fraction is not None:
            raise ValueError(
                f"MethodSpec({self.method.value}).fraction={self.fraction!r} is only "
                "meaningful for random, oracle and top-K lsa; leave it None."
            )
        if self.quest_budget_chunks is not None:
            b = self.quest_budget_chunks
            if self.method is not Method.QUEST:
                raise ValueError(
                    f"quest_budget_chunks={b!r} is only meaningful for quest."
                )
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(
                    f"quest_budget_chunks={b!r} must be a non-negative integer "
                    "number of historical chunks per step and layer."
                )

    @property
    def top_k(self) -> bool:
        """True for `lsa<pct>`: the Memory Indexer picks a fixed share by rank."""
        return self.method is Method.LSA and self.fraction is not None

    @property
    def label(self) -> str:
        if self.method is Method.ORACLE or self.top_k:
            assert self.fraction is not None
            return f"{self.method.value}{round(self.fraction * 100)}"
        return self.method.value


def parse_methods(text: str) -> tuple[MethodSpec, ...]:
    """`full,lsa,lsa10,oracle,oracle25` -> specs; bare `oracle` expands to 10/25/50%,
    `lsa<pct>` is top-K lsa at pct% of the historical chunks."""
    specs: list[MethodSpec] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        prefix = next((m for m in (Method.ORACLE, Method.LSA)
                       if raw.startswith(m.value) and raw != m.value), None)
        if prefix is not None:
            pct = raw[len(prefix.value) :]
            if not pct.isdigit() or not 0 < int(pct) <= 100:
                raise ValueError(
                    f"method {raw!r}: write {prefix.value}<percent> with a percent "
                    f"in 1..100 (e.g. {prefix.value}10), or plain '{prefix.value}' "
                    + ("for 10, 25 and 50." if prefix is Method.ORACLE
                       else "to select by threshold.")
                )
            specs.append(MethodSpec(prefix, int(pct) / 100))
            continue
        try:
            method = Method(raw)
        except ValueError:
            names = ", ".join(m.value for m in Method)
            raise ValueError(
                f"unknown method {raw!r}; use a comma-separated list of {names} "
                "(oracle and lsa accept a percent suffix, e.g. oracle25, lsa10)."
            ) from None
        if method is Method.ORACLE:
            specs.extend(MethodSpec(method, f) for f in ORACLE_FRACTIONS)
        elif method is Method.RANDOM:
            specs.append(MethodSpec(method, RANDOM_FRACTION))
        else:
            specs.append(MethodSpec(method))
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise ValueError(
            f"--methods {text!r} must name at least one method, each once "
            f"(got {labels})."
        )
    return tuple(specs)


@dataclass(frozen=True)
class ScaledWindow:
    """The paper's local window and chunk, scaled to a context length (DESIGN.md)."""

    context_tokens: int
    # Always-resident prompt tail: the paper's 8K of a 64K RULER context = 1/8.
    local_window_tokens: int
    # Residency unit: the paper's 256 tokens of a 64K context = 1/256, so a request
    # keeps the paper's ~256 chunks; at least 16 tokens (4 compressed entries).
    chunk_tokens: int

    def describe(self) -> str:
        return (
            f"context {self.context_tokens} tokens: local window "
            f"{self.local_window_tokens} tokens, chunk {self.chunk_tokens} tokens "
            f"({self.chunk_tokens // CSA_COMPRESS_RATIO} entries)"
        )


# The paper's reference point: RULER at 64K with an 8K local window, 256-token chunks.
PAPER_CONTEXT_TOKENS = 65536
PAPER_LOCAL_WINDOW_TOKENS = 8192
PAPER_CHUNK_TOKENS = 256
MIN_CHUNK_TOKENS = 16


def scaled_window(
    context_tokens: int,
    local_window_tokens: int | None = None,
    chunk_tokens: int | None = None,
) -> ScaledWindow:
    """Local window and chunk for `context_tokens`, in the paper's proportions.

    Either one given is used as is at every length instead: the paper's own protocol
    keeps a fixed 8K window and 256-token chunk from 46K to 512K tokens, so fixed
    values divided by the scale-down (1,024 and 32 for 8K-32K standing for 64K-256K)
    let the always-resident share shrink with the context as it does there.
    """
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or (
        context_tokens < 1
    ):
        raise ValueError(
            f"context_tokens={context_tokens!r} must be a positive integer."
        )
    if local_window_tokens is not None or chunk_tokens is not None:
        auto = scaled_window(context_tokens)
        return ScaledWindow(
            context_tokens,
            auto.local_window_tokens if local_window_tokens is None else local_window_tokens,
            auto.chunk_tokens if chunk_tokens is None else chunk_tokens,
        )
    if context_tokens >= PAPER_CONTEXT_TOKENS:
        return ScaledWindow(
            context_tokens, PAPER_LOCAL_WINDOW_TOKENS, PAPER_CHUNK_TOKENS
        )
    local = context_tokens * PAPER_LOCAL_WINDOW_TOKENS // PAPER_CONTEXT_TOKENS
    chunk = context_tokens * PAPER_CHUNK_TOKENS // PAPER_CONTEXT_TOKENS
    # Round the chunk down to a power of two (a whole number of entries).
    chunk = max(MIN_CHUNK_TOKENS, 1 << max(0, chunk.bit_length() - 1))
    return ScaledWindow(context_tokens, max(chunk, local), chunk)


__all__ = [
    "Method",
    "MethodSpec",
    "ORACLE_FRACTIONS",
    "RANDOM_FRACTION",
    "ScaledWindow",
    "parse_methods",
    "scaled_window",
]
