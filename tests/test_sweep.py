"""The sweep on a real local Ray cluster: Tune x Train x DeepSpeed (ZeRO-2, CPU) on tiny models.

One module-scoped sweep (2 rungs x 2 budgets) carries most assertions; a NaN is injected into one
of its trials. Fault tests (a killed train worker, a killed driver + --resume) run their own small
sweeps. Every wait has a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import first_moses

from clmscale.engine.config import expand_grid, load_sweep
from clmscale.engine.rundir import RunDir

N_SMILES = 3000


def write_sweep(tmp: Path, name: str, sizes: list[str], budgets: list[float], seeds=(0,), checkpoints=2,
                **sections) -> Path:
    """A tiny MLM sweep file on the first N_SMILES MOSES molecules; `sections` (downstream=..., ...) are added."""
    corpus = tmp / "corpus.csv"
    if not corpus.exists():
        corpus.write_text("SMILES\n" + "\n".join(first_moses(N_SMILES)) + "\n")
    doc = {
        "name": name,
        "data": {"corpus": [str(corpus)], "val_fraction": 0.1, "shard_rows": 1000},
        "model": {"family": "mlm", "sizes": sizes, "max_seq_len": 64},
        "budget": {"tokens": budgets},
        "seeds": list(seeds),
        "train": {"batch_size": 32, "micro_batch_size": 32, "lr": 3e-3, "zero_stage": 2,
                  "checkpoints": checkpoints, "log_every_steps": 5, "val_batches": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "max_failures": 2},
        "storage": {"root": str(tmp / "runs")},
        **sections,
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def grid(ray_cluster, tmp_path_factory):
    """2 rungs x 2 budgets; trial xs_30ktok_s0 gets a NaN loss at step 5."""
    from clmscale.engine.sweep import INJECT_NAN_TRIAL_ENV, run_sweep

    tmp = tmp_path_factory.mktemp("grid")
    cfg = load_sweep(write_sweep(tmp, "grid", ["xxs", "xs"], [1.5e4, 3e4]))
    os.environ[INJECT_NAN_TRIAL_ENV] = "xs_30ktok_s0:5"
    try:
        table = run_sweep(cfg)
    finally:
        del os.environ[INJECT_NAN_TRIAL_ENV]
    return cfg, RunDir(cfg.run_dir), table


@pytest.mark.timeout(900)
def test_every_trial_lands_in_the_table(grid):
    cfg, rd, table = grid
    assert set(table["trial_id"]) == {t.trial_id for t in expand_grid(cfg)}
    finished = table[table["status"] == "finished"]
    assert set(finished["trial_id"]) == {"xxs_15ktok_s0", "xxs_30ktok_s0", "xs_15ktok_s0"}
    assert (finished.groupby("trial_id").size() == 2).all()  # two milestones each
    assert rd.read_table("pretrain").equals(table)
    for row in finished.to_dict("records"):
        assert row["tokens"] <= row["budget_tokens"] * 1.2 and row["flops"] > 0
        assert not Path(row["checkpoint"]).is_absolute()  # relative to the run directory, which may move
        assert (rd.path(row["checkpoint"]) / "COMPLETE").exists()


@pytest.mark.timeout(900)
def test_parameter_counts_are_exact(grid):
    from transformers import AutoModelForMaskedLM

    from clmscale.engine.models import build_config, count_params
    from clmscale.engine.tokenizer import load_tokenizer

    cfg, rd, table = grid
    vocab = len(load_tokenizer(rd.tokenizer))
    for t in expand_grid(cfg):
        rows = table[table["trial_id"] == t.trial_id]
        counted = count_params(build_config("mlm", t.size, vocab, cfg.model.max_seq_len))
        assert set(rows["n_params"]) == {counted.total}
        assert set(rows["n_params_non_embedding"]) == {counted.non_embedding}
    model = AutoModelForMaskedLM.from_pretrained(rd.path(table["checkpoint"].iloc[0]))
    assert model.num_parameters() == table["n_params"].iloc[0]


@pytest.mark.timeout(900)
def test_training_loss_falls(grid):
    _, rd, _ = grid
    records = rd.trial("xxs_30ktok_s0").metrics()
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.2


@pytest.mark.timeout(900)
def test_checkpoint_reloads_with_the_same_validation_loss(grid):
    from transformers import AutoModelForMaskedLM

    from clmscale.engine import data
    from clmscale.engine.models import model_inputs

    cfg, rd, table = grid
    row = table[table["status"] == "finished"].iloc[-1]
    model = AutoModelForMaskedLM.from_pretrained(rd.path(row["checkpoint"])).eval()
    batches = data.validation_batches(rd.shard_paths("val"), rd.path(row["checkpoint"]), "mlm", cfg.train.val_batches,
                                      cfg.train.micro_batch_size, cfg.model.max_seq_len)  # fmt: skip
    total = n = 0.0
    with torch.no_grad():
        for b in batches:
            k = int((b["labels"] != -100).sum())
            total += float(model(**model_inputs(b, model.config)).loss) * k
            n += k
    assert total / n == pytest.approx(row["val_loss"], rel=1e-4)


@pytest.mark.timeout(900)
def test_nan_marks_one_trial_diverged_and_the_others_finish(grid):
    _, rd, table = grid
    result = rd.trial("xs_30ktok_s0").result()
    assert result.status == "diverged" and result.diverged_at_step == 5
    assert (table[table["trial_id"] == "xs_30ktok_s0"]["status"] == "diverged").all()
    assert (table[table["trial_id"] != "xs_30ktok_s0"]["status"] == "finished").all()


@pytest.mark.timeout(900)
def test_status_command(grid):
    from typer.testing import CliRunner

    from clmscale.engine.cli import app

    _, rd, _ = grid
    out = CliRunner().invoke(app, ["status", str(rd.root)])
    assert out.exit_code == 0, out.output
    assert "Trials: 4 (3 finished, 1 diverged)" in out.output  # the summary line, then one row per trial
    assert out.output.count("finished") == 1 + 3 and out.output.count("diverged") == 1 + 1


@pytest.mark.timeout(900)
def test_a_new_sweep_refuses_a_used_run_dir_and_resume_reruns_nothing(grid):
    from clmscale.engine.sweep import SweepError, run_sweep

    cfg, rd, table = grid
    with pytest.raises(SweepError, match="pass --resume"):
        run_sweep(cfg)
    before = {p: p.stat().st_mtime_ns for p in rd.trials.glob("*/result.json")}
    again = run_sweep(cfg, resume=True)
    assert {p: p.stat().st_mtime_ns for p in rd.trials.glob("*/result.json")} == before
    assert again.equals(table)


@pytest.mark.timeout(900)
def test_resume_refuses_another_sweep(grid, tmp_path):
    from clmscale.engine.sweep import SweepError, run_sweep

    cfg, rd, _ = grid
    other = cfg.model_copy(update={"seeds": [7]})
    with pytest.raises(SweepError, match="holds another sweep"):
        run_sweep(other, resume=True)


@pytest.mark.timeout(600)
def test_unique_data_axis_trains_each_run_on_its_nested_subset(ray_cluster, tmp_path):
    """budget.unique_molecules x budget.epochs: each run's epochs are passes over its own first n molecules."""
    from clmscale.engine.sweep import run_sweep

    budget = {"epochs": [2], "unique_molecules": [200, 600]}
    cfg = load_sweep(write_sweep(tmp_path, "nested", ["xxs"], [1e4], checkpoints=1, budget=budget))
    table = run_sweep(cfg)
    rd = RunDir(cfg.run_dir)
    assert sorted(table["trial_id"]) == ["xxs_u200_2ep_s0", "xxs_u600_2ep_s0"]
    assert (table["status"] == "finished").all()
    for row in table.to_dict("records"):
        one_pass = rd.data.pass_tokens(row["unique_molecules"])
        assert one_pass < rd.data.pass_tokens()
        assert row["budget_tokens"] == 2 * one_pass and row["unique_tokens"] == one_pass
        assert row["epochs"] == pytest.approx(row["tokens"] / one_pass) and row["epochs"] >= 2
    n_train = rd.manifest().counts.train.n_molecules
    with pytest.raises(ValueError, match=f"budget.unique_molecules: 100,000 molecules asked for.*has {n_train:,}"):
        rd.data.pass_tokens(100_000)


@pytest.mark.timeout(600)
def test_impossible_resources_fail_before_anything_starts(ray_cluster, tmp_path):
    from clmscale.engine.admission import Node
    from clmscale.engine.sweep import SweepError, check_fits

    cfg = load_sweep(write_sweep(tmp_path, "big", ["xxs"], [1e4]))
    trials = expand_grid(cfg)
    check_fits(trials, [Node(cpus=2.0)])
    huge = [t.model_copy(update={"resources": t.resources.model_copy(update={"gpus_per_worker": 1.0})}) for t in trials]
    with pytest.raises(SweepError, match=r"xxs_10ktok_s0 needs 0.51 CPUs .* and 1 GPUs, but the cluster has 1 "
                                         r"node\(s\) with 2 CPUs and 0 GPUs"):
        check_fits(huge, [Node(cpus=2.0)])


@pytest.mark.timeout(900)
def test_killed_train_worker_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    """SIGKILL the Ray Train worker after its first checkpoint; FailureConfig restarts it and the
    trial finishes from that checkpoint (not from scratch)."""
    from ray.util.state import list_actors

    from clmscale.engine.sweep import run_sweep

    cfg = load_sweep(write_sweep(tmp_path, "kill", ["xxs"], [8e4], checkpoints=4))
    rd = RunDir(cfg.run_dir)
    trial = rd.trial("xxs_80ktok_s0")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(table=run_sweep(cfg)), daemon=True)
    runner.start()
    first = _wait_for(lambda: sorted(trial.path.glob("checkpoints/*/COMPLETE")), timeout=400)[0]
    marker_time = first.stat().st_mtime_ns
    workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "RayTrainWorker"]
    assert workers, "no Ray Train worker alive to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(timeout=600)
    assert not runner.is_alive(), "the sweep did not finish after the worker was killed"
    table = outcome["table"]
    assert (table["status"] == "finished").all() and len(table) == 4
    resumed = [r for r in trial.metrics() if r.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] > 0  # restarted from a checkpoint, not from step 0
    assert first.stat().st_mtime_ns == marker_time  # the checkpoint it resumed from was kept as it was


@pytest.mark.timeout(900)
def test_killed_driver_then_resume_reruns_no_finished_trial(ray_cluster, tmp_path):
    """`clmscale sweep` in a subprocess, SIGKILLed once one trial has finished; `--resume` completes
    the sweep and leaves the finished trial's files untouched."""
    import ray

    from clmscale.engine.sweep import run_sweep

    path = write_sweep(tmp_path, "driver", ["xxs"], [1.5e4], seeds=(0, 1))
    cfg = load_sweep(path)
    rd = RunDir(cfg.run_dir)
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "clmscale.engine.cli", "sweep", str(path), "--address", address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    try:
        done = _wait_for(lambda: list(rd.trials.glob("*/result.json")), timeout=400)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    kept = {p: (p.stat().st_mtime_ns, (p.parent / "metrics.jsonl").read_text()) for p in done}
    table = run_sweep(cfg, resume=True)
    assert set(table["trial_id"]) == {"xxs_15ktok_s0", "xxs_15ktok_s1"} and (table["status"] == "finished").all()
    for p, (mtime, metrics) in kept.items():
        assert p.stat().st_mtime_ns == mtime
        assert (p.parent / "metrics.jsonl").read_text() == metrics


def _wait_for(probe, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"nothing after {timeout} s")
