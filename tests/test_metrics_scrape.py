"""The sweep's Ray metrics, read back the way a monitoring stack reads them.

One scenario, in its own process (it needs its own Ray with a metrics export port, and the pytest
process may hold the session's): a local Ray with `_metrics_export_port`, a tiny one-trial sweep,
and meanwhile the node's Prometheus endpoint (http://127.0.0.1:<port>/metrics) polled for
`clmscale_*` series. Where Debian's `prometheus` binary is found, the scenario also runs it on
127.0.0.1 with Ray's own service-discovery file (`prom_metrics_service_discovery.json` in Ray's temp
dir) as its only target list (each target's port scraped on loopback), and asks its HTTP API
(`/api/v1/query`) for the series.
Then `cluster/grafana/clmscale.json` is checked against what was scraped and what the engine sets.
Every wait is bounded; every process is killed by pid at the end, as in tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana" / "clmscale.json"
TRIAL = "xxs_15ktok_s0"
SCENARIO_TIMEOUT_S = 480


def engine_metric_names() -> set[str]:
    """The Prometheus names of the gauges engine/ sets: Ray exports `ray.util.metrics` with a `ray_` prefix."""
    names = set()
    for path in (REPO / "engine").glob("*.py"):
        names |= set(re.findall(r'Gauge\(\s*"(clmscale_\w+)"', path.read_text()))
    return {f"ray_{n}" for n in names}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {name for e in exprs for name in re.findall(r"\b(ray_\w+)", e)}


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)


# ---------------------------------------------------------------------------------------------
# the scenario, in its own process


def scenario(work: Path, prometheus: str) -> None:

    import ray
    from test_multinode import _free_port, _wait_for, sweep_in_background
    from test_sweep import write_sweep

    from clmscale.engine.config import load_sweep

    observed: dict = {"phase": "start", "scraped": {}, "prometheus": None}
    out = work / "observed.json"

    def save(**update) -> None:
        observed.update(update)
        out.write_text(json.dumps(observed, indent=1, default=str))

    prom = None
    temp_dir = Path(os.environ["RAY_TMPDIR"]) / "ray"
    temp_dir.mkdir(exist_ok=True)
    metrics_port = _free_port()
    try:
        ray.init(address="local", num_cpus=2, _metrics_export_port=metrics_port,
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                 _temp_dir=str(temp_dir), object_store_memory=100 * 1024**2,
                 _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
        endpoint = f"http://127.0.0.1:{metrics_port}/metrics"
        _wait_for(lambda: _get(endpoint), timeout=60, what=f"Ray's metrics endpoint {endpoint}", every=1.0)
        discovery = temp_dir / "prom_metrics_service_discovery.json"
        # Ray writes the file in steps (its own fixed ports first): wait until the node's export port is listed
        exported = f":{metrics_port}"
        targets = _wait_for(lambda: [t for t in _targets(discovery) if t.endswith(exported)] and _targets(discovery),
                            timeout=60, what=f"the export port {metrics_port} in {discovery}", every=1.0)
        save(phase="ray", endpoint=endpoint, discovery=str(discovery), targets=targets)

        if prometheus:
            prom_port = _free_port()
            config = work / "prometheus.yml"
            config.write_text(json.dumps({  # YAML is a superset of JSON
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(discovery)]}],
                                    # Ray lists the node's own address (it turns 127.0.0.1 into it); every
                                    # node here is this machine, so scrape the same ports on loopback only
                                    "relabel_configs": [{"source_labels": ["__address__"], "regex": r"[^:]+:(\d+)",
                                                         "target_label": "__address__",
                                                         "replacement": "127.0.0.1:$1"}]}]}))  # fmt: skip
            prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                                    stdout=open(work / "prometheus.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
            api = f"http://127.0.0.1:{prom_port}/api/v1"
            _wait_for(lambda: _get(f"{api}/status/buildinfo"), timeout=60, what="prometheus' HTTP API", every=1.0)
            save(prometheus_pid=prom.pid, api=api)

        cfg = load_sweep(write_sweep(work, "metrics", ["xxs"], [1.5e4], checkpoints=1))
        runner, outcome = sweep_in_background(cfg)
        runner.start()
        deadline = time.monotonic() + 360
        while runner.is_alive() and time.monotonic() < deadline:  # scrape while the trial reports
            _collect(_get(endpoint), observed["scraped"])
            time.sleep(1.0)
        if runner.is_alive():
            raise TimeoutError("the sweep did not finish within 360 s")
        if "error" in outcome:
            raise RuntimeError(f"run_sweep failed: {outcome['error']}")
        _collect(_get(endpoint), observed["scraped"])
        save(phase="swept")

        if prometheus:
            found = {}
            for name in sorted(observed["scraped"]):
                query = f'last_over_time({name}{{trial="{TRIAL}"}}[30m])'
                found[name] = _wait_for(lambda q=query: _query(api, q), timeout=60, what=f"{query} in prometheus",
                                        every=1.0)  # fmt: skip
            names = json.loads(_get(f"{api}/label/__name__/values"))["data"]
            save(prometheus={"series": found, "clmscale_names": [n for n in names if "clmscale" in n]})
        save(phase="done")
    except BaseException as err:
        save(error=repr(err))
        raise
    finally:
        if prom is not None:
            prom.kill()
            prom.wait(timeout=30)
        ray.shutdown()


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return response.read().decode()
    except OSError:
        return ""


def _targets(discovery: Path) -> list[str]:
    try:
        return [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
    except (OSError, ValueError):
        return []


def _collect(text: str, scraped: dict) -> None:
    """Keep the last sample line of every `clmscale` series (metric name -> {labels: value})."""
    for line in text.splitlines():
        m = re.match(r"^(\w*clmscale\w*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            scraped.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))


def _query(api: str, query: str) -> list:
    body = _get(f"{api}/query?{urllib.parse.urlencode({'query': query})}")
    return json.loads(body)["data"]["result"] if body else []


# ---------------------------------------------------------------------------------------------
# the tests, in the pytest process


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """Runs the scenario once (with prometheus where found); its observations."""
    from test_multinode import run_scenario

    work = tmp_path_factory.mktemp("metrics")
    outcome = run_scenario(__file__, work, prometheus_binary() or "", prefix="clm-me-", timeout_s=SCENARIO_TIMEOUT_S,
                           tests_on_path=True)
    outcome.check()
    return outcome.observed


@pytest.mark.slow  # ~2 min on the 2-core machine
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)
def test_the_sweeps_gauges_are_at_rays_prometheus_endpoint_with_their_trial_tag(scraped):
    series = scraped["scraped"]
    assert "ray_clmscale_tokens_per_s" in series, sorted(series)
    for name in ("ray_clmscale_tokens_per_s", "ray_clmscale_train_loss", "ray_clmscale_tokens"):
        samples = {labels: v for labels, v in series[name].items() if f'trial="{TRIAL}"' in labels}
        assert samples and all(v > 0 for v in samples.values()), (name, series.get(name))
    assert set(series) <= engine_metric_names()  # nothing scraped that the engine does not set
    print("scraped:", sorted(series))


@pytest.mark.slow
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)
def test_prometheus_scrapes_them_through_rays_service_discovery_file(scraped):
    if scraped["prometheus"] is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus; .ci/run installs it where it can)")
    found = scraped["prometheus"]["series"]
    assert "ray_clmscale_tokens_per_s" in found
    for name, result in found.items():
        assert result and all(r["metric"]["trial"] == TRIAL and float(r["value"][1]) > 0 for r in result), (name, result)
    assert set(scraped["prometheus"]["clmscale_names"]) == set(scraped["scraped"])


def test_the_grafana_dashboard_queries_only_metrics_the_engine_sets():
    dashboard = json.loads(DASHBOARD.read_text())
    names = dashboard_metric_names(dashboard)
    assert names <= engine_metric_names(), names - engine_metric_names()
    assert {"ray_clmscale_tokens_per_s", "ray_clmscale_train_loss", "ray_clmscale_mfu", "ray_clmscale_tokens"} <= names
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert any(v["name"] == "trial" for v in dashboard["templating"]["list"])  # one line per trial, filterable


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_sweep, test_multinode, conftest
    scenario(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
