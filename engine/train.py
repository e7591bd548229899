"""Pretraining one trial: a rung of the ladder on a token budget, with DeepSpeed ZeRO, top to bottom.

    train(trial, trial_dir, make_batches, val_batches, model_config) -> TrainResult

runs in every worker (Ray Train or standalone), in this order: process group, model + AdamW +
DeepSpeed engine (`_build_engine`), resume from the latest complete checkpoint (`_resume`, a
`RunState`), then the loop: one optimizer step of micro-batches from `make_batches(epoch)` with
gradient accumulation (`_accumulation_step`), one all-reduce per step for the token count and the
loss, the learning rate as a function of the token fraction, a log record every `log_every_steps`
(`_log_record`), and a checkpoint at each token milestone. The run stops when the budget is spent,
or when the loss stops being finite ("diverged"; no exception).

The trial folder's files (metrics.jsonl, result.json, checkpoints/<n_tokens:012d>/ with their
sha256.json and COMPLETE marker, corrupt ones set aside as <n_tokens>.corrupt) are read and written
through `engine.rundir.TrialDir`; a checkpoint is HF `save_pretrained` (safetensors, fp32) + tokenizer,
so `AutoModelFor{MaskedLM,CausalLM}.from_pretrained(dir)` works, plus `state/` (DeepSpeed
save_checkpoint, trainer_state.json, each rank's RNG) for an exact resume.

Milestones: `checkpoints` = k gives budget / 2^(k-1), ..., budget / 2, budget, so each checkpoint has
twice the tokens of the one before; a checkpoint is taken at the first step whose cumulative token
count reaches a milestone and is named by that count (several milestones crossed in one step give
one checkpoint). Tokens are the non-padding tokens of `input_ids`, over all workers.

Losses are token-weighted means over the positions that carry a label (masked tokens for mlm, next
tokens for clm); the gradient is DeepSpeed's mean of the micro-batches' means. Precision "auto" is
bf16 on CUDA (DeepSpeed keeps fp32 masters; checkpoints get those) and fp32 on CPU. MFU is the
model FLOPs of the molecules per second over (peak * workers), and `mfu_padded` the same for the
FLOPs of the padded batches (`engine.models.batch_cost`), with peaks from `engine.models.PEAK_FLOPS`:
NaN on CPU and on GPUs not in the table (null in the JSON files, which never hold NaN). C (`flops`)
stays flops_per_token(max_seq_len) * tokens, the scaling laws' compute axis.

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
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedConfig, PreTrainedModel

from engine.config import LADDER, ResourcesConfig, TrainConfig, Trial
from engine.models import (
    SPECIAL_IDS,
    build_config,
    build_model,
    count_params,
    family_of,
    flops_per_token,
    batch_cost,
    mfu,
    model_inputs,
    n_loss_tokens,
    peak_flops,
)
from engine.files import json_safe
from engine.rundir import DS_TAG, CheckpointInfo, TrainResult, TrialDir

logger = logging.getLogger(__name__)

INJECT_NAN_ENV = "CLMSCALE_INJECT_NAN_AT_STEP"
N_STATS = 5  # per-step sums all-reduced over workers: tokens, loss sum, loss tokens, FLOPs padded, FLOPs real

# ---------------------------------------------------------------------------------------------
# schedule and milestones: plain functions of the config


def lr_at(fraction: float, cfg: TrainConfig) -> float:
    """Learning rate at a fraction of the token budget: linear warmup, then cosine to
    lr_min_ratio * lr, or constant with a linear cooldown over the last cooldown_fraction."""
    fraction = min(max(fraction, 0.0), 1.0)
    floor = cfg.lr_min_ratio * cfg.lr
    if fraction < cfg.warmup_fraction:
        return cfg.lr * fraction / cfg.warmup_fraction
    if cfg.schedule == "cosine":
        progress = (fraction - cfg.warmup_fraction) / (1 - cfg.warmup_fraction)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    cooldown_start = 1 - cfg.cooldown_fraction
    if fraction <= cooldown_start or cfg.cooldown_fraction == 0:
        return cfg.lr
    return cfg.lr - (cfg.lr - floor) * (fraction - cooldown_start) / cfg.cooldown_fraction


def milestones(budget_tokens: int, n_checkpoints: int) -> list[int]:
    """budget / 2^(k-1), ..., budget / 2, budget: log-spaced, doubling, the last at the budget."""
    return sorted({max(1, budget_tokens >> (n_checkpoints - 1 - i)) for i in range(n_checkpoints)})


def log_metrics(metrics: dict) -> None:
    """The default `report`: one log line per record."""
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


# ---------------------------------------------------------------------------------------------
# where a run stands


@dataclass
class RunState:
    """A run's position: fresh, or where its latest sound checkpoint left it; the loop moves it on."""

    step: int = 0
    n_tokens: int = 0
    epoch: int = 0  # the data epoch of the last micro-batch consumed (by this rank)
    n_consumed: int = 0  # micro-batches of that epoch consumed (by this rank)
    wall_s: float = 0.0  # training time before this (re)start
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    set_aside: list[dict] = field(default_factory=list)  # corrupt checkpoints renamed on the way back


@dataclass(frozen=True)
class _Run:
    """What one run needs at every step and does not change: computed once, after the engine."""

    trial_id: str
    cfg: TrainConfig
    model_config: PreTrainedConfig
    family: str
    budget: int
    grad_accum: int
    world: int
    rank: int
    manual_clip: bool  # stage 0 in fp32: DeepSpeed hands back the bare optimizer and we clip ourselves
    flops_per_token: float
    peak: float  # FLOP/s of all workers together (NaN: MFU unknown)
    pad_id: int
    inject_nan_at: int  # fault injection (tests): the optimizer step whose loss becomes NaN, 0 = never


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
    tokenizer_dir: Path | None = None,
    report: Callable[[dict], None] = log_metrics,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Pretrain `trial` until `budget_tokens` (default `trial.budget_tokens`) tokens are seen.

    Runs on every rank of the current process group, or alone after making a one-process group.
    `make_batches(epoch)` yields this worker's micro-batches (docs/CONTRACTS.md), the same ones for
    the same epoch; `val_batches` are the fixed validation batches, evaluated whole on every rank.
    `report(metrics)` is called on every rank with the same (global) numbers, as Ray Train V2's
    `ray.train.report` requires. Resumes from the latest complete checkpoint in `trial_dir`.
    """
    cfg = trial.train
    if cfg.zero_stage == "auto" or cfg.micro_batch_size == "auto":
        raise ValueError(f"trial {trial.trial_id}: zero_stage and micro_batch_size must be concrete here (got "
                         f"{cfg.zero_stage!r}, {cfg.micro_batch_size!r}); engine.plan.choose resolves auto, as the sweep does")
    folder = trial_dir if isinstance(trial_dir, TrialDir) else TrialDir(Path(trial_dir))
    budget = budget_tokens if budget_tokens is not None else trial.budget_tokens
    if budget is None or budget <= 0:
        raise ValueError(f"trial {trial.trial_id}: a positive budget_tokens is needed (got {budget})")
    _check_config_matches(trial, model_config)

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
    deepspeed = _import_deepspeed(device)
    run = _Run(
        trial_id=trial.trial_id, cfg=cfg, model_config=model_config, family=family_of(model_config), budget=budget,
        grad_accum=cfg.batch_size // (cfg.micro_batch_size * world), world=world, rank=rank,
        manual_clip=cfg.zero_stage == 0 and not bf16,
        flops_per_token=flops_per_token(model_config, max_seq_len_of(model_config)),
        peak=peak_flops(device, bf16) * world, pad_id=model_config.pad_token_id,
        inject_nan_at=int(os.environ.get(INJECT_NAN_ENV, "0") or 0),
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
        status, diverged_at = _loop(engine, run, state, folder, make_batches, val_batches, hf_copy, report)

    last = state.checkpoints[-1] if state.checkpoints else None
    n_params = count_params(model_config)
    result = TrainResult(
        trial_id=trial.trial_id,
        status=status,
        n_steps=state.step,
        n_tokens=state.n_tokens,
        budget_tokens=budget,
        n_params=n_params.total,
        n_params_non_embedding=n_params.non_embedding,
        flops=run.flops_per_token * state.n_tokens,
        train_loss=math.nan if status == "diverged" else (last.train_loss if last else math.nan),
        val_loss=last.val_loss if last else math.nan,
        wall_s=state.wall_s,
        checkpoints=state.checkpoints,
        diverged_at_step=diverged_at,
    )
    if rank == 0:
        folder.write_result(result)
    if status == "diverged":
        logger.warning("trial %s diverged at step %d (non-finite loss)", trial.trial_id, diverged_at)
    _barrier()
    # the last report carries the outcome: under Ray Train only reports reach the driver
    summary = {k: v for k, v in asdict(result).items() if k != "checkpoints"}
    report({**summary, "step": state.step, "done": True})
    return result


def _loop(engine, run: _Run, state: RunState, folder: TrialDir, make_batches, val_batches, hf_copy, report):
    """Optimizer steps until the budget is spent or the loss is not finite; moves `state` on.

    Returns (status, the step that diverged or None). `state.wall_s` ends as the total training time.
    """
    todo = [m for m in milestones(run.budget, run.cfg.checkpoints) if m > state.n_tokens]
    stream = _micro_batches(make_batches, state.epoch, state.n_consumed)
    wall_before, t_start = state.wall_s, time.perf_counter()
    window = _Window(torch.zeros(N_STATS, dtype=torch.float64, device=engine.device), time.perf_counter())
    engine.train()
    status, diverged_at = "finished", None
    while state.n_tokens < run.budget:
        stats = _accumulation_step(engine, run, state, stream)
        if run.world > 1:
            dist.all_reduce(stats)  # sums over workers
        step_tokens, loss_sum, *_ = stats.tolist()  # note: a CPU-GPU sync point per step
        if not math.isfinite(loss_sum):
            status, diverged_at = "diverged", state.step + 1
            break
        lr = lr_at((state.n_tokens + step_tokens) / run.budget, run.cfg)  # the fraction reached after this step
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        if run.manual_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), run.cfg.grad_clip or math.inf)
        engine.step()
        if not run.manual_clip:
            grad_norm = engine.get_global_grad_norm()
        state.step += 1
        state.n_tokens += int(step_tokens)
        window.add(stats)

        crossed = bool(todo) and state.n_tokens >= todo[0]
        if crossed or state.step % run.cfg.log_every_steps == 0:
            state.wall_s = wall_before + time.perf_counter() - t_start
            record = _log_record(run, state, window, lr, grad_norm)
            if crossed:
                while todo and state.n_tokens >= todo[0]:
                    todo.pop(0)
                info = _save_checkpoint(engine, folder, record, run, (state.epoch, state.n_consumed), val_batches,
                                        hf_copy)
                record |= {"val_loss": info.val_loss, "checkpoint": info.path}
                state.checkpoints.append(info)
            if run.rank == 0:
                folder.append_metrics(record)
            report(record)
            window.reset()  # after the checkpoint: its time is not training time
    state.wall_s = wall_before + time.perf_counter() - t_start
    return status, diverged_at


def _accumulation_step(engine, run: _Run, state: RunState, stream: Iterator[tuple[int, int, dict]]) -> torch.Tensor:
    """Forward and backward of grad_accum micro-batches (DeepSpeed counts them; the caller steps at the
    boundary). Returns this worker's `N_STATS` sums on the device, as float64: tokens, loss sum, loss
    tokens, FLOPs of the padded batches and FLOPs of the molecules alone (`engine.models.batch_cost`)."""
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=engine.device)
    for micro in range(run.grad_accum):
        state.epoch, state.n_consumed, batch = next(stream)
        cost = batch_cost(batch, run.model_config)  # on the CPU, before the batch moves
        stats[3] += cost.flops_padded  # python scalars: no host-to-device copy
        stats[4] += cost.flops_real
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        loss = engine(**model_inputs(batch, run.model_config)).loss
        if state.step + 1 == run.inject_nan_at and micro == 0:
            loss = loss * math.nan
        n_loss = n_loss_tokens(batch["labels"], run.family)
        n_in = (batch["input_ids"] != run.pad_id).sum()
        stats[:3] += torch.stack([n_in.double(), loss.detach().double() * n_loss, n_loss.double()])
        engine.backward(loss)
        if micro < run.grad_accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    return stats


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


def _log_record(run: _Run, state: RunState, window: _Window, lr: float, grad_norm: Any) -> dict:
    """One metrics.jsonl record: the window's mean loss and throughput, the schedule, C so far.

    `mfu` counts the model FLOPs of the molecules (real tokens, each attending to its own); `mfu_padded`
    what the kernels ran (padding and attention across packed molecules included)."""
    elapsed = time.perf_counter() - window.started
    w_tokens, w_loss, w_loss_tokens, w_flops_padded, w_flops_real = window.sums.tolist()
    tokens_per_s = w_tokens / elapsed
    return {
        "trial_id": run.trial_id,
        "step": state.step,
        "n_tokens": state.n_tokens,
        "budget_tokens": run.budget,
        "epoch": state.epoch,
        "train_loss": w_loss / w_loss_tokens if w_loss_tokens else math.nan,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "wall_s": state.wall_s,
        "step_s": elapsed / window.n_steps,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(w_flops_real, elapsed, run.peak),
        "mfu_padded": mfu(w_flops_padded, elapsed, run.peak),
        "flops": run.flops_per_token * state.n_tokens,
    }


def _build_engine(deepspeed, run: _Run, seed: int, device: torch.device, bf16: bool):
    """The model (seeded init), AdamW with decay on matrices only, and the DeepSpeed engine around them."""
    cfg = run.cfg
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
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,  # we log ourselves
    }
    model = model.to(device)  # type: ignore[arg-type]  # transformers' stubs type `.to` for dtypes only
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    if run.world == 1 and cfg.zero_stage == 0:
        # alone, the gradient all-reduce is an identity that still flattens and copies every
        # gradient (~20% of a small model's step on CPU); DeepSpeed has this switch for such cases
        engine.enable_backward_allreduce = False
    return engine


def _record_restart(folder: TrialDir, trial_id: str, state: RunState) -> None:
    """Rank 0, on (re)start: drop the crashed run's tail of metrics.jsonl, then record the events."""
    folder.truncate_metrics(state.step)
    for event in state.set_aside:  # after the truncation, which would drop them
        folder.append_metrics({"trial_id": trial_id, **event})
    if state.step:  # the record of a restart (worker failure, --resume): `status` and the tests read it
        folder.append_metrics({"trial_id": trial_id, "event": "resumed", "step": state.step,
                               "n_tokens": state.n_tokens})


def max_seq_len_of(config: PreTrainedConfig) -> int:
    """The longest sequence the model takes (RoBERTa's position table has pad_token_id + 1 extra rows)."""
    if family_of(config) == "mlm":
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.n_positions


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

    The group we make is kept for the life of the process: DeepSpeed caches it in module globals,
    so destroying it would break the next engine.
    """
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


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
) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches consumed in that epoch, batch) forever, epoch after epoch; the first `n_skip`
    batches of the first epoch were consumed before a resume and are skipped."""
    while True:
        n_seen = 0
        for batch in itertools.islice(make_batches(epoch), n_skip, None):
            n_seen += 1
            yield epoch, n_skip + n_seen, batch
        if n_skip + n_seen == 0:
            raise ValueError(f"make_batches({epoch}) yielded no batches")
        epoch, n_skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def _evaluate(engine, val_batches: Sequence[dict], config: PreTrainedConfig) -> float:
    """Token-weighted mean loss over the fixed validation batches (every rank runs them all, which
    ZeRO-3's collective forward needs anyway)."""
    family, device = family_of(config), engine.device
    engine.eval()
    loss_sum, n = 0.0, 0
    for batch in val_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n_loss = int(n_loss_tokens(batch["labels"], family))
        if n_loss:
            loss_sum += float(engine(**model_inputs(batch, config)).loss) * n_loss
            n += n_loss
    engine.train()
    return loss_sum / n if n else math.nan


# ---------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(
    engine,
    folder: TrialDir,
    record: dict,
    run: _Run,
    position: tuple[int, int],
    val_batches: Sequence[dict],
    hf_copy: _HFCopy | None,
) -> CheckpointInfo:
    """Collective: every rank calls it. Returns the checkpoint's summary (the same on every rank)."""
    path = folder.checkpoint(record["n_tokens"])
    if run.rank == 0:
        folder.new_checkpoint(record["n_tokens"])  # a half-written one from a crash is cleared first
    _barrier()

    val_loss = _evaluate(engine, val_batches, run.model_config)
    engine.save_checkpoint(str(folder.state_dir(path)), tag=DS_TAG, save_latest=False)
    params = _full_fp32_params(engine)  # collective; the values only on rank 0
    rng = {"torch": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    torch.save(rng, folder.rng_file(path, run.rank))
    positions: list = [None] * run.world
    dist.all_gather_object(positions, position)

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
    )
    if hf_copy is not None:  # rank 0's
        hf_copy.save(path, params)
        folder.write_trainer_state(path, {
            "step": record["step"],
            "n_tokens": record["n_tokens"],
            "wall_s": record["wall_s"],
            "world_size": run.world,
            "data_position": [{"epoch": e, "n_consumed": c} for e, c in positions],  # per rank
            "budget_tokens": run.budget,
            "record": record,
            "checkpoint": asdict(info),
        })
        folder.seal(path)  # every rank's files are on disk: each saved its part before the all_gather above
    _barrier()
    logger.info("checkpoint %s (val_loss %.4f)", path, val_loss)
    return info


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
    """Load the latest sound checkpoint into the engine; return where the run stands.

    Rank 0 clears half-written checkpoints, sets corrupt ones aside (renamed `<name>.corrupt`) and tells
    the others which one to load, so every rank resumes from the same checkpoint.
    """
    _barrier()  # everyone is here before rank 0 changes the folder
    decision: list = [None]
    if run.rank == 0:
        folder.remove_incomplete_checkpoints()
        found, events = folder.set_aside_corrupt(folder.checkpoints())
        for event in events:
            logger.warning("%s: %d file(s) fail the sha256 check (%s); set aside as %s", event["checkpoint"],
                           len(event["files"]), ", ".join(event["files"][:3]), event["kept_as"])
        decision = [(found, events)]
    dist.broadcast_object_list(decision, src=0)
    found, events = decision[0]
    if not found:
        return RunState(set_aside=events)
    path = found[-1]
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
    load_path, _ = engine.load_checkpoint(str(folder.state_dir(path)), tag=DS_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"{folder.state_dir(path)}: DeepSpeed could not load the checkpoint")
    rng = torch.load(folder.rng_file(path, run.rank), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and engine.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], engine.device)
    position = saved["data_position"][run.rank]
    logger.info("resuming from %s (step %d, %d tokens)", path, saved["step"], saved["n_tokens"])
    return RunState(
        step=saved["step"],
        n_tokens=saved["n_tokens"],
        epoch=position["epoch"],
        n_consumed=position["n_consumed"],
        wall_s=saved["wall_s"],
        checkpoints=[CheckpointInfo(**folder.trainer_state(p)["checkpoint"]) for p in found],
        set_aside=events,
    )



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
    ids = SPECIAL_IDS[family]
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
        if family == "clm":
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
    parser.add_argument("--family", choices=["mlm", "clm"], default="mlm")
    parser.add_argument("--size", default="xxs", choices=list(LADDER))
    parser.add_argument("--budget-tokens", type=float, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=40)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--checkpoints", type=int, default=2)
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
