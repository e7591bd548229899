"""`ray job submit -- clmscale sweep` against a `ray start --head` cluster, as the README shows it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from test_sweep import write_sweep  # pytest puts tests/ on sys.path (rootdir-relative, no package)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_sweep(tmp_path):
    if not (BIN / "ray").exists() or not (BIN / "clmscale").exists():
        pytest.skip("ray or clmscale is not installed next to this Python")
    if not (Path.home() / ".ray" / "auth_token").exists():  # what `ray.init()` makes on a fresh machine
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dashboard = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="clm-ray-"))  # its own, short (socket paths): no other cluster's
    # every port its own: the test session's cluster holds the defaults (the job agent's 52365 among them)
    start = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]  # fmt: skip
    subprocess.run(start, env=env, check=True, timeout=120, capture_output=True)
    try:
        work = tmp_path / "job"
        work.mkdir()
        sweep = write_sweep(work, "job", ["xxs"], [1e4])
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                  "--working-dir", str(work), "--", "clmscale", "sweep", sweep.name]  # fmt: skip
        for _ in range(30):  # the job agent comes up a little after `ray start` returns
            out = subprocess.run(submit, env=env, timeout=480, capture_output=True, text=True, cwd=work)
            if "No available agent" not in out.stdout + out.stderr:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout + out.stderr
        table = pd.read_parquet(work / "runs" / "job" / "results" / "pretrain.parquet")
        assert (table["status"] == "finished").all() and len(table) == 2
    finally:
        # not `ray stop`, which would stop every Ray cluster on the machine (the test session's too):
        # only the processes of this cluster, which all name its temp dir on their command lines
        subprocess.run(["pkill", "-9", "-f", str(temp)], timeout=60)
