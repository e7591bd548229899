"""fit and report on a synthetic run directory (tests/fixtures/make_run.py): fits.json, the page, the CLI."""

import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from conftest import pulled_in
from typer.testing import CliRunner

from engine.cli import app
from fits.report import build_report
from fits.fit import fit_run
from fixtures.make_run import DIVERGED, FAILED, TRUTH, loss_law, make_run

CHINCHILLA_240 = Path(__file__).resolve().parents[2] / "shared/data/scaling/chinchilla_epoch_240.csv"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = {"n_bootstrap": 30, "n_jobs": 1, "n_starts": 20}  # a few seconds on a busy 2-core machine
FIGURES = ["loss_vs_compute", "loss_surface", "downstream_freesolv_demo", "downstream_solubility", "hessian",
           "landscape_1d", "landscape_2d", "landscape_pt_to_ft", "pca_trajectory", "pca_finetuned"]
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = make_run(tmp_path_factory.mktemp("run") / "fixture")
    return root, fit_run(root, **FAST)


@pytest.fixture(scope="module")
def page(fitted):
    return build_report(fitted[0])


def section(html: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', html, re.DOTALL)
    assert match, f"no section {name}"
    return match.group(1)


# --------------------------------------------------------------------------------------------
# fit_run


def test_fits_json_has_every_section(fitted):
    root, fits = fitted
    on_disk = json.loads((root / "results/fits.json").read_text())
    assert on_disk["findings"] == fits["findings"]
    law = on_disk["loss_law"]
    assert law["status"] == "ok" and law["n_points"] == 10  # 11 pretraining rows less the diverged trial's
    assert 0.2 < law["params"]["alpha"] < 0.5 and 0.2 < law["params"]["beta"] < 0.45
    assert law["hyperparameters"]["n_bootstrap"] == 30 and law["ci"]["alpha"][0] < law["params"]["alpha"]
    assert len(law["frontier"]["flops"]) == len(law["frontier"]["n_params"]) > 10
    assert on_disk["loss_law_backtest"]["status"] == "ok" and on_disk["loss_law_backtest"]["n_holdout"] == 2
    assert on_disk["compute_law"]["loglog_frontier"]["params"]["k"] < 0

    pairs = {(entry["task"], entry["mode"]) for entry in on_disk["downstream"]}
    assert pairs == {(task, mode) for task in ("solubility", "freesolv_demo") for mode in ("finetune", "probe")}
    for entry in on_disk["downstream"]:
        assert set(entry["trends"]) == {"n_params_non_embedding", "flops", "pretrain_val_loss"}
        by_n = entry["trends"]["n_params_non_embedding"]
        assert by_n["verdict"] in {"improving", "plateau", "degrading"} and "per decade" in by_n["sentence"]
        assert entry["power_law"]["n_params_non_embedding"]["status"] == "skipped"  # 3 sizes < 4
    for entry in on_disk["baselines"]:
        assert entry["morgan_fp"]["n"] == 2 and entry["random_init"]["n"] == 6
        assert re.search(r"pretraining (beats|does not beat) fingerprints on " + entry["task"], entry["sentence"])
    proxies = {"lambda_max", "trace", "ft_lambda_max", "ft_trace", "eps_sharpness", "adaptive_sharpness"}
    assert proxies <= set(on_disk["proxies"]["proxies"])
    assert any(s.startswith("Pretraining loss follows L(N, D)") for s in on_disk["findings"])
    assert any("Hessian λmax" in s and "beyond pretraining loss" in s for s in on_disk["findings"])


def test_diverged_trial_and_failed_run_are_left_out_and_named(fitted):
    _, fits = fitted
    diverged = [e for e in fits["excluded"] if e["status"] == "diverged"]
    assert [e["trial_id"] for e in diverged] == [DIVERGED] and "diverged after" in diverged[0]["reason"]
    assert any(DIVERGED in s and "did not finish" in s for s in fits["findings"])
    failed = [e for e in fits["excluded"] if e["status"] == "error"]
    assert [e["trial_id"] for e in failed] == [FAILED[3]] and "loss became NaN" in failed[0]["reason"]
    assert DIVERGED not in {p["trial_id"] for p in fits["compute_law"]["frontier_points"]}
    probe = next(e for e in fits["downstream"] if (e["task"], e["mode"]) == FAILED[:2])
    assert probe["n_checkpoints"] == 5  # the failed seed leaves its checkpoint with one seed, not none


def test_fits_parquet_is_long_format(fitted):
    table = pd.read_parquet(fitted[0] / "results/fits.parquet")
    assert list(table.columns) == ["what", "task", "mode", "x", "parameter", "estimate", "ci_lo", "ci_hi",
                                   "n_points", "note"]
    law = table[table["what"] == "loss_law"].set_index("parameter")
    assert set(law.index) == {"E", "A", "B", "alpha", "beta"}
    assert (law["ci_lo"] <= law["ci_hi"]).all() and (law["n_points"] == 10).all()
    assert {"downstream_trend", "downstream_monotone", "baseline", "proxy", "loss_law_backtest"} <= set(table["what"])
    baselines = table[table["what"] == "baseline"]
    assert set(baselines["mode"]) == {"morgan_fp", "random_init"}


def test_tiny_run_is_skipped_with_reasons_not_an_error(tmp_path):
    """One model size, a constant metric, no Hessian values: every fit says why it was skipped."""
    root = make_run(tmp_path / "tiny")
    results = root / "results"
    pretrain = pd.read_parquet(results / "pretrain.parquet")
    pretrain[pretrain["rung"] == "xxs"].to_parquet(results / "pretrain.parquet", index=False)
    finetune = pd.read_parquet(results / "finetune.parquet")
    finetune = finetune[finetune["rung"].isin(["xxs", ""])].assign(value=1.0)
    finetune.to_parquet(results / "finetune.parquet", index=False)
    hessian = pd.read_parquet(results / "hessian.parquet").assign(lambda_max=np.nan, trace=np.nan)
    hessian.to_parquet(results / "hessian.parquet", index=False)
    fits = fit_run(root, n_bootstrap=0)
    assert fits["loss_law"]["status"] == "skipped" and "distinct (N, D) points" in fits["loss_law"]["reason"]
    assert fits["loss_law_backtest"]["status"] == "skipped"
    assert fits["compute_law"]["saturating_frontier"]["status"] == "skipped"
    assert "L(N, D) was not fitted" in fits["findings"][0]
    trend = fits["downstream"][0]["trends"]["n_params_non_embedding"]
    assert trend["status"] == "skipped" and "distinct" in trend["reason"]
    assert {"lambda_max", "trace"} <= set(fits["proxies"]["not_measured"])


# --------------------------------------------------------------------------------------------
# the report


def test_report_has_every_figure_and_is_self_contained(page):
    html = page.read_text(encoding="utf-8")
    for name in FIGURES:
        png = page.parent / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        height, width = matplotlib.image.imread(png).shape[:2]
        assert height > 200 and width > 300, name
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    assert "No figure:" not in html
    assert not EXTERNAL.search(html), EXTERNAL.search(html).group(0)
    assert "<script" not in html and "<link" not in html
    findings = section(html, "findings")
    assert len(re.findall(r"<li>[^<]{20,}\.</li>", findings)) >= 5
    assert DIVERGED in section(html, "excluded") and FAILED[3] in section(html, "excluded")
    assert "Hessian λmax" in section(html, "proxies")
    assert "<pre>name: fixture" in section(html, "config")


def test_report_from_pretraining_only_via_cli(tmp_path):
    """`clmscale fit` then `clmscale report` on a run with only pretrain.parquet: notes instead of figures."""
    root = make_run(tmp_path / "pretrain_only", only_pretrain=True)
    runner = CliRunner()
    fitted = runner.invoke(app, ["fit", str(root), "--bootstrap", "0"])
    assert fitted.exit_code == 0, fitted.output
    assert f"wrote {root / 'results' / 'fits.json'}" in fitted.output and "- Pretraining loss follows" in fitted.output
    reported = runner.invoke(app, ["report", str(root)])
    assert reported.exit_code == 0, reported.output
    page = Path(reported.output.strip().splitlines()[-1])
    assert page == root / "report" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert (page.parent / "loss_vs_compute.png").exists() and not (page.parent / "hessian.png").exists()
    assert html.count('<p class="note">No figure:') == 8  # 2 downstream tasks, Hessian, 3 landscapes, 2 PCA
    assert 'id="findings"' in html and not EXTERNAL.search(html)


# --------------------------------------------------------------------------------------------
# clmscale fit --table


def test_fit_table_csv_and_missing_column(tmp_path):
    n_params, tokens = (grid.ravel() for grid in np.meshgrid(np.logspace(4, 7, 4), np.logspace(5, 8, 4)))
    csv = tmp_path / "points.csv"
    pd.DataFrame({"params": n_params, "tokens": tokens, "loss": loss_law(n_params, tokens)}).to_csv(csv, index=False)
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "--table", str(csv), "--n-col", "params", "--d-col", "tokens",
                                 "--bootstrap", "0", "--json"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["n_points"] == 16
    for name in ("alpha", "beta", "E"):
        assert fit["params"][name] == pytest.approx(TRUTH[name], rel=0.02), name

    missing = runner.invoke(app, ["fit", "--table", str(csv)])  # default --n-col N is not in this file
    assert missing.exit_code == 2
    assert f"{csv}: no column 'N' (--n-col); the columns are params, tokens, loss" in missing.output
    assert "Traceback" not in missing.output


@pytest.mark.skipif(not CHINCHILLA_240.exists(), reason=f"{CHINCHILLA_240} not staged")
def test_fit_table_chinchilla_points():
    result = CliRunner().invoke(app, ["fit", "--table", str(CHINCHILLA_240), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    alpha = float(re.search(r"alpha = ([0-9.]+)", result.stdout).group(1))
    assert 0.317 <= alpha <= 0.373  # Besiroglu et al. 2024's 95 % interval
    assert "(240 of 240 rows used)" in result.stdout and "compute-optimal: N* ∝ C^" in result.stdout


def test_fit_and_report_import_no_ray_or_torch():
    assert pulled_in("fits.fit, fits.report, fits.figures", {"ray", "torch"}) == []


def test_no_proxy_verdict_from_too_few_checkpoints():
    from fits.fit import MIN_PROXY_POINTS, _proxy_sentences

    def proxies(n):
        row = {"proxy": "lambda_max", "task": "bbbp", "mode": "finetune", "partial_ci_lo": 0.2,
               "partial_ci_hi": 0.9, "n_partial": n, "reason": ""}  # fmt: skip
        return {"status": "ok", "proxies": ["lambda_max"], "labels": {"lambda_max": "Hessian λmax"}, "rows": [row]}

    few = _proxy_sentences(proxies(MIN_PROXY_POINTS - 1))[0]
    assert "could not be tested" in few and f"only {MIN_PROXY_POINTS - 1} checkpoints" in few
    enough = _proxy_sentences(proxies(MIN_PROXY_POINTS))[0]
    assert enough.startswith("Hessian λmax predicts downstream performance beyond pretraining loss in 1 of 1")


def test_fine_tuning_hessian_joins_the_points_of_its_own_task():
    from fits.fit import checkpoint_proxies

    points = pd.DataFrame({"trial_id": ["a", "a", "b"], "tokens": [10.0, 10.0, 10.0],
                           "task": ["bbbp", "esol", "bbbp"], "mode": "finetune"})
    hessian = pd.DataFrame({"trial_id": ["a", "a", "a", "b"], "tokens": [10, 10, 10, 10],
                            "loss": ["pretrain", "finetune:bbbp", "finetune:esol", "pretrain"],
                            "lambda_max": [1.0, 2.0, 3.0, 4.0], "trace": [10.0, 20.0, 30.0, 40.0]})
    out = checkpoint_proxies(points, hessian, pd.DataFrame()).set_index(["trial_id", "task"])
    assert out.loc[("a", "bbbp"), ["lambda_max", "ft_lambda_max", "ft_trace"]].tolist() == [1.0, 2.0, 20.0]
    assert out.loc[("a", "esol"), ["lambda_max", "ft_lambda_max", "ft_trace"]].tolist() == [1.0, 3.0, 30.0]
    assert out.loc[("b", "bbbp"), "lambda_max"] == 4.0 and np.isnan(out.loc[("b", "bbbp"), "ft_lambda_max"])


def test_faults_the_run_survived_are_listed(tmp_path):
    from engine.rundir import RunDir

    rd = RunDir(make_run(tmp_path / "run", only_pretrain=True))
    rd.record_event({"stage": "analyze", "event": "corrupt_checkpoint", "checkpoint": "ck/2", "used_instead": "ck/1"})
    rd.trial("xs_1").append_metrics({"step": 5, "loss": 1.0})
    rd.trial("xs_1").append_metrics({"event": "resumed", "step": 5})
    assert [(e["stage"], e.get("trial_id"), e["event"]) for e in rd.fault_events()] == [
        ("analyze", None, "corrupt_checkpoint"), ("sweep", "xs_1", "resumed")]
    excluded = section(build_report(rd.root, n_bootstrap=0).read_text(), "excluded")
    assert "Faults handled" in excluded and "used_instead: ck/1" in excluded and "xs_1" in excluded
