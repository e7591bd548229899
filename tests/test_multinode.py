"""A multi-node Ray cluster on one machine: the sweep survives losing a node, the analysis spreads.

`ray.cluster_utils.Cluster` starts a head (1 CPU, the dashboard on 127.0.0.1) and three 3-CPU worker
nodes, all processes of this machine, so the run directory under tmp is storage every node shares.
Three tiny trials train with one 1-CPU Train worker each: none fits on the head, so they spread over
the worker nodes. The trials' own actors (Tune's trial, Train's controller, Ray Data's coordinators)
are kept on the head, which outlives the workers, so the node removed holds a Train worker only. Once
a trial has its first checkpoint, the worker node holding its Train worker is removed and its
processes killed, as a dead machine's would be: the trial must resume on another node from that
checkpoint, and every trial must finish. Then `run_analysis` must run its tasks on more than one of
the nodes left. Where things ran comes from the trials' `nodes.txt` and the tables' `node_id`.

The cluster needs its own Ray instance, and the pytest process already has the session's
(`ray_cluster`), so the scenario runs in a subprocess (`python tests/test_multinode.py WORK`) with
its own temp dir (RAY_TMPDIR: the cluster's address file lands there, not in /tmp/ray) and its own
ports, joined by explicit address; it writes what it saw to WORK/observed.json, which the test reads.
Every wait has a timeout, and every process the scenario started is killed by pid at the end (found
by process tree, by an environment marker, and by files open under its temp dir).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "CLMSCALE_MULTINODE_TEST"  # env var set on the scenario: its Ray processes inherit it
TRIALS = ["xxs_15ktok_s0", "xxs_15ktok_s1", "xxs_15ktok_s2"]
# linear probes: the analysis spreads as fine-tuning would, without a learning-rate search that a 5k-parameter
# model may fail on 120 molecules (every rate flagged best_epoch_0 is an error row, by the protocol)
DOWNSTREAM = {"tasks": ["freesolv_demo"], "seeds": [0], "modes": ["probe"], "baselines": False, "epochs": 2,
              "patience": 1, "batch_size": 16, "max_molecules": 120, "lrs": [1e-3]}
ANALYSIS = {"hessian_top_k": 2, "hessian_batches": 1, "hessian_max_iter": 8, "trace_matvecs": 3,
            "density_runs": 1, "hessian_finetune": False, "hessian_pretrained_task": False,
            "landscape_resolution": 0}
SCENARIO_TIMEOUT_S = 420
WORKER_CPUS = 3  # a trial's 1-CPU Train worker or two, and a whole CPU for Ray Data, on each worker node


# ---------------------------------------------------------------------------------------------
# the scenario, in its own process


def scenario(work: Path) -> None:
    """Cluster up, sweep with one node removed mid-run, analysis; observations to work/observed.json."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group
    from test_sweep import write_sweep

    from clmscale.engine.analyze import run_analysis
    from clmscale.engine.config import load_sweep
    from clmscale.engine.prepare import prepare
    from clmscale.engine.rundir import RunDir

    observed: dict = {"phase": "start"}
    out = work / "observed.json"

    def save(**update) -> None:
        observed.update(update)
        out.write_text(json.dumps(observed, indent=1, default=str))

    t0 = time.monotonic()
    temp_dir = Path(os.environ["RAY_TMPDIR"]) / "ray"  # where Ray also writes this cluster's address file
    temp_dir.mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": str(temp_dir), "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(), "dashboard_agent_listen_port": 0,
        "object_store_memory": 100 * 1024**2})  # fmt: skip
    try:
        workers = [cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=100 * 1024**2) for _ in range(3)]
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address)
        head_id = cluster.head_node.node_id
        save(phase="cluster", head=head_id, workers=[n.node_id for n in workers],
             cluster_start_s=time.monotonic() - t0)

        cfg = load_sweep(write_sweep(work, "mn", ["xxs"], [1.5e4], seeds=(0, 1, 2), checkpoints=2,
                                     downstream=DOWNSTREAM, analysis=ANALYSIS,
                                     resources={"workers": 1, "cpus_per_worker": 1.0, "max_failures": 3,
                                                "max_concurrent_trials": 3}))  # fmt: skip
        rd = RunDir(cfg.run_dir)
        prepare(cfg.data, rd.data, downstream=cfg.downstream)  # on every node's CPUs; run_sweep then finds it done
        # Tune's trial actors (0.01 CPU) would land anywhere, and Train's controller and Ray Data's
        # coordinators follow them; a trial whose actor dies with its node is not retried (Tune's
        # max_failures is 0). So hold every worker node's CPUs until Tune has placed them on the head.
        hold = placement_group([{"CPU": WORKER_CPUS}] * len(workers), strategy="STRICT_SPREAD")
        ray.get(hold.ready(), timeout=60)
        runner, outcome = sweep_in_background(cfg)
        runner.start()
        t_sweep = time.monotonic()
        trial_actors = _wait_for(lambda: _actor_nodes("ImplicitFunc", len(TRIALS)), timeout=120,
                                 alive=runner.is_alive, what="every trial's Tune actor")
        remove_placement_group(hold)
        save(trial_actor_nodes=trial_actors, held_s=time.monotonic() - t_sweep)
        hit = _wait_for(lambda: _a_trial_to_hit(rd, head_id), timeout=240,
                        alive=runner.is_alive, what="a running trial with a checkpoint on a worker node")
        trial_id, node_id, checkpoints = hit
        victim = next(n for n in workers if n.node_id == node_id)
        pids = _worker_pids(victim)
        actors = _actors_by_node()
        cluster.remove_node(victim, allow_graceful=False)
        for pid in pids:  # a dead machine takes its worker processes along at once
            _kill(pid)
        save(phase="removed", hit=trial_id, removed_node=node_id, checkpoints=checkpoints,
             removed_at_s=time.monotonic() - t_sweep, actors_at_removal=actors)
        runner.join(timeout=300)
        if runner.is_alive():
            raise TimeoutError("the sweep did not finish within 300 s of the node's removal")
        if "error" in outcome:
            raise RuntimeError(f"run_sweep failed: {outcome['error']}")
        nodes = {t: rd.trial(t).nodes() for t in TRIALS}
        save(phase="swept", sweep_s=time.monotonic() - t_sweep, trial_nodes=nodes, run_dir=str(rd.root))

        t_analysis = time.monotonic()
        tables = run_analysis(rd.root)
        rows = {name: tables[name].reindex(columns=["status", "error", "node_id"]).to_dict("records")
                for name in ("finetune", "hessian") if len(tables[name])}  # fmt: skip
        save(phase="done", analysis_s=time.monotonic() - t_analysis, analysis_rows=rows,
             total_s=time.monotonic() - t0)
    except BaseException as err:
        save(error=repr(err))
        raise
    finally:
        started = _descendants(os.getpid())  # while the raylets live: their agents outlive them otherwise
        ray.shutdown()
        for node in cluster.list_all_nodes():  # not cluster.shutdown(): it refuses the head the driver used
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        for pid in started:
            _kill(pid)


def _a_trial_to_hit(rd, head_id: str) -> tuple[str, str, list[str]] | None:
    """(trial, node, checkpoints) of a trial with its first checkpoint complete and its last one not yet
    begun, whose Train worker (rank 0: last line of nodes.txt) is on a worker node; None while there is none."""
    for trial_id in TRIALS:
        folder = rd.trial(trial_id)
        checkpoints = folder.checkpoints()
        started = list(folder.checkpoint_root.glob("[0-9]*"))
        if len(checkpoints) != 1 or len(started) != 1 or folder.result() is not None:
            continue
        nodes = folder.nodes()
        if nodes and nodes[-1] != head_id:
            return trial_id, nodes[-1], [c.name for c in checkpoints]
    return None


def _actor_nodes(class_name: str, n: int) -> list[str] | None:
    """The nodes of the alive actors of a class, once there are n of them."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], timeout=30)
    return [a.node_id for a in actors] if len(actors) >= n else None


def _worker_pids(node) -> list[int]:
    """Pids of the processes a node's raylet started: its Ray workers (Train workers among them) and agents."""
    return _descendants(node.all_processes["raylet"][0].process.pid)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _actors_by_node() -> dict[str, list[str]]:
    """Alive actors' class names, by node: where the trials' pieces ran when the node was removed."""
    from ray.util.state import list_actors

    found: dict[str, list[str]] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, timeout=30):
        found.setdefault(a.node_id, []).append(a.class_name)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def sweep_in_background(cfg) -> tuple[threading.Thread, dict]:
    """A thread that runs `run_sweep(cfg)` (not started) and the dict it fills: "table", or "error"."""
    from clmscale.engine.sweep import run_sweep

    outcome: dict = {}

    def sweep() -> None:
        try:
            outcome["table"] = run_sweep(cfg)
        except BaseException as err:  # noqa: BLE001 - reported in observed.json
            outcome["error"] = repr(err)

    return threading.Thread(target=sweep, daemon=True), outcome


def _wait_for(probe, timeout: float, alive=lambda: True, what: str = "it", every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        if not alive():
            raise RuntimeError(f"the sweep ended before {what} was seen")
        time.sleep(every)
    raise TimeoutError(f"no {what} after {timeout} s")


# ---------------------------------------------------------------------------------------------
# the test, in the pytest process


@dataclasses.dataclass
class Outcome:
    """How a scenario subprocess ended: its exit code (None: killed at the timeout), what it wrote to
    WORK/observed.json, the tail of its log, the pids still alive after the cleanup, its wall time."""

    rc: int | None
    observed: dict
    log_tail: str
    left: list[int]
    wall_s: float

    def check(self, what: str = "scenario") -> None:
        seen = self.observed
        phase = f" in phase {seen.get('phase')}: {seen.get('error')}" if "phase" in seen else ""
        assert self.rc == 0, f"{what} exited {self.rc}{phase}\n{self.log_tail}"
        assert not self.left, f"processes left behind: {self.left}"


def run_scenario(script: str, work: Path, *args: str, prefix: str, timeout_s: float,
                 env: dict[str, str] | None = None, tests_on_path: bool = False) -> Outcome:
    """`python script WORK ARGS` in a session of its own, with its own Ray temp dir (RAY_TMPDIR: the
    cluster's address file and sockets land there, not in /tmp/ray), no Ray auto-connect and no
    RAY_ADDRESS, so it starts its own cluster and never touches the session's. When it ends, or at the
    timeout, every process it started is killed (`_kill_all`). `env` adds to or overrides the variables."""
    marker = uuid.uuid4().hex
    ray_tmp = Path(tempfile.mkdtemp(prefix=prefix))  # short: Ray's socket paths live under it
    paths = [str(REPO), *([str(REPO / "tests")] if tests_on_path else []), os.environ.get("PYTHONPATH")]
    full = {**os.environ, MARKER: marker, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_AUTO_CONNECT": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, paths)), **(env or {})}
    full.pop("RAY_ADDRESS", None)
    log = work / "scenario.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, script, str(work), *args], cwd=REPO, env=full, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            left = _kill_all(proc, marker, ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.monotonic() - start
    observed = json.loads((work / "observed.json").read_text()) if (work / "observed.json").exists() else {}
    print(json.dumps({**observed, "test_wall_s": wall}, indent=1))
    return Outcome(rc, observed, log.read_text(errors="replace")[-6000:], left, wall)


def _kill_all(proc: subprocess.Popen, marker: str, ray_tmp: Path) -> list[int]:
    """SIGKILL the scenario and every process it started; the pids still alive 30 s later.

    Found three ways, before anything is killed: the scenario's process tree (GCS, raylets, and the
    raylets' workers and agents), the marker in the environment of orphans (Ray's agents overwrite
    theirs with their process title), and files open under the cluster's temp dir (its logs).
    """
    import psutil

    doomed = {proc.pid, *_descendants(proc.pid), *_marked_pids(marker), *_pids_using(ray_tmp)}
    for pid in doomed:
        _kill(pid)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs([p for p in map(_process, doomed) if p], timeout=30)
    return sorted({p.pid for p in alive} | set(_marked_pids(marker)) | set(_pids_using(ray_tmp)))


def _pids_using(folder: Path) -> list[int]:
    """Processes with a file open under `folder` (this cluster's session logs, sockets)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).startswith(f"{folder}/") for fd in entry.iterdir()):
                found.append(int(entry.parent.name))
        except OSError:  # gone, or not ours
            continue
    return [pid for pid in found if pid != os.getpid()]


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries MARKER=marker: the scenario and what it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if f"{MARKER}={marker}".encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.slow  # ~3 min on the 2-core machine (3.5 min with another test session running)
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)
def test_sweep_survives_a_lost_node_and_analysis_spreads_over_nodes(tmp_path):
    outcome = run_scenario(__file__, tmp_path, prefix="clm-mn-", timeout_s=SCENARIO_TIMEOUT_S)
    outcome.check()
    observed = outcome.observed

    from clmscale.engine.rundir import RunDir

    rd = RunDir(Path(observed["run_dir"]))
    table = rd.read_table("pretrain")
    assert set(table["trial_id"]) == set(TRIALS) and (table["status"] == "finished").all()
    assert (table.groupby("trial_id").size() == 2).all()  # two checkpoints each

    # 1. the trials' Train workers ran on more than one node, none on the head
    first_nodes = {nodes[0] for nodes in observed["trial_nodes"].values()}
    every_node = {n for nodes in observed["trial_nodes"].values() for n in nodes}
    assert len(every_node) > 1 and observed["head"] not in every_node, observed["trial_nodes"]
    assert first_nodes <= set(observed["workers"])
    assert set(observed["trial_actor_nodes"]) == {observed["head"]}  # the trials' own actors: on the head

    # 2. the hit trial lost its node after its first checkpoint and resumed from it, elsewhere
    hit, removed = observed["hit"], observed["removed_node"]
    nodes = observed["trial_nodes"][hit]
    assert removed in nodes[:-1] and nodes[-1] != removed, nodes  # restarted after the hit, elsewhere
    resumed = [r for r in rd.trial(hit).metrics() if r.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] > 0, resumed  # from the checkpoint, not from step 0
    assert resumed[0]["n_tokens"] == int(observed["checkpoints"][0])  # the checkpoint it had when hit

    # 3. the analysis tasks ran on more than one node, and only on nodes still alive
    rows = [r for table_rows in observed["analysis_rows"].values() for r in table_rows]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    analysis_nodes = {r["node_id"] for r in rows}
    assert len(analysis_nodes) > 1 and removed not in analysis_nodes, analysis_nodes


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_sweep, conftest
    scenario(Path(sys.argv[1]))
