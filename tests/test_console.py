"""The console of `clmscale sweep` (engine.console): a bounded number of lines when stdout is not a
terminal, progress shown, Ray's own output in runs/<name>/logs/, errors on the console, and Ctrl-C
exiting 130 with the line that resumes. The sweeps run in a subprocess (stdout a pipe) against the
session's Ray cluster; every wait has a timeout.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import write_sweep

from clmscale.engine.console import Board, ConsoleHandler, PlainView
from clmscale.engine.rundir import RunDir
from clmscale.engine.sweep import INJECT_NAN_TRIAL_ENV

REPO = Path(__file__).resolve().parents[1]


def _record(name: str, level: int, message: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    record.__dict__.update(extra)
    return record


def test_progress_updates_the_table_and_only_events_print():
    board, out, err = Board(), io.StringIO(), io.StringIO()
    handler = ConsoleHandler(board, PlainView(board, out=out, err=err), "runs/x/logs/driver.log")
    handler.emit(_record("clmscale", logging.INFO, "sweep x: 2 trials", console={"trials": ["a", "b"], "ended": []}))
    handler.emit(_record("clmscale", logging.INFO, "[a] 50%", console={"trial": "a", "tokens": 500, "budget": 1000,
                                                                       "loss": 3.5, "tokens_per_s": 100.0}))
    handler.emit(_record("clmscale", logging.INFO, "[b] finished", console={"trial": "b", "state": "finished",
                                                                              "tokens": 1000, "loss": 3.0}))
    handler.emit(_record("ray.data", logging.INFO, "Running Dataset train_1"))  # Ray's chatter: the file only
    handler.emit(_record("ray.tune.tune", logging.WARNING, "Resume experiment with: Tuner.restore(path=...)"))
    handler.emit(_record("ray.tune", logging.ERROR, "Trial task failed for trial a\nTraceback ..."))  # said by sweep.py
    handler.emit(_record("ray.data", logging.ERROR, "Operator failed\nTraceback ..."))
    handler.emit(_record("clmscale", logging.INFO, "[analyze] 1/3", console={"job": "finetune", "ok": True}))
    handler.emit(_record("clmscale.engine.prepare", logging.INFO, "prepared 100 molecules"))
    handler.emit(_record("urllib3", logging.INFO, "connection pool"))
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["sweep x: 2 trials", "[b] finished", "prepared 100 molecules"]
    assert err.getvalue().split(" ", 1)[1] == (
        "ray: Operator failed (more in runs/x/logs/driver.log)\n")
    status = board.status_line()
    assert "trials 1 running, 1 finished" in status and "a 500/1e+03 (50%) loss 3.5000 100 tok/s" in status
    assert "analysis finetune 1/0" in status


def _sweep_process(path: Path, address: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`clmscale sweep PATH` in a subprocess whose stdout and stderr are one pipe (not a terminal)."""
    return subprocess.Popen([sys.executable, "-m", "clmscale.engine.cli", "sweep", str(path), "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=path.parent,
                            env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.timeout(600)
def test_plain_console_is_short_shows_progress_and_errors_and_logs_ray(ray_cluster, tmp_path):
    """Two tiny trials, one of them failing in its worker: a few dozen lines at most, status lines,
    the failure's message on the console, Ray's worker output (its Ray Data bars) in logs/."""
    import ray

    path = write_sweep(tmp_path, "console", ["xxs"], [1.5e4], seeds=(0, 1),
                       resources={"workers": 1, "cpus_per_worker": 0.5, "max_failures": 0})
    # a step number that is not a number: the worker's train() raises ValueError on it (a real trial failure)
    proc = _sweep_process(path, ray.get_runtime_context().gcs_address, {INJECT_NAN_TRIAL_ENV: "xxs_15ktok_s1:boom"})
    try:
        out, _ = proc.communicate(timeout=500)
    finally:
        proc.kill()
    lines = out.splitlines()
    assert proc.returncode == 0, out
    assert 3 < len(lines) < 40, out
    assert any("status +" in line and "trials" in line for line in lines), out
    assert any("[xxs_15ktok_s0] finished" in line for line in lines), out
    assert any("[xxs_15ktok_s1] failed: ValueError: invalid literal" in line for line in lines), out
    assert "Running Dataset" not in out and "RayTrainWorker" not in out  # Ray's output is not on the console
    rd = RunDir(tmp_path / "runs" / "console")
    workers_log = rd.log_file("ray-workers").read_text()
    assert "Running Dataset" in workers_log and "ValueError" in workers_log
    assert "sweep console: 2 trials" in rd.log_file("driver").read_text()


@pytest.mark.timeout(600)
def test_ctrl_c_exits_130_and_says_how_to_resume(ray_cluster, tmp_path):
    import ray

    path = write_sweep(tmp_path, "sigint", ["xxs"], [8e4], checkpoints=4)
    trial = RunDir(tmp_path / "runs" / "sigint").trial("xxs_80ktok_s0")
    proc = _sweep_process(path, ray.get_runtime_context().gcs_address)
    try:
        deadline = time.monotonic() + 400
        while not list(trial.path.glob("checkpoints/*/COMPLETE")):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert f"continue with: clmscale sweep {path} --resume" in out
    assert "Tuner.restore" not in out and "checkpoints in" not in out
