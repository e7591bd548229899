"""Per-checkpoint analysis: every measurement a Ray task, every result a row that is kept.

`run_analysis(run_dir)` takes the checkpoints that count (`engine.rundir.counted_checkpoints`, the
same rows the fit uses), picks the ones the sweep file asks for (`analysis.checkpoints`: the final
one of each finished trial, or all), and plans one job per
- (checkpoint, task, split seed, mode): fine-tuning and linear probes (`engine.finetune`),
- (rung, task, split seed): the same architecture from random init, and (task, split seed): Morgan
  fingerprints — the baselines that say whether pretraining helps at all,
- checkpoint: the Hessian spectrum of the pretraining loss on the trial's own fixed validation
  batches (`engine.hessian`), the loss surface and sharpness around the weights (`engine.landscape`),
- (checkpoint, task): the Hessian and sharpness of the task loss at the pretrained encoder with a probe
  head (measurable before fine-tuning), the Hessian of the fine-tuning loss, the pretrained -> fine-tuned
  line, and the fine-tuned endpoints for PCA.
Each job is a plain function of a `Context` (the run directory, its config, the trials) and a
`CheckpointRef`; jobs run as Ray tasks with explicit resources. Each finished job's rows are
appended to its table as soon as it returns, so an interrupted analysis loses nothing and a rerun
skips every job whose key is already there. A job that fails (an unknown task, a checkpoint
without weights, a split with no labels) becomes an `error` row with the message; the others go on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from clmscale.engine.config import AnalysisConfig, SweepConfig, Trial
from clmscale.engine.rundir import ANALYSIS_TABLES, IDENTITY, TABLES, RunDir, TrialDir, check_columns

log = logging.getLogger("clmscale")

JOB_TIMEOUT_S = 6 * 3600  # one job; a hung worker is reported, not waited on forever


# ---------------------------------------------------------------------------------------------
# what to measure


@dataclass(frozen=True)
class Context:
    """What every job of one analysis reads, the same for all of them (sent to each Ray task)."""

    rd: RunDir
    cfg: SweepConfig
    trials: dict[str, Trial]  # the grid of sweep.yaml by trial id, rung overrides applied
    data_dir: Path | None = None  # local MoleculeNet CSVs (else downstream.data_dir, CLMSCALE_DATA_DIR, download)

    @classmethod
    def of(cls, rd: RunDir, data_dir: Path | None = None) -> Context:
        cfg = rd.config()
        return cls(rd=rd, cfg=cfg, trials=rd.trials_by_id(), data_dir=data_dir)

    def with_analysis(self, **changes: Any) -> Context:
        """The same context with some `analysis` settings changed (tests, benchmarks)."""
        analysis = self.cfg.analysis.model_copy(update=changes)
        return Context(self.rd, self.cfg.model_copy(update={"analysis": analysis}), self.trials, self.data_dir)


@dataclass(frozen=True)
class CheckpointRef:
    """One pretraining checkpoint, as the result tables name it (`path` relative to the run directory)."""

    path: str
    trial_id: str
    tokens: float
    rung: str

    @classmethod
    def of(cls, row: dict) -> CheckpointRef:
        return cls(
            path=str(row["checkpoint"]),
            trial_id=str(row["trial_id"]),
            tokens=float(row["tokens"]),
            rung=str(row["rung"]),
        )


@dataclass(frozen=True)
class Job:
    table: str  # results/<table>.parquet receives its rows
    key: tuple  # the values of TABLES[table].key: a rerun skips jobs whose key is present with status ok
    fn: Callable[..., list[dict]]  # fn(ctx, **args) -> rows
    args: dict = field(hash=False)
    identity: dict = field(hash=False)  # columns every row of this job carries
    after: tuple = ()  # (table, key) of jobs that must be done first
    workers: int = 1  # >1: the job only waits on a Ray Train worker group of that size (see distributed_spectrum)


def _job(
    table: str, fn: Callable[..., list[dict]], identity: dict, after: tuple = (), workers: int = 1, **args: Any
) -> Job:
    """A job whose key is read from its identity and arguments: the one place keys are built."""
    fields = {**identity, **{k: v for k, v in args.items() if k != "ck"}}
    return Job(table, tuple(fields[c] for c in TABLES[table].key), fn, args, identity, after, workers)


MILESTONE_RTOL = 0.02  # a checkpoint lands a few whole batches past its milestone (fits.verdicts' stratum_rtol)


def select_checkpoints(counted: pd.DataFrame, analysis: AnalysisConfig) -> pd.DataFrame:
    """Of the checkpoints that count: the last of each trial (`analysis.checkpoints: final`) or every one (`all`),
    and with `analysis.tokens` also each one within MILESTONE_RTOL of a listed token count."""
    chosen = counted
    if analysis.checkpoints == "final":
        chosen = counted.sort_values("tokens").groupby("trial_id", sort=False).tail(1)
        if analysis.tokens:
            tokens = counted["tokens"].to_numpy(float)[:, None]
            hits = np.abs(tokens - np.asarray(analysis.tokens, float)) <= MILESTONE_RTOL * tokens
            for count in np.asarray(analysis.tokens)[~hits.any(axis=0)]:
                log.warning(f"analysis.tokens: no checkpoint within {MILESTONE_RTOL:.0%} of {count:,} tokens")
            chosen = counted[hits.any(axis=1) | counted.index.isin(chosen.index)]
    return chosen.sort_values(["n_params", "tokens"]).reset_index(drop=True)


def sound_checkpoints(
    rd: RunDir, counted: pd.DataFrame, selected: pd.DataFrame, corrupt: Callable[[str], list[str]]
) -> pd.DataFrame:
    """`selected`, with each checkpoint whose weights fail their sha256 check (`corrupt(path)`, the
    files that fail) replaced by the latest sound counted checkpoint of the same trial before it, and
    the event recorded. With none before it, the checkpoint stays, so its jobs fail with the loader's
    message as error rows."""
    keep, chosen = [], set(selected["checkpoint"])
    for ck in selected.to_dict("records"):
        bad = corrupt(ck["checkpoint"])
        if not bad:
            keep.append(ck)
            continue
        earlier = counted[(counted["trial_id"] == ck["trial_id"]) & (counted["tokens"] < ck["tokens"])]
        used = next(
            (
                r
                for r in earlier.sort_values("tokens", ascending=False).to_dict("records")
                if not corrupt(r["checkpoint"])
            ),
            None,
        )
        log.warning(
            f"[analyze] {ck['checkpoint']}: {', '.join(bad)} fail the sha256 check; "
            + (f"using {used['checkpoint']} instead" if used else "and no sound checkpoint comes before it")
        )
        rd.record_event(
            {
                "stage": "analyze",
                "event": "corrupt_checkpoint",
                "checkpoint": ck["checkpoint"],
                "files": bad,
                "used_instead": used["checkpoint"] if used else None,
            }
        )
        if used is None:
            keep.append(ck)
        elif used["checkpoint"] not in chosen:
            keep.append(used)
            chosen.add(used["checkpoint"])
    return pd.DataFrame(keep, columns=selected.columns).sort_values(["n_params", "tokens"]).reset_index(drop=True)


def plan_jobs(ctx: Context, checkpoints: pd.DataFrame) -> list[Job]:
    """Every job of the analysis, in order: each task's splits and characteristics, per checkpoint its
    learning-rate search, fine-tuning, Hessian and landscape jobs, then the baselines."""
    jobs: list[Job] = list(_task_jobs(ctx))
    for row in checkpoints.to_dict("records"):
        ck = CheckpointRef.of(row)
        identity = {k: row[k] for k in IDENTITY} | {"pretrain_val_loss": row["val_loss"]}
        for kind in (_finetune_jobs, _hessian_jobs, _landscape_jobs):
            jobs += kind(ctx, ck, identity)
    jobs += _baseline_jobs(ctx, checkpoints)
    return jobs


def _task_jobs(ctx: Context) -> Iterator[Job]:
    """Per task: every split used, written out (which molecules were tested on), and its characteristics."""
    ds = ctx.cfg.downstream
    for task in ds.tasks:
        for split_seed in ds.seeds:
            yield _job("splits", splits_job, {}, task=task, split_seed=split_seed)
        yield _job("tasks", task_characteristics_job, {}, task=task)


def _lr_search(ctx: Context, ck: CheckpointRef, identity: dict, task: str, mode: str) -> list[Job]:
    """One fine-tuning run per learning rate on the first split and fine-tuning seed (no test numbers):
    the grid spreads over the cluster, and `_chosen_lr` picks from its rows on validation."""
    return [
        _job("lr_search", lr_search_job, identity, ck=ck, task=task, mode=mode, lr=lr) for lr in ctx.cfg.downstream.lrs
    ]


def _searched(jobs: list[Job]) -> tuple:
    return tuple((j.table, j.key) for j in jobs)


def _finetune_jobs(ctx: Context, ck: CheckpointRef, identity: dict) -> Iterator[Job]:
    ds = ctx.cfg.downstream
    for task in ds.tasks:  # custom tasks run when listed here by name, like registry tasks
        search = _lr_search(ctx, ck, identity, task, "finetune") if "finetune" in ds.modes else []
        yield from search
        for split_seed in ds.seeds:
            for finetune_seed in ds.finetune_seeds:
                for mode in ds.modes:
                    # the weights later jobs read: every split seed's, at the first fine-tuning seed
                    save = mode == "finetune" and finetune_seed == ds.finetune_seeds[0]
                    yield _job(
                        "finetune",
                        finetune_job,
                        identity,
                        _searched(search) if mode == "finetune" else (),
                        ck=ck,
                        task=task,
                        split_seed=split_seed,
                        finetune_seed=finetune_seed,
                        mode=mode,
                        save=save,
                    )


def _first_finetune(ctx: Context, ck: CheckpointRef, task: str) -> tuple:
    """The fine-tuning job whose saved weights (first split and fine-tuning seed) a job reads."""
    ds = ctx.cfg.downstream
    return (("finetune", (ck.path, task, ds.seeds[0], ds.finetune_seeds[0], "finetune")),)


def _tuned_tasks(ctx: Context) -> list[str]:
    """Tasks with fine-tuned weights on disk after the fine-tuning jobs (mode finetune asked for)."""
    return list(ctx.cfg.downstream.tasks) if "finetune" in ctx.cfg.downstream.modes else []


def _hessian_jobs(ctx: Context, ck: CheckpointRef, identity: dict) -> Iterator[Job]:
    an = ctx.cfg.analysis
    if an.hessian_top_k == 0:
        return
    yield _job("hessian", hessian_job, identity, workers=an.hessian_workers, ck=ck, loss="pretrain")
    for task in ctx.cfg.downstream.tasks if an.hessian_pretrained_task else []:
        # the task loss at the pretrained weights: measurable before any fine-tuning, so a candidate proxy
        yield _job("hessian", hessian_job, identity, workers=an.hessian_workers, ck=ck, loss=f"pretrained_task:{task}")
    for task in _tuned_tasks(ctx) if an.hessian_finetune else []:
        yield _job(
            "hessian",
            hessian_job,
            identity,
            _first_finetune(ctx, ck, task),
            an.hessian_workers,
            ck=ck,
            loss=f"finetune:{task}",
        )


def _landscape_jobs(ctx: Context, ck: CheckpointRef, identity: dict) -> Iterator[Job]:
    an = ctx.cfg.analysis
    if an.landscape_resolution == 0:
        return
    yield _job("landscape", landscape_job, identity, ck=ck, surface="random_directions")
    for task in ctx.cfg.downstream.tasks if an.hessian_pretrained_task else []:
        # the same loss as that Hessian: after it (when planned), so both read the one probe head it fits
        loss = f"pretrained_task:{task}"
        yield _job("landscape", task_sharpness_job, identity, (("hessian", (ck.path, loss)),), ck=ck, surface=loss)
    for task in _tuned_tasks(ctx):
        yield _job(
            "landscape",
            pt_to_ft_job,
            identity,
            _first_finetune(ctx, ck, task),
            ck=ck,
            surface=f"pt_to_ft:{task}",
            task=task,
        )


def _baseline_jobs(ctx: Context, checkpoints: pd.DataFrame) -> Iterator[Job]:
    """Random-init fine-tuning once per rung (the architecture of its largest checkpoint, tokens = 0,
    with its own learning-rate search), and the feature baselines once per task and seed (no
    checkpoint, no scale): Morgan + linear (deterministic: one fitting seed), and the random forests."""
    ds = ctx.cfg.downstream
    if "random_init" in ds.baselines:
        per_rung = checkpoints.sort_values("tokens").groupby("rung", sort=False).tail(1)
        for row in per_rung.to_dict("records"):
            ck = CheckpointRef.of(row)
            identity = {k: row[k] for k in IDENTITY} | {"tokens": 0, "flops": 0.0, "pretrain_val_loss": np.nan}
            for task in ds.tasks:
                search = _lr_search(ctx, ck, identity, task, "random_init")
                yield from search
                for split_seed in ds.seeds:
                    for finetune_seed in ds.finetune_seeds:
                        yield _job(
                            "finetune",
                            finetune_job,
                            identity,
                            _searched(search),
                            ck=ck,
                            task=task,
                            split_seed=split_seed,
                            finetune_seed=finetune_seed,
                            mode="random_init",
                            save=False,
                        )
    no_scale = {k: np.nan for k in IDENTITY} | {
        "checkpoint": "",
        "trial_id": "",
        "rung": "",
        "pretrain_val_loss": np.nan,
    }
    for mode in [b for b in ds.baselines if b != "random_init"]:
        for task in ds.tasks:
            for split_seed in ds.seeds:
                for finetune_seed in ds.finetune_seeds if mode != "morgan_fp" else ds.finetune_seeds[:1]:
                    yield _job(
                        "finetune",
                        feature_baseline_job,
                        no_scale,
                        task=task,
                        split_seed=split_seed,
                        finetune_seed=finetune_seed,
                        mode=mode,
                    )


# ---------------------------------------------------------------------------------------------
# the jobs: plain functions of the context, returning rows (they run in Ray tasks, or directly in tests)


def _finetune_settings(ctx: Context) -> dict[str, Any]:
    """The fine-tuning protocol of the sweep file, as finetune() keywords."""
    ds = ctx.cfg.downstream
    return {
        "epochs": ds.epochs,
        "patience": ds.patience,
        "batch_size": ds.batch_size,
        "pooling": ds.pooling,
        "warmup_fraction": ds.warmup_fraction,
        "lr_schedule": ds.lr_schedule,
        "weight_decay": ds.weight_decay,
    }


def lr_search_job(ctx: Context, ck: CheckpointRef, task: str, mode: str, lr: float) -> list[dict]:
    from clmscale.engine import finetune

    ds = ctx.cfg.downstream
    data = _task_split(ctx, task, ds.seeds[0], ck)
    result = finetune.finetune(
        ctx.rd.path(ck.path),
        data,
        mode="finetune",
        lr=lr,
        split_seed=ds.seeds[0],
        finetune_seed=ds.finetune_seeds[0],
        random_init=mode == "random_init",
        **_finetune_settings(ctx),
    )
    # the validation metric only: the test split is read once, at the chosen learning rate
    return [
        {
            "lr": lr,
            "split_seed": ds.seeds[0],
            "finetune_seed": ds.finetune_seeds[0],
            "metric": result["metric"],
            "higher_is_better": result["higher_is_better"],
            "val_value": result["val"],
            "flag": result["flag"],
            "best_epoch": result["best_epoch"],
            "n_epochs": result["n_epochs"],
            "wall_time_s": result["wall_s"],
        }
    ]


def chosen_lr(search: pd.DataFrame, grid: list[float]) -> float:
    """The learning rate whose unflagged run scored best on validation (ties: the smaller one).

    `search`: the lr_search rows of one (checkpoint, task, mode). Raises when every run failed or was
    flagged (best epoch 0: the lr never improved on the untrained head; or a non-finite loss)."""
    ok = search[(search["status"] == "ok") & (search["flag"].fillna("") == "") & search["lr"].isin(grid)]
    ok = ok[np.isfinite(ok["val_value"].to_numpy(float))]
    if ok.empty:
        why = search["flag"].fillna("").where(search["status"] == "ok", search["error"])
        flags = dict(zip(search["lr"], why, strict=True))
        raise ValueError(f"no learning rate of {grid} gave a usable run on the first split ({flags})")
    higher = bool(ok["higher_is_better"].iloc[0])
    return float(ok.sort_values(["val_value", "lr"], ascending=[not higher, True])["lr"].iloc[0])


def finetune_job(
    ctx: Context, ck: CheckpointRef, task: str, split_seed: int, finetune_seed: int, mode: str, save: bool
) -> list[dict]:
    from clmscale.engine import finetune

    ds = ctx.cfg.downstream
    data = _task_split(ctx, task, split_seed, ck)
    settings = _finetune_settings(ctx)
    if mode == "probe":
        settings["probe_layer"] = ds.probe_layer
        lr = ds.lrs[0]  # unused by the probe, which fits a linear model with its own penalty search
    else:
        search = ctx.rd.read_table("lr_search")
        lr = chosen_lr(
            search[(search["checkpoint"] == ck.path) & (search["task"] == task) & (search["mode"] == mode)], ds.lrs
        )
    result = finetune.finetune(
        ctx.rd.path(ck.path),
        data,
        mode="probe" if mode == "probe" else "finetune",
        lr=lr,
        split_seed=split_seed,
        finetune_seed=finetune_seed,
        random_init=mode == "random_init",
        save_to=ctx.rd.finetuned_weights(ck.trial_id, ck.tokens, task, split_seed) if save else None,
        **settings,
    )
    return _finetune_rows(ctx, data, mode, result)


def feature_baseline_job(ctx: Context, task: str, split_seed: int, finetune_seed: int, mode: str) -> list[dict]:
    from clmscale.engine import baselines, finetune

    data = _task_split(ctx, task, split_seed)
    if mode == "morgan_fp":
        result = finetune.fingerprint_baseline(data, split_seed=split_seed)
    else:
        # the mode is a config Baseline, so ecfp4_rf or rdkit2d_rf here; featurize refuses any other name
        result = baselines.random_forest_baseline(
            data,
            features=mode.removesuffix("_rf"),  # type: ignore[arg-type]
            split_seed=split_seed,
            seed=finetune_seed,
            n_trees=ctx.cfg.downstream.n_trees,
        )
    return _finetune_rows(ctx, data, mode, {**result, "finetune_seed": finetune_seed})


def _task_split(ctx: Context, task: str, split_seed: int, ck: CheckpointRef | None = None):
    """The task's split as every model-facing job sees it: its SMILES through the corpus's canonicalisation
    (`engine.prepare.canonical_smiles`, the sweep's `data.isomeric`), so they are spelled as in pretraining, and
    written in the representation the checkpoint `ck` read (SMILES without one: the feature baselines)."""
    from clmscale.engine.finetune import FinetuneData
    from clmscale.engine.prepare import canonical_smiles

    loaded, split = _loaded_split(ctx, task, split_seed)
    smiles = canonical_smiles(loaded.smiles, ctx.cfg.data.isomeric, what=f"task {loaded.name!r}")
    representation = "smiles" if ck is None else ctx.trials[ck.trial_id].representation
    # all convert: `_loaded_split` kept only those
    texts = [text for text, _ in _converted(tuple(smiles), representation, ctx.cfg.data.isomeric)]
    if None in texts:
        raise ValueError(f"task {loaded.name!r}: {texts.count(None)} molecules cannot be written as {representation}")
    return FinetuneData(
        smiles=texts,
        labels=loaded.labels,
        task_type=loaded.task_type,
        n_classes=loaded.n_classes,
        split=split,
        name=loaded.name,
        primary_metric=loaded.primary_metric,
    )


def _loaded_split(ctx: Context, task: str, split_seed: int):
    from clmscale.engine import tasks

    ds = ctx.cfg.downstream
    spec = next((c for c in ds.custom if c.name == task), task)
    loaded = tasks.load_task(spec, data_dir=ctx.data_dir or ds.data_dir, max_molecules=ds.max_molecules)
    loaded = _representable(loaded, ctx.cfg.data.representations(), ctx.cfg.data.isomeric)
    return loaded, tasks.split_task(loaded, ds.split, ds.split_fractions, seed=split_seed)


_TOLD: set[str] = set()


@functools.lru_cache(maxsize=32)
def _converted(smiles: tuple[str, ...], representation: str, isomeric: bool) -> tuple:
    """`convert_with_reasons` of a task's SMILES, kept per process: every job of a task reads the same molecules,
    and a Ray worker runs many jobs (SAFE costs ~2 ms a molecule)."""
    from clmscale.engine.representations import convert_with_reasons

    return tuple(convert_with_reasons(smiles, representation, isomeric))  # type: ignore[arg-type]


def _representable(loaded, representations: list, isomeric: bool):
    """The task's molecules that every representation of the grid writes and reads back, so each arm is scored on
    the same molecules and the same splits; the others are logged and kept in `unconverted` (file row, SMILES, why).
    """
    from clmscale.engine.prepare import canonical_smiles

    others = [r for r in representations if r != "smiles"]
    if not others:
        return loaded
    smiles = canonical_smiles(loaded.smiles, isomeric, what=f"task {loaded.name!r}")
    why: list[str | None] = [None] * len(smiles)
    for r in others:
        for i, (_, reason) in enumerate(_converted(tuple(smiles), r, isomeric)):
            why[i] = why[i] or reason
    keep = np.array([w is None for w in why], dtype=bool)
    if keep.all():
        return loaded
    dropped = [(int(row), s, w) for row, s, w, k in zip(loaded.rows, loaded.smiles, why, keep, strict=True) if not k]
    if loaded.name not in _TOLD:  # once per task and process, not once per job
        _TOLD.add(loaded.name)
        log.warning("task %r: %d molecules left out: not every representation of the grid writes them, e.g. row %d "
                    "%r: %s", loaded.name, len(dropped), *dropped[0])  # fmt: skip
    return dataclasses.replace(
        loaded,
        smiles=[s for s, k in zip(loaded.smiles, keep, strict=True) if k],
        labels=loaded.labels[keep],
        rows=loaded.rows[keep],
        unconverted=dropped,
    )


def _finetune_rows(ctx: Context, data, mode: str, result: dict) -> list[dict]:
    """One row per metric (the task's primary one marked), with the protocol that produced it."""
    from clmscale.engine.finetune import metric_rows

    train = data.labels[data.split[0]]
    label_sd = float(np.nanmean(np.nanstd(train, axis=0, ddof=1))) if data.task_type == "regression" else np.nan
    common = {
        "task": data.name,
        "split": ctx.cfg.downstream.split,
        "split_seed": result["split_seed"],
        "finetune_seed": result.get("finetune_seed"),
        "mode": mode,
        "label_sd": label_sd,
        "task_val_loss": result.get("val_loss", np.nan),
        "lr": result.get("lr"),
        "flag": result.get("flag", ""),
        "best_epoch": result.get("best_epoch"),
        "n_epochs": result.get("n_epochs"),
        "pooling": result.get("pooling"),
        "probe_layer": result.get("probe_layer"),
        "unk_fraction": result.get("unk_fraction"),
        "truncated_fraction": result.get("truncated_fraction"),
        "wall_time_s": result["wall_s"],
    }
    return [{**common, **row} for row in metric_rows(result)]


def splits_job(ctx: Context, task: str, split_seed: int) -> list[dict]:
    from clmscale.engine import tasks

    loaded, split = _loaded_split(ctx, task, split_seed)
    return tasks.split_records(loaded, split, ctx.cfg.downstream.split, split_seed).to_dict("records")


def task_characteristics_job(ctx: Context, task: str) -> list[dict]:
    """Size, type, label balance or spread, scaffold diversity, and the nearest-neighbour ECFP4 Tanimoto of
    each task molecule to a seeded sample of the pretraining corpus (in chunks, as the reducer expects)."""
    from clmscale.engine import data, taskstats

    loaded, _ = _loaded_split(ctx, task, ctx.cfg.downstream.seeds[0])
    record = taskstats.task_characteristics(loaded)
    corpus = taskstats.sample_corpus(
        data.read_smiles(ctx.rd.shard_paths("train")), ctx.cfg.analysis.corpus_sample, seed=0
    )
    nearest = nearest_neighbours(list(loaded.smiles), corpus)
    distance = taskstats.corpus_distance(nearest, similar_at=0.4)
    distance["fraction_nn_unrelated"] = distance.pop("fraction_nn_tanimoto_below_0.4")
    return [{**record, **distance, "n_corpus_sample": len(corpus)}]


NN_CHUNK = 2_000  # corpus molecules per nearest-neighbour Ray task: ~1 s of RDKit per 1,000 task molecules
NN_TIMEOUT_S = 3600  # one chunk; a hung worker is reported, not waited on forever


def nearest_neighbours(task_smiles: list[str], corpus: list[str], chunk: int = NN_CHUNK) -> np.ndarray:
    """Each task molecule's highest ECFP4 Tanimoto to the corpus sample, one Ray task per corpus chunk (so the
    search spreads over the cluster), combined by the elementwise max: exact whatever the chunking. Without a
    Ray runtime (a plain call) the chunks run here, one after another.

    Called from inside a job's task: a task blocked in ray.wait lends its CPU back to Ray, so the chunks can
    run on it too.
    """
    from clmscale.engine import taskstats

    chunks = [corpus[i : i + chunk] for i in range(0, len(corpus), chunk)]  # none: combine says so
    if not ray.is_initialized():
        return taskstats.combine_nearest_neighbours([taskstats.nearest_neighbour_chunk(task_smiles, c) for c in chunks])
    one_chunk = ray.remote(taskstats.nearest_neighbour_chunk).options(num_cpus=1, max_retries=1)
    task_ref = ray.put(task_smiles)  # once, not once per chunk
    pending = [one_chunk.remote(task_ref, c) for c in chunks]  # type: ignore[arg-type]  # Ray resolves the ref
    parts: dict[ray.ObjectRef, np.ndarray] = {}
    while len(parts) < len(pending):
        finished, _ = ray.wait([r for r in pending if r not in parts], num_returns=1, timeout=NN_TIMEOUT_S)
        if not finished:
            for ref in pending:
                ray.cancel(ref)
            raise TimeoutError(
                f"no nearest-neighbour chunk finished in {NN_TIMEOUT_S} s ({len(parts)} of {len(pending)} done)"
            )
        parts[finished[0]] = ray.get(finished[0])
    return taskstats.combine_nearest_neighbours([parts[r] for r in pending])


def _pretrained(ctx: Context, ck: CheckpointRef, device: str = "cpu"):
    """The pretrained model (eager attention, eval mode) and the first `hessian_batches` of its trial's
    own fixed validation batches, each cut into pieces of `analysis.hessian_micro_batch` rows, on `device`.

    The pieces change no number: every loss over them is token-weighted (the objective's own mean), so
    it equals the loss over the whole batches; they bound the double backward's activations, which the
    trial's micro-batch (sized by `auto` to fill a device for plain training) would not.
    """
    from clmscale.engine import data, models

    model = models.load_pretrained(ctx.rd.path(ck.path))
    models.use_eager_attention(model)
    model.eval().to(device)
    batches = data.trial_validation_batches(
        ctx.rd,
        ctx.trials[ck.trial_id],
        ctx.cfg.model.max_seq_len,
        n_batches=ctx.cfg.analysis.hessian_batches,
        tokenizer=ctx.rd.path(ck.path),
    )
    rows = ctx.cfg.analysis.hessian_micro_batch
    pieces = [{k: v[i : i + rows] for k, v in b.items()} for b in batches for i in range(0, len(b["input_ids"]), rows)]
    return model, [{k: v.to(device) for k, v in p.items()} for p in pieces]


def pretraining_loss(model, batch) -> Any:
    from clmscale.engine.models import model_inputs

    return model(**model_inputs(batch, model.config)).loss


@dataclass(frozen=True)
class HessianProblem:
    """What `engine.hessian.spectrum` takes for one loss at one point."""

    model: Any
    loss_fn: Callable
    batches: list
    count_fn: Callable[[Any], float]  # what the batch's mean loss divides by: the objective's weighting
    param_names: list[str] | None = None  # None: every trainable parameter


def hessian_problem(ctx: Context, ck: CheckpointRef, loss: str, device: str = "cpu") -> HessianProblem:
    """The Hessian of `loss`: "pretrain", "finetune:<task>" or "pretrained_task:<task>".

    pretrain: the pretraining loss on the trial's fixed validation batches, weighted by labelled tokens.
    finetune:<task>: the fine-tuning loss at the weights fine-tuned on the task's first split seed, over
    encoder and head. pretrained_task:<task>: the task loss at the pretrained encoder with a head fitted
    on train while the encoder stayed frozen (`probe_head`), over the encoder's parameters: measurable
    before any fine-tuning, so a candidate predictor of downstream performance. Both task losses read a
    random sample of train (`analysis.hessian_sample_seed`), weighted by labelled entries.
    """
    an, ds = ctx.cfg.analysis, ctx.cfg.downstream
    if loss == "pretrain":
        from clmscale.engine.models import family_of, n_loss_tokens

        model, batches = _pretrained(ctx, ck, device)
        family = family_of(model.config)
        return HessianProblem(model, pretraining_loss, batches, lambda b: float(n_loss_tokens(b["labels"], family)))
    kind, task = loss.split(":", 1)
    pretrained = kind == "pretrained_task"
    weights = (
        ctx.rd.probe_head(ck.trial_id, ck.tokens, task)
        if pretrained
        else ctx.rd.finetuned_weights(ck.trial_id, ck.tokens, task, ds.seeds[0])
    )
    return task_problem(
        ctx.rd.path(ck.path),
        _task_split(ctx, task, ds.seeds[0], ck),
        weights,
        pretrained_encoder=pretrained,
        n_batches=an.hessian_batches,
        batch_size=ds.batch_size,
        sample_seed=an.hessian_sample_seed,
        device=device,
    )


def task_problem(
    checkpoint_dir: Path,
    data,
    weights: Path,
    *,
    pretrained_encoder: bool,
    n_batches: int,
    batch_size: int,
    sample_seed: int | None,
    device: str = "cpu",
) -> HessianProblem:
    """A task loss (`engine.finetune.finetuning_loss`) weighted by labelled entries: at the fine-tuned encoder
    + head saved at `weights`, over both; or (pretrained_encoder) at the checkpoint's own encoder with the
    probe head saved at `weights`, over the encoder's parameters, the head held fixed."""
    from clmscale.engine import finetune

    model, loss_fn, batches = finetune.finetuning_loss(
        checkpoint_dir,
        data,
        weights,
        n_batches=n_batches,
        batch_size=batch_size,
        device=device,
        sample_seed=sample_seed,
        pretrained_encoder=pretrained_encoder,
    )
    names = [n for n, _ in model.named_parameters() if n.startswith("encoder.")] if pretrained_encoder else None
    return HessianProblem(
        model, loss_fn, batches, lambda b: float(finetune.n_labelled(b["labels"], data.n_classes)), names
    )


def probe_head(ctx: Context, ck: CheckpointRef, task: str) -> None:
    """Fit (once) the linear head on the frozen pretrained encoder that `pretrained_task:<task>` is taken at:
    trained like fine-tuning on the first split and fine-tuning seed, at the grid's largest rate (a
    linear head on fixed features tolerates it), early-stopped on validation."""
    from clmscale.engine import finetune
    from clmscale.engine.rundir import head_file

    ds = ctx.cfg.downstream
    path = ctx.rd.probe_head(ck.trial_id, ck.tokens, task)
    if head_file(path).exists():
        return
    data = _task_split(ctx, task, ds.seeds[0], ck)
    finetune.finetune(
        ctx.rd.path(ck.path),
        data,
        mode="finetune",
        lr=max(ds.lrs),
        split_seed=ds.seeds[0],
        finetune_seed=ds.finetune_seeds[0],
        freeze_encoder=True,
        save_to=path,
        **_finetune_settings(ctx),
    )


def hessian_job(ctx: Context, ck: CheckpointRef, loss: str) -> list[dict]:
    """One Hessian row: in this task (hessian_workers: 1) or over a Ray Train worker group."""
    an = ctx.cfg.analysis
    if loss.startswith("pretrained_task:"):
        probe_head(ctx, ck, loss.split(":", 1)[1])  # here, before any worker group reads it
    if an.hessian_workers > 1:
        record = distributed_spectrum(ctx, ck, loss, an.hessian_workers)
    else:
        record = _spectrum_record(ctx, ck, loss, _device())
    record["hessian_dim"] = record.pop("n_params")  # the row's n_params is the checkpoint's, as in every table
    record["wall_time_s"] = record.pop("wall_s")
    return [{"loss_value": record.pop("loss"), **record}]


def _spectrum_record(
    ctx: Context,
    ck: CheckpointRef,
    loss: str,
    device: str,
    share: tuple[int, int] = (0, 1),
    all_reduce: Callable | None = None,
) -> dict:
    """spectrum(...).to_record() on this worker's share (rank, world) of the batches."""
    from clmscale.engine.hessian import spectrum

    an = ctx.cfg.analysis
    problem = hessian_problem(ctx, ck, loss, device)
    rank, world = share
    if len(problem.batches) < world:
        raise ValueError(
            f"Hessian of {loss}: {len(problem.batches)} batches cannot be shared by {world} workers "
            "(analysis.hessian_workers must not exceed the batches there are)"
        )
    # each worker holds every world-th batch and its slice of every stored Lanczos vector (no replication)
    spec = spectrum(
        problem.model,
        problem.loss_fn,
        problem.batches[rank::world],
        all_reduce=all_reduce,
        count_fn=problem.count_fn,
        param_names=problem.param_names,
        shard=share if world > 1 else None,
        top_k=an.hessian_top_k,
        max_iter=an.hessian_max_iter,
        trace_matvecs=an.trace_matvecs,
        density_runs=an.density_runs,
        tf32=an.hessian_tf32,
        seed=0,
    )
    return {**spec.to_record(), "n_batches": len(problem.batches), "n_workers": world}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def distributed_spectrum(ctx: Context, ck: CheckpointRef, loss: str, n_workers: int) -> dict:
    """The spectrum over `n_workers` Ray Train workers, each holding every n-th batch.

    Every worker runs the same estimators with the same seed; `HVPOperator` sums the partial H v
    (and gradients, losses) over the group with a torch.distributed all-reduce each matvec, so every
    worker holds the single-worker answer. Rank 0 hands its record back in a Ray Train checkpoint
    (Train V2 keeps only metrics attached to checkpoints); the run's folder is removed afterwards.
    """
    import json
    import shutil
    import uuid

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    name = f"hessian-{uuid.uuid4().hex[:12]}"
    storage = ctx.rd.ray_train_storage
    trainer = TorchTrainer(
        _spectrum_worker,
        train_loop_config={"ctx": ctx, "ck": ck, "loss": loss},
        scaling_config=ScalingConfig(
            num_workers=n_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Hessian of {loss} on {ck.path}: the worker group returned no record")
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "spectrum.json").read_text())
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)


def _spectrum_worker(config: dict) -> None:
    """Ray Train worker of `distributed_spectrum`: its share of the batches, summed over the group."""
    import json
    import tempfile

    from ray.train import Checkpoint
    from ray.train.torch import get_device

    from clmscale.engine.hessian import torch_distributed_sum

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    record = _spectrum_record(
        config["ctx"],
        config["ck"],
        config["loss"],
        str(get_device()),
        share=(rank, world),
        all_reduce=torch_distributed_sum,
    )
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            (Path(folder) / "spectrum.json").write_text(json.dumps(record))  # Ray's own checkpoint, not a run file
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report({"lambda_max": record["lambda_max"]}, checkpoint=checkpoint)


def landscape_job(ctx: Context, ck: CheckpointRef, surface: str) -> list[dict]:
    from clmscale.engine import landscape

    an = ctx.cfg.analysis
    model, batches = _pretrained(ctx, ck)
    weights = _token_weights(model, batches)  # the pretraining loss' own per-token mean over the batches
    rows = []
    surface_settings: dict[str, Any] = {
        "resolution": an.landscape_resolution,
        "span": an.landscape_span,
        "seed": 0,
        "weights": weights,
    }
    grid_1d = landscape.surface_1d(model, pretraining_loss, batches, **surface_settings)
    rows += [
        {"kind": "1d", "alpha": a, "beta": 0.0, "loss": v} for a, v in zip(grid_1d.alphas, grid_1d.losses, strict=True)
    ]
    if an.landscape_2d:
        grid = landscape.surface_2d(model, pretraining_loss, batches, **surface_settings)
        rows += [{"kind": "2d", "alpha": a, "beta": b, "loss": v} for a, b, v in grid.points()]
    # radii relative to each tensor's norm, so sharpness does not grow with N by construction
    sharp = {
        "eps_sharpness": landscape.relative_sharpness(
            model, pretraining_loss, batches, rho=an.sharpness_rho, n_steps=an.sharpness_steps, seed=0, weights=weights
        ),
        "adaptive_sharpness": landscape.adaptive_sharpness(
            model, pretraining_loss, batches, rho=an.adaptive_rho, n_steps=an.sharpness_steps, seed=0, weights=weights
        ),
    }
    return [{**r, **sharp} for r in rows]


def task_sharpness_job(ctx: Context, ck: CheckpointRef, surface: str) -> list[dict]:
    """Sharpness of the task loss at the pretrained encoder with its probe head (`surface` is
    "pretrained_task:<task>"): the loss, batches and parameters of that Hessian, so one more proxy
    measurable before fine-tuning. One row, kind "sharpness", its `loss` the task loss at the weights."""
    probe_head(ctx, ck, surface.split(":", 1)[1])  # fitted once: the Hessian job's, when it ran first
    problem = hessian_problem(ctx, ck, surface, _device())
    an = ctx.cfg.analysis
    return [
        {
            "kind": "sharpness",
            "alpha": 0.0,
            "beta": 0.0,
            **sharpness(problem, rho=an.sharpness_rho, adaptive_rho=an.adaptive_rho, n_steps=an.sharpness_steps),
        }
    ]


def sharpness(problem: HessianProblem, *, rho: float, adaptive_rho: float, n_steps: int) -> dict[str, float]:
    """Relative ε-sharpness and multi-step adaptive sharpness of `problem`'s loss over its parameters
    (`param_names`; the rest held fixed), the batches weighted as the objective weights them, and the
    loss at the weights (`loss`)."""
    from clmscale.engine import landscape

    weights = [problem.count_fn(b) for b in problem.batches]
    common: dict[str, Any] = {"n_steps": n_steps, "seed": 0, "param_names": problem.param_names, "weights": weights}
    return {
        "loss": landscape.loss_at(problem.model, problem.loss_fn, problem.batches, weights=weights),
        "eps_sharpness": landscape.relative_sharpness(
            problem.model, problem.loss_fn, problem.batches, rho=rho, **common
        ),
        "adaptive_sharpness": landscape.adaptive_sharpness(
            problem.model, problem.loss_fn, problem.batches, rho=adaptive_rho, **common
        ),
    }


def _token_weights(model, batches: list) -> list[float]:
    from clmscale.engine.models import family_of, n_loss_tokens

    family = family_of(model.config)
    return [float(n_loss_tokens(b["labels"], family)) for b in batches]


def pt_to_ft_job(ctx: Context, ck: CheckpointRef, surface: str, task: str) -> list[dict]:
    from safetensors.torch import load_file

    from clmscale.engine import landscape

    model, batches = _pretrained(ctx, ck)
    finetuned = ctx.rd.finetuned_weights(ck.trial_id, ck.tokens, task, ctx.cfg.downstream.seeds[0])
    # the fine-tuned file holds the encoder (AutoModel keys); the LM model names it by its base prefix
    target = {f"{model.base_model_prefix}.{k}": v for k, v in load_file(finetuned).items()}
    if not any(name in target for name, _ in model.named_parameters()):
        raise ValueError(f"{finetuned}: no parameter names in common with {ck.path}")
    line = landscape.surface_along(
        model,
        pretraining_loss,
        batches,
        target,
        resolution=ctx.cfg.analysis.landscape_resolution,
        weights=_token_weights(model, batches),
    )
    return [
        {"kind": f"pt_to_ft:{task}", "alpha": a, "beta": 0.0, "loss": v}
        for a, v in zip(line.alphas, line.losses, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# running them


def run_analysis(run_dir: Path | RunDir, *, data_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """Plan, skip what is done, run the rest as Ray tasks, append rows as they come back."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    ctx = Context.of(rd, data_dir)
    counted = rd.counted_checkpoints().checkpoints
    # each checkpoint's weights hashed once per run, for the choice of checkpoints and for the PCA
    corrupt = functools.cache(lambda path: TrialDir.verify(rd.path(path), weights_only=True))
    checkpoints = sound_checkpoints(rd, counted, select_checkpoints(counted, ctx.cfg.analysis), corrupt)
    jobs = plan_jobs(ctx, checkpoints)
    tables = {name: rd.read_table(name) for name in ANALYSIS_TABLES}
    tables = {name: t[t["status"] == "ok"] for name, t in tables.items()}  # error rows are retried, so they go
    done = {(name, tuple(r)) for name, t in tables.items() for r in t[list(TABLES[name].key)].itertuples(index=False)}
    todo = [j for j in jobs if (j.table, j.key) not in done]
    to_run = {table: sum(j.table == table for j in todo) for table in dict.fromkeys(j.table for j in todo)}
    log.info(
        f"analyze {ctx.cfg.name}: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run",
        extra={"console": {"jobs": to_run}},
    )  # engine.console's table
    if todo:
        if not ray.is_initialized():
            ray.init()
        _run_jobs(ctx, todo, done, tables)
    ds = ctx.cfg.downstream
    tables["pca"] = parameter_space(rd, counted, checkpoints, list(ds.tasks), list(ds.seeds), corrupt)
    return tables


def parameter_space(
    rd: RunDir,
    counted: pd.DataFrame,
    checkpoints: pd.DataFrame,
    tasks: list[str],
    seeds: list[int],
    corrupt: Callable[[str], list[str]],
) -> pd.DataFrame:
    """PCA of each trial's checkpoint trajectory, and of each checkpoint's fine-tuned endpoints (every task
    and split seed) together with the pretrained weights they started from, so a task's direction can be
    told from seed scatter.

    Cheap next to the jobs (one Gram matrix of a few weight vectors each), so it runs on the driver,
    from the files on disk, and is rewritten whole every time. A checkpoint for which `corrupt(path)`
    lists files is left out of its trajectory.
    """
    from safetensors.torch import load_file

    from clmscale.engine.landscape import endpoint_pca, parameter_pca

    rows = []
    for trial_id, group in counted.groupby("trial_id"):
        group = group.sort_values("tokens")
        # a corrupt one is left out
        sound = [(p, t) for p, t in zip(group["checkpoint"], group["tokens"], strict=True) if not corrupt(p)]
        if len(sound) >= 2:
            pca = parameter_pca(
                [load_file(TrialDir.weights(rd.path(p))) for p, _ in sound], labels=[t for _, t in sound]
            )
            rows += _pca_rows(pca, "trajectory", str(trial_id))
    for row in checkpoints.to_dict("records"):
        ck = CheckpointRef.of(row)
        found = [
            ({"task": t, "split_seed": s}, f)
            for t in tasks
            for s in seeds
            if (f := rd.finetuned_weights(ck.trial_id, ck.tokens, t, s)).exists()
        ]
        if len(found) >= 2:
            origin = _encoder_keys(load_file(TrialDir.weights(rd.path(ck.path))))
            pca = endpoint_pca(origin, [load_file(f) for _, f in found], [label for label, _ in found])
            ratio = list(pca.explained_variance_ratio) + [0.0]
            rows += [
                {
                    "kind": "finetuned",
                    "group": ck.path,
                    "label": "pretrained" if r["origin"] else r["task"],
                    "split_seed": None if r["origin"] else r["split_seed"],
                    "pc1": r["pc1"],
                    "pc2": r.get("pc2", 0.0),
                    "distance_from_origin": r["distance_from_origin"],
                    "explained_1": ratio[0],
                    "explained_2": ratio[1],
                }
                for r in pca.records
            ]
    table = pd.DataFrame(rows, columns=list(TABLES["pca"].columns))
    rd.write_table("pca", table)
    return table


def _encoder_keys(weights: dict) -> dict:
    """A pretraining checkpoint's tensors under the names its encoder has in AutoModel (the fine-tuned
    files' names): the LM model's base prefix dropped; its LM head is then unshared and left out."""
    prefixes = ("roberta.", "transformer.")
    return {next((k[len(p) :] for p in prefixes if k.startswith(p)), k): v for k, v in weights.items()}


def _pca_rows(pca, kind: str, group: str) -> list[dict]:
    ratio = list(pca.explained_variance_ratio) + [0.0]
    return [
        {
            "kind": kind,
            "group": group,
            "label": str(r["label"]),
            "pc1": r["pc1"],
            "pc2": r.get("pc2", 0.0),
            "explained_1": ratio[0],
            "explained_2": ratio[1],
        }
        for r in pca.records
    ]


def _run_jobs(ctx: Context, todo: list[Job], done: set, tables: dict[str, pd.DataFrame]) -> None:
    gpus = ray.cluster_resources().get("GPU", 0.0)
    one_task = ray.remote(_run_one).options(num_cpus=1, num_gpus=0.25 if gpus else 0, max_retries=1)
    # a job with a worker group only waits on it; the group's placement group holds the CPUs/GPUs
    group_waiter = ray.remote(_run_one).options(num_cpus=0.01, max_retries=0)
    max_groups = max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1.0) // max(j.workers for j in todo)))
    ctx_ref = ray.put(ctx)  # once, not once per task
    pending: dict[Any, Job] = {}
    waiting = list(todo)
    planned = {(j.table, j.key) for j in todo}
    ended = set(done)  # ok or failed: a job starts once the jobs it reads from have ended, and reads their
    # outcome itself (a failed dependency then fails it with a message that says which and why)
    start, n_done = time.monotonic(), 0
    while waiting or pending:
        for j in [j for j in waiting if all(a in ended or a not in planned for a in j.after)]:
            if j.workers > 1 and sum(p.workers > 1 for p in pending.values()) >= max_groups:
                continue  # worker groups wait here, not as idle trainers holding processes on the cluster
            pending[(group_waiter if j.workers > 1 else one_task).remote(j.fn, ctx_ref, j.args)] = j
            waiting.remove(j)
        deadline, finished = time.monotonic() + JOB_TIMEOUT_S, list[ray.ObjectRef]()
        while not finished and time.monotonic() < deadline:  # 1 s at a time: Ctrl-C is seen between them
            finished, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        if not finished:
            raise TimeoutError(f"no analysis job finished in {JOB_TIMEOUT_S} s; {len(pending)} still running")
        job = pending.pop(finished[0])
        ok, rows = ray.get(finished[0])
        ended.add((job.table, job.key))
        if ok:
            done.add((job.table, job.key))
        else:
            log.error(f"[analyze] {job.table} {_show(job.key)}: {rows}")
            rows = [{"status": "error", "error": rows}]
        _append(ctx.rd, tables, job, rows)
        n_done += 1
        log.info(
            f"[analyze] {n_done}/{len(todo)} {job.table} {_show(job.key)} {_summary(rows)} "
            f"({time.monotonic() - start:.0f}s)",
            extra={"console": {"job": job.table, "ok": ok}},
        )


def _run_one(fn: Callable[..., list[dict]], ctx: Context, args: dict) -> tuple[bool, Any]:
    """Inside the Ray task: the job's rows, or its error message (never an exception).

    Each row also gets `node_id`, the Ray node the task ran on (for a worker-group job, the node of
    the task that waited on the group), so a table shows where on the cluster its rows were made.
    """
    try:
        node_id = ray.get_runtime_context().get_node_id()
        return True, [{**row, "node_id": node_id} for row in fn(ctx, **args)]
    except Exception as err:  # noqa: BLE001 - every failure becomes a row, the analysis goes on
        return False, f"{type(err).__name__}: {err}"


def _append(rd: RunDir, tables: dict[str, pd.DataFrame], job: Job, rows: list[dict]) -> None:
    """Add the job's rows (with its identity and key columns) and rewrite the table atomically."""
    key = dict(zip(TABLES[job.table].key, job.key, strict=True))
    new = pd.DataFrame([{**job.identity, "status": "ok", "error": "", **r, **key} for r in rows])
    old = tables[job.table]
    table = check_columns(
        job.table, pd.concat([old, new], ignore_index=True) if len(old) else new, rd.table_path(job.table)
    )
    rd.write_table(job.table, table)
    tables[job.table] = table


def _show(key: tuple) -> str:
    return " ".join(Path(str(k)).name if isinstance(k, str) and "/" in k else str(k) for k in key)


def _summary(rows: list[dict]) -> str:
    r = rows[0] if rows else {}
    if r.get("status") == "error":
        return f"ERROR {r['error']}"
    if "metric" in r:  # a fine-tuning row (test value) or a learning-rate search row (validation only)
        if "value" in r:
            return f"{r['metric']}={r['value']:.4g}"
        return f"lr={r['lr']:g}: val {r['metric']}={r['val_value']:.4g}"
    if "lambda_max" in r:
        return f"lambda_max={r['lambda_max']:.4g}"
    return f"{len(rows)} rows"
