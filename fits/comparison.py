"""Choose on validation, report on test: the best pretrained checkpoint per task against each baseline.

Picking the checkpoint with the best test score and comparing that score with a baseline's is the winner's
curse: the maximum of noisy test scores is biased upward. `best_on_validation` picks on the validation metric;
`paired_difference` compares the pick with a baseline on test, split seed by split seed (both saw the same
splits, so the seed's difficulty cancels), with a t interval over seeds. The unit is the split seed; the
checkpoint is fixed, so the statement is about this checkpoint, not about pretraining runs in general.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from clmscale.engine.files import json_safe


def best_on_validation(
    points: pd.DataFrame,
    val_col: str = "val_value",
    higher_is_better: bool = True,
    group_cols: Sequence[str] = ("task",),
    checkpoint_cols: Sequence[str] = ("mode", "trial_id", "tokens"),
) -> pd.DataFrame:
    """Per group, the checkpoint whose mean validation metric over split seeds is best; one row per group
    with checkpoint_cols and the validation mean. Rows: one per checkpoint × split seed (or per checkpoint)."""
    missing = [c for c in (val_col, *group_cols, *checkpoint_cols) if c not in points.columns]
    if missing:
        raise ValueError(f"best_on_validation: table has no column(s) {missing}; it has {list(points.columns)}")
    keys = [*group_cols, *checkpoint_cols]
    values = points.assign(_val=pd.to_numeric(points[val_col], errors="coerce"))
    means = values[np.isfinite(values["_val"])].groupby(keys, sort=True, dropna=False)["_val"].mean().reset_index()
    if means.empty:
        return pd.DataFrame(columns=[*keys, "val_mean"])
    order = means.sort_values("_val", ascending=not higher_is_better, kind="stable")
    best = order.groupby(list(group_cols), sort=True, dropna=False).head(1) if group_cols else order.head(1)
    return best.rename(columns={"_val": "val_mean"}).reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Test metric of the pick minus the baseline's, per shared split seed, in the metric's improving sense."""

    mean: float  # > 0: the pick is better (higher_is_better aware)
    ci: tuple[float, float]
    se: float
    df: float
    p: float  # two-sided, against no difference
    n_pairs: int
    level: float
    finding: str  # "better", "worse" or "no clear difference" (the interval straddles 0)
    reason: str = ""

    def to_dict(self) -> dict:
        return json_safe({"status": "skipped" if self.reason else "ok", **dataclasses.asdict(self)})


def paired_difference(
    pick: pd.DataFrame,
    baseline: pd.DataFrame,
    on: str = "split_seed",
    value_col: str = "value",
    higher_is_better: bool = True,
    level: float = 0.95,
) -> PairedDifference:
    """Paired t interval of pick − baseline over the split seeds both have (several rows per seed are averaged)."""
    for name, frame in (("pick", pick), ("baseline", baseline)):
        missing = [c for c in (on, value_col) if c not in frame.columns]
        if missing:
            raise ValueError(f"paired_difference: {name} has no column(s) {missing}; it has {list(frame.columns)}")
    per_seed = [
        frame.assign(_v=pd.to_numeric(frame[value_col], errors="coerce")).groupby(on)["_v"].mean()
        for frame in (pick, baseline)
    ]
    paired = pd.concat(per_seed, axis=1, keys=["pick", "baseline"]).dropna()
    sign = 1.0 if higher_is_better else -1.0
    differences = sign * (paired["pick"] - paired["baseline"]).to_numpy(float)
    n = differences.size
    nan = math.nan
    if n < 2:
        return PairedDifference(
            mean=float(differences.mean()) if n else nan,
            ci=(nan, nan),
            se=nan,
            df=nan,
            p=nan,
            n_pairs=n,
            level=level,
            finding="no clear difference",
            reason=f"{n} split seed(s) shared by the pick and the baseline; a paired interval needs at least 2",
        )
    mean, se, df = float(differences.mean()), float(differences.std(ddof=1) / math.sqrt(n)), float(n - 1)
    if se == 0:
        return PairedDifference(
            mean=mean,
            ci=(mean, mean),
            se=0.0,
            df=df,
            p=nan,
            n_pairs=n,
            level=level,
            finding="better" if mean > 0 else "worse" if mean < 0 else "no clear difference",
            reason="" if mean != 0 else "identical on every split seed",
        )
    half = float(stats.t.ppf(0.5 + level / 2, df) * se)
    p = float(2 * stats.t.sf(abs(mean) / se, df))
    lo, hi = mean - half, mean + half
    finding = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return PairedDifference(mean=mean, ci=(lo, hi), se=se, df=df, p=p, n_pairs=n, level=level, finding=finding)
