"""Pretraining one trial: a rung of the ladder on a token budget, with DeepSpeed ZeRO, top to bottom.

    train(trial, trial_dir, make_batches, val_batches, model_config) -> TrainResult

runs in every worker (Ray Train or standalone), in this order: process group, model + AdamW +
DeepSpeed engine (`_build_engine`), resume (`_resume`, a `RunState`), then the schedule: optimizer
steps (`_steps_until`) of micro-batches from `make_batches(epoch)` with gradient accumulation
(`_accumulation_step`), one all-reduce per step for the token count and the loss, the learning rate
as a function of the tokens seen, a log record every `log_every_steps` (`_log_record`), and a
checkpoint at each token milestone. The run stops when the budget is spent, or when the loss stops
being finite ("diverged"; no exception).

Schedules. cosine and constant_cooldown (`_decay_schedule`): one schedule over the budget, so only
the last checkpoint is annealed (`CheckpointInfo.annealed`); the others are mid-schedule. wsd
(`_wsd_schedule`; warmup-stable-decay, Hagele et al. 2024, MiniCPM): the main run stays at the peak
after its warmup; when it reaches (1 - cooldown_fraction) of a milestone it saves its stable state
(`stable/<milestone>/`), runs a cooldown branch (linear or 1-sqrt down to lr_min_ratio * lr) that
ends at the milestone, which is that D's checkpoint, then reloads the stable state (weights,
optimizer, RNG, data position) and goes on. Every wsd checkpoint is annealed; a branch reads the data
that follow its stable state, which the main run then reads again, so a branch's model has seen the
first D tokens of the stream, as a run of budget D would. C (`flops`) of a point is that of its D;
the compute the run spent, branches included, is `tokens_spent` / `flops_spent`.

The trial folder's files (metrics.jsonl, result.json, checkpoints/<n_tokens:012d>/ with their
sha256.json and COMPLETE marker, corrupt ones set aside as <n_tokens>.corrupt, stable/<milestone:012d>/)
are read and written through `engine.rundir.TrialDir`; a checkpoint is HF `save_pretrained`
(safetensors, fp32) + tokenizer, so `AutoModelFor{MaskedLM,CausalLM}.from_pretrained(dir)` works, plus
`state/trainer_state.json`; cosine / constant_cooldown checkpoints also hold DeepSpeed's state and each
rank's RNG in `state/` for an exact resume, wsd keeps those in its stable state instead (the newest
only) and resumes from there, redoing a branch whose checkpoint is not sealed.

Milestones: `checkpoints` = k gives budget / 2^(k-1), ..., budget / 2, budget, so each checkpoint has
twice the tokens of the one before; a checkpoint is taken at the first step whose cumulative token
count reaches a milestone and is named by that count (several milestones crossed in one step give
one checkpoint). Tokens are the non-padding tokens of `input_ids`, over all workers. Given the train
split's size (`train_split_tokens`), each checkpoint records its epochs and unique tokens, and a
warning past MAX_EPOCHS.

Losses are token-weighted means over the positions that carry a label (masked tokens for mlm, next
tokens for clm), computed in fp32 from the logits (`lm_loss`) whatever the precision; the gradient
is DeepSpeed's mean of the micro-batches' means. Precision "auto" is bf16 on CUDA (DeepSpeed keeps
fp32 masters; checkpoints get those) and fp32 on CPU. MFU is the model FLOPs of the molecules per
second over (peak * workers), and `mfu_padded` the same for the FLOPs of the padded batches
(`engine.models.batch_cost`), with peaks from `engine.models.PEAK_FLOPS`: NaN on CPU and on GPUs not
in the table (null in the JSON files, which never hold NaN). C (`flops`) stays
flops_per_token(max_seq_len) * tokens, the scaling laws' compute axis.

Fault injection (tests only): CLMSCALE_INJECT_NAN_AT_STEP=k makes the loss of optimizer step k
(1-based) NaN.

No ray and no rdkit here; deepspeed is imported inside `train`, after DS_ACCELERATOR is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from transformers import PreTrainedConfig, PreTrainedModel

from clmscale.engine.config import LADDER, ResourcesConfig, TrainConfig, Trial
from clmscale.engine.files import json_safe
from clmscale.engine.ladder import FAMILIES, Family, objective
from clmscale.engine.models import (
    SPECIAL_IDS,
    batch_cost,
    build_config,
    build_model,
    count_params,
    family_of,
    flops_per_token,
    mfu,
    model_inputs,
    n_loss_tokens,
    peak_flops,
)
from clmscale.engine.rundir import DS_TAG, CheckpointInfo, TrainResult, TrialDir

logger = logging.getLogger(__name__)

INJECT_NAN_ENV = "CLMSCALE_INJECT_NAN_AT_STEP"
N_STATS = 5  # per-step sums all-reduced over workers: tokens, loss sum, loss tokens, FLOPs padded, FLOPs real
MAX_EPOCHS = 4.0  # past this many passes, repeated data is worth much less than new (Muennighoff et al. 2023)

# ---------------------------------------------------------------------------------------------
# schedule and milestones: plain functions of the config


def lr_at(fraction: float, cfg: TrainConfig) -> float:
    """Learning rate at a fraction of the token budget: linear warmup, then cosine to
    lr_min_ratio * lr, or constant with a cooldown over the last cooldown_fraction, or (wsd, the
    main run) constant: its cooldowns are branches (`cooldown_lr`)."""
    fraction = min(max(fraction, 0.0), 1.0)
    floor = cfg.lr_min_ratio * cfg.lr
    if fraction < cfg.warmup_fraction:
        return cfg.lr * fraction / cfg.warmup_fraction
    if cfg.schedule == "cosine":
        progress = (fraction - cfg.warmup_fraction) / (1 - cfg.warmup_fraction)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    cooldown_start = 1 - cfg.cooldown_fraction
    if cfg.schedule == "wsd" or fraction <= cooldown_start or cfg.cooldown_fraction == 0:
        return cfg.lr
    return cooldown_lr((fraction - cooldown_start) / cfg.cooldown_fraction, cfg.lr, cfg)


def cooldown_lr(progress: float, start_lr: float, cfg: TrainConfig) -> float:
    """From `start_lr` at progress 0 to lr_min_ratio * lr at 1: linear, or 1-sqrt (Hagele et al. 2024,
    which decays faster at first and beats linear in their cooldown ablations)."""
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.lr_min_ratio * cfg.lr
    done = progress if cfg.cooldown_shape == "linear" else math.sqrt(progress)
    return floor + (start_lr - floor) * (1 - done)


def milestones(budget_tokens: int, n_checkpoints: int) -> list[int]:
    """budget / 2^(k-1), ..., budget / 2, budget: log-spaced, doubling, the last at the budget."""
    return sorted({max(1, budget_tokens >> (n_checkpoints - 1 - i)) for i in range(n_checkpoints)})


def branch_start(milestone: int, cfg: TrainConfig) -> int:
    """wsd: the token count where `milestone`'s cooldown branch leaves the stable run, so that the
    branch (cooldown_fraction of the milestone's tokens) ends at the milestone."""
    return round((1 - cfg.cooldown_fraction) * milestone)


def anneals(cfg: TrainConfig) -> bool:
    """Whether the schedule decays at all: its annealed checkpoints end at the floor below the peak."""
    return cfg.lr_min_ratio < 1 and (cfg.schedule != "constant_cooldown" or cfg.cooldown_fraction > 0)


def data_use(n_tokens: int, train_split_tokens: int | None, views: int = 1) -> tuple[float, float, str]:
    """(epochs, unique tokens, warning) at `n_tokens`: passes over the train split, tokens of distinct
    molecules (all of the split once it has been seen whole), and a warning past MAX_EPOCHS. `views`: each pass
    shows every molecule that many times (data.randomized_smiles, in `train_split_tokens` already); a molecule's
    tokens count once in the unique tokens however it is spelled (conservative: a new atom order is not new data)."""
    if not train_split_tokens:
        return math.nan, math.nan, ""
    epochs = n_tokens / train_split_tokens
    warning = (
        (
            f"{epochs:.2f} epochs over the train split ({train_split_tokens:,} tokens): past {MAX_EPOCHS:g}, "
            "repeated tokens are worth less than new ones (Muennighoff et al. 2023)"
        )
        if epochs > MAX_EPOCHS
        else ""
    )
    return epochs, float(min(n_tokens, train_split_tokens / views)), warning


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, family: str) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (-100: none), computed in fp32 whatever the logits'
    dtype: a bf16 loss is rounded by ~0.4 %, more than the differences a scaling fit reads. clm
    and llama predict the next token, so their labels shift left by one, as the HF models do inside."""
    if objective(family) == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
    )


def log_metrics(metrics: dict) -> None:
    """The default `report`: one log line per record."""
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


# ---------------------------------------------------------------------------------------------
# where a run stands


@dataclass
class RunState:
    """A run's position: fresh, or where its latest sound checkpoint (wsd: stable state) left it; the
    loop moves it on."""

    step: int = 0
    n_tokens: int = 0  # tokens the model in the engine has seen (in a wsd branch: its stable state's + the branch's)
    epoch: int = 0  # the data epoch of the last micro-batch consumed (by this rank)
    n_consumed: int = 0  # micro-batches of that epoch consumed (by this rank)
    wall_s: float = 0.0  # training time before this (re)start
    tokens_spent: int = 0  # every token processed, cooldown branches included (never rewound)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    set_aside: list[dict] = field(default_factory=list)  # corrupt checkpoints renamed on the way back
    done_branches: set[int] = field(default_factory=set)  # wsd: milestones whose branch needs no (re)run
    at_stable: int | None = None  # wsd: the milestone whose saved stable state the engine holds right now


@dataclass(frozen=True)
class _Run:
    """What one run needs at every step and does not change: computed once, after the engine."""

    trial_id: str
    cfg: TrainConfig
    model_config: PreTrainedConfig
    family: Family
    budget: int
    milestones: tuple[int, ...]
    train_split_tokens: int | None  # the train split's size in tokens (epochs, unique tokens); None: unknown
    views: int  # times each pass shows every molecule (data.randomized_smiles; 1: once, canonical)
    grad_accum: int
    world: int
    rank: int
    manual_clip: bool  # stage 0 in fp32: DeepSpeed hands back the bare optimizer and we clip ourselves
    flops_per_token: float
    peak: float  # FLOP/s of all workers together (NaN: MFU unknown)
    pad_id: int
    inject_nan_at: int  # fault injection (tests): the optimizer step whose loss becomes NaN, 0 = never
    fixed_width: int = 0  # train.compile: every batch padded to this width (one shape, one graph); 0 = as collated


@dataclass
class _Loop:
    """The loop's moving parts, shared by the phases of a schedule: the engine, the position, the data
    stream (replaced when a wsd run goes back to a stable state), the log window and the clock."""

    engine: Any
    run: _Run
    state: RunState
    folder: TrialDir
    make_batches: Callable[[int], Iterable[dict]]
    val_batches: Sequence[dict]
    hf_copy: _HFCopy | None
    report: Callable[[dict], None]
    stream: Generator[tuple[int, int, dict], None, None]  # closed to end the data pass
    window: _Window
    wall_before: float
    t_start: float
    last: tuple[float, Any] = (math.nan, None)  # the lr and grad norm of the last step
    diverged_at: int | None = None
    # the first step whose loss was not finite (0: none), kept on the device: read only at log points
    # and before a save, so no step waits for the GPU; `unchecked` rolls the counters back to it
    first_bad: torch.Tensor | None = None
    unchecked: list[tuple[int, int, int]] = field(default_factory=list)  # (step, n_tokens, tokens_spent) before it

    def clock(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start


# ---------------------------------------------------------------------------------------------
# the run


def train(
    trial: Trial,
    trial_dir: Path | TrialDir,
    make_batches: Callable[[int], Iterable[dict]],
    val_batches: Sequence[dict],
    model_config: PreTrainedConfig,
    *,
    budget_tokens: int | None = None,
    train_split_tokens: int | None = None,
    views: int = 1,
    tokenizer_dir: Path | None = None,
    report: Callable[[dict], None] = log_metrics,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Pretrain `trial` until `budget_tokens` (default `trial.budget_tokens`) tokens are seen.

    Runs on every rank of the current process group, or alone after making a one-process group.
    `make_batches(epoch)` yields this worker's micro-batches (docs/CONTRACTS.md), the same ones for
    the same epoch; `val_batches` are the fixed validation batches, evaluated whole on every rank.
    `train_split_tokens` is the train split's size in the tokens the run counts (the sweep's
    manifest; with `views` > 1, data.randomized_smiles, one pass shows each molecule `views` times and
    `train_split_tokens` counts them all), for each checkpoint's epochs and unique tokens (NaN without it).
    `report(metrics)` is called on every rank with the same (global) numbers, as Ray Train V2's
    `ray.train.report` requires. Resumes from the latest complete checkpoint in `trial_dir`
    (wsd: the latest stable state).
    """
    cfg = trial.train
    if cfg.zero_stage == "auto" or cfg.micro_batch_size == "auto":
        raise ValueError(
            f"trial {trial.trial_id}: zero_stage and micro_batch_size must be concrete here (got "
            f"{cfg.zero_stage!r}, {cfg.micro_batch_size!r}); engine.plan.choose resolves auto,"
            " as the sweep does"
        )
    folder = trial_dir if isinstance(trial_dir, TrialDir) else TrialDir(Path(trial_dir))
    budget = budget_tokens if budget_tokens is not None else trial.budget_tokens
    if budget is None or budget <= 0:
        raise ValueError(f"trial {trial.trial_id}: a positive budget_tokens is needed (got {budget})")
    if train_split_tokens is not None and train_split_tokens <= 0:
        raise ValueError(f"trial {trial.trial_id}: train_split_tokens must be positive (got {train_split_tokens})")
    _check_config_matches(trial, model_config)
    _check_branches_span_a_step(trial, budget, model_config)

    # ---- process group and device --------------------------------------------------------------
    device = _resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(
            f"trial {trial.trial_id}: train.batch_size must be a multiple of micro_batch_size * workers "
            f"(got batch_size: {cfg.batch_size}, micro_batch_size: {cfg.micro_batch_size}, workers: {world})"
        )
    if world != trial.resources.workers:
        logger.warning("trial %s planned %d workers, runs on %d", trial.trial_id, trial.resources.workers, world)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    grad_accum = cfg.batch_size // (cfg.micro_batch_size * world)
    if bf16 and cfg.zero_stage == 0 and grad_accum > 1:  # what config.Trial refuses, where it could not know
        raise ValueError(
            f"{trial.trial_id}: bf16 on {device} at zero_stage 0 would accumulate gradients in bf16 over {grad_accum} "
            f"micro-steps of {world} worker(s) (DeepSpeed 0.19 accumulates bf16 in fp32 only under ZeRO); use "
            "zero_stage: 1, micro_batch_size: batch_size / workers, or precision: fp32"
        )
    deepspeed = _import_deepspeed(device)
    run = _Run(
        trial_id=trial.trial_id,
        cfg=cfg,
        model_config=model_config,
        family=family_of(model_config),
        budget=budget,
        milestones=tuple(milestones(budget, cfg.checkpoints)),
        train_split_tokens=train_split_tokens,
        views=views,
        grad_accum=grad_accum,
        world=world,
        rank=rank,
        manual_clip=cfg.zero_stage == 0 and not bf16,
        flops_per_token=flops_per_token(model_config, max_seq_len_of(model_config)),
        peak=peak_flops(device, bf16) * world,
        pad_id=model_config.pad_token_id,
        inject_nan_at=int(os.environ.get(INJECT_NAN_ENV, "0") or 0),
        fixed_width=max_seq_len_of(model_config) if cfg.compile else 0,
    )

    # the dropout RNG is seeded per rank, inside a fork so the caller's RNG is left alone
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ExitStack() as cleanup:
        torch.manual_seed(trial.seed * 1_000_003 + rank)
        engine = _build_engine(deepspeed, run, trial.seed, device, bf16)
        cleanup.callback(engine.destroy)  # ZeRO's hooks and buffers go with it, even after an error
        hf_copy = _HFCopy(model_config, tokenizer_dir) if rank == 0 else None
        state = _resume(engine, folder, run)
        if rank == 0:
            _record_restart(folder, trial.trial_id, state)
        loop = _Loop(
            engine=engine,
            run=run,
            state=state,
            folder=folder,
            make_batches=make_batches,
            val_batches=val_batches,
            hf_copy=hf_copy,
            report=report,
            stream=_micro_batches(make_batches, state.epoch, state.n_consumed),
            window=_Window(torch.zeros(N_STATS, dtype=torch.float64, device=engine.device), time.perf_counter()),
            wall_before=state.wall_s,
            t_start=time.perf_counter(),
        )
        cleanup.callback(lambda: loop.stream.close())  # ends the data pass (Ray Data: the split's epoch)
        engine.train()
        finished = _wsd_schedule(loop) if cfg.schedule == "wsd" else _decay_schedule(loop)
        state.wall_s = loop.clock()
    status: Literal["finished", "diverged"] = "finished" if finished else "diverged"

    last = state.checkpoints[-1] if state.checkpoints else None
    # a finished wsd run ends at its last branch's end (a rerun of a finished one stands at its stable state)
    at = last if finished and last is not None else None
    n_tokens, n_steps = (at.n_tokens, at.step) if at else (state.n_tokens, state.step)
    tokens_spent = at.tokens_spent if at and at.tokens_spent is not None else state.tokens_spent
    epochs, unique_tokens, _ = data_use(n_tokens, train_split_tokens, views)
    n_params = count_params(model_config)
    result = TrainResult(
        trial_id=trial.trial_id,
        status=status,
        n_steps=n_steps,
        n_tokens=n_tokens,
        budget_tokens=budget,
        n_params=n_params.total,
        n_params_non_embedding=n_params.non_embedding,
        flops=run.flops_per_token * n_tokens,
        train_loss=math.nan if status == "diverged" else (last.train_loss if last else math.nan),
        val_loss=last.val_loss if last else math.nan,
        wall_s=state.wall_s,
        checkpoints=state.checkpoints,
        diverged_at_step=loop.diverged_at,
        tokens_spent=tokens_spent,
        flops_spent=run.flops_per_token * tokens_spent,
        epochs=epochs,
        unique_tokens=unique_tokens,
        train_split_tokens=train_split_tokens,
    )
    if rank == 0:
        folder.write_result(result)
    if status == "diverged":
        logger.warning("trial %s diverged at step %d (non-finite loss)", trial.trial_id, loop.diverged_at)
    _barrier()
    # the last report carries the outcome: under Ray Train only reports reach the driver
    summary = {k: v for k, v in asdict(result).items() if k != "checkpoints"}
    report({**summary, "step": n_steps, "done": True})
    return result


def _decay_schedule(loop: _Loop) -> bool:
    """cosine / constant_cooldown: one schedule over the budget, a checkpoint at each milestone, only
    the last one annealed. False if the loss stopped being finite."""
    run, state = loop.run, loop.state
    for milestone in run.milestones:
        if state.n_tokens >= milestone:  # done before a resume, or crossed in the step of the one before
            continue
        if not _steps_until(loop, milestone, lambda n: lr_at(n / run.budget, run.cfg)):
            return False
        crossed = max(m for m in run.milestones if m <= state.n_tokens)  # several in one step: one checkpoint
        _save_checkpoint(loop, crossed, annealed=crossed == run.milestones[-1] and anneals(run.cfg))
    return True


def _wsd_schedule(loop: _Loop) -> bool:
    """wsd: the stable run at the peak lr; at (1 - cooldown_fraction) of each milestone it saves its
    state, branches off a cooldown that ends at the milestone (that D's checkpoint, annealed), then
    goes back to the saved state and on. False if the loss stopped being finite.

    A branch reads the data that follow its stable state, the same the stable run then reads again:
    a branch's model has seen exactly the first D tokens of the stream, as a run of budget D would.
    That takes a `make_batches` that repeats an epoch when asked again (synthetic and fixed batches
    do); the Ray Data stream reshuffles at every pass (engine.data.worker_batches), so there the rewind
    skips the same number of batches of a fresh shuffle, as a resume does: the same amount of data,
    not the same molecules.
    """
    run, state = loop.run, loop.state
    for i, milestone in enumerate(run.milestones):
        if milestone in state.done_branches:
            continue
        start = branch_start(milestone, run.cfg)
        if not _steps_until(loop, start, lambda n: lr_at(n / run.budget, run.cfg)):
            return False
        stable = loop.folder.stable(milestone)
        snapshot = (state.step, state.n_tokens, state.epoch, state.n_consumed)
        if state.at_stable != milestone:  # not resumed right here
            _save_stable(loop, milestone)
        peak, branch_from = lr_at(state.n_tokens / run.budget, run.cfg), state.n_tokens
        length = max(1, milestone - branch_from)
        # at least one step, even when the step that reached the branch's start also passed its milestone
        end = max(milestone, branch_from + 1)
        # B023: _steps_until calls the schedule only before it returns, within this iteration
        if not _steps_until(
            loop,
            end,
            lambda n: cooldown_lr((n - branch_from) / length, peak, run.cfg),  # noqa: B023
            branch=milestone,
        ):
            return False
        _save_checkpoint(loop, milestone, annealed=anneals(run.cfg), optimizer_state=False)
        state.done_branches.add(milestone)
        if i < len(run.milestones) - 1:
            _back_to_stable(loop, stable, milestone, snapshot)
    return True


def _steps_until(loop: _Loop, stop_tokens: int, lr_of: Callable[[int], float], branch: int | None = None) -> bool:
    """Optimizer steps until the model has seen `stop_tokens` tokens; a log record every log_every_steps.
    `lr_of(n)` is the learning rate of a step that brings the count to n. False if the loss is not finite.
    The step that reaches `stop_tokens` is not logged here: the caller logs it with what it saves.

    No step reads the device (issue 16): tokens are counted on the host from the CPU batches, the loss
    sums stay on the device, and whether a loss was non-finite is read at log points and before the
    caller saves (`_finite_so_far`), from where the first such step is rolled back to exactly. With
    several workers the step's token count is summed over them, which one small read per step needs.
    """
    engine, run, state = loop.engine, loop.run, loop.state
    if loop.first_bad is None:
        loop.first_bad = torch.zeros((), dtype=torch.int64, device=engine.device)
    while state.n_tokens < stop_tokens:
        stats, step_tokens = _accumulation_step(engine, run, state, loop.stream)
        if run.world > 1:
            dist.all_reduce(stats)  # sums over workers
            step_tokens = int(stats[0].item())  # the global count every rank's schedule needs
        bad = ~torch.isfinite(stats[1]) & (loop.first_bad == 0)
        loop.first_bad = torch.where(bad, torch.full_like(loop.first_bad, state.step + 1), loop.first_bad)
        loop.unchecked.append((state.step, state.n_tokens, state.tokens_spent))
        lr = lr_of(state.n_tokens + step_tokens)  # the count reached after this step
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        if run.manual_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), run.cfg.grad_clip or math.inf)
        engine.step()
        if not run.manual_clip:
            grad_norm = engine.get_global_grad_norm()
        state.step += 1
        state.n_tokens += step_tokens
        state.tokens_spent += step_tokens
        state.at_stable = None
        loop.window.add(stats)
        loop.last = (lr, grad_norm)
        if state.n_tokens < stop_tokens and state.step % run.cfg.log_every_steps == 0:
            if not _finite_so_far(loop):
                return False
            _log(loop, _log_record(loop, branch))
    return _finite_so_far(loop)


def _finite_so_far(loop: _Loop) -> bool:
    """Whether every loss since the last check was finite (one read of the device). If not, the run
    diverged at the first such step: the counters go back to just before it, as if it had stopped there."""
    first_bad = int(loop.first_bad.item()) if loop.first_bad is not None else 0  # note: a sync, once per window
    if first_bad:
        step, n_tokens, tokens_spent = next(u for u in loop.unchecked if u[0] == first_bad - 1)
        loop.state.step, loop.state.n_tokens, loop.state.tokens_spent = step, n_tokens, tokens_spent
        loop.diverged_at = first_bad
    loop.unchecked.clear()
    return not first_bad


def _log(loop: _Loop, record: dict) -> None:
    """Rank 0 appends the record to metrics.jsonl; every rank reports it; the window starts again."""
    if loop.run.rank == 0:
        loop.folder.append_metrics(record)
    loop.report(record)
    loop.window.reset()  # after any save: its time is not training time


def _accumulation_step(
    engine, run: _Run, state: RunState, stream: Iterator[tuple[int, int, dict]]
) -> tuple[torch.Tensor, int]:
    """Forward and backward of grad_accum micro-batches (DeepSpeed counts them; the caller steps at the
    boundary). Returns this worker's `N_STATS` sums on the device, as float64 (tokens, loss sum, loss
    tokens, FLOPs of the padded batches and of the molecules alone: `engine.models.batch_cost`), and its
    token count, taken on the host before the batches moved: nothing here waits for the device."""
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=engine.device)
    n_tokens = 0
    for micro in range(run.grad_accum):
        state.epoch, state.n_consumed, batch = next(stream)
        cost = batch_cost(batch, run.model_config)  # on the CPU, before the batch moves
        n_in = int((batch["input_ids"] != run.pad_id).sum())
        n_tokens += n_in
        stats[0] += n_in  # python scalars: no host-to-device copy
        stats[3] += cost.flops_padded
        stats[4] += cost.flops_real
        if run.fixed_width:
            batch = _to_width(batch, run.fixed_width, run.pad_id)
        batch = _to_device(batch, engine.device)
        loss = _batch_loss(engine, batch, run.model_config, run.family)
        if state.step + 1 == run.inject_nan_at and micro == 0:
            loss = loss * math.nan
        n_loss = n_loss_tokens(batch["labels"], run.family)
        stats[1:3] += torch.stack([loss.detach().double() * n_loss, n_loss.double()])
        engine.backward(loss)
        if micro < run.grad_accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    return stats, n_tokens


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """To the device without waiting: from pinned host memory, so the copy overlaps the compute."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _to_width(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows padded to `width` (train.compile: one shape, so one compiled graph): pad tokens, no attention,
    no labels, position 0. Padding changes no loss: it carries no label and no row attends to it."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "position_ids": 0}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill.get(k, 0)) for k, v in batch.items()}


def _batch_loss(engine, batch: dict[str, torch.Tensor], config: PreTrainedConfig, family: str) -> torch.Tensor:
    """The model's forward without its own loss (bf16 under DeepSpeed's bf16), then `lm_loss` in fp32."""
    inputs = model_inputs(batch, config)
    labels = inputs.pop("labels")
    return lm_loss(engine(**inputs).logits, labels, family)


@dataclass
class _Window:
    """Sums since the last log record (the `N_STATS` step sums, on the device), steps, start time."""

    sums: torch.Tensor
    started: float
    n_steps: int = 0

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats
        self.n_steps += 1

    def reset(self) -> None:
        self.sums.zero_()
        self.n_steps = 0
        self.started = time.perf_counter()


def _log_record(loop: _Loop, branch: int | None = None) -> dict:
    """One metrics.jsonl record: the window's mean loss and throughput, the schedule, C so far. wsd
    records say their phase (`stable`, or `cooldown` with the `branch`'s milestone).

    `mfu` counts the model FLOPs of the molecules (real tokens, each attending to its own); `mfu_padded`
    what the kernels ran (padding and attention across packed molecules included)."""
    run, state, window = loop.run, loop.state, loop.window
    state.wall_s = loop.clock()
    lr, grad_norm = loop.last
    elapsed = time.perf_counter() - window.started
    w_tokens, w_loss, w_loss_tokens, w_flops_padded, w_flops_real = window.sums.tolist()
    tokens_per_s = w_tokens / elapsed
    record = {
        "trial_id": run.trial_id,
        "step": state.step,
        "n_tokens": state.n_tokens,
        "budget_tokens": run.budget,
        "epoch": state.epoch,
        "train_loss": w_loss / w_loss_tokens if w_loss_tokens else math.nan,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "wall_s": state.wall_s,
        "step_s": elapsed / window.n_steps if window.n_steps else math.nan,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(w_flops_real, elapsed, run.peak),
        "mfu_padded": mfu(w_flops_padded, elapsed, run.peak),
        "flops": run.flops_per_token * state.n_tokens,
        "tokens_spent": state.tokens_spent,
    }
    if run.cfg.schedule == "wsd":
        record |= {"phase": "stable"} if branch is None else {"phase": "cooldown", "branch": branch}
    return record


def _build_engine(deepspeed, run: _Run, seed: int, device: torch.device, bf16: bool):
    """The model (seeded init), AdamW with decay on matrices only, and the DeepSpeed engine around them."""
    cfg = run.cfg
    assert cfg.zero_stage != "auto"  # train() refuses auto settings before the engine is built
    model = build_model(run.model_config, seed=seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings, as nanoGPT
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        fused=device.type == "cuda",
    )
    ds_config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        # stage 0 in fp32 hands back the bare AdamW and clips without keeping the norm: we clip instead
        "gradient_clipping": 0.0 if run.manual_clip else cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW is not on DeepSpeed's list
        # bf16 needs no loss scaling, so no overflow check (an all-reduce and a host read per step);
        # under ZeRO gradients accumulate in fp32 over the micro-steps. DeepSpeed 0.19 has no fp32
        # accumulation for bf16 without ZeRO, so config.Trial refuses bf16 at stage 0 with grad_accum > 1
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 and cfg.zero_stage >= 1 else {}),
        "steps_per_print": 2**62,  # we log ourselves
    }
    model = model.to(device)  # type: ignore[arg-type]  # transformers' stubs type `.to` for dtypes only
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    if run.world == 1 and cfg.zero_stage == 0:
        # alone, the gradient all-reduce is an identity that still flattens and copies every
        # gradient (~20% of a small model's step on CPU); DeepSpeed has this switch for such cases
        engine.enable_backward_allreduce = False
    if cfg.compile:
        engine.compile(compile_kwargs={"dynamic": False})  # fixed shapes (`_to_width`): one graph
    return engine


def _record_restart(folder: TrialDir, trial_id: str, state: RunState) -> None:
    """Rank 0, on (re)start: drop the crashed run's tail of metrics.jsonl, then record the events."""
    folder.truncate_metrics(state.step, keep_branches=state.done_branches)  # a finished branch's records stay
    for event in state.set_aside:  # after the truncation, which would drop them
        folder.append_metrics({"trial_id": trial_id, **event})
    if state.step:  # the record of a restart (worker failure, --resume): `status` and the tests read it
        folder.append_metrics(
            {"trial_id": trial_id, "event": "resumed", "step": state.step, "n_tokens": state.n_tokens}
        )


def max_seq_len_of(config: PreTrainedConfig) -> int:
    """The longest sequence the model takes (RoBERTa's position table has pad_token_id + 1 extra rows)."""
    family = family_of(config)
    if family == "mlm":
        return config.max_position_embeddings - config.pad_token_id - 1
    if family == "clm":
        return config.n_positions
    return config.max_position_embeddings  # llama, modernbert: RoPE, no table; what build_config was given


# ---------------------------------------------------------------------------------------------
# setup


def _check_config_matches(trial: Trial, config: PreTrainedConfig) -> None:
    size = trial.size
    got = (family_of(config), config.num_hidden_layers, config.hidden_size, config.num_attention_heads)
    want = (trial.family, size.n_layer, size.d_model, size.n_head)
    if got != want:
        raise ValueError(
            f"trial {trial.trial_id}: model_config (family, n_layer, d_model, n_head) = {got} "
            f"does not match the trial's {want}"
        )


def _check_branches_span_a_step(trial: Trial, budget: int, config: PreTrainedConfig) -> None:
    """wsd: the shortest cooldown branch must hold more tokens than one optimizer step can bring, or a
    branch could end without a step of its own (two milestones would then share one checkpoint)."""
    cfg = trial.train
    if cfg.schedule != "wsd":
        return
    first = milestones(budget, cfg.checkpoints)[0]
    branch_tokens, step_tokens = first - branch_start(first, cfg), cfg.batch_size * max_seq_len_of(config)
    if branch_tokens <= step_tokens:
        raise ValueError(
            f"trial {trial.trial_id}: the first wsd cooldown branch is {branch_tokens} tokens (cooldown_fraction "
            f"{cfg.cooldown_fraction} of the first milestone, {first} = budget {budget} / 2^{cfg.checkpoints - 1}), "
            f"not more than one optimizer step brings (batch_size {cfg.batch_size} x max_seq_len "
            f"{max_seq_len_of(config)} = {step_tokens}); use fewer checkpoints, a larger budget or cooldown_fraction"
        )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else this worker's GPU (LOCAL_RANK among the visible ones), else the CPU.
    Under Ray, pass `ray.train.torch.get_device()`: Ray decides which GPUs a worker sees."""
    device = torch.device(device) if device is not None else None
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    if device is None or (device.type == "cuda" and device.index is None):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)
    return device


def _init_process_group(device: torch.device) -> None:
    """Reuse the group Ray Train (or torchrun) made; otherwise make a one-process one.

    torchrun's environment (WORLD_SIZE > 1 and MASTER_ADDR) is joined with `env://`. The one-process
    group rendezvouses through an in-memory store: no port is chosen, so none can be taken by another
    process between choosing and binding, and no MASTER_PORT is left in the environment for a child
    process to collide with. The group is kept for the life of the process: DeepSpeed caches it in
    module globals, so destroying it would break the next engine.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
        return
    for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed's engine reads LOCAL_RANK from the environment
        os.environ.setdefault(key, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _import_deepspeed(device: torch.device):
    """Import deepspeed for this device. On CPU: DS_ACCELERATOR=cpu (read at import), and skip the
    JIT build of the shared-memory all-reduce op (30-75 s of g++; unused with gloo)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device.type:
        raise RuntimeError(
            f"deepspeed was imported for accelerator '{get_accelerator().device_name()}' but training runs "
            f"on '{device}'; set DS_ACCELERATOR={device.type} before importing deepspeed"
        )
    if device.type == "cpu":
        comm: Any = importlib.import_module("deepspeed.comm.torch")
        comm.build_shm_op = lambda: None
    return deepspeed


def _barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# data


def _micro_batches(
    make_batches: Callable[[int], Iterable[dict]], epoch: int, n_skip: int
) -> Generator[tuple[int, int, dict], None, None]:
    """(epoch, batches consumed in that epoch, batch) forever, epoch after epoch; the first `n_skip`
    batches of the first epoch were consumed before a resume (or a wsd branch) and are skipped.
    Closing it closes the epoch's iterator too (a Ray Data pass ends when its iterator does)."""
    while True:
        n_seen = 0
        batches = iter(make_batches(epoch))
        try:
            for batch in itertools.islice(batches, n_skip, None):
                n_seen += 1
                yield epoch, n_skip + n_seen, batch
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if n_skip + n_seen == 0:
            raise ValueError(f"make_batches({epoch}) yielded no batches")
        epoch, n_skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def _evaluate(engine, val_batches: Sequence[dict], config: PreTrainedConfig) -> float:
    """Token-weighted mean loss (fp32, `lm_loss`) over the fixed validation batches (every rank runs
    them all, which ZeRO-3's collective forward needs anyway)."""
    family, device = family_of(config), engine.device
    engine.eval()
    loss_sum, n = 0.0, 0
    for batch in val_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n_loss = int(n_loss_tokens(batch["labels"], family))
        if n_loss:
            loss_sum += float(_batch_loss(engine, batch, config, family)) * n_loss
            n += n_loss
    engine.train()
    return loss_sum / n if n else math.nan


# ---------------------------------------------------------------------------------------------
# checkpoints and wsd's stable states


def _save_checkpoint(loop: _Loop, milestone: int, *, annealed: bool, optimizer_state: bool = True) -> None:
    """Collective: every rank calls it. The checkpoint of the step just taken, named by its token count:
    HF weights + tokenizer, trainer_state.json, and (optimizer_state) the DeepSpeed state and RNG a
    resume loads. Appends its summary to `state.checkpoints` (the same on every rank) and logs it."""
    engine, run, state, folder = loop.engine, loop.run, loop.state, loop.folder
    record = _log_record(loop, milestone if run.cfg.schedule == "wsd" else None)
    path = folder.checkpoint(record["n_tokens"])
    if run.rank == 0:
        folder.new_checkpoint(record["n_tokens"])  # a half-written one from a crash is cleared first
    _barrier()

    val_loss = _evaluate(engine, loop.val_batches, run.model_config)
    positions = _save_state(engine, folder, path, run, state) if optimizer_state else _positions(run, state)
    params = _full_fp32_params(engine)  # collective; the values only on rank 0
    epochs, unique_tokens, warning = data_use(record["n_tokens"], run.train_split_tokens, run.views)
    info = CheckpointInfo(
        n_tokens=record["n_tokens"],
        path=str(path.relative_to(folder.path)),
        step=record["step"],
        val_loss=val_loss,
        train_loss=record["train_loss"],
        flops=record["flops"],
        wall_s=record["wall_s"],
        tokens_per_s=record["tokens_per_s"],
        mfu=record["mfu"],
        annealed=annealed,
        epochs=epochs,
        unique_tokens=unique_tokens,
        tokens_spent=state.tokens_spent,
        flops_spent=run.flops_per_token * state.tokens_spent,
        milestone=milestone,
        warning=warning,
    )
    if loop.hf_copy is not None:  # rank 0's
        loop.hf_copy.save(path, params)
        folder.write_trainer_state(
            path, _trainer_state(run, state, record, positions, milestone) | {"checkpoint": asdict(info)}
        )
        folder.seal(path)  # every rank's files are on disk: each saved its part before the all_gather
    _barrier()
    if warning:
        logger.warning("trial %s, checkpoint %s: %s", run.trial_id, path.name, warning)
    logger.info("checkpoint %s (val_loss %.4f)", path, val_loss)
    state.checkpoints.append(info)
    _log(loop, record | {"val_loss": val_loss, "checkpoint": info.path})


def _save_stable(loop: _Loop, milestone: int) -> None:
    """Collective. wsd: the stable run's state where `milestone`'s branch leaves it (stable/<milestone>),
    sealed before the branch starts, so a crash in the branch redoes it from here; older ones go."""
    engine, run, state, folder = loop.engine, loop.run, loop.state, loop.folder
    path = folder.stable(milestone)
    # the record of the step that reached it (none when no step was taken since the last record)
    record = _log_record(loop) | {"stable_state": str(path.relative_to(folder.path))} if loop.window.n_steps else None
    state.wall_s = loop.clock()
    if run.rank == 0:
        folder.new_stable(milestone)
    _barrier()
    positions = _save_state(engine, folder, path, run, state)
    if run.rank == 0:
        folder.write_trainer_state(path, _trainer_state(run, state, record, positions, milestone))
        folder.seal(path)
        folder.remove_stable_before(milestone)
    _barrier()
    state.at_stable = milestone
    if record is not None:
        _log(loop, record)


def _back_to_stable(loop: _Loop, path: Path, milestone: int, snapshot: tuple[int, int, int, int]) -> None:
    """wsd, after a branch: the engine, RNG and data stream as `_save_stable` left them; the tokens
    spent and the clock go on."""
    state = loop.state
    _load_state(loop.engine, loop.folder, path, loop.run)
    state.step, state.n_tokens, state.epoch, state.n_consumed = snapshot
    loop.stream.close()  # ends the data pass the branch read (Ray Data: the split's epoch)
    loop.stream = _micro_batches(loop.make_batches, state.epoch, state.n_consumed)
    state.at_stable = milestone
    loop.window.reset()


def _trainer_state(run: _Run, state: RunState, record: dict | None, positions: list, milestone: int) -> dict:
    """state/trainer_state.json: where the run stands, as a resume needs it."""
    return {
        "step": state.step,
        "n_tokens": state.n_tokens,
        "tokens_spent": state.tokens_spent,
        "wall_s": state.wall_s,
        "world_size": run.world,
        "data_position": [{"epoch": e, "n_consumed": c} for e, c in positions],  # per rank
        "budget_tokens": run.budget,
        "schedule": run.cfg.schedule,
        "milestone": milestone,
        "record": record,
    }


def _save_state(engine, folder: TrialDir, path: Path, run: _Run, state: RunState) -> list[tuple[int, int]]:
    """Collective: DeepSpeed's state and this rank's RNG into path/state/; returns every rank's data position."""
    engine.save_checkpoint(str(folder.state_dir(path)), tag=DS_TAG, save_latest=False)
    rng = {"torch": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    torch.save(rng, folder.rng_file(path, run.rank))
    return _positions(run, state)


def _positions(run: _Run, state: RunState) -> list[tuple[int, int]]:
    """Collective: every rank's data position (epoch, micro-batches of it consumed), by rank. Gathered
    after each rank has written its files, so rank 0 seals only complete folders."""
    positions: list = [None] * run.world
    dist.all_gather_object(positions, (state.epoch, state.n_consumed))
    return positions


def _load_state(engine, folder: TrialDir, path: Path, run: _Run) -> None:
    """Collective: the DeepSpeed state and this rank's RNG that `_save_state` wrote."""
    load_path, _ = engine.load_checkpoint(str(folder.state_dir(path)), tag=DS_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"{folder.state_dir(path)}: DeepSpeed could not load the checkpoint")
    rng = torch.load(folder.rng_file(path, run.rank), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and engine.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], engine.device)


class _HFCopy:
    """Rank 0's fp32 CPU model and tokenizer, which each checkpoint's `save_pretrained` writes from.
    The model is built at the first checkpoint and reused: a second full copy only while saving."""

    def __init__(self, config: PreTrainedConfig, tokenizer_dir: Path | None):
        from transformers import AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else None
        self.model: PreTrainedModel | None = None

    def save(self, path: Path, params: list[torch.Tensor]) -> None:
        if self.model is None:
            self.model = build_model(self.config)
        with torch.no_grad():
            for p, value in zip(self.model.parameters(), params, strict=True):
                p.copy_(value)
        self.model.save_pretrained(path)  # safetensors
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


def _full_fp32_params(engine) -> list[torch.Tensor]:
    """The fp32 master value of every parameter, in `named_parameters` order, on CPU (rank 0).

    Collective under ZeRO (each rank holds a slice). With bf16 the model holds bf16 copies and the
    fp32 masters live in the optimizer; that is what the HF copy gets.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):  # stage 0 + bf16
        for low, high in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True):
            masters.update({id(p): h for p, h in zip(low, high, strict=True)})
    values = []
    for _, p in engine.module.named_parameters():
        value = safe_get_full_fp32_param(p)  # ZeRO 1-3: gathers the slices; None without ZeRO
        if value is None:
            value = masters.get(id(p), p)
        if dist.get_rank() == 0:
            values.append(value.detach().float().cpu())
    return values


def _resume(engine, folder: TrialDir, run: _Run) -> RunState:
    """Load where the run left off into the engine; return where it stands.

    Rank 0 clears half-written checkpoints and stable states, sets corrupt ones aside (renamed
    `<name>.corrupt`) and tells the others what it found, so every rank resumes from the same one.
    cosine / constant_cooldown resume from the latest sound checkpoint; wsd from its latest sound
    stable state (or from scratch without one), its branch redone unless that checkpoint is sound.
    """
    wsd = run.cfg.schedule == "wsd"
    _barrier()  # everyone is here before rank 0 changes the folder
    decision: list = [None]
    if run.rank == 0:
        folder.remove_incomplete_checkpoints()
        found, events = folder.set_aside_corrupt(folder.checkpoints())
        stable: list[Path] = []
        if wsd:
            stable, stable_events = folder.set_aside_corrupt(folder.stable_states())
            back_to = f"stable/{stable[-1].name}" if stable else None  # what a wsd run resumes from
            events = [e | {"resumed_from": back_to} for e in events] + stable_events
        for event in events:
            logger.warning(
                "%s: %d file(s) fail the sha256 check (%s); set aside as %s",
                event["checkpoint"],
                len(event["files"]),
                ", ".join(event["files"][:3]),
                event["kept_as"],
            )
        decision = [(found, stable, events)]
    dist.broadcast_object_list(decision, src=0)
    found, stable, events = decision[0]
    if wsd:
        return _resume_wsd(engine, folder, run, found, stable, events)
    if not found:
        return RunState(set_aside=events)
    path = found[-1]
    saved = _checked_trainer_state(folder, path, run)
    _load_state(engine, folder, path, run)
    position = saved["data_position"][run.rank]
    logger.info("resuming from %s (step %d, %d tokens)", path, saved["step"], saved["n_tokens"])
    return RunState(
        step=saved["step"],
        n_tokens=saved["n_tokens"],
        epoch=position["epoch"],
        n_consumed=position["n_consumed"],
        wall_s=saved["wall_s"],
        tokens_spent=saved.get("tokens_spent", saved["n_tokens"]),
        checkpoints=[CheckpointInfo(**folder.trainer_state(p)["checkpoint"]) for p in found],
        set_aside=events,
    )


def _resume_wsd(
    engine, folder: TrialDir, run: _Run, found: list[Path], stable: list[Path], events: list[dict]
) -> RunState:
    """wsd: back to the latest stable state S (milestone m). Every branch before m is done (S exists
    only once the one before was sealed); m's is done if its checkpoint is sound. Without a stable
    state the run starts over, rewriting its checkpoints as it goes (they come out the same)."""
    if not stable:
        return RunState(set_aside=events)
    path = stable[-1]
    saved = _checked_trainer_state(folder, path, run)
    _load_state(engine, folder, path, run)
    milestone = saved["milestone"]
    infos = [CheckpointInfo(**folder.trainer_state(p)["checkpoint"]) for p in found]
    infos = [c for c in infos if c.milestone is not None and c.milestone <= milestone]
    done = {c.milestone for c in infos if c.milestone is not None}  # all of them, by the filter above
    lost = [m for m in run.milestones if m < milestone and m not in done]
    if lost:  # their stable states are gone: a run from scratch would be needed to redo them
        logger.warning(
            "trial %s: the checkpoints of milestones %s are missing and cannot be redone from "
            "stable/%s; the result goes without them",
            run.trial_id,
            lost,
            path.name,
        )
    own = next((c for c in infos if c.milestone == milestone), None)  # this stable state's branch, if done
    position = saved["data_position"][run.rank]
    logger.info(
        "resuming from %s (step %d, %d tokens; its branch %s)",
        path,
        saved["step"],
        saved["n_tokens"],
        "done" if own else "to run",
    )
    return RunState(
        step=saved["step"],
        n_tokens=saved["n_tokens"],
        epoch=position["epoch"],
        n_consumed=position["n_consumed"],
        wall_s=own.wall_s if own else saved["wall_s"],
        tokens_spent=own.tokens_spent if own and own.tokens_spent is not None else saved["tokens_spent"],
        checkpoints=infos,
        set_aside=events,
        done_branches=done | set(lost),
        at_stable=milestone,
    )


def _checked_trainer_state(folder: TrialDir, path: Path, run: _Run) -> dict:
    """The trainer state a resume starts from, refused when it belongs to another kind of run."""
    saved = folder.trainer_state(path)
    if saved["world_size"] != run.world:
        raise ValueError(
            f"{path}: checkpoint was written by {saved['world_size']} workers, this run has {run.world}; "
            f"each worker's data stream would differ, so it cannot resume exactly"
        )
    if saved.get("budget_tokens") not in (None, run.budget):
        raise ValueError(
            f"{path}: checkpoint belongs to a run with budget_tokens {saved['budget_tokens']}, "
            f"this run has {run.budget}; the learning-rate schedule would differ"
        )
    if saved.get("schedule") not in (None, run.cfg.schedule):
        raise ValueError(
            f"{path}: checkpoint belongs to a run with schedule {saved['schedule']}, this run has {run.cfg.schedule}"
        )
    return saved


# ---------------------------------------------------------------------------------------------
# synthetic data and the standalone smoke test


def synthetic_batches(
    family: str,
    epoch: int,
    *,
    n_batches: int,
    micro_batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int = 0,
    mlm_probability: float = 0.15,
) -> list[dict]:
    """Batches in the docs/CONTRACTS.md format with Zipf-distributed tokens of varying length, so a
    model's loss falls quickly (towards the unigram entropy); deterministic per (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    ids = SPECIAL_IDS[objective(family)]
    first = 7  # the vocabulary starts after the seven special tokens
    weights = 1.0 / torch.arange(1, vocab_size - first + 1, dtype=torch.float64)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(seq_len // 2, seq_len - 1, (micro_batch_size,), generator=g)
        input_ids = torch.full((micro_batch_size, seq_len), ids["pad_token_id"], dtype=torch.long)
        for row, n in enumerate(lengths.tolist()):
            body = first + torch.multinomial(weights, n, replacement=True, generator=g)
            input_ids[row, 0], input_ids[row, n + 1] = ids["bos_token_id"], ids["eos_token_id"]
            input_ids[row, 1 : n + 1] = body
        attention_mask = (input_ids != ids["pad_token_id"]).long()
        if objective(family) == "clm":
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        else:
            body_mask = attention_mask.bool() & (input_ids != ids["bos_token_id"]) & (input_ids != ids["eos_token_id"])
            masked = (torch.rand(input_ids.shape, generator=g) < mlm_probability) & body_mask
            masked[:, 1] = True  # at least one loss position per row
            labels = input_ids.masked_fill(~masked, -100)
            input_ids = input_ids.masked_fill(masked, 4)  # [MASK]
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def smoke_trial(
    family: str = "mlm",
    size: str = "xxs",
    budget_tokens: int = 20_000,
    seed: int = 0,
    **train_overrides: Any,
) -> Trial:
    """A Trial for tests and the smoke test, without a sweep file."""
    defaults = dict(batch_size=8, micro_batch_size=4, lr=3e-3, log_every_steps=5, checkpoints=2, zero_stage=0)
    return Trial(
        trial_id=f"smoke_{family}_{size}",
        family=family,
        size=LADDER[size],
        budget_tokens=budget_tokens,
        budget_epochs=None,
        seed=seed,
        train=TrainConfig(**{**defaults, **train_overrides}),
        resources=ResourcesConfig(workers=1),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Standalone pretraining run on synthetic batches (no Ray, no RDKit).")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU-sized run (the defaults below)")
    parser.add_argument("--family", choices=list(FAMILIES), default="mlm")
    parser.add_argument("--size", default="xxs", choices=list(LADDER))
    parser.add_argument("--budget-tokens", type=float, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=40)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "constant_cooldown", "wsd"])
    parser.add_argument("--log-every-steps", type=int, default=5)
    parser.add_argument("--batches-per-epoch", type=int, default=50)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="trial folder (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    trial = smoke_trial(
        args.family,
        args.size,
        int(args.budget_tokens),
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        zero_stage=args.zero_stage,
        precision=args.precision,
        checkpoints=args.checkpoints,
        schedule=args.schedule,
        log_every_steps=args.log_every_steps,
    )
    config = build_config(args.family, trial.size, args.vocab_size, args.seq_len)
    data = dict(micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size)
    val = synthetic_batches(args.family, -1, n_batches=2, **data)  # epoch -1: never a training epoch
    out = args.out or Path(tempfile.mkdtemp(prefix="clmscale-smoke-"))

    def make_batches(epoch: int) -> list[dict]:
        return synthetic_batches(args.family, epoch, n_batches=args.batches_per_epoch, **data)

    result = train(trial, out, make_batches, val, config, device=args.device)
    json.dump(json_safe(result), sys.stdout, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
