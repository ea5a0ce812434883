"""RULER-style tasks (offline/tasks.py).

Scenarios:
- every task is deterministic in (task, context_tokens, n, seed) and changes with
  the seed;
- every prompt fits context_tokens minus the answer reserve, and fills most of it,
  under a byte counter and under a whitespace-word counter;
- answers are where RULER puts them: needles in the context, the vt chain, the 10
  common words (most frequent), the 3 most frequent coded words, the no_context code
  in the question only;
- single_answer() says which tasks always have one answer, as generate writes them;
- question_keys() gives a NIAH question's keys in its order, each with its values;
- score() is RULER's string_match_all (fraction found, case-insensitive);
- read_task_file() reads str or list answers and names the line of a bad row;
- bad arguments name the value and the fix.
"""

from __future__ import annotations

import collections
import json
import re

import pytest

from vllm_flashmemory.offline import tasks
from vllm_flashmemory.offline.tasks import GEN_TOKENS, TASKS, TaskSample


def byte_count(text: str) -> int:
    return len(text.encode("utf-8")) + 1


def word_count(text: str) -> int:
    return len(text.split())


def test_task_names_are_ruler_plus_no_context():
    assert TASKS == (
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


@pytest.mark.parametrize("task", TASKS)
def test_generate_is_deterministic_and_seeded(task):
    a = tasks.generate(task, 2048, 2, 0, byte_count)
    b = tasks.generate(task, 2048, 2, 0, byte_count)
    c = tasks.generate(task, 2048, 2, 1, byte_count)
    assert a == b
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].answers != a[1].answers  # samples of one call differ
    assert len({s.id for s in a + c}) == 4


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context_tokens", [2048, 8192])
def test_prompt_fits_and_fills_the_budget(task, context_tokens):
    budget = context_tokens - GEN_TOKENS[task]
    for s in tasks.generate(task, context_tokens, 2, 3, byte_count):
        used = byte_count(s.context + s.question)
        assert used <= budget
        assert used >= 0.9 * budget, f"{task} uses only {used} of {budget}"


@pytest.mark.parametrize("task", ["niah_single_2", "cwe", "vt"])
def test_sizing_follows_the_given_counter(task):
    s = tasks.generate(task, 4096, 1, 0, word_count)[0]
    assert 0.8 * (4096 - GEN_TOKENS[task]) <= word_count(s.context + s.question)
    assert word_count(s.context + s.question) <= 4096 - GEN_TOKENS[task]


@pytest.mark.parametrize(
    "task, n_answers",
    [
        ("niah_single_1", 1),
        ("niah_single_3", 1),
        ("niah_multikey_1", 1),
        ("niah_multikey_3", 1),
        ("niah_multivalue", 4),
        ("niah_multiquery", 4),
    ],
)
def test_niah_needles_hold_the_answers(task, n_answers):
    s = tasks.generate(task, 4096, 1, 0, byte_count)[0]
    assert len(s.answers) == n_answers
    for answer in s.answers:
        assert re.search(rf"for [\w-]+ is: {re.escape(answer)}\.", s.context)
    if task.endswith(("_3",)):
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
            s.answers[0],
        )
    else:
        assert re.fullmatch(r"\d{7}", s.answers[0])


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_question_keys_are_the_asked_keys_in_question_order(task):
    for sample in tasks.generate(task, 2048, 3, 1, len):
        keys = tasks.question_keys(sample)
        spec = tasks.NIAH[task]
        assert len(keys) == spec.n_queries
        # The i-th key's values are the i-th block of answers, each in its own needle.
        per_key = spec.n_values
        for i, key in enumerate(keys):
            for value in sample.answers[i * per_key : (i + 1) * per_key]:
                assert f"for {key} is: {value}." in sample.context
        assert sample.question.index(keys[0]) < sample.question.index(keys[-1]) or len(keys) == 1
    odd = tasks.TaskSample("u", "niah_multiquery", "c", "Name them all.", ("a", "b"))
    assert tasks.question_keys(odd) == ()  # a task-file question of another form
    assert tasks.question_keys(tasks.generate("vt", 2048, 1, 0, len)[0]) == ()


@pytest.mark.parametrize("task", TASKS)
def test_single_answer_matches_what_generate_writes(task):
    # flashmemory eval keeps rows of single-answer tasks from before its answer
    # limit covered every answer; a wrong True here would keep cut-short rows.
    for seed in (0, 1):
        s = tasks.generate(task, 8192, 1, seed, byte_count)[0]
        assert tasks.single_answer(task) == (len(s.answers) == 1), s.answers


def test_niah_haystacks_follow_ruler():
    repeat = tasks.generate("niah_single_1", 2048, 1, 0, byte_count)[0]
    assert repeat.context.count(tasks.NOISE) > 10
    essay = tasks.generate("niah_single_2", 2048, 1, 0, byte_count)[0]
    assert tasks.NOISE not in essay.context and essay.context.count(" ") > 200
    needles = tasks.generate("niah_multikey_2", 2048, 1, 0, byte_count)[0]
    assert needles.context.count("One of the special magic numbers for") > 20
    assert needles.question.endswith("mentioned in the provided text is")
    multi = tasks.generate("niah_multiquery", 2048, 1, 0, byte_count)[0]
    assert multi.question.endswith("mentioned in the provided text are")


def test_vt_chain_is_in_order_in_the_context():
    s = tasks.generate("vt", 4096, 1, 0, byte_count)[0]
    assert len(s.answers) == 5
    value = re.search(rf"VAR {s.answers[0]} = (\d{{5}})", s.context).group(1)
    assert value in s.question
    body = s.context.split("they are: ")[-1]  # after the one-shot example
    for prev, var in zip(s.answers, s.answers[1:]):
        assert f"VAR {var} = VAR {prev}" in body


def test_cwe_answers_are_the_most_common_words():
    s = tasks.generate("cwe", 8192, 1, 0, byte_count)[0]
    listed = s.context.split("appear most often.\n")[-1]  # after the example
    counts = collections.Counter(re.findall(r"\d+\. (\S+)", listed))
    assert len(s.answers) == 10
    assert {w for w, _ in counts.most_common(10)} == set(s.answers)
    assert min(counts[w] for w in s.answers) == 30  # RULER's freq_cw at >= 4K


def test_fwe_answers_are_the_most_frequent_coded_words():
    s = tasks.generate("fwe", 4096, 1, 0, byte_count)[0]
    counts = collections.Counter(
        w for w in s.context.split() if re.fullmatch(r"[a-z]{6}", w)
    )
    assert [w for w, _ in counts.most_common(3)] == list(s.answers)


def test_no_context_answer_is_only_in_the_question():
    s = tasks.generate("no_context", 4096, 1, 0, byte_count)[0]
    (code,) = s.answers
    assert code in s.question and code not in s.context


def test_score_is_fraction_of_answers_found_case_insensitive():
    s = TaskSample(
        "x", "niah_multivalue", "", "", ("1234567", "abc-def", "7", "9999999")
    )
    assert tasks.score(s, "1234567, ABC-DEF and 7.") == 0.75
    assert tasks.score(s, "") == 0.0
    one = TaskSample("y", "niah_single_1", "", "", ("1234567",))
    assert tasks.score(one, " The number is 1234567.") == 1.0
    assert tasks.score(one, "123456") == 0.0
    with pytest.raises(ValueError, match="no answers"):
        tasks.score(TaskSample("z", "user", "", "", ()), "x")


def test_read_task_file(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"id": 1, "context": "c", "question": "q", "answer": "a"},
        {
            "id": "b",
            "context": "c2",
            "question": "q2",
            "answer": ["x", "y"],
            "task": "mine",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = tasks.read_task_file(path)
    assert got == [
        TaskSample("1", "user", "c", "q", ("a",)),
        TaskSample("b", "mine", "c2", "q2", ("x", "y")),
    ]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"id": 1, "context": "c", "question": "q"}', "line 2 lacks \\['answer'\\]"),
        (
            '{"id": 1, "context": "c", "question": "q", "answer": []}',
            "line 2 answer=\\[\\]",
        ),
        ("not json", "line 2 is not JSON"),
        ("[1, 2]", "line 2 is list"),
        (
            '{"id": 1, "context": 5, "question": "q", "answer": "a"}',
            "context must be a string",
        ),
    ],
)
def test_read_task_file_names_the_bad_line(tmp_path, line, match):
    path = tmp_path / "t.jsonl"
    good = json.dumps({"id": 0, "context": "c", "question": "q", "answer": "a"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises((ValueError, TypeError), match=match):
        tasks.read_task_file(path)
    with pytest.raises(ValueError, match="does not exist"):
        tasks.read_task_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "qa_1"}, "task='qa_1' is not a task"),
        ({"context_tokens": 100}, "context_tokens=100 must be an integer >= 256"),
        ({"n": 0}, "n=0 must be an integer >= 1"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0"),
        ({"task": "vt", "context_tokens": 512}, "too few for its smallest prompt"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    args = {
        "task": "niah_single_1",
        "context_tokens": 2048,
        "n": 1,
        "seed": 0,
        "count_tokens": byte_count,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        tasks.generate(**args)
