"""ResidencyPlanner: the one place every LSA residency decision is made.

Engine-free: the vLLM connector's scheduler side and the transformers reference engine
both drive it with lifecycle events and execute the plans it returns through their
pools (the planner never touches memory). Per request it tracks every CSA chunk in
exactly one `ChunkState`. A refresh runs at the end of prefill and then every `tau`
decode steps (paper §2.1); its target is the Memory Indexer's selection (Eq. 5,
`score >= threshold`, optionally capped) plus the always-resident set of DESIGN.md:
the first `sink_chunks` chunks of the prompt, the chunks covering the last
`local_window_tokens` of the prompt, and every chunk written during decode (the
partial last prompt chunk included: decode writes into it). A refresh emits only the
difference from what is resident. A failed fetch never leaves a request attending
over missing KV: it becomes fully resident, and a second failure flags it for
recompute (DESIGN.md invariant 3).

Chunk `i` covers tokens `[i * chunk_tokens, (i + 1) * chunk_tokens)`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import Footprint, KVGeometry, request_footprint


class ChunkState(enum.Enum):
    RESIDENT = "resident"  # on the device; the only state attention may read
    COLD = "cold"  # only in the cold pool
    FETCHING = "fetching"  # fetch issued, not completed: not attended yet
    EVICTING = "evicting"  # eviction issued, slot not freed: never evicted twice


class RequestMode(enum.Enum):
    SPARSE = "sparse"  # resident = selection ∪ always-resident
    FULL_RESIDENT = "full_resident"  # fallback: every chunk is a refresh target
    RECOMPUTE = "recompute"  # KV unreachable: the engine recomputes before a forward


class FallbackReason(enum.Enum):
    SELECTION_TOO_LARGE = "selection_too_large"  # per refresh, not sticky
    FETCH_FAILED = "fetch_failed"  # sticky for the rest of the request
    COLD_POOL_FULL = "cold_pool_full"  # sticky: the cold pool refused the request


class ReleaseReason(enum.Enum):
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


class PlannerStateError(RuntimeError):
    """An event arrived in an order the planner cannot honour (a caller bug)."""


@dataclass(frozen=True)
class RefreshPlan:
    """What the pools do after one refresh; chunk ids sorted ascending."""

    req_id: str
    # Chunks to copy cold pool -> device; now FETCHING until `complete_fetch`.
    fetch_chunks: tuple[int, ...]
    # Chunks whose device slots to free; now EVICTING until `complete_evict`.
    evict_chunks: tuple[int, ...]
    # Historical chunks the Memory Indexer picked (after the cap); () when no
    # selection was computed (a fully resident request).
    selected_chunks: tuple[int, ...]
    # The resident set this plan converges to: selection ∪ always, or every chunk.
    target_chunks: tuple[int, ...]
    # Why this refresh targets every chunk; None for a sparse refresh.
    fallback: FallbackReason | None
    # Jaccard overlap with the request's previous selection; None on the first.
    jaccard: float | None


@dataclass(frozen=True)
class ReleasePlan:
    """Chunks the pools free when a request is preempted, finished or aborted."""

    req_id: str
    reason: ReleaseReason
    # Device slots to free: resident, fetching (slot allocated) and evicting chunks.
    hot_chunks: tuple[int, ...]
    # Cold-pool entries to free: every chunk on finish/abort, none on preemption
    # (the cold pool is where a preempted request resumes from).
    cold_chunks: tuple[int, ...]
    # In-flight operations the pools must cancel; never report their completion.
    cancelled_fetch_chunks: tuple[int, ...]
    cancelled_evict_chunks: tuple[int, ...]


@dataclass
class _Counters:
    """Monotonic counters (deltas for metrics); the planner logs nothing per step."""

    refreshes: int = 0
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    fetch_completed_chunks: int = 0
    fetch_failed_chunks: int = 0
    evict_completed_chunks: int = 0
    selected_chunks: int = 0
    selected_entries: int = 0
    fallbacks_selection_too_large: int = 0
    fallbacks_fetch_failed: int = 0
    fallbacks_cold_pool_full: int = 0
    recomputes: int = 0
    preemptions: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    decode_tokens: int = 0
    jaccard_sum: float = 0.0
    jaccard_samples: int = 0


@dataclass(frozen=True)
class PlannerStats:
    """A snapshot: `_Counters`' fields (monotonic) plus levels over live requests."""

    refreshes: int
    fetched_chunks: int
    fetched_bytes: int
    evicted_chunks: int
    evicted_bytes: int
    fetch_completed_chunks: int
    fetch_failed_chunks: int
    evict_completed_chunks: int
    selected_chunks: int
    selected_entries: int
    fallbacks_selection_too_large: int
    fallbacks_fetch_failed: int
    fallbacks_cold_pool_full: int
    recomputes: int
    preemptions: int
    finished_requests: int
    aborted_requests: int
    decode_tokens: int
    jaccard_sum: float
    jaccard_samples: int
    live_requests: int
    resident_chunks: int
    in_flight_chunks: int
    total_chunks: int

    @property
    def resident_chunk_ratio(self) -> float:
        return self.resident_chunks / self.total_chunks if self.total_chunks else 1.0

    @property
    def fallbacks(self) -> int:
        return (
            self.fallbacks_selection_too_large
            + self.fallbacks_fetch_failed
            + self.fallbacks_cold_pool_full
        )

    @property
    def mean_jaccard(self) -> float | None:
        return self.jaccard_sum / self.jaccard_samples if self.jaccard_samples else None


@dataclass
class _Request:
    prompt_tokens: int
    num_tokens: int
    states: list[ChunkState]
    # Complete prompt chunks outside the always-resident set: the only chunks a
    # selection decides about. Fixed at add: decode chunks are always resident.
    historical: frozenset[int]
    mode: RequestMode = RequestMode.SPARSE
    fallback: FallbackReason | None = None
    refresh_due: bool = True  # the end of prefill is the first refresh
    steps_since_refresh: int = 0
    last_selection: frozenset[int] | None = None


def keep_count(fraction: float, historical: int) -> int:
    """Chunks a share `fraction` of `historical` chunks keeps: max(1, round(f * H)).
    The one rounding of lsa.max_selected_fraction and of eval's random, oracle and
    top-K lsa, so equal shares keep equal counts."""
    return max(1, round(fraction * historical))


def chunk_scores_from_entries(
    entry_scores: torch.Tensor, entries_per_chunk: int, n_chunks: int
) -> torch.Tensor:
    """Chunk score = max over its entries, since a chunk is selected when any entry is.

    entry_scores: [n_entries] float, n_entries <= n_chunks * entries_per_chunk.
    Returns [n_chunks] float; a chunk without written entries scores -inf.
    """
    padded = _pad_entries(entry_scores, entries_per_chunk, n_chunks, "entry_scores")
    if not padded.is_floating_point():
        raise TypeError(
            f"entry_scores has dtype {entry_scores.dtype}; pass float scores "
            "(sigmoid outputs of Eq. 4), or a bool mask to chunk_mask_from_entries."
        )
    return padded.amax(dim=1)  # [n_chunks]


def chunk_mask_from_entries(
    entry_mask: torch.Tensor, entries_per_chunk: int, n_chunks: int
) -> torch.Tensor:
    """A chunk is selected when any of its entries is: [n_entries] -> [n_chunks]."""
    return _entry_counts(entry_mask, entries_per_chunk, n_chunks) > 0


def _entry_counts(
    entry_mask: torch.Tensor, entries_per_chunk: int, n_chunks: int
) -> torch.Tensor:
    if entry_mask.dtype != torch.bool:
        raise TypeError(
            f"entry_mask has dtype {entry_mask.dtype}; pass a torch.bool mask "
            "(True = entry selected), or float scores as chunk_scores."
        )
    padded = _pad_entries(entry_mask, entries_per_chunk, n_chunks, "entry_mask")
    return padded.sum(dim=1)  # [n_chunks] selected entries per chunk


def _pad_entries(
    entries: torch.Tensor, entries_per_chunk: int, n_chunks: int, name: str
) -> torch.Tensor:
    if not isinstance(entries, torch.Tensor) or entries.dim() != 1:
        raise TypeError(
            f"{name} must be a 1-D torch.Tensor [n_entries], got {entries!r}."
        )
    if entries_per_chunk < 1 or n_chunks < 0:
        raise ValueError(
            f"entries_per_chunk={entries_per_chunk} must be >= 1 and "
            f"n_chunks={n_chunks} >= 0; take them from LSAConfig."
        )
    capacity = n_chunks * entries_per_chunk
    if entries.numel() > capacity:
        raise ValueError(
            f"{name} has {entries.numel()} entries but {n_chunks} chunks of "
            f"{entries_per_chunk} entries hold only {capacity}; pass the request's "
            "entries only."
        )
    fill = -float("inf") if entries.is_floating_point() else 0
    padded = entries.new_full((capacity,), fill)
    padded[: entries.numel()] = entries
    return padded.view(n_chunks, entries_per_chunk)  # [n_chunks, entries_per_chunk]


class ResidencyPlanner:
    """Per-request CSA chunk states, τ trigger, incremental fetch/evict plans."""

    def __init__(self, config: LSAConfig, geometry: KVGeometry | None = None) -> None:
        if not isinstance(config, LSAConfig):
            raise TypeError(f"config={config!r} must be an LSAConfig.")
        geometry = KVGeometry() if geometry is None else geometry
        self._check_geometry(config, geometry)
        self.config = config
        self.geometry = geometry
        # A chunk moves as one unit, so every fetch and eviction costs this much.
        self.chunk_bytes = geometry.chunk_bytes(config.entries_per_chunk)
        self._requests: dict[str, _Request] = {}
        self._counters = _Counters()

    # ---- lifecycle ----------------------------------------------------------------

    def add_request(self, req_id: str, prompt_tokens: int) -> None:
        """Register a request whose prompt KV is on the device (prefill done)."""
        if not isinstance(req_id, str):
            raise TypeError(f"req_id={req_id!r} must be a str.")
        if req_id in self._requests:
            raise ValueError(
                f"req_id={req_id!r} is already live; finish or abort it before "
                "adding it again."
            )
        _check_positive_int("prompt_tokens", prompt_tokens)
        cfg = self.config
        closed = prompt_tokens // cfg.chunk_tokens  # complete prompt chunks
        always = set(range(min(cfg.sink_chunks, closed)))
        if cfg.local_window_tokens > 0:
            first_local = max(0, prompt_tokens - cfg.local_window_tokens)
            always.update(range(first_local // cfg.chunk_tokens, closed))
        historical = frozenset(range(closed)) - always
        n_chunks = _ceil_div(prompt_tokens, cfg.chunk_tokens)
        self._requests[req_id] = _Request(
            prompt_tokens=prompt_tokens,
            num_tokens=prompt_tokens,
            # Prefill wrote every prompt chunk on the device.
            states=[ChunkState.RESIDENT] * n_chunks,
            historical=historical,
        )

    def append_tokens(self, req_id: str, n_tokens: int = 1) -> None:
        """Record `n_tokens` decode steps (one token each) after their forward."""
        _check_positive_int("n_tokens", n_tokens)
        req = self._get(req_id)
        if not self._ready(req):
            raise PlannerStateError(
                f"request {req_id!r} ran a forward while not ready "
                f"({self._not_ready_reason(req)}); call ready_for_forward() first."
            )
        left = self.config.tau - req.steps_since_refresh
        if n_tokens > left:
            raise PlannerStateError(
                f"append_tokens({req_id!r}, n_tokens={n_tokens}) would run past the "
                f"refresh due in {left} decode steps (tau={self.config.tau}); append "
                f"at most {left}, then refresh."
            )
        req.num_tokens += n_tokens
        grown = _ceil_div(req.num_tokens, self.config.chunk_tokens) - len(req.states)
        # Decode writes its chunks on the device and they stay there.
        req.states.extend([ChunkState.RESIDENT] * grown)
        req.steps_since_refresh += n_tokens
        req.refresh_due = req.steps_since_refresh == self.config.tau
        self._counters.decode_tokens += n_tokens

    def needs_refresh(self, req_id: str) -> bool:
        return self._get(req_id).refresh_due

    def needs_scores(self, req_id: str) -> bool:
        """Whether a refresh needs Memory Indexer input (False: skip the indexer)."""
        req = self._get(req_id)
        return req.mode is RequestMode.SPARSE and self.config.threshold > 0

    def ready_for_forward(self, req_id: str) -> bool:
        """No refresh due, nothing being fetched, no recompute pending."""
        return self._ready(self._get(req_id))

    def refresh(
        self,
        req_id: str,
        chunk_scores: torch.Tensor | None = None,
        *,
        entry_mask: torch.Tensor | None = None,
    ) -> RefreshPlan:
        """Recompute the target set and emit the incremental fetch/evict plan.

        chunk_scores: [total_chunks] float, the max score of each chunk's entries
        (see `chunk_scores_from_entries`). entry_mask: [num_tokens // compress_ratio]
        bool, the Memory Indexer's entry-level selection. Pass neither to reuse the
        last selection (resume after preemption, before any hidden state exists) or
        for a request that needs no scores (`needs_scores` is False).
        """
        req = self._get(req_id)
        if req.mode is RequestMode.RECOMPUTE:
            raise PlannerStateError(
                f"request {req_id!r} is flagged for recompute after failed fetches; "
                "recompute its KV and call complete_recompute() before refreshing."
            )
        in_flight = self._in(req, ChunkState.FETCHING, ChunkState.EVICTING)
        if in_flight:
            raise PlannerStateError(
                f"request {req_id!r} has chunks {list(in_flight)} in flight; complete "
                "their fetch/evict before the next refresh, so no chunk is moved twice."
            )
        if chunk_scores is not None and entry_mask is not None:
            raise ValueError(
                "refresh() got both chunk_scores and entry_mask; pass one selection."
            )
        everything = frozenset(range(len(req.states)))
        fallback: FallbackReason | None = None
        selection: frozenset[int] | None = None
        jaccard: float | None = None
        if req.mode is RequestMode.FULL_RESIDENT:
            fallback, target = req.fallback, everything
        else:
            selection, fresh = self._select(req, req_id, chunk_scores, entry_mask)
            historical = len(req.historical)
            frac = len(selection) / historical if historical else 0.0
            # Threshold 0 selects everything by configuration, not as a fallback.
            if (
                fresh
                and self.config.threshold > 0
                and frac > self.config.fallback_selected_fraction
            ):
                # Offloading saves too little: keep this request whole until the
                # next refresh decides again.
                fallback = FallbackReason.SELECTION_TOO_LARGE
                self._counters.fallbacks_selection_too_large += 1
                target = everything
            else:
                target = selection | (everything - req.historical)
            if fresh:
                if req.last_selection is not None:
                    jaccard = _jaccard(req.last_selection, selection)
                    self._counters.jaccard_sum += jaccard
                    self._counters.jaccard_samples += 1
                req.last_selection = selection
                self._counters.selected_chunks += len(selection)
        resident = frozenset(self._in(req, ChunkState.RESIDENT))
        # Nothing is in flight, so every chunk outside `resident` is cold.
        fetch = tuple(sorted(target - resident))
        evict = tuple(sorted(resident - target))
        for i in fetch:
            req.states[i] = ChunkState.FETCHING
        for i in evict:
            req.states[i] = ChunkState.EVICTING
        req.refresh_due = False
        req.steps_since_refresh = 0
        c = self._counters
        c.refreshes += 1
        c.fetched_chunks += len(fetch)
        c.fetched_bytes += len(fetch) * self.chunk_bytes
        c.evicted_chunks += len(evict)
        c.evicted_bytes += len(evict) * self.chunk_bytes
        return RefreshPlan(
            req_id=req_id,
            fetch_chunks=fetch,
            evict_chunks=evict,
            selected_chunks=tuple(sorted(selection)) if selection is not None else (),
            target_chunks=tuple(sorted(target)),
            fallback=fallback,
            jaccard=jaccard,
        )

    def complete_fetch(self, req_id: str, chunks: Iterable[int], *, ok: bool) -> None:
        """A fetch finished; on failure the request stops relying on the cold pool."""
        req = self._get(req_id)
        ids = self._check_chunks(req, req_id, chunks, ChunkState.FETCHING)
        if ok:
            for i in ids:
                req.states[i] = ChunkState.RESIDENT
            self._counters.fetch_completed_chunks += len(ids)
            return
        for i in ids:
            req.states[i] = ChunkState.COLD  # still in the cold pool; never lost
        self._counters.fetch_failed_chunks += len(ids)
        if not ids:
            return
        if req.mode is RequestMode.SPARSE:
            # Fully resident from now on; the next refresh refetches every cold
            # chunk before the forward, so attention never reads around a hole.
            req.mode, req.fallback = (
                RequestMode.FULL_RESIDENT,
                FallbackReason.FETCH_FAILED,
            )
            req.refresh_due = True
            self._counters.fallbacks_fetch_failed += 1
        elif req.mode is RequestMode.FULL_RESIDENT:
            # Even the full refetch failed: only recomputing the KV is safe.
            req.mode = RequestMode.RECOMPUTE
            self._counters.recomputes += 1

    def complete_evict(self, req_id: str, chunks: Iterable[int]) -> None:
        req = self._get(req_id)
        ids = self._check_chunks(req, req_id, chunks, ChunkState.EVICTING)
        for i in ids:
            req.states[i] = ChunkState.COLD
        self._counters.evict_completed_chunks += len(ids)

    def cold_pool_full(self, req_id: str) -> None:
        """The cold pool refused the request: keep it fully resident, drop nothing."""
        req = self._get(req_id)
        if req.mode is RequestMode.SPARSE:
            req.mode, req.fallback = (
                RequestMode.FULL_RESIDENT,
                FallbackReason.COLD_POOL_FULL,
            )
            # Chunks already cold were stored before the refusal; fetch them back.
            req.refresh_due = True
            self._counters.fallbacks_cold_pool_full += 1

    def complete_recompute(self, req_id: str) -> None:
        """The engine recomputed the request's KV on the device: all chunks resident."""
        req = self._get(req_id)
        if req.mode is not RequestMode.RECOMPUTE:
            raise PlannerStateError(
                f"complete_recompute({req_id!r}) but the request is {req.mode.value}, "
                "not flagged for recompute; only call it after a second failed fetch."
            )
        in_flight = self._in(req, ChunkState.FETCHING, ChunkState.EVICTING)
        if in_flight:
            raise PlannerStateError(
                f"request {req_id!r} still has chunks {list(in_flight)} in flight; "
                "complete or cancel (preempt) them before complete_recompute()."
            )
        req.states = [ChunkState.RESIDENT] * len(req.states)
        req.mode = RequestMode.FULL_RESIDENT
        req.refresh_due, req.steps_since_refresh = True, 0

    def preempt(self, req_id: str) -> ReleasePlan:
        """Drop all device residency; a refresh must run before the next forward."""
        req = self._get(req_id)
        plan = self._release_plan(req, req_id, ReleaseReason.PREEMPTED, free_cold=False)
        req.states = [ChunkState.COLD] * len(req.states)
        req.refresh_due, req.steps_since_refresh = True, 0
        self._counters.preemptions += 1
        return plan

    def finish(self, req_id: str) -> ReleasePlan:
        plan = self._forget(req_id, ReleaseReason.FINISHED)
        self._counters.finished_requests += 1
        return plan

    def abort(self, req_id: str) -> ReleasePlan:
        plan = self._forget(req_id, ReleaseReason.ABORTED)
        self._counters.aborted_requests += 1
        return plan

    def _forget(self, req_id: str, reason: ReleaseReason) -> ReleasePlan:
        """Release everything of a request, cold pool included, and drop it."""
        plan = self._release_plan(self._get(req_id), req_id, reason, free_cold=True)
        del self._requests[req_id]
        return plan

    # ---- views --------------------------------------------------------------------

    def request_ids(self) -> tuple[str, ...]:
        return tuple(self._requests)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._requests

    def chunk_states(self, req_id: str) -> tuple[ChunkState, ...]:
        return tuple(self._get(req_id).states)

    def resident_chunks(self, req_id: str) -> tuple[int, ...]:
        """The chunks attention may read now."""
        return self._in(self._get(req_id), ChunkState.RESIDENT)

    def cold_chunks(self, req_id: str) -> tuple[int, ...]:
        return self._in(self._get(req_id), ChunkState.COLD)

    def in_flight_chunks(self, req_id: str) -> tuple[int, ...]:
        return self._in(self._get(req_id), ChunkState.FETCHING, ChunkState.EVICTING)

    def total_chunks(self, req_id: str) -> int:
        return len(self._get(req_id).states)

    def num_tokens(self, req_id: str) -> int:
        return self._get(req_id).num_tokens

    def historical_chunks(self, req_id: str) -> tuple[int, ...]:
        return tuple(sorted(self._get(req_id).historical))

    def always_resident_chunks(self, req_id: str) -> tuple[int, ...]:
        req = self._get(req_id)
        return tuple(i for i in range(len(req.states)) if i not in req.historical)

    def mode(self, req_id: str) -> RequestMode:
        return self._get(req_id).mode

    def footprint(self, req_id: str, geometry: KVGeometry | None = None) -> Footprint:
        """DESIGN.md's footprint of one request; in-flight chunks are not resident."""
        geometry = self.geometry if geometry is None else geometry
        self._check_geometry(self.config, geometry)
        req = self._get(req_id)
        epc = self.config.entries_per_chunk
        written = req.num_tokens // self.config.compress_ratio
        resident = self._in(req, ChunkState.RESIDENT)
        # A partial last chunk holds only its written entries.
        entries = sum(min(epc, max(0, written - i * epc)) for i in resident)
        return request_footprint(
            geometry, req.num_tokens, self.config.chunk_tokens, entries, len(resident)
        )

    def total_footprint(self, geometry: KVGeometry | None = None) -> Footprint:
        total = Footprint(0, 0, 0, 0)
        for req_id in self._requests:
            total = total + self.footprint(req_id, geometry)
        return total

    def stats(self) -> PlannerStats:
        resident = in_flight = total = 0
        for req in self._requests.values():
            total += len(req.states)
            resident += req.states.count(ChunkState.RESIDENT)
            in_flight += req.states.count(ChunkState.FETCHING)
            in_flight += req.states.count(ChunkState.EVICTING)
        return PlannerStats(
            **dataclasses.asdict(self._counters),
            live_requests=len(self._requests),
            resident_chunks=resident,
            in_flight_chunks=in_flight,
            total_chunks=total,
        )

    # ---- internals ----------------------------------------------------------------

    def _select(
        self,
        req: _Request,
        req_id: str,
        chunk_scores: torch.Tensor | None,
        entry_mask: torch.Tensor | None,
    ) -> tuple[frozenset[int], bool]:
        """(selected historical chunks, whether computed from fresh indexer input)."""
        cfg = self.config
        n_chunks = len(req.states)
        if chunk_scores is None and entry_mask is None:
            if cfg.threshold == 0:
                return req.historical, True
            if req.last_selection is None:
                raise ValueError(
                    f"refresh({req_id!r}) got no chunk_scores or entry_mask and the "
                    "request has no earlier selection to reuse; pass the Memory "
                    "Indexer's scores."
                )
            return req.last_selection, False
        if chunk_scores is not None:
            if (
                not isinstance(chunk_scores, torch.Tensor)
                or chunk_scores.shape != (n_chunks,)
                or not chunk_scores.is_floating_point()
            ):
                raise ValueError(
                    f"chunk_scores must be a float tensor of shape [{n_chunks}] (one "
                    f"score per chunk of request {req_id!r}), got "
                    f"{_describe(chunk_scores)}; build it with "
                    "chunk_scores_from_entries()."
                )
            if torch.isnan(chunk_scores).any():
                raise ValueError(
                    f"chunk_scores for request {req_id!r} contain NaN; a NaN score "
                    "would silently drop chunks, so fix the Memory Indexer input."
                )
            rank = chunk_scores.tolist()
            picked = [i for i in req.historical if rank[i] >= cfg.threshold]
        else:
            assert entry_mask is not None
            written = req.num_tokens // cfg.compress_ratio
            if not isinstance(entry_mask, torch.Tensor) or entry_mask.shape != (
                written,
            ):
                raise ValueError(
                    f"entry_mask must have shape [{written}] (entries written for "
                    f"request {req_id!r}), got {_describe(entry_mask)}."
                )
            counts = _entry_counts(entry_mask, cfg.entries_per_chunk, n_chunks)
            # Rank capped chunks by how many of their entries were selected.
            rank = [float(x) for x in counts.tolist()]
            picked = [i for i in req.historical if rank[i] > 0]
            self._counters.selected_entries += int(sum(rank[i] for i in req.historical))
        caps = [cfg.max_selected_chunks] if cfg.max_selected_chunks is not None else []
        if cfg.max_selected_fraction is not None:
            caps.append(keep_count(cfg.max_selected_fraction, len(req.historical)))
        if cfg.threshold == 0:
            picked = list(req.historical)  # threshold 0 = everything, no cap
        elif caps and len(picked) > min(caps):
            # Highest scores first; ties go to the earlier chunk, deterministically.
            picked = sorted(picked, key=lambda i: (-rank[i], i))
            picked = picked[: min(caps)]
        return frozenset(picked), True

    def _release_plan(
        self, req: _Request, req_id: str, reason: ReleaseReason, *, free_cold: bool
    ) -> ReleasePlan:
        fetching = self._in(req, ChunkState.FETCHING)
        evicting = self._in(req, ChunkState.EVICTING)
        hot = self._in(
            req, ChunkState.RESIDENT, ChunkState.FETCHING, ChunkState.EVICTING
        )
        return ReleasePlan(
            req_id=req_id,
            reason=reason,
            hot_chunks=hot,
            cold_chunks=tuple(range(len(req.states))) if free_cold else (),
            cancelled_fetch_chunks=fetching,
            cancelled_evict_chunks=evicting,
        )

    def _check_chunks(
        self, req: _Request, req_id: str, chunks: Iterable[int], want: ChunkState
    ) -> tuple[int, ...]:
        ids = tuple(chunks)
        if len(set(ids)) != len(ids):
            raise ValueError(f"chunk ids {list(ids)} repeat an id; report each once.")
        for i in ids:
            if (
                isinstance(i, bool)
                or not isinstance(i, int)
                or not 0 <= i < len(req.states)
            ):
                raise ValueError(
                    f"chunk id {i!r} is not a chunk of request {req_id!r} "
                    f"(0..{len(req.states) - 1})."
                )
            if req.states[i] is not want:
                raise ValueError(
                    f"chunk {i} of request {req_id!r} is {req.states[i].value}, not "
                    f"{want.value}; report completion only for chunks a plan put in "
                    "flight and no release plan cancelled."
                )
        return ids

    def _get(self, req_id: str) -> _Request:
        try:
            return self._requests[req_id]
        except KeyError:
            raise ValueError(
                f"req_id={req_id!r} is not a live request; call add_request() first "
                "(finished, aborted and never-added requests are unknown)."
            ) from None

    @staticmethod
    def _in(req: _Request, *states: ChunkState) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(req.states) if s in states)

    @staticmethod
    def _ready(req: _Request) -> bool:
        return (
            not req.refresh_due
            and req.mode is not RequestMode.RECOMPUTE
            and ChunkState.FETCHING not in req.states
        )

    @staticmethod
    def _not_ready_reason(req: _Request) -> str:
        if req.mode is RequestMode.RECOMPUTE:
            return "flagged for recompute"
        if req.refresh_due:
            return "refresh due"
        return "fetch in flight"

    @staticmethod
    def _check_geometry(config: LSAConfig, geometry: KVGeometry) -> None:
        if not isinstance(geometry, KVGeometry):
            raise TypeError(f"geometry={geometry!r} must be a KVGeometry.")
        if geometry.csa_compress_ratio != config.compress_ratio:
            raise ValueError(
                f"KVGeometry.csa_compress_ratio={geometry.csa_compress_ratio} differs "
                f"from 'lsa.compress_ratio'={config.compress_ratio}; both describe "
                "the same model, so set them equal."
            )


def _jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty selections are identical (1.0)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int.")
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1.")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return repr(x)


__all__ = [
    "ChunkState",
    "RequestMode",
    "FallbackReason",
    "ReleaseReason",
    "PlannerStateError",
    "RefreshPlan",
    "ReleasePlan",
    "PlannerStats",
    "ResidencyPlanner",
    "chunk_scores_from_entries",
    "chunk_mask_from_entries",
]
