"""Time per optimizer step: engine.train.train (DeepSpeed, our loop) vs a bare transformers + AdamW loop.

Same model, same batches, gradient clipping in both, timed in windows of `--window` steps after one
warmup window; the engine's windows end at its log records (its `report` calls), the last one, which
includes the checkpoint, left out. On CPU the clock is the process's CPU time, which neighbours on a
shared machine disturb far less than wall time; on CUDA it is wall time (both loops sync once per
window or more). Both the fastest window and the median are printed; the ratio uses the fastest.
Target: engine / bare <= 1.10.

    python benchmarks/train_step_overhead.py                      # CPU, small model, one thread
    python benchmarks/train_step_overhead.py --device cuda --size 3xl --micro-batch-size 64 --seq-len 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from clmscale.engine.models import build_config, build_model, count_params, model_inputs
from clmscale.engine.train import smoke_trial, synthetic_batches, train


def bare_loop(
    config, batches, window: int, device: torch.device, bf16: bool, lr: float, grad_clip: float, clock
) -> list[float]:
    """Seconds per step, per window, of the plainest loop: forward, backward, clip, AdamW (autocast for bf16)."""
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    times, start = [], clock()
    for i, batch in enumerate(batches, start=1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(**model_inputs(batch, config)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % window == 0:
            loss.item()  # a sync point, as the engine's per-step all-reduce is
            now = clock()
            times.append((now - start) / window)
            start = now
    return times[1:]


def engine_loop(trial, config, batches, device: torch.device, clock) -> list[float]:
    """Seconds per step, per log window, of engine.train.train."""
    n_tokens = sum(int((b["input_ids"] != config.pad_token_id).sum()) for b in batches)
    stamps = []

    def stamp(metrics: dict) -> None:
        if "checkpoint" not in metrics and not metrics.get("done"):
            stamps.append((metrics["step"], clock()))

    with tempfile.TemporaryDirectory() as tmp:
        train(trial, Path(tmp), lambda epoch: batches, batches[:1], config, budget_tokens=n_tokens,
              device=device, report=stamp)
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", choices=["mlm", "clm"], default="mlm")
    parser.add_argument("--size", default="s")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="engine runs, interleaved with repeats + 1 bare runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")

    trial = smoke_trial(
        args.family,
        args.size,
        budget_tokens=1,  # replaced by the batches' token count
        batch_size=args.micro_batch_size,
        micro_batch_size=args.micro_batch_size,
        zero_stage=args.zero_stage,
        precision="bf16" if bf16 else "fp32",
        checkpoints=1,
        log_every_steps=args.window,
        warmup_fraction=0.0,
    )
    config = build_config(args.family, trial.size, args.vocab_size, args.seq_len)
    batches = synthetic_batches(
        args.family, 0, n_batches=args.steps, micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len, vocab_size=args.vocab_size,
    )
    n = count_params(config)
    print(f"{args.family} {args.size}: N={n.total:,} (non-embedding {n.non_embedding:,}), device {device}, "
          f"{'bf16' if bf16 else 'fp32'}, ZeRO {args.zero_stage}, micro-batch {args.micro_batch_size} x {args.seq_len}, "
          f"{args.steps} steps in windows of {args.window}, torch threads {torch.get_num_threads()}")

    clock = time.process_time if device.type == "cpu" else time.perf_counter
    print(f"clock: {'process CPU time' if device.type == 'cpu' else 'wall time'}")
    bare, engine = [], []
    for i in range(2 * args.repeats + 1):  # bare, engine, bare, ...: neighbours' load hits both alike
        if i % 2:
            engine += engine_loop(trial, config, batches, device, clock)
        else:
            bare += bare_loop(config, batches, args.window, device, bf16, trial.train.lr, trial.train.grad_clip, clock)
    for name, times in (("bare transformers + AdamW", bare), ("engine.train (DeepSpeed)", engine)):
        fastest, median = min(times) * 1e3, statistics.median(times) * 1e3
        print(f"{name:27s} fastest {fastest:8.2f} ms/step   median {median:8.2f} ms/step")
    print(f"ratio engine / bare (fastest windows): {min(engine) / min(bare):.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
