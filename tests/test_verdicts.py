"""fits/slopes.py and fits/verdicts.py: verdicts right at the rate they should be, run-level intervals that
cover, Holm/BH as statsmodels, and graceful 'not testable' answers."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests

from clmscale.fits.slopes import _codes, _design, compute_frontier_mask, fit_slope, pool_inverse_variance
from clmscale.fits.verdicts import (PLATEAU_MARGINS, adjust_pvalues, axis_trend, correct, judge, plateau_margin,
                           scaling_verdicts, trend_on_table, verdict_counts)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

N_DRAWS = 200
MARGIN = 0.01


def not_above(count: int, n: int, rate: float) -> bool:
    """count of n is consistent with a true rate of at most `rate` (one-sided binomial p > 0.001)."""
    return stats.binom.sf(count - 1, n, rate) > 1e-3


def sweep(rng, slope_per_decade, n_rungs=6, runs_per_rung=2, budgets=(1e5,), n_seeds=3, sd_run=0.01,
          sd_checkpoint=0.0, sd_noise=0.01, sd_seed=0.01, d_slope=0.0):
    """A long downstream table: metric = 0.7 + slope·log10 N + d_slope·log10 D + run + checkpoint + seed + noise.

    The run effect is shared by every checkpoint and split seed of that run (what makes rows dependent)."""
    seed_effect = rng.normal(0, sd_seed, n_seeds)
    rows = []
    for rung in range(n_rungs):
        n_params = 10 ** (4 + 0.5 * rung)
        for copy in range(runs_per_rung):
            run_effect = rng.normal(0, sd_run)
            for tokens in budgets:
                checkpoint_effect = rng.normal(0, sd_checkpoint)
                for split_seed in range(n_seeds):
                    value = (0.7 + slope_per_decade * math.log10(n_params) + d_slope * math.log10(tokens) + run_effect
                             + checkpoint_effect + seed_effect[split_seed] + rng.normal(0, sd_noise))
                    rows.append({"trial_id": f"r{rung}-{copy}", "n_params_non_embedding": n_params, "tokens": tokens,
                                 "flops": 6 * n_params * tokens, "split_seed": split_seed, "value": value,
                                 "pretrain_val_loss": 5.0 / math.log10(n_params * tokens)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The four verdicts, simulated


SERIES = {
    # name: (true slope, sweep settings, the verdicts that would be wrong)
    "improving": (0.05, {}, {"plateau", "degrading"}),
    "degrading": (-0.05, {}, {"plateau", "improving"}),
    "flat": (0.0, {"sd_run": 0.002, "sd_noise": 0.003, "sd_seed": 0.003}, {"improving", "degrading"}),
    # flat but noisy: the interval leaves the margin, so a false trend (2 × 2.5 %) is what this checks
    "flat_noisy": (0.0, {"sd_run": 0.02}, {"improving", "degrading"}),
    # at the margin's edge a plateau is wrong; TOST's size (α = 2.5 %) is what this checks
    "at_margin": (MARGIN, {"sd_run": 0.004, "sd_noise": 0.004}, {"plateau", "degrading"}),
    "underpowered": (0.005, {"n_rungs": 4, "runs_per_rung": 1, "n_seeds": 2, "sd_run": 0.03, "sd_noise": 0.03},
                     {"degrading"}),
}


@pytest.fixture(scope="module")
def simulated_verdicts():
    rng = np.random.default_rng(20240613)
    out = {}
    for name, (slope, settings, _) in SERIES.items():
        verdicts = []
        for _ in range(N_DRAWS):
            table = sweep(rng, slope, **settings)
            verdicts.append(axis_trend(table, "n_params_non_embedding", margin=MARGIN).combined.verdict)
        out[name] = verdicts
    return out


@pytest.mark.parametrize("name", list(SERIES))
def test_wrong_definite_verdicts_at_most_nominal(simulated_verdicts, name):
    wrong_verdicts = SERIES[name][2]
    wrong = sum(v in wrong_verdicts for v in simulated_verdicts[name])
    assert not_above(wrong, N_DRAWS, 0.05), (name, wrong, pd.Series(simulated_verdicts[name]).value_counts())


def test_clear_series_get_their_verdict(simulated_verdicts):
    counts = {name: pd.Series(v).value_counts().to_dict() for name, v in simulated_verdicts.items()}
    assert counts["improving"].get("improving", 0) >= 0.95 * N_DRAWS, counts
    assert counts["degrading"].get("degrading", 0) >= 0.95 * N_DRAWS, counts
    assert counts["flat"].get("plateau", 0) >= 0.8 * N_DRAWS, counts
    assert counts["underpowered"].get("inconclusive", 0) >= 0.6 * N_DRAWS, counts


def test_inconclusive_says_what_the_grid_could_detect():
    table = sweep(np.random.default_rng(1), 0.005, n_rungs=4, runs_per_rung=1, n_seeds=2, sd_run=0.03, sd_noise=0.03)
    verdict = axis_trend(table, "n_params_non_embedding", margin=MARGIN).combined
    assert verdict.verdict == "inconclusive" and verdict.n_runs == 4
    # 80 % power at one-sided α = 2.5 %: (t_0.975 + t_0.8)·se on the run-level df
    expected = (stats.t.ppf(0.975, verdict.df) + stats.t.ppf(0.8, verdict.df)) * verdict.se
    assert verdict.min_detectable_slope == pytest.approx(expected)
    assert verdict.min_detectable_slope > MARGIN
    factor = (verdict.min_detectable_slope / MARGIN) ** 2
    assert f"~{factor:.0f}× the runs" in verdict.settle
    sentence = verdict.sentence("ESOL RMSE", "parameters")
    assert sentence.startswith("Inconclusive: ESOL RMSE against parameters: slope ")
    assert "4 runs" in sentence and "the grid detects slopes of ±" in sentence and "CRV3" in sentence


def test_verdict_reads_the_metric_and_the_axis_in_their_own_sense():
    rng = np.random.default_rng(2)
    rising = sweep(rng, 0.05)
    assert axis_trend(rising, "n_params_non_embedding", higher_is_better=False).combined.verdict == "degrading"
    # against pretraining loss (falls as scale grows) a metric that rises with N is improving
    by_loss = axis_trend(rising, "pretrain_val_loss", x_grows_with_scale=False, margin=MARGIN).combined
    assert by_loss.slope < 0 and by_loss.verdict == "improving"


def test_a_small_real_slope_inside_the_margin_is_a_plateau():
    """TOST precedence: an interval inside ±margin is a plateau even if it also excludes 0."""
    table = sweep(np.random.default_rng(3), 0.004, n_rungs=8, runs_per_rung=4, sd_run=0.001, sd_noise=0.001,
                  sd_seed=0.001)
    verdict = axis_trend(table, "n_params_non_embedding", margin=MARGIN).combined
    assert verdict.ci[0] > 0 and verdict.ci[1] < MARGIN
    assert verdict.verdict == "plateau" and verdict.p_tost < 0.025 and verdict.p_verdict == 2 * verdict.p_tost


# --------------------------------------------------------------------------------------------
# Run-level intervals


def test_jackknife_is_statsmodels_crv3():
    table = sweep(np.random.default_rng(4), 0.02, budgets=(1e5, 1e6))
    estimate = fit_slope(table, "n_params_non_embedding", "value", "trial_id", "split_seed", "tokens")
    design = _design(np.log10(table["n_params_non_embedding"].to_numpy()), _codes(table, "split_seed"),
                     _codes(table, "tokens"))
    reference = sm.OLS(table["value"].to_numpy(), design).fit(
        cov_type="cluster-crv3", cov_kwds={"groups": _codes(table, "trial_id")}, use_t=True)
    assert estimate.slope == pytest.approx(reference.params[1], rel=1e-10)
    assert estimate.se == pytest.approx(reference.bse[1], rel=1e-10)
    assert estimate.df == reference.df_resid_inference == 11


@pytest.mark.parametrize("method", ["cluster_jackknife", "cluster_bootstrap"])
def test_run_level_intervals_are_wider_and_cover(method):
    """A shared run effect over 2 budgets × 3 split seeds: rows are not independent. The row-level (iid)
    interval is too narrow; the run-level one covers the true slope at about 95 %."""
    rng = np.random.default_rng(5)
    truth, covered, covered_iid, wider = 0.02, 0, 0, 0
    for draw in range(N_DRAWS):
        table = sweep(rng, truth, budgets=(1e5, 1e6), sd_run=0.02, sd_checkpoint=0.01)
        run_level = fit_slope(table, "n_params_non_embedding", "value", "trial_id", "split_seed", "tokens",
                              method=method, n_bootstrap=400, seed=draw)
        row_level = fit_slope(table, "n_params_non_embedding", "value", "trial_id", "split_seed", "tokens",
                              method="iid")
        lo, hi = run_level.ci()
        covered += lo <= truth <= hi
        iid_lo, iid_hi = row_level.ci()
        covered_iid += iid_lo <= truth <= iid_hi
        wider += (hi - lo) > (iid_hi - iid_lo)
    assert stats.binomtest(covered, N_DRAWS, 0.95).pvalue > 1e-3, covered
    assert covered_iid < 0.8 * N_DRAWS, covered_iid
    assert wider >= 0.95 * N_DRAWS, wider


def test_slope_along_one_run_with_mixedlm_and_jackknife():
    """D along each run's checkpoints (WSD milestones), rungs as strata: both methods cover the truth."""
    rng = np.random.default_rng(6)
    truth, covered = -0.03, {"cluster_jackknife": 0, "mixedlm": 0}
    n_draws = 60  # MixedLM takes ~0.2 s a fit
    for _ in range(n_draws):
        table = sweep(rng, 0.0, n_rungs=4, runs_per_rung=2, budgets=(1e5, 3e5, 1e6, 3e6), d_slope=truth,
                      sd_checkpoint=0.01)
        for method in covered:
            estimate = fit_slope(table, "tokens", "value", "trial_id", "split_seed", "n_params_non_embedding",
                                 method=method)
            assert estimate.testable, estimate.reason
            lo, hi = estimate.ci()
            covered[method] += lo <= truth <= hi
    for method, count in covered.items():
        assert stats.binomtest(count, n_draws, 0.95).pvalue > 1e-3, (method, count)


def test_axes_are_separated():
    """N matters and D does not: N at fixed D improves, D at fixed N is flat, C on the frontier improves."""
    table = sweep(np.random.default_rng(7), 0.04, budgets=(1e5, 1e6, 1e7), sd_run=0.003, sd_noise=0.003,
                  sd_seed=0.003)
    result = scaling_verdicts(table, margin=MARGIN)
    assert result["n"].combined.verdict == "improving"
    assert result["d"].combined.verdict == "plateau"
    assert result["c"].combined.verdict == "improving"
    assert result["n"].combined.n_runs == 12 and len(result["n"].per_stratum) == 3
    assert "tokens held fixed (3 values)" in result["n"].combined.sentence("BBBP ROC-AUC", "parameters")
    assert "compute frontier" in result["c"].held_fixed
    json.dumps({key: trend.to_dict() for key, trend in result.items()}, allow_nan=False)


def test_inverse_variance_pooling():
    rng = np.random.default_rng(8)
    # disjoint runs per budget: pooling is valid and agrees with the stratified fit
    first, second = sweep(rng, 0.03), sweep(rng, 0.03, budgets=(1e6,))
    second["trial_id"] = "b-" + second["trial_id"]
    table = pd.concat([first, second], ignore_index=True)
    pooled = axis_trend(table, "n_params_non_embedding", stratum_col="tokens", combine="inverse_variance")
    stratified = axis_trend(table, "n_params_non_embedding", stratum_col="tokens")
    assert pooled.combined.n_runs == 24 and pooled.combined.method == "inverse_variance"
    assert pooled.combined.slope == pytest.approx(stratified.combined.slope, abs=stratified.combined.se)
    estimates = [fit_slope(rows, "n_params_non_embedding", "value", "trial_id", "split_seed")
                 for _, rows in table.groupby("tokens")]
    weights = np.array([1 / e.se**2 for e in estimates])
    assert pool_inverse_variance(estimates).slope == pytest.approx(
        weights @ [e.slope for e in estimates] / weights.sum())
    # the same runs at two budgets: pooling would count them twice, so it refuses
    shared = axis_trend(sweep(rng, 0.03, budgets=(1e5, 1e6)), "n_params_non_embedding", stratum_col="tokens",
                        combine="inverse_variance")
    assert not shared.combined.testable and "needs independent strata" in shared.combined.reason


def test_budgets_within_tolerance_are_one_stratum():
    table = sweep(np.random.default_rng(9), 0.03, budgets=(1e5,))
    table["tokens"] = table["tokens"] * (1 + 0.001 * table["n_params_non_embedding"].rank(method="dense"))
    assert len(axis_trend(table, "n_params_non_embedding", stratum_col="tokens").per_stratum) == 1


# --------------------------------------------------------------------------------------------
# Too little data: a reason, not an exception


@pytest.mark.parametrize("edit, words", [
    (lambda t: t[t["trial_id"].isin(["r0-0", "r1-0"])], "2 run(s) (r0-0, r1-0); a run-level interval needs at least 3"),
    (lambda t: t.assign(n_params_non_embedding=1e6), "does not vary"),
    (lambda t: t.iloc[:2], "2 usable rows"),
    (lambda t: t.assign(value=np.nan), "0 usable rows"),
    (lambda t: t[t["trial_id"].isin(["r0-0", "r0-1", "r3-0"])], "rests on a single run"),
])
def test_not_testable_is_a_reason(edit, words):
    table = edit(sweep(np.random.default_rng(10), 0.03))
    if words == "rests on a single run":
        table = pd.concat([table, table[table["trial_id"] == "r0-0"].assign(trial_id="r0-0x")])
    verdict = axis_trend(table, "n_params_non_embedding", margin=MARGIN).combined
    assert not verdict.testable and verdict.verdict == "inconclusive" and words in verdict.reason
    assert verdict.to_dict()["status"] == "skipped"
    assert verdict.sentence("BBBP ROC-AUC", "parameters").startswith("Not testable: BBBP ROC-AUC against parameters")
    json.dumps(verdict.to_dict(), allow_nan=False)
    assert verdict_counts([verdict]) == {"improving": 0, "degrading": 0, "plateau": 0, "inconclusive": 0,
                                         "not testable": 1}


def test_missing_column_is_an_error_naming_it():
    with pytest.raises(ValueError, match="no column 'split_seed'"):
        axis_trend(sweep(np.random.default_rng(0), 0.0).drop(columns="split_seed"), "n_params_non_embedding")


# --------------------------------------------------------------------------------------------
# Margins


def test_margins():
    assert plateau_margin("roc_auc").per_decade == 0.01 and plateau_margin("prc_auc").per_decade == 0.01
    assert plateau_margin("rmse", label_sd=2.0).per_decade == pytest.approx(PLATEAU_MARGINS["rmse"][0] * 2.0)
    assert "label sd" in plateau_margin("mae", label_sd=1.5).source
    assert plateau_margin("rmse", margin=0.05) == plateau_margin("roc_auc", margin=0.05)
    assert plateau_margin("roc_auc", margin=0.05).source == "given"
    with pytest.raises(ValueError, match="label_sd=None"):
        plateau_margin("rmse")
    with pytest.raises(ValueError, match="no default margin for metric 'accuracy'"):
        plateau_margin("accuracy")
    with pytest.raises(ValueError, match="positive number"):
        plateau_margin("roc_auc", margin=-1.0)


# --------------------------------------------------------------------------------------------
# Multiple comparisons


P_VECTOR = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216, 0.222, 0.251, 0.269,
                     0.34, 0.5, 0.69, 0.9])


@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_adjusted_p_is_statsmodels(method):
    np.testing.assert_allclose(adjust_pvalues(P_VECTOR, method), multipletests(P_VECTOR, method=method)[1])
    with_nan = np.insert(P_VECTOR, [0, 5, 17], np.nan)
    adjusted = adjust_pvalues(with_nan, method)
    assert np.isnan(adjusted[[0, 6, 19]]).all()
    np.testing.assert_allclose(adjusted[np.isfinite(with_nan)], multipletests(P_VECTOR, method=method)[1])
    assert np.isnan(adjust_pvalues([np.nan, np.nan], method)).all()


def test_holm_known_values_and_bad_input():
    # Holm by hand: sorted p × (m − rank), running maximum
    np.testing.assert_allclose(adjust_pvalues([0.01, 0.04, 0.03], "holm"), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(adjust_pvalues([0.01, 0.04, 0.03], "fdr_bh"), [0.03, 0.04, 0.04])
    with pytest.raises(ValueError, match="method must be one of"):
        adjust_pvalues([0.1], "bonferroni-ish")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        adjust_pvalues([0.1, 1.5])


def test_correction_turns_a_marginal_verdict_inconclusive():
    rng = np.random.default_rng(11)
    strong = axis_trend(sweep(rng, 0.05), "n_params_non_embedding", margin=MARGIN).combined
    marginal = None
    for _ in range(200):  # the first draw whose raw verdict is improving with 0.01 < p < 0.05
        candidate = axis_trend(sweep(rng, 0.01, sd_run=0.02), "n_params_non_embedding", margin=MARGIN).combined
        if candidate.verdict == "improving" and 0.01 < candidate.p_verdict < 0.05:
            marginal = candidate
            break
    assert marginal is not None
    untestable = axis_trend(sweep(rng, 0.0).iloc[:2], "n_params_non_embedding", margin=MARGIN).combined
    family = [strong, marginal] + [axis_trend(sweep(rng, 0.0, sd_run=0.05), "n_params_non_embedding",
                                              margin=MARGIN).combined for _ in range(4)] + [untestable]
    corrected = correct(family, "holm")
    assert corrected[0].verdict == "improving" and corrected[0].correction == "Holm over 6 trend tests"
    assert corrected[1].raw_verdict == "improving" and corrected[1].verdict == "inconclusive"
    assert "not definite after Holm over 6 trend tests" in corrected[1].settle
    assert corrected[-1] == untestable
    np.testing.assert_allclose([v.p_adjusted for v in corrected[:-1]],
                               multipletests([v.p_verdict for v in family[:-1]], method="holm")[1])
    assert correct(corrected, "holm") == corrected  # adjusting again changes nothing


# --------------------------------------------------------------------------------------------
# Frontier and any table


def test_compute_frontier_mask():
    table = pd.DataFrame({"trial_id": ["a", "a", "b", "b", "c", "c"], "tokens": [1, 2, 1, 2, 1, 1],
                          "flops": [1, 2, 2, 4, 3, 3], "pretrain_val_loss": [3.0, 2.5, 2.8, 2.0, 2.6, 2.6]})
    # a@1 (first), a@2 (2.5 < 3.0), b@1 ties a@2 on C but loses, c@1 is costlier than a@2 and loses (2.6 > 2.5)
    assert compute_frontier_mask(table).tolist() == [True, True, False, True, False, False]


def test_trend_on_table():
    rng = np.random.default_rng(12)
    table = sweep(rng, 0.05)[["trial_id", "n_params_non_embedding", "value"]].rename(
        columns={"n_params_non_embedding": "size", "value": "score"})
    result = trend_on_table(table, "size", "score", group_col="trial_id", margin=0.01)
    json.dumps(result, allow_nan=False)
    assert result["verdict"] == "improving" and result["n_groups"] == 12 and result["method"] == "cluster_jackknife"
    assert result["ci"][0] < 0.05 < result["ci"][1] and result["margin"] == 0.01
    assert {"slope_per_decade", "min_detectable_slope", "p_tost", "sentence"} <= set(result)
    rows = trend_on_table(table, "size", "score", margin=0.01)
    assert rows["method"] == "iid" and rows["n_groups"] == len(table)
    lower = trend_on_table(table.assign(score=-table["score"]), "size", "score", margin=0.01,
                           higher_is_better=False)
    assert lower["verdict"] == "improving"
    with pytest.raises(ValueError, match="no default margin for metric 'score'"):
        trend_on_table(table, "size", "score")
    assert trend_on_table(table, "size", "score", metric="roc_auc")["margin"] == 0.01


def test_judge_rejects_a_bad_level():
    estimate = fit_slope(sweep(np.random.default_rng(0), 0.0), "n_params_non_embedding", "value", "trial_id")
    with pytest.raises(ValueError, match="level must be in"):
        judge(estimate, 0.01, level=1.5)
