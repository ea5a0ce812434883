"""Documents for harvesting: a seeded synthetic long-document generator and a JSONL reader.

Synthetic documents plant "needle" facts early ("The vault code of Orla is 4821.")
and recall them much later ("Recall: the vault code of Orla is 4821."), with filler
in between, so a model's attention has long-range structure to find.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

_NAMES = (
    "Orla", "Bram", "Ceri", "Dagny", "Emeric", "Fenna", "Gideon", "Hester", "Ilse",
    "Joren", "Katla", "Lucan", "Mirela", "Nils", "Oona", "Pavel", "Quilla", "Rune",
    "Sabra", "Tobin", "Ulla", "Vesna", "Wim", "Xenia", "Yorick", "Zelda",
)
_ATTRS = ("vault code", "room number", "badge id", "locker code", "train seat", "pin")
_WORDS = (
    "river", "stone", "lantern", "harbor", "quiet", "market", "winter", "orchard",
    "signal", "copper", "meadow", "engine", "paper", "window", "garden", "thunder",
    "ledger", "bridge", "candle", "valley", "silver", "morning", "archive", "compass",
)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def synthetic_document(doc_id: str, n_chars: int, seed: int) -> Document:
    """One seeded document of exactly `n_chars` characters (ASCII, so bytes)."""
    if n_chars < 1:
        raise ValueError(f"n_chars={n_chars} must be positive")
    rng = random.Random(seed)
    facts: list[str] = []
    parts: list[str] = []
    length = 0
    while length < n_chars:
        roll = rng.random()
        if roll < 0.08 or not facts:
            fact = (
                f"the {rng.choice(_ATTRS)} of {rng.choice(_NAMES)} is "
                f"{rng.randint(1000, 9999)}"
            )
            facts.append(fact)
            sentence = fact[0].upper() + fact[1:] + ". "
        elif roll < 0.16:
            # Recall an old fact: the long-range dependency the indexer must find.
            sentence = f"Recall: {rng.choice(facts[: max(1, len(facts) // 2)])}. "
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 12))]
            sentence = " ".join(words).capitalize() + ". "
        parts.append(sentence)
        length += len(sentence)
    return Document(doc_id=doc_id, text="".join(parts)[:n_chars])


def synthetic_documents(n_docs: int, n_chars: int, seed: int = 0) -> list[Document]:
    if n_docs < 1:
        raise ValueError(f"--synthetic {n_docs} must be at least 1 document")
    return [
        synthetic_document(f"synthetic-{seed}-{i:05d}", n_chars, seed * 100003 + i)
        for i in range(n_docs)
    ]


def read_jsonl(path: str | os.PathLike[str]) -> list[Document]:
    """Read {"id": str, "text": str} per line; blank lines are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"documents file {str(path)!r} does not exist; pass a JSONL file.")
    docs: list[Document] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({exc.msg}).") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not (
                isinstance(obj.get("text"), str)
            ):
                raise ValueError(
                    f"{path}:{lineno} must be an object with string fields 'id' and "
                    "'text', e.g. {\"id\": \"doc1\", \"text\": \"...\"}."
                )
            if obj["id"] in seen:
                raise ValueError(f"{path}:{lineno} repeats document id {obj['id']!r}.")
            seen.add(obj["id"])
            docs.append(Document(obj["id"], obj["text"]))
    if not docs:
        raise ValueError(f"documents file {str(path)!r} holds no documents.")
    return docs


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[Document]:
    yield from read_jsonl(path)
