"""`clmscale status`: trials, analysis progress and faults of a run directory written through RunDir's writers."""

from __future__ import annotations

import json
import os
import socket

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from clmscale.engine.cli import app
from clmscale.engine.config import load_sweep
from clmscale.engine.rundir import TABLES, RunDir, TrainResult

CHECKPOINT = "trials/xxs_10ktok_s0/checkpoints/000000010000"


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A sweep of 2 rungs x 2 budgets caught mid-way: one trial finished (its checkpoint in pretrain.parquet),
    one diverged, one with log records and a restart, one not started; one analysis job done, one failed."""
    corpus = tmp_path / "corpus.smi"
    corpus.write_text("CCO\n")
    doc = {"name": "mid", "data": {"corpus": [str(corpus)]}, "model": {"family": "mlm", "sizes": ["xxs", "xs"]},
           "budget": {"tokens": [1e4, 2e4]}, "storage": {"root": str(tmp_path / "runs")},
           "downstream": {"tasks": ["esol"], "seeds": [0], "modes": ["probe"], "baselines": []},
           "analysis": {"hessian_top_k": 0, "landscape_resolution": 0}}
    (tmp_path / "mid.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_sweep(tmp_path / "mid.yaml")
    rd = RunDir(cfg.run_dir)
    rd.write_config(cfg)
    scale = {"n_params": 5000, "n_params_non_embedding": 3000, "flops": 3e8}
    rd.trial("xxs_10ktok_s0").write_result(TrainResult(
        trial_id="xxs_10ktok_s0", status="finished", n_steps=20, n_tokens=10_240, budget_tokens=10_000,
        train_loss=1.25, val_loss=1.3, wall_s=8.0, **scale))
    rd.trial("xs_10ktok_s0").write_result(TrainResult(
        trial_id="xs_10ktok_s0", status="diverged", n_steps=5, n_tokens=2_000, budget_tokens=10_000,
        train_loss=float("nan"), val_loss=float("nan"), wall_s=2.0, **scale))
    running = rd.trial("xxs_20ktok_s0")
    running.append_metrics({"trial_id": "xxs_20ktok_s0", "step": 5, "n_tokens": 4_000, "budget_tokens": 20_000,
                            "train_loss": 2.5, "tokens_per_s": 800.0})
    running.append_metrics({"trial_id": "xxs_20ktok_s0", "event": "resumed", "step": 5, "n_tokens": 4_000})
    running.append_metrics({"trial_id": "xxs_20ktok_s0", "step": 10, "n_tokens": 8_000, "budget_tokens": 20_000,
                            "train_loss": 2.0, "tokens_per_s": 1_000.0})
    rd.write_table("pretrain", pd.DataFrame([{
        "checkpoint": CHECKPOINT, "trial_id": "xxs_10ktok_s0", "family": "mlm", "rung": "xxs", "seed": 0,
        "tokens": 10_240, "val_loss": 1.3, "annealed": True, "status": "finished", **scale}]))
    identity = {"trial_id": "", "checkpoint": "", "rung": "", "seed": 0, "n_params": 0, "n_params_non_embedding": 0,
                "tokens": 0, "flops": 0.0}
    rd.write_table("splits", pd.DataFrame([{"task": "esol", "split": "scaffold", "split_seed": 0, "status": "ok",
                                             "error": "", "node_id": "n"}]))
    rd.write_table("tasks", pd.DataFrame([{"task": "esol", "status": "error", "error": "boom", "node_id": "n"}]))
    assert set(TABLES["finetune"].key) <= set(identity) | {"task", "split_seed", "finetune_seed", "mode"}
    return rd


def test_status_reads_like_ray_status(run):
    out = CliRunner().invoke(app, ["status", str(run.root)])
    assert out.exit_code == 0, out.output
    text = out.output
    assert text.startswith(f"======== {run.root} ========\ndriver: none\n")
    assert "Trials: 4 (1 finished, 1 diverged, 1 stopped, 1 pending)" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(" x")}
    assert rows["xxs_10ktok_s0"] == ["xxs_10ktok_s0", "finished", "10.2k/10k", "1.2500", "1,280", "0s", "0"]
    assert rows["xxs_20ktok_s0"] == ["xxs_20ktok_s0", "stopped", "8k/20k", "2.0000", "1,000", "-", "1"]
    assert rows["xs_20ktok_s0"] == ["xs_20ktok_s0", "pending", "0/20k", "-", "-", "-", "0"]
    assert rows["xs_10ktok_s0"] == ["xs_10ktok_s0", "diverged", "2k/10k", "-", "1,000", "-", "0"]
    assert "\n trial          state        tokens    loss  tokens/s  ETA  restarts\n" in text  # the header
    # the plan: per task a split and its characteristics, per counted checkpoint one probe
    assert "Analysis: 1/3 jobs done, 1 failed, 1 to run" in text
    section = text.split("Analysis:", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # after its header
    analysis = {line.split()[0]: line.split()[1:] for line in section}
    assert analysis["finetune"] == ["0", "0", "1", "1"] and analysis["splits"] == ["1", "0", "0", "1"]
    assert analysis["tasks"] == ["0", "1", "0", "1"]
    assert "Faults: 1\n stage=sweep trial_id=xxs_20ktok_s0 event=resumed step=5 n_tokens=4000" in text


def test_status_json_while_a_driver_holds_the_run(run):
    with run.lock("clmscale sweep mid.yaml"):
        out = CliRunner().invoke(app, ["status", str(run.root), "--json"])
    assert out.exit_code == 0, out.output
    found = json.loads(out.output)
    assert found["driver"]["command"] == "clmscale sweep mid.yaml" and found["driver"]["alive"] is True
    assert (found["driver"]["pid"], found["driver"]["host"]) == (os.getpid(), socket.gethostname())
    trials = {t["trial_id"]: t for t in found["trials"]}
    running = trials["xxs_20ktok_s0"]
    assert running["state"] == "running" and running["eta_s"] == pytest.approx(12.0)  # 12k tokens at 1000/s
    assert (running["tokens"], running["budget_tokens"], running["restarts"]) == (8_000, 20_000, 1)
    assert trials["xs_10ktok_s0"]["loss"] is None  # NaN is null in JSON
    assert {r["table"]: (r["done"], r["failed"], r["to_run"]) for r in found["analysis"]} == {
        "finetune": (0, 0, 1), "splits": (1, 0, 0), "tasks": (0, 1, 0)}
    assert [f["event"] for f in found["faults"]] == ["resumed"]


def test_status_of_a_folder_that_is_no_run_directory(tmp_path):
    out = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert out.exit_code == 2 and out.output == f"error: {tmp_path}: not a run directory (no sweep.yaml)\n"
