"""Teacher-forced accuracy of a keyed multi-query answer, key by key.

A backbone trained with `train-backbone --echo-keys` answers " k1 is: v1; k2 is: v2;
...". Greedy, the eleventh session's candidate looked every named key up right but lost
its place in the question's key list (RESULTS.md). This measures where, with the right
answer so far given (teacher forcing): for the i-th key of the answer, the accuracy of
its first byte (the "which key comes next" decision), of all its bytes, and of its
value's bytes, beside how far back (in tokens) the key last appeared in the prompt.
The sliding window is 128 byte tokens; a key farther back than that can only be read
through compressed entries.

    python bench/key_position_probe.py --model DIR [--length 2048] [--n 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import random

import torch

from vllm_flashmemory.offline import backbone as bb


def key_spans(answer: str) -> list[tuple[int, int, int, int]]:
    """(key start, key end, value start, value end) byte offsets in a keyed answer
    ' k1 is: v1; k2 is: v2.' (keyed_answer's form), in answer order."""
    spans, pos = [], 0
    for part in answer.rstrip(".\n").split(";"):
        key, _, value = part.partition(" is: ")
        k0 = pos + len(part) - len(part.lstrip())
        k1 = k0 + len(key.strip())
        v0 = k1 + len(" is: ")
        spans.append((k0, k1, v0, v0 + len(value)))
        pos += len(part) + 1  # the ";"
    return spans


def measure(model, length: int, n: int, dev: str) -> dict[int, dict[str, list[float]]]:
    """Per key position (0-based), one entry per row: first byte right, whole key
    right, share of value bytes right, and the distance from the key's first byte back
    to its last occurrence in the prompt."""
    stats: dict[int, dict[str, list[float]]] = {}
    with bb.fast_attention(model), bb.index_topk(model, bb.FULL_TOPK, skip_scores=True):
        for i in range(n):
            ex = bb.make_task_row(random.Random(f"key-position-{i}"), length,
                                  "niah_multiquery", echo_keys=True)
            start = ex.answer_mask.index(True)
            ids = torch.tensor([ex.ids], device=dev)
            with torch.no_grad():
                pred = model(input_ids=ids).logits[0].argmax(-1).tolist()  # [T]
            ok = [pred[p - 1] == ex.ids[p] for p in range(len(ex.ids))]  # ok[p]: token p
            answer = bb.decode([t for t, m in zip(ex.ids, ex.answer_mask) if m])
            prompt = bb.decode(ex.ids[:start])
            for k, (k0, k1, v0, v1) in enumerate(key_spans(answer)):
                key = answer[k0:k1]
                back = start + k0 - (prompt.rfind(key) + 1)  # +1: BOS is token 0
                s = stats.setdefault(k, {"first": [], "whole": [], "value": [], "back": []})
                s["first"].append(float(ok[start + k0]))
                s["whole"].append(float(all(ok[start + k0 : start + k1])))
                s["value"].append(sum(ok[start + v0 : start + v1]) / max(v1 - v0, 1))
                s["back"].append(float(back))
    return stats


def by_position(stats: dict[int, dict[str, list[float]]]) -> list[dict]:
    """One row per key position: rows, and the mean of each measure."""
    return [{"key": k + 1, "n": len(s["first"]),
             **{name: sum(v) / len(v) for name, v in s.items()}}
            for k, s in sorted(stats.items())]


def by_window(stats: dict[int, dict[str, list[float]]], window: int) -> list[dict]:
    """Keys after the first, split by whether the key's last mention in the prompt is
    inside the sliding window (fewer than `window` tokens back): the first byte's
    accuracy and the count on each side."""
    out = []
    for inside in (True, False):
        hits = [f for k, s in stats.items() if k > 0
                for f, b in zip(s["first"], s["back"]) if (b < window) == inside]
        out.append({"inside": inside, "n": len(hits),
                    "first": sum(hits) / len(hits) if hits else float("nan")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vllm_flashmemory/assets/backbone", help="backbone folder")
    ap.add_argument("--length", type=int, default=2048, help="row length in tokens")
    ap.add_argument("--n", type=int, default=32, help="rows")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    if args.n < 1 or args.length < 512:
        raise SystemExit(f"--n {args.n} must be >= 1 and --length {args.length} >= 512.")
    from vllm_flashmemory.dsv4.checkpoint import load_hf_model

    model = load_hf_model(args.model).to(args.device)
    model.config._attn_implementation = "eager"
    model.eval()
    print("| key in the answer | rows | first byte right | whole key right | value bytes right "
          "| key last seen, tokens back |")
    print("|---|---|---|---|---|---|")
    stats = measure(model, args.length, args.n, args.device)
    for r in by_position(stats):
        print(f"| {r['key']} | {r['n']} | {r['first']:.2f} | {r['whole']:.2f} | "
              f"{r['value']:.2f} | {r['back']:.0f} |")
    window = model.config.sliding_window
    print(f"\n| keys 2-4, last mention | keys | first byte right |\n|---|---|---|")
    for r in by_window(stats, window):
        side = f"< {window} tokens back (in the window)" if r["inside"] else f">= {window} back"
        print(f"| {side} | {r['n']} | {r['first']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
