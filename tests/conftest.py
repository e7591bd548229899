"""Fixtures shared across test files."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOSES = REPO / "data" / "moses_100k.csv.gz"  # the shipped pretraining subset, column SMILES
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data: present in CI and here, skipped where absent


def first_moses(n: int) -> list[str]:
    """The first n SMILES of the shipped MOSES subset, in file order."""
    with gzip.open(MOSES, "rt", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        return [row[0] for _, row in zip(range(n), rows)]


def pulled_in(modules: str, unwanted: set[str]) -> list[str]:
    """Which of `unwanted` a fresh interpreter has imported after `import <modules>` (run from the repository)."""
    import json
    import subprocess
    import sys

    code = f"import json, sys, {modules}; print(json.dumps(sorted(set({sorted(unwanted)!r}) & set(sys.modules))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout)


def flip_byte(path: Path) -> None:
    """Corrupt a file on disk the way a bad sector would: one byte in the middle inverted, size unchanged."""
    with open(path, "r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray cluster for the whole session (starting one takes 6-8 s).

    address="local" always starts a fresh cluster, so a `ray start` elsewhere on the machine is not joined.
    The dashboard is on (on a free port): it serves the State API, which Ray Train's placement-group
    cleaner and the fault tests use; without it a trial's placement group can outlive the trial.
    """
    import socket

    import ray

    if ray.is_initialized():
        yield ray
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, object_store_memory=256 * 1024**2)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only spin (seen ~50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
