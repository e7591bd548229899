"""The pretraining grid on Ray: one Tune trial per (rung, budget, seed), each a Ray Train run.

The story, in the order it runs:
1. `run_sweep` checks the run directory (a `--resume` must find the same sweep there), writes the
   resolved `sweep.yaml`, runs `prepare` if the shards are missing, and turns epoch budgets into
   token budgets with the manifest's token counts.
2. Ray Tune gets one grid point per trial, a `TrialSpec`. `run_trial`, a Tune function trainable,
   builds a `TorchTrainer` (Train V2: the trainer is launched inside the trial and reports to Tune
   through `TuneReportCallback`) with the trial's `ScalingConfig` and a Ray Data stream of the shards.
3. `train_loop_per_worker` validates its `TrialSpec` and calls `engine.train.train`, the same function
   that runs standalone without Ray. Checkpoints land in `trials/<trial>/checkpoints/`.
4. When Tune is done, `collect_pretrain_table` reads every trial's result and writes
   `results/pretrain.parquet`, one row per checkpoint.

Every file is read and written through `engine.rundir`. Resources are computed from the cluster
before anything starts: a trial that cannot fit the cluster, grown to what its autoscaler allows
(`engine.capacity`), is an error, not a hang; one that fits only a grown cluster waits while the
autoscaler is asked for its nodes; and Ray Data always keeps a CPU for itself.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune

from clmscale.engine.admission import DATA_CPUS, TRIAL_CPU, AdmissionController, Node, trial_need
from clmscale.engine.capacity import Ceiling
from clmscale.engine.config import Strict, SweepConfig, Trial, expand_grid
from clmscale.engine.rundir import TABLES, Manifest, RunDir, TrainResult, TrialDir

log = logging.getLogger("clmscale")

INJECT_NAN_TRIAL_ENV = "CLMSCALE_INJECT_NAN_TRIAL"  # tests only: "<trial_id>:<step>" makes that trial's loss NaN


class SweepError(ValueError):
    """A sweep that cannot start: wrong run directory, a trial that does not fit the cluster, ..."""


class SweepInterrupted(RuntimeError):
    """Tune stopped before every trial ended (Ctrl-C): the trials' folders keep their checkpoints,
    and `clmscale sweep FILE --resume` continues from them."""


class TrialSpec(Strict):
    """Everything one trial needs: Tune hands it to `run_trial`, Train to every worker, as its JSON dump
    (validated once at each boundary). The run directory's own files supply the rest (shards, tokenizer)."""

    trial: Trial
    run_dir: Path
    budget_tokens: int  # in tokens, after epochs were converted with the manifest
    train_split_tokens: int  # one pass over the molecules it draws from, specials included: epochs, unique tokens
    randomized_smiles: int = 0  # data.randomized_smiles: k random SMILES per molecule per pass (0: canonical once)
    max_seq_len: int
    dropout: float
    worker_env: dict[str, str] = {}  # extra environment of the Train workers (fault injection in tests)


# ---------------------------------------------------------------------------------------------
# 1. the run directory and the budgets


def check_run_dir(cfg: SweepConfig, rd: RunDir, resume: bool) -> None:
    """A fresh sweep needs a fresh (or prepare-only) directory; --resume needs the same sweep."""
    if rd.exists():
        previous, ours = rd.config(), cfg
        if any(getattr(previous, k) != getattr(ours, k) for k in ("name", "model", "budget", "seeds")):
            raise SweepError(
                f"{rd.root} holds another sweep ({rd.sweep_yaml} differs in name, model, budget or "
                f"seeds); use a new name or storage.root, or the sweep file that made it"
            )
        if not resume and rd.tune.exists():
            raise SweepError(f"{rd.root} already has a sweep; pass --resume to continue it")
    elif resume:
        raise SweepError(f"nothing to resume in {rd.root}: no sweep.yaml there")


def pass_tokens(rd: RunDir, trial: Trial) -> int:
    """Tokens of one pass over the molecules the trial draws from (its `unique_molecules`, or the whole train
    split), 2 special tokens per molecule included; a SweepError when the split has fewer molecules."""
    try:
        return rd.data_of(trial).pass_tokens(trial.unique_molecules)
    except ValueError as err:
        raise SweepError(f"{rd.sweep_yaml}: trial {trial.trial_id}: {err}") from None


def token_budget(trial: Trial, epoch_tokens: int) -> int:
    """Tokens the trial trains on: given, or epochs x `epoch_tokens` (one pass over its molecules)."""
    if trial.budget_tokens is not None:
        return trial.budget_tokens
    assert trial.budget_epochs is not None  # Trial has one of the two
    return int(trial.budget_epochs * epoch_tokens)


# ---------------------------------------------------------------------------------------------
# 2. resources: what fits, and the ZeRO stage and micro-batch of `auto`


def check_fits(trials: list[Trial], nodes: list[Node], ceiling: Ceiling | None = None) -> None:
    """Raise, naming the trial, its need and the cluster, if a trial cannot fit even the idle cluster
    grown to its ceiling (its Tune actor, every worker bundle, and one CPU left for Ray Data): it
    would wait forever."""
    ledger = AdmissionController(nodes, DATA_CPUS, ceiling=ceiling.nodes if ceiling is not None else None)
    for t in trials:
        need = trial_need(t.resources, TRIAL_CPU)
        if not ledger.fits_empty(need):
            where = ceiling.text(nodes) if ceiling is not None else ledger.capacity_text()
            raise SweepError(
                f"trial {t.trial_id} needs {need.cpus:g} CPUs (+{DATA_CPUS:g} for Ray Data) and {need.gpus:g} GPUs, "
                f"but the cluster has {where} ({t.resources.workers} worker(s) of "
                f"{t.resources.cpus_per_worker:g} CPUs and {t.resources.gpus_per_worker:g} GPUs); lower "
                "resources.workers, cpus_per_worker or gpus_per_worker"
                + (
                    ""
                    if ceiling is not None and ceiling.grows
                    else ", or, on an autoscaling cluster, give what it can grow to: "
                    "resources.cluster_max or --expect-gpus"
                )
            )


def expect_gpus(cfg: SweepConfig, n_gpus: int | None) -> SweepConfig:
    """The sweep with `resources.cluster_max` GPUs set to `n_gpus` (`clmscale sweep --expect-gpus`)."""
    if n_gpus is None:
        return cfg
    cluster_max = {**(cfg.resources.cluster_max or {}), "GPU": float(n_gpus)}
    return cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"cluster_max": cluster_max})})


def resolve_auto(trials: list[Trial], nodes: list[Node], cfg: SweepConfig, vocab_size: int) -> list[Trial]:
    """Each trial with `zero_stage` / `micro_batch_size: auto` made concrete by `engine.plan.choose`:
    ZeRO 0 when it fits one device, else the smallest stage that fits; the largest micro-batch that
    fits. `nodes`: the cluster grown to its ceiling. Raises SweepError (with the numbers) for a trial
    that fits nowhere."""
    from clmscale.engine import plan

    if not any(plan.needs_choice(t) for t in trials):
        return trials
    gpus = sum(n.gpus for n in nodes)
    gpu_memory = cfg.resources.gpu_memory_gb
    if gpu_memory is None and gpus:
        from clmscale.engine.packing import gpu_memory_gb

        gpu_memory = gpu_memory_gb()
    resolved = []
    for t in trials:
        try:
            choice = plan.choose(t, gpus, gpu_memory or 0.0, vocab_size=vocab_size, max_seq_len=cfg.model.max_seq_len)
        except plan.PlanError as err:
            raise SweepError(str(err)) from None
        resolved.append(plan.apply_choice(t, choice))
        if choice.note:
            log.info(f"[{t.trial_id}] {choice.note}")
    return resolved


# ---------------------------------------------------------------------------------------------
# 3. one trial: a Tune function that launches a TorchTrainer


def run_trial(config: dict) -> None:
    """Tune function trainable. Everything arrives in `config`; nothing comes from module globals."""
    from ray.train import FailureConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from clmscale.engine import data

    spec = TrialSpec.model_validate(config["cfg"])  # the grid point: see `run_sweep`
    trial, rd = spec.trial, RunDir(spec.run_dir)
    folder = rd.trial(trial.trial_id)
    done = folder.result()
    if done is not None:  # finished before a driver died, but after Tune last saved its state: not rerun
        log.info(f"[{trial.trial_id}] already {done.status} ({done.n_tokens} tokens); not rerun")
        return
    folder.write_spec(config["cfg"])  # all it takes to rerun this trial
    assert trial.train.micro_batch_size != "auto"  # run_sweep hands over trials with auto made concrete
    r = trial.resources
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    train_ds = data.train_dataset(
        shard_paths=rd.data_of(trial).shard_paths("train"),
        n_molecules=trial.unique_molecules,
        tokenizer=rd.data_of(trial).tokenizer,
        family=trial.family,
        micro_batch_size=trial.train.micro_batch_size,
        max_seq_len=spec.max_seq_len,
        mlm_probability=trial.mlm_probability or 0.0,  # None: a clm family, which masks nothing
        packing=trial.train.packing,
        length_buckets=trial.train.length_buckets,
        seed=trial.seed if trial.train.seed_data else 0,
        randomized_smiles=spec.randomized_smiles,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=_backend(use_gpu)),
        datasets={"train": train_ds},
        run_config=TrainRunConfig(
            name=trial.trial_id,
            storage_path=str(rd.tune / "train"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train V2 callback; the stubs know V1's
            worker_runtime_env={"env_vars": spec.worker_env},  # type: ignore[call-arg]  # Train V2's RunConfig has it
        ),
    )
    try:
        trainer.fit()
    finally:
        _remove_leftover_placement_group(folder)


def _backend(use_gpu: bool) -> str:
    """NCCL for GPU workers where torch has it; gloo otherwise (also for logical GPUs on a CPU-only torch,
    as on test clusters: Ray would pick NCCL for any GPU request, and a CPU build has none)."""
    import torch.distributed as dist

    return "nccl" if use_gpu and dist.is_nccl_available() else "gloo"


def _remove_leftover_placement_group(folder: TrialDir) -> None:
    """Remove the trial's worker placement group if Ray Train left it behind.

    Seen with ray 2.60 on a 2-CPU cluster: now and then a finished trial's worker placement group
    stays CREATED (its cleaner actor polls the State API and never acts), and the next trial's Ray
    Data tasks, which need one whole free CPU, wait forever. The id comes from the trial's own
    workers, so a concurrent trial's group is never touched.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    pg_id = folder.pop_placement_group()
    if pg_id is not None and ray.util.placement_group_table().get(pg_id, {}).get("state") == "CREATED":
        log.warning(f"[{folder.trial_id}] removing the placement group {pg_id[:8]} Ray Train left behind")
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def _fault_injection(trial_id: str) -> dict[str, str]:
    """The worker env var of engine.train's NaN injection, for the one trial the test names.

    Read on the driver: Ray's worker processes inherit the environment of the cluster, not the driver's.
    """
    from clmscale.engine.train import INJECT_NAN_ENV

    target, _, step = os.environ.get(INJECT_NAN_TRIAL_ENV, "").partition(":")
    return {INJECT_NAN_ENV: step} if target == trial_id else {}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point, on every worker: validate the spec, stream the shard, train.

    Rank 0 also records its placement group (see `_remove_leftover_placement_group`) and appends its
    Ray node id to the trial's `nodes.txt`, so a restart after a node failure shows where it went.
    """
    from ray.train.torch import get_device

    from clmscale.engine import data
    from clmscale.engine.models import build_config
    from clmscale.engine.tokenizer import load_tokenizer
    from clmscale.engine.train import train

    spec = TrialSpec.model_validate(config)
    trial, rd = spec.trial, RunDir(spec.run_dir)
    folder = rd.trial(trial.trial_id)
    if ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            folder.write_placement_group(pg.id.hex())
        folder.append_node(ray.get_runtime_context().get_node_id())
    tokenizer = load_tokenizer(rd.data_of(trial).tokenizer)
    shard = ray.train.get_dataset_shard("train")
    # Ray names a CUDA device for every worker given a GPU, logical ones too (a CPU test cluster's `num_gpus`):
    # torch decides whether there is one
    device = get_device() if torch.cuda.is_available() else torch.device("cpu")
    masking = data.Masking.of(tokenizer, trial.mlm_probability) if trial.mlm_probability is not None else None
    model_config = build_config(trial.family, trial.size, len(tokenizer), spec.max_seq_len, dropout=spec.dropout)
    train(
        trial,
        folder,
        make_batches=lambda epoch: data.worker_batches(shard, epoch, masking, device),  # masked on the device
        val_batches=data.trial_validation_batches(rd, trial, spec.max_seq_len, tokenizer=tokenizer),
        model_config=model_config,
        budget_tokens=spec.budget_tokens,
        train_split_tokens=spec.train_split_tokens,
        views=max(1, spec.randomized_smiles),
        tokenizer_dir=rd.data_of(trial).tokenizer,
        report=DashboardReporter(trial.trial_id, spec.budget_tokens),
        device=device,
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
    """A progress record per trial result (at most one per trial every `every_s`), a line per trial that
    ended; counts the trials that ended, so a Tune run stopped by Ctrl-C can be told from a finished one.

    Records carry `extra={"console": ...}` for engine.console's table (see there); printed plainly they
    read as before."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self.n_ended = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "tokens_per_s" not in result:  # the closing report carries the outcome, not progress
            return
        trial_id = _trial_name(trial)  # Tune overwrites result["trial_id"] with its own id
        now = time.monotonic()
        if now - self._last.get(trial_id, 0.0) < self.every_s:
            return
        self._last[trial_id] = now
        progress = {
            "trial": trial_id,
            "tokens": result.get("n_tokens", 0),
            "budget": result.get("budget_tokens"),
            "loss": result.get("train_loss"),
            "tokens_per_s": result.get("tokens_per_s"),
        }
        log.info(progress_text(trial_id, result), extra={"console": progress})

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = _trial_name(trial)
        log.info(f"[{trial_id}] started", extra={"console": {"trial": trial_id, "state": "started"}})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.n_ended += 1
        trial_id = _trial_name(trial)
        result = RunDir(trial.config["cfg"]["run_dir"]).trial(trial_id).result()
        if result is None:  # cannot be after a normal return of run_trial; said rather than hidden
            log.warning(f"[{trial_id}] ended without a result")
            return
        state = result.status
        text = (
            f"[{trial_id}] {state}: {result.n_tokens:.3g} tokens, loss {result.train_loss:.4f}, "
            f"{len(result.checkpoints)} checkpoints, {result.wall_s:.0f} s"
        )
        (log.warning if state == "diverged" else log.info)(
            text,
            extra={
                "console": {"trial": trial_id, "state": state, "tokens": result.n_tokens, "loss": result.train_loss}
            },
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.n_ended += 1
        trial_id = _trial_name(trial)
        log.error(
            f"[{trial_id}] failed: {_last_error_line(trial)} (traceback in {trial.local_path})",
            extra={"console": {"trial": trial_id, "state": "failed"}},
        )


RAY_WRAPPERS = ("RayTaskError", "WorkerGroupError", "TrainingFailedError", "TuneError", "RayActorError")


def _last_error_line(trial) -> str:
    """The exception line of a failed trial's traceback (the worker's, not Ray's wrappers around it)."""
    try:
        path = trial.error_file  # Tune's local copy; get_error() reads the synced one, maybe not there yet
        text = Path(path).read_text() if path and Path(path).is_file() else str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - the message is a courtesy; the path follows it
        text = ""
    errors = [line.strip() for line in text.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b.*:", line)]
    ours = [line for line in errors if not any(w in line.split(":")[0] for w in RAY_WRAPPERS)]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (ours or errors or lines or ["see its error file"])[-1]


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
    """Prepare if needed, run every trial on the Ray cluster found (or a local one), collect results.

    Trials are handed to Tune by `engine.packing.PackingSearcher`: the largest trial whose whole worker
    group fits the free resources, smaller ones filling the gaps, so a mixed grid runs side by side
    without a trial's workers ever waiting on a sibling's. A trial that ended (its folder holds a
    result) is not run again; one that was running resumes from its folder, with the ZeRO stage and
    micro-batch it started with. On an autoscaling cluster a trial that fits only the grown cluster
    waits for the nodes the autoscaler is asked for (`engine.packing`).
    """
    from clmscale.engine.capacity import ceiling_from_ray
    from clmscale.engine.packing import PackingSearcher, ray_nodes
    from clmscale.engine.prepare import prepare

    rd = RunDir(cfg.run_dir.resolve())
    check_run_dir(cfg, rd, resume)
    if not ray.is_initialized():
        ray.init()
    nodes = ray_nodes()
    cluster_max = cfg.resources.cluster_max
    ceiling = ceiling_from_ray(nodes, None if cluster_max is None else {str(k): v for k, v in cluster_max.items()})
    recorded = rd.trials_by_id() if resume else {}  # what each started trial ran with (trial.json)
    trials = [recorded.get(t.trial_id, t) for t in expand_grid(cfg)]
    check_fits(trials, nodes, ceiling)  # before any write
    rd.write_config(cfg)
    manifest = prepare(cfg.data, rd.data, downstream=cfg.downstream)
    vocab_size = max(rd.data.representation(r).manifest().tokenizer.vocab_size for r in cfg.data.representations())
    trials = resolve_auto(trials, list(ceiling.nodes or nodes), cfg, vocab_size)
    check_fits(trials, nodes, ceiling)  # auto may have raised a trial's workers
    todo = [t for t in trials if rd.trial(t.trial_id).result() is None]
    log.info(
        f"sweep {cfg.name}: {len(trials)} trials ({len(trials) - len(todo)} already ended), packed onto "
        f"{ceiling.text(nodes)}, in {rd.root}",
        extra={
            "console": {
                "trials": [t.trial_id for t in trials],
                "ended": sorted({t.trial_id for t in trials} - {t.trial_id for t in todo}),
            }
        },
    )
    if todo:
        _tune(cfg, rd, todo, manifest, nodes, PackingSearcher, ceiling)
    table = collect_pretrain_table(rd, trials)
    log.info(f"wrote {rd.table_path('pretrain')} ({len(table)} checkpoints)")
    return table


def _tune(
    cfg: SweepConfig,
    rd: RunDir,
    trials: list[Trial],
    manifest: Manifest,
    nodes: list[Node],
    searcher_class,
    ceiling: Ceiling | None = None,
) -> None:
    """Ray Tune over `trials`, admitted by the packing searcher (largest first, by FLOPs within a size)."""
    from clmscale.engine.models import build_config, flops_per_token

    # one read of the train shards' token counts per representation and unique-data size, not one per trial; a
    # pass shows each molecule `views` times (data.randomized_smiles), so an epoch budget counts them all
    by_unique = {(t.representation, t.unique_molecules): t for t in trials}
    tokens_of = {key: pass_tokens(rd, t) for key, t in by_unique.items()}
    views = max(1, cfg.data.randomized_smiles)
    epoch_tokens = [views * tokens_of[t.representation, t.unique_molecules] for t in trials]
    specs = [
        TrialSpec(
            trial=t,
            run_dir=rd.root,
            budget_tokens=token_budget(t, tokens),
            train_split_tokens=tokens,
            randomized_smiles=cfg.data.randomized_smiles,
            max_seq_len=cfg.model.max_seq_len,
            dropout=cfg.model.dropout,
            worker_env=_fault_injection(t.trial_id),
        ).model_dump(mode="json")
        for t, tokens in zip(trials, epoch_tokens, strict=True)
    ]
    costs = [
        flops_per_token(
            build_config(t.family, t.size, rd.data_of(t).manifest().tokenizer.vocab_size, cfg.model.max_seq_len),
            cfg.model.max_seq_len,
        )
        * s["budget_tokens"]
        for t, s in zip(trials, specs, strict=True)
    ]
    from clmscale.engine.packing import ScaleUpTimeout, ray_nodes, request_resources

    grown = ceiling.nodes if ceiling is not None and ceiling.grows else None  # what an autoscaler may add up to
    grows = grown is not None
    try:
        searcher = searcher_class([{"cfg": s} for s in specs], [trial_need(t.resources, TRIAL_CPU) for t in trials],
                                  [t.trial_id for t in trials], nodes, reserved_cpus=DATA_CPUS, costs=costs,
                                  max_concurrent=cfg.resources.max_concurrent_trials,
                                  ceiling=grown, live_nodes=ray_nodes,
                                  request=request_resources if grows else None,
                                  scale_up_timeout_s=cfg.resources.scale_up_timeout_s)  # fmt: skip
    except ValueError as err:
        raise SweepError(str(err)) from None
    previous = sorted(p.name for p in rd.tune.glob("pretrain*")) if rd.tune.exists() else []
    name = "pretrain" if not previous else f"pretrain-{len(previous)}"  # Tune's own records of each (re)start
    progress = ProgressLine()
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": TRIAL_CPU}),
        param_space={},  # the grid comes from the searcher
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=len(specs),
            max_concurrent_trials=len(specs),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(rd.tune),
            callbacks=[progress],
            verbose=0,
            # a trial whose Tune actor dies with its node is started again: it resumes from its folder
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
        ),
    )
    try:
        tuner.fit()
    except Exception as err:  # Tune wraps what the searcher raised
        cause = _cause(err, ScaleUpTimeout)
        if cause is not None:
            raise SweepError(str(cause)) from None
        raise
    finally:
        if grows:
            request_resources([])  # withdraw the request: the autoscaler may scale down again
    if progress.n_ended < len(specs):  # Tune returns normally after a Ctrl-C, with trials still running
        raise SweepInterrupted(f"sweep {cfg.name} interrupted: {progress.n_ended} of {len(specs)} trials ended")


def _cause(err: BaseException | None, kind: type) -> BaseException | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


# ---------------------------------------------------------------------------------------------
# 4. results


def pretrain_rows(rd: RunDir, trial: Trial, result: TrainResult) -> list[dict[str, Any]]:
    """The pretrain.parquet rows of one ended trial: one per checkpoint (paths relative to the run
    directory), or one without a checkpoint for a trial that diverged before its first milestone.
    `annealed` says which rows are (N, D) points (wsd: all; cosine / constant_cooldown: the last)."""
    base = {
        "trial_id": trial.trial_id,
        "family": trial.family,
        "mlm_probability": math.nan if trial.mlm_probability is None else trial.mlm_probability,
        "representation": trial.representation,
        "rung": trial.size.name,
        "seed": trial.seed,
        "n_params": result.n_params,
        "n_params_non_embedding": result.n_params_non_embedding,
        "budget_tokens": result.budget_tokens,
        "unique_molecules": trial.unique_molecules or _train_molecules(rd),
        "status": result.status,
    }
    if not result.checkpoints:
        return [
            {
                **base,
                "checkpoint": None,
                "tokens": result.n_tokens,
                "molecules_seen": math.nan,
                "characters_seen": math.nan,
                "flops": result.flops,
                "annealed": False,
                "epochs": result.epochs,
                "unique_tokens": result.unique_tokens,
                "tokens_spent": result.tokens_spent,
                "flops_spent": result.flops_spent,
                "step": result.n_steps,
                "train_loss": math.nan,
                "val_loss": math.nan,
                "wall_time_s": result.wall_s,
                "tokens_per_s": math.nan,
                "mfu": math.nan,
                "warning": "",
            }
        ]
    folder = rd.trial(trial.trial_id)
    per_token = _seen_per_token(rd, trial)
    return [
        {
            **base,
            "checkpoint": rd.relative(folder.path / ck.path),
            "tokens": ck.n_tokens,
            "molecules_seen": ck.n_tokens * per_token[0],
            "characters_seen": ck.n_tokens * per_token[1],
            "flops": ck.flops,
            "annealed": ck.annealed,
            "epochs": ck.epochs,
            "unique_tokens": ck.unique_tokens,
            "tokens_spent": ck.tokens_spent,
            "flops_spent": ck.flops_spent,
            "step": ck.step,
            "train_loss": ck.train_loss,
            "val_loss": ck.val_loss,
            "wall_time_s": ck.wall_s,
            "tokens_per_s": ck.tokens_per_s,
            "mfu": ck.mfu,
            "warning": ck.warning,
        }
        for ck in result.checkpoints
    ]


def _seen_per_token(rd: RunDir, trial: Trial) -> tuple[float, float]:
    """Molecules and characters per trained token of the trial's pass (its unique molecules, or the train split):
    D in units that do not depend on the representation's tokenizer (data.representation; fits.data_measure).
    Exact at whole passes, pro rata within one. NaN without a prepared data directory (standalone training)."""
    data = rd.data_of(trial)
    if not data.has_manifest():
        return math.nan, math.nan
    n = trial.unique_molecules or data.manifest().counts.train.n_molecules
    tokens = data.pass_tokens(trial.unique_molecules)
    return n / tokens, data.pass_characters(trial.unique_molecules) / tokens


def _train_molecules(rd: RunDir) -> int | None:
    """The train split's size, from the manifest; None for a run directory without one (standalone training)."""
    return rd.manifest().counts.train.n_molecules if rd.data.has_manifest() else None


def collect_pretrain_table(rd: RunDir, trials: list[Trial]) -> pd.DataFrame:
    """One row per checkpoint of every trial that wrote its result; the others are not rows."""
    rows = []
    for t in trials:
        result = rd.trial(t.trial_id).result()
        if result is not None:
            rows += pretrain_rows(rd, t, result)
    table = pd.DataFrame(rows, columns=list(TABLES["pretrain"].columns))
    rd.write_table("pretrain", table)
    return table
