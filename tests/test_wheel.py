"""The wheel, as a user who installs clmscale rather than cloning it gets it.

Built from a copy of what pyproject.toml packages, installed into a fresh virtual environment that
borrows this one's dependencies (a .pth file, and `pip install --no-deps`: torch is not downloaded
again), then run from a folder outside the repository: `clmscale validate` on the shipped demo sweep
and `clmscale prepare` on a tiny corpus.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, first_moses

SOURCES = ("pyproject.toml", "README.md", "clmscale", "engine", "fits", "data", "sweeps")


def _setuptools_here() -> bool:
    """setuptools>=68 (pyproject's build requirement) importable here: build without fetching one."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    return int(version("setuptools").split(".")[0]) >= 68


def _site_packages() -> list[str]:
    """This interpreter's site-packages folders (a venv's, and any it chains to). Listed in a .pth file,
    their own .pth files are not run: the editable install's finder stays out of the new venv."""
    dirs = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv's python, venv's clmscale) for a wheel built from a copy of the packaged sources."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if copy is shutil.copytree else {}
        copy(REPO / name, src / name, **kwargs)
    isolation = ["--no-build-isolation"] if _setuptools_here() else []  # else pip fetches setuptools from the index
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(base / "dist"), str(src)], check=True, timeout=600, cwd=base)
    (wheel,) = (base / "dist").glob("clmscale-*.whl")

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # after the venv's own site-packages: the dependencies come from here, clmscale only from the wheel
    Path(purelib, "borrowed-deps.pth").write_text("\n".join(_site_packages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    return wheel, python, venv / "bin" / "clmscale", Path(purelib)


def _env(tmp_path: Path) -> dict[str, str]:
    """No PYTHONPATH, no cluster to join: prepare starts its own local Ray, with a fresh temp dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "CLMSCALE_STORAGE_ROOT")}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rw")  # short: Ray's socket paths have a length limit
    return env


def test_the_wheel_holds_one_package_with_the_data_and_sweeps(installed):
    wheel, *_ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("clmscale/__init__.py", "clmscale/engine/cli.py", "clmscale/fits/report.py",
                   "clmscale/data/freesolv.csv", "clmscale/data/solubility.csv", "clmscale/data/moses_100k.csv.gz",
                   "clmscale/data/README.md", "clmscale/sweeps/demo.yaml", "clmscale/sweeps/paper.yaml"):
        assert needed in names, f"{wheel.name} lacks {needed}"
    licences = [n for n in names if n.startswith("clmscale/data/LICENSE-")]
    assert licences == sorted(f"clmscale/data/{p.name}" for p in (REPO / "data").glob("LICENSE-*")) != []
    tops = {n.split("/")[0] for n in names}
    assert tops == {"clmscale", wheel.name.split("-py3")[0] + ".dist-info"}, tops  # no engine/, no fits/
    entry = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "clmscale = clmscale.engine.cli:app" in entry


def test_the_installed_wheel_runs_from_outside_the_repository(installed, tmp_path):
    _, python, clmscale, purelib = installed
    env = _env(tmp_path)
    where = subprocess.run(
        [str(python), "-c", "import json, sys, clmscale.engine, clmscale.fits, importlib.resources as r; "
         "print(json.dumps([clmscale.engine.__file__, clmscale.fits.__file__, str(r.files('clmscale.sweeps')), "
         "'engine' in sys.modules or 'fits' in sys.modules, sys.path]))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    engine_file, fits_file, sweeps, top_level, path = json.loads(where.stdout)
    for file in (engine_file, fits_file, sweeps):
        assert Path(file).resolve().is_relative_to(purelib.resolve()), f"{file} is not the wheel's copy"
    assert not top_level and REPO not in [(tmp_path / p).resolve() for p in path], path

    demo = Path(sweeps) / "demo.yaml"
    out = subprocess.run([str(clmscale), "validate", str(demo)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "moses_100k.csv.gz" in out.stdout  # its corpus, found beside the sweep file in the wheel

    (tmp_path / "corpus.csv").write_text("SMILES\n" + "\n".join(first_moses(50)) + "\n")
    doc = {"name": "tiny", "data": {"corpus": ["corpus.csv"], "val_fraction": 0.1, "decontaminate": False},
           "model": {"family": "mlm", "sizes": ["xxs"], "max_seq_len": 64}, "budget": {"tokens": [1e4]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(doc))
    out = subprocess.run([str(clmscale), "prepare", "tiny.yaml"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = tmp_path / "runs" / "tiny" / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"]["n_in"] == 50
    assert (data / "tokenizer").is_dir()
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_demo_without_a_file_is_the_installed_demo_sweep(tmp_path, monkeypatch):
    """`clmscale demo` with no argument: the installed sweeps/demo.yaml, its corpus beside it, runs/ in the cwd."""
    from clmscale.engine.cli import _load_checked, shipped_sweep

    monkeypatch.chdir(tmp_path)
    path = shipped_sweep("demo.yaml")
    cfg = _load_checked(path)
    assert path.name == "demo.yaml" and cfg.data.corpus[0].resolve().is_file()
    assert cfg.run_dir == Path("runs/demo") and cfg.run_dir.resolve() == tmp_path / "runs" / "demo"
