"""Proxies judged as a user would use them: by what they predict before fine-tuning, and by what they pick.

(a) `proxy_timing`: which columns exist before a task is fine-tuned (pretraining loss, Hessian and
    sharpness of the pretraining loss at the pretrained weights, `pt_task_*` task-loss quantities, its
    Hessian and sharpness, at the pretrained weights) and which are measured at fine-tuned weights (`ft_*`):
    those describe, they cannot predict, and only the first kind enters a "predicts downstream" test.
(b) `leave_one_size_out`: hold out each model size in turn, fit metric ~ loss and metric ~ loss + proxy
    (OLS) on the other sizes, predict the held-out size; both errors in metric units, and their difference
    with a bootstrap interval over sizes. This is the scaling question: does the proxy tell you how a size
    you have not fine-tuned will do?
(c) `selection_regret`: pick one checkpoint by pretraining loss, by each proxy, and by the validation metric;
    the regret is how far the pick's test metric falls short of the test-best checkpoint, in metric units.
    The test-best is an oracle for scoring only; nothing here selects on test.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from clmscale.engine.files import json_safe

# Measured at the pretrained weights, before any fine-tuning (docs/CONTRACTS.md's result tables).
BEFORE_FINETUNING = ("pretrain_val_loss", "val_loss", "lambda_max", "trace", "eps_sharpness", "adaptive_sharpness")
BEFORE_FINETUNING_PREFIXES = ("pt_task_",)  # task loss, Hessian, sharpness at the pretrained encoder + a probe head
DESCRIPTIVE_PREFIXES = ("ft_",)  # measured at the fine-tuned weights
SCALE_COLUMNS = ("n_params", "n_params_non_embedding", "tokens", "flops")  # the axes themselves


@dataclasses.dataclass(frozen=True)
class ProxyTiming:
    before_finetuning: tuple[str, ...]  # may enter "predicts downstream" tests
    descriptive: tuple[str, ...]  # measured after fine-tuning: describe, never predict
    scale: tuple[str, ...]  # N, D, C: the axes of the trend tests, not proxies
    unknown: tuple[str, ...]  # not a known proxy column; the caller decides


def proxy_timing(columns: Sequence[str]) -> ProxyTiming:
    """Sort proxy columns by when they can be measured (module docstring, (a))."""
    groups: dict[str, list[str]] = {"before_finetuning": [], "descriptive": [], "scale": [], "unknown": []}
    for column in columns:
        if column in SCALE_COLUMNS:
            groups["scale"].append(column)
        elif column.startswith(DESCRIPTIVE_PREFIXES):
            groups["descriptive"].append(column)
        elif column in BEFORE_FINETUNING or column.startswith(BEFORE_FINETUNING_PREFIXES):
            groups["before_finetuning"].append(column)
        else:
            groups["unknown"].append(column)
    return ProxyTiming(**{name: tuple(values) for name, values in groups.items()})


# --------------------------------------------------------------------------------------------
# (b) Leave one size out


FINDINGS = types.MappingProxyType(
    {
        "better": "loss + proxy predicts held-out sizes better than loss alone",
        "worse": "loss alone predicts held-out sizes better than loss + proxy",
        "no clear difference": "no clear difference between loss + proxy and loss alone on held-out sizes",
    }
)
MIN_SIZES = 3  # each fit needs two other sizes at least, and a held-out one


@dataclasses.dataclass(frozen=True)
class LeaveOneSizeOut:
    """Prediction errors (RMSE, metric units) of held-out sizes from loss alone and from loss + proxy.

    improvement = rmse_loss − rmse_loss_proxy (> 0: the proxy helps), with a percentile bootstrap interval
    over held-out sizes; finding is a key of FINDINGS read from that interval.
    """

    metric: str
    proxy: str
    rmse_loss: float
    rmse_loss_proxy: float
    improvement: float
    improvement_ci: tuple[float, float]
    level: float
    finding: str
    n_sizes: int
    n_points: int
    proxy_transform: str  # "log10" or "none"
    per_size: tuple[dict, ...]  # size, n_points, rmse_loss, rmse_loss_proxy
    reason: str = ""

    def to_dict(self) -> dict:
        return json_safe({"status": "skipped" if self.reason else "ok", **dataclasses.asdict(self)})

    def sentence(self, subject: str, proxy_words: str | None = None) -> str:
        proxy_words = proxy_words or self.proxy
        if self.reason:
            return f"Not testable: whether {proxy_words} predicts {subject} on held-out sizes: {self.reason}."
        level = f"{round(100 * self.level)} %"
        return (
            f"{FINDINGS[self.finding].capitalize()} ({proxy_words}, {subject}): RMSE {self.rmse_loss:.3g} "
            f"from loss alone, {self.rmse_loss_proxy:.3g} with {proxy_words}; improvement "
            f"{self.improvement:+.3g}, {level} CI {self.improvement_ci[0]:+.3g}…{self.improvement_ci[1]:+.3g} "
            f"over {self.n_sizes} held-out sizes ({self.n_points} checkpoints)"
        )


def _ols_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    """OLS with intercept on columns standardised by the training rows (trace and λmax span decades)."""
    centre, spread = train.mean(axis=0), train.std(axis=0)
    spread[spread == 0] = 1.0
    design = np.column_stack([np.ones(len(train)), (train - centre) / spread])
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    return np.column_stack([np.ones(len(test)), (test - centre) / spread]) @ coefficients


def leave_one_size_out(
    table: pd.DataFrame,
    metric_col: str,
    proxy_col: str,
    size_col: str = "n_params_non_embedding",
    loss_col: str = "pretrain_val_loss",
    log_positive: bool = True,
    level: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> LeaveOneSizeOut:
    """Predict each size's metric from the other sizes, from loss alone and from loss + proxy (docstring (b)).

    Rows: one per checkpoint (the metric averaged over split seeds). log_positive: a proxy that is positive
    everywhere enters as log10 (Hessian λmax and trace grow by orders of magnitude across sizes).
    """
    missing = [c for c in (metric_col, proxy_col, size_col, loss_col) if c not in table.columns]
    if missing:
        raise ValueError(f"leave_one_size_out: table has no column(s) {missing}; it has {list(table.columns)}")
    values = table[[size_col, loss_col, proxy_col, metric_col]].apply(pd.to_numeric, errors="coerce")
    values = values[np.isfinite(values.to_numpy(float)).all(axis=1)]
    sizes, loss, proxy, metric = (values[c].to_numpy(float) for c in (size_col, loss_col, proxy_col, metric_col))
    transform = "log10" if log_positive and proxy.size and np.all(proxy > 0) else "none"
    proxy = np.log10(proxy) if transform == "log10" else proxy
    distinct = np.unique(sizes)
    empty: dict[str, Any] = {
        "metric": metric_col,
        "proxy": proxy_col,
        "rmse_loss": math.nan,
        "rmse_loss_proxy": math.nan,
        "improvement": math.nan,
        "improvement_ci": (math.nan, math.nan),
        "level": level,
        "finding": "no clear difference",
        "n_sizes": int(distinct.size),
        "n_points": int(sizes.size),
        "proxy_transform": transform,
        "per_size": (),
    }
    if distinct.size < MIN_SIZES:
        return LeaveOneSizeOut(
            **empty,
            reason=f"{distinct.size} size(s) with finite {metric_col}, {loss_col} and "
            f"{proxy_col}; leaving one out needs at least {MIN_SIZES}",
        )
    if proxy_col == loss_col:
        return LeaveOneSizeOut(**empty, reason="the proxy is the loss column itself")
    squared: dict[str, list[np.ndarray]] = {"loss": [], "loss_proxy": []}  # per held-out size: squared errors
    per_size = []
    for size in distinct:
        held = sizes == size
        if (~held).sum() < 4:  # three coefficients and one residual
            return LeaveOneSizeOut(
                **empty,
                reason=f"without size {size:g} only {(~held).sum()} checkpoints are left; "
                "loss + proxy needs at least 4",
            )
        train_loss, train_both = loss[~held, None], np.column_stack([loss[~held], proxy[~held]])
        errors_loss = _ols_predict(train_loss, metric[~held], loss[held, None]) - metric[held]
        errors_both = _ols_predict(train_both, metric[~held], np.column_stack([loss[held], proxy[held]])) - metric[held]
        squared["loss"].append(errors_loss**2)
        squared["loss_proxy"].append(errors_both**2)
        per_size.append(
            {
                "size": float(size),
                "n_points": int(held.sum()),
                "rmse_loss": float(np.sqrt(np.mean(errors_loss**2))),
                "rmse_loss_proxy": float(np.sqrt(np.mean(errors_both**2))),
            }
        )
    rmse = {name: float(np.sqrt(np.mean(np.concatenate(parts)))) for name, parts in squared.items()}
    improvement = rmse["loss"] - rmse["loss_proxy"]
    ci = _improvement_interval(squared, level, n_bootstrap, seed)
    finding = "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no clear difference"
    return LeaveOneSizeOut(
        **{
            **empty,
            "rmse_loss": rmse["loss"],
            "rmse_loss_proxy": rmse["loss_proxy"],
            "improvement": improvement,
            "improvement_ci": ci,
            "finding": finding,
            "per_size": tuple(per_size),
        }
    )


def _improvement_interval(
    squared: dict[str, list[np.ndarray]], level: float, n_bootstrap: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of RMSE(loss) − RMSE(loss + proxy) over resampled held-out sizes (the unit)."""
    sums = {name: np.array([part.sum() for part in parts]) for name, parts in squared.items()}
    counts = np.array([part.size for part in squared["loss"]])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, counts.size, size=(n_bootstrap, counts.size))
    n = counts[draws].sum(axis=1)
    difference = np.sqrt(sums["loss"][draws].sum(axis=1) / n) - np.sqrt(sums["loss_proxy"][draws].sum(axis=1) / n)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(difference, [tail, 100 - tail])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# (c) Selection regret


REGRET_COLUMNS = [
    "group",
    "selector",
    "column",
    "direction",
    "picked",
    "picked_test",
    "test_best",
    "regret",
    "n_candidates",
]


def selection_regret(
    table: pd.DataFrame,
    test_col: str = "value",
    val_col: str = "val_value",
    selectors: Mapping[str, str] | None = None,
    higher_is_better: bool = True,
    group_cols: Sequence[str] = (),
    id_cols: Sequence[str] = ("trial_id", "tokens"),
) -> pd.DataFrame:
    """Regret of picking one checkpoint per group by each selector, against the test-best (docstring (c)).

    selectors: {column: "min" or "max"}; default {"pretrain_val_loss": "min"}. The validation metric
    (val_col, in the metric's own direction) is always added as the selector "validation". Rows: one per
    checkpoint (metrics averaged over split seeds). regret = how much worse the pick's test metric is than the
    best test metric in the group (≥ 0, metric units); ties pick the first row.
    """
    selectors = dict(selectors if selectors is not None else {"pretrain_val_loss": "min"})
    bad = {column: way for column, way in selectors.items() if way not in ("min", "max")}
    if bad:
        raise ValueError(f"selection_regret: selector directions must be 'min' or 'max', got {bad}")
    wanted = [test_col, val_col, *selectors, *group_cols]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ValueError(f"selection_regret: table has no column(s) {missing}; it has {list(table.columns)}")
    best_way = "max" if higher_is_better else "min"
    choices = {"validation": (val_col, best_way), **{column: (column, way) for column, way in selectors.items()}}
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    groups = table.groupby(list(group_cols), sort=True, dropna=False) if group_cols else [((), table)]
    for key, frame in groups:
        key = key if isinstance(key, tuple) else (key,)
        group = dict(zip(group_cols, key, strict=True))
        test = pd.to_numeric(frame[test_col], errors="coerce")
        frame = frame[np.isfinite(test.to_numpy(float))]
        test = test[frame.index]
        if frame.empty:
            continue
        best = float(test.max() if higher_is_better else test.min())
        for name, (column, way) in choices.items():
            score = pd.to_numeric(frame[column], errors="coerce")
            usable = score[np.isfinite(score.to_numpy(float))]
            row = {
                "group": group,
                "selector": name,
                "column": column,
                "direction": way,
                "test_best": best,
                "n_candidates": int(usable.size),
            }
            if usable.empty:
                rows.append({**row, "picked": None, "picked_test": math.nan, "regret": math.nan})
                continue
            index = usable.idxmax() if way == "max" else usable.idxmin()
            picked_test = float(test[index])
            picked = {c: json_safe(frame.at[index, c]) for c in id_cols if c in frame.columns}
            rows.append({**row, "picked": picked, "picked_test": picked_test, "regret": sign * (best - picked_test)})
    return pd.DataFrame(rows, columns=REGRET_COLUMNS)
