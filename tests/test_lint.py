"""ruff and mypy over engine/ and fits/ (issue 12): what they find is fixed, or ignored inline with a reason.

The tools are the ones pinned in pyproject's `test` extra, run from the environment the tests run in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # not resolved: a venv's python is a link to the base interpreter


def _run(tool: str, *args: str, timeout: int) -> None:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{exe} is absent: install the test extra (pip install -e '.[test]') to run {tool}")
    out = subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{tool} {' '.join(args)} exited {out.returncode}:\n{out.stdout}{out.stderr}"


def test_ruff_check():
    _run("ruff", "check", "engine", "fits", timeout=120)


@pytest.mark.xfail(strict=True, reason="ruff format lands in one commit after the open branches merge")
def test_ruff_format():
    _run("ruff", "format", "--check", "engine", "fits", timeout=120)


def test_mypy():
    # reads [tool.mypy] in pyproject.toml (files = engine, fits); a cold cache takes minutes on 2 cores
    _run("mypy", timeout=540)
