import os
import signal
import sys
import threading
import time

import pytest

from vllm_flashmemory.core.side_by_side import run_side_by_side


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_all_succeed_and_run_at_the_same_time(tmp_path):
    # Each worker waits for the other's file: they only both finish if they run at once.
    a, b = tmp_path / "a", tmp_path / "b"
    wait = "import pathlib,time,sys\n" "me,other=map(pathlib.Path,sys.argv[1:])\n" \
        "me.touch()\nt=time.time()\nwhile not other.exists():\n" \
        "    time.sleep(0.01)\n    assert time.time()-t<20\nprint('done', me.name)\n"
    cmds = [_py(wait) + [str(a), str(b)], _py(wait) + [str(b), str(a)]]
    logs = [tmp_path / "0.log", tmp_path / "1.log"]
    assert run_side_by_side(cmds, logs) == []
    assert (tmp_path / "0.log").read_text().strip() == "done a"
    assert (tmp_path / "1.log").read_text().strip() == "done b"


def test_failure_reports_exit_code_and_log_tail(tmp_path):
    cmds = [_py("print('fine')"), _py("import sys; print('boom here'); sys.exit(3)")]
    logs = [tmp_path / "0.log", tmp_path / "1.log"]
    failures = run_side_by_side(cmds, logs, env={"X_TEST": "1"})
    assert len(failures) == 1
    assert failures[0].startswith("worker 1 exited with 3")
    assert "boom here" in failures[0]


def test_env_reaches_the_workers(tmp_path):
    log = tmp_path / "0.log"
    run_side_by_side([_py("import os; print(os.environ['X_TEST'])")], [log], env={"X_TEST": "42"})
    assert log.read_text().strip() == "42"


def test_sigterm_stops_every_worker_and_runs_on_stop(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    sleeper = _py(f"import os,time,pathlib; pathlib.Path({str(pids)!r},str(os.getpid())).touch(); time.sleep(60)")
    stopped = []

    def kill_parent_soon():
        t = time.time()
        while len(list(pids.iterdir())) < 2 and time.time() - t < 20:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    def outer_handler(signum, frame):
        raise AssertionError("the run's own SIGTERM handler should be active")

    previous = signal.signal(signal.SIGTERM, outer_handler)
    threading.Thread(target=kill_parent_soon, daemon=True).start()
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_side_by_side([sleeper, sleeper], [tmp_path / "0.log", tmp_path / "1.log"],
                             on_stop=lambda: stopped.append(True))
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert time.time() - t0 < 30
    assert stopped == [True]
    for p in pids.iterdir():  # every worker is gone
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.name), 0)


def test_one_log_per_command(tmp_path):
    with pytest.raises(ValueError, match="one log per command"):
        run_side_by_side([_py("pass")], [])


def test_logs_may_go_to_a_folder_that_does_not_exist_yet(tmp_path):
    # `flashmemory eval --json /tmp/new/grid.json --workers 2` died before this
    # (FileNotFoundError on the first worker log) on the H100.
    log = tmp_path / "new" / "deeper" / "0.log"
    assert run_side_by_side([_py("print('here')")], [log]) == []
    assert log.read_text().strip() == "here"
