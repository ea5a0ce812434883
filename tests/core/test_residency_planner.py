"""Unit tests of ResidencyPlanner on hand-sized requests.

Scenarios:
- always-resident layout: sink chunks, local window of the prompt, partial last prompt
  chunk, and chunks that appear during decode;
- tau trigger: a refresh at the end of prefill, then exactly every tau decode steps;
  appending past a due refresh is refused;
- incremental plans: the second refresh fetches and evicts only the difference;
- cap (max_selected_chunks) keeps the highest scores, ties to the earlier chunk;
  max_selected_fraction caps at max(1, round(f x historical)), the smaller cap wins;
- fallback_selected_fraction: a too-large selection keeps the request whole for that
  refresh only, and is counted;
- threshold 0: every chunk resident, nothing evicted, no fallback counted, cap ignored;
- Jaccard overlap of consecutive selections on a hand case;
- entry-level inputs: entry mask -> chunk selection, entries -> chunk scores (max);
- fetch failure -> fully resident + refetch; second failure -> recompute;
- cold pool full -> fully resident, nothing evicted again;
- preemption -> all cold, refresh without scores reuses the last selection;
- finish and abort -> release plans; the request is forgotten;
- footprint view via request_footprint; bytes counters via KVGeometry.chunk_bytes;
- errors: unknown ids, double add, bad inputs, completions of chunks not in flight.
"""

from __future__ import annotations

import pytest
import torch

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import KVGeometry, request_footprint
from vllm_flashmemory.core.residency_planner import (
    ChunkState,
    FallbackReason,
    PlannerStateError,
    ReleaseReason,
    RequestMode,
    ResidencyPlanner,
    chunk_mask_from_entries,
    chunk_scores_from_entries,
)

# 16-token chunks of 4 entries; a 32-token local window = 2 chunks.
TINY = LSAConfig(tau=4, chunk_tokens=16, local_window_tokens=32, sink_chunks=1)
PROMPT = 100  # chunks 0..6; 0..5 complete, 6 partial (4 tokens)


def _scores(n: int, hot: dict[int, float]) -> torch.Tensor:
    s = torch.zeros(n)
    for i, v in hot.items():
        s[i] = v
    return s


def _planner(**changes: object) -> ResidencyPlanner:
    planner = ResidencyPlanner(TINY.replace(**changes))
    planner.add_request("r", PROMPT)
    return planner


def _settle(planner: ResidencyPlanner, plan) -> None:
    planner.complete_fetch(plan.req_id, plan.fetch_chunks, ok=True)
    planner.complete_evict(plan.req_id, plan.evict_chunks)


def test_always_resident_layout_and_decode_chunks() -> None:
    planner = _planner()
    # sink 0; local window tokens 68..99 -> chunks 4, 5; partial chunk 6 (decode
    # writes into it).
    assert planner.always_resident_chunks("r") == (0, 4, 5, 6)
    assert planner.historical_chunks("r") == (1, 2, 3)
    assert planner.total_chunks("r") == 7
    assert planner.resident_chunks("r") == tuple(range(7))  # prefill wrote all
    _settle(planner, planner.refresh("r", _scores(7, {})))
    planner.append_tokens("r", 4)  # 104 tokens: still chunk 6
    assert planner.total_chunks("r") == 7
    _settle(planner, planner.refresh("r", _scores(7, {})))
    planner.append_tokens("r", 4)  # 108 tokens
    _settle(planner, planner.refresh("r", _scores(7, {})))
    planner.append_tokens("r", 4)  # 112 tokens: chunk 6 full, no chunk 7 yet
    assert planner.total_chunks("r") == 7
    _settle(planner, planner.refresh("r", _scores(7, {})))
    planner.append_tokens("r", 1)  # 113 tokens: chunk 7 appears, resident
    assert planner.total_chunks("r") == 8
    assert planner.chunk_states("r")[7] is ChunkState.RESIDENT
    assert 7 in planner.always_resident_chunks("r")


def test_tau_trigger_end_of_prefill_then_every_tau_steps() -> None:
    planner = _planner()
    assert planner.needs_refresh("r") and not planner.ready_for_forward("r")
    due_at: list[int] = []
    for step in range(1, 13):
        if planner.needs_refresh("r"):
            _settle(
                planner, planner.refresh("r", _scores(planner.total_chunks("r"), {}))
            )
        planner.append_tokens("r")
        if planner.needs_refresh("r"):
            due_at.append(step)
    assert due_at == [4, 8, 12]
    with pytest.raises(PlannerStateError, match="refresh due"):
        planner.append_tokens("r")


def test_append_may_not_skip_a_refresh() -> None:
    planner = _planner()
    _settle(planner, planner.refresh("r", _scores(7, {})))
    planner.append_tokens("r", 3)
    with pytest.raises(PlannerStateError, match="append at most 1"):
        planner.append_tokens("r", 2)


def test_second_refresh_emits_only_the_difference() -> None:
    planner = _planner()
    first = planner.refresh("r", _scores(7, {1: 0.9, 2: 0.7}))
    assert first.fetch_chunks == () and first.evict_chunks == (3,)
    assert first.target_chunks == (0, 1, 2, 4, 5, 6)
    _settle(planner, first)
    for _ in range(4):
        planner.append_tokens("r")
    second = planner.refresh("r", _scores(7, {2: 0.6, 3: 0.5}))  # >= threshold
    assert second.fetch_chunks == (3,)
    assert second.evict_chunks == (1,)
    assert planner.chunk_states("r")[3] is ChunkState.FETCHING
    assert not planner.ready_for_forward("r")  # selected KV not there yet
    _settle(planner, second)
    assert planner.resident_chunks("r") == (0, 2, 3, 4, 5, 6)
    assert planner.cold_chunks("r") == (1,)


def test_cap_keeps_highest_scores() -> None:
    planner = ResidencyPlanner(
        TINY.replace(local_window_tokens=0, max_selected_chunks=2)
    )
    planner.add_request("r", 16 * 8)  # 8 complete chunks; historical 1..7
    plan = planner.refresh("r", _scores(8, {1: 0.6, 3: 0.95, 4: 0.7, 5: 0.7, 7: 0.55}))
    # 3 (0.95) then the tie 4/5 at 0.7 goes to the earlier chunk.
    assert plan.selected_chunks == (3, 4)
    assert plan.target_chunks == (0, 3, 4)
    assert planner.stats().selected_chunks == 2


@pytest.mark.parametrize(
    "fraction, chunks, want",
    [(0.3, None, (3, 4)), (0.01, None, (3,)), (1.0, 2, (3, 4)), (0.5, 3, (3, 4, 5))],
)
def test_fraction_cap_keeps_the_top_share(fraction, chunks, want) -> None:
    """7 historical chunks: 0.3 -> round(2.1) = 2; 0.01 -> at least 1; with both caps
    the smaller wins (1.0 -> 7 vs 2; 0.5 -> round(3.5) = 4 vs 3)."""
    planner = ResidencyPlanner(TINY.replace(
        local_window_tokens=0, threshold=0.001, max_selected_chunks=chunks,
        max_selected_fraction=fraction,
    ))
    planner.add_request("r", 16 * 8)  # 8 complete chunks; historical 1..7
    plan = planner.refresh("r", _scores(8, {1: 0.6, 3: 0.95, 4: 0.7, 5: 0.7, 7: 0.55}))
    assert plan.selected_chunks == want


def test_fallback_fraction_is_per_refresh_and_counted() -> None:
    planner = _planner(fallback_selected_fraction=0.5)
    plan = planner.refresh("r", _scores(7, {1: 0.9, 2: 0.9}))  # 2/3 > 0.5
    assert plan.fallback is FallbackReason.SELECTION_TOO_LARGE
    assert plan.evict_chunks == () and plan.target_chunks == tuple(range(7))
    assert planner.stats().fallbacks == 1
    for _ in range(4):
        planner.append_tokens("r")
    plan = planner.refresh("r", _scores(7, {1: 0.9}))  # 1/3 <= 0.5: sparse again
    assert plan.fallback is None and plan.evict_chunks == (2, 3)
    assert planner.mode("r") is RequestMode.SPARSE
    assert planner.stats().fallbacks_selection_too_large == 1


def test_threshold_zero_keeps_everything_resident() -> None:
    planner = _planner(
        threshold=0.0, max_selected_chunks=1, fallback_selected_fraction=0.1
    )
    assert not planner.needs_scores("r")
    plan = planner.refresh("r")
    assert plan.evict_chunks == () and plan.fetch_chunks == ()
    assert plan.selected_chunks == (1, 2, 3) and plan.fallback is None
    plan = planner.refresh("r", _scores(7, {}))  # scores of 0 still select all
    assert plan.evict_chunks == ()
    assert planner.resident_chunks("r") == tuple(range(7))
    assert planner.stats().fallbacks == 0


def test_jaccard_of_consecutive_selections() -> None:
    planner = ResidencyPlanner(TINY.replace(local_window_tokens=0, sink_chunks=0))
    planner.add_request("r", 16 * 6)  # historical 0..5
    a = planner.refresh("r", _scores(6, {1: 1, 2: 1, 3: 1}))
    assert a.jaccard is None
    _settle(planner, a)
    b = planner.refresh("r", _scores(6, {2: 1, 3: 1, 4: 1}))
    assert b.jaccard == pytest.approx(2 / 4)
    _settle(planner, b)
    c = planner.refresh("r", _scores(6, {2: 1, 3: 1, 4: 1}))
    assert c.jaccard == 1.0
    stats = planner.stats()
    assert stats.jaccard_samples == 2
    assert stats.mean_jaccard == pytest.approx(0.75)


def test_entry_mask_selects_chunks_and_counts_entries() -> None:
    planner = _planner(max_selected_chunks=1)
    mask = torch.zeros(PROMPT // 4, dtype=torch.bool)  # 25 entries, 4 per chunk
    mask[[5, 9, 10, 24]] = True  # chunk 1: one entry, chunk 2: two, chunk 6: one
    plan = planner.refresh("r", entry_mask=mask)
    assert plan.selected_chunks == (2,)  # the cap ranks by selected entries
    assert planner.stats().selected_entries == 3  # historical chunks' entries only
    _settle(planner, plan)
    with pytest.raises(ValueError, match=r"entry_mask must have shape \[25\]"):
        planner.refresh("r", entry_mask=mask[:-1])


def test_entries_to_chunks_helpers() -> None:
    torch.manual_seed(0)
    entry = torch.tensor([0.1, 0.7, 0.2, 0.3, 0.9, 0.0, 0.4])  # 2 full chunks + 3
    scores = chunk_scores_from_entries(entry, entries_per_chunk=3, n_chunks=4)
    assert scores[:3].tolist() == pytest.approx([0.7, 0.9, 0.4])
    assert scores[3] == -float("inf")  # no written entries
    mask = chunk_mask_from_entries(entry > 0.5, entries_per_chunk=3, n_chunks=4)
    assert mask.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="hold only 6"):
        chunk_scores_from_entries(entry, entries_per_chunk=3, n_chunks=2)
    with pytest.raises(TypeError, match="torch.bool"):
        chunk_mask_from_entries(entry, entries_per_chunk=3, n_chunks=4)


def test_fetch_failure_falls_back_then_recomputes() -> None:
    planner = _planner()
    _settle(planner, planner.refresh("r", _scores(7, {1: 0.9})))  # 2, 3 cold
    planner.preempt("r")
    plan = planner.refresh("r")  # resume: reuse selection {1}
    assert plan.fetch_chunks == (0, 1, 4, 5, 6)
    planner.complete_fetch("r", [0, 4, 5, 6], ok=True)
    planner.complete_fetch("r", [1], ok=False)
    assert planner.mode("r") is RequestMode.FULL_RESIDENT
    assert planner.needs_refresh("r") and not planner.needs_scores("r")
    assert planner.stats().fallbacks_fetch_failed == 1
    plan = planner.refresh("r")
    assert plan.fetch_chunks == (1, 2, 3) and plan.evict_chunks == ()
    assert plan.fallback is FallbackReason.FETCH_FAILED
    planner.complete_fetch("r", [2, 3], ok=True)
    planner.complete_fetch("r", [1], ok=False)
    assert planner.mode("r") is RequestMode.RECOMPUTE
    assert not planner.ready_for_forward("r")
    with pytest.raises(PlannerStateError, match="flagged for recompute"):
        planner.refresh("r")
    planner.complete_recompute("r")
    assert planner.resident_chunks("r") == tuple(range(7))
    assert planner.stats().recomputes == 1


def test_cold_pool_full_keeps_request_whole() -> None:
    planner = _planner()
    planner.cold_pool_full("r")
    plan = planner.refresh("r")  # no scores needed
    assert plan.evict_chunks == () and plan.fallback is FallbackReason.COLD_POOL_FULL
    assert planner.stats().fallbacks_cold_pool_full == 1
    planner.cold_pool_full("r")  # idempotent: counted once
    assert planner.stats().fallbacks_cold_pool_full == 1


def test_preemption_drops_residency_and_cancels_in_flight() -> None:
    planner = _planner()
    plan = planner.refresh("r", _scores(7, {1: 0.9}))
    assert plan.evict_chunks == (2, 3)
    release = planner.preempt("r")
    assert release.reason is ReleaseReason.PREEMPTED
    assert release.hot_chunks == tuple(range(7))
    assert release.cancelled_evict_chunks == (2, 3) and release.cold_chunks == ()
    assert planner.cold_chunks("r") == tuple(range(7))
    assert not planner.ready_for_forward("r")
    with pytest.raises(ValueError, match="is cold, not evicting"):
        planner.complete_evict("r", [2])


def test_finish_and_abort_forget_the_request() -> None:
    planner = _planner()
    plan = planner.refresh("r", _scores(7, {1: 0.9}))
    planner.complete_evict("r", [2])
    release = planner.finish("r")
    assert release.cold_chunks == tuple(range(7))
    assert release.hot_chunks == (0, 1, 3, 4, 5, 6)
    assert release.cancelled_evict_chunks == (3,)
    assert "r" not in planner and plan.evict_chunks == (2, 3)
    with pytest.raises(ValueError, match="'r' is not a live request"):
        planner.refresh("r")
    planner.add_request("r", 10)  # the id may be reused once forgotten
    assert planner.abort("r").reason is ReleaseReason.ABORTED
    assert planner.request_ids() == () and planner.stats().total_chunks == 0


def test_footprint_and_byte_counters() -> None:
    geometry = KVGeometry()
    planner = _planner()
    _settle(planner, planner.refresh("r", _scores(7, {2: 0.8})))
    # resident 0, 2, 4, 5 (4 entries each) and partial 6 (1 entry of 100 // 4 = 25)
    assert planner.footprint("r") == request_footprint(geometry, PROMPT, 16, 17, 5)
    stats = planner.stats()
    assert stats.evicted_chunks == 2
    assert stats.evicted_bytes == 2 * geometry.chunk_bytes(TINY.entries_per_chunk)
    assert stats.resident_chunk_ratio == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="csa_compress_ratio=8 differs"):
        planner.footprint("r", KVGeometry(csa_compress_ratio=8))


def test_errors_name_the_value_and_the_fix() -> None:
    planner = _planner()
    with pytest.raises(ValueError, match="'r' is already live"):
        planner.add_request("r", 10)
    with pytest.raises(ValueError, match="'nope' is not a live request"):
        planner.append_tokens("nope")
    with pytest.raises(ValueError, match="prompt_tokens=0 must be at least 1"):
        planner.add_request("s", 0)
    with pytest.raises(ValueError, match=r"shape \[7\]"):
        planner.refresh("r", torch.zeros(6))
    with pytest.raises(ValueError, match="contain NaN"):
        planner.refresh("r", torch.full((7,), float("nan")))
    with pytest.raises(ValueError, match="both chunk_scores and entry_mask"):
        planner.refresh(
            "r", torch.zeros(7), entry_mask=torch.zeros(25, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="no earlier selection to reuse"):
        planner.refresh("r")
    plan = planner.refresh("r", _scores(7, {}))
    with pytest.raises(PlannerStateError, match=r"chunks \[1, 2, 3\] in flight"):
        planner.refresh("r", _scores(7, {}))
    with pytest.raises(
        ValueError, match="chunk 0 of request 'r' is resident, not fetching"
    ):
        planner.complete_fetch("r", [0], ok=True)
    with pytest.raises(ValueError, match="chunk id 9 is not a chunk"):
        planner.complete_evict("r", [9])
    with pytest.raises(PlannerStateError, match="not flagged for recompute"):
        planner.complete_recompute("r")
    assert plan.evict_chunks == (1, 2, 3)
    with pytest.raises(ValueError, match="compress_ratio"):
        ResidencyPlanner(TINY, KVGeometry(csa_compress_ratio=2))
