"""Tokens per CPU-second: prepare's pre-tokenised shards vs encoding every pass vs a bare read of the token column.

The same molecules as two sets of Parquet shards: `smiles` only (what prepare wrote before token ids), and prepare's
own shards (`smiles`, `n_tokens`, `ids`, written by `engine.prepare.shard_table`). The same micro-batch size and
max_seq_len everywhere; real (non-padding) tokens are counted, special tokens included. Per loader: tokens/s (wall)
and tokens per CPU-second (CPU time of this process for the local loaders; of every process of this session, the
driver and Ray's workers, for the Ray ones: run it alone in its session).
  bare ids     pyarrow read of the `ids` column, then per micro-batch the wrapped ids padded into one int64 array:
               the floor any loader of these shards pays (no shuffle, no masking).
  local ids    `data.local_batches` on the pre-tokenised shards: shuffle, wrap, collate, MLM masking.
  local encode `data.local_batches` on the SMILES-only shards: the same, encoding every pass.
  ray ids / ray encode   `data.train_dataset` iterated with `data.worker_batches` (a Ray Train worker's code,
               minus the split; mlm batches masked by it, on the CPU here), second pass of the dataset (the first
               includes pipeline start-up).

    python benchmarks/loader_throughput.py                         # 100k MOSES molecules, 2 CPUs
    python benchmarks/loader_throughput.py --molecules 20000 --family clm --packing
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from clmscale.engine import data
from clmscale.engine.prepare import shard_table
from clmscale.engine.tokenizer import build_vocab, smiles_tokens, tokenizer_from_vocab

MOSES = Path(__file__).resolve().parents[1] / "data" / "moses_100k.csv.gz"


def write_shards(smiles: list[str], out: Path, n_shards: int, vocab: dict[str, int] | None) -> list[Path]:
    """SMILES-only shards, or with `vocab` prepare's pre-tokenised ones (smiles, n_tokens, ids)."""
    out.mkdir(parents=True, exist_ok=True)
    size = -(-len(smiles) // n_shards)
    paths = []
    for i in range(n_shards):
        part = smiles[i * size : (i + 1) * size]
        if vocab is None:
            table = pa.table({"smiles": part})
        else:
            table = shard_table(part, pa.array([len(smiles_tokens(s)) for s in part], pa.int32()), vocab)
        path = out / f"train-{i:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def bare_ids(paths, tokenizer, family, micro_batch_size: int, max_seq_len: int):
    """The `ids` column read and padded per micro-batch, in file order: no shuffle, no masking."""
    open_id, close_id = data._wrap_ids(tokenizer, family)
    for path in paths:
        ids = data.read_ids([path])
        assert ids is not None
        for start in range(0, len(ids), micro_batch_size):
            seqs = list(ids.wrapped(range(start, min(start + micro_batch_size, len(ids))), open_id, close_id,
                                    max_seq_len))  # fmt: skip
            lengths = np.array([len(x) for x in seqs])
            batch = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
            batch[np.arange(batch.shape[1]) < lengths[:, None]] = np.concatenate(seqs)
            yield {"attention_mask": np.arange(batch.shape[1]) < lengths[:, None]}


def session_cpu_s() -> float:
    """CPU seconds used so far by every live process of this session (the driver and a local Ray cluster's)."""
    sid, total = os.getsid(0), 0.0
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                cpu = proc.cpu_times()
                total += cpu.user + cpu.system
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return total


def timed(batches, cpu_clock=time.process_time) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds): of this process for the local loaders (other work in the session does
    not count), of the whole session (`session_cpu_s`: the driver and Ray's workers) for the Ray ones."""
    start, cpu = time.perf_counter(), cpu_clock()
    n_tokens = 0
    for batch in batches:
        n_tokens += int(batch["attention_mask"].sum())
    return n_tokens, time.perf_counter() - start, cpu_clock() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--family", choices=["mlm", "clm"], default="mlm")
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()

    with gzip.open(MOSES, "rt", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        smiles = [row[0] for _, row in zip(range(args.molecules), rows, strict=False)]
    vocab = build_vocab(smiles)
    tokenizer = tokenizer_from_vocab(vocab)
    common = {"family": args.family, "micro_batch_size": args.micro_batch_size, "max_seq_len": args.max_seq_len,
              "packing": args.packing}  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain = write_shards(smiles, Path(tmp) / "plain", args.shards, None)
        ids = write_shards(smiles, Path(tmp) / "ids", args.shards, vocab)
        results["bare ids"] = timed(bare_ids(ids, tokenizer, args.family, args.micro_batch_size, args.max_seq_len))
        results["local ids"] = timed(data.local_batches(ids, tokenizer, seed=0, epoch=0, **common))
        results["local encode"] = timed(data.local_batches(plain, tokenizer, seed=0, epoch=0, **common))
        if not args.skip_ray:
            import ray

            ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning")
            ray.data.DataContext.get_current().enable_progress_bars = False
            # mlm: the worker masks each batch (on its device; here the CPU), as a Ray Train worker does
            masking = data.Masking.of(tokenizer, 0.15) if args.family == "mlm" else None
            for name, paths in (("ray ids", ids), ("ray encode", plain)):
                ds = data.train_dataset(paths, tokenizer, seed=0, **common)
                timed(data.worker_batches(ds, 0, masking))  # pass 1: pipeline start-up
                results[name] = timed(data.worker_batches(ds, 1, masking), session_cpu_s)
            ray.shutdown()

    print(f"{len(smiles)} molecules, {args.family}, micro_batch_size={args.micro_batch_size}, "
          f"max_seq_len={args.max_seq_len}, packing={args.packing}, ray num_cpus={args.num_cpus}")  # fmt: skip
    per_cpu = {name: n / max(cpu, 1e-9) for name, (n, _, cpu) in results.items()}
    for name, (n_tokens, seconds, cpu) in results.items():
        print(f"{name:>12}: {n_tokens:>9} tokens in {seconds:6.2f} s = {n_tokens / seconds:>10,.0f} tokens/s; "
              f"{cpu:6.2f} CPU-s = {per_cpu[name]:>10,.0f} tokens/CPU-s")  # fmt: skip
    print(f"per CPU: local ids / local encode {per_cpu['local ids'] / per_cpu['local encode']:.2f}x; "
          f"local ids / bare ids {per_cpu['local ids'] / per_cpu['bare ids']:.2f}x")  # fmt: skip
    if "ray ids" in per_cpu:
        print(f"per CPU: ray ids / ray encode {per_cpu['ray ids'] / per_cpu['ray encode']:.2f}x; "
              f"ray ids / bare ids {per_cpu['ray ids'] / per_cpu['bare ids']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
