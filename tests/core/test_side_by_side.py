import os
import signal
import sys
import threading
import time

import pytest

from vllm_flashmemory.core.side_by_side import (
    gpu_slot_env,
    run_side_by_side,
    visible_gpus,
    workers_per_gpu,
)


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


def test_parallel_caps_how_many_run_at_once(tmp_path):
    # Each command holds a marker file while it runs and fails if it sees more than
    # `parallel` markers: with 2 slots, 5 commands never overlap by more than 2.
    live = tmp_path / "live"
    live.mkdir()
    code = ("import os,time,pathlib,sys\n"
            "d=pathlib.Path(sys.argv[1]); me=d/str(os.getpid()); me.touch()\n"
            "n=len(list(d.iterdir())); time.sleep(0.3); me.unlink()\n"
            "print(n); sys.exit(0 if n<=2 else 9)\n")
    cmds = [_py(code) + [str(live)] for _ in range(5)]
    logs = [tmp_path / f"{i}.log" for i in range(5)]
    assert run_side_by_side(cmds, logs, parallel=2) == []
    seen = [int(p.read_text()) for p in logs]
    assert max(seen) <= 2 and len(seen) == 5


def test_slot_env_names_each_slot(tmp_path):
    # Slot i's commands see SLOT=i: 3 commands on 2 slots use slots 0 and 1 only,
    # and the first two start on different slots.
    cmds = [_py("import os,time; time.sleep(0.2); print(os.environ['SLOT'])") for _ in range(3)]
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    assert run_side_by_side(cmds, logs, parallel=2,
                            slot_env=lambda s: {"SLOT": str(s)}) == []
    slots = [p.read_text().strip() for p in logs]
    assert slots[:2] == ["0", "1"] and slots[2] in ("0", "1")


def test_parallel_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="parallel=0"):
        run_side_by_side([_py("pass")], [tmp_path / "0.log"], parallel=0)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    assert visible_gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus("cuda") == ["2", "5"]


def test_gpu_slot_env_pins_slots_round_robin():
    assert gpu_slot_env([]) is None
    env = gpu_slot_env(["2", "5"])
    assert [env(i)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["2", "5", "2", "5", "2"]


def test_workers_per_gpu_rounds_up():
    assert workers_per_gpu(11, []) == 11  # no GPU list: all share one device
    assert workers_per_gpu(11, ["0", "1"]) == 6
    assert workers_per_gpu(88, [str(i) for i in range(8)]) == 11
