"""fits/fit.py's own statistics and joins: the sign-flip test of a proxy over held-out sizes at its nominal rate,
plateau margins from the settings or the label sd, when each proxy is measured, and the Hessian joins."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy import stats

from clmscale.engine.config import FitsConfig
from clmscale.fits.fit import (FitSettings, checkpoint_proxies, fit_run, improvement_p, proxy_groups, smallest_p,
                      trend_margin)
from clmscale.fits.proxies import LeaveOneSizeOut, leave_one_size_out
from fixtures.make_run import make_run

N_DRAWS = 200


def not_above(count: int, n: int, rate: float) -> bool:
    """count of n is consistent with a true rate of at most `rate` (one-sided binomial p > 0.001)."""
    return stats.binom.sf(count - 1, n, rate) > 1e-3


def settings(**changes) -> FitSettings:
    return dataclasses.replace(FitSettings.from_config(FitsConfig()), **changes)


# --------------------------------------------------------------------------------------------
# The sign-flip test over held-out sizes


def per_size_result(differences: np.ndarray) -> LeaveOneSizeOut:
    """A LeaveOneSizeOut whose per-size RMSE differences (loss alone − loss + proxy) are `differences`."""
    per_size = tuple({"size": 10.0**i, "n_points": 2, "rmse_loss": 1.0 + d, "rmse_loss_proxy": 1.0}
                     for i, d in enumerate(differences))
    return LeaveOneSizeOut(metric="m", proxy="p", rmse_loss=1.0, rmse_loss_proxy=1.0, improvement=0.0,
                           improvement_ci=(0.0, 0.0), level=0.95, finding="no clear difference",
                           n_sizes=len(differences), n_points=2 * len(differences), proxy_transform="none",
                           per_size=per_size)


def test_sign_flip_p_is_exact_under_a_symmetric_null():
    rng = np.random.default_rng(0)
    p = np.array([improvement_p(per_size_result(rng.normal(0, 1, 8))) for _ in range(2000)])
    assert not_above(int((p < 0.05).sum()), p.size, 0.05), (p < 0.05).mean()
    assert (p < 0.05).mean() > 0.02  # not conservative to uselessness: 2^-8 steps allow ~4.7 %
    assert improvement_p(per_size_result(np.array([0.3, 0.2, 0.4]))) == smallest_p(3) == 0.25
    assert improvement_p(per_size_result(np.full(6, 0.1))) == pytest.approx(2 / 64)


def ladder(rng: np.random.Generator, informative: bool, n_sizes: int = 8) -> pd.DataFrame:
    """Per-checkpoint rows: 2 budgets per size; the metric follows loss and, when informative, the proxy."""
    n = np.repeat(np.logspace(4, 7.5, n_sizes), 2)
    d = np.tile([1e6, 1e7], n_sizes)
    loss = 1.0 + 20 / n**0.3 + 30 / d**0.3
    hidden = rng.normal(0, 1, n.size)
    metric = 0.9 - 0.2 * loss + (0.02 * hidden if informative else 0) + rng.normal(0, 0.005, n.size)
    proxy = np.exp(hidden + (0 if informative else rng.normal(0, 1, n.size)))  # positive: enters as log10
    return pd.DataFrame({"n_params_non_embedding": n, "pretrain_val_loss": loss, "proxy": proxy, "mean": metric})


def test_proxy_test_rarely_claims_a_gain_from_noise_and_finds_a_real_one():
    rng = np.random.default_rng(1)
    findings = {}
    for informative in (False, True):
        p_better = []
        for _ in range(N_DRAWS):
            result = leave_one_size_out(ladder(rng, informative), "mean", "proxy", n_bootstrap=100)
            gain = np.mean([s["rmse_loss"] - s["rmse_loss_proxy"] for s in result.per_size])
            p_better.append(improvement_p(result) < 0.05 and gain > 0)
        findings[informative] = sum(p_better)
    assert not_above(findings[False], N_DRAWS, 0.025), findings  # one side of a two-sided 5 % test
    assert findings[True] >= 0.8 * N_DRAWS, findings


# --------------------------------------------------------------------------------------------
# Margins


def test_margins_come_from_the_settings_or_the_documented_defaults():
    margin, reason = trend_margin("rmse", 1.5, settings())
    assert margin.per_decade == pytest.approx(0.03) and "label sd" in margin.source and reason == ""
    margin, _ = trend_margin("roc_auc", None, settings())
    assert margin.per_decade == 0.01
    missing, reason = trend_margin("rmse", None, settings())
    assert missing is None and "label sd is unknown" in reason and "fits.plateau_margin.rmse" in reason
    given, _ = trend_margin("rmse", None, settings(plateau_margin={"rmse": 0.05}))
    assert given.per_decade == 0.05 and given.source == "fits.plateau_margin.rmse = 0.05 per decade"
    unknown, reason = trend_margin("spearman_r", None, settings())
    assert unknown is None and "no default margin" in reason
    with pytest.raises(ValidationError):
        FitsConfig(plateau_margin={"rmse": -0.1})


def test_a_margin_in_the_sweep_file_makes_rmse_trends_testable_without_label_sd(tmp_path):
    root = make_run(tmp_path / "run", task_columns=False, fits={"plateau_margin": {"rmse": 0.05}})
    fits = fit_run(root, n_bootstrap=0, n_jobs=1, n_starts=20)
    for entry in fits["downstream"]:
        assert entry["label_sd"] is None and entry["margin"]["per_decade"] == 0.05
        assert {v["margin_source"] for v in entry["verdicts"].values() if v["status"] == "ok"} == {
            "fits.plateau_margin.rmse = 0.05 per decade"}
    assert fits["settings"]["plateau_margin"] == {"rmse": 0.05} and fits["trend_tests"]["n_tests"] == 12


@pytest.mark.parametrize("method", ["mixedlm", "cluster"])
def test_fits_slope_method_chooses_every_verdicts_interval(tmp_path, method):
    default = fit_run(make_run(tmp_path / "jackknife"), n_bootstrap=0, n_jobs=1, n_starts=20)
    chosen = fit_run(make_run(tmp_path / method, fits={"slope_method": method}), n_bootstrap=0, n_jobs=1, n_starts=20)
    pairs = [(a["verdicts"][k], b["verdicts"][k]) for a, b in zip(default["downstream"], chosen["downstream"],
                                                                   strict=True) for k in a["verdicts"]]
    tested = [(a, b) for a, b in pairs if a["status"] == "ok" and b["status"] == "ok"]
    assert tested and chosen["settings"]["slope_method"] == method
    assert {b["method"] for _, b in tested} == {method} and {a["method"] for a, _ in tested} == {"cluster_jackknife"}
    # the same point estimate (OLS with strata and blocks), another interval; MixedLM estimates its own slope
    assert any(a["se"] != pytest.approx(b["se"], rel=1e-6) for a, b in tested)
    if method == "cluster":
        assert all(a["slope"] == pytest.approx(b["slope"], rel=1e-9) for a, b in tested)


# --------------------------------------------------------------------------------------------
# Proxies: when they are measured, and how they join the downstream points


def test_proxy_timing_of_the_fit_stages_columns():
    groups = proxy_groups(["pretrain_val_loss", "lambda_max", "trace_per_param", "pt_task_trace_per_param",
                           "pt_task_eps_sharpness", "pt_task_adaptive_sharpness", "ft_trace", "ft_trace_per_param",
                           "n_params", "flops"])
    assert groups == {"before_finetuning": ["pretrain_val_loss", "lambda_max", "trace_per_param",
                                            "pt_task_trace_per_param", "pt_task_eps_sharpness",
                                            "pt_task_adaptive_sharpness"],
                      "descriptive": ["ft_trace", "ft_trace_per_param"], "scale": ["n_params", "flops"]}


def test_task_hessians_join_the_points_of_their_own_task():
    points = pd.DataFrame({"trial_id": ["a", "a", "b"], "tokens": [10.0, 10.0, 10.0],
                           "task": ["bbbp", "esol", "bbbp"], "mode": "finetune"})
    hessian = pd.DataFrame({
        "trial_id": ["a", "a", "a", "a", "b"], "tokens": [10, 10, 10, 10, 10],
        "loss": ["pretrain", "finetune:bbbp", "finetune:esol", "pretrained_task:bbbp", "pretrain"],
        "lambda_max": [1.0, 2.0, 3.0, 5.0, 4.0], "trace": [10.0, 20.0, 30.0, 50.0, 40.0],
        "hessian_dim": [100, 110, 110, 110, np.nan]})
    out = checkpoint_proxies(points, hessian, pd.DataFrame()).set_index(["trial_id", "task"])
    assert out.loc[("a", "bbbp"), ["lambda_max", "ft_lambda_max", "ft_trace", "pt_task_lambda_max"]].tolist() == [
        1.0, 2.0, 20.0, 5.0]
    assert out.loc[("a", "bbbp"), "trace_per_param"] == 0.1 and out.loc[("a", "bbbp"), "pt_task_trace_per_param"] == (
        pytest.approx(50 / 110))
    assert out.loc[("a", "esol"), ["lambda_max", "ft_lambda_max", "ft_trace"]].tolist() == [1.0, 3.0, 30.0]
    assert np.isnan(out.loc[("a", "esol"), "pt_task_lambda_max"])  # not measured for esol: absent, not guessed
    assert out.loc[("b", "bbbp"), "lambda_max"] == 4.0 and np.isnan(out.loc[("b", "bbbp"), "trace_per_param"])
    assert np.isnan(out.loc[("b", "bbbp"), "ft_lambda_max"])


def test_task_sharpness_joins_the_points_of_its_own_task_and_leaves_the_pretraining_sharpness():
    points = pd.DataFrame({"trial_id": ["a", "a", "b"], "tokens": [10.0, 10.0, 10.0],
                           "task": ["bbbp", "esol", "bbbp"], "mode": "finetune"})
    landscape = pd.DataFrame({
        "trial_id": ["a", "a", "a", "b"], "tokens": [10, 10, 10, 10],
        "surface": ["random_directions", "random_directions", "pretrained_task:bbbp", "pretrained_task:bbbp"],
        "kind": ["1d", "1d", "sharpness", "sharpness"],
        "eps_sharpness": [0.1, 0.1, 0.5, 0.7], "adaptive_sharpness": [1.0, 1.0, 5.0, 7.0]})
    out = checkpoint_proxies(points, pd.DataFrame(), landscape).set_index(["trial_id", "task"])
    assert out.loc[("a", "bbbp"), ["eps_sharpness", "adaptive_sharpness", "pt_task_eps_sharpness",
                                   "pt_task_adaptive_sharpness"]].tolist() == [0.1, 1.0, 0.5, 5.0]
    assert out.loc[("a", "esol"), ["eps_sharpness", "adaptive_sharpness"]].tolist() == [0.1, 1.0]
    assert out.loc[("a", "esol"), ["pt_task_eps_sharpness", "pt_task_adaptive_sharpness"]].isna().all()  # not esol's
    assert out.loc[("b", "bbbp"), "pt_task_eps_sharpness"] == 0.7 and np.isnan(out.loc[("b", "bbbp"), "eps_sharpness"])
    assert len(out) == len(points)  # a join, never a fan-out


def test_task_sharpness_of_a_run_is_a_predictor_timed_before_fine_tuning(tmp_path):
    """On the fixture run (make_run writes each task's sharpness at the pretrained encoder, each its own values)."""
    from clmscale.engine.rundir import RunDir

    root = make_run(tmp_path / "run")
    inputs = RunDir(root).fit_inputs()
    joined = checkpoint_proxies(inputs.points, inputs.measured["hessian"], inputs.measured["landscape"])
    landscape = inputs.measured["landscape"]
    for task, rows in joined.groupby("task"):
        own = landscape[landscape["surface"] == f"pretrained_task:{task}"].astype({"tokens": float})
        expected = rows[["trial_id", "tokens"]].merge(own, on=["trial_id", "tokens"], how="left")
        for name in ("eps_sharpness", "adaptive_sharpness"):
            np.testing.assert_array_equal(rows[f"pt_task_{name}"].to_numpy(float), expected[name].to_numpy(float))
            assert rows[f"pt_task_{name}"].notna().all(), (task, name)
    other = joined.groupby("task")["pt_task_eps_sharpness"].apply(list)
    assert other["solubility"] != other["freesolv_demo"]  # each task its own, not one task's for all
    proxies = fit_run(root, n_bootstrap=0, n_jobs=1, n_starts=20)["proxies"]
    for name in ("pt_task_eps_sharpness", "pt_task_adaptive_sharpness"):
        assert name in proxies["timing"]["before_finetuning"] and name in proxies["predictors"]
        assert {(row["task"], row["mode"]) for row in proxies["prediction"] if row["proxy"] == name} == {
            (entry["task"], entry["mode"]) for entry in proxies["regret"]}
        assert proxies["labels"][name].startswith("task-loss")


# --------------------------------------------------------------------------------------------
# Task characteristics against per-task scaling (descriptive)


def trend_entry(task: str, slope: float, *, higher_is_better: bool = True, margin: float = 0.01) -> dict:
    """A downstream entry as downstream_trends writes it, with only the N verdict testable."""
    n = {"status": "ok", "verdict": "improving", "slope": slope, "ci": [slope - margin, slope + margin],
         "margin": margin}
    return {"task": task, "mode": "finetune", "metric": "roc_auc" if higher_is_better else "rmse",
            "higher_is_better": higher_is_better,
            "verdicts": {"n": n, "d": {"status": "skipped", "reason": "one budget"}}}


def test_task_scaling_relates_margin_scaled_slopes_to_characteristics():
    from clmscale.fits.fit import task_scaling

    characteristics = pd.DataFrame({"task": ["a", "b", "c", "d"], "task_type": "classification",
                                    "n_molecules": [100, 1000, 10000, 500], "scaffold_diversity": [0.9, 0.5, 0.1, 0.7],
                                    "nn_tanimoto_mean": [0.3, 0.3, 0.3, 0.3], "status": "ok"})
    # improvement per decade grows with size; d is an RMSE task (lower is better): -0.02 is +2 margins
    trends = [trend_entry("a", 0.0), trend_entry("b", 0.01), trend_entry("c", 0.03),
              trend_entry("d", -0.02, higher_is_better=False, margin=0.01)]
    section = task_scaling(characteristics, trends)
    assert section["status"] == "ok" and "no p-values" in section["descriptive"]
    d = next(t for t in section["tasks"] if t["task"] == "d")["modes"]["finetune"]
    assert d["n_slope_in_margins"] == pytest.approx(2.0) and d["n_slope_in_margins_ci"] == pytest.approx([1.0, 3.0])
    assert d["verdicts"]["d"]["status"] == "skipped"
    relation = {row["characteristic"]: row for row in section["relation"]}
    # slopes in margins: a 0, b 1, d 2, c 3; sizes a 100 < d 500 < b 1000 < c 10^4: ranks 1,3,4,2 vs 1,2,4,3
    assert relation["n_molecules"]["spearman"] == pytest.approx(0.8)
    assert relation["scaffold_diversity"]["spearman"] == pytest.approx(-0.8)
    assert relation["nn_tanimoto_mean"]["spearman"] is None and relation["nn_tanimoto_mean"]["reason"] == \
        "no spread in one of the two"
    assert relation["min_positive_fraction"]["n_tasks"] == 0  # not in the table: no value, no rho
    assert not any("p" in row for row in section["relation"])  # descriptive: no p-values anywhere
    two = task_scaling(characteristics.head(2), trends[:2])
    assert {row["spearman"] for row in two["relation"]} == {None}
    assert "a rank correlation needs 3" in two["relation"][0]["reason"]
    assert task_scaling(pd.DataFrame(), trends)["status"] == "skipped"
