"""Driver peak RSS of `prepare` on Ray for 1e5 and 1e6 molecules, each in its own process: does it grow with the corpus?

    python benchmarks/prepare_memory.py                       # 1e5 and 1e6 molecules of the MOSES train file
    python benchmarks/prepare_memory.py --n 20000 200000      # any sizes; the first is the baseline

Each size runs in a fresh Python process (a child of this one) that starts a local Ray cluster of `--cpus` CPUs and
runs `prepare(DataConfig(corpus=[MOSES train], max_molecules=n), parallel=True)` into a temporary directory.
The child reports its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`: the driver process only, not Ray's workers,
raylet or object store, which live on the cluster) and the wall time of prepare. Printed: per size the peak RSS,
mol/s, and the ratio of each peak to the first size's peak (target: 1e6 within 1.2x of 1e5). The MOSES train file
(1.58M molecules, ../shared/data/pretrain/moses/train.csv.gz) is read where it is; nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOSES_TRAIN = ROOT.parent / "shared" / "data" / "pretrain" / "moses" / "train.csv.gz"


def child(corpus: Path, n: int, cpus: int, chunk_rows: int) -> dict:
    """One prepare on a fresh local Ray cluster; the driver's peak RSS and the time."""
    import ray

    from clmscale.engine.config import DataConfig
    from clmscale.engine.prepare import prepare

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss_after_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = Path(tempfile.mkdtemp(prefix="clmscale-mem-"))
    try:
        t = time.perf_counter()
        m = prepare(DataConfig(corpus=[corpus], max_molecules=n), out / "data", parallel=True, chunk_rows=chunk_rows,
                    progress=lambda p: None)  # fmt: skip
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()
    return {
        "n": m.counts.n_in,
        "n_kept": m.counts.n_kept,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_ray_init_mb": rss_after_init / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=MOSES_TRAIN)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus of each local Ray cluster")
    parser.add_argument("--chunk-rows", type=int, default=2_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.corpus, args.n[0], args.cpus, args.chunk_rows)))
        return

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; corpus {args.corpus}")
    results = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--child", "--corpus", str(args.corpus), "--n", str(n), "--cpus",
               str(args.cpus), "--chunk-rows", str(args.chunk_rows)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"prepare of {n} molecules failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        base = results[0]["peak_rss_mb"]
        print(
            f"{r['n']:>10,} molecules: driver peak RSS {r['peak_rss_mb']:7.0f} MB ({r['peak_rss_mb'] / base:.2f}x the "
            f"{results[0]['n']:,} run; {r['rss_after_ray_init_mb']:.0f} MB after ray.init) | prepare "
            f"{r['wall_s']:6.1f} s = {r['n'] / r['wall_s']:,.0f} mol/s | load {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
