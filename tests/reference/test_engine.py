"""Reference engine invariants on the tiny DeepSeek-V4 model (random weights, CPU).

Scenarios:
- threshold 0 (everything resident): lsa and full give exactly the greedy tokens of
  the unmodified model with the same chunked prefill (DESIGN.md invariant 1);
  index_topk (64) >= entries (64) so top-k ties cannot reorder picks.
- chunks round-trip bit-exactly through pack -> ColdPool -> HotPool -> restore, and
  an evict + restore of every historical chunk leaves the cache bit-identical.
- a poisoned cold chunk never changes the logits while residency is enforced, and
  does change them when it is not (so the poison would be seen if attended).
- footprints equal request_footprint's of the always-resident set (recency).
- random keeps round(10%) of the historical chunks, oracle the top-mass ones,
  quest at most its budget per layer; lsa's selection moves chunks both ways.
- top-K lsa (`lsa<pct>`) keeps exactly oracle<pct>'s count, the chunks whose best
  entry the Memory Indexer scores highest; at 100% it gives full's tokens.
- the first window `harvest --prompt-tokens P-1` + `label` make is the end-of-prefill
  refresh: same hidden states, query position and visible entries.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from vllm_flashmemory.core.cold_pool import ColdPool, ColdPoolConfig
from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.footprint import request_footprint
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from vllm_flashmemory.dsv4.tiny import TINY, build_model
from vllm_flashmemory.reference.engine import EngineConfig, ReferenceEngine, geometry_for
from vllm_flashmemory.reference.methods import Method, MethodSpec

PROMPT_TOKENS = 256
CHUNK_TOKENS = 16  # 4 entries; 16 chunks per prompt
LOCAL_TOKENS = 64  # chunks 12..15 always resident, plus sink chunk 0
NEW_TOKENS = 6
PREFILL_CHUNK = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY, seed=0)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return [0] + torch.randint(3, 259, (PROMPT_TOKENS - 1,), generator=gen).tolist()


@pytest.fixture(scope="module")
def indexer(model) -> MemoryIndexer:
    torch.manual_seed(2)
    cfg = MemoryIndexerConfig(
        hidden_size=model.config.hidden_size, rank=32, n_heads=4,
        rope_original_max_position=4096, layer_ids=(0, 1, 2, 3),
    )
    return MemoryIndexer(cfg).eval()


def _lsa(threshold: float = 0.5) -> LSAConfig:
    return LSAConfig(
        tau=4, threshold=threshold, indexer_layers=(0, 1, 2, 3),
        local_window_tokens=LOCAL_TOKENS, chunk_tokens=CHUNK_TOKENS,
    )


def _engine(model, indexer, threshold=0.5, cold_fill=0.0) -> ReferenceEngine:
    cfg = EngineConfig(lsa=_lsa(threshold), prefill_chunk_tokens=PREFILL_CHUNK,
                       max_new_tokens=NEW_TOKENS, cold_fill=cold_fill)
    return ReferenceEngine(model, cfg, indexer)


@torch.no_grad()
def _plain_greedy(model, prompt: list[int]) -> tuple[int, ...]:
    cache = DynamicCache(config=model.config)
    ids = torch.tensor(prompt)[None]
    for s in range(0, len(prompt), PREFILL_CHUNK):
        out = model(input_ids=ids[:, s : s + PREFILL_CHUNK], past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < NEW_TOKENS and tokens[-1] != model.config.eos_token_id:
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                    use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tuple(tokens)


@pytest.fixture(scope="module")
def baseline(model, prompt) -> tuple[int, ...]:
    return _plain_greedy(model, prompt)


@pytest.fixture(scope="module")
def engine(model, indexer):
    eng = _engine(model, indexer)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prefilled(engine, prompt):
    return engine.prefill(prompt)


def test_threshold_zero_matches_unmodified_model(model, indexer, prompt, baseline):
    """lsa at threshold 0 and full reproduce the plain model's greedy tokens."""
    with _engine(model, indexer, threshold=0.0) as eng:
        pf = eng.prefill(prompt)
        lsa = eng.generate(pf, MethodSpec(Method.LSA))
        full = eng.generate(pf, MethodSpec(Method.FULL))
    assert lsa.tokens == baseline
    assert full.tokens == baseline
    assert lsa.resident_chunk_ratio == 1.0 and lsa.evicted_chunks == 0
    assert len(baseline) == NEW_TOKENS


def test_chunks_round_trip_bit_exact(engine, prefilled):
    """pack -> ColdPool -> restore is bit-exact; evict really changes the cache."""
    cache = copy.deepcopy(prefilled.cache)
    before = [(t.clone(), i.clone()) for t, i in _csa_tensors(cache)]
    ids = [1, 2, 7, 11]
    data = cache.pack_chunks(ids)
    assert data.shape == (4, cache.chunk_bytes) and data.dtype == torch.uint8
    pool = ColdPool(ColdPoolConfig(capacity_gib=0.01, chunk_bytes=cache.chunk_bytes,
                                   backend="torch"))
    pool.reserve("r", len(ids))
    pool.batched_put("r", ids, data)
    cache.evict(ids)
    assert cache.cold_chunks == frozenset(ids)
    assert not all(torch.equal(a, t) for (a, _), (t, _) in zip(before, _csa_tensors(cache)))
    back = pool.batched_get("r", ids)
    assert torch.equal(back, data)
    cache.restore(ids, back)
    for (t0, i0), (t1, i1) in zip(before, _csa_tensors(cache)):
        assert torch.equal(t0, t1) and torch.equal(i0, i1)
    assert cache.cold_chunks == frozenset()
    pool.close()


def _csa_tensors(cache):
    for layer in cache.csa_layers:
        c = cache.layers[layer].compressed_kv
        yield c["compressor"], c["indexer"]


@torch.no_grad()
def test_poisoned_cold_chunk_is_never_attended(engine, prefilled):
    """Cold entries filled with 0 or with huge values give identical logits while
    the hooks enforce residency; without enforcement the poison shows."""
    cold = [1, 3, 5, 8]

    def decode_logits(fill: float, enforce: bool) -> torch.Tensor:
        cache = copy.deepcopy(prefilled.cache)
        cache.cold_fill = fill
        cache.evict(cold)
        st = engine.hooks.state
        engine.hooks.current_cache = cache
        st.active = enforce
        try:
            out = engine.model(input_ids=torch.tensor([[prefilled.first_token]]),
                               past_key_values=cache, use_cache=True)
        finally:
            st.active = False
            engine.hooks.current_cache = None
        return out.logits[0, -1]

    clean = decode_logits(0.0, enforce=True)
    poisoned = decode_logits(3e3, enforce=True)
    assert torch.equal(clean, poisoned)
    unmasked = decode_logits(3e3, enforce=False)
    assert not torch.allclose(clean, unmasked)


def test_poison_does_not_change_generated_tokens(model, indexer, prompt):
    """recency evicts every historical chunk; poisoning them changes no token."""
    with _engine(model, indexer, cold_fill=0.0) as a:
        ra = a.generate(a.prefill(prompt), MethodSpec(Method.RECENCY))
    with _engine(model, indexer, cold_fill=5e3) as b:
        rb = b.generate(b.prefill(prompt), MethodSpec(Method.RECENCY))
    assert ra.tokens == rb.tokens
    assert ra.evicted_chunks == ra.historical_chunks == 16 - 5


def test_footprint_equals_request_footprint(engine, prefilled, model):
    """recency's first footprint is request_footprint of the always-resident set."""
    r = engine.generate(prefilled, MethodSpec(Method.RECENCY))
    geometry = geometry_for(model.config, 4)
    always = 1 + LOCAL_TOKENS // CHUNK_TOKENS  # sink + local window
    want = request_footprint(geometry, PROMPT_TOKENS, CHUNK_TOKENS,
                             always * CHUNK_TOKENS // 4, always,
                             memory_indexer_keys_resident=False)
    assert r.footprints[0] == want
    assert r.footprints[0].resident_chunk_ratio == pytest.approx(always / 16)
    assert r.mean_selected_chunks == 0
    full = engine.generate(prefilled, MethodSpec(Method.FULL))
    assert full.footprints[0].kv_bytes_gpu == full.footprints[0].kv_bytes_full
    assert r.kv_bytes_gpu < full.kv_bytes_gpu


def test_fixed_selections_keep_their_budget(engine, prefilled):
    """random keeps round(10%) of 11 historical chunks = 1; oracle the top mass."""
    full = engine.generate(prefilled, MethodSpec(Method.FULL), record_attention=True)
    assert full.chunk_attention_mass is not None
    mass = full.chunk_attention_mass
    assert len(mass) >= 16 and sum(mass) > 0
    rnd = engine.generate(prefilled, MethodSpec(Method.RANDOM, 0.1))
    assert rnd.mean_selected_chunks == 1
    oracle = engine.generate(prefilled, MethodSpec(Method.ORACLE, 0.25),
                             oracle_chunk_mass=mass)
    assert oracle.mean_selected_chunks == round(0.25 * 11)
    quest = engine.generate(prefilled, MethodSpec(Method.QUEST, quest_budget_chunks=2))
    # Union over 4 CSA layers of at most 2 picks each.
    assert 0 < quest.mean_selected_chunks <= 8
    assert quest.tokens[0] == full.tokens[0]  # the prefill's token is shared


def test_lsa_selection_drives_pool_moves(engine, prefilled):
    """lsa evicts the unselected historical chunks at the end of prefill."""
    r = engine.generate(prefilled, MethodSpec(Method.LSA))
    assert r.refreshes >= 2  # end of prefill + every tau=4 decode steps
    first_selected = r.historical_chunks - r.evicted_chunks + r.fetched_chunks
    assert 0 <= first_selected <= r.historical_chunks
    assert 0 < r.resident_chunk_ratio <= 1


def test_top_k_lsa_keeps_the_highest_scored_chunks(engine, prefilled, monkeypatch):
    """lsa25 keeps round(25% of 11) = 3 historical chunks at every forward: those
    whose best entry scores highest, refreshed with the scores of each refresh."""
    from vllm_flashmemory.core.residency_planner import ResidencyPlanner

    plans = []
    real_refresh = ResidencyPlanner.refresh

    def spy(self, req_id, chunk_scores=None, **kw):
        plan = real_refresh(self, req_id, chunk_scores, **kw)
        plans.append(plan)
        return plan

    calls = []

    def scores(planner, cache):  # entry e of chunk c scores (c * 7) % 11, one entry only
        calls.append(1)
        written = planner.num_tokens("req") // 4
        out = torch.zeros(written)
        for c in range(written // 4):
            out[4 * c + 1] = ((c * 7) % 11) / 11 + 0.01
        return out

    monkeypatch.setattr(ResidencyPlanner, "refresh", spy)
    monkeypatch.setattr(engine, "_lsa_entry_scores", scores)
    r = engine.generate(prefilled, MethodSpec(Method.LSA, 0.25))
    assert calls and r.mean_selected_chunks == 3 == round(0.25 * r.historical_chunks)
    historical = range(1, 12)  # sink chunk 0, local chunks 12..15
    want = sorted(sorted(historical, key=lambda c: -((c * 7) % 11))[:3])
    assert list(plans[0].selected_chunks) == want
    assert sorted(plans[0].evict_chunks) == sorted(set(historical) - set(want))
    assert r.label == "lsa25" and r.evicted_chunks == 8 and r.fetched_chunks == 0


def test_top_k_lsa_at_100_percent_matches_full(model, indexer, prompt, baseline):
    with _engine(model, indexer) as eng:
        pf = eng.prefill(prompt)
        r = eng.generate(pf, MethodSpec(Method.LSA, 1.0))
    assert r.tokens == baseline
    assert r.resident_chunk_ratio == 1.0 and r.evicted_chunks == 0


def test_engine_rejects_bad_inputs(model, indexer, prefilled):
    """Errors name the value and the fix."""
    with pytest.raises(ValueError, match="differs from the Memory Indexer"):
        ReferenceEngine(model, EngineConfig(lsa=_lsa().replace(indexer_layers=(0, 1))),
                        indexer)
    with pytest.raises(ValueError, match="model has 4 CSA layers"):
        ReferenceEngine(model, EngineConfig(lsa=_lsa().replace(indexer_layers=(9,))))
    with ReferenceEngine(model, EngineConfig(lsa=_lsa())) as eng:
        with pytest.raises(ValueError, match="needs a Memory Indexer"):
            eng.generate(prefilled, MethodSpec(Method.LSA))
        with pytest.raises(ValueError, match="attention mass"):
            eng.generate(prefilled, MethodSpec(Method.ORACLE, 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_matches_cpu(model, indexer, prompt, baseline):
    """The engine on the GPU (fp32): full and threshold-0 lsa equal the plain model's
    greedy tokens there, and every method's tokens equal the CPU engine's."""
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu_indexer = copy.deepcopy(indexer)
    specs = [MethodSpec(Method.FULL), MethodSpec(Method.LSA),
             MethodSpec(Method.RECENCY), MethodSpec(Method.RANDOM, 0.25)]

    def run(m, ind, threshold):
        with _engine(m, ind, threshold=threshold) as eng:
            pf = eng.prefill(prompt)
            full = eng.generate(pf, MethodSpec(Method.FULL), record_attention=True)
            out = {s.label: eng.generate(pf, s).tokens for s in specs}
            out["oracle25"] = eng.generate(
                pf, MethodSpec(Method.ORACLE, 0.25),
                oracle_chunk_mass=full.chunk_attention_mass).tokens
            return out

    gpu_zero = run(gpu_model, gpu_indexer, 0.0)
    assert gpu_zero["full"] == gpu_zero["lsa"] == _plain_greedy_on(gpu_model, prompt)
    assert run(gpu_model, gpu_indexer, 0.5) == run(model, indexer, 0.5)
    assert gpu_zero["full"] == baseline


@torch.no_grad()
def _plain_greedy_on(model, prompt: list[int]) -> tuple[int, ...]:
    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = torch.tensor(prompt, device=dev)[None]
    for s in range(0, len(prompt), PREFILL_CHUNK):
        out = model(input_ids=ids[:, s : s + PREFILL_CHUNK], past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < NEW_TOKENS and tokens[-1] != model.config.eos_token_id:
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=dev),
                    past_key_values=cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tuple(tokens)


def test_first_training_window_is_the_end_of_prefill_refresh(indexer, prompt, tmp_path):
    """What `flashmemory harvest --prompt-tokens P-1` + `label` train on is what the
    engine scores when it refreshes at the end of a P-token prefill: the hidden state
    of the prompt's last token at every indexer layer, position P - 1, and the P // 4
    entries written by then (offline/labels.py)."""
    from safetensors.torch import load_file

    from vllm_flashmemory.dsv4.checkpoint import load_hf_model
    from vllm_flashmemory.offline.dataset import HarvestManifest, load_document
    from vllm_flashmemory.offline.documents import Document
    from vllm_flashmemory.offline.harvest import HarvestConfig, harvest
    from vllm_flashmemory.offline.labels import LabelConfig, label_harvest
    from vllm_flashmemory.offline.tiny_model import make_tiny

    folder = make_tiny(str(tmp_path / "tiny"), seed=0)
    model = load_hf_model(folder)
    P, tau = len(prompt), 4
    ids = prompt + [5 + i for i in range(2 * tau)]  # the "answer" after the prompt
    out = tmp_path / "harvest"
    harvest(HarvestConfig(model=str(folder), out=str(out), prompt_tokens=P - 1,
                          positions_per_shard=64, max_chunk_tokens=PREFILL_CHUNK),
            [Document("d0", "")], [ids], progress=False, model=model)
    label_harvest(out, LabelConfig(tau=tau, min_votes=1), progress=False)
    manifest = HarvestManifest.read(out)
    (doc,) = manifest.labelled_documents()
    window = load_document(manifest, doc, indexer.config.layer_ids)
    assert window.positions[0] == P - 1 and window.n_visible[0] == P // 4
    shard = load_file(str(out / "doc00000" / "shard00000.safetensors"))
    assert shard["positions"][0] == P - 1
    with _engine(model, indexer) as eng:
        served = eng.prefill(prompt).hidden  # per CSA slot: the last prompt token's input
    for row, slot in enumerate(indexer.config.layer_ids):
        torch.testing.assert_close(window.hidden[0, row], served[slot], atol=1e-4, rtol=1e-4)
    # and the previous convention (query at P, the first answer token) would differ
    assert not torch.allclose(shard["hidden"][1, 0], served[indexer.config.layer_ids[0]],
                              atol=1e-3)
