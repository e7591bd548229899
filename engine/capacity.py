"""What an autoscaling cluster can grow to: the ceiling the sweep plans its trials against.

A `ray up` or KubeRay cluster whose GPU workers scale from zero has no GPU when the sweep starts, so
planning against the nodes up then refuses every GPU trial. The ceiling is, first found first:

1. `resources.cluster_max` in the sweep file, or `clmscale sweep --expect-gpus N` (totals, e.g.
   {GPU: 8, CPU: 64}): the nodes up now plus one planned node holding the rest. A total says
   nothing about how GPUs are split over nodes, so a whole-GPU bundle is assumed to find its GPUs
   on one node; give the autoscaler's node types (2. or 3.) for per-node checks.
2. The cluster config in the GCS (`ray._private.state.state.get_cluster_config()`, the same record
   Ray Train V2 checks its worker groups against), where the cluster's autoscaler reports it:
   each node group's `max_count` nodes of its resources.
3. The autoscaler config of a `ray up` cluster, `~/ray_bootstrap_config.yaml` on the head (where
   the driver of `ray job submit` runs; Ray's own Tune and usage stats read the same file): the
   head plus `max_workers` nodes of every worker type, at most the config's `max_workers` in all.
4. Else the nodes up now: the cluster is taken as fixed.

Only `ceiling_from_ray` talks to Ray (lazily); the rest are plain functions of plain data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from clmscale.engine.admission import UNBOUNDED_CPUS, Node, nodes_text

log = logging.getLogger("clmscale")

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler config on the head
UNBOUNDED_GROUP_NODES = 64  # a node group without a maximum (max_count -1) is planned as this many nodes


@dataclass(frozen=True)
class Ceiling:
    """The nodes the cluster can grow to (None: it is fixed at the nodes up now) and where that came from."""

    nodes: tuple[Node, ...] | None
    source: str

    @property
    def grows(self) -> bool:
        return self.nodes is not None

    def text(self, now: Sequence[Node]) -> str:
        if self.nodes is None:
            return f"{nodes_text(now)} (fixed: {self.source})"
        return f"{nodes_text(now)} now, at most {nodes_text(self.nodes)} ({self.source})"


def nodes_from_totals(now: Sequence[Node], totals: Mapping[str, float]) -> tuple[Node, ...]:
    """The nodes up now plus one planned node with the rest of `totals` (CPU missing: enough CPUs)."""
    gpus_now, cpus_now = sum(n.gpus for n in now), sum(n.cpus for n in now)
    gpus = max(0, math.floor(totals.get("GPU", gpus_now)) - gpus_now)
    cpus = max(0.0, totals["CPU"] - cpus_now) if "CPU" in totals else UNBOUNDED_CPUS
    planned = Node(cpus=cpus, gpus=gpus)
    return tuple(Node(n.cpus, n.gpus) for n in now) + ((planned,) if gpus or cpus else ())


def nodes_from_autoscaler_config(config: Mapping) -> tuple[Node, ...]:
    """The head and every worker node an autoscaler config (`ray up`'s YAML, parsed) allows at once.

    Worker types are taken most GPUs first up to the config's `max_workers` over all types, so the
    ceiling errs towards GPU nodes (a trial is refused only when even that cannot hold it).
    """
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    nodes: list[Node] = []
    if head_type in types:
        nodes.append(_node(types[head_type].get("resources") or {}))
    budget = config.get("max_workers", math.inf)
    workers = sorted(((name, t) for name, t in types.items() if name != head_type),
                     key=lambda item: -float((item[1].get("resources") or {}).get("GPU", 0)))  # fmt: skip
    for _, t in workers:
        count = min(int(t.get("max_workers", 0)), budget)
        nodes += [_node(t.get("resources") or {})] * int(count)
        budget -= count
    return tuple(nodes)


def nodes_from_cluster_config(groups: Sequence[tuple[Mapping[str, float], int]]) -> tuple[Node, ...]:
    """Nodes from the GCS cluster config's node groups, as (resources, max_count) pairs."""
    nodes: list[Node] = []
    for resources, max_count in groups:
        count = UNBOUNDED_GROUP_NODES if max_count < 0 else max_count
        nodes += [_node(resources)] * count
    return tuple(nodes)


def _node(resources: Mapping[str, float]) -> Node:
    return Node(cpus=float(resources.get("CPU", 0)), gpus=int(resources.get("GPU", 0)))


def ceiling(
    now: Sequence[Node],
    cluster_max: Mapping[str, float] | None,
    *,
    source: str = "resources.cluster_max / --expect-gpus",
    cluster_config: Sequence[tuple[Mapping[str, float], int]] | None = None,
    bootstrap_config: Path | None = None,
) -> Ceiling:
    """The ceiling from what is known, first found first (see the module's docstring)."""
    if cluster_max is not None:
        return Ceiling(nodes_from_totals(now, cluster_max), source)
    if cluster_config:
        return Ceiling(nodes_from_cluster_config(cluster_config), "the autoscaler's node groups in the GCS")
    if bootstrap_config is not None and bootstrap_config.is_file():
        config = yaml.safe_load(bootstrap_config.read_text()) or {}
        if config.get("available_node_types"):
            return Ceiling(nodes_from_autoscaler_config(config), f"the autoscaler config {bootstrap_config}")
    return Ceiling(None, "no autoscaler limits found")


def ceiling_from_ray(now: Sequence[Node], cluster_max: Mapping[str, float] | None) -> Ceiling:
    """`ceiling` with what the connected Ray cluster exposes."""
    return ceiling(now, cluster_max, cluster_config=_gcs_node_groups(),
                   bootstrap_config=Path(BOOTSTRAP_CONFIG).expanduser())  # fmt: skip


def _gcs_node_groups() -> list[tuple[dict[str, float], int]]:
    """(resources, max_count) of each node group of the cluster config an autoscaler reported to the GCS."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as err:  # noqa: BLE001 - a private API: absent or changed means "not exposed"
        log.debug(f"no cluster config in the GCS: {err!r}")
        return []
    if config is None:
        return []
    return [(dict(g.resources), int(g.max_count)) for g in config.node_group_configs]
