"""Heterogeneous packing on Ray Tune: `PackingSearcher` on its own, then a mixed grid of sleeping trials
(0.25, 0.5, 1, 2 and 4 logical GPUs; 1, 2 and 4 workers) on a real local Ray cluster with 4 CPUs and
4 logical GPUs, run by benchmarks/schedule_occupancy.py in a fresh process (its own cluster, so it
never touches the session's): trials overlap, every trial is admitted as soon as it fits, every
admitted trial's worker bundles are placed at once (no deadlock), and every trial runs once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clmscale.engine.admission import DATA_CPUS, TRIAL_CPU, AdmissionController, Bundle, Node, TrialNeed

REPO = Path(__file__).resolve().parents[1]


def _need(gpus: float, workers: int = 1) -> TrialNeed:
    return TrialNeed((Bundle(0.25, gpus),) * workers, trial_cpus=0.01)


def test_searcher_hands_out_what_fits_largest_first_and_releases_on_completion(tmp_path):
    from ray.tune.search import Searcher

    from clmscale.engine.packing import PackingSearcher

    names = ["quarter", "half", "one", "two", "four"]
    needs = [_need(0.25), _need(0.5), _need(1.0), _need(1.0, 2), _need(1.0, 4)]
    searcher = PackingSearcher([{"cfg": {"name": n}} for n in names], needs, names, [Node(cpus=4, gpus=4)],
                               reserved_cpus=1.0)  # fmt: skip
    assert searcher.suggest("t1") == {"cfg": {"name": "four"}}
    assert searcher.suggest("t2") is None  # the cluster is full: Tune asks again later
    searcher.on_trial_complete("t1")
    got = [searcher.suggest(f"t{i}")["cfg"]["name"] for i in range(3, 7)]
    assert got == ["two", "one", "half", "quarter"]  # 2 + 1 + 0.5 + 0.25 GPUs fit at once
    path = tmp_path / "searcher.json"
    searcher.save(str(path))
    assert json.loads(path.read_text()) == {"pending": [], "running": ["half", "one", "quarter", "two"],
                                            "ready": []}
    assert searcher.suggest("t7") == Searcher.FINISHED
    for i in range(3, 7):
        searcher.on_trial_complete(f"t{i}")
    searcher.save(str(path))
    assert json.loads(path.read_text())["running"] == []
    with pytest.raises(ValueError, match=r"trial 'eight' needs 2.01 CPUs and 8 GPUs .* 4 CPUs and 4 GPUs"):
        PackingSearcher([{}], [_need(1.0, 8)], ["eight"], [Node(cpus=4, gpus=4)], reserved_cpus=1.0)


def test_searcher_honours_a_cap_on_concurrent_trials():
    from clmscale.engine.packing import PackingSearcher

    names = [f"q{i}" for i in range(4)]
    searcher = PackingSearcher([{"n": n} for n in names], [_need(0.25)] * 4, names, [Node(cpus=4, gpus=4)],
                               reserved_cpus=1.0, max_concurrent=2)  # fmt: skip
    assert [searcher.suggest("a"), searcher.suggest("b"), searcher.suggest("c")] == [{"n": "q0"}, {"n": "q1"}, None]
    searcher.on_trial_complete("a")
    assert searcher.suggest("d") == {"n": "q2"}


def admission_waits(records: list[dict], n_cpus: float, n_gpus: int) -> dict[str, float]:
    """Per trial: seconds from the moment it last began to fit what was free to its admission.

    Replays the recorded admissions and releases (a trial holds its resources from admission to
    the removal of its placement group) through an `AdmissionController` of the same cluster, and
    after every event asks which trials not yet admitted would fit.
    """
    need = {r["name"]: TrialNeed(tuple(Bundle(c, g) for c, g in r["bundles"]), trial_cpus=TRIAL_CPU) for r in records}
    events = sorted([(r["released"], 0, r["name"]) for r in records] + [(r["admitted"], 1, r["name"]) for r in records])
    ledger = AdmissionController([Node(cpus=n_cpus, gpus=n_gpus)], reserved_cpus=DATA_CPUS)
    waiting = {r["name"] for r in records}
    fits_since: dict[str, float | None] = dict.fromkeys(waiting, events[0][0])  # before the first event all fit
    waits = {}
    for t, kind, name in events:
        if kind == 0:
            ledger.release(name)
        else:
            ledger.add(name, need[name])
            assert ledger.admit() == [name], f"{name} was admitted at {t} but does not fit the replayed ledger"
            waiting.discard(name)
            waits[name] = t - (fits_since[name] if fits_since[name] is not None else t)
        for other in waiting:
            if not ledger.fits_now(need[other]):
                fits_since[other] = None
            elif fits_since[other] is None:
                fits_since[other] = t
    return waits


@pytest.mark.timeout(420)
def test_mixed_grid_packs_on_a_real_local_cluster(tmp_path):
    out = tmp_path / "occupancy.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "schedule_occupancy.py"), "--modes", "packed", "--cpus", "4",
           "--seeds", "1", "--longest-s", "10", "--reuse-actors", "--wait-timeout-s", "60", "--time-budget-s", "300", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["gpu_memory_gb"] is None  # logical GPUs: torch sees no CUDA, so no memory to plan with
    run = result["runs"]["packed"]
    records, n_gpus = run["records"], 4
    assert run["errors"] == [] and len(records) == run["n_trials"] == 10  # every trial ran, once
    assert sorted(r["name"] for r in records) == sorted({r["name"] for r in records})
    for r in records:  # each held its bundles for its whole planned time, on as many GPUs as it asked
        assert r["released"] - r["ready"] >= r["seconds"] - 0.05
        assert len(r["gpu_ids"]) == len(r["bundles"]) and all(len(ids) == max(1, int(g)) for (_, g), ids in
                                                              zip(r["bundles"], r["gpu_ids"], strict=True))

    # no deadlock: the bundles of every admitted trial were placed as soon as the trial asked
    placement = {r["name"]: r["ready"] - r["entered"] for r in records}
    assert max(placement.values()) < 5.0, placement

    # trials of different sizes overlap, and the cluster is never over-committed. Admitted (the
    # scheduler's decision) at once: 1 + 1 + 0.5 + 0.5 + 0.25 + 0.25 GPUs. Holding their bundles at
    # once: fewer, as Tune starts one new trial actor every few seconds on this 2-core machine.
    def overlaps(start: str) -> list[list[dict]]:
        return [[r for r in records if r[start] <= t < r["released"]] for t in sorted({r[start] for r in records})]

    admitted, held = overlaps("admitted"), overlaps("ready")
    assert max(len(c) for c in admitted) >= 4 and max(len({r["gpus"] for r in c}) for c in admitted) >= 3
    assert max(len({r["gpus"] for r in c}) for c in held) >= 2
    assert all(sum(r["gpus"] for r in c) <= n_gpus + 1e-9 for c in admitted + held)

    # no trial waits for admission while enough GPUs are free for it (slack: Tune's control loop)
    waits = admission_waits(records, n_cpus=4, n_gpus=n_gpus)
    latency = {r["name"]: r["entered"] - r["admitted"] for r in records}
    print(f"admission waits max {max(waits.values()):.2f} s; Tune actor start after admission max "
          f"{max(latency.values()):.1f} s; occupancy {run['occupancy']:.2f}")
    assert max(waits.values()) <= 2.0, waits


def test_the_wait_replay_sees_a_trial_left_waiting():
    """The check above can fail: a quarter-GPU trial admitted 5 s after the GPU it needs freed up."""
    big = {"name": "big", "bundles": [[0.25, 1.0]] * 4, "admitted": 0.0, "released": 10.0}
    late = {"name": "late", "bundles": [[0.25, 0.25]], "admitted": 15.0, "released": 20.0}
    prompt = {"name": "prompt", "bundles": [[0.25, 0.5]], "admitted": 10.1, "released": 12.0}
    waits = admission_waits([big, late, prompt], n_cpus=4, n_gpus=4)
    assert waits["big"] == 0.0 and waits["prompt"] == pytest.approx(0.1) and waits["late"] == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------
# the same mixed grid as real tiny sweeps: packed, then one trial at a time, on one local cluster

# four tiny RoBERTa rungs (the xxs shape under four names), one per resource shape: 0.25, 0.5 and 1 GPU
# on one worker, 2 GPUs over two workers (3.75 of the 4 logical GPUs: all fit at once)
RUNG = {"n_layer": 1, "d_model": 16, "n_head": 2}
SHAPES = {"quarter": {"gpus_per_worker": 0.25}, "half": {"gpus_per_worker": 0.5}, "one": {"gpus_per_worker": 1.0},
          "two": {"gpus_per_worker": 1.0, "workers": 2, "micro_batch_size": 16}}
MIXED_TIMEOUT_S = 1200  # measured at load 35-84 on 2 cores: packed 287 s + one at a time 487 s = 822 s


def mixed_sweeps(work: Path) -> None:
    """Cluster of 4 CPUs and 4 logical GPUs; the grid packed, then with max_concurrent_trials 1, each into
    its own run directory (the second gets a copy of the first's prepared data); the times to work/observed.json."""
    import shutil
    import time

    import ray
    from test_multinode import _free_port
    from test_sweep import write_sweep

    from clmscale.engine.config import load_sweep
    from clmscale.engine.rundir import RunDir
    from clmscale.engine.sweep import run_sweep

    observed: dict = {}
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), object_store_memory=200 * 1024**2)  # fmt: skip
    try:
        for mode, cap in (("packed", None), ("serial", 1)):
            path = write_sweep(work, mode, [{"name": n, **RUNG} for n in SHAPES], [1e4], checkpoints=1,
                               resources={"workers": 1, "cpus_per_worker": 0.5, "max_failures": 0,
                                          "max_concurrent_trials": cap})  # fmt: skip
            doc = yaml.safe_load(path.read_text())
            doc["model"]["overrides"] = SHAPES
            doc["train"]["zero_stage"] = 0
            path.write_text(yaml.safe_dump(doc))
            cfg = load_sweep(path)
            rd = RunDir(cfg.run_dir)
            if mode == "serial":  # the same shards and tokenizer, not a second prepare
                shutil.copytree(work / "runs" / "packed" / "data", rd.data.path)
            t0 = time.monotonic()
            run_sweep(cfg)
            observed[mode] = {"run_dir": str(rd.root), "sweep_s": time.monotonic() - t0}
            (work / "observed.json").write_text(json.dumps(observed, indent=1))
    finally:
        ray.shutdown()


@pytest.mark.slow  # run by `make test` like every slow test; nothing deselects them
@pytest.mark.timeout(MIXED_TIMEOUT_S + 90)
def test_mixed_sweep_packs_real_trials_and_matches_one_at_a_time(tmp_path):
    """Real trials (Ray Train + DeepSpeed on CPU) of 0.25, 0.5, 1 and 2 logical GPUs: packed, they all
    train at once; their losses and weights are bit-identical to the same grid run one trial at a time
    (CPU training is deterministic: each trial's batches, masks and seeds come from its own config)."""
    from safetensors.torch import load_file
    from test_multinode import run_scenario

    from clmscale.engine.rundir import RunDir

    outcome = run_scenario(__file__, tmp_path, prefix="clm-pk-", timeout_s=MIXED_TIMEOUT_S)
    outcome.check("the sweeps")
    observed = outcome.observed

    packed, serial = (RunDir(Path(observed[m]["run_dir"])) for m in ("packed", "serial"))
    trials = sorted(f"{n}_10ktok_s0" for n in SHAPES)

    def spans(rd: RunDir) -> dict[str, tuple[float, float]]:
        """Per trial: (its Tune actor began: trial.json written, it ended: result.json written)."""
        folders = {t: rd.trial(t).path for t in trials}
        return {t: ((f / "trial.json").stat().st_mtime, (f / "result.json").stat().st_mtime)
                for t, f in folders.items()}

    # every trial finished, once
    for rd in (packed, serial):
        assert all(rd.trial(t).result().status == "finished" for t in trials)
        assert all(len(rd.trial(t).nodes()) == 1 for t in trials)  # no restart
    # packed: all four fit the idle cluster, so none waited for another to end; one at a time: none overlapped
    together = spans(packed)
    assert max(s for s, _ in together.values()) < min(e for _, e in together.values()), together
    alone = sorted(spans(serial).values())
    assert all(e <= s for (_, e), (s, _) in zip(alone, alone[1:], strict=False)), alone
    print(f"packed {observed['packed']['sweep_s']:.0f} s, one at a time {observed['serial']['sweep_s']:.0f} s")

    # the same numbers: every loss, token and FLOP count of pretrain.parquet, and every checkpoint's weights
    same = ["trial_id", "checkpoint", "tokens", "flops", "step", "train_loss", "val_loss", "n_params", "status"]
    a, b = (rd.read_table("pretrain").sort_values("trial_id").reset_index(drop=True) for rd in (packed, serial))
    assert len(a) == len(trials) and a[same].equals(b[same]), (a[same], b[same])
    for ck in a["checkpoint"]:
        ours, theirs = (load_file(rd.path(ck) / "model.safetensors") for rd in (packed, serial))
        assert ours.keys() == theirs.keys() and all(torch_equal(ours[k], theirs[k]) for k in ours), ck


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_multinode, test_sweep, conftest
    mixed_sweeps(Path(sys.argv[1]))
