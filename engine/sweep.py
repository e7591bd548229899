"""The pretraining grid on Ray: one Tune trial per (rung, budget, seed), each a Ray Train run.

The story, in the order it runs:
1. `run_sweep` checks the run directory (a `--resume` must find the same sweep there), writes the
   resolved `sweep.yaml`, runs `prepare` if the shards are missing, and turns epoch budgets into
   token budgets with the manifest's token counts.
2. Ray Tune gets one grid point per trial. `run_trial`, a Tune function trainable, builds a
   `TorchTrainer` (Train V2: the trainer is launched inside the trial and reports to Tune through
   `TuneReportCallback`) with the trial's `ScalingConfig` and a Ray Data stream of the shards.
3. `train_loop_per_worker` unpacks its config and calls `engine.train.train`, the same function
   that runs standalone without Ray. Checkpoints land in `trials/<trial>/checkpoints/`.
4. When Tune is done, `collect_pretrain_table` reads every trial's `result.json` and writes
   `results/pretrain.parquet`, one row per checkpoint.

Resources are computed from the cluster before anything starts: a trial that cannot fit the
cluster is an error, not a hang, and Ray Data always keeps a CPU for itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune

from engine.config import SweepConfig, Trial, expand_grid
from engine.rundir import RunDir, write_json_atomic

log = logging.getLogger("clmscale")

INJECT_NAN_TRIAL_ENV = "CLMSCALE_INJECT_NAN_TRIAL"  # tests only: "<trial_id>:<step>" makes that trial's loss NaN
TRIAL_CPU = 0.01  # the Tune function only waits on its trainer; Train V2's controller takes 0 CPUs
DATA_CPUS = 1.0  # one whole CPU kept free: Ray Data's read and map tasks each ask for 1 (they hang without it)


class SweepError(ValueError):
    """A sweep that cannot start: wrong run directory, a trial that does not fit the cluster, ..."""


# ---------------------------------------------------------------------------------------------
# 1. the run directory and the budgets


def check_run_dir(cfg: SweepConfig, run_dir: RunDir, resume: bool) -> None:
    """A fresh sweep needs a fresh (or prepare-only) directory; --resume needs the same sweep."""
    if run_dir.sweep_yaml.exists():
        previous = yaml.safe_load(run_dir.sweep_yaml.read_text())
        ours = cfg.model_dump(mode="json")
        if previous.get("name") != ours["name"] or previous.get("model") != ours["model"] or previous.get(
            "budget"
        ) != ours["budget"] or previous.get("seeds") != ours["seeds"]:
            raise SweepError(
                f"{run_dir.root} holds another sweep ({run_dir.sweep_yaml} differs in name, model, budget or "
                f"seeds); use a new name or storage.root, or the sweep file that made it"
            )
        if not resume and run_dir.tune.exists():
            raise SweepError(f"{run_dir.root} already has a sweep; pass --resume to continue it")
    elif resume:
        raise SweepError(f"nothing to resume in {run_dir.root}: no sweep.yaml there")


def write_sweep_yaml(cfg: SweepConfig, run_dir: RunDir) -> None:
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.sweep_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def token_budget(trial: Trial, manifest: dict) -> int:
    """Tokens the trial trains on: given, or epochs x the train split's tokens incl. 2 specials each."""
    if trial.budget_tokens is not None:
        return trial.budget_tokens
    split = manifest["counts"]["train"]
    return int(trial.budget_epochs * (split["n_tokens"] + 2 * split["n_molecules"]))


# ---------------------------------------------------------------------------------------------
# 2. resources: what fits, how many at once


def plan_concurrency(trials: list[Trial], cluster: dict[str, float], requested: int | None) -> int:
    """How many trials may run at once; raises if one trial alone cannot fit the cluster."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    fits = []
    for t in trials:
        r = t.resources
        need_cpu, need_gpu = r.workers * r.cpus_per_worker + TRIAL_CPU, r.workers * r.gpus_per_worker
        if need_cpu + DATA_CPUS > cpus + 1e-9 or need_gpu > gpus + 1e-9:
            raise SweepError(
                f"trial {t.trial_id} needs {need_cpu:g} CPUs (+{DATA_CPUS:g} for Ray Data) and {need_gpu:g} GPUs, "
                f"but the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower resources.workers, "
                f"cpus_per_worker or gpus_per_worker"
            )
        by_cpu = math.floor((cpus - DATA_CPUS) / need_cpu)
        by_gpu = math.floor(gpus / need_gpu + 1e-9) if need_gpu else by_cpu
        fits.append(max(1, min(by_cpu, by_gpu)))
    concurrency = min(fits) if fits else 1
    return min(concurrency, requested) if requested else concurrency


# ---------------------------------------------------------------------------------------------
# 3. one trial: a Tune function that launches a TorchTrainer


def run_trial(config: dict) -> None:
    """Tune function trainable. Everything arrives in `config`; nothing comes from module globals."""
    from ray.train import FailureConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from engine import data

    config = config["cfg"]  # the grid point: see `run_sweep`
    trial = Trial.model_validate(config["trial"])
    run_dir = RunDir(Path(config["run_dir"]))
    done = _finished_result(run_dir.trial(trial.trial_id))
    if done:  # finished before a driver died, but after Tune last saved its state: not rerun
        log.info(f"[{trial.trial_id}] already {done['status']} ({done['n_tokens']} tokens); not rerun")
        return
    write_json_atomic(run_dir.trial(trial.trial_id) / "trial.json", config)  # all it takes to rerun this trial
    r = trial.resources
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    train_ds = data.train_dataset(
        shard_paths=config["train_shards"],
        tokenizer=run_dir.tokenizer,
        family=trial.family,
        micro_batch_size=trial.train.micro_batch_size,
        max_seq_len=config["max_seq_len"],
        mlm_probability=trial.train.mlm_probability,
        packing=trial.train.packing,
        seed=trial.seed if trial.train.seed_data else 0,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": train_ds},
        run_config=TrainRunConfig(
            name=trial.trial_id,
            storage_path=str(run_dir.tune / "train"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": config["worker_env"]},
        ),
    )
    try:
        trainer.fit()
    finally:
        _remove_leftover_placement_group(run_dir.trial(trial.trial_id))


def _finished_result(trial_dir: Path) -> dict | None:
    """The trial's result.json when it records a finished or diverged run: the folder is the truth."""
    path = trial_dir / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result["status"] in ("finished", "diverged") else None


PG_FILE = ".placement_group"  # the trial's Ray Train placement group id, written by its rank 0
NODES_FILE = "nodes.txt"  # the Ray node id of the trial's rank 0, one line per (re)start: where it ran


def _remove_leftover_placement_group(trial_dir: Path) -> None:
    """Remove the trial's worker placement group if Ray Train left it behind.

    Seen with ray 2.60 on a 2-CPU cluster: now and then a finished trial's worker placement group
    stays CREATED (its cleaner actor polls the State API and never acts), and the next trial's Ray
    Data tasks, which need one whole free CPU, wait forever. The id comes from the trial's own
    workers, so a concurrent trial's group is never touched.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = trial_dir / PG_FILE
    if not path.exists():
        return
    pg_id = path.read_text().strip()
    if ray.util.placement_group_table().get(pg_id, {}).get("state") == "CREATED":
        log.warning(f"[{trial_dir.name}] removing the placement group {pg_id[:8]} Ray Train left behind")
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    path.unlink()


def _fault_injection(trial_id: str) -> dict[str, str]:
    """The worker env var of engine.train's NaN injection, for the one trial the test names.

    Read on the driver: Ray's worker processes inherit the environment of the cluster, not the driver's.
    """
    from engine.train import INJECT_NAN_ENV

    target, _, step = os.environ.get(INJECT_NAN_TRIAL_ENV, "").partition(":")
    return {INJECT_NAN_ENV: step} if target == trial_id else {}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point, on every worker: unpack the config, stream the shard, train.

    Rank 0 also records its placement group (see `_remove_leftover_placement_group`) and appends its
    Ray node id to the trial's `nodes.txt`, so a restart after a node failure shows where it went.
    """
    from ray.train.torch import get_device

    from engine import data
    from engine.models import build_config
    from engine.tokenizer import load_tokenizer
    from engine.train import train

    trial = Trial.model_validate(config["trial"])
    run_dir = RunDir(Path(config["run_dir"]))
    if ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            (run_dir.trial(trial.trial_id) / PG_FILE).write_text(pg.id.hex())
        with open(run_dir.trial(trial.trial_id) / NODES_FILE, "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    shard = ray.train.get_dataset_shard("train")
    val = data.validation_batches(
        config["val_shards"],
        tokenizer,
        family=trial.family,
        n_batches=trial.train.val_batches,
        micro_batch_size=trial.train.micro_batch_size,
        max_seq_len=config["max_seq_len"],
        mlm_probability=trial.train.mlm_probability,
        packing=trial.train.packing,
    )
    model_config = build_config(
        trial.family, trial.size, len(tokenizer), config["max_seq_len"], dropout=config["dropout"]
    )
    train(
        trial,
        run_dir.trial(trial.trial_id),
        make_batches=lambda epoch: data.worker_batches(shard, epoch),
        val_batches=val,
        model_config=model_config,
        budget_tokens=config["budget_tokens"],
        tokenizer_dir=run_dir.tokenizer,
        report=DashboardReporter(trial.trial_id, config["budget_tokens"]),
        device=get_device(),
    )


class DashboardReporter:
    """Forward metrics to Ray Train (which relays them to Tune) and to the Ray dashboard.

    `ray.train.report` is a barrier: every worker calls it, at the same steps. Gauges are set on
    rank 0 only, tagged by trial, so the dashboard's Metrics view shows one line per trial.
    """

    def __init__(self, trial_id: str, budget_tokens: int):
        self.trial_id, self.budget_tokens = trial_id, budget_tokens
        self._gauges: dict[str, Any] | None = None

    def __call__(self, metrics: dict) -> None:
        # "done" is Tune's own key: a result carrying done=True makes Tune stop the trial's actor at
        # once, before the trainer has shut down and freed its placement group
        metrics = {("finished_run" if k == "done" else k): v for k, v in metrics.items()}
        metrics |= {"trial_id": self.trial_id, "budget_tokens": self.budget_tokens}
        if ray.train.get_context().get_world_rank() == 0:
            self._set_gauges(metrics)
        ray.train.report(metrics)

    def _set_gauges(self, metrics: dict) -> None:
        from ray.util.metrics import Gauge

        if self._gauges is None:
            tags = ("trial",)
            self._gauges = {
                "tokens_per_s": Gauge("clmscale_tokens_per_s", "training tokens per second", tag_keys=tags),
                "train_loss": Gauge("clmscale_train_loss", "training loss (nats/token)", tag_keys=tags),
                "mfu": Gauge("clmscale_mfu", "model FLOPs utilisation", tag_keys=tags),
                "n_tokens": Gauge("clmscale_tokens", "training tokens seen", tag_keys=tags),
            }
        for key, gauge in self._gauges.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags={"trial": self.trial_id})


# ---------------------------------------------------------------------------------------------
# progress in the terminal


class ProgressLine(tune.Callback):
    """One line per trial result: tokens done, loss, throughput, ETA."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "tokens_per_s" not in result:  # the closing report carries the outcome, not progress
            return
        trial_id = _trial_name(trial)  # Tune overwrites result["trial_id"] with its own id
        now = time.monotonic()
        if now - self._last.get(trial_id, 0.0) < self.every_s:
            return
        self._last[trial_id] = now
        log.info(progress_text(trial_id, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.info(f"[{_trial_name(trial)}] done")

    def on_trial_error(self, iteration, trials, trial, **info):
        log.error(f"[{_trial_name(trial)}] failed: see {trial.local_path}")


def _trial_name(trial) -> str:
    return trial.config["cfg"]["trial"]["trial_id"]


def progress_text(trial_id: str, m: dict) -> str:
    tokens, budget, speed = m.get("n_tokens", 0), m.get("budget_tokens") or 0, m.get("tokens_per_s") or 0.0
    eta = (budget - tokens) / speed if speed > 0 and budget else float("nan")
    frac = 100 * tokens / budget if budget else float("nan")
    return (
        f"[{trial_id}] {frac:5.1f}% {tokens:.3g}/{budget:.3g} tokens  loss {m.get('train_loss', float('nan')):.4f}  "
        f"{speed:,.0f} tok/s  ETA {eta:,.0f}s"
    )


# ---------------------------------------------------------------------------------------------
# the sweep


def run_sweep(cfg: SweepConfig, *, resume: bool = False) -> pd.DataFrame:
    """Prepare if needed, run every trial on the Ray cluster found (or a local one), collect results."""
    from engine.prepare import prepare

    run_dir = RunDir(cfg.run_dir.resolve())
    check_run_dir(cfg, run_dir, resume)
    trials = expand_grid(cfg)
    if not ray.is_initialized():
        ray.init()
    concurrency = plan_concurrency(trials, ray.cluster_resources(), cfg.resources.max_concurrent_trials)  # before any write
    write_sweep_yaml(cfg, run_dir)
    prepare(cfg.data, run_dir.data)
    manifest = json.loads(run_dir.manifest.read_text())
    shards = {split: [str(run_dir.data / s["path"]) for s in manifest["shards"] if s["split"] == split] for split in ("train", "val")}
    log.info(f"sweep {cfg.name}: {len(trials)} trials, up to {concurrency} at once, in {run_dir.root}")

    common = {
        "run_dir": str(run_dir.root),
        "train_shards": shards["train"],
        "val_shards": shards["val"],
        "max_seq_len": cfg.model.max_seq_len,
        "dropout": cfg.model.dropout,
    }
    configs = [
        {**common, "trial": t.model_dump(mode="json"), "budget_tokens": token_budget(t, manifest),
         "worker_env": _fault_injection(t.trial_id)}
        for t in trials
    ]
    trainable = tune.with_resources(run_trial, {"cpu": TRIAL_CPU})
    tuner_path = run_dir.tune / "pretrain"
    if resume and tune.Tuner.can_restore(str(tuner_path)):
        tuner = tune.Tuner.restore(
            str(tuner_path), trainable=trainable, param_space={"cfg": tune.grid_search(configs)}, restart_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"cfg": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name
            ),
            run_config=tune.RunConfig(
                name="pretrain",
                storage_path=str(run_dir.tune),
                callbacks=[ProgressLine()],
                verbose=0,
                # a trial whose Tune actor dies with its node is started again: it resumes from its folder
                failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
            ),
        )
    tuner.fit()
    table = collect_pretrain_table(run_dir, trials)
    log.info(f"wrote {run_dir.table('pretrain')} ({len(table)} checkpoints)")
    return table


# ---------------------------------------------------------------------------------------------
# 4. results


PRETRAIN_COLUMNS = [
    "checkpoint", "trial_id", "family", "rung", "seed", "n_params", "n_params_non_embedding", "budget_tokens",
    "tokens", "flops", "step", "train_loss", "val_loss", "wall_time_s", "tokens_per_s", "mfu", "status",
]  # fmt: skip


def collect_pretrain_table(run_dir: RunDir, trials: list[Trial]) -> pd.DataFrame:
    """One row per checkpoint of every trial that wrote a result.json; the others are not rows."""
    rows = []
    for t in trials:
        folder = run_dir.trial(t.trial_id)
        if not (folder / "result.json").exists():
            continue
        result = json.loads((folder / "result.json").read_text())
        # a trial that diverged before its first milestone still gets a row, without a checkpoint
        no_checkpoint = {"path": None, "n_tokens": result["n_tokens"], "flops": result["flops"], "step": result["n_steps"],
                         "train_loss": None, "val_loss": None, "wall_s": result["wall_s"], "tokens_per_s": None, "mfu": None}
        for ck in result["checkpoints"] or [no_checkpoint]:
            rows.append(
                {
                    "checkpoint": str(folder / ck["path"]) if ck["path"] else None,
                    "trial_id": t.trial_id,
                    "family": t.family,
                    "rung": t.size.name,
                    "seed": t.seed,
                    "n_params": result["n_params"],
                    "n_params_non_embedding": result["n_params_non_embedding"],
                    "budget_tokens": result["budget_tokens"],
                    "tokens": ck["n_tokens"],
                    "flops": ck["flops"],
                    "step": ck["step"],
                    "train_loss": _nan(ck["train_loss"]),
                    "val_loss": _nan(ck["val_loss"]),
                    "wall_time_s": ck["wall_s"],
                    "tokens_per_s": _nan(ck["tokens_per_s"]),
                    "mfu": _nan(ck["mfu"]),
                    "status": result["status"],
                }
            )
    table = pd.DataFrame(rows, columns=PRETRAIN_COLUMNS)
    run_dir.results.mkdir(parents=True, exist_ok=True)
    table.to_parquet(run_dir.table("pretrain"), index=False)
    return table


def _nan(value: float | None) -> float:
    """The JSON files hold null where the number is NaN (e.g. MFU on a CPU)."""
    return float("nan") if value is None else value


def trial_status(run_dir: RunDir, trials: list[Trial]) -> pd.DataFrame:
    """State of every trial from its folder: pending, running (or interrupted), finished, diverged."""
    rows = []
    for t in trials:
        folder = run_dir.trial(t.trial_id)
        result = folder / "result.json"
        metrics = _last_metrics(folder / "metrics.jsonl")
        if result.exists():
            r = json.loads(result.read_text())
            state, tokens, loss, eta = r["status"], r["n_tokens"], r["train_loss"], 0.0
        elif metrics:
            speed = metrics.get("tokens_per_s") or 0.0
            budget = metrics.get("budget_tokens") or t.budget_tokens or 0
            state, tokens, loss = "running", metrics.get("n_tokens", 0), metrics.get("train_loss")
            eta = (budget - tokens) / speed if speed > 0 and budget else float("nan")
        else:
            state, tokens, loss, eta = "pending", 0, None, float("nan")
        rows.append({"trial_id": t.trial_id, "state": state, "tokens": tokens, "last_loss": loss, "eta_s": eta})
    return pd.DataFrame(rows)


def _last_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}
