"""scripts/greedy_answers.py: the committed backbone's greedy answer beside the gold."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "greedy_answers.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_prints_gold_prediction_and_score():
    out = _run("--tasks", "niah_single_1", "--length", "1024", "--n", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert re.match(r"niah_single_1 score (0|1)\.\d\d \(", lines[0])
    gold = lines[1].removeprefix("  gold:")
    assert lines[1].startswith("  gold:") and lines[2].startswith("  pred:")
    assert re.fullmatch(r" \d+\.", gold)  # a RULER number answer, as trained
    # the score agrees with the printed strings (RULER's string_match_all)
    assert (gold.strip(" .") in lines[2]) == lines[0].startswith("niah_single_1 score 1.00")


def test_cut_at_longest_answer_scores_no_more_than_the_whole_answer():
    out = _run("--tasks", "niah_multivalue", "--length", "2048", "--n", "1",
               "--cut-at-longest-answer")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    m = re.match(r"niah_multivalue score (\d\.\d\d) .*\| cut at (\d+) tokens (\d\.\d\d)$", lines[0])
    assert m, lines[0]
    whole, limit, cut = float(m[1]), int(m[2]), float(m[3])
    assert limit == 8 + 8  # a 7-digit value + BOS, + 8
    assert cut <= whole
    gold = lines[1].removeprefix("  gold:")
    assert len(gold) > limit  # four listed values do not fit the old limit
    assert lines[-1].startswith("== niah_multivalue: mean score ")


def test_unknown_task_is_refused_before_loading():
    out = _run("--tasks", "niah_single_9")
    assert out.returncode != 0 and "niah_single_9" in out.stderr and "unknown" in out.stderr
