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


def test_unknown_task_is_refused_before_loading():
    out = _run("--tasks", "niah_single_9")
    assert out.returncode != 0 and "niah_single_9" in out.stderr and "unknown" in out.stderr
