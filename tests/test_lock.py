"""One driver per run directory: the run directory's lock, raced by two processes started together."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from clmscale.engine.cli import app
from clmscale.engine.rundir import RunDir, RunDirLocked

ROUNDS = 8
BARRIER_S = 60  # every wait has a timeout: a broken lock fails the test, never hangs it


def _driver(root: str, barrier, results, rounds: int) -> None:
    """One of two drivers: each round, take the lock the moment the other one tries too (the barrier),
    hold it until both have tried, then let it go."""
    rd = RunDir(root)
    for i in range(rounds):
        barrier.wait(BARRIER_S)  # the test has set the stage (no lock, or a stale one)
        try:
            lock = rd.lock(f"driver {os.getpid()}").acquire()
            results.put((i, os.getpid(), "held", ""))
        except RunDirLocked as err:
            lock = None
            results.put((i, os.getpid(), "refused", str(err)))
        barrier.wait(BARRIER_S)  # both have tried while the winner holds it
        if lock is not None:
            lock.release()
        barrier.wait(BARRIER_S)  # released before the next round


def _stale_lock(rd: RunDir, pid: int = 999_999, host: str = "elsewhere", age_s: float = 600.0) -> None:
    """A lock file left by a driver that died: its heartbeat is `age_s` old."""
    beat = time.time() - age_s
    record = {"pid": pid, "host": host, "command": "clmscale sweep old.yaml", "since": "2026-01-01T00:00:00+0000",
              "heartbeat": beat, "token": "0" * 16}
    rd.root.mkdir(parents=True, exist_ok=True)
    rd.lock_path.write_text(json.dumps(record))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", ["free", "stale"])
def test_of_two_drivers_started_together_exactly_one_gets_the_lock(tmp_path, stage):
    rd = RunDir(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (Ray, pytest-timeout)
    barrier, results = ctx.Barrier(3), ctx.Queue()
    drivers = [ctx.Process(target=_driver, args=(str(rd.root), barrier, results, ROUNDS)) for _ in range(2)]
    for p in drivers:
        p.start()
    try:
        for _ in range(ROUNDS):
            if stage == "stale":
                _stale_lock(rd)  # both find the same stale lock: only one may take it over
            barrier.wait(BARRIER_S)
            barrier.wait(BARRIER_S)
            rounds = sorted([results.get(timeout=BARRIER_S) for _ in range(2)], key=lambda r: r[2])
            barrier.wait(BARRIER_S)
            (_, winner, held, _), (_, loser, refused, message) = rounds
            assert (held, refused) == ("held", "refused"), rounds
            assert f"pid {winner} on {socket.gethostname()}" in message and f"`driver {winner}`" in message, message
            assert not rd.lock_path.exists()  # released
    finally:
        for p in drivers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in drivers] == [0, 0]


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    rd = RunDir(tmp_path / "run")
    _stale_lock(rd, age_s=120)
    with caplog.at_level(logging.WARNING, logger="clmscale"), rd.lock("clmscale sweep new.yaml"):
        assert rd.lock_holder().pid == os.getpid() and rd.lock_holder().command == "clmscale sweep new.yaml"
    assert "taking over the lock of `clmscale sweep old.yaml` (pid 999999 on elsewhere" in caplog.text
    assert "no heartbeat for 120 s" in caplog.text

    pid = _dead_pid()  # same host, fresh heartbeat, but its process has exited
    _stale_lock(rd, pid=pid, host=socket.gethostname(), age_s=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clmscale"), rd.lock("clmscale analyze run"):
        pass
    assert f"process {pid} is gone" in caplog.text and not rd.lock_path.exists()


def test_a_live_holder_keeps_it_and_its_heartbeat_moves(tmp_path):
    rd = RunDir(tmp_path / "run")
    _stale_lock(rd, pid=os.getppid(), host="another-host", age_s=1)  # elsewhere, beating: not ours to judge
    with pytest.raises(RunDirLocked, match=r"in use by `clmscale sweep old.yaml` \(pid \d+ on another-host"):
        rd.lock("clmscale sweep new.yaml").acquire()
    rd.lock_path.unlink()
    with rd.lock("mine", heartbeat_s=0.05):
        first = rd.lock_holder().heartbeat
        deadline = time.monotonic() + 10
        while rd.lock_holder().heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rd.lock_holder().heartbeat > first
    with pytest.raises(KeyboardInterrupt), rd.lock("interrupted"):  # Ctrl-C releases it too
        raise KeyboardInterrupt
    assert not rd.lock_path.exists()


def test_a_second_command_on_a_held_run_directory_exits_2_naming_the_holder(tmp_path):
    from test_sweep import write_sweep  # pytest puts tests/ on sys.path

    sweep = write_sweep(tmp_path, "held", ["xxs"], [1e4])
    rd = RunDir(tmp_path / "runs" / "held")
    with rd.lock("clmscale sweep other.yaml") as lock:
        for command in (["prepare", str(sweep)], ["sweep", str(sweep)]):
            out = CliRunner().invoke(app, command)
            assert out.exit_code == 2, out.output
            line = out.output.strip()
            assert line.startswith("error: ") and "\n" not in line, line
            assert (f"in use by `clmscale sweep other.yaml` (pid {os.getpid()} on {socket.gethostname()}, "
                    f"since {lock.holder.since})") in line
        assert rd.lock_holder().token == lock.holder.token  # the refused commands left it alone
    assert not rd.data.has_manifest() and not rd.exists()  # nothing ran
