"""`ray job submit -- clmscale sweep` against a `ray start --head` cluster: the README's commands, as written."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_sweep import write_sweep  # pytest puts tests/ on sys.path (rootdir-relative, no package)

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[1] / "README.md"
STORAGE_OPTION = ' --storage-root "$PWD/runs"'  # what keeps the results out of Ray's temporary copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(tmp_path: Path) -> Path:
    """A folder with `ray` in it for this Python: its own, or (a venv that borrows Ray's package from
    another one) Ray's CLI run by this Python, so the cluster's workers import this checkout's code."""
    if (BIN / "ray").exists():
        return BIN
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ray").write_text(f'#!/bin/sh\nexec {sys.executable} -c "import sys; from ray.scripts.scripts import main; '
                              f'sys.argv[0] = \'ray\'; main()" "$@"\n')
    (shim / "ray").chmod(0o755)
    return shim


def readme_cluster_commands() -> list[str]:
    """The command lines of the README's first block under "On a Ray cluster"."""
    section = README.read_text().split("## On a Ray cluster", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_shows_the_commands_this_test_runs():
    start, auth, submit, look = readme_cluster_commands()
    assert start == "ray start --head --num-cpus=2 --dashboard-host=127.0.0.1"
    assert auth.startswith("export RAY_AUTH_MODE=token ")
    assert submit == ("ray job submit --address http://127.0.0.1:8265 --working-dir . -- clmscale sweep "
                      "sweeps/demo.yaml" + STORAGE_OPTION)
    assert look.startswith("ls runs/demo/results/ ")


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_sweep(tmp_path):
    if not (BIN / "clmscale").exists():
        pytest.skip("clmscale is not installed next to this Python")
    if not (Path.home() / ".ray" / "auth_token").exists():  # what `ray.init()` makes on a fresh machine
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{_ray_cli(tmp_path)}:{BIN}:{os.environ['PATH']}"}
    gcs, dashboard = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="clm-ray-"))  # its own, short (socket paths): no other cluster's
    # every port its own: the test session's cluster holds the defaults (the job agent's 52365 among them)
    readme_start = readme_cluster_commands()[0]
    start = [*readme_start.split(), f"--port={gcs}", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
             "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}",
             f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}"]  # fmt: skip
    subprocess.run(start, env=env, check=True, timeout=120, capture_output=True)
    _, auth, submit, look = readme_cluster_commands()
    try:
        # the README's lines, run in a folder laid out like the repository (a tiny sweeps/demo.yaml, whose
        # storage.root is relative, as the shipped one's is); only the ports differ, for the reason above
        work = tmp_path / "job"
        (work / "sweeps").mkdir(parents=True)
        doc = yaml.safe_load(write_sweep(tmp_path, "demo", ["xxs"], [1e4]).read_text())
        doc["storage"]["root"] = "runs"
        (work / "sweeps" / "demo.yaml").write_text(yaml.safe_dump(doc))
        submit = submit.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}")

        refused = _submit(submit.replace(STORAGE_OPTION, ""), auth, work, env)  # the relative root, in the job
        assert refused.returncode != 0, refused.stdout[-3000:]
        assert "failed with exit code 2" in refused.stdout, refused.stdout[-3000:]
        assert ("error: sweeps/demo.yaml: storage.root=runs is relative, and this runs inside a Ray job whose "
                "working directory is Ray's temporary copy") in refused.stdout
        assert "--storage-root /shared/runs or CLMSCALE_STORAGE_ROOT=/shared/runs" in refused.stdout

        out = _submit(submit, auth, work, env)
        assert out.returncode == 0, out.stdout[-3000:]
        assert "succeeded" in out.stdout
        listed = subprocess.run(["bash", "-c", look], cwd=work, env=env, capture_output=True, text=True, timeout=30)
        assert "pretrain.parquet" in listed.stdout.split(), listed.stdout + listed.stderr
        table = pd.read_parquet(work / "runs" / "demo" / "results" / "pretrain.parquet")
        assert (table["status"] == "finished").all() and len(table) == 2
        copies = list(temp.glob("session_*/runtime_resources/working_dir_files/*"))
        assert copies and not [c for c in copies if (c / "runs").exists()]  # nothing left in Ray's copy
    finally:
        # not `ray stop`, which would stop every Ray cluster on the machine (the test session's too):
        # only the processes of this cluster, which all name its temp dir on their command lines
        subprocess.run(["pkill", "-9", "-f", str(temp)], timeout=60)


def _submit(command: str, auth: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    """One README submit line through bash (so "$PWD" is the folder it is typed in), after its export line."""
    for _ in range(30):  # the job agent comes up a little after `ray start` returns
        out = subprocess.run(["bash", "-c", f"{auth}\n{command} 2>&1"], cwd=work, env=env, timeout=480,
                             capture_output=True, text=True)
        if "No available agent" not in out.stdout:
            return out
        time.sleep(2)
    return out
