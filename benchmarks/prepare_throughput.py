"""Molecules/s of `prepare` on Ray vs a plain single-process RDKit loop, on the same SMILES.

    python benchmarks/prepare_throughput.py                  # 100k MOSES, a local 2-CPU Ray cluster
    python benchmarks/prepare_throughput.py --n 20000 --cpus 2

What is timed, all in this one process and run:
- baseline: `Chem.MolToSmiles(Chem.MolFromSmiles(s))` for each SMILES, already in memory
  (no file reading, no dedup, no writing): the pure RDKit cost that Ray spreads out;
- prepare, in-process (`parallel=False`): the whole stage, from the gzipped file to manifest.json;
- prepare on Ray: the same, as a Ray Data pipeline (read, canonicalise, hash-partitioned dedup, sort, write). `cold` is the first call on a fresh
  cluster (workers still start and import RDKit and engine.prepare), `warm` the later calls.
  Each Ray run is paired with a baseline run just before it, so both see the same machine load;
  the speed-up is the median over the warm pairs.
Ray workers run at `--worker-niceness` (default 0, the baseline's; Ray's own default is 15).
Not timed, reported apart: `ray.init` (cluster start) and the one-off `import transformers` that
the tokenizer step needs (done before any timing, so neither prepare pays it).
The ratio compares whole-stage prepare on Ray with the baseline loop; it cannot exceed the number
of CPUs, and the driver's own share (reading, dedup, writing, tokenizer) is counted against Ray.

On a shared machine the wall-clock ratio says little: Linux autogroup scheduling divides the CPUs
per session, and the local Ray cluster lives in the driver's session, so 2 Ray workers get no more
CPU than the 1-process baseline when other sessions keep the CPUs busy. So each pair also reports
the same loop split over a plain process pool (no Ray: the speed-up the machine offers at that
moment), CPU seconds (the baseline process; the driver; every process on the machine, Ray's
included) and an idle-machine model, baseline CPU / (driver CPU + other CPU / n_cpus): a model,
not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import multiprocessing
import multiprocessing.pool
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import ray
from rdkit import Chem, rdBase

from clmscale.engine.config import DataConfig
from clmscale.engine.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def load_smiles(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        return [row[0] for _, row in zip(range(n), rows)]


def machine_cpu_s() -> float:
    """CPU seconds used so far by every process on the machine (user + system, all CPUs): the driver and
    Ray's raylet, GCS and workers, which ray.init starts detached, and which Ray replaces when idle, so
    per-process counters lose them. A difference of two readings is what one prepare cost, plus whatever
    else ran meanwhile: run it on a quiet machine (the load average is printed beside it)."""
    cpu = psutil.cpu_times()
    return cpu.user + cpu.system


def baseline(smiles: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of the plain loop: parse + canonicalise each SMILES in this process."""
    t, c = time.perf_counter(), time.process_time()
    with rdBase.BlockLogs():
        for s in smiles:
            mol = Chem.MolFromSmiles(s)
            if mol is not None:
                Chem.MolToSmiles(mol)
    return time.perf_counter() - t, time.process_time() - c


def pool_loop(pool: multiprocessing.pool.Pool, smiles: list[str], n_procs: int) -> float:
    """Wall s of the baseline loop split over `n_procs` plain processes: the parallel speed-up the
    machine offers right now, with no Ray and no prepare around it."""
    parts = [smiles[i::n_procs] for i in range(n_procs)]
    t = time.perf_counter()
    pool.map(baseline, parts)
    return time.perf_counter() - t


def timed_prepare(cfg: DataConfig, parallel: bool, chunk_rows: int) -> tuple[float, float, float, int]:
    """(wall s, driver CPU s, machine-wide CPU s, molecules) of one prepare into a fresh directory."""
    out = Path(tempfile.mkdtemp(prefix="clmscale-bench-"))
    try:
        t, c, s = time.perf_counter(), time.process_time(), machine_cpu_s()
        manifest = prepare(cfg, out / "data", parallel=parallel, chunk_rows=chunk_rows, progress=lambda p: None)
        wall, driver_cpu = time.perf_counter() - t, time.process_time() - c
        return wall, driver_cpu, machine_cpu_s() - s, manifest.counts.n_in
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "moses_100k.csv.gz")
    parser.add_argument("--n", type=int, default=100_000, help="molecules (max_molecules)")
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray cluster")
    parser.add_argument("--chunk-rows", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3, help="warm (baseline, Ray) pairs after the cold one")
    parser.add_argument("--skip-serial-prepare", action="store_true")
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="Ray starts workers at nice 15, so on a busy machine they yield to everything else while "
        "the baseline runs at nice 0; 0 compares like with like, 15 is Ray's default",
    )
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other processes share it)")
    cfg = DataConfig(corpus=[args.corpus], max_molecules=args.n)
    smiles = load_smiles(args.corpus, args.n)

    t = time.perf_counter()
    import transformers  # noqa: F401  one-off import the tokenizer step needs; kept out of both prepares

    print(f"import transformers (not timed below): {time.perf_counter() - t:.1f} s")

    if not args.skip_serial_prepare:
        t_serial, _, _, n = timed_prepare(cfg, parallel=False, chunk_rows=args.chunk_rows)
        print(f"prepare, in-process: {n:,} SMILES in {t_serial:.2f} s = {n / t_serial:,.0f} mol/s (whole stage)")

    pool = multiprocessing.get_context("fork").Pool(args.cpus)  # forked before Ray starts
    pool.map(baseline, [smiles[:10]] * args.cpus)  # workers up and warm

    t = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": args.worker_niceness},
    )
    print(
        f"ray.init, {args.cpus} CPUs, worker niceness {args.worker_niceness} (not timed below): "
        f"{time.perf_counter() - t:.1f} s"
    )
    # The machine may be shared: each repeat times the baseline loop and then prepare on Ray
    # back to back, so the two see the same load; the first Ray run also starts the workers (cold).
    ratios, bounds, ceilings, cpu_per_mol = [], [], [], []
    try:
        for repeat in range(args.repeats + 1):
            t_base, cpu_base = baseline(smiles)
            t_pool = pool_loop(pool, smiles, args.cpus)
            t_ray, cpu_driver, cpu_all, n = timed_prepare(cfg, parallel=True, chunk_rows=args.chunk_rows)
            label = "cold" if repeat == 0 else f"warm {repeat}"
            # CPU-time model for an idle machine: the driver's CPU runs serially, the rest spreads over the CPUs
            bound = cpu_base / (cpu_driver + (cpu_all - cpu_driver) / args.cpus)
            print(
                f"[{label:6s}] load {os.getloadavg()[0]:5.2f} | baseline loop {len(smiles) / t_base:6,.0f} mol/s "
                f"({t_base:5.1f} s, {cpu_base:5.1f} CPU-s) | same loop in a {args.cpus}-process pool "
                f"{t_base / t_pool:.2f}x | prepare on Ray {n / t_ray:6,.0f} mol/s ({t_ray:5.1f} s; "
                f"CPU-s: driver {cpu_driver:4.1f}, all {cpu_all:5.1f}) | measured {t_base / t_ray:.2f}x, "
                f"idle-machine model {bound:.2f}x | CPU per molecule: loop {1e6 * cpu_base / len(smiles):.0f} µs, "
                f"prepare on Ray {1e6 * cpu_all / n:.0f} µs"
            )
            if repeat:
                cpu_per_mol.append((cpu_base / len(smiles), cpu_all / n))
                ratios.append(t_base / t_ray)
                bounds.append(bound)
                ceilings.append(t_base / t_pool)
    finally:
        ray.shutdown()
        pool.terminate()
    if ratios:
        print(
            f"measured wall-clock speed-up, warm: median {statistics.median(ratios):.2f}x "
            f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} pairs)"
        )
        print(
            f"same loop in a plain {args.cpus}-process pool, same moments: median {statistics.median(ceilings):.2f}x "
            f"(what this machine offers any parallel code right now)"
        )
        print(f"CPU-time model for {args.cpus} free CPUs (not a measurement): median {statistics.median(bounds):.2f}x")
        loop_us = statistics.median(1e6 * c for c, _ in cpu_per_mol)
        ray_us = statistics.median(1e6 * c for _, c in cpu_per_mol)
        print(
            f"CPU-seconds per molecule, warm medians: loop {loop_us:.0f} µs, prepare on Ray {ray_us:.0f} µs "
            f"(every process on the machine: driver, raylet, GCS, workers) = {ray_us / loop_us:.2f}x the loop"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
