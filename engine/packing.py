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

Autoscaling. The searcher follows the cluster's alive nodes (`live_nodes`, polled at most every
`poll_s`): nodes an autoscaler adds are packed as soon as they are up, nodes that left get nothing
new. A trial that fits the `ceiling` (what the cluster can grow to, `engine.capacity`) but not the
nodes up now is held, not refused: the searcher asks the autoscaler (`request`, i.e.
`ray.autoscaler.sdk.request_resources`) for the bundles of the running trials and of the queued
ones a grown cluster would start, and admits them once their whole worker group fits the nodes
that arrived. Smaller trials keep filling what is free meanwhile. If nothing runs, nothing can be
admitted and the nodes did not change for `scale_up_timeout_s`, `suggest` raises `ScaleUpTimeout`
(naming the held trials and what was asked for) instead of waiting forever.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import ray
from ray.tune.search import Searcher

from clmscale.engine.admission import AdmissionController, Node, TrialNeed, largest_first, nodes_text


class ScaleUpTimeout(RuntimeError):
    """Queued trials wait for nodes the autoscaler did not bring, and nothing else runs."""


class PackingSearcher(Searcher):
    """Hands out `configs[i]` (the grid point of trial `names[i]`) when `needs[i]` fits.

    `costs[i]` (e.g. the planner's wall-hours) breaks ties between trials of the same size:
    longest first. `max_concurrent` caps the trials running at once (`resources.max_concurrent_trials`).
    Raises ValueError, naming the trial, when one cannot fit even the idle cluster (its `ceiling`).
    With `live_nodes` (a callable returning the alive nodes with their ids) the ledger follows the
    cluster; with `request` (called with a list of resource dicts) it asks an autoscaler for room.
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
        ceiling: Sequence[Node] | None = None,
        live_nodes: Callable[[], list[Node]] | None = None,
        request: Callable[[list[dict[str, float]]], None] | None = None,
        poll_s: float = 1.0,
        scale_up_timeout_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if not len(configs) == len(needs) == len(names):
            raise ValueError(f"got {len(configs)} configs, {len(needs)} needs and {len(names)} names")
        if len(set(names)) != len(names):
            raise ValueError("trial names must be unique")
        self._configs = dict(zip(names, configs, strict=True))
        self._ledger = AdmissionController(list(nodes), reserved_cpus, ceiling=ceiling)
        for i, (name, need) in enumerate(zip(names, needs, strict=True)):
            self._ledger.add(name, need, largest_first(need, costs[i] if costs is not None else 0.0))
        self._max_concurrent = max_concurrent
        self._ready: list[str] = []  # admitted by the ledger, not yet handed to Tune
        self._live: dict[str, str] = {}  # Tune's trial id -> our trial name
        self._live_nodes, self._request, self._clock = live_nodes, request, clock
        self._poll_s, self._timeout_s = poll_s, scale_up_timeout_s
        self._polled = -float("inf")
        self._asked: list[dict[str, float]] | None = None  # the last request to the autoscaler
        self._stalled_since: float | None = None  # nothing runs, nothing fits, no node came

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the grid comes from `configs`; Tune's param_space should be {}

    # Ray's annotation omits Searcher.FINISHED, the str that ends the stream
    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]
        nodes_changed = self._follow_nodes()
        if not self._ready:
            self._ready = cast(list[str], self._ledger.admit(self._max_concurrent))  # the names added above
        if self._ready:
            self._stalled_since = None
            name = self._ready.pop(0)
            self._live[trial_id] = name
            self._ask_for_room()
            return copy.deepcopy(self._configs[name])
        if not self._ledger.pending:
            return Searcher.FINISHED
        self._ask_for_room()
        self._check_stall(nodes_changed)
        return None

    @property
    def held(self) -> list[str]:
        """Queued trials that fit what the cluster can grow to but not what is free now."""
        return [str(k) for k in self._ledger.pending]

    @property
    def asked(self) -> list[dict[str, float]] | None:
        """The bundles last asked of the autoscaler (None: never asked)."""
        return self._asked

    def _follow_nodes(self) -> bool:
        if self._live_nodes is None or self._clock() - self._polled < self._poll_s:
            return False
        self._polled = self._clock()
        return self._ledger.sync_nodes(self._live_nodes())

    def _ask_for_room(self) -> None:
        """Ask the autoscaler for every running trial's bundles and those of the trials a grown cluster
        would start next (the request replaces the previous one; Ray keeps nodes up to honour it)."""
        if self._request is None:
            return
        keys = list(self._ledger.running) + self._ledger.wanted(self._max_concurrent)
        bundles = [{"CPU": self._ledger.reserved_cpus}] if self._ledger.reserved_cpus else []
        for key in keys:
            need = self._ledger.need(key)
            bundles += [{"CPU": b.cpus, **({"GPU": b.gpus} if b.gpus else {})} for b in need.bundles]
            bundles.append({"CPU": need.trial_cpus})
        if bundles != self._asked:
            self._request(bundles)
            self._asked = bundles

    def _check_stall(self, nodes_changed: bool) -> None:
        if self._ledger.running or nodes_changed:
            self._stalled_since = None
            return
        now = self._clock()
        if self._stalled_since is None:
            self._stalled_since = now
        elif now - self._stalled_since > self._timeout_s:
            up, asked = nodes_text(self._ledger.alive_nodes), _bundles_summary(self._asked)
            raise ScaleUpTimeout(
                f"trials {', '.join(self.held)} wait for room that did not come in {self._timeout_s:g} s "
                f"(resources.scale_up_timeout_s): nothing runs, the cluster has {up}, and "
                f"{len(self._asked or [])} bundle(s) were asked of the autoscaler ({asked}); "
                "check `ray status` for nodes that failed to launch, or lower resources.cluster_max"
            )

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        name = self._live.pop(trial_id, None)
        if name is not None:
            self._ledger.release(name)

    def save(self, checkpoint_path: str) -> None:
        """What Tune's experiment checkpoint keeps of the searcher: the trials still waiting and those
        running, as JSON for a person to read. There is no `restore`: `clmscale sweep --resume` builds
        a new searcher over the trials whose folders hold no result (engine.sweep.run_sweep)."""
        state = {
            "pending": [str(k) for k in self._ledger.pending],
            "running": sorted(self._live.values()),
            "ready": list(self._ready),
        }
        Path(checkpoint_path).write_text(json.dumps(state, indent=1))


def ray_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, as the ledger sees them."""
    return [
        Node(cpus=float(n["Resources"].get("CPU", 0.0)), gpus=int(n["Resources"].get("GPU", 0)), node_id=n["NodeID"])
        for n in ray.nodes()
        if n["Alive"]
    ]


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler to make room for all `bundles` at once (an empty list withdraws
    the request). A no-op on a cluster without an autoscaler."""
    from ray.autoscaler.sdk import request_resources as ask

    ask(bundles=bundles)


def _bundles_summary(bundles: list[dict[str, float]] | None) -> str:
    cpus = sum(b.get("CPU", 0.0) for b in bundles or [])
    gpus = sum(b.get("GPU", 0.0) for b in bundles or [])
    return f"{cpus:g} CPUs and {gpus:g} GPUs in all"


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
