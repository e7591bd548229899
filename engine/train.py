"""Pretraining one trial: a rung of the ladder on a token budget, with DeepSpeed ZeRO, top to bottom.

    train(trial, trial_dir, make_batches, val_batches, model_config) -> TrainResult

runs in every worker (Ray Train or standalone), in this order: process group, model + AdamW +
DeepSpeed engine, resume from the latest complete checkpoint, then the loop: micro-batches from
`make_batches(epoch)` with gradient accumulation, one all-reduce per optimizer step for the token
count and the loss, the learning rate as a function of the token fraction, a log record every
`log_every_steps`, and a checkpoint at each token milestone. The run stops when the budget is spent,
or when the loss stops being finite ("diverged"; no exception).

trial_dir/
    metrics.jsonl                      one record per log point / checkpoint (rank 0)
    result.json                        the TrainResult
    checkpoints/<n_tokens:012d>/       save_pretrained (safetensors, fp32) + tokenizer, so that
                                       AutoModelFor{MaskedLM,CausalLM}.from_pretrained(dir) works
        state/                         DeepSpeed save_checkpoint (tag "ds"), trainer_state.json,
                                       rank_<r>.pt (that worker's RNG states)
        sha256.json                    sha256 of every file above, by relative path (corruption checks)
        COMPLETE                       written last: a checkpoint without it is ignored and replaced
    checkpoints/<n_tokens>.corrupt/    a checkpoint that failed its sha256 check on resume, set aside
                                       (kept, never deleted); the run resumes from the one before it

Milestones: `checkpoints` = k gives budget / 2^(k-1), ..., budget / 2, budget, so each checkpoint has
twice the tokens of the one before; a checkpoint is taken at the first step whose cumulative token
count reaches a milestone and is named by that count (several milestones crossed in one step give
one checkpoint). Tokens are the non-padding tokens of `input_ids`, over all workers.

Losses are token-weighted means over the positions that carry a label (masked tokens for mlm, next
tokens for clm); the gradient is DeepSpeed's mean of the micro-batches' means. Precision "auto" is
bf16 on CUDA (DeepSpeed keeps fp32 masters; checkpoints get those) and fp32 on CPU. MFU is
flops_per_token * tokens/s / (peak * workers) with peaks from `PEAK_FLOPS`: NaN on CPU and on GPUs
not in the table (null in the JSON files, which never hold NaN).

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
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from transformers import PreTrainedConfig

from engine.config import LADDER, ResourcesConfig, TrainConfig, Trial
from engine.rundir import sha256_file
from engine.models import (
    SPECIAL_IDS,
    build_config,
    build_model,
    count_params,
    family_of,
    flops_per_token,
    model_inputs,
    peak_flops,
)

logger = logging.getLogger(__name__)

INJECT_NAN_ENV = "CLMSCALE_INJECT_NAN_AT_STEP"
DS_TAG = "ds"  # DeepSpeed's sub-folder of state/: one checkpoint per milestone folder, so one tag

# ---------------------------------------------------------------------------------------------
# what a run returns


@dataclass
class CheckpointInfo:
    n_tokens: int  # D at this checkpoint
    path: str  # relative to the trial folder: checkpoints/<n_tokens:012d>
    step: int
    val_loss: float
    train_loss: float  # mean over the log window that ends here
    flops: float  # C = flops_per_token * n_tokens
    wall_s: float
    tokens_per_s: float
    mfu: float


@dataclass
class TrainResult:
    trial_id: str
    status: Literal["finished", "diverged"]
    n_steps: int
    n_tokens: int  # D: tokens seen, >= budget_tokens when finished
    budget_tokens: int
    n_params: int
    n_params_non_embedding: int  # N of the scaling laws
    flops: float
    train_loss: float
    val_loss: float  # at the last checkpoint
    wall_s: float
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    diverged_at_step: int | None = None


# ---------------------------------------------------------------------------------------------
# schedule, milestones, MFU: plain functions of the config


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
# the run


def train(
    trial: Trial,
    trial_dir: Path,
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
    trial_dir = Path(trial_dir)
    budget = budget_tokens if budget_tokens is not None else trial.budget_tokens
    if budget is None or budget <= 0:
        raise ValueError(f"trial {trial.trial_id}: a positive budget_tokens is needed (got {budget})")
    _check_config_matches(trial, model_config)
    family = family_of(model_config)

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
    grad_accum = cfg.batch_size // (cfg.micro_batch_size * world)
    if world != trial.resources.workers:
        logger.warning("trial %s planned %d workers, runs on %d", trial.trial_id, trial.resources.workers, world)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    deepspeed = _import_deepspeed(device)

    # the dropout RNG is seeded per rank, inside a fork so the caller's RNG is left alone
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ExitStack() as cleanup:
        torch.manual_seed(trial.seed * 1_000_003 + rank)

        # ---- model, optimizer, engine ----------------------------------------------------------
        model = build_model(model_config, seed=trial.seed)
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings, as nanoGPT
        no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
            fused=device.type == "cuda",
        )
        # stage 0 in fp32 hands back the bare AdamW and clips without keeping the norm: clip here instead
        manual_clip = cfg.zero_stage == 0 and not bf16
        ds_config = {
            "train_batch_size": cfg.batch_size,
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": 0.0 if manual_clip else cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,  # torch AdamW is not on DeepSpeed's list
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**62,  # we log ourselves
        }
        engine, *_ = deepspeed.initialize(
            model=model.to(device), optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        cleanup.callback(engine.destroy)  # ZeRO's hooks and buffers go with it, even after an error
        del model, optimizer  # the engine owns them now (ZeRO-3 has partitioned the parameters)
        if world == 1 and cfg.zero_stage == 0:
            # alone, the gradient all-reduce is an identity that still flattens and copies every
            # gradient (~20% of a small model's step on CPU); DeepSpeed has this switch for such cases
            engine.enable_backward_allreduce = False

        n_params = count_params(model_config)
        seq_len = max_seq_len_of(model_config)
        flops_tok = flops_per_token(model_config, seq_len)
        peak = peak_flops(device, bf16) * world
        pad_id = model_config.pad_token_id
        hf_copy = _HFCopy(model_config, tokenizer_dir) if rank == 0 else None

        # ---- resume --------------------------------------------------------------------------
        state = _resume(engine, trial_dir, budget, world, rank)
        step, n_tokens, epoch, n_consumed, wall_before = (
            state["step"], state["n_tokens"], state["epoch"], state["n_consumed"], state["wall_s"]
        )
        checkpoints = [CheckpointInfo(**c) for c in state["checkpoints"]]
        todo = [m for m in milestones(budget, cfg.checkpoints) if m > n_tokens]
        inject_at = int(os.environ.get(INJECT_NAN_ENV, "0") or 0)
        if rank == 0:
            _truncate_metrics(trial_dir / "metrics.jsonl", step)
            for event in state["set_aside"]:  # after the truncation, which would drop them
                _append_jsonl(trial_dir / "metrics.jsonl", {"trial_id": trial.trial_id, **event})
            if step:  # the record of a restart (worker failure, --resume): `status` and the tests read it
                _append_jsonl(trial_dir / "metrics.jsonl",
                              {"trial_id": trial.trial_id, "event": "resumed", "step": step, "n_tokens": n_tokens})

        # ---- the loop -----------------------------------------------------------------------
        stream = _micro_batches(make_batches, epoch, n_consumed)
        t_start = time.perf_counter()
        t_window = t_start
        window = torch.zeros(3, dtype=torch.float64, device=device)  # tokens, loss sum, loss tokens
        window_steps = 0
        grad_norm: Any = math.nan
        status, diverged_at = "finished", None
        engine.train()
        while n_tokens < budget:
            stats = torch.zeros(3, dtype=torch.float64, device=device)
            for micro in range(grad_accum):
                epoch, n_consumed, batch = next(stream)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss = engine(**model_inputs(batch, model_config)).loss
                if step + 1 == inject_at and micro == 0:
                    loss = loss * math.nan
                n_loss = _n_loss_tokens(batch["labels"], family)
                n_in = (batch["input_ids"] != pad_id).sum()
                stats += torch.stack([n_in.double(), loss.detach().double() * n_loss, n_loss.double()])
                engine.backward(loss)
                if micro < grad_accum - 1:
                    engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            if world > 1:
                dist.all_reduce(stats)  # sums over workers
            step_tokens, loss_sum, loss_tokens = stats.tolist()  # note: a CPU-GPU sync point per step
            if not math.isfinite(loss_sum):
                status, diverged_at = "diverged", step + 1
                break
            lr = lr_at((n_tokens + step_tokens) / budget, cfg)  # the fraction reached after this step
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            if manual_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), cfg.grad_clip or math.inf)
            engine.step()
            if not manual_clip:
                grad_norm = engine.get_global_grad_norm()
            step += 1
            n_tokens += int(step_tokens)
            window += stats
            window_steps += 1

            crossed = bool(todo) and n_tokens >= todo[0]
            if crossed or step % cfg.log_every_steps == 0:
                now = time.perf_counter()
                w_tokens, w_loss, w_loss_tokens = window.tolist()
                tokens_per_s = w_tokens / (now - t_window)
                record = {
                    "trial_id": trial.trial_id,
                    "step": step,
                    "n_tokens": n_tokens,
                    "budget_tokens": budget,
                    "epoch": epoch,
                    "train_loss": w_loss / w_loss_tokens if w_loss_tokens else math.nan,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                    "wall_s": wall_before + now - t_start,
                    "step_s": (now - t_window) / window_steps,
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops_tok * tokens_per_s / peak,
                    "flops": flops_tok * n_tokens,
                }
                if crossed:
                    while todo and n_tokens >= todo[0]:
                        todo.pop(0)
                    info = _save_checkpoint(
                        engine, trial_dir, record, budget, (epoch, n_consumed), val_batches, model_config, hf_copy
                    )
                    record["val_loss"] = info.val_loss
                    record["checkpoint"] = info.path
                    checkpoints.append(info)
                if rank == 0:
                    _append_jsonl(trial_dir / "metrics.jsonl", record)
                report(record)
                window.zero_()
                window_steps = 0
                t_window = time.perf_counter()  # checkpoint time is not training time

    last = checkpoints[-1] if checkpoints else None
    train_loss = math.nan if status == "diverged" else (last.train_loss if last else math.nan)
    result = TrainResult(
        trial_id=trial.trial_id,
        status=status,
        n_steps=step,
        n_tokens=n_tokens,
        budget_tokens=budget,
        n_params=n_params.total,
        n_params_non_embedding=n_params.non_embedding,
        flops=flops_tok * n_tokens,
        train_loss=train_loss,
        val_loss=last.val_loss if last else math.nan,
        wall_s=wall_before + time.perf_counter() - t_start,
        checkpoints=checkpoints,
        diverged_at_step=diverged_at,
    )
    if rank == 0:
        _write_json(trial_dir / "result.json", asdict(result))
    if status == "diverged":
        logger.warning("trial %s diverged at step %d (non-finite loss)", trial.trial_id, diverged_at)
    _barrier()
    # the last report carries the outcome: under Ray Train only reports reach the driver
    summary = {k: v for k, v in asdict(result).items() if k != "checkpoints"}
    report({**summary, "step": step, "done": True})
    return result


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
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
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


def _n_loss_tokens(labels: torch.Tensor, family: str) -> torch.Tensor:
    """Positions that carry loss: clm models shift labels left by one inside the model."""
    if family == "clm":
        labels = labels[:, 1:]
    return (labels != -100).sum()


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
        n_loss = int(_n_loss_tokens(batch["labels"], family))
        if n_loss:
            loss_sum += float(engine(**model_inputs(batch, config)).loss) * n_loss
            n += n_loss
    engine.train()
    return loss_sum / n if n else math.nan


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dirs(trial_dir: Path) -> list[Path]:
    """Complete checkpoints of a trial (with a COMPLETE marker), fewest tokens first."""
    root = Path(trial_dir) / "checkpoints"
    return sorted(p for p in root.glob("[0-9]" * 12) if (p / "COMPLETE").is_file())


def verify_checkpoint(path: Path, *, weights_only: bool = False) -> list[str]:
    """Files of the checkpoint whose sha256 differs from sha256.json, or that are missing
    (["sha256.json"] when that file is missing or unreadable). weights_only: just the HF copy
    (what from_pretrained reads), not the DeepSpeed state under state/."""
    path = Path(path)
    try:
        expected = json.loads((path / "sha256.json").read_text())
    except (OSError, ValueError):
        return ["sha256.json"]
    names = [n for n in expected if not (weights_only and n.startswith("state/"))]
    return sorted(n for n in names if not (path / n).is_file() or sha256_file(path / n) != expected[n])


def set_aside_corrupt(found: list[Path]) -> tuple[list[Path], list[dict]]:
    """Drop corrupt checkpoints from the newest end of `found` (complete checkpoints, oldest first).

    Each one whose files fail `verify_checkpoint` is renamed to `<name>.corrupt` (kept for a look,
    never deleted) until the newest is sound. Returns the sound list and one event per checkpoint set aside.
    """
    found, events = list(found), []
    while found and (bad := verify_checkpoint(found[-1])):
        path = found.pop()
        kept = path.with_name(f"{path.name}.corrupt")
        shutil.rmtree(kept, ignore_errors=True)  # an older copy set aside from the same milestone
        path.rename(kept)
        logger.warning("%s: %d file(s) fail the sha256 check (%s); set aside as %s", path, len(bad),
                       ", ".join(bad[:3]), kept.name)
        events.append({"event": "corrupt_checkpoint", "checkpoint": path.name, "files": bad, "kept_as": kept.name,
                       "resumed_from": found[-1].name if found else None})
    return found, events


def _save_checkpoint(
    engine,
    trial_dir: Path,
    record: dict,
    budget: int,
    position: tuple[int, int],
    val_batches: Sequence[dict],
    config: PreTrainedConfig,
    hf_copy: _HFCopy | None,
) -> CheckpointInfo:
    """Collective: every rank calls it. Returns the checkpoint's summary (the same on every rank)."""
    rank = dist.get_rank()
    path = Path(trial_dir) / "checkpoints" / f"{record['n_tokens']:012d}"
    if rank == 0 and path.exists():  # left half-written by a crash before its COMPLETE
        shutil.rmtree(path)
    _barrier()

    val_loss = _evaluate(engine, val_batches, config)
    engine.save_checkpoint(str(path / "state"), tag=DS_TAG, save_latest=False)
    params = _full_fp32_params(engine)  # collective; the values only on rank 0
    rng = {"torch": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    torch.save(rng, path / "state" / f"rank_{rank:05d}.pt")
    positions: list = [None] * dist.get_world_size()
    dist.all_gather_object(positions, position)

    info = CheckpointInfo(
        n_tokens=record["n_tokens"],
        path=str(path.relative_to(trial_dir)),
        step=record["step"],
        val_loss=val_loss,
        train_loss=record["train_loss"],
        flops=record["flops"],
        wall_s=record["wall_s"],
        tokens_per_s=record["tokens_per_s"],
        mfu=record["mfu"],
    )
    if rank == 0:
        hf_copy.save(path, params)
        _write_json(
            path / "state" / "trainer_state.json",
            {
                "step": record["step"],
                "n_tokens": record["n_tokens"],
                "wall_s": record["wall_s"],
                "world_size": dist.get_world_size(),
                "data_position": [{"epoch": e, "n_consumed": c} for e, c in positions],  # per rank
                "budget_tokens": budget,
                "record": record,
                "checkpoint": asdict(info),
            },
        )
        # every rank's files are on disk: each saved its part before the all_gather above
        digests = {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}
        _write_json(path / "sha256.json", digests)
        (path / "COMPLETE").write_text(f"{record['n_tokens']}\n")
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
        self.model = None

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


def _resume(engine, trial_dir: Path, budget: int, world: int, rank: int) -> dict:
    """Load the latest complete checkpoint into the engine; return where the run stands."""
    found = checkpoint_dirs(trial_dir)
    _barrier()  # everyone has listed the folder before rank 0 cleans it
    decision: list = [None]
    if rank == 0:
        complete = set(found)
        for stale in (Path(trial_dir) / "checkpoints").glob("[0-9]" * 12):
            if stale not in complete:
                shutil.rmtree(stale)
        decision = [set_aside_corrupt(found)]  # rank 0 reads the files once and tells the others
    dist.broadcast_object_list(decision, src=0)
    found, events = decision[0]
    fresh = {"step": 0, "n_tokens": 0, "epoch": 0, "n_consumed": 0, "wall_s": 0.0, "checkpoints": [], "set_aside": events}
    if not found:
        return fresh
    path = found[-1]
    saved = json.loads((path / "state" / "trainer_state.json").read_text())
    if saved["world_size"] != world:
        raise ValueError(
            f"{path}: checkpoint was written by {saved['world_size']} workers, this run has {world}; "
            f"each worker's data stream would differ, so it cannot resume exactly"
        )
    if saved.get("budget_tokens") not in (None, budget):
        raise ValueError(
            f"{path}: checkpoint belongs to a run with budget_tokens {saved['budget_tokens']}, "
            f"this run has {budget}; the learning-rate schedule would differ"
        )
    load_path, _ = engine.load_checkpoint(str(path / "state"), tag=DS_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"{path / 'state'}: DeepSpeed could not load the checkpoint")
    rng = torch.load(path / "state" / f"rank_{rank:05d}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and engine.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], engine.device)
    position = saved["data_position"][rank]
    history = [json.loads((p / "state" / "trainer_state.json").read_text())["checkpoint"] for p in found]
    logger.info("resuming from %s (step %d, %d tokens)", path, saved["step"], saved["n_tokens"])
    return {
        "step": saved["step"],
        "n_tokens": saved["n_tokens"],
        "epoch": position["epoch"],
        "n_consumed": position["n_consumed"],
        "wall_s": saved["wall_s"],
        "checkpoints": history,
        "set_aside": events,
    }


# ---------------------------------------------------------------------------------------------
# files




def _finite(obj: Any) -> Any:
    """NaN and inf become null: JSON has no such numbers, and other readers reject Python's NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(_finite(obj), f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(_finite(record)) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (the crashed run's tail)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        path.write_text("".join(line + "\n" for line in keep))


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
    json.dump(_finite(asdict(result)), sys.stdout, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
