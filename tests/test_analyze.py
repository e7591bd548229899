"""`clmscale analyze` on a real run: one tiny sweep (Ray Tune x Train x DeepSpeed on CPU), then the
analysis as Ray tasks on the session's local cluster: the rows it writes, the rerun that runs
nothing, the Hessian over a Ray Train worker group equal to one worker's, bad input that becomes
error rows while the other rows are written, and a driver killed mid-analysis. Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import flip_byte
from test_sweep import write_sweep  # pytest puts tests/ on sys.path (rootdir-relative, no package)

from fixtures.claims import check_claims

from clmscale.engine.analyze import Context, hessian_job, plan_jobs, run_analysis, select_checkpoints
from clmscale.engine.config import AnalysisConfig, SweepConfig, load_sweep
from clmscale.engine.rundir import ANALYSIS_TABLES, TABLES, RunDir

TASK = "freesolv_demo"  # shipped with the package: no download, no ../shared
DOWNSTREAM = {"tasks": [TASK], "seeds": [0], "modes": ["finetune"], "baselines": False, "epochs": 2,
              "patience": 1, "batch_size": 16, "max_molecules": 120, "lrs": [1e-4, 1e-3]}
ANALYSIS = {"hessian_top_k": 3, "hessian_batches": 2, "hessian_max_iter": 20, "trace_matvecs": 6,
            "density_runs": 1, "landscape_resolution": 3, "landscape_2d": False}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def swept(ray_cluster, tmp_path_factory) -> RunDir:
    from clmscale.engine.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("analyze")
    cfg = load_sweep(write_sweep(tmp, "an", ["xxs"], [1.5e4], downstream=DOWNSTREAM, analysis=ANALYSIS))
    run_sweep(cfg)
    return RunDir(cfg.run_dir)


@pytest.fixture(scope="module")
def analyzed(swept) -> RunDir:
    """The sweep's run directory, analysed once."""
    run_analysis(swept.root)
    return swept


def copy_run(rd: RunDir, dest: Path, **changes) -> RunDir:
    """A copy of the run directory (tables name checkpoints relative to it, so nothing needs
    rewriting) with `changes` (section -> fields) applied to its sweep.yaml; analysis results
    are not copied, the pretraining table is."""
    shutil.copytree(rd.root, dest, ignore=shutil.ignore_patterns("results", "analysis"))
    new = RunDir(dest)
    new.write_table("pretrain", rd.read_table("pretrain"))
    doc = new.config().model_dump(mode="json")
    new.write_config(SweepConfig.model_validate({**doc, **{s: {**doc[s], **fields} for s, fields in changes.items()}}))
    return new


def read(rd: RunDir, table: str) -> pd.DataFrame:
    return rd.read_table(table)


def counted(rd: RunDir, which: str) -> pd.DataFrame:
    return select_checkpoints(rd.counted_checkpoints().checkpoints, AnalysisConfig(checkpoints=which))


def test_checkpoints_at_a_shared_milestone_are_analysed_beside_each_trials_last(caplog):
    """analysis.tokens: with per-rung budgets each trial's last checkpoint sits at its own D; a listed milestone
    adds each trial's checkpoint within 2 % of it (they land a few batches past it), and a count no trial
    reached is named in a warning."""
    table = pd.DataFrame({"trial_id": ["a"] * 3 + ["b"] * 2, "n_params": [1, 1, 1, 2, 2],
                          "tokens": [1.2e6, 2.41e6, 4.8e6, 1.21e6, 2.4e6], "checkpoint": list("pqrst")})
    assert list(select_checkpoints(table, AnalysisConfig())["checkpoint"]) == ["r", "t"]
    assert list(select_checkpoints(table, AnalysisConfig(tokens=[2.4e6]))["checkpoint"]) == ["q", "r", "t"]
    assert len(select_checkpoints(table, AnalysisConfig(checkpoints="all", tokens=[2.4e6]))) == 5
    with caplog.at_level("WARNING", logger="clmscale"):
        assert list(select_checkpoints(table, AnalysisConfig(tokens=[1.2e6, 9.6e6]))["checkpoint"]) == ["p", "r", "s", "t"]
    assert "analysis.tokens: no checkpoint within 2% of 9,600,000 tokens" in caplog.text
    for bad in ([], [0], [2.4e6, 2.4e6]):
        with pytest.raises(ValueError, match="tokens must be"):
            AnalysisConfig(tokens=bad)


def test_every_job_writes_its_rows(analyzed):
    final = counted(analyzed, "final")["checkpoint"].item()
    search = read(analyzed, "lr_search")
    assert sorted(search["lr"]) == [1e-4, 1e-3] and (search["status"] == "ok").all()
    assert (search["checkpoint"] == final).all() and search["val_value"].notna().all()
    finetune = read(analyzed, "finetune")
    assert finetune[list(TABLES["finetune"].key)].drop_duplicates().values.tolist() == [[final, TASK, 0, 0, "finetune"]]
    assert (finetune["status"] == "ok").all() and sorted(finetune["metric"]) == ["mae", "rmse"]  # one row per metric
    primary = finetune[finetune["primary"].astype(bool)].squeeze()
    assert primary["metric"] == "rmse" and primary["value"] > 0 and primary["label_sd"] > 0
    assert primary["lr"] in (1e-4, 1e-3) and np.isfinite(primary["task_val_loss"]) and primary["pooling"] == "mean"
    splits = read(analyzed, "splits")
    assert set(splits["part"]) == {"train", "val", "test"} and len(splits) == 120  # every molecule, where it went
    tasks = read(analyzed, "tasks").squeeze()
    assert tasks["n_molecules"] == 120 and 0 < tasks["nn_tanimoto_mean"] <= 1 and tasks["n_corpus_sample"] > 0

    hessian = read(analyzed, "hessian").set_index("loss")
    assert sorted(hessian.index) == [f"finetune:{TASK}", "pretrain", f"pretrained_task:{TASK}"]
    assert (hessian["status"] == "ok").all()
    # the task loss at the pretrained weights: over the encoder only, which fine-tuning's adds the head to
    assert hessian.loc[f"pretrained_task:{TASK}", "hessian_dim"] < hessian.loc[f"finetune:{TASK}", "hessian_dim"]
    for loss, row in hessian.iterrows():
        eigenvalues = np.asarray(row["eigenvalues"])
        assert eigenvalues.shape == (3,) and np.all(np.diff(eigenvalues) <= 0), loss
        assert row["lambda_max"] == eigenvalues[0] > 0 and np.isfinite(row["trace"]) and row["n_workers"] == 1
    # two different losses at two different points: their curvature is not the same number
    assert hessian.loc["pretrain", "lambda_max"] != hessian.loc[f"finetune:{TASK}", "lambda_max"]
    assert hessian.loc["pretrain", "hessian_dim"] > hessian.loc[f"finetune:{TASK}", "hessian_dim"]  # no LM head

    landscape = read(analyzed, "landscape")
    assert (landscape["status"] == "ok").all()
    # per checkpoint: a 1-D slice of landscape_resolution 3 points, the pretrained -> fine-tuned line's 3 points
    # on [-0.5, 1.5] with α = 0 and 1 added, and one sharpness row of the task loss at the pretrained encoder
    assert landscape.groupby("surface").size().to_dict() == {"random_directions": 3, f"pt_to_ft:{TASK}": 5,
                                                             f"pretrained_task:{TASK}": 1}
    task_sharpness = landscape[landscape["surface"] == f"pretrained_task:{TASK}"].squeeze()
    assert task_sharpness["kind"] == "sharpness" and task_sharpness["checkpoint"] == final
    assert 0 < task_sharpness["eps_sharpness"] < np.inf and 0 < task_sharpness["adaptive_sharpness"] < np.inf
    # the loss of the pretrained_task Hessian, at the same weights and head
    assert task_sharpness["loss"] == pytest.approx(hessian.loc[f"pretrained_task:{TASK}", "loss_value"], rel=1e-5)


def test_a_rerun_runs_nothing(analyzed):
    before = {name: (analyzed.table_path(name).stat().st_mtime_ns, read(analyzed, name)) for name in ANALYSIS_TABLES}
    tables = run_analysis(analyzed.root)
    for name, (mtime, table) in before.items():
        assert analyzed.table_path(name).stat().st_mtime_ns == mtime, name  # not even rewritten
        pd.testing.assert_frame_equal(tables[name].reset_index(drop=True), table)


@pytest.mark.parametrize("loss", ["pretrain", f"finetune:{TASK}"])
def test_hessian_over_two_ray_train_workers_equals_one_worker(analyzed, loss):
    ctx = Context.of(analyzed)
    job = next(j for j in plan_jobs(ctx, counted(analyzed, "final")) if j.table == "hessian" and j.key[1] == loss)
    one = hessian_job(ctx, **job.args)[0]
    two = hessian_job(ctx.with_analysis(hessian_workers=2), **job.args)[0]
    assert (one["n_workers"], two["n_workers"]) == (1, 2) and one["n_batches"] == two["n_batches"] == 2
    # float32 Hessian-vector products summed in another order: ~1e-6 relative after Lanczos' 30 steps (CI saw
    # 2.1e-6 on a top eigenvalue of 254); a wrongly weighted half of the batches would be off by percents
    np.testing.assert_allclose(two["eigenvalues"], one["eigenvalues"], rtol=1e-5)
    np.testing.assert_allclose([two["trace"], two["loss_value"], two["grad_norm"]],
                               [one["trace"], one["loss_value"], one["grad_norm"]], rtol=1e-6)
    # SLQ keeps no basis (bounded memory), so the all-reduce's other summation order grows through its
    # 50 unreorthogonalised steps: the density agrees to ~1e-3, its moments exactly (tests/test_hessian.py)
    # (CI 2026-12-07: 52 of 1,001 points more than 1 % apart, by at most 1.9e-8 in absolute terms)
    np.testing.assert_allclose(two["density"], one["density"], rtol=1e-2, atol=1e-4 * max(one["density"]))
    assert two["n_matvecs"] == one["n_matvecs"]
    assert not any(analyzed.ray_train_storage.iterdir())  # the worker group's run folder is gone


def test_bad_input_becomes_error_rows_and_the_rest_is_written(swept, tmp_path):
    """An unknown task, a task whose split has no valid SMILES, a checkpoint without weights."""
    empty = tmp_path / "empty.csv"
    empty.write_text("smiles,y\nnot_a_smiles,1.0\nC1CC,2.0\n")
    custom = [{"name": "empty", "path": str(empty), "smiles_column": "smiles", "label_columns": ["y"],
               "task_type": "regression"}]
    rd = copy_run(swept, tmp_path / "run", downstream={"tasks": [TASK, "freesolve", "empty"], "custom": custom},
                  analysis={"checkpoints": "all"})
    first, final = counted(rd, "all")["checkpoint"]
    (rd.path(first) / "model.safetensors").unlink()
    run_analysis(rd.root)

    finetune = read(rd, "finetune")
    finetune = finetune[finetune["primary"].fillna(True).astype(bool)].set_index(["checkpoint", "task"])
    assert finetune.loc[(final, TASK), "status"] == "ok"
    for where, message in [((final, "freesolve"), "freesolv"),  # names the task and suggests the close one
                           ((final, "empty"), "no valid SMILES"),
                           ((first, TASK), "missing weights")]:
        row = finetune.loc[where]
        assert row["status"] == "error" and message in row["error"], (where, row["error"])
    hessian = read(rd, "hessian").set_index(["checkpoint", "loss"])["status"]
    assert hessian[(final, "pretrain")] == hessian[(final, f"finetune:{TASK}")] == "ok"
    assert hessian[(first, "pretrain")] == "error" and hessian[(final, "finetune:empty")] == "error"

    from typer.testing import CliRunner

    from clmscale.engine.cli import app

    result = CliRunner().invoke(app, ["analyze", str(rd.root)])  # ray is initialised: joins the session cluster
    assert result.exit_code == 1 and "freesolve" in result.output  # the failed jobs were retried and failed again
    after = read(rd, "finetune")
    after = after[after["primary"].fillna(True).astype(bool)].set_index(["checkpoint", "task"])
    assert after.loc[(final, TASK), "status"] == "ok" and len(after) == len(finetune)  # kept, not redone


def test_driver_killed_mid_analysis_then_rerun_loses_and_redoes_nothing(swept, tmp_path, ray_cluster):
    rd = copy_run(swept, tmp_path / "run", analysis={"checkpoints": "all"})
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "clmscale.engine.cli", "analyze", str(rd.root), "--address", address],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while sum(len(read(rd, name)) for name in ANALYSIS_TABLES) < 2:  # 2 of 10 jobs
            assert driver.poll() is None, "the analysis ended before it could be killed"
            assert time.monotonic() < deadline, "fewer than 2 jobs done after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    written = {name: read(rd, name) for name in ANALYSIS_TABLES if rd.has_table(name)}
    run_analysis(rd.root)

    planned = plan_jobs(Context.of(rd), counted(rd, "all"))
    for name in ANALYSIS_TABLES:
        columns = TABLES[name].key
        final = read(rd, name)
        keys = set(map(tuple, final[list(columns)].drop_duplicates().values.tolist()))
        assert keys == {j.key for j in planned if j.table == name}, name  # nothing lost
        assert (final["status"] == "ok").all(), final["error"].tolist()
        n_rows = final.groupby(list(columns)).size()
        if name in written:  # every row written before the kill is still there, unchanged, and not redone
            before = written[name]
            pd.testing.assert_frame_equal(final.iloc[: len(before)].reset_index(drop=True), before)
            once = before.groupby(list(columns)).size()
            assert (n_rows.loc[once.index] == once).all(), name


def test_a_corrupt_checkpoint_is_replaced_by_the_one_before_and_recorded(swept, tmp_path):
    rd = copy_run(swept, tmp_path / "run", analysis={"hessian_top_k": 0, "landscape_resolution": 0})
    first, final = counted(rd, "all")["checkpoint"]
    flip_byte(rd.path(final) / "model.safetensors")
    damaged = (rd.path(final) / "model.safetensors").read_bytes()

    run_analysis(rd.root)

    finetune = read(rd, "finetune")
    assert set(finetune["checkpoint"]) == {first} and (finetune["status"] == "ok").all()
    events = [json.loads(line) for line in rd.events.read_text().splitlines()]
    assert [{k: e[k] for k in ("stage", "event", "checkpoint", "files", "used_instead")} for e in events] == [
        {"stage": "analyze", "event": "corrupt_checkpoint", "checkpoint": final, "files": ["model.safetensors"],
         "used_instead": first}]
    assert (rd.path(final) / "model.safetensors").read_bytes() == damaged  # left as found, for a look

    from typer.testing import CliRunner

    from clmscale.engine.cli import app

    status = CliRunner().invoke(app, ["status", str(rd.root)])
    assert status.exit_code == 0 and f"event=corrupt_checkpoint checkpoint={final}" in status.output


def test_a_moved_run_directory_still_analyses_fits_and_reports(analyzed, tmp_path):
    """Tables name checkpoints relative to the run directory: copy it elsewhere, remove the original's
    checkpoints, drop one analysis table, and the copy redoes those jobs from its own files, then fits
    and reports."""
    from clmscale.fits.fit import fit_run
    from clmscale.fits.report import build_report

    moved = RunDir(tmp_path / "elsewhere" / "an")
    shutil.copytree(analyzed.root, moved.root)
    hidden = analyzed.trials.with_name("trials.hidden")
    analyzed.trials.rename(hidden)  # nothing may still point into the original
    try:
        moved.table_path("hessian").unlink()
        tables = run_analysis(moved)
        assert (tables["hessian"]["status"] == "ok").all() and len(tables["hessian"]) == 3  # pretrain, two task losses
        pd.testing.assert_frame_equal(tables["finetune"], read(analyzed, "finetune"))  # kept, not redone
        fits = fit_run(moved, n_bootstrap=0)
        assert sum(check_claims(fits).values()) > 0  # a real run's verdicts and laws say only what they support
        points = moved.fit_inputs().checkpoints  # the annealed ones (fits.annealed_only), read from the copy
        assert fits["n_checkpoints"] == len(points) >= 1
        assert set(points["checkpoint"]) <= set(read(moved, "pretrain")["checkpoint"])
        page = build_report(moved).read_text()
        assert str(analyzed.root) not in page.replace(str(moved.root), "")
    finally:
        hidden.rename(analyzed.trials)


def test_the_learning_rate_is_chosen_on_validation_and_flagged_runs_never_win():
    from clmscale.engine.analyze import chosen_lr

    search = pd.DataFrame({"lr": [1e-5, 1e-4, 1e-3, 1e-2], "val_value": [0.9, 0.7, 0.6, 0.1],
                           "flag": ["", "", "", "non_finite_loss"], "higher_is_better": False,
                           "status": "ok", "error": ""})
    assert chosen_lr(search, [1e-5, 1e-4, 1e-3, 1e-2]) == 1e-3  # the best unflagged RMSE, not the diverged one
    higher = search.assign(higher_is_better=True, flag="")
    assert chosen_lr(higher, [1e-5, 1e-4, 1e-3, 1e-2]) == 1e-5
    tie = search.assign(val_value=0.5, flag="")
    assert chosen_lr(tie, [1e-5, 1e-4, 1e-3, 1e-2]) == 1e-5  # ties keep the smaller rate
    broken = search.assign(flag="best_epoch_0")
    broken.loc[0, ["status", "error"]] = ["error", "RuntimeError: out of memory"]
    with pytest.raises(ValueError, match="no learning rate of .* usable run .*out of memory"):
        chosen_lr(broken, [1e-5, 1e-4, 1e-3, 1e-2])
