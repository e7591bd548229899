"""Autoscaling clusters: plan against what the cluster can grow to, hold trials while the autoscaler
brings their nodes, refuse up front only what can never fit.

First the plain parts (`engine.capacity`, the ledger, `PackingSearcher` with a fake clock and a fake
cluster), then a tiny sweep on a real autoscaling cluster: Ray's fake node provider (the one
`ray.cluster_utils.AutoscalingCluster` drives) with a 2-CPU head and no GPU, and a worker type with
one logical GPU, `min_workers: 0`. The sweep's two GPU trials can start only once the autoscaler has
added that node. `AutoscalingCluster.start()` runs `ray stop --force`, which kills every Ray process
of the machine (other people's sessions included), and 2.60's wheel lacks the example config it
reads, so the scenario starts the same head itself (`ray start --head --autoscaling-config`,
`RAY_FAKE_CLUSTER=1`) on its own ports and temp dir, in a subprocess with HOME set to a folder that
holds the autoscaler config as `~/ray_bootstrap_config.yaml` (where `ray up` puts it), and every
process it started is killed by pid at the end, as in tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clmscale.engine.admission import DATA_CPUS, TRIAL_CPU, AdmissionController, Bundle, Node, TrialNeed
from clmscale.engine.capacity import UNBOUNDED_CPUS, ceiling, nodes_from_autoscaler_config, nodes_from_totals

REPO = Path(__file__).resolve().parents[1]


def _need(gpus: float, workers: int = 1, cpus: float = 0.5) -> TrialNeed:
    return TrialNeed((Bundle(cpus, gpus),) * workers, trial_cpus=TRIAL_CPU)


# ---------------------------------------------------------------------------------------------
# the ceiling


def test_the_ceiling_comes_from_the_setting_then_the_gcs_then_the_autoscaler_config(tmp_path):
    head = [Node(cpus=8, gpus=0, node_id="head")]
    # resources.cluster_max / --expect-gpus: the nodes up plus one planned node with the rest
    grown = ceiling(head, {"GPU": 8, "CPU": 64})
    assert grown.nodes == (Node(8, 0), Node(56, 8)) and "cluster_max" in grown.source
    assert nodes_from_totals(head, {"GPU": 2}) == (Node(8, 0), Node(UNBOUNDED_CPUS, 2))  # CPUs not given: enough
    # the GCS cluster config (KubeRay / autoscaler v2): node groups x max_count
    gcs = ceiling(head, None, cluster_config=[({"CPU": 8}, 1), ({"CPU": 16, "GPU": 1}, 3)])
    assert gcs.nodes == (Node(8, 0),) + (Node(16, 1),) * 3
    # ray up's ~/ray_bootstrap_config.yaml: head + max_workers of each type, GPU types first, capped in all
    config = {"head_node_type": "head", "max_workers": 5, "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 32}, "min_workers": 0, "max_workers": 4},
        "h100x8": {"resources": {"CPU": 192, "GPU": 8}, "min_workers": 0, "max_workers": 2}}}  # fmt: skip
    assert nodes_from_autoscaler_config(config) == (Node(0, 0), Node(192, 8), Node(192, 8)) + (Node(32, 0),) * 3
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    from_file = ceiling(head, None, bootstrap_config=path)
    assert sum(n.gpus for n in from_file.nodes) == 16 and str(path) in from_file.source
    assert ceiling(head, {"GPU": 1}, bootstrap_config=path).nodes == (Node(8, 0), Node(UNBOUNDED_CPUS, 1))  # setting wins
    fixed = ceiling(head, None, bootstrap_config=tmp_path / "absent.yaml")
    assert not fixed.grows and fixed.text(head) == "1 node(s) with 8 CPUs and 0 GPUs in all (fixed: no autoscaler limits found)"


def test_the_shipped_ray_up_cluster_holds_the_paper_sweep_once_grown():
    """cluster/ray-cluster.yaml's GPU workers scale from zero: its head alone refuses the paper sweep's
    trials, its autoscaler limits hold every one of them."""
    from clmscale.engine.capacity import Ceiling
    from clmscale.engine.config import expand_grid, load_sweep
    from clmscale.engine.sweep import SweepError, check_fits

    nodes = nodes_from_autoscaler_config(yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text()))
    trials = expand_grid(load_sweep(REPO / "sweeps" / "paper.yaml"))
    head = [Node(cpus=4.0)]
    with pytest.raises(SweepError, match=r"or, on an autoscaling cluster, give what it can grow to"):
        check_fits(trials, head)
    check_fits(trials, head, Ceiling(nodes, "ray-cluster.yaml"))


def test_a_trial_that_can_never_fit_the_ceiling_is_refused_with_the_numbers(tmp_path):
    from test_sweep import write_sweep

    from clmscale.engine.capacity import Ceiling
    from clmscale.engine.config import expand_grid, load_sweep
    from clmscale.engine.sweep import SweepError, check_fits

    head = [Node(cpus=2, gpus=0, node_id="h")]
    limits = Ceiling(nodes_from_totals(head, {"GPU": 2, "CPU": 6}), "resources.cluster_max")
    [trial] = expand_grid(load_sweep(write_sweep(tmp_path, "n", ["xxs"], [1e4], resources={
        "workers": 1, "cpus_per_worker": 0.5, "gpus_per_worker": 2.0})))  # fmt: skip
    check_fits([trial], head, limits)
    too_big = trial.model_copy(update={"resources": trial.resources.model_copy(update={"gpus_per_worker": 3.0})})
    with pytest.raises(SweepError, match=r"xxs_10ktok_s0 needs 0.51 CPUs .* and 3 GPUs, but the cluster has 1 node\(s\) "
                                         r"with 2 CPUs and 0 GPUs in all now, at most 2 node\(s\) with 6 CPUs and 2 GPUs"):
        check_fits([too_big], head, limits)


def test_expect_gpus_sets_cluster_max(tmp_path):
    from test_sweep import write_sweep

    from clmscale.engine.config import load_sweep
    from clmscale.engine.sweep import expect_gpus

    cfg = load_sweep(write_sweep(tmp_path, "g", ["xxs"], [1e4], resources={"workers": 1, "cluster_max": {"CPU": 64}}))
    assert cfg.resources.cluster_max == {"CPU": 64.0}
    assert expect_gpus(cfg, 8).resources.cluster_max == {"CPU": 64.0, "GPU": 8.0}
    assert expect_gpus(cfg, None) is cfg


# ---------------------------------------------------------------------------------------------
# the ledger and the searcher on a cluster that grows


def test_ledger_admits_on_nodes_as_they_arrive_and_stops_placing_on_nodes_gone():
    head = Node(cpus=2, gpus=0, node_id="head")
    gpu_node = Node(cpus=4, gpus=1, node_id="gpu-1")
    ledger = AdmissionController([head], DATA_CPUS, ceiling=[head, Node(4, 1)])
    ledger.add("a", _need(1.0))
    ledger.add("b", _need(1.0))
    with pytest.raises(ValueError, match=r"'c' needs .* 2 GPUs .* at most 2 node\(s\) with 6 CPUs and 1 GPUs"):
        ledger.add("c", _need(1.0, workers=2))
    assert ledger.admit() == [] and ledger.wanted() == ["a"]  # one GPU node at most: one of them
    assert ledger.sync_nodes([head, gpu_node]) and not ledger.sync_nodes([head, gpu_node])
    assert ledger.admit() == ["a"] and ledger.wanted() == []
    ledger.release("a")
    assert ledger.sync_nodes([head])  # the GPU node left (scaled down, or lost)
    assert ledger.admit() == [] and ledger.wanted() == ["b"]


class FakeCluster:
    """Nodes that an 'autoscaler' adds when asked, after `delay_s` of a fake clock."""

    def __init__(self, delay_s: float):
        self.now, self.delay_s = 0.0, delay_s
        self.nodes = [Node(cpus=2, gpus=0, node_id="head")]
        self.requests: list[list[dict]] = []
        self._due: float | None = None

    def clock(self) -> float:
        return self.now

    def request(self, bundles: list[dict]) -> None:
        self.requests.append(bundles)
        if any(b.get("GPU") for b in bundles) and self._due is None and len(self.nodes) == 1:
            self._due = self.now + self.delay_s

    def live(self) -> list[Node]:
        if self._due is not None and self.now >= self._due:
            self.nodes.append(Node(cpus=2, gpus=1, node_id="gpu-1"))
            self._due = None
        return list(self.nodes)


def _searcher(cluster: FakeCluster, names: list[str], needs: list[TrialNeed], timeout_s: float = 60.0):
    from clmscale.engine.packing import PackingSearcher

    return PackingSearcher([{"n": n} for n in names], needs, names, cluster.live(), reserved_cpus=DATA_CPUS,
                           ceiling=[Node(2, 0), Node(2, 1)], live_nodes=cluster.live, request=cluster.request,
                           poll_s=1.0, scale_up_timeout_s=timeout_s, clock=cluster.clock)  # fmt: skip


def test_searcher_holds_gpu_trials_asks_the_autoscaler_and_admits_when_the_node_arrives():
    from ray.tune.search import Searcher

    cluster = FakeCluster(delay_s=20.0)
    searcher = _searcher(cluster, ["gpu_a", "gpu_b", "cpu"], [_need(0.5), _need(0.5), _need(0.0)])
    assert searcher.suggest("t1") == {"n": "cpu"}  # fits the head now: not held back by the GPU trials
    assert searcher.suggest("t2") is None and searcher.held == ["gpu_a", "gpu_b"]
    # asked for: Ray Data's CPU, the running CPU trial, and both GPU trials (half a GPU each: one node)
    gpu_bundles = [b for b in searcher.asked if "GPU" in b]
    assert gpu_bundles == [{"CPU": 0.5, "GPU": 0.5}] * 2 and {"CPU": DATA_CPUS} in searcher.asked
    asks = len(cluster.requests)
    for t in range(2, 20):  # the node is on its way: held, not refused, asked once
        cluster.now = t
        assert searcher.suggest(f"w{t}") is None
    assert len(cluster.requests) == asks
    cluster.now = 21.0
    assert [searcher.suggest("t3"), searcher.suggest("t4")] == [{"n": "gpu_a"}, {"n": "gpu_b"}]
    assert searcher.suggest("t5") == Searcher.FINISHED
    for t in ("t1", "t3", "t4"):
        searcher.on_trial_complete(t)


def test_searcher_gives_up_when_the_nodes_never_come_and_nothing_runs():
    from clmscale.engine.packing import ScaleUpTimeout

    cluster = FakeCluster(delay_s=float("inf"))
    searcher = _searcher(cluster, ["gpu_a"], [_need(1.0)], timeout_s=30.0)
    for t in range(0, 31, 5):
        cluster.now = t
        assert searcher.suggest(f"w{t}") is None
    cluster.now = 32.0
    with pytest.raises(ScaleUpTimeout, match=r"trials gpu_a wait for room that did not come in 30 s .* 1 GPUs in all"):
        searcher.suggest("late")


# ---------------------------------------------------------------------------------------------
# a tiny sweep on a real autoscaling cluster, in its own process

SCENARIO_TIMEOUT_S = 600  # ~4 min alone; a shared 2-core machine under load (load average 40) took 5+
TRIALS = ["xxs_15ktok_s0", "xxs_15ktok_s1"]
GPU_TYPE = "ray.worker.gpu"


def autoscaler_config(gcs_address: str) -> dict:
    """Ray's fake-provider example config (absent from the 2.60 wheel), with a GPU worker type from zero."""
    return {
        "cluster_name": "clmscale-autoscaling-test",
        "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100 * 1024**2},
                       "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }  # fmt: skip


def scenario(work: Path) -> None:
    """Autoscaling head up, the sweep (GPU trials, no GPU yet), the GPU node's arrival and departure
    watched from here; observations to work/observed.json."""

    import ray
    from test_multinode import _free_port, _wait_for, sweep_in_background
    from test_sweep import write_sweep

    from clmscale.engine.config import load_sweep
    from clmscale.engine.prepare import prepare
    from clmscale.engine.rundir import RunDir

    observed: dict = {"phase": "start"}
    out = work / "observed.json"

    def save(**update) -> None:
        observed.update(update)
        out.write_text(json.dumps(observed, indent=1, default=str))

    t0 = time.monotonic()
    try:
        port = _free_port()
        bootstrap = Path(os.environ["HOME"]) / "ray_bootstrap_config.yaml"  # where `ray up` puts it
        bootstrap.write_text(yaml.safe_dump(autoscaler_config(f"127.0.0.1:{port}")))
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--num-gpus=0", f"--temp-dir={os.environ['RAY_TMPDIR']}/ray", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}", "--dashboard-agent-listen-port=0",
               f"--ray-client-server-port={_free_port()}", "--object-store-memory=100000000",
               f"--autoscaling-config={bootstrap}", "--disable-usage-stats"]  # fmt: skip
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        subprocess.run(cmd, env=env, check=True, timeout=120, cwd=work)
        ray.init(address=f"127.0.0.1:{port}")
        save(phase="cluster", cluster_start_s=time.monotonic() - t0, gpus_at_start=ray.cluster_resources().get("GPU", 0))

        cfg = load_sweep(write_sweep(work, "auto", ["xxs"], [1.5e4], seeds=(0, 1), checkpoints=1,
                                     resources={"workers": 1, "cpus_per_worker": 0.5, "gpus_per_worker": 0.5,
                                                "max_failures": 1, "scale_up_timeout_s": 180}))  # fmt: skip
        rd = RunDir(cfg.run_dir)
        prepare(cfg.data, rd.data)  # on the head's CPUs; run_sweep then finds it done
        runner, outcome = sweep_in_background(cfg)
        t_sweep = time.monotonic()
        runner.start()
        asked = _wait_for(_asked_for_gpus, timeout=120, alive=runner.is_alive, what="a request for GPUs", every=0.5)
        started_while_asking = [t for t in TRIALS if rd.trial(t).nodes()]
        gpu_node = _wait_for(lambda: _gpu_nodes(ray), timeout=180, alive=runner.is_alive, what="a GPU node", every=0.5)
        save(phase="scaled up", asked=asked, started_while_asking=started_while_asking, gpu_node=gpu_node[0],
             gpu_node_up_s=time.monotonic() - t_sweep)
        runner.join(timeout=400)
        if runner.is_alive():
            raise TimeoutError("the sweep did not finish within 400 s of the GPU node's arrival")
        if "error" in outcome:
            raise RuntimeError(f"run_sweep failed: {outcome['error']}")
        save(phase="swept", sweep_s=time.monotonic() - t_sweep, run_dir=str(rd.root),
             trial_nodes={t: rd.trial(t).nodes() for t in TRIALS})
        save(phase="done", asked_after=_request(), total_s=time.monotonic() - t0)
    except BaseException as err:
        save(error=repr(err))
        raise
    finally:
        ray.shutdown()


def _request() -> list[dict]:
    """What the driver last asked the (v1) autoscaler for: `request_resources` writes it to the GCS."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def _asked_for_gpus() -> list[dict] | None:
    asked = _request()
    return asked if any(b.get("GPU") for b in asked) else None


def _gpu_nodes(ray) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


@pytest.mark.slow  # 4-6 min on the shared 2-core machine
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)
def test_gpu_trials_wait_for_the_autoscaler_then_run_on_the_node_it_adds(tmp_path):
    from test_multinode import run_scenario

    home = tmp_path / "home"
    home.mkdir()
    outcome = run_scenario(__file__, tmp_path, prefix="clm-as-", timeout_s=SCENARIO_TIMEOUT_S, tests_on_path=True,
                           env={"HOME": str(home),
                                "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster; no token under HOME
                                "RAY_USAGE_STATS_ENABLED": "0"})
    outcome.check()
    observed = outcome.observed

    from clmscale.engine.rundir import RunDir

    assert observed["gpus_at_start"] == 0  # the GPU workers scale from zero
    # held, not started (nor refused), while the autoscaler was asked for both trials' bundles
    assert observed["started_while_asking"] == []
    assert [b for b in observed["asked"] if "GPU" in b] == [{"CPU": 0.5, "GPU": 0.5}] * 2
    table = RunDir(Path(observed["run_dir"])).read_table("pretrain")
    assert set(table["trial_id"]) == set(TRIALS) and (table["status"] == "finished").all()
    for trial, nodes in observed["trial_nodes"].items():  # each trial's Train worker ran on the node the autoscaler added
        assert nodes and set(nodes) == {observed["gpu_node"]}, (trial, nodes)
    assert observed["asked_after"] == []  # withdrawn at the end: the autoscaler may take the node away


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_sweep, test_multinode, conftest
    scenario(Path(sys.argv[1]))
