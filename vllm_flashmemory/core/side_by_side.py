"""Run worker subprocesses side by side and stop them together.

`flashmemory eval --workers` and `flashmemory harvest --workers` share this: the tiny
backbone is bound by Python and kernel launches, not by the GPU, so N processes on one
device finish about N times sooner. Each worker writes its own log; a worker that fails
is reported with its exit code and log tail, and a stop of the parent (Ctrl-C, or the
SIGTERM of `timeout` and job schedulers) terminates every worker before `on_stop`
saves what they finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_side_by_side(
    commands: Sequence[Sequence[str]],
    logs: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> list[str]:
    """Start every command at once (stdout and stderr to its log), wait for all, and
    return one report per command that exited non-zero (its exit code and log tail).

    On KeyboardInterrupt or SIGTERM every worker is terminated and waited for, then
    `on_stop()` runs (to keep what finished) and the interrupt is re-raised.
    """
    if len(commands) != len(logs):
        raise ValueError(f"{len(commands)} commands but {len(logs)} log paths; pass one log per command.")
    procs: list[subprocess.Popen] = []
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for cmd, log in zip(commands, logs):
            # `eval --json /new/dir/x.json` puts its worker logs in a folder that the
            # results file (written last) would only create at the end
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env
                ))
        codes = [proc.wait() for proc in procs]
    except BaseException:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        if on_stop is not None:
            on_stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failures = []
    for i, (code, log) in enumerate(zip(codes, logs)):
        if code != 0:
            tail = Path(log).read_text(errors="replace").splitlines()[-15:]
            failures.append(f"worker {i} exited with {code}; log tail:\n" + "\n".join(tail))
    return failures
