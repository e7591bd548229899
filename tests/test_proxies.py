"""fits/proxies.py: timing of proxies, leave-one-size-out and selection regret on planted problems."""

import json

import numpy as np
import pandas as pd
import pytest

from clmscale.fits.proxies import leave_one_size_out, proxy_timing, selection_regret

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def test_proxy_timing():
    timing = proxy_timing(["pretrain_val_loss", "lambda_max", "trace", "eps_sharpness", "adaptive_sharpness",
                           "pt_task_lambda_max", "pt_task_loss", "ft_lambda_max", "ft_trace", "n_params", "tokens",
                           "flops", "mystery"])
    assert timing.before_finetuning == ("pretrain_val_loss", "lambda_max", "trace", "eps_sharpness",
                                        "adaptive_sharpness", "pt_task_lambda_max", "pt_task_loss")
    assert timing.descriptive == ("ft_lambda_max", "ft_trace")
    assert timing.scale == ("n_params", "tokens", "flops") and timing.unknown == ("mystery",)


def checkpoints(rng, proxy_weight, n_sizes=6, n_per_size=4, noise=0.004):
    """Per-checkpoint rows: loss falls with size and tokens; the proxy varies independently of loss, and the
    metric depends on it with proxy_weight per decade (0: the proxy carries nothing)."""
    rows = []
    for size_index in range(n_sizes):
        size = 10 ** (4 + 0.5 * size_index)
        for step in range(n_per_size):
            loss = 1.5 - 0.1 * size_index - 0.05 * step + rng.normal(0, 0.01)
            proxy = 10 ** rng.uniform(0, 2)  # λmax-like: positive, spans two decades
            metric = 0.95 - 0.2 * loss + proxy_weight * np.log10(proxy) + rng.normal(0, noise)
            rows.append({"trial_id": f"t{size_index}", "tokens": 1e5 * (step + 1), "n_params_non_embedding": size,
                         "pretrain_val_loss": loss, "lambda_max": proxy, "roc_auc": metric,
                         "val_roc_auc": metric + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_leave_one_size_out_finds_an_informative_proxy():
    rng = np.random.default_rng(0)
    findings = []
    for _ in range(20):
        result = leave_one_size_out(checkpoints(rng, 0.03), "roc_auc", "lambda_max", n_bootstrap=500)
        findings.append(result.finding)
        assert result.rmse_loss_proxy < 0.5 * result.rmse_loss, result
    assert findings.count("better") >= 19, findings
    assert result.proxy_transform == "log10" and result.n_sizes == 6 and result.n_points == 24
    assert len(result.per_size) == 6 and result.improvement == pytest.approx(result.rmse_loss - result.rmse_loss_proxy)
    json.dumps(result.to_dict(), allow_nan=False)
    assert result.sentence("BBBP ROC-AUC", "Hessian λmax").startswith(
        "Loss + proxy predicts held-out sizes better than loss alone (Hessian λmax, BBBP ROC-AUC): RMSE ")


def test_leave_one_size_out_does_not_credit_an_empty_proxy():
    rng = np.random.default_rng(1)
    results = [leave_one_size_out(checkpoints(rng, 0.0), "roc_auc", "lambda_max", n_bootstrap=500)
               for _ in range(40)]
    findings = [r.finding for r in results]
    assert findings.count("better") <= 3, findings  # an empty regressor only adds variance out of sample
    # the loss-alone error is the noise level; loss + proxy is no better
    assert np.median([r.rmse_loss for r in results]) == pytest.approx(0.004, rel=0.35)
    assert np.median([r.improvement for r in results]) <= 0


def test_leave_one_size_out_too_few_sizes():
    table = checkpoints(np.random.default_rng(2), 0.03, n_sizes=2)
    result = leave_one_size_out(table, "roc_auc", "lambda_max")
    assert result.reason.startswith("2 size(s) with finite roc_auc") and result.to_dict()["status"] == "skipped"
    assert leave_one_size_out(table.assign(lambda_max=np.nan), "roc_auc", "lambda_max").n_points == 0
    assert "loss column itself" in leave_one_size_out(checkpoints(np.random.default_rng(2), 0.0), "roc_auc",
                                                      "pretrain_val_loss").reason
    with pytest.raises(ValueError, match=r"no column\(s\) \['sharpness'\]"):
        leave_one_size_out(table, "roc_auc", "sharpness")


def test_selection_regret_on_a_planted_problem():
    """The metric depends on λmax (lower is better) and not on loss: picking by λmax or validation costs
    little, picking by loss costs what a random pick would; a proxy with no information costs about as much."""
    rng = np.random.default_rng(3)
    regrets = {"lambda_max": [], "pretrain_val_loss": [], "validation": [], "noise": []}
    random_pick = []
    for _ in range(40):
        n = 30
        table = pd.DataFrame({"trial_id": [f"t{i}" for i in range(n)], "tokens": 1e5,
                              "pretrain_val_loss": rng.uniform(1, 2, n), "lambda_max": rng.uniform(1, 100, n),
                              "noise": rng.uniform(0, 1, n)})
        table["value"] = 0.9 - 0.002 * table["lambda_max"] + rng.normal(0, 0.005, n)
        table["val_value"] = table["value"] + rng.normal(0, 0.005, n)
        result = selection_regret(table, selectors={"pretrain_val_loss": "min", "lambda_max": "min", "noise": "min"})
        by = result.set_index("selector")
        for name in regrets:
            regrets[name].append(by.loc[name, "regret"])
        random_pick.append(table["value"].max() - table["value"].mean())
        assert (result["regret"] >= 0).all()
    mean = {name: np.mean(values) for name, values in regrets.items()}
    assert mean["lambda_max"] < 0.15 * mean["pretrain_val_loss"], mean
    assert mean["validation"] < 0.15 * mean["pretrain_val_loss"], mean
    for empty in ("pretrain_val_loss", "noise"):
        assert 0.6 * np.mean(random_pick) < mean[empty] < 1.4 * np.mean(random_pick), (mean, np.mean(random_pick))


def test_selection_regret_is_direction_aware_and_grouped():
    table = pd.DataFrame({"task": ["esol"] * 3 + ["bbbp"] * 3, "trial_id": list("abcabc"), "tokens": 1.0,
                          "value": [0.9, 0.7, 1.2, 0.80, 0.85, 0.70],  # RMSE for esol, ROC-AUC for bbbp
                          "val_value": [0.8, 0.75, 1.0, 0.75, 0.9, 0.72], "pretrain_val_loss": [1.0, 2.0, 3.0] * 2})
    esol = selection_regret(table[table["task"] == "esol"], higher_is_better=False, group_cols=["task"])
    by = esol.set_index("selector")
    assert by.loc["validation", "picked"] == {"trial_id": "b", "tokens": 1.0}
    assert by.loc["validation", "regret"] == 0.0 and by.loc["validation", "test_best"] == 0.7
    assert by.loc["pretrain_val_loss", "regret"] == pytest.approx(0.2)  # picks a (0.9) against b (0.7)
    bbbp = selection_regret(table[table["task"] == "bbbp"], group_cols=["task"]).set_index("selector")
    assert bbbp.loc["validation", "regret"] == 0.0 and bbbp.loc["pretrain_val_loss", "regret"] == pytest.approx(0.05)
    assert bbbp.loc["validation", "group"] == {"task": "bbbp"}
    with pytest.raises(ValueError, match="'min' or 'max'"):
        selection_regret(table, selectors={"pretrain_val_loss": "lowest"})
