"""Print a backbone's greedy answers to RULER samples under full KV, beside the gold.

`flashmemory eval` reports scores; this shows what was written, which is how the
multi-value failure was read ("1096512, 1096512, ...": the right first value,
then a repeat). Full KV only (native top-k covering every entry), no LSA.
`--cut-at-longest-answer` also scores each answer cut where `flashmemory eval` cut it
before 2026-11-25 (the longest single answer + 8 tokens), which is how that limit was
found to score a four-value row at one or two values at most (greedy decoding is
prefix-stable, so the cut answer is what the shorter decode wrote).
Usage: python scripts/greedy_answers.py --tasks niah_multivalue,niah_multiquery \
           --length 4096 --n 3 [--model vllm_flashmemory/assets/backbone] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

from vllm_flashmemory.offline import backbone, tasks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", required=True, help="comma-separated task names")
    ap.add_argument("--length", type=int, default=4096, help="context tokens per sample")
    ap.add_argument("--n", type=int, default=3, help="samples per task")
    ap.add_argument("--seed", type=int, default=555, help="sample seed")
    ap.add_argument("--model", default="vllm_flashmemory/assets/backbone", help="backbone folder")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--cut-at-longest-answer", action="store_true",
                    help="also score the answer cut at the longest answer + 8 tokens")
    args = ap.parse_args()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in tasks.TASKS]
    if unknown or args.n < 1:
        raise SystemExit(f"--tasks {unknown} unknown (use {list(tasks.TASKS)}) or --n {args.n} < 1.")
    from vllm_flashmemory.dsv4.checkpoint import load_hf_model

    model = load_hf_model(args.model).to(args.device)
    model.config._attn_implementation = "eager"
    model.eval()
    with backbone.fast_attention(model), backbone.index_topk(
        model, backbone.FULL_TOPK, skip_scores=True
    ):
        for task in names:
            scores, cut_scores = [], []
            for s in tasks.generate(task, args.length, args.n, args.seed, backbone.count_tokens):
                t0 = time.perf_counter()
                pred = backbone.greedy_answer(model, s, args.device)
                scores.append(tasks.score(s, pred))
                line = f"{task} score {scores[-1]:.2f} ({time.perf_counter() - t0:.1f} s)"
                if args.cut_at_longest_answer:
                    limit = max(backbone.count_tokens(a) for a in s.answers) + 8
                    cut_scores.append(tasks.score(s, backbone.decode(
                        backbone.encode(pred)[1:][:limit])))
                    line += f" | cut at {limit} tokens {cut_scores[-1]:.2f}"
                print(f"{line}\n  gold:{backbone.answer_text(s)}\n  pred:{pred}", flush=True)
            mean = f"== {task}: mean score {sum(scores) / len(scores):.3f} over {len(scores)}"
            if cut_scores:
                mean += f" | cut at the longest answer + 8 tokens {sum(cut_scores) / len(cut_scores):.3f}"
            print(mean, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
