"""LSAConfig: defaults, derived values, the kv_connector_extra_config boundary, every error.

Scenarios:
- defaults are the paper's (tau 64, threshold 0.5, CSA layers 10/12/20, OR routing);
- derived entries_per_chunk / local_window_chunks;
- from_extra_config reads lsa.* keys only, accepts "10,12,20" strings, round-trips
  through to_extra_config, and rejects unknown lsa.* keys with a suggestion;
- every bad value raises with the key, the value and the fix in the message.
"""

from __future__ import annotations

import pytest

from vllm_flashmemory.core import LSAConfig


def test_defaults_are_the_papers():
    c = LSAConfig()
    assert (c.tau, c.threshold, c.indexer_layers, c.routing) == (64, 0.5, (10, 12, 20), "or")
    assert c.entries_per_chunk == 64
    assert c.local_window_chunks == 32


def test_derived_values_round_up():
    c = LSAConfig(chunk_tokens=64, local_window_tokens=100)
    assert c.entries_per_chunk == 16
    assert c.local_window_chunks == 2


def test_extra_config_round_trip_and_foreign_keys():
    extra = {
        "lsa.tau": 32,
        "lsa.threshold": 0.25,
        "lsa.indexer_layers": "1, 2",
        "lsa.cold_pool_gib": 2,
        "lsa.max_selected_fraction": 0.03,  # top-K: 3% of each request's history
        "lmcache.chunk_size": 256,  # another connector's key: ignored
    }
    c = LSAConfig.from_extra_config(extra)
    assert (c.tau, c.threshold, c.indexer_layers, c.cold_pool_gib) == (32, 0.25, (1, 2), 2)
    assert c.max_selected_fraction == 0.03
    assert LSAConfig.from_extra_config(c.to_extra_config()) == c
    assert LSAConfig.from_extra_config(None) == LSAConfig()


def test_unknown_lsa_key_is_refused_with_suggestion():
    with pytest.raises(ValueError, match=r"'lsa.thresold'.*did you mean 'lsa.threshold'"):
        LSAConfig.from_extra_config({"lsa.thresold": 0.5})


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(tau=0), ValueError, r"'lsa.tau'=0 must be at least 1; use the paper's 64"),
        (dict(tau=-3), ValueError, r"'lsa.tau'=-3"),
        (dict(tau=6.4), TypeError, r"'lsa.tau'=6.4 must be an integer"),
        (dict(threshold=1.5), ValueError, r"'lsa.threshold'=1.5 must lie in \[0, 1\]"),
        (dict(threshold=float("nan")), ValueError, r"'lsa.threshold'=nan"),
        (dict(threshold="high"), TypeError, r"'lsa.threshold'='high' must be a number"),
        (dict(indexer_layers=()), ValueError, r"'lsa.indexer_layers'=\[\] must name"),
        (dict(indexer_layers=(1, -2)), ValueError, r"holds -2; every entry must be"),
        (dict(indexer_layers=(3, 3)), ValueError, r"repeats a layer"),
        (dict(routing="and"), ValueError, r"'lsa.routing'='and' is not a routing mode"),
        (dict(chunk_tokens=2), ValueError, r"'lsa.chunk_tokens'=2 must be at least 4"),
        (dict(chunk_tokens=258), ValueError, r"multiple of the CSA compression ratio \(4\).*use 260"),
        (dict(local_window_tokens=-1), ValueError, r"'lsa.local_window_tokens'=-1"),
        (dict(sink_chunks=-1), ValueError, r"'lsa.sink_chunks'=-1"),
        (dict(cold_pool_gib=0), ValueError, r"'lsa.cold_pool_gib'=0 must be a positive"),
        (dict(max_selected_chunks=0), ValueError, r"'lsa.max_selected_chunks'=0"),
        (dict(max_selected_fraction=0.0), ValueError, r"'lsa.max_selected_fraction'=0.0 must lie in \(0, 1\]"),
        (dict(max_selected_fraction=1.5), ValueError, r"'lsa.max_selected_fraction'=1.5"),
        (dict(fallback_selected_fraction=0.0), ValueError, r"fallback_selected_fraction'=0.0"),
        (dict(indexer_path=3), TypeError, r"'lsa.indexer_path'=3 must be a directory"),
    ],
)
def test_every_bad_value_names_key_value_and_fix(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LSAConfig(**kwargs)


def test_indexer_layers_wrong_type_in_extra_config():
    with pytest.raises(TypeError, match=r"'lsa.indexer_layers'=7 must be a list"):
        LSAConfig.from_extra_config({"lsa.indexer_layers": 7})


def test_frozen():
    c = LSAConfig()
    with pytest.raises(AttributeError):
        c.tau = 3  # type: ignore[misc]
    assert c.replace(tau=8).tau == 8


def test_calibrated_indexer_sets_the_default_threshold(tmp_path):
    """Without 'lsa.threshold' the indexer checkpoint's calibration sets it; an explicit
    key wins; an uncalibrated checkpoint keeps the paper's 0.5."""
    from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    indexer = MemoryIndexer(MemoryIndexerConfig(hidden_size=16, rank=8, n_heads=2,
                                                head_dim=16, rope_dim=8, layer_ids=(0,)))
    indexer.save(tmp_path / "cal", calibration={"threshold": 0.8, "target_resident": 0.1})
    indexer.save(tmp_path / "plain")
    cal = str(tmp_path / "cal")
    assert LSAConfig.from_extra_config({"lsa.indexer_path": cal}).threshold == 0.8
    assert LSAConfig.from_extra_config(
        {"lsa.indexer_path": cal, "lsa.threshold": 0.3}).threshold == 0.3
    assert LSAConfig.from_extra_config(
        {"lsa.indexer_path": str(tmp_path / "plain")}).threshold == 0.5
