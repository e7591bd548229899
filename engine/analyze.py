"""Per-checkpoint analysis: every measurement a Ray task, every result a row that is kept.

`run_analysis(run_dir)` reads `results/pretrain.parquet`, picks the checkpoints the sweep file asks
for (`analysis.checkpoints`: the final one of each finished trial, or all), and plans one job per
- (checkpoint, task, split seed, mode): fine-tuning and linear probes (`engine.finetune`),
- (rung, task, split seed): the same architecture from random init, and (task, split seed): Morgan
  fingerprints — the baselines that say whether pretraining helps at all,
- checkpoint: the Hessian spectrum of the pretraining loss on fixed validation batches
  (`engine.hessian`), the loss surface and sharpness around the weights (`engine.landscape`),
- (checkpoint, task): the pretrained -> fine-tuned line and the fine-tuned endpoints for PCA.
Jobs run as Ray tasks with explicit resources. Each finished job's rows are appended to its table
under `results/` as soon as it returns, so an interrupted analysis loses nothing and a rerun skips
every job whose key is already there. A job that fails (an unknown task, a checkpoint without
weights, a split with no labels) becomes an `error` row with the message; the others go on.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import yaml

from engine.config import AnalysisConfig, DownstreamConfig, SweepConfig
from engine.rundir import RunDir

log = logging.getLogger("clmscale")

IDENTITY = ["checkpoint", "trial_id", "rung", "seed", "n_params", "n_params_non_embedding", "tokens", "flops"]
JOB_TIMEOUT_S = 6 * 3600  # one job; a hung worker is reported, not waited on forever


# ---------------------------------------------------------------------------------------------
# what to measure


@dataclass(frozen=True)
class Job:
    table: str  # results/<table>.parquet receives its rows
    key: tuple  # unique within the table: a rerun skips jobs whose key is present
    fn: Callable[..., list[dict]]
    kwargs: dict = field(hash=False)
    identity: dict = field(hash=False)  # columns every row of this job carries
    after: tuple = ()  # keys (table, key) that must be done first
    workers: int = 1  # >1: the job only waits on a Ray Train worker group of that size (see distributed_spectrum)


def select_checkpoints(pretrain: pd.DataFrame, which: str) -> pd.DataFrame:
    """Finished checkpoints: the last of each trial (`final`) or every one (`all`)."""
    usable = pretrain[pretrain["checkpoint"].notna() & (pretrain["checkpoint"] != "")]
    usable = usable[usable["status"] == "finished"] if which == "final" else usable
    if which == "final":
        usable = usable.sort_values("tokens").groupby("trial_id", sort=False).tail(1)
    return usable.sort_values(["n_params", "tokens"]).reset_index(drop=True)


def sound_checkpoints(rd: RunDir, pretrain: pd.DataFrame, selected: pd.DataFrame,
                      corrupt: Callable[[str], list[str]]) -> pd.DataFrame:
    """`selected`, with each checkpoint whose weights fail their sha256 check (`corrupt(path)`, the
    files that fail) replaced by the latest sound checkpoint of the same trial before it, and the
    event recorded. With none before it, the checkpoint stays, so its jobs fail with the loader's
    message as error rows."""
    keep, chosen = [], set(selected["checkpoint"])
    for ck in selected.to_dict("records"):
        bad = corrupt(ck["checkpoint"])
        if not bad:
            keep.append(ck)
            continue
        earlier = pretrain[(pretrain["trial_id"] == ck["trial_id"]) & (pretrain["tokens"] < ck["tokens"])
                           & pretrain["checkpoint"].notna()].sort_values("tokens", ascending=False)
        used = next((r for r in earlier.to_dict("records") if not corrupt(r["checkpoint"])), None)
        log.warning(f"[analyze] {ck['checkpoint']}: {', '.join(bad)} fail the sha256 check; "
                    + (f"using {used['checkpoint']} instead" if used else "and no sound checkpoint comes before it"))
        rd.record_event({"stage": "analyze", "event": "corrupt_checkpoint", "checkpoint": ck["checkpoint"],
                         "files": bad, "used_instead": used["checkpoint"] if used else None})
        if used is None:
            keep.append(ck)
        elif used["checkpoint"] not in chosen:
            keep.append(used)
            chosen.add(used["checkpoint"])
    return pd.DataFrame(keep, columns=selected.columns).sort_values(["n_params", "tokens"]).reset_index(drop=True)


def plan_jobs(cfg: SweepConfig, run_dir: RunDir, checkpoints: pd.DataFrame, data_dir: Path | None) -> list[Job]:
    ds, an = cfg.downstream, cfg.analysis
    tasks = list(ds.tasks)  # custom tasks run when listed here by name, like registry tasks
    jobs: list[Job] = []
    common = {"downstream": ds.model_dump(mode="json"), "data_dir": str(data_dir) if data_dir else None}
    analysis = an.model_dump(mode="json")
    manifest = json.loads(run_dir.manifest.read_text())
    val_shards = [str(run_dir.data / s["path"]) for s in manifest["shards"] if s["split"] == "val"]
    for ck in checkpoints.to_dict("records"):
        ident = {k: ck[k] for k in IDENTITY} | {"pretrain_val_loss": ck["val_loss"]}
        pretrain = _pretrain_problem(cfg, val_shards, ck)
        for task in tasks:
            for split_seed in ds.seeds:
                for mode in ds.modes:
                    save = mode == "finetune" and split_seed == ds.seeds[0]
                    jobs.append(
                        Job(
                            "finetune",
                            (ck["checkpoint"], task, split_seed, mode),
                            finetune_job,
                            {**common, "checkpoint": ck["checkpoint"], "task": task, "split_seed": split_seed,
                             "mode": mode, "save_to": str(_ft_weights(run_dir, ck, task)) if save else None},
                            ident,
                        )
                    )
        if an.hessian_top_k > 0:
            hessian = {"analysis": analysis, "run_dir": str(run_dir.root)}
            jobs.append(Job("hessian", (ck["checkpoint"], "pretrain"), hessian_job,
                            {**hessian, "loss": "pretrain", "problem": pretrain},
                            ident, workers=an.hessian_workers))
            for task in tasks if an.hessian_finetune and "finetune" in ds.modes else []:
                problem = {**common, "checkpoint": ck["checkpoint"], "task": task, "split_seed": ds.seeds[0],
                           "finetuned": str(_ft_weights(run_dir, ck, task)), "n_batches": an.hessian_batches}
                after = (("finetune", (ck["checkpoint"], task, ds.seeds[0], "finetune")),)
                jobs.append(Job("hessian", (ck["checkpoint"], f"finetune:{task}"), hessian_job,
                                {**hessian, "loss": f"finetune:{task}", "problem": problem},
                                ident, after, workers=an.hessian_workers))
        if an.landscape_resolution > 0:
            jobs.append(Job("landscape", (ck["checkpoint"], "random_directions"), landscape_job,
                            {**pretrain, "analysis": analysis}, ident))
            for task in tasks if "finetune" in ds.modes else []:
                after = (("finetune", (ck["checkpoint"], task, ds.seeds[0], "finetune")),)
                kw = {**pretrain, "analysis": analysis, "task": task, "finetuned": str(_ft_weights(run_dir, ck, task))}
                jobs.append(Job("landscape", (ck["checkpoint"], f"pt_to_ft:{task}"), pt_to_ft_job, kw, ident, after))
    if ds.baselines:
        per_rung = checkpoints.sort_values("tokens").groupby("rung", sort=False).tail(1)
        for ck in per_rung.to_dict("records"):
            ident = {k: ck[k] for k in IDENTITY} | {"tokens": 0, "flops": 0.0, "pretrain_val_loss": np.nan}
            for task in tasks:
                for split_seed in ds.seeds:
                    kw = {**common, "checkpoint": ck["checkpoint"], "task": task, "split_seed": split_seed,
                          "mode": "random_init", "save_to": None}
                    jobs.append(Job("finetune", (ck["checkpoint"], task, split_seed, "random_init"),
                                    finetune_job, kw, ident))
        no_scale = {k: np.nan for k in IDENTITY} | {"checkpoint": "", "trial_id": "", "rung": "", "pretrain_val_loss": np.nan}
        for task in tasks:
            for split_seed in ds.seeds:
                kw = {**common, "task": task, "split_seed": split_seed}
                jobs.append(Job("finetune", ("", task, split_seed, "morgan_fp"), fingerprint_job, kw, no_scale))
    return jobs


def _ft_weights(run_dir: RunDir, ck: dict, task: str) -> Path:
    return run_dir.root / "analysis" / "finetuned" / ck["trial_id"] / str(int(ck["tokens"])) / f"{task}.safetensors"


def _pretrain_problem(cfg: SweepConfig, val_shards: list[str], ck: dict) -> dict:
    """The arguments of `_load_for_analysis` but the batch count: the checkpoint and its validation batches."""
    return {
        "checkpoint": ck["checkpoint"],
        "val_shards": val_shards,
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_seq_len": cfg.model.max_seq_len,
        "mlm_probability": cfg.train.mlm_probability,
    }


# ---------------------------------------------------------------------------------------------
# the jobs: plain functions returning rows (they run in Ray tasks, or directly in tests)


def finetune_job(checkpoint: str, task: str, split_seed: int, mode: str, downstream: dict,
                 data_dir: str | None, save_to: str | None) -> list[dict]:
    from engine import finetune, tasks

    ds = DownstreamConfig.model_validate(downstream)
    data = _task_split(tasks, ds, task, split_seed, data_dir)
    result = finetune.finetune(
        Path(checkpoint), data, mode="finetune" if mode == "random_init" else mode, epochs=ds.epochs,
        patience=ds.patience, lr=ds.lr, batch_size=ds.batch_size, seed=split_seed,
        random_init=mode == "random_init", save_to=Path(save_to) if save_to else None,
    )
    return [_finetune_row(task, ds, split_seed, mode, result, data)]


def fingerprint_job(task: str, split_seed: int, downstream: dict, data_dir: str | None) -> list[dict]:
    from engine import finetune, tasks

    ds = DownstreamConfig.model_validate(downstream)
    data = _task_split(tasks, ds, task, split_seed, data_dir)
    return [_finetune_row(task, ds, split_seed, "morgan_fp", finetune.fingerprint_baseline(data, seed=split_seed), data)]


def _task_split(tasks, ds: DownstreamConfig, task: str, split_seed: int, data_dir: str | None):
    from engine.finetune import FinetuneData

    spec = next((c for c in ds.custom if c.name == task), task)
    loaded = tasks.load_task(spec, data_dir=data_dir or ds.data_dir, max_molecules=ds.max_molecules)
    split = tasks.split_task(loaded, ds.split, ds.split_fractions, seed=split_seed)
    return FinetuneData(
        smiles=list(loaded.smiles), labels=loaded.labels, task_type=loaded.task_type,
        n_classes=loaded.n_classes, split=split, name=loaded.name,
    )


def _finetune_row(task: str, ds: DownstreamConfig, split_seed: int, mode: str, result: dict, data) -> dict:
    return {
        "task": task,
        "split": ds.split,
        "split_seed": split_seed,
        "mode": mode,
        "metric": result["metric"],
        "higher_is_better": result["metric"] == "roc_auc",
        "value": result["test"],
        "val_value": result["val"],
        "best_epoch": result["best_epoch"],
        "wall_time_s": result["wall_s"],
        "status": "ok",
        "error": "",
    }


def _load_for_analysis(checkpoint: str, val_shards: list[str], micro_batch_size: int, max_seq_len: int,
                       mlm_probability: float, n_batches: int, device: str = "cpu"):
    """The pretrained model (eager attention, eval mode) and fixed validation batches, on `device`."""
    from engine import data, models

    model = models.load_pretrained(checkpoint)
    models.use_eager_attention(model)
    model.eval().to(device)
    batches = data.validation_batches(
        val_shards, tokenizer=Path(checkpoint), family=models.family_of(model.config), n_batches=n_batches,
        micro_batch_size=micro_batch_size, max_seq_len=max_seq_len, mlm_probability=mlm_probability,
    )
    return model, [{k: v.to(device) for k, v in b.items()} for b in batches]


def pretraining_loss(model, batch) -> Any:
    from engine.models import model_inputs

    return model(**model_inputs(batch, model.config)).loss


def hessian_problem(loss: str, problem: dict, analysis: dict, device: str = "cpu") -> tuple[Any, Callable, list]:
    """(model, loss_fn, batches) for the Hessian of `loss`: "pretrain" or "finetune:<task>".

    pretrain: the pretraining loss on fixed validation batches. finetune:<task>: the fine-tuning loss
    at the weights fine-tuned on the task's first split seed, on the first training batches.
    """
    an = AnalysisConfig.model_validate(analysis)
    if loss == "pretrain":
        model, batches = _load_for_analysis(**problem, n_batches=an.hessian_batches, device=device)
        return model, pretraining_loss, batches
    from engine import finetune, tasks

    ds = DownstreamConfig.model_validate(problem["downstream"])
    data = _task_split(tasks, ds, problem["task"], problem["split_seed"], problem["data_dir"])
    return finetune.finetuning_loss(Path(problem["checkpoint"]), data, Path(problem["finetuned"]),
                                    n_batches=problem["n_batches"], batch_size=ds.batch_size, device=device)


def hessian_job(loss: str, problem: dict, analysis: dict, run_dir: str) -> list[dict]:
    """One Hessian row: in this task (hessian_workers: 1) or over a Ray Train worker group."""
    an = AnalysisConfig.model_validate(analysis)
    settings = {"top_k": an.hessian_top_k, "max_iter": an.hessian_max_iter, "trace_matvecs": an.trace_matvecs,
                "density_runs": an.density_runs, "seed": 0}
    if an.hessian_workers > 1:
        record = distributed_spectrum(loss, problem, analysis, settings, an.hessian_workers,
                                      storage=Path(run_dir) / "analysis" / "ray_train")
    else:
        record = _spectrum_record(loss, problem, analysis, settings, _device())
    record["hessian_dim"] = record.pop("n_params")  # the row's n_params is the checkpoint's, as in every table
    record["wall_time_s"] = record.pop("wall_s")
    return [{"loss_value": record.pop("loss"), **record}]


def _spectrum_record(loss: str, problem: dict, analysis: dict, settings: dict, device: str,
                     share: tuple[int, int] = (0, 1), all_reduce: Callable | None = None) -> dict:
    """spectrum(...).to_record() on this worker's share (rank, world) of the batches."""
    from engine.hessian import spectrum

    model, loss_fn, batches = hessian_problem(loss, problem, analysis, device)
    rank, world = share
    if len(batches) < world:
        raise ValueError(f"Hessian of {loss}: {len(batches)} batches cannot be shared by {world} workers "
                         "(analysis.hessian_workers must not exceed the batches there are)")
    spec = spectrum(model, loss_fn, batches[rank::world], all_reduce=all_reduce, **settings)
    return {**spec.to_record(), "n_batches": len(batches), "n_workers": world}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def distributed_spectrum(loss: str, problem: dict, analysis: dict, settings: dict, n_workers: int,
                         storage: Path) -> dict:
    """The spectrum over `n_workers` Ray Train workers, each holding every n-th batch.

    Every worker runs the same estimators with the same seed; `HVPOperator` sums the partial H v
    (and gradients, losses) over the group with a torch.distributed all-reduce each matvec, so every
    worker holds the single-worker answer. Rank 0 hands its record back in a Ray Train checkpoint
    (Train V2 keeps only metrics attached to checkpoints); the run's folder is removed afterwards.
    """
    import shutil
    import uuid

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    name = f"hessian-{uuid.uuid4().hex[:12]}"
    trainer = TorchTrainer(
        _spectrum_worker,
        train_loop_config={"loss": loss, "problem": problem, "analysis": analysis, "settings": settings},
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "spectrum.json").read_text())
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)


def _spectrum_worker(config: dict) -> None:
    """Ray Train worker of `distributed_spectrum`: its share of the batches, summed over the group."""
    import tempfile

    from ray.train import Checkpoint
    from ray.train.torch import get_device

    from engine.hessian import torch_distributed_sum

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    record = _spectrum_record(config["loss"], config["problem"], config["analysis"], config["settings"],
                              str(get_device()), share=(rank, world), all_reduce=torch_distributed_sum)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            (Path(folder) / "spectrum.json").write_text(json.dumps(record))
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report({"lambda_max": record["lambda_max"]}, checkpoint=checkpoint)


def landscape_job(checkpoint: str, val_shards: list[str], analysis: dict, micro_batch_size: int,
                  max_seq_len: int, mlm_probability: float) -> list[dict]:
    from engine import landscape

    an = AnalysisConfig.model_validate(analysis)
    model, batches = _load_for_analysis(checkpoint, val_shards, micro_batch_size, max_seq_len, mlm_probability,
                                        an.hessian_batches)
    rows = []
    grid_1d = landscape.surface_1d(model, pretraining_loss, batches, resolution=an.landscape_resolution,
                                   span=an.landscape_span, seed=0)
    rows += [{"kind": "1d", "alpha": a, "beta": 0.0, "loss": v} for a, v in zip(grid_1d.alphas, grid_1d.losses)]
    if an.landscape_2d:
        grid = landscape.surface_2d(model, pretraining_loss, batches, resolution=an.landscape_resolution,
                                    span=an.landscape_span, seed=0)
        rows += [{"kind": "2d", "alpha": a, "beta": b, "loss": v} for a, b, v in grid.points()]
    sharp = {
        "eps_sharpness": landscape.eps_sharpness(model, pretraining_loss, batches, eps=an.sharpness_eps, seed=0),
        "adaptive_sharpness": landscape.adaptive_sharpness(model, pretraining_loss, batches, rho=an.sharpness_eps * 50, seed=0),
    }
    return [{**r, **sharp} for r in rows]


def pt_to_ft_job(checkpoint: str, val_shards: list[str], analysis: dict, micro_batch_size: int, max_seq_len: int,
                 mlm_probability: float, task: str, finetuned: str) -> list[dict]:
    from safetensors.torch import load_file

    from engine import landscape

    an = AnalysisConfig.model_validate(analysis)
    model, batches = _load_for_analysis(checkpoint, val_shards, micro_batch_size, max_seq_len, mlm_probability,
                                        an.hessian_batches)
    # the fine-tuned file holds the encoder (AutoModel keys); the LM model names it by its base prefix
    target = {f"{model.base_model_prefix}.{k}": v for k, v in load_file(finetuned).items()}
    if not any(name in target for name, _ in model.named_parameters()):
        raise ValueError(f"{finetuned}: no parameter names in common with {checkpoint}")
    line = landscape.surface_along(model, pretraining_loss, batches, target, resolution=an.landscape_resolution)
    return [{"kind": f"pt_to_ft:{task}", "alpha": a, "beta": 0.0, "loss": v} for a, v in zip(line.alphas, line.losses)]


# ---------------------------------------------------------------------------------------------
# running them


def run_analysis(run_dir: Path, *, data_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """Plan, skip what is done, run the rest as Ray tasks, append rows as they come back."""
    rd = RunDir(Path(run_dir))
    if not rd.sweep_yaml.exists():
        raise FileNotFoundError(f"{rd.root}: not a run directory (no sweep.yaml)")
    cfg = SweepConfig.model_validate(yaml.safe_load(rd.sweep_yaml.read_text()))
    if not rd.table("pretrain").exists():
        raise FileNotFoundError(f"{rd.table('pretrain')}: no pretraining results; run `clmscale sweep` first")
    from engine.train import verify_checkpoint

    pretrain = pd.read_parquet(rd.table("pretrain"))
    # each checkpoint's weights hashed once per run, for the choice of checkpoints and for the PCA
    corrupt = functools.cache(lambda path: verify_checkpoint(Path(path), weights_only=True))
    checkpoints = sound_checkpoints(rd, pretrain, select_checkpoints(pretrain, cfg.analysis.checkpoints), corrupt)
    jobs = plan_jobs(cfg, rd, checkpoints, data_dir)
    tables = {name: _read(rd.table(name)) for name in KEY_COLUMNS}
    for name, t in tables.items():  # error rows are retried, so they go
        tables[name] = t[t["status"] == "ok"] if len(t) else t
    done = {(name, tuple(r)) for name, t in tables.items() if len(t) for r in t[list(KEY_COLUMNS[name])].itertuples(index=False)}
    todo = [j for j in jobs if (j.table, j.key) not in done]
    log.info(f"analyze {cfg.name}: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if todo:
        if not ray.is_initialized():
            ray.init()
        _run_jobs(todo, done, rd, tables)
    tables["pca"] = parameter_space(rd, pretrain, checkpoints, list(cfg.downstream.tasks), corrupt)
    return tables


def parameter_space(rd: RunDir, pretrain: pd.DataFrame, checkpoints: pd.DataFrame, tasks: list[str],
                    corrupt: Callable[[str], list[str]]) -> pd.DataFrame:
    """PCA of each trial's checkpoint trajectory and of each checkpoint's fine-tuned endpoints.

    Cheap next to the jobs (one Gram matrix of a few weight vectors each), so it runs on the driver,
    from the files on disk, and is rewritten whole every time. A checkpoint for which `corrupt(path)`
    lists files is left out of its trajectory.
    """
    from safetensors.torch import load_file

    from engine.landscape import parameter_pca

    rows = []
    for trial_id, group in pretrain[pretrain["checkpoint"].notna()].groupby("trial_id"):
        group = group.sort_values("tokens")
        sound = [(Path(p), t) for p, t in zip(group["checkpoint"], group["tokens"])
                 if not corrupt(p)]  # a corrupt one is left out of the path
        if len(sound) >= 2:
            pca = parameter_pca([load_file(p / "model.safetensors") for p, _ in sound], labels=[t for _, t in sound])
            rows += _pca_rows(pca, "trajectory", trial_id)
    for ck in checkpoints.to_dict("records"):
        files = {t: _ft_weights(rd, ck, t) for t in tasks}
        found = {t: load_file(f) for t, f in files.items() if f.exists()}
        if len(found) >= 2:
            pca = parameter_pca(list(found.values()), labels=list(found))
            rows += _pca_rows(pca, "finetuned", ck["checkpoint"])
    table = pd.DataFrame(rows, columns=["kind", "group", "label", "pc1", "pc2", "explained_1", "explained_2"])
    rd.results.mkdir(parents=True, exist_ok=True)
    table.to_parquet(rd.table("pca"), index=False)
    return table


def _pca_rows(pca, kind: str, group: str) -> list[dict]:
    ratio = list(pca.explained_variance_ratio) + [0.0]
    return [{"kind": kind, "group": group, "label": str(r["label"]), "pc1": r["pc1"], "pc2": r.get("pc2", 0.0),
             "explained_1": ratio[0], "explained_2": ratio[1]} for r in pca.records]


# a job's key, as columns of its table: a rerun skips the jobs whose key is there with status ok
KEY_COLUMNS = {
    "finetune": ("checkpoint", "task", "split_seed", "mode"),
    "hessian": ("checkpoint", "loss"),
    "landscape": ("checkpoint", "surface"),
}


def _run_jobs(todo: list[Job], done: set, rd: RunDir, tables: dict[str, pd.DataFrame]) -> None:
    gpus = ray.cluster_resources().get("GPU", 0.0)
    one_task = ray.remote(_run_one).options(num_cpus=1, num_gpus=0.25 if gpus else 0, max_retries=1)
    # a job with a worker group only waits on it; the group's placement group holds the CPUs/GPUs
    group_waiter = ray.remote(_run_one).options(num_cpus=0.01, max_retries=0)
    max_groups = max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1.0) // max(j.workers for j in todo)))
    pending: dict[Any, Job] = {}
    waiting = list(todo)
    start, n_done = time.monotonic(), 0
    while waiting or pending:
        for j in [j for j in waiting if all(a in done for a in j.after)]:
            if j.workers > 1 and sum(p.workers > 1 for p in pending.values()) >= max_groups:
                continue  # worker groups wait here, not as idle trainers holding processes on the cluster
            pending[(group_waiter if j.workers > 1 else one_task).remote(j.fn, j.kwargs)] = j
            waiting.remove(j)
        if not pending:  # what is left waits on jobs that failed
            for j in waiting:
                _append(rd, tables, j, [{"status": "error", "error": "skipped: a job it depends on failed"}])
            break
        finished, _ = ray.wait(list(pending), num_returns=1, timeout=JOB_TIMEOUT_S)
        if not finished:
            raise TimeoutError(f"no analysis job finished in {JOB_TIMEOUT_S} s; {len(pending)} still running")
        job = pending.pop(finished[0])
        ok, rows = ray.get(finished[0])
        if ok:
            done.add((job.table, job.key))
        else:
            log.error(f"[analyze] {job.table} {_show(job.key)}: {rows}")
            rows = [{"status": "error", "error": rows}]
        _append(rd, tables, job, rows)
        n_done += 1
        log.info(f"[analyze] {n_done}/{len(todo)} {job.table} {_show(job.key)} {_summary(rows)} "
                 f"({time.monotonic() - start:.0f}s)")


def _run_one(fn: Callable[..., list[dict]], kwargs: dict) -> tuple[bool, Any]:
    """Inside the Ray task: the job's rows, or its error message (never an exception).

    Each row also gets `node_id`, the Ray node the task ran on (for a worker-group job, the node of
    the task that waited on the group), so a table shows where on the cluster its rows were made.
    """
    try:
        node_id = ray.get_runtime_context().get_node_id()
        return True, [{**row, "node_id": node_id} for row in fn(**kwargs)]
    except Exception as err:  # noqa: BLE001 - every failure becomes a row, the analysis goes on
        return False, f"{type(err).__name__}: {err}"


def _append(rd: RunDir, tables: dict[str, pd.DataFrame], job: Job, rows: list[dict]) -> None:
    """Add the job's rows (with its identity and key columns) and rewrite the table atomically."""
    key = dict(zip(KEY_COLUMNS[job.table], job.key))
    new = pd.DataFrame([{**job.identity, "status": "ok", "error": "", **r, **key} for r in rows])
    table = pd.concat([tables[job.table], new], ignore_index=True) if len(tables[job.table]) else new
    tables[job.table] = table
    path = rd.table(job.table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _show(key: tuple) -> str:
    return " ".join(Path(str(k)).name if isinstance(k, str) and "/" in k else str(k) for k in key)


def _summary(rows: list[dict]) -> str:
    r = rows[0] if rows else {}
    if r.get("status") == "error":
        return f"ERROR {r['error']}"
    if "metric" in r:
        return f"{r['metric']}={r['value']:.4g}"
    if "lambda_max" in r:
        return f"lambda_max={r['lambda_max']:.4g}"
    return f"{len(rows)} rows"
