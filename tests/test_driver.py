"""What a driver checks before anything runs: where its results will land, and that its cluster answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from clmscale.engine.cli import app
from clmscale.engine.config import SweepFileError, load_sweep, ray_job_working_copy, with_storage_root

BIN = Path(sys.executable).parent
JOB_COPY = "session_2026_x/runtime_resources/working_dir_files/_ray_pkg_0123abcd"  # what `ray job submit` runs in


def _sweep(folder: Path, root: str | None = None) -> Path:
    """A small valid sweep file (nothing here runs it)."""
    corpus = folder / "corpus.smi"
    corpus.write_text("CCO\nc1ccccc1\n")
    doc = {"name": "where", "data": {"corpus": [str(corpus)]}, "model": {"family": "mlm", "sizes": ["xxs"]},
           "budget": {"tokens": [1e4]}}
    if root is not None:
        doc["storage"] = {"root": root}
    path = folder / "where.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _dead_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_job_working_copy_is_recognised_from_the_path(tmp_path):
    job = tmp_path / JOB_COPY
    assert ray_job_working_copy(job / "sweeps") == job and ray_job_working_copy(job) == job
    assert ray_job_working_copy(tmp_path / "runtime_resources" / "pip") is None
    assert ray_job_working_copy(tmp_path) is None


def test_a_relative_storage_root_is_refused_only_inside_a_job_copy(tmp_path):
    cfg = load_sweep(_sweep(tmp_path))
    job = tmp_path / JOB_COPY
    assert with_storage_root(cfg, None, cwd=tmp_path).run_dir == Path("runs/where")  # outside a job: relative is fine
    refusal = r"^cli: storage.root=runs is relative, and this runs inside a Ray job whose working directory is Ray's"
    with pytest.raises(SweepFileError, match=refusal + r" temporary copy \(.*_ray_pkg_0123abcd\)"):
        with_storage_root(cfg, None, cwd=job, source="cli")
    assert with_storage_root(cfg, tmp_path / "shared", cwd=job).run_dir == tmp_path / "shared" / "where"


def test_storage_root_from_the_option_or_the_environment(tmp_path, monkeypatch):
    sweep = _sweep(tmp_path, root="from_file")
    runner = CliRunner()
    shown = lambda out: out.output.splitlines()[0]  # "# FILE: valid; run dir DIR"  # noqa: E731
    assert shown(runner.invoke(app, ["validate", str(sweep)])).endswith("run dir from_file/where")
    env = {"CLMSCALE_STORAGE_ROOT": str(tmp_path / "env")}
    assert shown(runner.invoke(app, ["validate", str(sweep)], env=env)).endswith(f"run dir {tmp_path}/env/where")
    out = runner.invoke(app, ["validate", str(sweep), "--storage-root", str(tmp_path / "cli")], env=env)
    assert shown(out).endswith(f"run dir {tmp_path}/cli/where")  # the option beats the environment

    job = tmp_path / JOB_COPY
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    for args, env, source in ((["prepare", str(sweep)], {}, str(sweep)),
                              (["sweep", str(sweep)], {"CLMSCALE_STORAGE_ROOT": "runs"}, "CLMSCALE_STORAGE_ROOT"),
                              (["demo", str(sweep), "--storage-root", "runs"], {}, "--storage-root")):
        out = runner.invoke(app, args, env=env)
        assert out.exit_code == 2, out.output
        assert out.output.startswith(f"error: {source}: storage.root=") and "is relative" in out.output
        assert "--storage-root /shared/runs or CLMSCALE_STORAGE_ROOT=/shared/runs" in out.output
    assert list(job.iterdir()) == []  # refused before anything ran: no run directory, no lock
    out = runner.invoke(app, ["validate", str(sweep), "--storage-root", str(tmp_path / "shared")])
    assert out.exit_code == 0 and shown(out).endswith(f"run dir {tmp_path}/shared/where")


@pytest.mark.timeout(180)
def test_a_cluster_address_that_does_not_answer_is_an_error_naming_it(tmp_path):
    if not (BIN / "clmscale").exists():
        pytest.skip("clmscale is not installed next to this Python")
    sweep = _sweep(tmp_path, root=str(tmp_path / "runs"))
    port = _dead_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a subprocess: in this one a test may already have joined a cluster, and then nothing is looked up
    start = time.monotonic()
    out = subprocess.run([str(BIN / "clmscale"), "sweep", str(sweep)], capture_output=True, text=True, timeout=150,
                         env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"error: no Ray cluster answers at 127.0.0.1:{port} (from RAY_ADDRESS) within 5 s" in out.stderr
    assert "unset RAY_ADDRESS to start a local cluster" in out.stderr
    assert not (tmp_path / "runs" / "where" / ".lock").exists()  # released on the way out

    # what a head node that died without `ray stop` leaves: Ray's record of it, which ray.init would retry
    recorded = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    recorded.parent.mkdir(parents=True)
    recorded.write_text(f"127.0.0.1:{port}")
    out = subprocess.run([str(BIN / "clmscale"), "prepare", str(sweep)], capture_output=True, text=True, timeout=150,
                         env={**env, "RAY_TMPDIR": str(tmp_path / "raytmp")})
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"error: no Ray cluster answers at 127.0.0.1:{port} (from {recorded}, left by `ray start`)" in out.stderr
    assert "run `ray stop` (it clears that file) to start a local cluster" in out.stderr
    assert time.monotonic() - start < 120  # seconds (two interpreters starting on a busy machine), not minutes
