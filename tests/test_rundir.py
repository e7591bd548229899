"""engine.rundir: the one module that opens the run directory's files.

A static check over engine/ and fits/ (no other module names a run-directory file or folder in
code), the schemas of docs/CONTRACTS.md against `TABLES`, the typed readers and writers, and the
one decision of which checkpoints count.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clmscale.engine.files import json_safe
from clmscale.engine.rundir import (IDENTITY, TABLES, CheckpointInfo, DataDir, RunDir, TableError, TrainResult, TrialDir,
                           counted_checkpoints)

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / "docs" / "CONTRACTS.md"

# the run directory's own file and folder names (docs/CONTRACTS.md, ARCHITECTURE.md)
RUN_FILES = {"sweep.yaml", "manifest.json", "rejects.csv", "trial.json", "metrics.jsonl", "nodes.txt",
             ".placement_group", "result.json", "sha256.json", "COMPLETE", "trainer_state.json", "events.jsonl",
             "fits.json", "index.html"}
RUN_FOLDERS = {"trials", "results", "analysis", "report", "tune", "checkpoints", "finetuned", "logs"}  # "data" is also the repo's
TABLE_FILE = re.compile(r"(^|/)(%s)\.parquet$" % "|".join(TABLES))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def _a_run_file(text: str) -> bool:
    """A path to a run-directory file: 'metrics.jsonl', 'results/fits.json', 'pretrain.parquet'. A message
    that names one ('no sweep.yaml there') is not a path: it has spaces."""
    if any(c.isspace() for c in text):
        return False
    return any(text == name or text.endswith("/" + name) for name in RUN_FILES) or bool(TABLE_FILE.search(text))


def run_dir_names_in(source: str) -> list[str]:
    """Where code (not docstrings) spells the path of a run-directory file, or builds `x / "<run folder>"`."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if _a_run_file(text):
                hits.append(f"line {node.lineno}: {text!r}")
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value in RUN_FOLDERS):
            hits.append(f"line {node.lineno}: / {node.right.value!r}")
    return hits


def test_the_static_check_catches_a_module_that_opens_run_files_itself():
    bad = '''
"""A docstring may name sweep.yaml and results/fits.json."""
def f(root, rd):
    """So may this one: metrics.jsonl."""
    (root / "results").mkdir()
    return open(rd.root / "trials" / "t" / "metrics.jsonl"), root / "pretrain.parquet"
'''
    hits = run_dir_names_in(bad)
    assert len(hits) == 4, hits  # "results", "trials", "metrics.jsonl", "pretrain.parquet"; not the docstrings
    assert run_dir_names_in('x = model_dir / "config.json"\nerror = "no manifest.json there"\nf"{r}/results/fits.json"') == [
        "line 3: '/results/fits.json'"]


def test_only_rundir_opens_the_run_directory_files():
    offenders = {}
    for path in sorted([*ROOT.glob("engine/*.py"), *ROOT.glob("fits/*.py")]):
        if path.name == "rundir.py":
            continue
        hits = run_dir_names_in(path.read_text())
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}, f"open these through engine.rundir instead: {offenders}"


def contract_columns() -> dict[str, list[str]]:
    """The `Columns:` line of each table in docs/CONTRACTS.md, in order."""
    text = CONTRACTS.read_text()
    out = {}
    for name, body in re.findall(r"^- `(\w+)\.parquet`(.*?)(?=^- `|^## |\Z)", text, re.DOTALL | re.MULTILINE):
        match = re.search(r"Columns:(.*?)(?:\.\s*$|\n\s*\n)", body, re.DOTALL | re.MULTILINE)
        assert match, f"docs/CONTRACTS.md: {name}.parquet has no 'Columns:' list"
        names = re.sub(r"\([^)]*\)", "", match.group(1))  # "(`finished` / `diverged`)": values, not columns
        out[name] = re.findall(r"`([a-z_0-9]+)`", names)
    return out


def test_contracts_md_lists_the_columns_the_readers_check():
    documented = contract_columns()
    assert set(documented) == set(TABLES), "docs/CONTRACTS.md and engine.rundir.TABLES name different tables"
    for name, schema in TABLES.items():
        assert documented[name] == list(schema.columns), name


def test_tables_are_checked_on_write_and_read(tmp_path):
    rd = RunDir(tmp_path / "run")
    row = {c: 1.0 for c in TABLES["pca"].columns} | {"kind": "trajectory", "group": "t", "label": "10"}
    rd.write_table("pca", pd.DataFrame([row]))
    assert list(rd.read_table("pca").columns) == list(TABLES["pca"].columns)
    with pytest.raises(TableError, match=r"pca\.parquet: column\(s\) \['extra'\] are not in the pca table"):
        rd.write_table("pca", pd.DataFrame([{**row, "extra": 1}]))
    pd.DataFrame([{"kind": "trajectory"}]).to_parquet(rd.table_path("pca"))  # written by something else
    with pytest.raises(TableError, match=r"pca\.parquet: no column\(s\) \['group', 'label', 'pc1', 'pc2'\]"):
        rd.read_table("pca")
    assert rd.read_table("hessian").empty and list(rd.read_table("hessian").columns) == list(TABLES["hessian"].columns)
    with pytest.raises(KeyError, match="no result table 'pretrian'"):
        rd.table_path("pretrian")


def test_results_of_a_run_survive_the_json_round_trip(tmp_path):
    folder = TrialDir(tmp_path / "trial")
    info = CheckpointInfo(n_tokens=10, path="checkpoints/000000000010", step=1, val_loss=2.0, train_loss=2.1,
                          flops=1e6, wall_s=0.5, tokens_per_s=20.0, mfu=math.nan)
    result = TrainResult(trial_id="t", status="finished", n_steps=1, n_tokens=10, budget_tokens=10, n_params=5,
                         n_params_non_embedding=3, flops=1e6, train_loss=2.1, val_loss=2.0, wall_s=0.5,
                         checkpoints=[info])
    assert folder.result() is None
    folder.write_result(result)
    assert '"mfu": null' in (folder.path / "result.json").read_text()  # JSON has no NaN
    back = folder.result()
    assert math.isnan(back.checkpoints[0].mfu) and back.checkpoints[0].n_tokens == 10 and back.status == "finished"
    assert json_safe({"a": np.float32(1.5), "b": [np.int64(2), float("inf")]}) == {"a": 1.5, "b": [2, None]}


def test_a_checkpoint_counts_once_sealed_and_its_damage_is_named(tmp_path):
    folder = TrialDir(tmp_path / "trial")
    path = folder.new_checkpoint(100)
    (path / "model.safetensors").write_bytes(b"weights")
    (folder.state_dir(path) / "rank_00000.pt").write_bytes(b"rng")
    assert folder.checkpoints() == []  # not sealed yet: it does not count
    folder.seal(path)
    assert folder.checkpoints() == [path] and folder.verify(path) == []
    (folder.state_dir(path) / "rank_00000.pt").write_bytes(b"RNG")
    assert folder.verify(path) == ["state/rank_00000.pt"] and folder.verify(path, weights_only=True) == []
    sound, events = folder.set_aside_corrupt(folder.checkpoints())
    assert sound == [] and events[0]["kept_as"] == f"{path.name}.corrupt"
    assert (folder.checkpoint_root / f"{path.name}.corrupt").is_dir()  # kept, not deleted


def pretrain_rows() -> pd.DataFrame:
    rows = []
    for trial, status, losses in [("a", "finished", [3.0, 2.5]), ("b", "diverged", [3.1]), ("c", "finished", [np.nan, 2.4])]:
        for i, loss in enumerate(losses):
            rows.append({"checkpoint": f"trials/{trial}/checkpoints/{i:012d}", "trial_id": trial, "rung": "xs",
                         "seed": 0, "n_params": 10, "n_params_non_embedding": 5, "tokens": 100 * (i + 1),
                         "flops": 1e6, "val_loss": loss, "status": status})
    return pd.DataFrame(rows)


def test_which_checkpoints_count_is_one_decision():
    counted = counted_checkpoints(pretrain_rows())
    assert counted.checkpoints[["trial_id", "tokens"]].values.tolist() == [["a", 100], ["a", 200], ["c", 200]]
    assert counted.left_out_trials == {"b"}
    reasons = {(e["trial_id"], e["status"]): e["reason"] for e in counted.excluded}
    assert reasons[("b", "diverged")].startswith("diverged after 100 tokens")
    assert "val_loss=nan" in reasons[("c", "finished")]
    assert set(IDENTITY) <= set(counted.checkpoints.columns)


def test_paths_in_tables_are_relative_to_the_run_directory(tmp_path):
    rd = RunDir(tmp_path / "run")
    path = rd.trial("a").checkpoint(100)
    assert rd.relative(path) == "trials/a/checkpoints/000000000100" and rd.path(rd.relative(path)) == path
    assert rd.trial_of("trials/a/checkpoints/000000000100").trial_id == "a"
    assert DataDir.is_output(Path("train-00003.parquet")) and not DataDir.is_output(Path("notes.txt"))
