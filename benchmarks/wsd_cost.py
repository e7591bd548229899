"""Compute for k annealed (N, D) points: one wsd run with k milestones vs k cosine runs to the same budgets.

Standalone (engine.train.train on synthetic batches, no Ray): the wsd run gets `checkpoints=k`, every
one of them the end of a cooldown branch; the baseline is k separate cosine runs with budgets
budget / 2^(k-1), ..., budget, each giving its one annealed (final) checkpoint. Both sides see the
same batches in the same order, made once per epoch and kept (a wsd branch's rewind reads an
epoch's batches again; here that costs only the skip, with Ray Data it re-reads the shards). Printed: tokens processed (wsd: `tokens_spent`, its branches
included), wall time and process CPU time of the train() calls (checkpoint saves included), and the
validation loss at each D from both, so the saving can be read next to what it costs in loss.
Expectation from the schedule alone: tokens ratio (1 + f (1 - 2^-(k-1))) / (2 - 2^-(k-1)), 0.63 for
k = 4 and cooldown_fraction f = 0.2.

    PYTHONPATH=$PWD python benchmarks/wsd_cost.py                       # rung xs, 4 milestones, 2e5 tokens
    PYTHONPATH=$PWD python benchmarks/wsd_cost.py --size s --budget-tokens 1e6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from clmscale.engine.models import build_config
from clmscale.engine.train import smoke_trial, synthetic_batches, train


def timed_train(trial, config, make, val, budget: int) -> tuple[object, float, float]:
    """(TrainResult, wall seconds, process CPU seconds) of one train() call in a fresh folder."""
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        result = train(trial, Path(tmp), make, val, config, budget_tokens=budget, device="cpu",
                       report=lambda metrics: None)
        return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="xs")
    parser.add_argument("--budget-tokens", type=float, default=2e5)
    parser.add_argument("--milestones", type=int, default=4)
    parser.add_argument("--cooldown-fraction", type=float, default=0.2)
    parser.add_argument("--cooldown-shape", default="linear", choices=["linear", "1-sqrt"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=48)
    parser.add_argument("--batches-per-epoch", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    budget, k = int(args.budget_tokens), args.milestones
    common = dict(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr, zero_stage=0,
                  precision="fp32", log_every_steps=50, cooldown_fraction=args.cooldown_fraction,
                  cooldown_shape=args.cooldown_shape)
    data = dict(micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size)

    made: dict[int, list[dict]] = {}

    def make(epoch: int) -> list[dict]:  # made once per epoch: neither side's clock pays for making batches
        if epoch not in made:
            made[epoch] = synthetic_batches("mlm", epoch, n_batches=args.batches_per_epoch, **data)
        return made[epoch]

    val = synthetic_batches("mlm", -1, n_batches=4, **data)
    wsd_trial = smoke_trial("mlm", args.size, budget, schedule="wsd", checkpoints=k, **common)
    config = build_config("mlm", wsd_trial.size, args.vocab_size, args.seq_len)

    wsd, wsd_wall, wsd_cpu = timed_train(wsd_trial, config, make, val, budget)
    cosine = []
    for point in wsd.checkpoints:
        trial = smoke_trial("mlm", args.size, point.milestone, schedule="cosine", checkpoints=1, **common)
        cosine.append(timed_train(trial, config, make, val, point.milestone))

    cos_tokens = sum(r.n_tokens for r, _, _ in cosine)
    cos_wall, cos_cpu = sum(w for _, w, _ in cosine), sum(c for _, _, c in cosine)
    figures = {
        "size": args.size, "n_params_non_embedding": wsd.n_params_non_embedding, "budget_tokens": budget,
        "milestones": k, "cooldown_fraction": args.cooldown_fraction, "cooldown_shape": args.cooldown_shape,
        "wsd": {"tokens": wsd.tokens_spent, "wall_s": wsd_wall, "cpu_s": wsd_cpu,
                "points": [(c.n_tokens, c.val_loss) for c in wsd.checkpoints]},
        "cosine": {"tokens": cos_tokens, "wall_s": cos_wall, "cpu_s": cos_cpu,
                   "points": [(r.n_tokens, r.val_loss) for r, _, _ in cosine]},
        "tokens_ratio": wsd.tokens_spent / cos_tokens, "wall_ratio": wsd_wall / cos_wall, "cpu_ratio": wsd_cpu / cos_cpu,
    }
    print(f"rung {args.size} ({wsd.n_params_non_embedding:,} non-embedding params), {k} annealed points up to "
          f"{budget:,} tokens, cooldown {args.cooldown_fraction:g} {args.cooldown_shape}")
    print(f"{'':>10} {'tokens':>10} {'wall s':>8} {'cpu s':>8}")
    print(f"{'wsd':>10} {wsd.tokens_spent:>10,} {wsd_wall:>8.1f} {wsd_cpu:>8.1f}")
    print(f"{'k cosine':>10} {cos_tokens:>10,} {cos_wall:>8.1f} {cos_cpu:>8.1f}")
    print(f"{'ratio':>10} {figures['tokens_ratio']:>10.3f} {figures['wall_ratio']:>8.3f} {figures['cpu_ratio']:>8.3f}")
    print("validation loss at each D (wsd branch end | cosine run):")
    for (d_wsd, l_wsd), (d_cos, l_cos) in zip(figures["wsd"]["points"], figures["cosine"]["points"]):
        print(f"  D {d_wsd:>9,} | {d_cos:>9,}   {l_wsd:.4f} | {l_cos:.4f}   ({(l_wsd - l_cos) / l_cos:+.2%})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
