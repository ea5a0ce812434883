"""Scheduler half of the LSA connector: runs one `ResidencyPlanner` over all requests.

Per step (`build_connector_meta`, before the forward):

1. complete the previous step's fetches (failed ones per the worker's report) and
   evictions, so every chunk is in exactly one settled state;
2. learn block ids and `num_computed_tokens` from the `SchedulerOutput`;
3. add a request to the planner once its prefill is computed, append its decode
   tokens, and refresh it when the planner says a refresh is due (end of prefill,
   then every τ decode steps) with the Memory Indexer's latest chunk scores;
4. ship, per request, the chunks to store (completed, not yet in the cold pool),
   fetch and evict, with their block ids, and ask the worker for Memory Indexer
   scores for requests whose refresh is due next step.

With block return (`bind_kv_cache_manager` found the `LSACSAManager` of the CSA
group, see block_return.py) an evicted chunk's blocks go back to vLLM's pool in the
step it is evicted, a fetched chunk takes fresh blocks (all or none; a refusal is a
failed fetch), and every step ships the request's block-table differences.

The worker executes the plan synchronously before the forward
(`has_sync_kv_loads`), so a fetch is attendable in the very step it was planned.
The scheduler mirrors the cold pool's capacity for admission: a request that does
not fit is kept fully resident (`ResidencyPlanner.cold_pool_full`), never dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm_flashmemory.connectors.block_return import (
    CSABlockReturn,
    find_lsa_csa_manager,
)
from vllm_flashmemory.connectors.layout import CSALayout
from vllm_flashmemory.connectors.stats import LSAKVConnectorStats
from vllm_flashmemory.connectors.trace import LSATrace
from vllm_flashmemory.connectors.types import (
    BlockTablePatch,
    ChunkBlocks,
    ChunkSelection,
    LSAConnectorMetadata,
    LSAConnectorWorkerMetadata,
    LSARequestStep,
    RefreshTarget,
)

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import KVGeometry
from vllm_flashmemory.core.residency_planner import ResidencyPlanner

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


@dataclass
class _LSARequestState:
    prompt_tokens: int
    # Cold-pool chunks committed to this request (0 = refused: fully resident).
    reserved_chunks: int
    # Block ids per CSA group, in CSALayout.groups order (append-only but on resume).
    block_ids: list[list[int]]
    # Chunks [0, stored_chunks) are in the cold pool (or shipped to be stored).
    stored_chunks: int = 0
    # Whether the cold pool refused this request.
    unoffloadable: bool = False
    # Fetches shipped last step, settled by the worker's report.
    pending_fetch: tuple[int, ...] = ()
    # Decode tokens appended since the last refresh (mirrors the planner's τ count).
    steps_since_refresh: int = 0
    # Latest Memory Indexer chunk scores from the worker.
    scores: tuple[float, ...] | None = None
    num_selected_entries: int = 0
    in_planner: bool = False
    # vLLM's pool had too few free blocks for last step's fetches: they failed.
    fetch_unallocated: bool = False


@dataclass
class _StepDeltas:
    evicted_chunks: int = 0
    fallbacks: int = 0
    unscored_refreshes: int = 0
    freed: list[str] = field(default_factory=list)


class LSAConnectorScheduler:
    """Plans residency per request; holds no KV bytes (those live in the worker)."""

    def __init__(
        self,
        config: LSAConfig,
        layout: CSALayout,
        cold_pool_capacity_chunks: int,
        max_model_len: int,
        geometry: KVGeometry | None = None,
    ) -> None:
        """geometry: the served model's KVGeometry (`core.footprint.geometry_for` of
        its config, built once at startup); the planner's footprint, and so the
        `kv_bytes_*` gauges, use it. None: Flash byte sizes with the layout's CSA
        layer count (for callers without a model config)."""
        self.config = config
        self.layout = layout
        if geometry is None:
            geometry = dataclasses.replace(
                KVGeometry(),
                n_csa_layers=len(layout.layers),
                n_memory_indexer_layers=min(
                    len(config.indexer_layers), len(layout.layers)
                ),
            )
        if geometry.n_csa_layers != len(layout.layers):
            raise ValueError(
                f"KVGeometry.n_csa_layers={geometry.n_csa_layers} but the KV cache "
                f"config has {len(layout.layers)} CSA layers; build the geometry "
                "from the served model's config (core.footprint.geometry_for)."
            )
        self.geometry = geometry
        self.planner = ResidencyPlanner(config, geometry)
        self.cold_pool_capacity_chunks = cold_pool_capacity_chunks
        self.max_model_len = max_model_len
        self._free_cold_chunks = cold_pool_capacity_chunks
        self._requests: dict[str, _LSARequestState] = {}
        self._vllm_requests: dict[str, Request] = {}
        self._deltas = _StepDeltas()
        self._fallbacks_seen = 0
        # Position, in each request's block_ids, of the native indexer's group.
        self._indexer_group = layout.group_ids.index(layout.indexer_group_id)
        self._trace = LSATrace("scheduler")
        # Set by bind_kv_cache_manager when the CSA caches have their own group.
        self.block_return: CSABlockReturn | None = None

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        manager = find_lsa_csa_manager(kv_cache_manager, self.layout.group_ids)
        self.block_return = None if manager is None else CSABlockReturn(manager)
        if self.block_return is not None:
            logger.info(
                "LSA: evicted CSA chunks return their blocks to vLLM's pool "
                "(kv-cache group %d).",
                manager.kv_cache_group_id,
            )

    # ---- request lifecycle -----------------------------------------------------

    def track_request(self, request: Request) -> None:
        self._vllm_requests[request.request_id] = request

    def _max_chunks(self, req_id: str, prompt_tokens: int) -> int:
        request = self._vllm_requests.get(req_id)
        max_tokens = None
        if request is not None and request.sampling_params is not None:
            max_tokens = request.sampling_params.max_tokens
        limit = self.max_model_len
        if max_tokens is not None:
            limit = min(limit, prompt_tokens + max_tokens)
        return -(-limit // self.config.chunk_tokens)

    def _admit(self, req_id: str, prompt_tokens: int, block_ids: list[list[int]]) -> None:
        need = self._max_chunks(req_id, prompt_tokens)
        unoffloadable = need > self._free_cold_chunks
        reserved = 0 if unoffloadable else need
        self._free_cold_chunks -= reserved
        self._requests[req_id] = _LSARequestState(
            prompt_tokens=prompt_tokens,
            reserved_chunks=reserved,
            block_ids=block_ids,
            unoffloadable=unoffloadable,
        )

    def _release(self, req_id: str) -> None:
        state = self._requests.pop(req_id, None)
        if state is None:
            return
        self._free_cold_chunks += state.reserved_chunks
        if self.block_return is not None:
            self.block_return.forget(req_id)
        if state.in_planner:
            # Unsettled fetches die with the request: the cold pool keeps no hole.
            self.planner.finish(req_id)
        # The worker frees the cold-pool rows and unmasks the request's blocks.
        self._deltas.freed.append(req_id)

    def request_finished(self, request: Request) -> None:
        self._vllm_requests.pop(request.request_id, None)
        self._release(request.request_id)

    # ---- per step -----------------------------------------------------------------

    def _group_block_ids(self, all_groups: tuple[list[int], ...]) -> list[list[int]]:
        return [list(all_groups[g]) for g in self.layout.group_ids]

    def _chunk_blocks(self, state: _LSARequestState, chunk_id: int) -> ChunkBlocks:
        ids = []
        for group, blocks in zip(self.layout.groups, state.block_ids):
            k = group.blocks_per_chunk
            ids.append(tuple(blocks[chunk_id * k : (chunk_id + 1) * k]))
        return ChunkBlocks(chunk_id, tuple(ids))

    def _settle(self, req_id: str, state: _LSARequestState, failed: bool) -> None:
        failed = failed or state.fetch_unallocated
        state.fetch_unallocated = False
        if failed and state.pending_fetch and self.block_return is not None:
            # The fetched blocks hold no valid bytes: back to vLLM's pool.
            self.block_return.return_failed(
                req_id, state.block_ids[0], self._block_indices(state.pending_fetch)
            )
        if state.pending_fetch and state.in_planner:
            self.planner.complete_fetch(req_id, state.pending_fetch, ok=not failed)
        state.pending_fetch = ()

    def _block_indices(self, chunks: tuple[int, ...]) -> list[int]:
        k = self.layout.groups[0].blocks_per_chunk
        return [c * k + j for c in chunks for j in range(k)]

    def _return_blocks(
        self, req_id: str, state: _LSARequestState, fetch: tuple[int, ...],
        evict: tuple[int, ...],
    ) -> tuple[int, ...]:
        """Free evicted chunks' blocks and take blocks for fetched ones.

        Returns the fetches that got blocks (all or none); a refused fetch
        settles as failed next step (the planner's fallback).
        """
        assert self.block_return is not None
        ids = state.block_ids[0]
        if evict:
            # Bytes must be in the cold pool before vLLM can reuse the blocks.
            assert max(evict) < state.stored_chunks, (req_id, evict)
            self.block_return.evict(req_id, ids, self._block_indices(evict))
        if fetch and not self.block_return.restore(req_id, ids, self._block_indices(fetch)):
            logger.warning_once(
                "LSA: vLLM's KV cache has no free blocks for a fetch; the request "
                "keeps attending its resident chunks and falls back to full "
                "residency at its next refresh."
            )
            state.fetch_unallocated = True
            return ()
        return fetch

    def _chunk_scores(self, req_id: str, state: _LSARequestState) -> torch.Tensor | None:
        if state.scores is None:
            return None
        n = self.planner.total_chunks(req_id)
        scores = list(state.scores[:n]) + [0.0] * max(0, n - len(state.scores))
        state.scores = None  # each score vector drives one refresh
        return torch.tensor(scores, dtype=torch.float32)  # [n_chunks]

    def _refresh(
        self, req_id: str, state: _LSARequestState
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        planner = self.planner
        scores = self._chunk_scores(req_id, state) if planner.needs_scores(req_id) else None
        if scores is None and planner.needs_scores(req_id):
            try:
                plan = planner.refresh(req_id)  # reuse the last selection
            except ValueError:
                # No Memory Indexer output yet: keep every chunk this round rather
                # than guess; a later refresh with scores offloads.
                self._deltas.unscored_refreshes += 1
                logger.warning_once(
                    "LSA refresh without Memory Indexer scores; keeping the request "
                    "fully resident until scores arrive (is the LSA model variant "
                    "installed?)."
                )
                n = planner.total_chunks(req_id)
                scores = torch.ones(n, dtype=torch.float32)
                plan = planner.refresh(req_id, scores)
        else:
            plan = planner.refresh(req_id, scores)
        if self._trace.enabled:
            self._trace.write(
                event="refresh",
                req_id=req_id,
                prompt_tokens=state.prompt_tokens,
                num_tokens=planner.num_tokens(req_id),
                scores=None if scores is None else scores.tolist(),
                target=list(plan.target_chunks),
                fetch=list(plan.fetch_chunks),
                evict=list(plan.evict_chunks),
                fallback=None if plan.fallback is None else plan.fallback.value,
            )
        if plan.evict_chunks:
            # Evicting only masks the chunk (its bytes are in the cold pool): it
            # cannot fail, so it settles now.
            planner.complete_evict(req_id, plan.evict_chunks)
            self._deltas.evicted_chunks += len(plan.evict_chunks)
        return plan.fetch_chunks, plan.evict_chunks

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LSAConnectorMetadata:
        # Fetches load before this step's forward, not after it.
        scheduler_output.has_sync_kv_loads = True
        for req_id, state in self._requests.items():
            self._settle(req_id, state, failed=False)  # no report = success

        for preempted in scheduler_output.preempted_req_ids or ():
            # vLLM recomputes a preempted request from its prompt; its chunks are
            # rebuilt and stored again, so start over.
            self._release(preempted)

        num_computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            num_computed[new.req_id] = new.num_computed_tokens
            if new.req_id in self._requests:
                self._release(new.req_id)
            prompt = self._prompt_tokens(new.req_id, new.prompt_token_ids)
            self._admit(new.req_id, prompt, self._group_block_ids(new.block_ids))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            num_computed[req_id] = cached.num_computed_tokens[i]
            new_ids = cached.new_block_ids[i]
            state = self._requests.get(req_id)
            if req_id in cached.resumed_req_ids or state is None:
                self._release(req_id)
                prompt = self._prompt_tokens(req_id, None)
                ids = self._group_block_ids(new_ids) if new_ids else [
                    [] for _ in self.layout.groups
                ]
                self._admit(req_id, prompt, ids)
            elif new_ids is not None:
                for blocks, added in zip(state.block_ids, self._group_block_ids(new_ids)):
                    blocks.extend(added)

        steps: list[LSARequestStep] = []
        refresh_next: list[str] = []
        targets: list[RefreshTarget] = []
        patches: list[BlockTablePatch] = []
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            computed = num_computed.get(req_id, 0)
            fetch: tuple[int, ...] = ()
            evict: tuple[int, ...] = ()
            if not state.in_planner and computed >= state.prompt_tokens:
                self.planner.add_request(req_id, state.prompt_tokens)
                state.in_planner = True
                if state.unoffloadable:
                    self.planner.cold_pool_full(req_id)
            if state.in_planner:
                fetch, evict = self._advance(req_id, state, computed)
            # Completed chunks go to the cold pool; their blocks are intact.
            completed = computed // self.config.chunk_tokens
            store: tuple[int, ...] = ()
            if not state.unoffloadable and completed > state.stored_chunks:
                store = tuple(range(state.stored_chunks, completed))
                state.stored_chunks = completed
            store_blocks = tuple(self._chunk_blocks(state, c) for c in store)
            # Evicted chunks are named by the blocks they leave.
            evict_blocks = tuple(self._chunk_blocks(state, c) for c in evict)
            if self.block_return is not None:
                fetch = self._return_blocks(req_id, state, fetch, evict)
                patch = self.block_return.patch(req_id, state.block_ids[0])
                if patch is not None:
                    patches.append(patch)
            # Scores computed in this forward drive the refresh due next step.
            if (
                not state.in_planner and computed + n_sched >= state.prompt_tokens
            ) or (
                state.in_planner
                and self.planner.needs_scores(req_id)
                and state.steps_since_refresh + n_sched >= self.config.tau
            ):
                refresh_next.append(req_id)
                indexer_blocks = state.block_ids[self._indexer_group]
                if indexer_blocks:
                    # The last block: never a hole (decode chunks stay resident).
                    last = len(indexer_blocks) - 1
                    targets.append(
                        RefreshTarget(
                            req_id, indexer_blocks[last], computed + n_sched, last
                        )
                    )
            if store or fetch or evict:
                steps.append(
                    LSARequestStep(
                        req_id=req_id,
                        store=store_blocks,
                        fetch=tuple(self._chunk_blocks(state, c) for c in fetch),
                        evict=evict_blocks,
                        reserve_chunks=state.reserved_chunks,
                    )
                )
        freed, self._deltas.freed = tuple(self._deltas.freed), []
        block_return = self.block_return
        return LSAConnectorMetadata(
            requests=tuple(steps),
            finished_req_ids=freed,
            refresh_req_ids=tuple(refresh_next),
            refresh_targets=tuple(targets),
            null_block_id=None if block_return is None else block_return.null_block_id,
            block_table_patches=tuple(patches),
            released_block_ids=() if block_return is None else block_return.take_released(),
        )

    def _advance(
        self, req_id: str, state: _LSARequestState, computed: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Append decoded tokens up to `computed`, refreshing at each τ boundary.

        Returns this step's net (fetch, evict) sets. More than one refresh in a
        step (a catch-up of more than τ tokens) nets out: the last action wins.
        """
        planner = self.planner
        action: dict[int, bool] = {}  # chunk -> True fetch / False evict
        pending: tuple[int, ...] = ()
        while True:
            if planner.needs_refresh(req_id):
                fetch, evict = self._refresh(req_id, state)
                state.steps_since_refresh = 0
                action.update({c: True for c in fetch})
                action.update({c: False for c in evict})
                pending = fetch
            if computed - planner.num_tokens(req_id) <= 0:
                break
            if pending:
                # The worker loads every fetch of this step before the forward.
                planner.complete_fetch(req_id, pending, ok=True)
                pending = ()
            # One token at a time never runs past a due refresh.
            planner.append_tokens(req_id, 1)
            state.steps_since_refresh += 1
        state.pending_fetch = pending
        fetch = tuple(sorted(c for c, f in action.items() if f))
        evict = tuple(sorted(c for c, f in action.items() if not f))
        return fetch, evict

    def _prompt_tokens(self, req_id: str, prompt_token_ids: list[int] | None) -> int:
        request = self._vllm_requests.get(req_id)
        if request is not None:
            return int(request.num_prompt_tokens)
        if prompt_token_ids is None:
            raise AssertionError(f"request {req_id} has no prompt length")
        return len(prompt_token_ids)

    # ---- worker feedback -------------------------------------------------------

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if meta is None:
            return
        assert isinstance(meta, LSAConnectorWorkerMetadata)
        failed = set(meta.failed_fetch_req_ids)
        for req_id, state in self._requests.items():
            if req_id in failed:
                self._settle(req_id, state, failed=True)
                self._deltas.fallbacks += 1
        for req_id, selection in meta.selections.items():
            state = self._requests.get(req_id)
            if state is not None:
                self._record_selection(state, selection)

    @staticmethod
    def _record_selection(state: _LSARequestState, selection: ChunkSelection) -> None:
        state.scores = selection.chunk_scores
        state.num_selected_entries = selection.num_selected_entries

    # ---- stats -------------------------------------------------------------------

    def get_kv_connector_stats(self) -> LSAKVConnectorStats:
        planner_stats = self.planner.stats()
        stats = LSAKVConnectorStats()
        resident = planner_stats.resident_chunks
        total = planner_stats.total_chunks
        cold = sum(len(self.planner.cold_chunks(r)) for r in self.planner.request_ids())
        # DESIGN.md "Footprint", summed over the planner's live requests.
        footprint = self.planner.total_footprint()
        stats.record_levels(
            resident,
            total,
            cold,
            kv_bytes_gpu=footprint.kv_bytes_gpu,
            kv_bytes_full=footprint.kv_bytes_full,
        )
        if self._deltas.evicted_chunks:
            stats.record_evictions(self._deltas.evicted_chunks)
        fallbacks = planner_stats.fallbacks
        if fallbacks > self._fallbacks_seen:
            stats.record_fallbacks(fallbacks - self._fallbacks_seen)
            self._fallbacks_seen = fallbacks
        self._deltas.evicted_chunks = 0
        self._deltas.fallbacks = 0
        return stats

    def has_request(self, req_id: str) -> bool:
        return req_id in self._requests


__all__ = ["LSAConnectorScheduler"]
