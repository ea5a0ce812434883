"""Write RULER task samples (context + question + trained answer) as harvest documents.

A Memory Indexer learns which chunks the next tau tokens need from the decode
positions `flashmemory harvest` records; on retrieval tasks the positions that need
far chunks are the question and the answer, so the documents end with both.
Usage: python scripts/task_documents.py --tasks niah_single_1,vt --length 2048 --n 8 \
           --seed 7 --out docs.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_flashmemory.core.atomic import atomic_write_text
from vllm_flashmemory.offline import backbone, tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--length", type=int, required=True, help="tokens per document")
    p.add_argument("--n", type=int, default=8, help="documents per task")
    p.add_argument("--seed", type=int, default=7, help="sample seed (eval uses 20261123)")
    p.add_argument("--out", required=True, help="JSONL to write")
    a = p.parse_args()
    rows = []
    for task in a.tasks.split(","):
        for s in tasks.generate(task, a.length, a.n, a.seed, backbone.count_tokens):
            text = s.context + s.question + backbone.answer_text(s)
            rows.append({"id": f"{task}-{s.id}", "text": text})
    atomic_write_text(Path(a.out), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} documents -> {a.out}")


if __name__ == "__main__":
    main()
