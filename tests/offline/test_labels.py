"""golden_labels (Eq. 7-11) against a brute-force loop, plus `flashmemory label` on shards.

Scenarios:
- fresh random logits and visibility, several (T, L, N, tau) including T not a
  multiple of tau: vectorised == brute force, exactly;
- exact ties in probability (ties broken by lower entry index);
- one dominant entry: the nucleus is that entry alone;
- nothing visible at some positions: no label there, no NaN;
- the crossing entry is included and the nucleus is never empty;
- top_p = 1 keeps every visible entry; min_votes = L needs unanimity;
- every refusal (shapes, dtypes, top_p, min_votes, tau, non-finite visible logits);
- `flashmemory label` over a two-shard harvest equals golden_labels on the concatenation.
- attention labels: the nucleus over renormalized attention equals the logits path
  fed log-probabilities; a row without attention on history votes for nothing; bad
  probabilities and an unknown source are refused.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_flashmemory.offline import golden_labels
from vllm_flashmemory.offline.labels import (
    LabelConfig,
    golden_entries,
    golden_entries_from_attention,
    label_harvest,
)


def brute_force(logits, visible, top_p, min_votes, tau):
    T, L, N = logits.shape
    W = math.ceil(T / tau)
    out = torch.zeros(W, N, dtype=torch.bool)
    for t in range(T):
        idx = [s for s in range(N) if visible[t, s]]
        if not idx:
            continue
        votes = [0] * N
        for layer in range(L):
            row = [float(logits[t, layer, s]) for s in idx]
            m = max(row)
            ex = [math.exp(x - m) for x in row]
            z = sum(ex)
            probs = [(e / z, s) for e, s in zip(ex, idx)]
            # most probable first; ties: lower index first
            probs.sort(key=lambda ps: (-ps[0], ps[1]))
            mass = 0.0
            for p, s in probs:
                if mass >= top_p:
                    break
                votes[s] += 1
                mass += p
        for s in range(N):
            if votes[s] >= min_votes:
                out[t // tau, s] = True
    return out


@pytest.mark.parametrize(
    "T,L,N,tau,top_p,min_votes",
    [(5, 3, 7, 2, 0.6, 3), (64, 4, 33, 16, 0.6, 2), (70, 3, 20, 64, 0.3, 1), (1, 5, 1, 4, 0.9, 5)],
)
def test_matches_brute_force_on_random_inputs(T, L, N, tau, top_p, min_votes):
    g = torch.Generator().manual_seed(1000 * T + N)
    for _ in range(3):
        logits = torch.randn(T, L, N, generator=g, dtype=torch.float64) * 3
        visible = torch.rand(T, N, generator=g) < 0.7
        got = golden_labels(logits, visible, top_p=top_p, min_votes=min_votes, tau=tau)
        assert got.shape == (math.ceil(T / tau), N)
        assert got.dtype == torch.bool
        assert torch.equal(got, brute_force(logits, visible, top_p, min_votes, tau))


def test_causal_visibility_and_float32_input():
    g = torch.Generator().manual_seed(7)
    T, L, N = 40, 3, 12
    logits = torch.randn(T, L, N, generator=g)  # float32, as harvest writes it
    positions = torch.arange(T) + 8
    visible = torch.arange(N)[None, :] < ((positions + 1) // 4)[:, None]
    got = golden_labels(logits, visible, tau=8)
    assert torch.equal(got, brute_force(logits.double(), visible, 0.6, 3, 8))
    # nothing outside the visible history of a window can be golden
    last_visible = visible.view(5, 8, N).any(dim=1)
    assert not torch.any(got & ~last_visible)


def test_ties_break_by_lower_index():
    # four equal entries, top_p 0.5: two entries reach it, the two lowest indices
    logits = torch.zeros(1, 3, 4)
    visible = torch.ones(1, 4, dtype=torch.bool)
    got = golden_labels(logits, visible, top_p=0.5, min_votes=3, tau=1)
    assert got.tolist() == [[True, True, False, False]]
    assert torch.equal(got, brute_force(logits, visible, 0.5, 3, 1))


def test_one_dominant_entry_is_the_whole_nucleus():
    logits = torch.full((2, 3, 6), -5.0)
    logits[:, :, 4] = 20.0
    visible = torch.ones(2, 6, dtype=torch.bool)
    got = golden_labels(logits, visible, tau=2)
    assert got.tolist() == [[False, False, False, False, True, False]]


def test_crossing_entry_included_and_nucleus_never_empty():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 needs the first two (0.5 < 0.6)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).repeat(1, 3, 1)
    visible = torch.ones(1, 3, dtype=torch.bool)
    assert golden_labels(logits, visible, top_p=0.6, tau=1).tolist() == [[True, True, False]]
    # a tiny top_p still keeps the most probable entry
    assert golden_labels(logits, visible, top_p=1e-9, tau=1).tolist() == [[True, False, False]]
    # top_p exactly reached by the first entry: only it
    assert golden_labels(logits, visible, top_p=0.5, tau=1).tolist() == [[True, False, False]]


def test_top_p_one_keeps_all_visible_and_unanimity():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 9, generator=g)
    visible = torch.rand(4, 9, generator=g) < 0.5
    visible[0, 0] = True
    got = golden_labels(logits, visible, top_p=1.0, min_votes=3, tau=4)
    assert torch.equal(got[0], visible.any(dim=0))


def test_nothing_visible_gives_no_labels_and_no_nan():
    logits = torch.randn(6, 3, 5)
    visible = torch.zeros(6, 5, dtype=torch.bool)
    visible[5, 2] = True
    per_pos = golden_entries(logits, visible)
    assert not per_pos[:5].any()
    assert per_pos[5].tolist() == [False, False, True, False, False]
    got = golden_labels(logits, visible, tau=4)
    assert got.tolist() == [[False] * 5, [False, False, True, False, False]]


def test_invisible_entries_may_be_minus_inf():
    logits = torch.randn(2, 3, 4)
    logits[:, :, 3] = float("-inf")
    visible = torch.tensor([[True, True, True, False]] * 2)
    got = golden_labels(logits, visible, tau=2)
    assert not got[0, 3]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(top_p=0.0), ValueError, r"top_p=0.0 must lie in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p=1.5"),
        (dict(min_votes=0), ValueError, r"min_votes=0 must be a positive integer"),
        (dict(min_votes=4), ValueError, r"min_votes=4 exceeds the 3 CSA layers"),
        (dict(tau=0), ValueError, r"tau=0 must be a positive integer"),
    ],
)
def test_refuses_bad_arguments(kwargs, exc, match):
    logits = torch.randn(4, 3, 5)
    visible = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(exc, match=match):
        golden_labels(logits, visible, **kwargs)


def test_refuses_bad_tensors():
    with pytest.raises(ValueError, match=r"logits must be a float tensor \[T, L, N\]"):
        golden_labels(torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="logits must be floating point"):
        golden_labels(torch.ones(4, 3, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="visible must be a bool tensor"):
        golden_labels(torch.randn(4, 3, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"visible has shape \(4, 6\)"):
        golden_labels(torch.randn(4, 3, 5), torch.ones(4, 6, dtype=torch.bool))
    bad = torch.randn(4, 3, 5)
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values at visible entries"):
        golden_labels(bad, torch.ones(4, 5, dtype=torch.bool))


def test_label_config_validates():
    with pytest.raises(ValueError, match="tau=-1"):
        LabelConfig(tau=-1)
    with pytest.raises(ValueError, match="source='softmax' is not a label source"):
        LabelConfig(source="softmax")


def test_top_p_defaults_by_source():
    """The paper's 0.6 over the indexer's softmax; 0.3 over the peaked attention; an
    explicit value wins either way."""
    assert LabelConfig().top_p == 0.6
    assert LabelConfig(source="attention").top_p == 0.3
    assert LabelConfig(source="attention", top_p=0.6).top_p == 0.6
    assert LabelConfig(top_p=0.3).top_p == 0.3


def _write_fake_harvest(root, logits, prompt_tokens, shard_size):
    """A two-shard harvest in docs/DATA_FORMAT.md's layout (fake model, real files)."""
    from safetensors.torch import save_file

    T, L, N = logits.shape
    doc = root / "doc00000"
    doc.mkdir(parents=True)
    positions = prompt_tokens + torch.arange(T)
    n_shards = 0
    for j, start in enumerate(range(0, T, shard_size)):
        sl = slice(start, start + shard_size)
        pos = positions[sl]
        lg = logits[sl].clone()
        vis = torch.arange(N)[None, :] < ((pos + 1) // 4)[:, None]
        lg.masked_fill_(~vis[:, None, :], float("-inf"))
        save_file(
            {"positions": pos, "hidden": torch.zeros(len(pos), 1, 8), "logits": lg},
            str(doc / f"shard{j:05d}.safetensors"),
        )
        n_shards += 1
    manifest = {
        "format": "flashmemory-harvest/1",
        "model": "fake",
        "prompt_tokens": prompt_tokens,
        "positions_per_shard": shard_size,
        "geometry": {"n_layers": 6, "csa_layers": [2, 3, 4], "hidden_layers": [0],
                     "hidden_size": 8, "index_n_heads": 2, "index_head_dim": 4,
                     "compress_ratio": 4},
        "documents": [{"doc_id": "d0", "dir": "doc00000", "n_tokens": prompt_tokens + T,
                       "n_shards": n_shards, "complete": True}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return positions


def test_label_harvest_streams_shards_like_one_call(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(11)
    prompt, T = 40, 50
    N = (prompt + T) // 4
    logits = torch.randn(T, 3, N, generator=g)
    positions = _write_fake_harvest(tmp_path, logits, prompt, shard_size=12)
    summary = label_harvest(tmp_path, LabelConfig(tau=16), progress=False)
    out = load_file(str(tmp_path / "doc00000" / "labels.safetensors"))
    visible = torch.arange(N)[None, :] < ((positions + 1) // 4)[:, None]
    # The refresh at query q serves positions q + 1 .. q + tau: the first query (40)
    # is itself served by the prefill's refresh, so the windows start at 41.
    expected = golden_labels(logits[1:], visible[1:], tau=16)
    assert out["golden"].shape == (4, N)
    assert torch.equal(out["golden"], expected)
    assert out["query_positions"].tolist() == [40, 56, 72, 88]
    assert summary["windows"] == 4
    # by hand: window 1 (query 56) is the union over positions 57..72 and nothing else
    golden = golden_entries(logits, visible)
    assert torch.equal(out["golden"][1], golden[(positions > 56) & (positions <= 72)].any(0))
    assert not torch.equal(golden_labels(logits, visible, tau=16), expected)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["labels"] == {"top_p": 0.6, "min_votes": 3, "tau": 16,
                                  "source": "indexer", "layers": [0, 1, 2]}
    # --layers 0 --min-votes 1: only the first CSA layer's nucleus decides.
    label_harvest(tmp_path, LabelConfig(tau=16, min_votes=1, layers=(0,)), progress=False)
    one = load_file(str(tmp_path / "doc00000" / "labels.safetensors"))["golden"]
    assert torch.equal(one, golden_labels(logits[1:, :1], visible[1:], min_votes=1, tau=16))
    assert json.loads((tmp_path / "manifest.json").read_text())["labels"]["layers"] == [0]
    with pytest.raises(ValueError, match="names a CSA layer the harvested model lacks"):
        label_harvest(tmp_path, LabelConfig(tau=16, min_votes=1, layers=(3,)), progress=False)
    with pytest.raises(ValueError, match="exceeds the 1 voting layers"):
        LabelConfig(layers=(0,))
    with pytest.raises(ValueError, match="distinct CSA layer indices"):
        LabelConfig(min_votes=1, layers=(0, 0))


def test_label_harvest_refuses_missing_and_foreign_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory of `flashmemory harvest`"):
        label_harvest(tmp_path, LabelConfig(), progress=False)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="expected 'flashmemory-harvest/1'"):
        label_harvest(tmp_path, LabelConfig(), progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_labels_equal_the_logit_path_on_log_probabilities(seed):
    gen = torch.Generator().manual_seed(seed)
    T, L, N = 7, 3, 20
    visible = torch.arange(N)[None, :] < torch.randint(1, N + 1, (T, 1), generator=gen)
    raw = torch.rand(T, L, N, generator=gen) * visible[:, None, :]
    # Part of each row's mass sits on the sliding window: rows sum to 0.3-0.9.
    att = raw / raw.sum(-1, keepdim=True).clamp(min=1e-9) * (0.3 + 0.6 * torch.rand(T, L, 1, generator=gen))
    logits = torch.log(att.double()).masked_fill(~visible[:, None, :], float("-inf"))
    for top_p, votes in ((0.6, 2), (0.3, 3), (1.0, 1)):
        got = golden_entries_from_attention(att, visible, top_p=top_p, min_votes=votes)
        want = golden_entries(logits, visible, top_p=top_p, min_votes=votes)
        assert torch.equal(got, want)


def test_attention_row_without_history_mass_votes_for_nothing():
    visible = torch.ones(2, 4, dtype=torch.bool)
    att = torch.zeros(2, 2, 4)
    att[0, :, 1] = 0.2  # both layers read only entry 1
    got = golden_entries_from_attention(att, visible, top_p=0.6, min_votes=2)
    assert got.tolist() == [[False, True, False, False], [False] * 4]
    with pytest.raises(ValueError, match="negative, NaN or infinite"):
        golden_entries_from_attention(-att, visible, min_votes=2)
    with pytest.raises(ValueError, match="not a label source"):
        LabelConfig(source="attn")
