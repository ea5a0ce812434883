"""Startup validation of the LSA connector: every refusal names the key and the fix.

Scenarios:
- a valid config builds (threshold 0 needs no checkpoint) and sizes the cold pool;
- an unknown `lsa.*` key, a bad value, `lsa.indexer_layers` beyond the model's CSA
  layers, a chunk that is not whole blocks: ValueError/TypeError naming the key;
- threshold > 0 without `lsa.indexer_path`; a checkpoint path that does not exist;
  a checkpoint whose geometry does not fit the model;
- a cold pool smaller than one max_model_len request.
"""

from __future__ import annotations

import pytest

from tests.connectors.conftest import vllm_config
from vllm_flashmemory.connectors.startup import build_lsa_startup
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig

OK = {"lsa.threshold": 0.0, "lsa.indexer_layers": [0, 1], "lsa.cold_pool_gib": 0.05}


def test_valid_config(kv_cache_config) -> None:
    startup = build_lsa_startup(vllm_config(OK), kv_cache_config)
    assert startup.config.indexer_layers == (0, 1)
    assert startup.cold_pool.capacity_chunks >= startup.chunks_per_max_len_request
    assert startup.max_concurrency >= 1


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ({"lsa.tua": 4}, ValueError, r"'lsa.tua'.*did you mean 'lsa.tau'"),
        ({"lsa.tau": 0}, ValueError, r"'lsa.tau'=0 must be at least 1"),
        ({"lsa.threshold": 1.5}, ValueError, r"'lsa.threshold'=1.5"),
        ({"lsa.indexer_layers": [0, 7]}, ValueError, r"CSA layer indices \[7\].*4 CSA layers"),
        ({"lsa.chunk_tokens": 128}, ValueError, r"'lsa.chunk_tokens'=128.*use 256"),
        ({"lsa.tau": "8"}, TypeError, r"'lsa.tau'='8' must be an integer"),
        ({"lsa.threshold": True}, TypeError, r"'lsa.threshold'=True must be a number"),
        ({"lsa.indexer_layers": []}, ValueError, r"'lsa.indexer_layers'=\[\] must name"),
        ({"lsa.indexer_layers": [1, 1]}, ValueError, r"repeats a layer"),
        ({"lsa.indexer_layers": "x"}, ValueError, r"invalid literal|indexer_layers"),
        ({"lsa.routing": "and"}, ValueError, r"'lsa.routing'='and'.*use 'or'"),
        ({"lsa.local_window_tokens": -1}, ValueError, r"'lsa.local_window_tokens'=-1"),
        ({"lsa.sink_chunks": -2}, ValueError, r"'lsa.sink_chunks'=-2"),
        ({"lsa.cold_pool_gib": 0}, ValueError, r"'lsa.cold_pool_gib'=0 must be a positive"),
        ({"lsa.chunk_tokens": 250}, ValueError, r"'lsa.chunk_tokens'=250 must be a multiple"),
        ({"lsa.max_selected_chunks": 0}, ValueError, r"'lsa.max_selected_chunks'=0"),
        ({"lsa.fallback_selected_fraction": 0}, ValueError, r"fallback_selected_fraction"),
        ({"lsa.indexer_path": 3, "lsa.threshold": 0}, TypeError, r"'lsa.indexer_path'=3"),
    ],
)
def test_bad_values_are_refused(kv_cache_config, extra, error, match) -> None:
    with pytest.raises(error, match=match):
        build_lsa_startup(vllm_config({**OK, **extra}), kv_cache_config)


def test_threshold_needs_indexer_checkpoint(kv_cache_config) -> None:
    with pytest.raises(ValueError, match=r"'lsa.indexer_path' is not set.*'lsa.threshold' to 0"):
        build_lsa_startup(vllm_config({**OK, "lsa.threshold": 0.5}), kv_cache_config)


def test_missing_checkpoint_is_refused(kv_cache_config, tmp_path) -> None:
    extra = {**OK, "lsa.threshold": 0.5, "lsa.indexer_path": str(tmp_path / "nope")}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_lsa_startup(vllm_config(extra), kv_cache_config)


def test_mismatched_checkpoint_is_refused(kv_cache_config, tmp_path) -> None:
    wrong = MemoryIndexerConfig.preset(
        "tiny", hidden_size=128, rope_original_max_position=4096, layer_ids=(0, 1)
    )
    path = MemoryIndexer(wrong).save(tmp_path / "indexer")
    extra = {**OK, "lsa.threshold": 0.5, "lsa.indexer_path": str(path)}
    with pytest.raises(ValueError, match=r"hidden_size=128 but the model needs hidden_size=256"):
        build_lsa_startup(vllm_config(extra), kv_cache_config)


def test_fitting_checkpoint_loads(kv_cache_config, tmp_path) -> None:
    good = MemoryIndexerConfig.preset("tiny", layer_ids=(0, 1))
    path = MemoryIndexer(good).save(tmp_path / "indexer")
    extra = {**OK, "lsa.threshold": 0.5, "lsa.indexer_path": str(path)}
    assert build_lsa_startup(vllm_config(extra), kv_cache_config).config.threshold == 0.5


def test_cold_pool_too_small(kv_cache_config) -> None:
    extra = {**OK, "lsa.cold_pool_gib": 0.0005}
    with pytest.raises(ValueError, match=r"'lsa.cold_pool_gib'=0.0005 holds .*raise 'lsa.cold_pool_gib' to at least"):
        build_lsa_startup(vllm_config(extra, max_model_len=65536), kv_cache_config)
