"""Rank correlations of a downstream metric with candidate proxies, and what is left beyond pretraining loss.

Input is one row per checkpoint: the metric (e.g. BBBP ROC-AUC after fine-tuning) next to candidate
proxies (n_params, n_tokens, flops, loss, Hessian λmax, trace, sharpness, …). For each proxy we report
Spearman and Kendall rank correlations with bootstrap intervals, and the partial Spearman correlation
given pretraining loss: rank-transform, regress the loss ranks out of both, correlate what is left.
A proxy that is only a re-expression of loss leaves nothing, and the table says so instead of guessing.
These describe: checkpoints of one run are not independent units, so whether a proxy predicts is judged by
fits.proxies (held-out sizes, selection regret), not by these intervals.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

# Words for the column names of docs/CONTRACTS.md's result tables; anything else is shown as its column name.
LABELS = types.MappingProxyType(
    {
        "n_params": "parameter count N",
        "n_params_non_embedding": "non-embedding parameter count",
        "tokens": "token count D",
        "flops": "compute C",
        "pretrain_val_loss": "pretraining loss",
        "val_loss": "pretraining loss",
        "lambda_max": "Hessian λmax",
        "trace": "Hessian trace",
        "ft_lambda_max": "fine-tuning-loss Hessian λmax",
        "ft_trace": "fine-tuning-loss Hessian trace",
        "eps_sharpness": "ε-sharpness",
        "adaptive_sharpness": "adaptive sharpness",
        "roc_auc": "ROC-AUC",
        "rmse": "RMSE",
    }
)

# ci_lo/ci_hi: bootstrap percentile interval of spearman; p: Spearman's p value; partial_*: the partial Spearman
# given loss, its interval and t-test p (n − 3 df); n / n_partial: rows used; reason: why a value is NaN.
COLUMNS = [
    "task",
    "metric",
    "proxy",
    "n",
    "spearman",
    "ci_lo",
    "ci_hi",
    "kendall",
    "p",
    "partial_given_loss",
    "partial_ci_lo",
    "partial_ci_hi",
    "partial_p",
    "n_partial",
    "ci_level",
    "reason",
]

# Below this share of its rank variance left after regressing out loss ranks, a proxy counts as a function
# of loss (exact monotone transforms leave ~1e-30 from rounding, not 0).
_NOTHING_LEFT = 1e-10


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b; NaN where either row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    ss_a, ss_b = (a * a).sum(axis=1), (b * b).sum(axis=1)
    denominator = np.sqrt(ss_a * ss_b)
    return np.divide((a * b).sum(axis=1), denominator, out=np.full(a.shape[0], np.nan), where=denominator > 0)


def _residual_ranks(ranks: np.ndarray, loss_ranks: np.ndarray) -> np.ndarray:
    """Row-wise residuals of ranks after least squares on loss ranks; NaN rows where nothing (or no loss) is left."""
    ranks = ranks - ranks.mean(axis=1, keepdims=True)
    loss_ranks = loss_ranks - loss_ranks.mean(axis=1, keepdims=True)
    ss_loss = (loss_ranks * loss_ranks).sum(axis=1, keepdims=True)
    slope = np.divide(
        (ranks * loss_ranks).sum(axis=1, keepdims=True), ss_loss, out=np.full(ss_loss.shape, np.nan), where=ss_loss > 0
    )
    residual = ranks - slope * loss_ranks
    ss_total = (ranks * ranks).sum(axis=1)
    left = (residual * residual).sum(axis=1) > _NOTHING_LEFT * ss_total
    residual[~left] = np.nan
    return residual


def _rank_correlations(metric: np.ndarray, proxy: np.ndarray, loss: np.ndarray | None, resamples: np.ndarray):
    """Spearman and partial Spearman given loss for each row of resamples (point indices); (B,), (B,)."""
    metric_ranks = stats.rankdata(metric[resamples], axis=1)  # (B, n)
    proxy_ranks = stats.rankdata(proxy[resamples], axis=1)
    spearman = _rowwise_pearson(metric_ranks, proxy_ranks)
    if loss is None:
        return spearman, np.full(len(resamples), np.nan)
    loss_ranks = stats.rankdata(loss[resamples], axis=1)
    metric_left = _residual_ranks(metric_ranks, loss_ranks)
    proxy_left = _residual_ranks(proxy_ranks, loss_ranks)
    return spearman, _rowwise_pearson(metric_left, proxy_left)


def _percentile_ci(samples: np.ndarray, ci_level: float) -> tuple[float, float]:
    """Percentile interval of the finite samples; NaN when fewer than 20 of them are finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size < 20:
        return math.nan, math.nan
    tail = 100 * (1 - ci_level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def _one_pair(
    frame: pd.DataFrame,
    metric: str,
    proxy: str,
    loss_column: str | None,
    n_bootstrap: int,
    ci_level: float,
    rng: np.random.Generator,
) -> dict:
    """One output row: correlations of metric with proxy, plus the partial given loss, or NaN and a reason."""
    row: dict[str, Any] = {name: math.nan for name in COLUMNS}
    reasons = []
    pair = frame[[metric, proxy]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    finite = np.isfinite(pair).all(axis=1)
    metric_values, proxy_values = pair[finite, 0], pair[finite, 1]
    row["n"] = int(finite.sum())
    if row["n"] < 3:
        reasons.append(f"only {row['n']} rows with finite {metric} and {proxy}")
    for name, values in ((metric, metric_values), (proxy, proxy_values)):
        if row["n"] >= 1 and np.ptp(values) == 0:
            reasons.append(f"{name} is constant ({values[0]:g}) over the {row['n']} rows")
    if reasons:
        return {**row, "reason": "; ".join(reasons), "n_partial": 0}

    spearman = stats.spearmanr(metric_values, proxy_values)
    kendall = stats.kendalltau(metric_values, proxy_values)
    resamples = rng.integers(0, row["n"], size=(n_bootstrap, row["n"]))
    spearman_samples, _ = _rank_correlations(metric_values, proxy_values, None, resamples)
    row.update(spearman=float(spearman.statistic), p=float(spearman.pvalue), kendall=float(kendall.statistic))
    row["ci_lo"], row["ci_hi"] = _percentile_ci(spearman_samples, ci_level)

    partial, reason = _partial_given_loss(frame, metric, proxy, loss_column, n_bootstrap, ci_level, rng)
    row.update(partial)
    return {**row, "reason": reason}


def _partial_given_loss(
    frame: pd.DataFrame,
    metric: str,
    proxy: str,
    loss_column: str | None,
    n_bootstrap: int,
    ci_level: float,
    rng: np.random.Generator,
) -> tuple[dict, str]:
    """Partial Spearman of metric and proxy given loss, with interval and p; or NaNs and the reason why not."""
    empty = {
        "partial_given_loss": math.nan,
        "partial_ci_lo": math.nan,
        "partial_ci_hi": math.nan,
        "partial_p": math.nan,
        "n_partial": 0,
    }
    if loss_column is None:
        return empty, "no loss column given"
    if proxy == loss_column:
        return empty, "the proxy is the loss column itself"
    values = frame[[metric, proxy, loss_column]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    values = values[np.isfinite(values).all(axis=1)]
    n = values.shape[0]
    if n < 4:
        return empty, f"only {n} rows with finite {metric}, {proxy} and {loss_column}"
    if np.ptp(values[:, 2]) == 0:
        return empty, f"{loss_column} is constant ({values[0, 2]:g}), so there is nothing to condition on"
    metric_values, proxy_values, loss_values = values.T
    everything = np.arange(n)[None, :]
    _, (partial,) = _rank_correlations(metric_values, proxy_values, loss_values, everything)
    if not np.isfinite(partial):
        proxy_left = _residual_ranks(stats.rankdata(proxy_values)[None, :], stats.rankdata(loss_values)[None, :])
        what = proxy if np.isnan(proxy_left).all() else metric
        return {**empty, "n_partial": n}, (
            f"{what} is a monotone function of {loss_column}: nothing is left after removing {loss_column}"
        )
    resamples = rng.integers(0, n, size=(n_bootstrap, n))
    _, partial_samples = _rank_correlations(metric_values, proxy_values, loss_values, resamples)
    lo, hi = _percentile_ci(partial_samples, ci_level)
    # t test of a partial correlation with one conditioning variable: n − 3 degrees of freedom
    t = partial * math.sqrt((n - 3) / max(1 - partial**2, 1e-300))
    p = float(2 * stats.t.sf(abs(t), df=n - 3))
    return {
        "partial_given_loss": float(partial),
        "partial_ci_lo": lo,
        "partial_ci_hi": hi,
        "partial_p": p,
        "n_partial": n,
    }, ""


def proxy_correlations(
    table: pd.DataFrame,
    metric: str,
    proxies,
    task_column: str | None = "task",
    loss_column: str | None = "pretrain_val_loss",
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Rank correlations of `metric` with each proxy column, per task, with bootstrap intervals.

    One row per (task, proxy) with the columns in COLUMNS. A pair that cannot be computed (too few finite
    rows, a constant column, a proxy that is a function of loss) gets NaN and a `reason`, never an error.
    """
    proxies = [proxies] if isinstance(proxies, str) else list(proxies)
    wanted = [metric, *proxies] + ([task_column] if task_column else []) + ([loss_column] if loss_column else [])
    missing = [name for name in wanted if name not in table.columns]
    if missing:
        raise ValueError(f"proxy_correlations: table has no column(s) {missing}; it has {list(table.columns)}")
    rng = np.random.default_rng(seed)
    groups = table.groupby(task_column, sort=True, dropna=False) if task_column else [(None, table)]
    rows = []
    for task, frame in groups:
        for proxy in proxies:
            result = _one_pair(frame, metric, proxy, loss_column, n_bootstrap, ci_level, rng)
            rows.append({**result, "task": task, "metric": metric, "proxy": proxy, "ci_level": ci_level})
    return pd.DataFrame(rows, columns=COLUMNS)
