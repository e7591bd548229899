"""Tokens per second: engine.data's Ray path vs a bare loop that calls the tokenizer, on the same shards.

Three loaders over the same Parquet shards, the same micro-batch size and max_seq_len, counting real
(non-padding) tokens, special tokens included:
  bare   pyarrow read, then `tokenizer(batch, padding=True, truncation=True, return_tensors="pt")` per
         micro-batch, in file order: the floor a hand-written loader starts from (no shuffle, no masking).
  local  `data.local_batches`: the plain path (shuffle, encode, collate, MLM masking), one process.
  ray    `data.train_dataset` iterated on the driver with `data.worker_batches(ds, epoch)`: the code a Ray
         Train worker runs on its shard, minus the split across workers. Ray Data reads, shuffles,
         encodes and collates in its own tasks; the driver only unpacks batches. Pass 1 includes pipeline
         start-up; pass 2 is a second epoch on the same dataset. Target: ray / bare >= 0.5.

    python benchmarks/loader_throughput.py                         # 100k MOSES molecules, 2 CPUs
    python benchmarks/loader_throughput.py --copies 3                # a 300k-molecule epoch
    python benchmarks/loader_throughput.py --molecules 20000 --family clm --packing
"""

from __future__ import annotations

import argparse
import csv
import gzip
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clmscale.engine import data
from clmscale.engine.tokenizer import build_tokenizer

MOSES = Path(__file__).resolve().parents[1] / "data" / "moses_100k.csv.gz"


def write_shards(smiles: list[str], out: Path, n_shards: int) -> list[Path]:
    size = -(-len(smiles) // n_shards)
    paths = []
    for i in range(n_shards):
        path = out / f"train-{i:05d}.parquet"
        pq.write_table(pa.table({"smiles": smiles[i * size : (i + 1) * size]}), path)
        paths.append(path)
    return paths


def bare_loop(paths, tokenizer, micro_batch_size: int, max_seq_len: int) -> tuple[int, float, float]:
    def batches():
        for path in paths:
            smiles = pq.read_table(path, columns=["smiles"]).column("smiles").to_pylist()
            for i in range(0, len(smiles), micro_batch_size):
                yield tokenizer(smiles[i : i + micro_batch_size], padding=True, truncation=True,
                                max_length=max_seq_len, return_tensors="pt")  # fmt: skip

    return timed(batches())


def timed(batches) -> tuple[int, float, float]:
    """(tokens, seconds, seconds to the first batch): the Ray path has a start-up cost per pass."""
    start = time.perf_counter()
    first, n_tokens = None, 0
    for batch in batches:
        n_tokens += int(batch["attention_mask"].sum())
        first = first or time.perf_counter() - start
    return n_tokens, time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--copies", type=int, default=1, help="write the molecules this many times (a bigger epoch)")
    parser.add_argument("--family", choices=["mlm", "clm"], default="mlm")
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()

    with gzip.open(MOSES, "rt", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        smiles = [row[0] for _, row in zip(range(args.molecules), rows)]
    tokenizer = build_tokenizer(smiles)
    common = {"family": args.family, "micro_batch_size": args.micro_batch_size, "max_seq_len": args.max_seq_len,
              "packing": args.packing}  # fmt: skip

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(smiles * args.copies, Path(tmp), args.shards * args.copies)
        results = {"bare": bare_loop(paths, tokenizer, args.micro_batch_size, args.max_seq_len)}
        results["local"] = timed(data.local_batches(paths, tokenizer, seed=0, epoch=0, **common))
        ds = data.train_dataset(paths, tokenizer, seed=0, **common)
        results["ray pass 1"] = timed(data.worker_batches(ds, epoch=0))
        results["ray pass 2"] = timed(data.worker_batches(ds, epoch=1))
    ray.shutdown()

    print(f"{len(smiles) * args.copies} molecules, {args.family}, micro_batch_size={args.micro_batch_size}, "
          f"max_seq_len={args.max_seq_len}, packing={args.packing}, ray num_cpus={args.num_cpus}")  # fmt: skip
    bare_rate = results["bare"][0] / results["bare"][1]
    for name, (n_tokens, seconds, first) in results.items():
        rate = n_tokens / seconds
        print(f"{name:>10}: {n_tokens:>9} tokens in {seconds:6.2f} s = {rate:>9,.0f} tokens/s "
              f"({rate / bare_rate:.2f}x bare); first batch after {first:5.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
