"""fits/taskladder.py: the two-step prediction recovers the largest rung of synthetic ladders with a known link."""

import json

import numpy as np
import pytest
from scipy.special import expit

from clmscale.fits import NotFittedError
from clmscale.fits.taskladder import TaskLadder, task_ladder_backtest

LOSS_TRUTH = {"E": 0.5, "A": 50.0, "alpha": 0.35, "B": 20.0, "beta": 0.3}


def ladder(n_sizes=5, n_budgets=4, noise=0.002, seed=0):
    """Checkpoints of a ladder: task loss from a known L(N, D), with multiplicative noise."""
    n_params, n_tokens = (g.ravel() for g in np.meshgrid(np.logspace(4, 6, n_sizes), np.logspace(5, 7, n_budgets)))
    t = LOSS_TRUTH
    loss = t["E"] + t["A"] / n_params ** t["alpha"] + t["B"] / n_tokens ** t["beta"]
    return n_params, n_tokens, loss * np.exp(np.random.default_rng(seed).normal(0, noise, loss.size))


def roc_auc_link(loss):
    return 0.5 + 0.45 * expit(-3.0 * (loss - 1.5))


def test_sigmoid_link_predicts_the_largest_rung():
    n_params, n_tokens, loss = ladder(seed=1)
    metric = roc_auc_link(loss) + np.random.default_rng(2).normal(0, 0.002, loss.size)
    result = task_ladder_backtest(n_params, n_tokens, loss, metric, estimator=TaskLadder(metric_range=(0.5, 1.0)))
    assert result.fit.loss_law_ == "chinchilla" and result.fit.link_ == "sigmoid"
    assert result.n_holdout == 4 and result.n_train == 16 and result.holdout_n_params == (1e6,)
    assert result.task_loss_mean_abs_relative_error < 0.02
    assert result.mean_abs_error < 0.01, result.points
    assert result.link_only_mean_abs_error < 0.01
    # the held-out rung lies beyond the training range of the metric: this is extrapolation, not interpolation
    assert result.points["metric"].max() > metric[n_params < 1e6].max()
    params = result.fit.link_params_
    assert params["k"] == pytest.approx(3.0, rel=0.3) and params["L0"] == pytest.approx(1.5, abs=0.1)
    json.dumps(result.to_dict(), allow_nan=False)
    assert result.sentence("BBBP (fine-tuned)", "ROC-AUC").startswith(
        "BBBP (fine-tuned): predicted from the smaller rungs, the largest (10⁶ parameters) is off by 0.00")


def test_rmse_like_metric_with_a_power_link():
    """RMSE = sd·√MSE: a power link in the loss, fitted as log-log."""
    n_params, n_tokens, loss = ladder(seed=3)
    rmse = 1.3 * np.sqrt(loss) * np.exp(np.random.default_rng(4).normal(0, 0.003, loss.size))
    result = task_ladder_backtest(n_params, n_tokens, loss, rmse)
    assert result.fit.link_ == "loglinear"
    assert result.fit.link_params_["p"] == pytest.approx(0.5, abs=0.05)
    assert (result.points["error"].abs() / result.points["metric"]).max() < 0.02


def test_one_budget_uses_a_law_in_n_alone():
    n_params, n_tokens, loss = ladder(n_sizes=6, n_budgets=1, noise=0.001, seed=5)
    result = task_ladder_backtest(n_params, n_tokens, loss, roc_auc_link(loss),
                                  estimator=TaskLadder(metric_range=(0.5, 1.0)))
    assert result.fit.loss_law_ == "saturating_n"
    assert result.fit.loss_law_reason_.endswith("one budget; E + A·N^(−γ) identified")
    assert result.mean_abs_error < 0.02


def test_two_budgets_fall_back_to_pure_power_laws():
    """3 sizes × 2 budgets cannot identify L(N, D): the ladder says so and uses log L linear in log N, log D."""
    n_params, n_tokens, loss = ladder(n_sizes=4, n_budgets=2, seed=6)
    fit = TaskLadder(metric_range=(0.5, 1.0)).fit(n_params, n_tokens, loss, roc_auc_link(loss))
    assert fit.loss_law_ == "loglinear_nd" and "L(N, D) needs at least 3, 3 and 6" in fit.loss_law_reason_
    assert fit.to_dict()["loss_law_fit"]["coefficients"][1] < 0  # loss falls with N


def test_errors_and_contract():
    n_params, n_tokens, loss = ladder(n_sizes=2)
    with pytest.raises(ValueError, match="must leave at least 2 of the 2 model sizes"):
        task_ladder_backtest(n_params, n_tokens, loss, roc_auc_link(loss))
    with pytest.raises(NotFittedError):
        TaskLadder().predict([1e5], [1e6])
    with pytest.raises(ValueError, match="link must be 'auto' or one of"):
        TaskLadder(link="spline").fit(n_params, n_tokens, loss, roc_auc_link(loss))
    with pytest.raises(ValueError, match="needs metric_range"):
        TaskLadder(link="sigmoid").fit(n_params, n_tokens, loss, roc_auc_link(loss))
    ladder_fit = TaskLadder(metric_range=(0.5, 1.0))
    assert not [name for name in vars(ladder_fit) if name.endswith("_")]
    assert TaskLadder(**ladder_fit.get_params()).get_params() == ladder_fit.get_params()
    metric = roc_auc_link(loss)
    metric[0] = np.nan
    with pytest.warns(UserWarning, match="dropped 1 of 8 rows"):
        assert ladder_fit.fit(n_params, n_tokens, loss, metric) is ladder_fit
    assert ladder_fit.n_points_ == 7
