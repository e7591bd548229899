"""Multi-worker speed-up of the distributed Hessian: `engine.analyze.distributed_spectrum` over 1 vs n
Ray Train workers (1 CPU each, gloo all-reduce of every H v), same checkpoint, same batches.

The checkpoint is an untrained rung of the ladder saved with the tokenizer that `prepare` builds
from the first MOSES molecules; the loss is the pretraining loss on `--batches` validation batches,
which the workers share (each takes every n-th). Printed per worker count: the time of the
estimators inside the worker group (rank 0's clock, start-up excluded), the HVPs, HVPs per second,
the whole call (worker group start-up included), and the speed-up over one worker for both; the
eigenvalues are checked to agree. Ideal speed-up is n; the all-reduce and the share of work that
every worker repeats (the Lanczos arithmetic) keep it below.

    python benchmarks/hessian_workers.py                         # 1 vs 2 workers, rung xs, 2 batches
    python benchmarks/hessian_workers.py --workers 1 2 4 --batches 8 --size s
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from clmscale.engine.analyze import distributed_spectrum
from clmscale.engine.config import LADDER, DataConfig
from clmscale.engine.models import build_config, build_model
from clmscale.engine.prepare import prepare
from clmscale.engine.tokenizer import load_tokenizer

MOSES = Path(__file__).resolve().parents[1] / "data" / "moses_100k.csv.gz"


def make_checkpoint(work: Path, size: str, n_smiles: int, max_seq_len: int) -> tuple[Path, list[str]]:
    """prepare() on the first n_smiles MOSES molecules, then an untrained model of rung `size` saved with the tokenizer."""
    with gzip.open(MOSES, "rt") as f:
        lines = [next(f) for _ in range(n_smiles + 1)]
    corpus = work / "corpus.csv"
    corpus.write_text("".join(lines))
    manifest = prepare(DataConfig(corpus=[corpus], val_fraction=0.5), work / "data", parallel=False)
    tokenizer = load_tokenizer(work / "data" / "tokenizer")
    model = build_model(build_config("mlm", LADDER[size], len(tokenizer), max_seq_len))
    checkpoint = work / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint, [str(work / "data" / s.path) for s in manifest.shards if s.split == "val"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", default="xs", choices=list(LADDER))
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count; the fastest is kept")
    args = parser.parse_args()
    if max(args.workers) > args.batches:
        parser.error("each worker needs a batch: --batches must be >= every --workers value")

    ray.init(address="local", num_cpus=max(args.workers), include_dashboard=True, dashboard_host="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, val_shards = make_checkpoint(work, args.size, 4 * args.batches * args.micro_batch_size, args.max_seq_len)
        problem = {"checkpoint": str(checkpoint), "val_shards": val_shards, "micro_batch_size": args.micro_batch_size,
                   "max_seq_len": args.max_seq_len, "mlm_probability": 0.15}
        analysis = {"hessian_batches": args.batches}
        settings = {"top_k": args.top_k, "max_iter": args.max_iter, "trace_matvecs": 0, "density_runs": 0, "seed": 0}
        results = {}
        for n in args.workers:
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                record = distributed_spectrum("pretrain", problem, analysis, settings, n, storage=work / "ray_train")
                runs.append((record["wall_s"], time.perf_counter() - start, record))
            results[n] = min(runs, key=lambda r: r[0])
    ray.shutdown()

    base_inner, base_outer, base = results[min(args.workers)]
    print(f"rung {args.size}, {base['n_params']:,} parameters, {args.batches} batches of {args.micro_batch_size} x "
          f"<= {args.max_seq_len} tokens, top-{args.top_k} by Lanczos (fastest of {args.repeats})")
    print(f"{'workers':>7} {'estimators s':>12} {'HVPs':>5} {'HVP/s':>7} {'speed-up':>8} {'whole call s':>12} {'speed-up':>8}")
    for n, (inner, outer, record) in results.items():
        np.testing.assert_allclose(record["eigenvalues"], base["eigenvalues"], rtol=1e-5)
        print(f"{n:>7} {inner:>12.2f} {record['n_matvecs']:>5} {record['n_matvecs'] / inner:>7.2f} "
              f"{base_inner / inner:>7.2f}x {outer:>12.2f} {base_outer / outer:>7.2f}x")
    print(f"eigenvalues agree across worker counts (rtol 1e-5): {np.round(base['eigenvalues'], 4).tolist()}")


if __name__ == "__main__":
    main()
