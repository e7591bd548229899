"""Admission control for a grid of trials of different sizes: start a trial only when its whole
worker group fits what is free, largest first, and give its resources back when it ends.

Why a ledger of our own: a Tune trial reserves only its own actor (`engine.sweep.TRIAL_CPU`); its
Ray Train worker group asks for the real resources later, from inside the trial. Tune cannot see
those, so it either starts too many trials (their worker groups then wait on each other's
resources, the deadlock of /work/shared/notes/ray-deepspeed-on-cpu.md) or, capped by the largest
trial, runs a mixed grid one trial at a time. The ledger below counts, for every admitted trial,
its actor and all of its worker bundles, and keeps `reserved_cpus` (Ray Data's CPU) free on one
node, so every admitted worker group can always be placed.

Placement copies what Ray 2.60's raylet does (src/ray/common/scheduling/resource_instance_set.cc,
`TryAllocate`): a bundle with a fractional GPU (0 < g < 1) goes on the GPU with the least room
left that still fits it (best fit, lowest index on ties), a whole-GPU bundle takes whole free GPUs,
lowest index first; a trial's bundles stay on one node when they can (Ray Train's default PACK
placement group), else spill to the next node that fits. Quantities are Ray's fixed point, 1e-4.

Autoscaling clusters: the ledger admits against the nodes that are up (`sync_nodes` adds the ones
an autoscaler brought and drops the ones it took away), but it refuses up front only a trial that
cannot fit its `ceiling`, the nodes the cluster can grow to (`engine/capacity.py`). A trial that fits
the ceiling and not the nodes up now waits; `wanted` names the trials a grown cluster would start,
whose bundles `engine/packing.py` asks the autoscaler for.

No ray import: `AdmissionController` is a plain class; `engine/packing.py` plugs it into Tune and
`engine/plan.py` replays it to estimate a grid's makespan.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from clmscale.engine.config import ResourcesConfig

_UNIT = 10_000  # Ray's FixedPoint resolution (1e-4)
UNBOUNDED_CPUS = 1e6  # the CPUs of a planned node whose CPUs were not given: "enough"

# What a sweep's trial holds besides its workers, and what the cluster keeps free. engine/sweep.py
# has the same two numbers (TRIAL_CPU, DATA_CPUS); they belong here, where they are counted.
TRIAL_CPU = 0.01  # the Tune function only waits on its trainer; Train V2's controller takes 0 CPUs
DATA_CPUS = 1.0  # one whole CPU kept free: Ray Data's read and map tasks each ask for 1 (they hang without it)


def _fixed(x: float) -> int:
    return round(x * _UNIT)


@dataclass(frozen=True)
class Bundle:
    """One Ray Train worker's resources."""

    cpus: float
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.gpus > 1 and not float(self.gpus).is_integer():
            raise ValueError(f"a bundle's GPUs above 1 must be whole, as in Ray (got {self.gpus})")
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"bundle resources must be >= 0 (got cpus={self.cpus}, gpus={self.gpus})")


@dataclass(frozen=True)
class TrialNeed:
    """Everything one running trial holds: its Tune actor's CPU and its worker bundles."""

    bundles: tuple[Bundle, ...]
    trial_cpus: float

    @property
    def cpus(self) -> float:
        return self.trial_cpus + sum(b.cpus for b in self.bundles)

    @property
    def gpus(self) -> float:
        return sum(b.gpus for b in self.bundles)


def trial_need(resources: ResourcesConfig, trial_cpus: float) -> TrialNeed:
    """A trial's need from its `resources` section; `trial_cpus` is the Tune actor's own share."""
    bundle = Bundle(cpus=resources.cpus_per_worker, gpus=resources.gpus_per_worker)
    return TrialNeed(bundles=(bundle,) * resources.workers, trial_cpus=trial_cpus)


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: int = 0
    node_id: str = ""  # Ray's node id, for nodes that come and go; "" for a planned node


def largest_first(need: TrialNeed, cost: float = 0.0) -> tuple[float, ...]:
    """Sort key (ascending = first): most GPUs, then most CPUs, then the longest expected run."""
    return (-need.gpus, -need.cpus, -cost)


@dataclass
class _NodeState:
    node: Node
    cpu_free: int = field(init=False)  # fixed point
    gpu_free: list[int] = field(init=False)  # fixed point, one entry per GPU instance
    alive: bool = True  # False once the node left: nothing new is placed there

    def __post_init__(self) -> None:
        self.cpu_free, self.gpu_free = _fixed(self.node.cpus), [_UNIT] * int(self.node.gpus)


@dataclass(frozen=True)
class _Placement:
    cpu: tuple[tuple[int, int], ...]  # (node, fixed-point CPUs)
    gpu: tuple[tuple[int, int, int], ...]  # (node, GPU instance, fixed-point share)


@dataclass
class _Entry:
    need: TrialNeed
    priority: tuple[float, ...]
    order: int
    placement: _Placement | None = None


@dataclass
class AdmissionController:
    """The cluster's free resources and the trials waiting for them.

    `add` queues a trial, `admit` starts every queued trial that fits now (in priority order,
    smaller ones filling the gaps a larger one cannot use), `release` frees a finished trial.
    A trial that could not fit even the empty cluster (its `ceiling`, when it can grow) is refused
    by `add`, so nothing waits forever.
    """

    nodes: Sequence[Node]
    reserved_cpus: float = 0.0  # kept free on at least one node (Ray Data's tasks need a whole CPU there)
    ceiling: Sequence[Node] | None = None  # the nodes the cluster can grow to; None: `nodes`, fixed
    _state: list[_NodeState] = field(init=False)
    _entries: dict[Hashable, _Entry] = field(init=False, default_factory=dict)
    _n_added: int = field(init=False, default=0)  # tie-breaker: among equal priorities, first added first

    def __post_init__(self) -> None:
        if not self.nodes and not self.ceiling:
            raise ValueError("the cluster needs at least one node")
        self._state = [_NodeState(n) for n in self.nodes]

    @property
    def limit_nodes(self) -> Sequence[Node]:
        """The largest cluster the trials can ever have: the ceiling, or the nodes when fixed."""
        return self.ceiling if self.ceiling is not None else self.nodes

    # ---- queries ---------------------------------------------------------------------------

    @property
    def pending(self) -> list[Hashable]:
        """Queued trials in the order `admit` considers them."""
        waiting = [(e.priority, e.order, k) for k, e in self._entries.items() if e.placement is None]
        return [k for *_, k in sorted(waiting, key=lambda t: (t[0], t[1]))]

    @property
    def running(self) -> list[Hashable]:
        return [k for k, e in self._entries.items() if e.placement is not None]

    @property
    def alive_nodes(self) -> list[Node]:
        """The nodes the ledger places on now."""
        return [s.node for s in self._state if s.alive]

    def need(self, key: Hashable) -> TrialNeed:
        return self._entries[key].need

    @property
    def free_gpus(self) -> float:
        return sum(sum(s.gpu_free) for s in self._state) / _UNIT

    @property
    def free_cpus(self) -> float:
        return sum(s.cpu_free for s in self._state) / _UNIT

    def fits_now(self, need: TrialNeed) -> bool:
        placement = self._place(need)
        if placement is None:
            return False
        self._undo(placement)
        return True

    def fits_empty(self, need: TrialNeed) -> bool:
        """Whether the trial fits the whole cluster, grown to its ceiling, with nothing else running."""
        return AdmissionController(self.limit_nodes, self.reserved_cpus).fits_now(need)

    def capacity_text(self) -> str:
        text = nodes_text(self.limit_nodes)
        if self.ceiling is not None:
            text = f"at most {text} once grown"
        return f"{text} ({self.reserved_cpus:g} CPU kept free for Ray Data)"

    def wanted(self, limit: int | None = None) -> list[Hashable]:
        """The queued trials a cluster grown to its ceiling would start now, beside those running (at
        most `limit` running in all), in admission order: what to ask an autoscaler for."""
        grown = AdmissionController(self.limit_nodes, self.reserved_cpus)
        for key in self.running:  # first, as they hold their resources already
            grown.add(key, self._entries[key].need, (-math.inf,))
        grown.admit()
        for key in self.pending:
            grown.add(key, self._entries[key].need, self._entries[key].priority)
        return grown.admit(limit)

    # ---- changes ---------------------------------------------------------------------------

    def sync_nodes(self, nodes: Sequence[Node]) -> bool:
        """Follow the cluster's alive nodes (each with its `node_id`): add the new ones, stop placing on
        those gone. Trials placed on a node that left keep their entry until released. True if changed."""
        alive = {n.node_id for n in nodes}
        changed = False
        for s in self._state:
            if s.node.node_id and s.alive and s.node.node_id not in alive:
                s.alive, changed = False, True
        known = {s.node.node_id for s in self._state if s.alive}
        for n in nodes:
            if n.node_id and n.node_id not in known:
                self._state.append(_NodeState(n))
                changed = True
        return changed

    def add(self, key: Hashable, need: TrialNeed, priority: tuple[float, ...] | None = None) -> None:
        if key in self._entries:
            raise ValueError(f"trial {key!r} is already queued or running")
        if not self.fits_empty(need):
            raise ValueError(
                f"trial {key!r} needs {need.cpus:g} CPUs and {need.gpus:g} GPUs ({_bundles_text(need)}), which "
                f"the cluster cannot hold even when idle: {self.capacity_text()}"
            )
        self._entries[key] = _Entry(need, priority if priority is not None else largest_first(need), self._n_added)
        self._n_added += 1

    def admit(self, limit: int | None = None) -> list[Hashable]:
        """Start every queued trial that fits now, largest first (at most `limit` of them, counting
        those already running); returns the keys it started, in that order."""
        started: list[Hashable] = []
        for key in self.pending:
            if limit is not None and len(self.running) >= limit:
                break
            entry = self._entries[key]
            entry.placement = self._place(entry.need)
            if entry.placement is not None:
                started.append(key)
        return started

    def release(self, key: Hashable) -> None:
        """A running trial ended (finished or failed for good): its resources are free again."""
        entry = self._entries.pop(key, None)
        if entry is None:
            raise KeyError(f"trial {key!r} is not known to the admission controller")
        if entry.placement is not None:
            self._undo(entry.placement)

    def withdraw(self, key: Hashable) -> None:
        """Forget a queued trial that will not run (e.g. found finished on resume)."""
        entry = self._entries.get(key)
        if entry is None or entry.placement is not None:
            raise ValueError(f"trial {key!r} is not queued")
        del self._entries[key]

    # ---- placement -------------------------------------------------------------------------

    def _place(self, need: TrialNeed) -> _Placement | None:
        """Commit a placement of the whole trial, or change nothing and return None."""
        cpu: list[tuple[int, int]] = []
        gpu: list[tuple[int, int, int]] = []
        used_nodes: list[int] = []
        alive = [i for i, s in enumerate(self._state) if s.alive]
        for bundle in need.bundles:
            order = used_nodes + [i for i in alive if i not in used_nodes]  # PACK
            for i in order:
                got = self._take_bundle(i, bundle)
                if got is not None:
                    cpu.append((i, _fixed(bundle.cpus)))
                    gpu.extend(got)
                    if i not in used_nodes:
                        used_nodes.append(i)
                    break
            else:
                self._undo(_Placement(tuple(cpu), tuple(gpu)))
                return None
        # the trial actor: on the node of its first worker when it has room, else anywhere
        actor = _fixed(need.trial_cpus)
        for i in used_nodes + [i for i in alive if i not in used_nodes]:
            if self._state[i].cpu_free >= actor:
                self._state[i].cpu_free -= actor
                cpu.append((i, actor))
                break
        else:
            self._undo(_Placement(tuple(cpu), tuple(gpu)))
            return None
        placement = _Placement(tuple(cpu), tuple(gpu))
        if max((self._state[i].cpu_free for i in alive), default=0) < _fixed(self.reserved_cpus):
            self._undo(placement)
            return None
        return placement

    def _take_bundle(self, node: int, bundle: Bundle) -> list[tuple[int, int, int]] | None:
        state = self._state[node]
        need_cpu, need_gpu = _fixed(bundle.cpus), _fixed(bundle.gpus)
        if state.cpu_free < need_cpu:
            return None
        taken: list[tuple[int, int, int]] = []
        if 0 < need_gpu < _UNIT:  # best fit: the instance with the least room left after
            fits = [(free - need_gpu, j) for j, free in enumerate(state.gpu_free) if free >= need_gpu]
            if not fits:
                return None
            _, j = min(fits)
            taken.append((node, j, need_gpu))
        elif need_gpu >= _UNIT:  # whole GPUs, lowest index first
            whole = [j for j, free in enumerate(state.gpu_free) if free == _UNIT][: need_gpu // _UNIT]
            if len(whole) < need_gpu // _UNIT:
                return None
            taken.extend((node, j, _UNIT) for j in whole)
        for _, j, share in taken:
            state.gpu_free[j] -= share
        state.cpu_free -= need_cpu
        return taken

    def _undo(self, placement: _Placement) -> None:
        for i, amount in placement.cpu:
            self._state[i].cpu_free += amount
        for i, j, share in placement.gpu:
            self._state[i].gpu_free[j] += share


def copies_that_fit(need: TrialNeed, nodes: Sequence[Node], reserved_cpus: float, limit: int = 10_000) -> int:
    """How many copies of one trial fit the idle cluster at once (0 when none does; at most `limit`).

    The minimum of this over a grid is the one-at-a-time baseline: the concurrency the sweep capped
    a whole grid at before packing, so one large trial set the concurrency of every small one.
    """
    ledger = AdmissionController(nodes, reserved_cpus)
    n = 0
    while n < limit and ledger.fits_now(need):
        ledger.add(n, need)
        ledger.admit()
        n += 1
    return n


def nodes_text(nodes: Sequence[Node]) -> str:
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    cpu_text = "unbounded" if cpus >= UNBOUNDED_CPUS else f"{cpus:g}"
    return f"{len(nodes)} node(s) with {cpu_text} CPUs and {gpus:g} GPUs in all"


def _bundles_text(need: TrialNeed) -> str:
    if not need.bundles:
        return "no worker bundles"
    b = need.bundles[0]
    return (
        f"{len(need.bundles)} worker bundle(s) of {b.cpus:g} CPUs / {b.gpus:g} GPUs"
        f" + {need.trial_cpus:g} CPU for the trial actor"
    )
