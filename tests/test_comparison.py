"""fits/comparison.py: picking on validation removes the winner's curse; paired differences are right at 5 %."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from clmscale.fits.comparison import best_on_validation, paired_difference


def evaluations(rng, n_checkpoints=20, n_seeds=3, truth=0.8, noise=0.02):
    """Every checkpoint is equally good; validation and test scores are independent noisy measurements."""
    seed_effect = rng.normal(0, noise, n_seeds)  # a hard split is hard for every model
    rows = [{"task": "bbbp", "mode": "finetune", "trial_id": f"t{c}", "tokens": 1e5, "split_seed": s,
             "value": truth + seed_effect[s] + rng.normal(0, noise), "val_value": truth + rng.normal(0, noise)}
            for c in range(n_checkpoints) for s in range(n_seeds)]
    baseline = pd.DataFrame({"split_seed": range(n_seeds),
                             "value": truth + seed_effect + rng.normal(0, noise, n_seeds)})
    return pd.DataFrame(rows), baseline


def test_choosing_on_validation_avoids_the_winners_curse():
    rng = np.random.default_rng(0)
    on_test, on_validation, better_on_test, better_on_validation = [], [], 0, 0
    n_draws = 200
    for _ in range(n_draws):
        table, baseline = evaluations(rng)
        key = ["trial_id"]
        test_means = table.groupby(key)["value"].mean()
        test_pick = test_means.idxmax()
        on_test.append(test_means.max())
        pick = best_on_validation(table)
        assert len(pick) == 1 and pick.loc[0, "task"] == "bbbp"
        chosen = table[table["trial_id"] == pick.loc[0, "trial_id"]]
        on_validation.append(chosen["value"].mean())
        better_on_validation += paired_difference(chosen, baseline).finding == "better"
        better_on_test += paired_difference(table[table["trial_id"] == test_pick], baseline).finding == "better"
    assert np.mean(on_test) - 0.8 > 0.015  # the maximum of 20 noisy test means is biased up
    assert abs(np.mean(on_validation) - 0.8) < 0.004  # the validation pick is an honest draw
    assert stats.binom.sf(better_on_validation - 1, n_draws, 0.05) > 1e-3, better_on_validation
    assert better_on_test > 2 * better_on_validation


def test_paired_difference_finds_a_real_gain_and_reads_the_metric_sense():
    pick = pd.DataFrame({"split_seed": [0, 1, 2, 0], "value": [0.85, 0.80, 0.90, 0.87]})  # seed 0 averaged
    baseline = pd.DataFrame({"split_seed": [0, 1, 2, 3], "value": [0.80, 0.76, 0.85, 0.5]})
    result = paired_difference(pick, baseline)
    differences = np.array([0.86 - 0.80, 0.80 - 0.76, 0.90 - 0.85])
    assert result.n_pairs == 3 and result.mean == pytest.approx(differences.mean())
    assert result.se == pytest.approx(differences.std(ddof=1) / np.sqrt(3))
    assert result.finding == "better" and result.ci[0] > 0
    assert paired_difference(pick, baseline, higher_is_better=False).finding == "worse"  # as RMSE
    json.dumps(result.to_dict(), allow_nan=False)
    lonely = paired_difference(pick, baseline[baseline["split_seed"] == 3])
    assert lonely.reason.startswith("0 split seed(s) shared") and lonely.to_dict()["status"] == "skipped"


def test_best_on_validation_per_group_and_direction():
    table = pd.DataFrame({"task": ["esol"] * 4 + ["bbbp"] * 4, "mode": "finetune",
                          "trial_id": ["a", "a", "b", "b"] * 2, "tokens": 1.0,
                          "val_value": [1.0, 1.2, 0.8, 0.9, 0.7, 0.8, 0.9, 0.7]})
    lowest = best_on_validation(table[table["task"] == "esol"], higher_is_better=False)
    assert lowest["trial_id"].tolist() == ["b"] and lowest["val_mean"].tolist() == [pytest.approx(0.85)]
    both = best_on_validation(table).set_index("task")
    assert both.loc["bbbp", "trial_id"] == "b" and both.loc["esol", "trial_id"] == "a"
    with pytest.raises(ValueError, match=r"no column\(s\) \['val_value'\]"):
        best_on_validation(table.drop(columns="val_value"))
