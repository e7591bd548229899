"""The admission ledger without Ray: placement like Ray's raylet, largest first with backfilling,
nothing admitted beyond capacity, nothing left waiting while it fits, refusals with the numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import pulled_in

from clmscale.engine.admission import (
    DATA_CPUS,
    TRIAL_CPU,
    AdmissionController,
    Bundle,
    Node,
    TrialNeed,
    copies_that_fit,
    trial_need,
)
from clmscale.engine.config import ResourcesConfig


def need(gpus_per_worker: float, workers: int = 1, cpus_per_worker: float = 0.25) -> TrialNeed:
    return TrialNeed(bundles=(Bundle(cpus_per_worker, gpus_per_worker),) * workers, trial_cpus=TRIAL_CPU)


def test_fractional_gpus_go_best_fit_and_whole_gpus_stay_whole():
    ledger = AdmissionController([Node(cpus=16, gpus=4)], reserved_cpus=1)
    ledger.add("half", need(0.5))
    assert ledger.admit() == ["half"]  # on GPU 0
    ledger.add("quarter", need(0.25))
    assert ledger.admit() == ["quarter"]  # best fit: GPU 0 (0.5 free), not an empty GPU
    for i in range(3):
        ledger.add(f"whole{i}", need(1.0))
    assert sorted(ledger.admit()) == ["whole0", "whole1", "whole2"]  # GPUs 1-3 were left whole
    ledger.add("another quarter", need(0.25))
    assert ledger.admit() == ["another quarter"]  # GPU 0's last quarter
    assert ledger.free_gpus == pytest.approx(0.0)
    ledger.add("one more", need(0.25))
    assert ledger.admit() == []


def test_a_whole_gpu_trial_waits_while_the_free_gpu_is_split():
    ledger = AdmissionController([Node(cpus=16, gpus=2)], reserved_cpus=1)
    ledger.add("a", need(0.5))
    ledger.add("b", need(1.0))
    assert ledger.admit() == ["b", "a"]  # largest first
    ledger.add("c", need(0.75))  # 0.5 free on one GPU: does not fit
    assert ledger.admit() == []
    ledger.release("a")
    assert ledger.admit() == ["c"]


def test_largest_first_with_backfilling():
    ledger = AdmissionController([Node(cpus=16, gpus=4)], reserved_cpus=1)
    for key, n in [("small0", need(0.25)), ("small1", need(0.25)), ("big", need(1.0, workers=3)), ("mid", need(1.0))]:
        ledger.add(key, n)
    assert ledger.admit() == ["big", "mid"]  # 3 + 1 GPUs: the smalls wait
    ledger.add("big2", need(1.0, workers=2))
    ledger.release("mid")  # one GPU free: big2 (2) cannot start, the smalls can
    assert ledger.admit() == ["small0", "small1"]
    ledger.release("big")
    ledger.add("never runs", need(0.25))
    ledger.withdraw("never runs")  # e.g. found finished on resume
    assert ledger.admit() == ["big2"]
    with pytest.raises(ValueError, match="not queued"):
        ledger.withdraw("big2")


def test_the_reserved_cpu_stays_free_and_an_impossible_trial_is_refused_by_name():
    ledger = AdmissionController([Node(cpus=4, gpus=0)], reserved_cpus=DATA_CPUS)
    ledger.add("fits", TrialNeed((Bundle(1.5),) * 2, trial_cpus=0.0))  # 3 CPUs: exactly the rest
    assert ledger.admit() == ["fits"]
    with pytest.raises(ValueError, match=r"trial 'too big' needs 3.01 CPUs .* 4 CPUs and 0 GPUs .*1 CPU kept free"):
        ledger.add("too big", TrialNeed((Bundle(1.5),) * 2, trial_cpus=TRIAL_CPU))
    with pytest.raises(ValueError, match="already queued"):
        ledger.add("fits", need(0.0))
    with pytest.raises(KeyError, match="not known"):
        ledger.release("never added")


def test_bundles_spill_to_another_node_and_ray_data_needs_its_cpu_on_one_node():
    nodes = [Node(cpus=3, gpus=2), Node(cpus=3, gpus=2)]
    ledger = AdmissionController(nodes, reserved_cpus=1)
    ledger.add("four workers", need(1.0, workers=4, cpus_per_worker=0.5))
    assert ledger.admit() == ["four workers"]  # two on each node
    assert ledger.free_gpus == 0
    # two 2-CPU workers leave one whole CPU on each node: fine; two 2.5-CPU workers leave none
    ledger2 = AdmissionController(nodes, reserved_cpus=1)
    ledger2.add("ok", TrialNeed((Bundle(2.0), Bundle(2.0)), trial_cpus=0.0))
    assert ledger2.admit() == ["ok"]
    ledger3 = AdmissionController(nodes, reserved_cpus=1)
    with pytest.raises(ValueError, match="starves data"):  # 0.5 CPU left on each node: Ray Data would hang
        ledger3.add("starves data", TrialNeed((Bundle(2.5), Bundle(2.5)), trial_cpus=0.0))


def test_random_grids_never_overcommit_and_nothing_waits_that_fits():
    """Replay random mixed grids with random durations: capacity is never exceeded, after every
    admit no pending trial fits what is free, and every trial runs."""
    rng = np.random.default_rng(0)
    shapes = [(0.25, 1), (0.5, 1), (1.0, 1), (1.0, 2), (1.0, 4), (0.0, 1)]
    for _ in range(200):
        n_gpus = int(rng.integers(1, 9))
        nodes = [Node(cpus=float(rng.integers(2, 17)), gpus=n_gpus)]
        ledger = AdmissionController(nodes, reserved_cpus=1)
        needs = {}
        for k in range(int(rng.integers(1, 15))):
            g, w = shapes[int(rng.integers(len(shapes)))]
            n = need(g, workers=w, cpus_per_worker=float(rng.choice([0.25, 0.5, 1.0])))
            if ledger.fits_empty(n):
                ledger.add(k, n, priority=(float(rng.random()),))
                needs[k] = n
        running: dict[int, float] = {}
        now, started = 0.0, set()
        while ledger.pending or running:
            for k in ledger.admit():
                running[k] = now + float(rng.exponential())
                started.add(k)
            assert ledger.free_gpus >= -1e-9 and ledger.free_cpus >= 1 - 1e-9
            for k in ledger.pending:
                assert not ledger.fits_now(needs[k]), f"trial {k} fits but waits"
            k = min(running, key=running.get)
            now = running.pop(k)
            ledger.release(k)
        assert started == set(needs)
        assert ledger.free_gpus == pytest.approx(n_gpus)


def test_copies_that_fit_on_one_node_is_the_arithmetic_of_cpus_and_gpus():
    """On one node, how many copies fit is min over CPUs (less Ray Data's) and GPUs: the concurrency the
    sweep used to cap a whole grid at (the one-at-a-time baseline of benchmarks/schedule_occupancy.py)."""
    from clmscale.engine.train import smoke_trial

    nodes = [Node(cpus=16, gpus=4)]
    for workers, cpus, gpus in [(1, 2, 0.25), (1, 4, 0.5), (1, 1, 1.0), (2, 1, 1.0), (4, 3, 1.0), (1, 1, 0.0)]:
        trial = smoke_trial().model_copy(update={"resources": ResourcesConfig(workers=workers, cpus_per_worker=cpus,
                                                                              gpus_per_worker=gpus)})  # fmt: skip
        got = copies_that_fit(trial_need(trial.resources, TRIAL_CPU), nodes, DATA_CPUS)
        need_cpu, need_gpu = workers * cpus + TRIAL_CPU, workers * gpus
        by_cpu = math.floor((16 - DATA_CPUS) / need_cpu)
        expected = min(by_cpu, math.floor(4 / need_gpu + 1e-9)) if need_gpu else by_cpu
        assert got == expected, (workers, cpus, gpus)


def test_admission_imports_no_ray():
    assert pulled_in("clmscale.engine.admission, clmscale.engine.plan", {"ray"}) == []
