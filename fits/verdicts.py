"""Four verdicts on a downstream trend: improving, degrading, plateau, inconclusive; and one correction for many.

A slope per decade of scale (from fits.slopes, run-level) is read against 0 and against an equivalence
margin ±m (metric units per decade), all from one t interval at `level` (default 95 %):

- `plateau`: the whole interval lies inside ±m: two one-sided tests (TOST, Lakens 2017, "Equivalence
  tests", Soc. Psychol. Personal. Sci. 8:355) at α = (1 − level)/2, whose 1 − 2α interval is this one.
- `improving` / `degrading`: the interval excludes 0 (and is not inside the margin), read in the metric's
  own sense (higher_is_better, and whether x grows with scale: pretraining loss falls as scale grows).
- `inconclusive`: anything else. Absence of evidence is not a plateau: the verdict carries the smallest
  slope the grid could detect (80 % power, one-sided α) and how many times more runs would settle it.

Each definite verdict is a test at α per side, so a wrong definite verdict happens at most 1 − level of the
time. A family of trends is corrected with Holm or Benjamini–Hochberg (`correct`): a verdict stays definite
only if its adjusted p passes.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from clmscale.engine.files import json_safe
from clmscale.fits.downstream import format_scale, format_with_uncertainty
from clmscale.fits.slopes import METHODS, SlopeEstimate, compute_frontier_mask, fit_slope, pool_inverse_variance

VERDICTS = ("improving", "degrading", "plateau", "inconclusive")
POWER = 0.8  # for the minimal detectable slope

# --------------------------------------------------------------------------------------------
# Equivalence margins, metric units per decade of scale
#
# ROC-AUC and PRC-AUC: 0.01 per decade. Published MoleculeNet comparisons treat ~0.01 ROC-AUC as the
#   smallest difference worth a sentence (seed-to-seed sd on scaffold splits is 0.01–0.03), and a tenfold
#   larger model that buys less than that is, for a user, not worth its cost.
# RMSE and MAE: 0.02 × the task's label sd per decade. Predicting the mean scores RMSE ≈ label sd, so this
#   is 2 % of the no-skill error per decade, about what 0.01 is on ROC-AUC's useful range of 0.5 (0.5–1);
#   scaling by the label sd makes one margin serve ESOL (log mol/L) and FreeSolv (kcal/mol) alike.
PLATEAU_MARGINS = types.MappingProxyType(
    {
        "roc_auc": (0.01, "absolute"),
        "prc_auc": (0.01, "absolute"),
        "rmse": (0.02, "label_sd"),
        "mae": (0.02, "label_sd"),
    }
)
METRIC_WORDS = types.MappingProxyType({"roc_auc": "ROC-AUC", "prc_auc": "PRC-AUC", "rmse": "RMSE", "mae": "MAE"})


@dataclasses.dataclass(frozen=True)
class PlateauMargin:
    per_decade: float  # metric units per decade of x
    source: str  # where it came from, for the report


def plateau_margin(metric: str, label_sd: float | None = None, margin: float | None = None) -> PlateauMargin:
    """The equivalence margin for `metric`: `margin` if given (the user's overrides), else PLATEAU_MARGINS.

    RMSE and MAE need the task's label standard deviation (their margin is a fraction of it).
    """
    if margin is not None:
        if not (math.isfinite(margin) and margin > 0):
            raise ValueError(
                f"plateau_margin: margin must be a positive number (metric units per decade), got {margin!r}"
            )
        return PlateauMargin(float(margin), "given")
    if metric not in PLATEAU_MARGINS:
        raise ValueError(
            f"plateau_margin: no default margin for metric {metric!r} (defaults exist for "
            f"{sorted(PLATEAU_MARGINS)}); give one in metric units per decade (fits.plateau_margin)"
        )
    value, basis = PLATEAU_MARGINS[metric]
    words = METRIC_WORDS.get(metric, metric)
    if basis == "absolute":
        return PlateauMargin(value, f"default for {words}: {value:g} per decade")
    if label_sd is None or not (math.isfinite(label_sd) and label_sd > 0):
        raise ValueError(
            f"plateau_margin: the {words} margin is {value:g} × the task's label sd, and label_sd="
            f"{label_sd!r} is not a positive number"
        )
    return PlateauMargin(
        value * float(label_sd), f"default for {words}: {value:g} × label sd ({label_sd:.3g}) per decade"
    )


# --------------------------------------------------------------------------------------------
# One verdict

# the fields of a verdict whose slope could not be tested: no numbers, and "inconclusive"
UNTESTED: Mapping[str, Any] = types.MappingProxyType({
    "verdict": "inconclusive", "raw_verdict": "inconclusive", "slope": math.nan, "ci": (math.nan, math.nan),
    "se": math.nan, "p_zero": math.nan, "p_improving": math.nan, "p_degrading": math.nan, "p_tost": math.nan,
    "p_verdict": math.nan, "min_detectable_slope": math.nan,
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrendVerdict:
    """A slope per decade of one scale axis, read as one of VERDICTS (see the module docstring).

    p_improving / p_degrading: one-sided p of "the slope is not in that direction" (in the metric's sense);
    p_tost: the larger of the two one-sided p against ±margin; p_verdict: the p the verdict rests on, on the
    scale of 1 − level (two-sided p against 0 for improving/degrading, 2·p_tost for plateau, the smaller of
    the two for inconclusive), so that `correct` can adjust one p per trend.
    """

    verdict: str
    slope: float
    ci: tuple[float, float]
    se: float
    df: float
    level: float
    margin: float
    margin_source: str
    p_zero: float
    p_improving: float
    p_degrading: float
    p_tost: float
    p_verdict: float
    min_detectable_slope: float  # 80 % power at one-sided α = (1 − level)/2
    n_points: int
    n_runs: int
    method: str  # a key of fits.slopes.METHODS
    method_description: str
    axis: str  # the x column
    held_fixed: str  # words: what was held fixed, e.g. "tokens held fixed (2 values)"
    higher_is_better: bool
    x_grows_with_scale: bool
    x_range: tuple[float, float]
    settle: str = ""  # for inconclusive: what would settle it
    reason: str = ""  # non-empty: not testable
    raw_verdict: str = ""  # the verdict before a multiplicity correction
    p_adjusted: float = math.nan
    correction: str = ""

    @property
    def testable(self) -> bool:
        return not self.reason

    def to_dict(self) -> dict:
        """JSON-ready fields plus status ('ok' or 'skipped') and method words."""
        return json_safe({"status": "ok" if self.testable else "skipped", **dataclasses.asdict(self)})

    def sentence(self, subject: str, x_words: str | None = None) -> str:
        """Verdict first, numbers after; e.g. 'Inconclusive: BBBP ROC-AUC against parameters (tokens held
        fixed): slope +0.004 ± 0.02 per decade, 95 % CI −0.01…0.02, margin ±0.01; …'."""
        x_words = x_words or self.axis
        fixed = f", {self.held_fixed}" if self.held_fixed else ""
        if not self.testable:
            return f"Not testable: {subject} against {x_words}{fixed}: {self.reason}."
        half = (self.ci[1] - self.ci[0]) / 2
        level = f"{round(100 * self.level)} %"
        lo, hi = (_like(end, half) for end in self.ci)
        numbers = (
            f"slope {format_with_uncertainty(self.slope, half)} per decade of {x_words} "
            f"({format_scale(self.x_range[0])}–{format_scale(self.x_range[1])}), {level} CI {lo}…{hi}, "
            f"margin ±{self.margin:.3g}"
        )
        behind = f"{self.n_runs} runs, {self.n_points} points, {self.method_description}"
        corrected = f"; {self.correction}, adjusted p = {self.p_adjusted:.2g}" if self.correction else ""
        head = {
            "improving": "Improving",
            "degrading": "Degrading",
            "plateau": f"Plateau (flat within ±{self.margin:.3g} per decade)",
            "inconclusive": "Inconclusive",
        }[self.verdict]
        tail = ""
        if self.verdict == "inconclusive":
            tail = f"; the grid detects slopes of ±{self.min_detectable_slope:.2g} per decade (80 % power)"
            tail += f"; {self.settle}" if self.settle else ""
        return f"{head}: {subject} against {x_words}{fixed}: {numbers} ({behind}{corrected}){tail}."


def _like(value: float, half_width: float) -> str:
    """value at the precision format_with_uncertainty gives a slope with this half-width."""
    return format_with_uncertainty(value, half_width).split(" ± ")[0]


def judge(
    estimate: SlopeEstimate,
    margin: PlateauMargin | float,
    higher_is_better: bool = True,
    x_grows_with_scale: bool = True,
    level: float = 0.95,
    axis: str = "",
    held_fixed: str = "",
    x_range: tuple[float, float] = (math.nan, math.nan),
) -> TrendVerdict:
    """Read a run-level slope as improving / degrading / plateau / inconclusive (module docstring)."""
    if not 0.5 < level < 1:
        raise ValueError(f"judge: level must be in (0.5, 1), got {level!r}")
    margin = margin if isinstance(margin, PlateauMargin) else PlateauMargin(float(margin), "given")
    common: dict[str, Any] = {
        "level": level,
        "margin": margin.per_decade,
        "margin_source": margin.source,
        "n_points": estimate.n_points,
        "n_runs": estimate.n_runs,
        "method": estimate.method,
        "axis": axis,
        "held_fixed": held_fixed,
        "higher_is_better": higher_is_better,
        "x_grows_with_scale": x_grows_with_scale,
        "x_range": x_range,
    }
    if not estimate.testable or not estimate.se > 0:
        reason = estimate.reason or f"the slope's standard error is {estimate.se!r}"
        return TrendVerdict(
            **UNTESTED, df=math.nan, method_description=METHODS[estimate.method], reason=reason, **common
        )
    alpha = (1 - level) / 2
    slope, se, df, m = estimate.slope, estimate.se, estimate.df, margin.per_decade
    sign = (1 if higher_is_better else -1) * (1 if x_grows_with_scale else -1)  # +: this slope means "better"
    t_better = sign * slope / se
    p_improving, p_degrading = float(stats.t.sf(t_better, df)), float(stats.t.cdf(t_better, df))
    p_zero = float(min(1.0, 2 * min(p_improving, p_degrading)))
    p_tost = float(max(stats.t.sf((slope + m) / se, df), stats.t.cdf((slope - m) / se, df)))
    if p_tost < alpha:
        verdict, p_verdict = "plateau", min(1.0, 2 * p_tost)
    elif min(p_improving, p_degrading) < alpha:
        verdict, p_verdict = ("improving" if p_improving < alpha else "degrading"), p_zero
    else:
        verdict, p_verdict = "inconclusive", min(p_zero, 2 * p_tost, 1.0)
    mds = float((stats.t.ppf(1 - alpha, df) + stats.t.ppf(POWER, df)) * se)
    settle = _what_would_settle(mds, m, estimate) if verdict == "inconclusive" else ""
    return TrendVerdict(
        verdict=verdict,
        slope=slope,
        ci=estimate.ci(level),
        se=se,
        df=df,
        p_zero=p_zero,
        p_improving=p_improving,
        p_degrading=p_degrading,
        p_tost=p_tost,
        p_verdict=p_verdict,
        min_detectable_slope=mds,
        method_description=estimate.description,
        settle=settle,
        raw_verdict=verdict,
        **common,
    )


def _what_would_settle(mds: float, margin: float, estimate: SlopeEstimate) -> str:
    """The standard error falls as 1/√(runs) and as 1/(decades spanned): how much more would make MDS ≤ margin."""
    factor = (mds / margin) ** 2
    if factor <= 1:
        return (
            "the grid could detect a slope of the margin's size, yet the interval straddles a margin end: "
            "a few more runs would settle it"
        )
    runs = math.ceil(factor * estimate.n_runs)
    wider = math.sqrt(factor) * estimate.x_decades
    return (
        f"to detect ±{margin:.3g} per decade it would take ~{factor:.0f}× the runs (~{runs} instead of "
        f"{estimate.n_runs}, e.g. more seeds) at these scales, or scales spanning ~{wider:.1f} decades instead "
        f"of {estimate.x_decades:.1f}"
    )


# --------------------------------------------------------------------------------------------
# Many tests, one correction


CORRECTIONS = types.MappingProxyType({"holm": "Holm", "fdr_bh": "Benjamini–Hochberg"})


def adjust_pvalues(p_values, method: str = "holm") -> np.ndarray:
    """statsmodels' multipletests adjusted p over the finite entries; NaN entries pass through as NaN.

    method: "holm" (family-wise error, Holm 1979) or "fdr_bh" (false discovery rate, Benjamini–Hochberg 1995).
    """
    if method not in CORRECTIONS:
        raise ValueError(f"adjust_pvalues: method must be one of {sorted(CORRECTIONS)}, got {method!r}")
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"adjust_pvalues: p_values must be 1-D, got shape {p.shape}")
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"adjust_pvalues: p-values must lie in [0, 1], got {p[finite & ((p < 0) | (p > 1))]}")
    adjusted = np.full(p.shape, np.nan)
    if finite.any():
        adjusted[finite] = multipletests(p[finite], method=method)[1]
    return adjusted


def correct(verdicts: Sequence[TrendVerdict], method: str = "holm") -> list[TrendVerdict]:
    """Adjust p_verdict across the family; a definite verdict whose adjusted p fails becomes inconclusive.

    Not-testable trends carry NaN and do not count in the family. The threshold is each verdict's 1 − level.
    """
    adjusted = adjust_pvalues([v.p_verdict for v in verdicts], method)
    m = int(np.isfinite(adjusted).sum())
    words = f"{CORRECTIONS[method]} over {m} trend tests"
    out = []
    for verdict, p_adj in zip(verdicts, adjusted, strict=True):
        if not np.isfinite(p_adj):
            out.append(verdict)
            continue
        final = verdict.raw_verdict
        settle = verdict.settle
        if final != "inconclusive" and not p_adj < 1 - verdict.level:
            final = "inconclusive"
            settle = (
                f"{verdict.raw_verdict} before the correction (p = {verdict.p_verdict:.2g}); not definite after {words}"
            )
        out.append(
            dataclasses.replace(verdict, verdict=final, p_adjusted=float(p_adj), correction=words, settle=settle)
        )
    return out


# --------------------------------------------------------------------------------------------
# One axis at a time: N at fixed D, D at fixed N, C along the compute frontier


@dataclasses.dataclass(frozen=True)
class AxisTrend:
    """The verdict along one axis, combined over the held-fixed strata, and one per stratum."""

    axis: str
    held_fixed: str
    combined: TrendVerdict
    per_stratum: tuple[tuple[float, TrendVerdict], ...]  # (held-fixed value, verdict)
    combine: str  # "stratified" (one slope, an intercept per stratum, runs as clusters) or "inverse_variance"

    def to_dict(self) -> dict:
        return json_safe(
            {
                "axis": self.axis,
                "held_fixed": self.held_fixed,
                "combine": self.combine,
                "combined": self.combined.to_dict(),
                "per_stratum": [{"value": value, **v.to_dict()} for value, v in self.per_stratum],
            }
        )


def _strata(values: np.ndarray, rtol: float) -> np.ndarray:
    """Stratum labels: sorted values within rtol of a stratum's first value share it (NaN: its own, -1)."""
    labels = np.full(values.size, np.nan)
    order = np.argsort(values, kind="stable")
    start = math.nan
    for index in order:
        value = values[index]
        if not np.isfinite(value):
            continue
        if not (np.isfinite(start) and abs(value - start) <= rtol * abs(start)):
            start = value
        labels[index] = start
    return labels


def axis_trend(
    table: pd.DataFrame,
    x_col: str,
    y_col: str = "value",
    stratum_col: str | None = None,
    higher_is_better: bool = True,
    margin: PlateauMargin | float = 0.01,
    x_grows_with_scale: bool = True,
    run_col: str | None = "trial_id",
    block_col: str | None = "split_seed",
    method: str = "cluster_jackknife",
    combine: str = "stratified",
    level: float = 0.95,
    stratum_rtol: float = 0.02,
    held_fixed_words: str | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> AxisTrend:
    """The slope of y_col per decade of x_col at fixed stratum_col, per stratum and combined.

    combine="stratified": one slope with an intercept per stratum, clustered by run, so a run seen in several
    strata counts once (checkpoints of one WSD run at several budgets). combine="inverse_variance": the
    per-stratum slopes pooled; it refuses (not testable) when strata share a run.
    Strata within stratum_rtol of each other are one (checkpoints land a few whole batches past a budget).
    """
    if combine not in ("stratified", "inverse_variance"):
        raise ValueError(f"axis_trend: combine must be 'stratified' or 'inverse_variance', got {combine!r}")
    frame = table.copy()
    for column in (x_col, y_col, run_col, block_col, stratum_col):
        if column is not None and column not in frame.columns:
            raise ValueError(f"axis_trend: table has no column {column!r}; it has {list(frame.columns)}")
    n_strata_words = ""
    if stratum_col is not None:
        frame["_stratum"] = _strata(pd.to_numeric(frame[stratum_col], errors="coerce").to_numpy(float), stratum_rtol)
        frame = frame[np.isfinite(frame["_stratum"].to_numpy(float))]
        n_strata_words = f"{frame['_stratum'].nunique()} values"
    held = (
        held_fixed_words
        if held_fixed_words is not None
        else (f"{stratum_col} held fixed ({n_strata_words})" if stratum_col else "")
    )
    x_values = pd.to_numeric(frame[x_col], errors="coerce").to_numpy(float)
    positive = x_values[np.isfinite(x_values) & (x_values > 0)]
    x_range = (float(positive.min()), float(positive.max())) if positive.size else (math.nan, math.nan)
    common: dict[str, Any] = {
        "higher_is_better": higher_is_better,
        "x_grows_with_scale": x_grows_with_scale,
        "level": level,
        "axis": x_col,
    }
    fit: dict[str, Any] = {
        "x_col": x_col,
        "y_col": y_col,
        "run_col": run_col,
        "block_col": block_col,
        "method": method,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
    }

    per_stratum, estimates = [], []
    if stratum_col is not None:
        for value, rows in frame.groupby("_stratum", sort=True):
            estimate = fit_slope(rows, **fit)
            estimates.append(estimate)
            xs = pd.to_numeric(rows[x_col], errors="coerce").to_numpy(float)
            xs = xs[np.isfinite(xs) & (xs > 0)]
            rng = (float(xs.min()), float(xs.max())) if xs.size else (math.nan, math.nan)
            per_stratum.append(
                (
                    float(value),
                    judge(
                        estimate,
                        margin,
                        held_fixed=f"{stratum_col} held at {format_scale(float(value))}",
                        x_range=rng,
                        **common,
                    ),
                )
            )
    if combine == "inverse_variance" and stratum_col is not None:
        combined = pool_inverse_variance(estimates)
    else:
        combined = fit_slope(frame, stratum_col="_stratum" if stratum_col is not None else None, **fit)
    verdict = judge(combined, margin, held_fixed=held, x_range=x_range, **common)
    return AxisTrend(
        axis=x_col,
        held_fixed=held,
        combined=verdict,
        per_stratum=tuple(per_stratum),
        combine=combine if stratum_col is not None else "none",
    )


def scaling_verdicts(
    table: pd.DataFrame,
    y_col: str = "value",
    higher_is_better: bool = True,
    margin: PlateauMargin | float = 0.01,
    n_col: str = "n_params_non_embedding",
    d_col: str = "tokens",
    c_col: str = "flops",
    loss_col: str = "pretrain_val_loss",
    run_col: str = "trial_id",
    block_col: str | None = "split_seed",
    method: str = "cluster_jackknife",
    combine: str = "stratified",
    level: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, AxisTrend]:
    """N at fixed D, D at fixed N, and C along the compute frontier (checkpoints no cheaper one beats on
    pretraining loss), for one task and mode; keys "n", "d", "c". Rows: one per checkpoint × split seed."""
    shared: dict[str, Any] = {
        "y_col": y_col,
        "higher_is_better": higher_is_better,
        "margin": margin,
        "run_col": run_col,
        "block_col": block_col,
        "method": method,
        "level": level,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
    }
    out = {
        "n": axis_trend(table, n_col, stratum_col=d_col, combine=combine, **shared),
        "d": axis_trend(table, d_col, stratum_col=n_col, combine=combine, **shared),
    }
    if c_col in table.columns and loss_col in table.columns:
        frontier = table[compute_frontier_mask(table, c_col, loss_col, (run_col, d_col))]
        out["c"] = axis_trend(
            frontier,
            c_col,
            held_fixed_words="along the compute frontier (the lowest pretraining loss at each C)",
            **shared,
        )
    return out


# --------------------------------------------------------------------------------------------
# The same verdict on any table


def trend_on_table(
    table: pd.DataFrame,
    x_col: str,
    y_col: str,
    group_col: str | None = None,
    higher_is_better: bool = True,
    margin: float | None = None,
    x_grows_with_scale: bool = True,
    block_col: str | None = None,
    level: float = 0.95,
    method: str | None = None,
    metric: str | None = None,
    label_sd: float | None = None,
) -> dict:
    """The verdict of y_col per decade of x_col (log10) on a user's table, as JSON-ready values.

    group_col: the independent unit (a run); rows of one group are resampled together (cluster jackknife).
    Without it every row is independent (OLS). margin: metric units per decade; if None, y_col must be a
    metric with a default (PLATEAU_MARGINS; RMSE/MAE also need label_sd); `metric` names it when y_col does not.
    """
    chosen = plateau_margin(metric or y_col, label_sd=label_sd, margin=margin)
    method = method or ("cluster_jackknife" if group_col is not None else "iid")
    trend = axis_trend(
        table,
        x_col,
        y_col=y_col,
        higher_is_better=higher_is_better,
        margin=chosen,
        x_grows_with_scale=x_grows_with_scale,
        run_col=group_col,
        block_col=block_col,
        method=method,
        level=level,
    )
    verdict = trend.combined
    return json_safe(
        {
            "status": "ok" if verdict.testable else "skipped",
            "verdict": verdict.verdict,
            "x_col": x_col,
            "y_col": y_col,
            "group_col": group_col,
            "slope_per_decade": verdict.slope,
            "ci": list(verdict.ci),
            "level": level,
            "se": verdict.se,
            "df": verdict.df,
            "margin": verdict.margin,
            "margin_source": verdict.margin_source,
            "min_detectable_slope": verdict.min_detectable_slope,
            "p_zero": verdict.p_zero,
            "p_improving": verdict.p_improving,
            "p_degrading": verdict.p_degrading,
            "p_tost": verdict.p_tost,
            "n_points": verdict.n_points,
            "n_groups": verdict.n_runs,
            "method": verdict.method,
            "method_description": verdict.method_description,
            "settle": verdict.settle,
            "reason": verdict.reason,
            "sentence": verdict.sentence(y_col, x_col),
        }
    )


def verdict_counts(verdicts: Mapping[str, TrendVerdict] | Sequence[TrendVerdict]) -> dict[str, int]:
    """How many of each verdict, plus "not testable": the report's one-line summary."""
    values = list(verdicts.values()) if isinstance(verdicts, Mapping) else list(verdicts)
    counts = {name: sum(v.testable and v.verdict == name for v in values) for name in VERDICTS}
    counts["not testable"] = sum(not v.testable for v in values)
    return counts
