"""GPU occupancy of a mixed grid on Ray Tune: `engine.packing.PackingSearcher` (heterogeneous
packing, largest first) against today's scheduling (Tune's grid order with one
`max_concurrent_trials` for all trials: the minimum over trials of how many copies fit, which is
what the sweep did before packing), in the same run.

The grid is 20 trials of five shapes (rung s on 0.25 GPU, m on 0.5, l on 1, xl on 2 workers x 1
GPU, 2xl on 4 workers x 1 GPU: the whole cluster, as paper.yaml's 6xl on 8 GPUs; two budgets, two
seeds by default), so today's min-over-trials concurrency is 1: one trial at a time. Each trial sleeps instead of training, for a time proportional to
its planned wall time (`engine.plan`: FLOPs / (MFU x peak x its GPUs)), scaled so the longest
lasts `--longest-s`. A trial holds its resources the way a TorchTrainer does: it creates a
placement group with one bundle per worker (waiting at most `--wait-timeout-s`), runs one task
per bundle that sleeps and returns the GPU ids Ray gave it, and removes the group.

Occupancy = sum over trials of logical-GPU-seconds held (placement group ready -> removed) /
(cluster GPUs x makespan, first group ready -> last removed). The last line reads
`occupancy <new> (one-at-a-time <old>, <ratio>x)`.

    python benchmarks/schedule_occupancy.py                      # both schedulers, ~5 min on 2 cores
    python benchmarks/schedule_occupancy.py --modes packed --longest-s 8 --json out.json   # the test's run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from ray import tune
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clmscale.engine.admission import DATA_CPUS, TRIAL_CPU, copies_that_fit, trial_need
from clmscale.engine.config import ResourcesConfig, Trial
from clmscale.engine.packing import PackingSearcher, gpu_memory_gb, ray_nodes
from clmscale.engine.plan import device_hours, trial_flops
from clmscale.engine.train import smoke_trial

N_GPUS = 4
MIX = [  # rung, gpus per worker, workers, token budgets
    ("s", 0.25, 1, (4e8, 8e8)),
    ("m", 0.5, 1, (1e8, 2e8)),
    ("l", 1.0, 1, (4e7, 8e7)),
    ("xl", 1.0, 2, (4e7, 8e7)),
    ("2xl", 1.0, 4, (2e7, 4e7)),  # the whole cluster, as paper.yaml's 6xl: today's concurrency becomes 1
]
CPUS_PER_WORKER = 0.25


def grid(n_seeds: int = 2) -> list[Trial]:
    """The mixed grid, smallest rung first (the order expand_grid gives and Tune's grid search keeps)."""
    trials = []
    for rung, gpus, workers, budgets in MIX:
        for budget in budgets:
            for seed in range(n_seeds):
                t = smoke_trial("mlm", rung, budget_tokens=int(budget), seed=seed, batch_size=64, micro_batch_size=32)
                resources = ResourcesConfig(workers=workers, cpus_per_worker=CPUS_PER_WORKER, gpus_per_worker=gpus)
                trials.append(t.model_copy(update={"trial_id": f"{rung}_{budget:.0e}_s{seed}", "resources": resources}))
    return trials


def planned_seconds(trials: list[Trial], longest_s: float) -> list[float]:
    """Wall time of each trial on its GPUs at one MFU and peak, scaled so the longest is longest_s."""
    wall = []
    for t in trials:
        flops = trial_flops(t, vocab_size=64, max_seq_len=128, budget_tokens=t.budget_tokens)
        wall.append(device_hours(flops, mfu=0.4, peak_flops=1e15) / (t.resources.workers * t.resources.gpus_per_worker))
    return [longest_s * w / max(wall) for w in wall]


@ray.remote
def hold(seconds: float) -> list:
    """One worker's share of a trial: keep the bundle busy for `seconds`, say which GPU Ray gave it."""
    time.sleep(seconds)
    return [str(g) for g in ray.get_gpu_ids()]


class StampingSearcher(PackingSearcher):
    """PackingSearcher that writes the moment of admission into the config (to measure Tune's and
    Ray's start-up separately from the admission decision)."""

    def suggest(self, trial_id: str):
        suggestion = super().suggest(trial_id)
        if isinstance(suggestion, dict):
            suggestion["cfg"]["admitted"] = time.time()
        return suggestion


def sleep_trial(config: dict) -> None:
    """Tune function trainable: hold the trial's worker bundles like a TorchTrainer, then report times."""
    cfg = config["cfg"]
    entered = time.time()
    bundles = [{"CPU": c, **({"GPU": g} if g else {})} for c, g in cfg["bundles"]]
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=cfg["wait_timeout_s"]):
        remove_placement_group(pg)
        raise TimeoutError(f"{cfg['name']}: worker bundles {bundles} not placed within {cfg['wait_timeout_s']} s")
    ready = time.time()
    refs = [
        hold.options(num_cpus=c, num_gpus=g, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=i)).remote(cfg["seconds"])
        for i, (c, g) in enumerate(cfg["bundles"])
    ]  # fmt: skip
    gpu_ids = ray.get(refs, timeout=cfg["seconds"] + cfg["wait_timeout_s"])
    remove_placement_group(pg)
    released = time.time()
    tune.report({"name": cfg["name"], "admitted": cfg.get("admitted", float("nan")), "entered": entered,
                 "ready": ready, "released": released, "gpu_ids": json.dumps(gpu_ids)})  # fmt: skip


def run(mode: str, trials: list[Trial], seconds: list[float], storage: Path, wait_timeout_s: float,
        time_budget_s: float, reuse_actors: bool) -> dict:  # fmt: skip
    """One scheduler over the whole grid; returns its per-trial records and the concurrency it used."""
    configs = [{"cfg": {"name": t.trial_id, "seconds": s, "wait_timeout_s": wait_timeout_s,
                        "bundles": [[t.resources.cpus_per_worker, t.resources.gpus_per_worker]] * t.resources.workers,
                        "gpus": t.resources.workers * t.resources.gpus_per_worker}}
               for t, s in zip(trials, seconds, strict=True)]  # fmt: skip
    trainable = tune.with_resources(sleep_trial, {"cpu": TRIAL_CPU})
    run_config = tune.RunConfig(name=mode, storage_path=str(storage), verbose=0)
    if mode == "packed":
        needs = [trial_need(t.resources, TRIAL_CPU) for t in trials]
        searcher = StampingSearcher(configs, needs, [t.trial_id for t in trials], ray_nodes(), reserved_cpus=DATA_CPUS,
                                   costs=seconds)  # fmt: skip
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=len(configs),
                                      max_concurrent_trials=len(configs), time_budget_s=time_budget_s,
                                      reuse_actors=reuse_actors)  # fmt: skip
        tuner = tune.Tuner(trainable, param_space={}, tune_config=tune_config, run_config=run_config)
        concurrency = None
    else:
        nodes = ray_nodes()
        concurrency = max(1, min(copies_that_fit(trial_need(t.resources, TRIAL_CPU), nodes, DATA_CPUS) for t in trials))
        tune_config = tune.TuneConfig(max_concurrent_trials=concurrency, time_budget_s=time_budget_s,
                                      reuse_actors=reuse_actors)
        tuner = tune.Tuner(trainable, param_space={"cfg": tune.grid_search([c["cfg"] for c in configs])},
                           tune_config=tune_config, run_config=run_config)  # fmt: skip
    start = time.time()
    results = tuner.fit()
    wall_s = time.time() - start
    errors = [str(e)[:500] for e in results.errors]
    by_name = {c["cfg"]["name"]: c["cfg"] for c in configs}
    records = []
    for r in results:
        m = r.metrics or {}
        if "name" in m:
            cfg = by_name[m["name"]]
            records.append({"name": m["name"], "gpus": cfg["gpus"], "bundles": cfg["bundles"], "seconds": cfg["seconds"],
                            "admitted": m["admitted"], "entered": m["entered"], "ready": m["ready"], "released": m["released"],
                            "gpu_ids": json.loads(m["gpu_ids"])})  # fmt: skip
    return {"mode": mode, "records": records, "errors": errors, "concurrency": concurrency, "wall_s": wall_s,
            "n_trials": len(configs)}  # fmt: skip


def warm_up_workers(n: int) -> None:
    """Start n worker processes before timing anything, so the first scheduler run does not pay
    for the process pool the second one inherits."""
    ray.get([hold.options(num_cpus=0.01).remote(1.0) for _ in range(n)], timeout=300)


def occupancy(records: list[dict], n_gpus: float) -> tuple[float, float]:
    """(logical-GPU-seconds held / (n_gpus x makespan), makespan in seconds)."""
    if not records:
        return float("nan"), float("nan")
    makespan = max(r["released"] for r in records) - min(r["ready"] for r in records)
    held = sum(r["gpus"] * (r["released"] - r["ready"]) for r in records)
    return held / (n_gpus * makespan), makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["packed", "today"], choices=["packed", "today"])
    parser.add_argument("--cpus", type=int, default=16,
                        help="logical CPUs (Ray keeps up to this many idle worker processes for reuse)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per (rung, budget): 10 trials each")
    parser.add_argument("--longest-s", type=float, default=20.0, help="sleep of the longest trial")
    parser.add_argument("--wait-timeout-s", type=float, default=120.0, help="a trial's wait for its bundles")
    parser.add_argument("--time-budget-s", type=float, default=1200.0, help="Tune stops all trials after this")
    parser.add_argument("--reuse-actors", action="store_true",
                        help="Tune reuses a finished trial's actor (engine.sweep does not, today)")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    args = parser.parse_args()

    trials = grid(args.seeds)
    seconds = planned_seconds(trials, args.longest_s)
    ray.init(address="local", num_cpus=args.cpus, num_gpus=N_GPUS, include_dashboard=False,
             object_store_memory=128 * 1024**2)  # fmt: skip
    warm_up_workers(args.cpus)
    out = {"n_gpus": N_GPUS, "n_cpus": args.cpus, "reuse_actors": args.reuse_actors, "runs": {},
           "gpu_memory_gb": gpu_memory_gb(timeout_s=120)}  # None: logical GPUs, torch sees no CUDA
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            result = run(mode, trials, seconds, Path(tmp), args.wait_timeout_s, args.time_budget_s, args.reuse_actors)
            occ, makespan = occupancy(result["records"], N_GPUS)
            result |= {"occupancy": occ, "makespan_s": makespan}
            out["runs"][mode] = result
            how = "largest first" if mode == "packed" else f"max_concurrent_trials={result['concurrency']}, grid order"
            print(f"{mode:>6} ({how}): {len(result['records'])}/{result['n_trials']} trials, makespan "
                  f"{makespan:.1f} s, occupancy {occ:.3f}, errors {len(result['errors'])}", flush=True)  # fmt: skip
    ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    runs = out["runs"]
    if "packed" in runs and "today" in runs:
        new, old = runs["packed"]["occupancy"], runs["today"]["occupancy"]
        print(f"occupancy {new:.2f} (one-at-a-time {old:.2f}, {new / old:.2f}x)")


if __name__ == "__main__":
    main()
