"""ReferenceEngine: greedy generation with LSA on a transformers DeepSeek-V4 model.

One request at a time, batch 1, fp32, on the device the model sits on (CPU or one
CUDA GPU; every tensor the engine, cache and hooks make is created there, and the
ColdPool always holds its chunks in host memory):

1. `prefill` feeds the prompt through an `LSACache` in chunks (one-call prefill is
   quadratic in transformers, notes/deepseek_v4.md §7). Every chunk is resident
   during prefill, so the first generated token is the same for every method.
2. `generate` copies that cache, registers the request with a `ResidencyPlanner`
   and stores every historical chunk (complete prompt chunks outside the
   always-resident set) in a `ColdPool`, with device copies in `HotPool` slots.
3. At the end of prefill and every `tau` decode steps the planner refreshes: the
   method proposes a selection (for `lsa`, the Memory Indexer's Eq. 4-5-13 over
   h_t entering each indexer layer's attention and that layer's Hadamard-rotated
   K^IComp), and the plan's evictions drop chunks out of the cache (entries
   overwritten, excluded from the native top-k and from attention) while its
   fetches copy bytes ColdPool -> HotPool slot -> cache.
4. Greedy decode until EOS or `max_new_tokens`. After each refresh and before each
   decode forward the engine records the request's footprint through
   `request_footprint` (DESIGN.md "Footprint"); the result holds their mean.

The refresh query is the last processed token's hidden state (position t - 1 for a
refresh before the forward of token t), because residency must be decided before
the forward that reads it, as in the vLLM connector.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DeepseekV4ForCausalLM

from vllm_flashmemory.core.cold_pool import ColdPool, ColdPoolConfig
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import (
    Footprint,
    KVGeometry,
    geometry_for,
    request_footprint,
)
from vllm_flashmemory.core.hot_pool import HotPool, HotPoolConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, combine_layers, select
from vllm_flashmemory.core.residency_planner import (
    RefreshPlan,
    ResidencyPlanner,
    chunk_scores_from_entries,
    keep_count,
)
from vllm_flashmemory.core.rotation import hadamard_matrix, hadamard_rotate
from vllm_flashmemory.reference.cache import LSACache, csa_layer_ids
from vllm_flashmemory.reference.hooks import QuestState, ResidencyHooks
from vllm_flashmemory.reference.methods import Method, MethodSpec

logger = logging.getLogger(__name__)

_REQ = "req"
_GIB = 1 << 30
# Threshold of the fixed-selection methods (random, oracle, recency), whose chunk
# scores are 1.0 (keep) or 0.0 (drop): any value in (0, 1] separates them.
_FIXED_THRESHOLD = 0.5
# Threshold of top-K lsa (`lsa<pct>`): every chunk the Memory Indexer scores above
# zero is a candidate and the planner's cap (max_selected_fraction) keeps the K best;
# 0 itself would mean "keep everything, no cap".
_TOP_K_THRESHOLD = 1e-30


@dataclass(frozen=True)
class EngineConfig:
    """Reference-engine settings; LSA values come from the one LSAConfig."""

    # tau, threshold, routing, indexer_layers, local_window_tokens, chunk_tokens,
    # sink_chunks of every method (only lsa reads threshold and routing).
    lsa: LSAConfig
    # Prompt tokens per prefill forward through the cache.
    prefill_chunk_tokens: int = 1024
    # Greedy decode stops after this many tokens (or at EOS).
    max_new_tokens: int = 32
    # Seed of the `random` method's chunk draw.
    seed: int = 0
    # Value written over the entries of an evicted chunk (tests poison them).
    cold_fill: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.lsa, LSAConfig):
            raise TypeError(f"EngineConfig.lsa={self.lsa!r} must be an LSAConfig.")
        for name in ("prefill_chunk_tokens", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"EngineConfig.{name}={v!r} must be a positive integer."
                )


@dataclass
class PrefillState:
    """A prefilled prompt, shared by every method of one sample."""

    cache: LSACache
    prompt_tokens: int
    first_token: int
    # Per CSA slot: hidden input of the last prompt token, [D].
    hidden: list[torch.Tensor | None]
    # [T] attention mass of the last prompt token per compressed entry.
    attention_mass: torch.Tensor
    seconds: float


@dataclass(frozen=True)
class GenerationResult:
    """One greedy generation and its footprint (means over recorded steps)."""

    label: str
    tokens: tuple[int, ...]
    # Footprint after each refresh / before each decode forward.
    footprints: tuple[Footprint, ...]
    historical_chunks: int
    # Historical chunks resident, mean over recorded steps.
    mean_selected_chunks: float
    refreshes: int
    fetched_chunks: int
    evicted_chunks: int
    # Decode wall time (prefill excluded; see PrefillState.seconds).
    seconds: float
    # Per chunk: the full-KV answer's attention mass (full method only), else None.
    chunk_attention_mass: tuple[float, ...] | None = None

    @property
    def resident_chunk_ratio(self) -> float:
        return _mean([f.resident_chunk_ratio for f in self.footprints])

    @property
    def resident_chunks(self) -> float:
        return _mean([f.resident_chunks for f in self.footprints])

    @property
    def total_chunks(self) -> float:
        return _mean([f.total_chunks for f in self.footprints])

    @property
    def kv_bytes_gpu(self) -> float:
        return _mean([f.kv_bytes_gpu for f in self.footprints])

    @property
    def kv_bytes_full(self) -> float:
        return _mean([f.kv_bytes_full for f in self.footprints])


class ReferenceEngine:
    """LSA and its baselines on a transformers DeepSeek-V4 model (see module doc)."""

    def __init__(
        self,
        model: DeepseekV4ForCausalLM,
        config: EngineConfig,
        indexer: MemoryIndexer | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config
        # Everything the engine makes lives where the model's weights are.
        self.device = next(model.parameters()).device
        # The Memory Indexer scores on the model's device (moved in place).
        self.indexer = None if indexer is None else indexer.to(self.device).eval()
        n_csa = len(csa_layer_ids(model.config))
        bad = [i for i in config.lsa.indexer_layers if i >= n_csa]
        if bad:
            raise ValueError(
                f"'lsa.indexer_layers'={list(config.lsa.indexer_layers)} names "
                f"{bad}, but the model has {n_csa} CSA layers (0..{n_csa - 1}); "
                "use the indexer checkpoint's layer_ids."
            )
        if indexer is not None:
            ids = tuple(indexer.config.layer_ids)
            if ids != tuple(config.lsa.indexer_layers):
                raise ValueError(
                    f"'lsa.indexer_layers'={list(config.lsa.indexer_layers)} differs "
                    f"from the Memory Indexer checkpoint's layer_ids {list(ids)}; set "
                    "them equal (the checkpoint is trained on those layers)."
                )
            if indexer.config.hidden_size != model.config.hidden_size:
                raise ValueError(
                    f"Memory Indexer hidden_size={indexer.config.hidden_size} but the "
                    f"model's is {model.config.hidden_size}; train the indexer on "
                    "this model's harvest."
                )
        self.geometry = geometry_for(model.config, len(config.lsa.indexer_layers))
        self.eos_token_id = model.config.eos_token_id
        self.hooks = ResidencyHooks(model)
        self.hooks.__enter__()
        logger.info(
            "ReferenceEngine on %s: ColdPool backend 'torch' (host memory), HotPool "
            "and cache on %s", self.device, self.device,
        )

    def close(self) -> None:
        self.hooks.__exit__(None, None, None)

    def __enter__(self) -> ReferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- prefill ----------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int]) -> PrefillState:
        """Chunked prefill through a fresh LSACache, everything resident."""
        cfg = self.config
        n = len(prompt_ids)
        if n < 1:
            raise ValueError("prompt_ids is empty; pass at least one token.")
        t0 = time.perf_counter()
        cache = LSACache(
            self.model.config,
            chunk_tokens=cfg.lsa.chunk_tokens,
            memory_indexer_slots=cfg.lsa.indexer_layers,
            cold_fill=cfg.cold_fill,
        )
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)[None]
        # ids: [1, N]
        st = self.hooks.state
        st.active, st.quest = False, None
        st.attention_mass = torch.zeros(0, device=self.device)
        self.hooks.current_cache = cache
        logits = None
        for start in range(0, n, cfg.prefill_chunk_tokens):
            end = min(n, start + cfg.prefill_chunk_tokens)
            last = end == n
            st.record_hidden = st.record_attention = last
            out = self.model(
                input_ids=ids[:, start:end],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits
        st.record_hidden = st.record_attention = False
        assert logits is not None
        return PrefillState(
            cache=cache,
            prompt_tokens=n,
            first_token=int(logits[0, -1].argmax()),  # syncs: seconds is real
            hidden=list(st.hidden),
            attention_mass=st.attention_mass.clone(),
            seconds=time.perf_counter() - t0,
        )

    # ---- generation -------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prefill: PrefillState,
        spec: MethodSpec,
        *,
        oracle_chunk_mass: Sequence[float] | None = None,
        max_new_tokens: int | None = None,
        record_attention: bool = False,
    ) -> GenerationResult:
        """Greedy tokens of `spec` from a prefilled prompt (its cache is copied)."""
        cfg = self.config
        limit = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        method = spec.method
        if method is Method.LSA and self.indexer is None:
            raise ValueError(
                "method 'lsa' needs a Memory Indexer; pass --indexer DIR (a "
                "checkpoint from `flashmemory train` or `flashmemory demo`)."
            )
        if method is Method.ORACLE and oracle_chunk_mass is None:
            raise ValueError(
                "method 'oracle' needs the full-KV answer's attention mass per "
                "chunk; run the full method with record_attention=True first."
            )
        if method is Method.QUEST and spec.quest_budget_chunks is None:
            raise ValueError(
                "method 'quest' needs quest_budget_chunks (match it to lsa's mean "
                "selected chunks for the sample)."
            )
        t0 = time.perf_counter()
        cache: LSACache = copy.deepcopy(prefill.cache)
        planner = ResidencyPlanner(self._planner_config(spec), self.geometry)
        planner.add_request(_REQ, prefill.prompt_tokens)
        historical = planner.historical_chunks(_REQ)
        cold, hot = self._pools(cache, planner.total_chunks(_REQ), len(historical))
        try:
            # Every historical chunk is stored in the cold pool at the end of prefill;
            # its device copy sits in a hot slot until evicted.
            if historical:
                data = cache.pack_chunks(historical)  # [H, chunk_bytes], device
                cold.reserve(_REQ, len(historical))
                cold.batched_put(_REQ, historical, data)  # D2H into host memory
                slots = hot.batched_allocate(_REQ, historical)
                assert slots is not None, "the hot pool has a slot per chunk"
                hot.buffer.index_copy_(0, hot.slots_for(_REQ, historical), data)
            fixed = self._fixed_scores(spec, planner, oracle_chunk_mass)
            st = self.hooks.state
            self.hooks.current_cache = cache
            st.hidden = list(prefill.hidden)
            st.record_hidden = method is Method.LSA
            st.record_attention = record_attention
            st.attention_mass = prefill.attention_mass.clone()
            st.active = True
            st.quest = None
            counts = _Counts()
            self._refresh(planner, cache, cold, hot, method, fixed, counts)
            tokens = [prefill.first_token]
            footprints: list[Footprint] = []
            selected: list[int] = []
            ids = torch.tensor([[tokens[-1]]], dtype=torch.long, device=self.device)
            while len(tokens) < limit and tokens[-1] != self.eos_token_id:
                if method is Method.QUEST:
                    st.quest = QuestState(historical, spec.quest_budget_chunks or 0)
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
                # Footprint of the residency this forward read.
                fp, n_sel = self._footprint(planner, method, st.quest, historical)
                footprints.append(fp)
                selected.append(n_sel)
                # The next input stays on the device; the host copy (the one sync
                # per token) is needed for the EOS test.
                ids = out.logits[0, -1].argmax().view(1, 1)  # [1, 1]
                tokens.append(int(ids))
                planner.append_tokens(_REQ, 1)
                if planner.needs_refresh(_REQ):
                    self._refresh(planner, cache, cold, hot, method, fixed, counts)
            if not footprints:  # answered by the prefill's token alone
                fp, n_sel = self._footprint(planner, method, None, historical)
                footprints.append(fp)
                selected.append(n_sel)
            mass = None
            if record_attention:
                mass = tuple(_chunk_sums(st.attention_mass, cache.entries_per_chunk))
        finally:
            st = self.hooks.state
            st.active, st.quest = False, None
            st.record_hidden = st.record_attention = False
            self.hooks.current_cache = None
            if _REQ in planner:
                planner.finish(_REQ)
            hot.free_request(_REQ)
            if cold.has_request(_REQ):
                cold.free_request(_REQ)
            cold.close()
        return GenerationResult(
            label=spec.label,
            tokens=tuple(tokens),
            footprints=tuple(footprints),
            historical_chunks=len(historical),
            mean_selected_chunks=_mean(selected),
            refreshes=counts.refreshes,
            fetched_chunks=counts.fetched,
            evicted_chunks=counts.evicted,
            seconds=time.perf_counter() - t0,
            chunk_attention_mass=mass,
        )

    # ---- internals --------------------------------------------------------------

    def _planner_config(self, spec: MethodSpec) -> LSAConfig:
        lsa = self.config.lsa
        method = spec.method
        if method in (Method.FULL, Method.QUEST):
            # Everything stays in the cache; quest masks per step inside the forward.
            threshold = 0.0
        elif spec.top_k:
            threshold = _TOP_K_THRESHOLD
        elif method is Method.LSA:
            threshold = lsa.threshold
        else:
            threshold = _FIXED_THRESHOLD
        return lsa.replace(
            threshold=threshold, max_selected_chunks=None,
            max_selected_fraction=spec.fraction if spec.top_k else None,
            fallback_selected_fraction=1.0,
        )

    def _pools(
        self, cache: LSACache, total_chunks: int, historical: int
    ) -> tuple[ColdPool, HotPool]:
        chunk_bytes = cache.chunk_bytes
        # Room for this request's historical chunks (plus alignment slack).
        gib = max(1, historical) * (chunk_bytes + 64) * 1.01 / _GIB
        # The torch backend: the reference engine never needs LMCache (and runs
        # where it is not installed); chunks live in host memory, pinned on CUDA.
        cold = ColdPool(ColdPoolConfig(capacity_gib=gib, chunk_bytes=chunk_bytes,
                                       backend="torch"))
        hot = HotPool(HotPoolConfig(num_slots=max(1, total_chunks),
                                    chunk_bytes=chunk_bytes, device=self.device))
        return cold, hot

    def _fixed_scores(
        self,
        spec: MethodSpec,
        planner: ResidencyPlanner,
        oracle_chunk_mass: Sequence[float] | None,
    ) -> torch.Tensor | None:
        """Chunk scores (1 keep, 0 drop) of the fixed-selection methods; else None."""
        method = spec.method
        if method not in (Method.RECENCY, Method.RANDOM, Method.ORACLE):
            return None
        n_chunks = planner.total_chunks(_REQ)
        historical = list(planner.historical_chunks(_REQ))
        scores = torch.zeros(n_chunks)
        if not historical or method is Method.RECENCY:
            return scores
        assert spec.fraction is not None
        keep = keep_count(spec.fraction, len(historical))
        if method is Method.RANDOM:
            gen = torch.Generator().manual_seed(self.config.seed)
            order = torch.randperm(len(historical), generator=gen)[:keep]
            picked = [historical[i] for i in order.tolist()]
        else:
            assert oracle_chunk_mass is not None
            mass = list(oracle_chunk_mass) + [0.0] * n_chunks
            # Highest mass first; ties to the earlier chunk.
            picked = sorted(historical, key=lambda c: (-mass[c], c))[:keep]
        scores[picked] = 1.0
        return scores

    def _refresh(
        self,
        planner: ResidencyPlanner,
        cache: LSACache,
        cold: ColdPool,
        hot: HotPool,
        method: Method,
        fixed: torch.Tensor | None,
        counts: _Counts,
    ) -> None:
        if fixed is not None:
            n = planner.total_chunks(_REQ)
            scores = torch.zeros(n)
            scores[: min(n, fixed.numel())] = fixed[:n]
            plan = planner.refresh(_REQ, scores)
        elif (method is Method.LSA and planner.needs_scores(_REQ)
              and planner.config.max_selected_fraction is not None):  # top-K: rank scores
            entry_scores = self._lsa_entry_scores(planner, cache).float().cpu()  # [T]
            chunk_scores = chunk_scores_from_entries(
                entry_scores, planner.config.entries_per_chunk,
                planner.total_chunks(_REQ),
            )  # [n_chunks]
            plan = planner.refresh(_REQ, chunk_scores)
        elif method is Method.LSA and planner.needs_scores(_REQ):
            plan = planner.refresh(_REQ, entry_mask=self._lsa_entry_mask(planner, cache))
        else:
            plan = planner.refresh(_REQ)
        self._execute(plan, planner, cache, cold, hot)
        counts.refreshes += 1
        counts.fetched += len(plan.fetch_chunks)
        counts.evicted += len(plan.evict_chunks)

    def _lsa_entry_mask(self, planner: ResidencyPlanner, cache: LSACache) -> torch.Tensor:
        """Memory Indexer selection over every written entry, Eq. 4, 5, 13: bool [T]."""
        lsa = self.config.lsa
        return select(self._indexer_scores(planner, cache), lsa.threshold, lsa.routing)[0]

    def _lsa_entry_scores(self, planner: ResidencyPlanner, cache: LSACache) -> torch.Tensor:
        """Memory Indexer score of every written entry, layers combined (Eq. 4, 13): [T]."""
        return combine_layers(self._indexer_scores(planner, cache), self.config.lsa.routing)[0]

    def _indexer_scores(self, planner: ResidencyPlanner, cache: LSACache) -> torch.Tensor:
        """Eq. 4 per indexer layer at the last processed token: [L, 1, T]."""
        assert self.indexer is not None
        lsa = self.config.lsa
        st = self.hooks.state
        hidden = []
        for slot in lsa.indexer_layers:
            h = st.hidden[slot]
            assert h is not None, "the last forward recorded every CSA layer's input"
            hidden.append(h)
        h = torch.stack(hidden)[:, None, :]  # [L, 1, D]
        n_tokens = planner.num_tokens(_REQ)
        written = n_tokens // lsa.compress_ratio
        keys = cache.memory_indexer_keys()[:, :written]  # [L, T, Dk]
        if keys.device.type == "cpu":
            keys = hadamard_rotate(keys)
        else:  # hadamard_rotate's matrix is a host tensor: the same product here
            keys = keys.float() @ hadamard_matrix(keys.shape[-1]).to(keys.device)
        pos = torch.tensor([n_tokens - 1], device=h.device)  # the last processed token
        return self.indexer(h, pos, keys)  # [L, 1, T]

    @staticmethod
    def _execute(
        plan: RefreshPlan,
        planner: ResidencyPlanner,
        cache: LSACache,
        cold: ColdPool,
        hot: HotPool,
    ) -> None:
        if plan.evict_chunks:
            # The bytes are already in the cold pool (stored at the end of prefill).
            hot.batched_free(_REQ, plan.evict_chunks)
            cache.evict(plan.evict_chunks)
            planner.complete_evict(_REQ, plan.evict_chunks)
        if plan.fetch_chunks:
            fetch = plan.fetch_chunks
            slots = hot.batched_allocate(_REQ, fetch)
            assert slots is not None, "the hot pool has a slot per chunk"
            # ColdPool (host) -> device staging rows -> HotPool slots -> cache.
            staged = torch.empty(
                (len(fetch), cache.chunk_bytes), dtype=torch.uint8,
                device=hot.buffer.device,
            )
            data = cold.batched_get(_REQ, fetch, out=staged)  # [F, chunk_bytes]
            slot_ids = hot.slots_for(_REQ, fetch)  # [F] on the arena's device
            hot.buffer.index_copy_(0, slot_ids, data)
            cache.restore(fetch, hot.buffer.index_select(0, slot_ids))
            planner.complete_fetch(_REQ, plan.fetch_chunks, ok=True)

    def _footprint(
        self,
        planner: ResidencyPlanner,
        method: Method,
        quest: QuestState | None,
        historical: Sequence[int],
    ) -> tuple[Footprint, int]:
        """DESIGN.md footprint of the residency just read, and its historical count."""
        if method is Method.QUEST:
            always = planner.always_resident_chunks(_REQ)
            picked = quest.picked if quest is not None else set()
            resident = sorted(set(always) | picked)
        else:
            resident = list(planner.resident_chunks(_REQ))
        hist = set(historical)
        return (
            footprint_of(
                self.geometry,
                planner.num_tokens(_REQ),
                self.config.lsa.chunk_tokens,
                resident,
                memory_indexer_keys_resident=method is Method.LSA,
            ),
            sum(1 for c in resident if c in hist),
        )


def footprint_of(
    geometry: KVGeometry,
    num_tokens: int,
    chunk_tokens: int,
    resident_chunks: Sequence[int],
    *,
    memory_indexer_keys_resident: bool,
) -> Footprint:
    """request_footprint of a resident chunk set; a partial last chunk counts only
    its written entries (as ResidencyPlanner.footprint counts them)."""
    epc = chunk_tokens // geometry.csa_compress_ratio
    written = num_tokens // geometry.csa_compress_ratio
    entries = sum(min(epc, max(0, written - i * epc)) for i in resident_chunks)
    return request_footprint(
        geometry,
        num_tokens,
        chunk_tokens,
        entries,
        len(resident_chunks),
        memory_indexer_keys_resident=memory_indexer_keys_resident,
    )


@dataclass
class _Counts:
    refreshes: int = 0
    fetched: int = 0
    evicted: int = 0


def _chunk_sums(entry_values: torch.Tensor, entries_per_chunk: int) -> list[float]:
    n = entry_values.numel()
    n_chunks = -(-n // entries_per_chunk)
    padded = torch.zeros(n_chunks * entries_per_chunk, device=entry_values.device)
    padded[:n] = entry_values
    return padded.view(n_chunks, entries_per_chunk).sum(1).tolist()  # [n_chunks]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


__all__ = [
    "EngineConfig",
    "GenerationResult",
    "PrefillState",
    "ReferenceEngine",
    "footprint_of",
    "geometry_for",
]
