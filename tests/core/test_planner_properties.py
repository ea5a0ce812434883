"""Property tests of ResidencyPlanner: a hypothesis RuleBasedStateMachine.

Random sequences of add, decode steps, refresh (random chunk scores, random entry
masks, or no input), fetch success and failure, evict completion, preemption, cold
pool full, recompute, finish and abort, over random tiny configs. Invariants, each
checked against an independent model of the spec:
1. after every event each chunk of each live request is in exactly one state and
   resident + cold + in flight == all chunks (as counts);
2. after every refresh resident ∪ fetching ⊇ always-resident, and whenever a request
   is ready for a forward, resident ⊇ always-resident (and every selected chunk);
3. every fetch set is exactly target − resident-before and every evict set exactly
   resident-before − target, disjoint, where target = selection ∪ always (or every
   chunk for a fully resident request / a too-large selection);
4. after finish/abort nothing of the request remains and its release plan lists
   every chunk for the cold pool and every device-held chunk for the hot pool;
5. stats counters equal the sums of the emitted sets.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.residency_planner import (
    ChunkState,
    RequestMode,
    ResidencyPlanner,
)


def _always(prompt: int, n_chunks: int, cfg: LSAConfig) -> set[int]:
    """DESIGN.md's always-resident set, written from the spec, not the planner."""
    closed = prompt // cfg.chunk_tokens
    out = {i for i in range(closed) if i < cfg.sink_chunks}
    if cfg.local_window_tokens:
        out |= {
            i
            for i in range(closed)
            if (i + 1) * cfg.chunk_tokens > prompt - cfg.local_window_tokens
        }
    return out | set(range(closed, n_chunks))


class _Model:
    def __init__(self, prompt: int) -> None:
        self.prompt = prompt
        self.mode = RequestMode.SPARSE
        self.refresh_due = True  # end of prefill
        self.steps = 0  # decode steps since the last refresh
        self.refreshes = 0  # gates the destructive events so requests live long
        self.last_selection: frozenset[int] | None = None


class PlannerMachine(RuleBasedStateMachine):
    @initialize(
        tau=st.integers(1, 4),
        chunk_tokens=st.sampled_from([4, 8, 12]),
        local_window_tokens=st.sampled_from([0, 8, 20]),
        sink_chunks=st.integers(0, 2),
        threshold=st.sampled_from([0.0, 0.3, 0.5]),
        cap=st.sampled_from([None, 1, 3]),
        fraction=st.sampled_from([1.0, 0.5]),
    )
    def setup(
        self,
        tau,
        chunk_tokens,
        local_window_tokens,
        sink_chunks,
        threshold,
        cap,
        fraction,
    ) -> None:
        self.cfg = LSAConfig(
            tau=tau,
            chunk_tokens=chunk_tokens,
            local_window_tokens=local_window_tokens,
            sink_chunks=sink_chunks,
            threshold=threshold,
            max_selected_chunks=cap,
            fallback_selected_fraction=fraction,
        )
        self.planner = ResidencyPlanner(self.cfg)
        self.chunk_bytes = self.planner.geometry.chunk_bytes(self.cfg.entries_per_chunk)
        self.models: dict[str, _Model] = {}
        self.next_id = 0
        self.fetched = self.evicted = self.failed = 0

    # ---- helpers ----------------------------------------------------------------

    def _pick(self, data, pred=lambda r: True) -> str | None:
        live = sorted(r for r in self.models if pred(r))
        return data.draw(st.sampled_from(live)) if live else None

    def _states(self, r: str) -> tuple[ChunkState, ...]:
        return self.planner.chunk_states(r)

    def _in(self, r: str, state: ChunkState) -> set[int]:
        return {i for i, s in enumerate(self._states(r)) if s is state}

    def _lived(self, refreshes: int) -> bool:
        """Destructive events wait for this many refreshes, so runs get deep."""
        return any(m.refreshes >= refreshes for m in self.models.values())

    def _refreshable(self, r: str) -> bool:
        return self._idle(r) and self.models[r].mode is not RequestMode.RECOMPUTE

    def _any(self, state: ChunkState) -> bool:
        return any(state in self._states(r) for r in self.models)

    def _idle(self, r: str) -> bool:
        return not self.planner.in_flight_chunks(r)

    # ---- rules ------------------------------------------------------------------

    @precondition(lambda self: len(self.models) < 3)
    @rule(prompt=st.integers(1, 120))
    def add(self, prompt: int) -> None:
        r = f"req{self.next_id}"
        self.next_id += 1
        self.planner.add_request(r, prompt)
        self.models[r] = _Model(prompt)
        assert self.planner.needs_refresh(r)

    @precondition(lambda self: any(map(self.planner.ready_for_forward, self.models)))
    @rule(data=st.data())
    def decode(self, data) -> None:
        r = self._pick(data, self.planner.ready_for_forward)
        if r is None:
            return
        before = self.planner.total_chunks(r)
        self.planner.append_tokens(r, 1)
        m = self.models[r]
        m.steps += 1
        m.refresh_due = m.steps == self.cfg.tau
        n = self.planner.total_chunks(r)
        assert n - before in (0, 1)
        assert self._in(r, ChunkState.RESIDENT) >= set(range(before, n))

    @precondition(lambda self: any(map(self._refreshable, self.models)))
    @rule(data=st.data())
    def refresh(self, data) -> None:
        r = self._pick(data, self._refreshable)
        if r is None:
            return
        m, cfg = self.models[r], self.cfg
        n = self.planner.total_chunks(r)
        everything = set(range(n))
        always = _always(m.prompt, n, cfg)
        historical = everything - always
        kind = data.draw(st.sampled_from(["scores", "mask", "none"]))
        if (
            m.mode is RequestMode.SPARSE
            and cfg.threshold > 0
            and m.last_selection is None
        ):
            kind = data.draw(st.sampled_from(["scores", "mask"]))
        scores = mask = None
        if kind == "scores":
            vals = data.draw(
                st.lists(
                    st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.9]), min_size=n, max_size=n
                )
            )
            scores, rank = torch.tensor(vals), vals
            picked = {i for i in historical if vals[i] >= cfg.threshold}
        elif kind == "mask":
            n_entries = self.planner.num_tokens(r) // cfg.compress_ratio
            bits = data.draw(
                st.lists(st.booleans(), min_size=n_entries, max_size=n_entries)
            )
            mask = torch.tensor(bits, dtype=torch.bool)
            epc = cfg.entries_per_chunk
            rank = [float(sum(bits[i * epc : (i + 1) * epc])) for i in range(n)]
            picked = {i for i in historical if rank[i] > 0}
        before = self._in(r, ChunkState.RESIDENT)
        plan = self.planner.refresh(r, scores, entry_mask=mask)
        m.refresh_due, m.steps = False, 0
        m.refreshes += 1
        # The model's target (invariant 3).
        if m.mode is not RequestMode.SPARSE:
            target = everything
        elif kind == "none" and cfg.threshold > 0:
            target = set(m.last_selection) | always
        else:
            if cfg.threshold == 0:
                picked = set(historical)
            elif cfg.max_selected_chunks is not None:
                event(f"cap {len(picked) > cfg.max_selected_chunks}")
                picked = set(
                    sorted(picked, key=lambda i: (-rank[i], i))[
                        : cfg.max_selected_chunks
                    ]
                )
            assert set(plan.selected_chunks) == picked
            too_large = (
                cfg.threshold > 0
                and historical
                and len(picked) / len(historical) > cfg.fallback_selected_fraction
            )
            target = everything if too_large else picked | always
            m.last_selection = frozenset(picked)
        assert set(plan.target_chunks) == target
        moves = f"fetch={bool(plan.fetch_chunks)} evict={bool(plan.evict_chunks)}"
        event(f"refresh {kind} {moves}")
        assert set(plan.fetch_chunks) == target - before
        assert set(plan.evict_chunks) == before - target
        assert not set(plan.fetch_chunks) & set(plan.evict_chunks)
        # Invariant 2: the always-resident set is resident or on its way.
        assert always <= self._in(r, ChunkState.RESIDENT) | self._in(
            r, ChunkState.FETCHING
        )
        self.fetched += len(plan.fetch_chunks)
        self.evicted += len(plan.evict_chunks)

    @precondition(lambda self: self._any(ChunkState.FETCHING))
    @rule(data=st.data(), ok=st.booleans())
    def complete_fetch(self, data, ok: bool) -> None:
        r = self._pick(data, lambda r: bool(self._in(r, ChunkState.FETCHING)))
        if r is None:
            return
        fetching = sorted(self._in(r, ChunkState.FETCHING))
        done = data.draw(st.lists(st.sampled_from(fetching), min_size=1, unique=True))
        self.planner.complete_fetch(r, done, ok=ok)
        m = self.models[r]
        if not ok:
            self.failed += len(done)
            if m.mode is RequestMode.SPARSE:
                m.refresh_due = True  # the refetch of every cold chunk
            m.mode = {
                RequestMode.SPARSE: RequestMode.FULL_RESIDENT,
                RequestMode.FULL_RESIDENT: RequestMode.RECOMPUTE,
            }.get(m.mode, m.mode)
            assert set(done) <= self._in(r, ChunkState.COLD)  # never lost, never read
        else:
            assert set(done) <= self._in(r, ChunkState.RESIDENT)
        assert self.planner.mode(r) is m.mode
        event(f"fetch ok={ok} -> {m.mode.value}")

    @precondition(lambda self: self._any(ChunkState.EVICTING))
    @rule(data=st.data())
    def complete_evict(self, data) -> None:
        r = self._pick(data, lambda r: bool(self._in(r, ChunkState.EVICTING)))
        if r is None:
            return
        evicting = sorted(self._in(r, ChunkState.EVICTING))
        done = data.draw(st.lists(st.sampled_from(evicting), min_size=1, unique=True))
        self.planner.complete_evict(r, done)
        assert set(done) <= self._in(r, ChunkState.COLD)

    @precondition(lambda self: self._lived(1))
    @rule(data=st.data())
    def preempt(self, data) -> None:
        r = self._pick(data, lambda r: self.models[r].refreshes >= 1)
        if r is None:
            return
        held = {i for i, s in enumerate(self._states(r)) if s is not ChunkState.COLD}
        plan = self.planner.preempt(r)
        assert set(plan.hot_chunks) == held and plan.cold_chunks == ()
        assert self._in(r, ChunkState.COLD) == set(range(self.planner.total_chunks(r)))
        assert not self.planner.ready_for_forward(r)
        self.models[r].refresh_due, self.models[r].steps = True, 0

    @precondition(lambda self: self._lived(3))
    @rule(data=st.data())
    def cold_pool_full(self, data) -> None:
        r = self._pick(data, lambda r: self.models[r].refreshes >= 3)
        if r is None:
            return
        self.planner.cold_pool_full(r)
        m = self.models[r]
        if m.mode is RequestMode.SPARSE:
            m.mode, m.refresh_due = RequestMode.FULL_RESIDENT, True
        assert self.planner.mode(r) is m.mode

    @precondition(
        lambda self: any(m.mode is RequestMode.RECOMPUTE for m in self.models.values())
    )
    @rule(data=st.data())
    def recompute(self, data) -> None:
        r = self._pick(
            data,
            lambda r: self._idle(r) and self.models[r].mode is RequestMode.RECOMPUTE,
        )
        if r is None:
            return
        self.planner.complete_recompute(r)
        self.models[r].mode = RequestMode.FULL_RESIDENT
        self.models[r].refresh_due, self.models[r].steps = True, 0
        assert self._in(r, ChunkState.RESIDENT) == set(
            range(self.planner.total_chunks(r))
        )

    @precondition(lambda self: self._lived(4))
    @rule(data=st.data(), abort=st.booleans())
    def finish(self, data, abort: bool) -> None:
        r = self._pick(data, lambda r: self.models[r].refreshes >= 4)
        if r is None:
            return
        n = self.planner.total_chunks(r)
        held = {i for i, s in enumerate(self._states(r)) if s is not ChunkState.COLD}
        plan = self.planner.abort(r) if abort else self.planner.finish(r)
        assert plan.cold_chunks == tuple(range(n)) and set(plan.hot_chunks) == held
        del self.models[r]
        assert r not in self.planner and r not in self.planner.request_ids()

    # ---- invariants -------------------------------------------------------------

    @invariant()
    def chunk_counts_add_up(self) -> None:
        if not hasattr(self, "planner"):
            return
        assert set(self.planner.request_ids()) == set(self.models)
        for r, m in self.models.items():
            n = self.planner.total_chunks(r)
            assert n == -(-self.planner.num_tokens(r) // self.cfg.chunk_tokens)
            resident = len(self.planner.resident_chunks(r))
            cold = len(self.planner.cold_chunks(r))
            in_flight = len(self.planner.in_flight_chunks(r))
            assert resident + cold + in_flight == n
            assert self.planner.needs_refresh(r) is m.refresh_due  # tau timing
            if self.planner.ready_for_forward(r):
                attended = set(self.planner.resident_chunks(r))
                assert _always(m.prompt, n, self.cfg) <= attended
                if m.mode is not RequestMode.SPARSE:
                    assert attended == set(range(n))
                elif m.last_selection is not None:
                    assert m.last_selection <= attended

    @invariant()
    def counters_match_emitted_sets(self) -> None:
        if not hasattr(self, "planner"):
            return
        s = self.planner.stats()
        assert (s.fetched_chunks, s.evicted_chunks) == (self.fetched, self.evicted)
        assert s.fetched_bytes == self.fetched * self.chunk_bytes
        assert s.evicted_bytes == self.evicted * self.chunk_bytes
        assert s.fetch_failed_chunks == self.failed
        assert s.live_requests == len(self.models)
        assert s.resident_chunks + s.in_flight_chunks <= s.total_chunks


PlannerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,  # fixed seed: the same sequences on every run
    suppress_health_check=[HealthCheck.too_slow],
)
TestPlannerMachine = PlannerMachine.TestCase
