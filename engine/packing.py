"""Heterogeneous packing of the pretraining grid on Ray Tune: a Searcher that hands Tune a trial
only when the cluster has room for the trial's whole worker group.

Mechanism. Tune asks its search algorithm for the next trial at every step of its control loop
(`TuneController._maybe_update_trial_queue`); a `Searcher.suggest` that returns None makes Tune
skip that step and ask again later, FINISHED ends the stream (ray/tune/search/searcher.py,
search_generator.py). `PackingSearcher` keeps the grid in an `engine.admission.AdmissionController`
and answers `suggest` with the largest pending trial that fits the ledger's free resources (a
smaller one when the largest does not fit: backfilling), or None. `on_trial_complete` (called
once per trial, after Tune's own retries of a failed actor) gives its resources back. The ledger
counts each admitted trial's Tune actor and every worker bundle of its TorchTrainer, and keeps
one CPU for Ray Data, so every admitted trial's worker group can be placed at once: no trial's
workers ever wait for resources a sibling trial holds.

Two settings make Tune drain the searcher: `TuneConfig(num_samples=len(configs))` (else a
SearchGenerator stops after one sample) and `max_concurrent_trials=len(configs)`, which wraps the
searcher in a ConcurrencyLimiter that never limits but raises Tune's `_max_pending_trials` for a
custom searcher from 1 to the grid size, so every trial that fits is started in the same step
(tune_controller.py `_get_max_pending_trials`).

Limits: the ledger is built from the nodes alive when the sweep starts; a node lost mid-sweep is
still counted (its trials are restarted by Tune and may wait for room until others finish), and
nodes an autoscaler adds are not used for packing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import ray
from ray.tune.search import Searcher

from engine.admission import AdmissionController, Node, TrialNeed, largest_first


class PackingSearcher(Searcher):
    """Hands out `configs[i]` (the grid point of trial `names[i]`) when `needs[i]` fits.

    `costs[i]` (e.g. the planner's wall-hours) breaks ties between trials of the same size:
    longest first. `max_concurrent` caps the trials running at once (`resources.max_concurrent_trials`).
    Raises ValueError, naming the trial, when one cannot fit even the idle cluster.
    """

    def __init__(
        self,
        configs: Sequence[dict],
        needs: Sequence[TrialNeed],
        names: Sequence[str],
        nodes: Sequence[Node],
        *,
        reserved_cpus: float,
        costs: Sequence[float] | None = None,
        max_concurrent: int | None = None,
    ):
        super().__init__()
        if not len(configs) == len(needs) == len(names):
            raise ValueError(f"got {len(configs)} configs, {len(needs)} needs and {len(names)} names")
        if len(set(names)) != len(names):
            raise ValueError("trial names must be unique")
        self._configs = dict(zip(names, configs, strict=True))
        self._ledger = AdmissionController(list(nodes), reserved_cpus)
        for i, (name, need) in enumerate(zip(names, needs, strict=True)):
            self._ledger.add(name, need, largest_first(need, costs[i] if costs is not None else 0.0))
        self._max_concurrent = max_concurrent
        self._ready: list[str] = []  # admitted by the ledger, not yet handed to Tune
        self._live: dict[str, str] = {}  # Tune's trial id -> our trial name

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the grid comes from `configs`; Tune's param_space should be {}

    # Ray's annotation omits Searcher.FINISHED, the str that ends the stream
    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]
        if not self._ready:
            self._ready = cast(list[str], self._ledger.admit(self._max_concurrent))  # the names added above
        if self._ready:
            name = self._ready.pop(0)
            self._live[trial_id] = name
            return copy.deepcopy(self._configs[name])
        return Searcher.FINISHED if not self._ledger.pending else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        name = self._live.pop(trial_id, None)
        if name is not None:
            self._ledger.release(name)

    def save(self, checkpoint_path: str) -> None:
        """What Tune's experiment checkpoint keeps of the searcher: the trials still waiting and those
        running, as JSON for a person to read. There is no `restore`: `clmscale sweep --resume` builds
        a new searcher over the trials whose folders hold no result (engine.sweep.run_sweep)."""
        state = {"pending": [str(k) for k in self._ledger.pending], "running": sorted(self._live.values()),
                 "ready": list(self._ready)}
        Path(checkpoint_path).write_text(json.dumps(state, indent=1))


def ray_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, as the ledger sees them."""
    return [
        Node(cpus=float(n["Resources"].get("CPU", 0.0)), gpus=int(n["Resources"].get("GPU", 0)))
        for n in ray.nodes()
        if n["Alive"]
    ]


def gpu_memory_gb(timeout_s: float = 120.0) -> float | None:
    """Total memory of one of the cluster's GPUs, asked of a GPU node; None when the cluster has no
    GPU that torch can see (e.g. logical GPUs on a CPU test cluster). For `choose`'s gpu_memory_gb."""
    if ray.cluster_resources().get("GPU", 0) <= 0:
        return None
    ref = _device_memory_bytes.remote()
    total = ray.get(ref, timeout=timeout_s)
    return None if total is None else total / 1e9


@ray.remote(num_cpus=0.01, num_gpus=0.01)
def _device_memory_bytes() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
