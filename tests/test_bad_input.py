"""Issue #7, bad input as a suite: each mistake a user can make, at the `clmscale` command line.

Every case runs one command in-process (typer's CliRunner) in a working folder that already holds a
sweep file, a corpus and a prepared run directory, and checks three things: exit code 2 (an error
message, not a traceback), a message that names the file / field / line / value concerned, and that
every file already in the folder is still there, byte for byte, with no trial started. The same
errors are checked function by function in test_config.py, test_prepare.py, test_tasks.py and
test_sweep.py. Commands that may start Ray (prepare, sweep) join the session's `ray_cluster`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import first_moses
from typer.testing import CliRunner

from clmscale.engine.cli import app
from clmscale.engine.config import load_sweep
from clmscale.engine.files import sha256_file
from clmscale.engine.rundir import RunDir

RAY_COMMANDS = {"prepare", "sweep"}  # the others never touch Ray


def write_sweep(root: Path, **sections) -> Path:
    """root/sweep.yaml: one xxs trial on root/corpus.csv, run dir root/runs/t; `sections` replace or extend sections."""
    doc = {
        "name": "t",
        "data": {"corpus": [str(root / "corpus.csv")], "val_fraction": 0.1},
        "model": {"sizes": ["xxs"], "max_seq_len": 32},
        "budget": {"tokens": [10_000]},
        "resources": {"cpus_per_worker": 0.5},
        "storage": {"root": str(root / "runs")},
    }
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) else value
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_dir(root: Path) -> RunDir:
    return RunDir(root / "runs" / "t")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """corpus.csv (50 MOSES SMILES, columns SMILES and id), sweep.yaml, and runs/t/data prepared in-process."""
    from clmscale.engine.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    rows = [f"{s},mol{i}\n" for i, s in enumerate(first_moses(50))]
    (root / "corpus.csv").write_text("SMILES,id\n" + "".join(rows))
    prepare(load_sweep(write_sweep(root)).data, run_dir(root).data, parallel=False)
    (run_dir(root).root / "notes.md").write_text("the user's own notes, next to the runs\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the cases: each prepares its mistake in a private copy of `prepared` and returns the command


def yaml_text(text: str) -> Callable[[Path], list[str]]:
    """The valid sweep file with `text` inserted after its first line (`name: t`): text starts on line 2."""

    def setup(root: Path) -> list[str]:
        path = write_sweep(root)
        first, rest = path.read_text().split("\n", 1)
        path.write_text(f"{first}\n{text}{rest}")
        return ["validate", str(path)]

    return setup


def on_sweep(command: str, **sections) -> Callable[[Path], list[str]]:
    """`clmscale <command> sweep.yaml`, the sweep file with `sections` changed."""
    return lambda root: [command, str(write_sweep(root, **sections))]


def custom_task_with_text_label(root: Path) -> list[str]:
    (root / "mine.csv").write_text("smiles,y\nCCO,1.5\nCCN,high\nCCC,2\n")
    custom = {"name": "mine", "path": str(root / "mine.csv"), "label_columns": ["y"], "task_type": "regression"}
    return ["validate", str(write_sweep(root, downstream={"tasks": ["mine"], "custom": [custom]}))]


def damaged_shard(command: str, shard: str, damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        damage(run_dir(root).data.path / shard)
        return [command, str(write_sweep(root))]

    return setup


def corpus_then(setup: Callable[[Path], list[str]], text: str) -> Callable[[Path], list[str]]:
    """A new corpus.csv, so the run directory is not prepared yet (its data/ goes)."""

    def new_corpus(root: Path) -> list[str]:
        shutil.rmtree(run_dir(root).data.path)
        (root / "corpus.csv").write_text(text)
        return setup(root)

    return new_corpus


def resume_another_sweep(root: Path) -> list[str]:
    run_dir(root).write_config(load_sweep(write_sweep(root)))  # the sweep that made runs/t
    for path in ("tune/pretrain/experiment_state.json", "trials/xxs_10ktok_s0/result.json"):
        (run_dir(root).root / path).parent.mkdir(parents=True, exist_ok=True)
        (run_dir(root).root / path).write_text("{}\n")
    return ["sweep", str(write_sweep(root, seeds=[0, 1])), "--resume"]  # same name, another grid


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


CASES = {
    # 1. malformed YAML: the file and the line
    "tab": (yaml_text("train:\n\tlr: 0.1\n"), ["sweep.yaml:3: malformed YAML", r"'\t'"]),
    "unclosed-bracket": (yaml_text("seeds: [0, 1\n"), ["sweep.yaml:3: malformed YAML", "expected ',' or ']'"]),
    # 2. a typo: the key, and the close one
    "unknown-key": (yaml_text("train:\n  micro_batch_sise: 16\n"),
                    ["sweep.yaml:3", "train.micro_batch_sise", "did you mean 'micro_batch_size'?"]),
    # 3. a wrong type: the field
    "wrong-type": (yaml_text('seeds: "abc"\n'), ["sweep.yaml:2: seeds:", "valid list"]),
    # 4. more GPUs per trial than the cluster has: refused before any trial starts
    "impossible-resources": (on_sweep("sweep", resources={"gpus_per_worker": 1000}),
                             ["trial xxs_10ktok_s0 needs", "1000 GPUs, but the cluster has"]),
    # 5. a prepared run directory with a shard gone or changed: named, with the manifest, and kept
    **{
        f"{kind}-shard-{command}": (damaged_shard(command, shard, damage), [shard, *words])
        for kind, shard, damage, words in [
            ("missing", "val-00000.parquet", Path.unlink, ["is missing", "manifest.json"]),
            ("corrupt", "train-00000.parquet", truncate, ["has sha256", "manifest.json records"]),
        ]
        for command in ("prepare", "sweep")
    },
    # 6. an empty corpus
    "empty-corpus": (corpus_then(on_sweep("prepare"), "SMILES\n"), ["corpus.csv: empty corpus"]),
    "zero-byte-corpus": (corpus_then(on_sweep("prepare"), ""), ["corpus.csv: empty corpus"]),
    # 7. a SMILES column that is not there: the columns that are
    "wrong-smiles-column": (
        corpus_then(on_sweep("prepare", data={"smiles_column": "smile"}), "SMILES,id\nCCO,a\n"),
        ["corpus.csv: no SMILES column 'smile'", "columns: 'SMILES', 'id'"],
    ),
    # 8. a downstream task whose label column holds text: the file, line, column and value
    "text-label": (custom_task_with_text_label, ["mine.csv:3: label column 'y'", "non-numeric value 'high'"]),
    # 9. an unknown task: the name, and close ones
    "unknown-task": (on_sweep("validate", downstream={"tasks": ["tox2l"]}),
                     ["unknown task 'tox2l'", "did you mean 'tox21'"]),
    # 9b. decontamination against a task nobody knows: the field, the name, and close ones
    "unknown-decontaminate-task": (on_sweep("validate", data={"decontaminate": ["freesolv_dem"]}),
                                   ["sweep.yaml:", "data.decontaminate.0", "unknown task 'freesolv_dem'",
                                    "did you mean 'freesolv_demo'"]),
    # 10. --resume on another sweep's run directory
    "resume-another-sweep": (resume_another_sweep, ["holds another sweep", "differs in name, model, budget or seeds"]),
}  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_by_name_and_loses_nothing(case, prepared, tmp_path, request):
    setup, expected = CASES[case]
    root = shutil.copytree(prepared, tmp_path / "work")
    args = setup(root)
    if args[0] in RAY_COMMANDS:
        request.getfixturevalue("ray_cluster")  # joined, never a second cluster on this machine
    before = snapshot(root)

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, f"{args}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert result.output.startswith("error: "), result.output
    for piece in expected:
        assert piece in result.output, f"{piece!r} not in {result.output!r}"
    after = snapshot(root)
    assert {path: after.get(path) for path in before} == before, "a file was deleted or changed"
    started = [path for path in set(after) - set(before) if path.startswith(("runs/t/tune/", "runs/t/trials/"))]
    assert not started, f"a trial started: {started}"
    if case == "impossible-resources":
        assert "runs/t/sweep.yaml" not in after  # refused before the run directory was written to
