"""Run worker subprocesses side by side and stop them together.

`flashmemory eval --workers` and `flashmemory harvest --workers` share this: the tiny
backbone is bound by Python and kernel launches, not by the GPU, so N processes on one
device finish about N times sooner; on a host with several GPUs the workers spread
over every visible one (visible_gpus, gpu_slot_env). Each worker writes its own log; a
worker that fails is reported with its exit code and log tail, and a stop of the parent
(Ctrl-C, or the SIGTERM of `timeout` and job schedulers) terminates every worker before
`on_stop` saves what they finished.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
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
    parallel: int | None = None,
    slot_env: Callable[[int], Mapping[str, str]] | None = None,
) -> list[str]:
    """Run every command (stdout and stderr to its log), at most `parallel` at once
    (None: all at once), and return one report per command that exited non-zero (its
    exit code and log tail). A finished command's slot starts the next one, in list
    order, so the longest commands should come first.

    slot_env(slot) adds to the environment of the commands a slot runs (slot in
    [0, parallel)), e.g. the GPU that slot's processes use. On KeyboardInterrupt or
    SIGTERM every running command is terminated and waited for, none is started, then
    `on_stop()` runs (to keep what finished) and the interrupt is re-raised.
    """
    if len(commands) != len(logs):
        raise ValueError(f"{len(commands)} commands but {len(logs)} log paths; pass one log per command.")
    slots = len(commands) if parallel is None else parallel
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"parallel={parallel!r} must be a positive integer (or None: all at once).")
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    running: dict[int, tuple[int, subprocess.Popen]] = {}  # slot -> (command index, process)
    codes: list[int | None] = [None] * len(commands)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        pending = list(range(len(commands)))
        while pending or running:
            for slot in range(slots):
                if slot in running or not pending:
                    continue
                i = pending.pop(0)
                # `eval --json /new/dir/x.json` puts its worker logs in a folder that
                # the results file (written last) would only create at the end
                Path(logs[i]).parent.mkdir(parents=True, exist_ok=True)
                full_env = {**base_env, **(slot_env(slot) if slot_env else {})}
                with open(logs[i], "w") as out:
                    running[slot] = (i, subprocess.Popen(
                        list(commands[i]), stdout=out, stderr=subprocess.STDOUT, env=full_env
                    ))
            if not pending:  # nothing left to start: plain waits, no polling
                for slot, (i, proc) in list(running.items()):
                    codes[i] = proc.wait()
                    del running[slot]
                continue
            time.sleep(0.05)
            for slot, (i, proc) in list(running.items()):
                if proc.poll() is not None:
                    codes[i] = proc.returncode
                    del running[slot]
    except BaseException:
        for _, proc in running.values():
            proc.terminate()
        for _, proc in running.values():
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


def visible_gpus(device: str) -> list[str]:
    """GPU ids that workers spread over: CUDA_VISIBLE_DEVICES's list if set, else every
    GPU torch sees; [] on the CPU."""
    if device != "cuda":
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g.strip() for g in named.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slot_env(gpus: Sequence[str]) -> Callable[[int], Mapping[str, str]] | None:
    """run_side_by_side's slot_env that pins slot i to gpus[i % len(gpus)] (None: no
    GPUs, nothing to pin)."""
    if not gpus:
        return None
    return lambda slot: {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}


def workers_per_gpu(workers: int, gpus: Sequence[str]) -> int:
    """Processes that share one GPU when `workers` spread over `gpus` round-robin (all
    of them when there is no GPU list): what each worker's memory share divides by."""
    return math.ceil(workers / len(gpus)) if gpus else workers
