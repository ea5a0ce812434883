"""Method parsing and the paper's proportions at small scale.

Scenarios:
- `oracle` expands to 10/25/50%, `oracle25` to one, `random` carries 10%.
- unknown or repeated methods and bad fractions fail with the fix in the message.
- `lsa10` is top-K lsa at 10%; plain `lsa` selects by threshold.
- the local window is 1/8 of the context and the chunk 1/256 (>= 16 tokens),
  capped at the paper's 8K / 256 from 64K up; either can be fixed in tokens.
"""

from __future__ import annotations

import pytest

from vllm_flashmemory.reference.methods import Method, MethodSpec, parse_methods, scaled_window


def test_parse_methods_expands_oracle():
    specs = parse_methods("full,lsa,recency,random,oracle,quest")
    assert [s.label for s in specs] == [
        "full", "lsa", "recency", "random", "oracle10", "oracle25", "oracle50", "quest"
    ]
    assert specs[3].fraction == 0.1
    assert parse_methods("oracle25")[0].fraction == 0.25


def test_parse_methods_top_k_lsa():
    plain, top = parse_methods("lsa,lsa10")
    assert (plain.label, plain.fraction, plain.top_k) == ("lsa", None, False)
    assert (top.label, top.fraction, top.top_k) == ("lsa10", 0.1, True)
    assert top.method is Method.LSA


@pytest.mark.parametrize(
    "text, match",
    [("fulll", "unknown method 'fulll'"), ("lsa,lsa", "each once"),
     ("oracle0", "percent in 1..100"), ("", "at least one method"),
     ("lsa0", "lsa<percent>"), ("lsa1x", "lsa<percent>"), ("lsa10,lsa10", "each once")],
)
def test_parse_methods_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text)


def test_method_spec_validation():
    with pytest.raises(ValueError, match="must lie in"):
        MethodSpec(Method.RANDOM, 0.0)
    with pytest.raises(ValueError, match="only meaningful for random, oracle and top-K lsa"):
        MethodSpec(Method.FULL, 0.5)
    with pytest.raises(ValueError, match="must lie in"):
        MethodSpec(Method.LSA, 1.5)
    with pytest.raises(ValueError, match="only meaningful for quest"):
        MethodSpec(Method.FULL, quest_budget_chunks=3)


@pytest.mark.parametrize(
    "ctx, local, chunk",
    [(2048, 256, 16), (8192, 1024, 32), (16384, 2048, 64), (32768, 4096, 128),
     (65536, 8192, 256), (524288, 8192, 256)],
)
def test_scaled_window_keeps_paper_proportions(ctx, local, chunk):
    w = scaled_window(ctx)
    assert (w.local_window_tokens, w.chunk_tokens) == (local, chunk)
    assert f"chunk {chunk} tokens" in w.describe()


@pytest.mark.parametrize("ctx", [8192, 16384, 32768])
def test_fixed_window_is_the_same_at_every_length(ctx):
    w = scaled_window(ctx, local_window_tokens=1024, chunk_tokens=32)
    assert (w.context_tokens, w.local_window_tokens, w.chunk_tokens) == (ctx, 1024, 32)
    # one fixed, the other still scaled
    assert scaled_window(ctx, chunk_tokens=32).local_window_tokens == ctx // 8
