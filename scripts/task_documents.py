"""Write RULER task samples (context + question + trained answer) as harvest documents.

A Memory Indexer learns which chunks the next tau tokens need from the decode
positions `flashmemory harvest` records; on retrieval tasks the positions that need
far chunks are the question and the answer, so the documents end with both.

With --prompt-tokens P every document's context + question is exactly P tokens (the
haystack after RULER's instruction line is trimmed; every answer stays), so `harvest
--prompt-tokens P-1` makes the prompt's last token the first query and the answer its
window: what an LSA refresh at the end of a prompt scores (offline/labels.py). Without it, the recorded windows are mostly haystack, where
attention is diffuse and labels carry little signal (the first 16K grid: the
indexer's scores bunched at 0.5-0.6 and LSA kept nothing beyond recency's chunks).
Usage: python scripts/task_documents.py --tasks niah_single_1,vt --length 2048 --n 8 \
           --seed 7 --out docs.jsonl [--prompt-tokens 1920]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_flashmemory.core.atomic import atomic_write_text
from vllm_flashmemory.offline import backbone, tasks

# Extra generated tokens beyond --prompt-tokens, trimmed off the haystack's start.
_SLACK = 256


def trim_to(sample: tasks.TaskSample, prompt_tokens: int) -> str | None:
    """context + question cut to exactly prompt_tokens byte tokens by dropping haystack
    right after the context's first line (RULER's instruction stays), or None when
    that would cut an answer or the prompt is already too short."""
    head, nl, body = sample.context.partition("\n")
    if not nl:  # one block of haystack (no_context): trim its start
        head, body = "", sample.context
    head_b, body_b = (head + nl).encode(), body.encode()
    keep = prompt_tokens - 1 - len(head_b) - len(sample.question.encode())  # 1: BOS
    if keep <= 0 or keep > len(body_b):
        return None
    cut = body_b[len(body_b) - keep :]
    if cut and (cut[0] & 0xC0) == 0x80:  # starts inside a UTF-8 character
        return None
    context = head + nl + cut.decode()
    if any(a in sample.context and a not in context for a in sample.answers):
        return None
    return context + sample.question


def documents(task: str, length: int, n: int, seed: int, prompt_tokens: int | None):
    if prompt_tokens is None:
        for s in tasks.generate(task, length, n, seed, backbone.count_tokens):
            yield s.id, s.context + s.question + backbone.answer_text(s)
        return
    out, attempt = 0, 0
    while out < n:
        if attempt > 20 * n:
            raise ValueError(
                f"{task}: could not trim {n} samples to --prompt-tokens {prompt_tokens}; "
                f"lower it below --length {length}."
            )
        (s,) = tasks.generate(
            task, prompt_tokens + _SLACK, 1, seed * 1000 + attempt, backbone.count_tokens
        )
        attempt += 1
        prompt = trim_to(s, prompt_tokens)
        if prompt is not None:
            assert backbone.count_tokens(prompt) == prompt_tokens
            yield f"{s.id}-a{attempt}", prompt + backbone.answer_text(s)
            out += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--length", type=int, required=True, help="tokens per document")
    p.add_argument("--n", type=int, default=8, help="documents per task")
    p.add_argument("--seed", type=int, default=7, help="sample seed (eval uses 20261123)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="make every context + question exactly this many tokens")
    p.add_argument("--out", required=True, help="JSONL to write")
    a = p.parse_args()
    if a.prompt_tokens is not None and not 0 < a.prompt_tokens < a.length:
        p.error(f"--prompt-tokens {a.prompt_tokens} must lie in (0, --length {a.length}).")
    rows = [
        {"id": f"{task}-{doc_id}", "text": text}
        for task in a.tasks.split(",")
        for doc_id, text in documents(task, a.length, a.n, a.seed, a.prompt_tokens)
    ]
    atomic_write_text(Path(a.out), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} documents -> {a.out}")


if __name__ == "__main__":
    main()
