"""Downstream metrics: every task is scored by all the metrics of its type, NaN labels masked.

    classification  roc_auc  mean ROC-AUC over label columns (Mann-Whitney; macro one-vs-rest for multi-class)
                    prc_auc  mean average precision over the same columns (sklearn's average_precision_score),
                             the PRC-AUC MoleculeNet reports for sparse tasks such as MUV
    regression      rmse     root-mean-square error per column, averaged over columns
                    mae      mean absolute error per column, averaged over columns

A column is scored only where it has labels (and, for classification, both classes), so one
sparse Tox21 or MUV assay missing from a split does not make the whole task NaN.
Plain numpy / scipy / sklearn: engine/tasks.py imports `METRICS` without pulling in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.stats

METRICS: dict[str, tuple[str, ...]] = {"classification": ("roc_auc", "prc_auc"), "regression": ("rmse", "mae")}
HIGHER_IS_BETTER: dict[str, bool] = {"roc_auc": True, "prc_auc": True, "rmse": False, "mae": False}


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of one binary column by the Mann-Whitney U statistic; ties count one half.

    AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with average ranks for
    tied scores. NaN when only one class is present.
    """
    y_true = np.asarray(y_true).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = y_true == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def prc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve of one binary column, as average precision; NaN with one class.

    Average precision (sklearn) is the step-wise sum, not the trapezoid, which over-states the area
    for imbalanced data (Davis & Goadrich 2006). Scores may be logits: only their order matters.
    """
    from sklearn.metrics import average_precision_score  # slow import, kept off module load

    y_true = np.asarray(y_true).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = y_true == 1
    if positive.all() or not positive.any() or not np.isfinite(scores).all():
        return math.nan
    return float(average_precision_score(positive.astype(np.int64), scores))


def _mean_over_columns(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    predictions: np.ndarray,
    n_classes: int | None,
) -> float:
    """Mean of a binary metric over label columns, NaN labels skipped; multi-class: macro one-vs-rest."""
    if n_classes is not None:
        y = labels[:, 0]
        keep = ~np.isnan(y)
        columns = [((y[keep] == c).astype(np.int64), predictions[keep, c]) for c in range(n_classes)]
    else:
        columns = [(y[~np.isnan(y)], s[~np.isnan(y)]) for y, s in zip(labels.T, predictions.T, strict=True)]
    values = [metric(y, s) for y, s in columns]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def mean_roc_auc(labels: np.ndarray, predictions: np.ndarray, n_classes: int | None = None) -> float:
    """Mean ROC-AUC over label columns with both classes, NaN labels skipped; multi-class: macro one-vs-rest.

    labels [n, k] (multi-class: [n, 1] of class indices), predictions [n, k] scores
    (multi-class: [n, C] probabilities).
    """
    return _mean_over_columns(roc_auc, labels, predictions, n_classes)


def mean_prc_auc(labels: np.ndarray, predictions: np.ndarray, n_classes: int | None = None) -> float:
    """`mean_roc_auc`'s masking and averaging, with average precision per column."""
    return _mean_over_columns(prc_auc, labels, predictions, n_classes)


def _per_column_error(labels: np.ndarray, predictions: np.ndarray, reduce: Callable[[np.ndarray], float]) -> float:
    errors = []
    for y, p in zip(labels.T, predictions.T, strict=True):
        keep = ~np.isnan(y)
        if keep.any():
            errors.append(reduce(p[keep].astype(np.float64) - y[keep]))
    return float(np.mean(errors)) if errors else math.nan


def rmse(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Root-mean-square error per label column over its non-NaN labels, averaged over columns."""
    return _per_column_error(labels, predictions, lambda e: float(np.sqrt(np.mean(e**2))))


def mae(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean absolute error per label column over its non-NaN labels, averaged over columns."""
    return _per_column_error(labels, predictions, lambda e: float(np.mean(np.abs(e))))


def score(metric: str, labels: np.ndarray, predictions: np.ndarray, n_classes: int | None = None) -> float:
    """One named metric; predictions in label units (scores or logits, probabilities, or values)."""
    if metric == "roc_auc":
        return mean_roc_auc(labels, predictions, n_classes)
    if metric == "prc_auc":
        return mean_prc_auc(labels, predictions, n_classes)
    if metric == "rmse":
        return rmse(labels, predictions)
    if metric == "mae":
        return mae(labels, predictions)
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(HIGHER_IS_BETTER)}")


def scores(
    task_type: str, labels: np.ndarray, predictions: np.ndarray, n_classes: int | None = None
) -> dict[str, float]:
    """Every metric of the task type, by name."""
    return {m: score(m, labels, predictions, n_classes) for m in METRICS[task_type]}


def better(metric: str, new: float, best: float) -> bool:
    """Is `new` an improvement on `best`? NaN is never better; anything beats a NaN best."""
    if math.isnan(new):
        return False
    if math.isnan(best):
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best
