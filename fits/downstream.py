"""Downstream metrics against scale: a saturating law, a monotone-trend test, and the trend at the top.

A fine-tuned metric (ROC-AUC, RMSE, …) measured at several pretraining scales (N, D, C, or the
pretraining loss) answers one question for the report: does it still improve at the largest scales?
`trend_at_largest_scales` answers it from the confidence interval of the slope per decade of scale;
`monotone_trend` tests the whole series; `DownstreamPowerLaw` extrapolates it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import statsmodels.api as sm
from scipy import stats

from fits.powerlaw import SaturatingPowerLaw, _as_columns, _check_is_fitted, _Estimator


def _usable_rows(owner: str, x: np.ndarray, metric: np.ndarray, bad: np.ndarray, why: str):
    """x and metric without the rows flagged `bad`, warning with their indices and values."""
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = "; ".join(f"x={float(x[row])!r}, metric={float(metric[row])!r} at row {row}" for row in rows[:10])
        warnings.warn(f"{owner}: dropped {rows.size} of {x.size} rows {why}: rows {rows.tolist()} ({shown})",
                      UserWarning, stacklevel=3)
    return x[~bad], metric[~bad]


# --------------------------------------------------------------------------------------------
# A saturating law for a metric that may rise (ROC-AUC) or fall (RMSE) with scale


class DownstreamPowerLaw(_Estimator):
    """metric(x) = best_possible ∓ (E + A·x^(−γ)): the gap to the best possible value shrinks as a power law.

    The gap is best_possible − metric when higher_is_better (ROC-AUC, R²: best 1), else
    metric − best_possible (RMSE, MAE: best 0); it is fitted with SaturatingPowerLaw, so E is the gap
    that scale does not close and `asymptote_` the metric it implies.
    """

    formula = "metric = best_possible -/+ (E + A * x^(-gamma))"
    param_names = ("asymptote", "A", "gamma")

    def __init__(self, higher_is_better=True, best_possible=None, huber_delta=1e-3, n_bootstrap=1000, seed=0,
                 n_jobs=None, ci_level=0.95):
        self.higher_is_better = higher_is_better
        self.best_possible = best_possible
        self.huber_delta = huber_delta
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.n_jobs = n_jobs
        self.ci_level = ci_level

    def _best(self) -> float:
        if self.best_possible is not None:
            return float(self.best_possible)
        return 1.0 if self.higher_is_better else 0.0

    def _gap(self, metric: np.ndarray) -> np.ndarray:
        return self._best() - metric if self.higher_is_better else metric - self._best()

    def _metric(self, gap):
        return self._best() - gap if self.higher_is_better else self._best() + gap

    def fit(self, x, metric) -> DownstreamPowerLaw:
        """Fit metric(x); points at or beyond best_possible have no gap to fit and are dropped with a warning."""
        owner = "DownstreamPowerLaw.fit"
        columns = _as_columns(owner, x=x, metric=metric)
        x, metric = columns["x"], columns["metric"]
        bad = ~(np.isfinite(x) & (x > 0) & np.isfinite(metric) & (self._gap(metric) > 0))
        x, metric = _usable_rows(owner, x, metric, bad,
                                 f"with x <= 0, a non-finite value, or metric at best_possible={self._best()}")
        law = SaturatingPowerLaw(huber_delta=self.huber_delta, n_bootstrap=self.n_bootstrap, seed=self.seed,
                                 n_jobs=self.n_jobs, ci_level=self.ci_level)
        law.fit(x, self._gap(metric))
        self.law_ = law
        self.asymptote_ = float(self._metric(law.E_))
        self.A_, self.gamma_ = law.A_, law.gamma_
        self.params_ = {"asymptote": self.asymptote_, "A": self.A_, "gamma": self.gamma_}
        # a larger irreducible gap E means a worse asymptote, so the interval's ends swap when higher is better
        asymptote_ends = sorted(float(self._metric(end)) for end in law.ci_["E"])
        self.ci_ = {"asymptote": tuple(asymptote_ends), "A": law.ci_["A"], "gamma": law.ci_["gamma"]}
        self.se_ = {"asymptote": law.se_["E"], "A": law.se_["A"], "gamma": law.se_["gamma"]}
        self.n_points_ = law.n_points_
        return self

    def predict(self, x) -> np.ndarray:
        _check_is_fitted(self, "params_")
        return self._metric(self.law_.predict(x))

    def _extra_summary(self) -> dict:
        return {"best_possible": self._best()}


# --------------------------------------------------------------------------------------------
# Is the whole series monotone in scale?


@dataclasses.dataclass(frozen=True)
class MonotoneTrend:
    """Rank correlations of metric with scale and the Mann–Kendall test; `direction` in the metric's own sense."""
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    mann_kendall_s: float
    mann_kendall_z: float
    mann_kendall_p: float
    n_points: int
    direction: str  # "improving", "degrading" or "no trend" at the test's alpha


def mann_kendall(x, y) -> tuple[float, float, float]:
    """Mann–Kendall S = Σ sign(Δx)·sign(Δy) over pairs, its normal z (continuity-corrected) and two-sided p.

    Ties in either variable enter the variance as in Kendall (1970); repeated seeds at one scale are ties in x.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = x.size
    upper = np.triu_indices(n, k=1)
    s = float(np.sum(np.sign(np.subtract.outer(x, x)[upper]) * np.sign(np.subtract.outer(y, y)[upper])))

    def tie_sums(values):
        counts = np.unique(values, return_counts=True)[1].astype(float)
        return (np.sum(counts * (counts - 1) * (2 * counts + 5)), np.sum(counts * (counts - 1) * (counts - 2)),
                np.sum(counts * (counts - 1)))

    (tx5, tx2, tx1), (ty5, ty2, ty1) = tie_sums(x), tie_sums(y)
    variance = (n * (n - 1) * (2 * n + 5) - tx5 - ty5) / 18
    if n > 2:
        variance += tx2 * ty2 / (9 * n * (n - 1) * (n - 2))
    variance += tx1 * ty1 / (2 * n * (n - 1))
    if variance <= 0:
        return s, math.nan, math.nan
    z = (s - math.copysign(1, s)) / math.sqrt(variance) if s != 0 else 0.0
    return s, z, float(2 * stats.norm.sf(abs(z)))


def monotone_trend(x, metric, higher_is_better=True, alpha=0.05) -> MonotoneTrend:
    """Spearman, Kendall and Mann–Kendall of metric against log scale (ranks, so the log changes nothing)."""
    columns = _as_columns("monotone_trend", x=x, metric=metric)
    x, metric = columns["x"], columns["metric"]
    x, metric = _usable_rows("monotone_trend", x, metric, ~(np.isfinite(x) & np.isfinite(metric)), "with NaN or inf")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(metric) == 0:
        raise ValueError(f"monotone_trend: need at least 3 finite points with varying x and metric; got "
                         f"{x.size} points, {np.unique(x).size} distinct x, {np.unique(metric).size} distinct metric")
    spearman = stats.spearmanr(x, metric)
    kendall = stats.kendalltau(x, metric)
    s, z, p = mann_kendall(x, metric)
    improving_sign = 1 if higher_is_better else -1
    direction = "no trend"
    if p < alpha:
        direction = "improving" if np.sign(s) == improving_sign else "degrading"
    return MonotoneTrend(spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue),
                         kendall=float(kendall.statistic), kendall_p=float(kendall.pvalue), mann_kendall_s=s,
                         mann_kendall_z=z, mann_kendall_p=p, n_points=int(x.size), direction=direction)


# --------------------------------------------------------------------------------------------
# Does the metric still improve at the largest scales?


@dataclasses.dataclass(frozen=True)
class ScaleTrend:
    """OLS slope of metric per decade of x over the largest scales, its interval, and the verdict it implies."""
    slope: float  # metric units per decade of x
    ci: tuple[float, float]
    ci_level: float
    n_points: int
    n_scales: int  # distinct x values in the window
    x_min: float  # the window's range of x
    x_max: float
    higher_is_better: bool
    x_grows_with_scale: bool  # False when x is pretraining loss: the largest scales have the smallest x
    verdict: str  # "improving", "plateau" or "degrading"

    def sentence(self, task: str, metric: str, x_name: str = "parameters") -> str:
        """E.g. 'BBBP ROC-AUC stops improving above 3·10⁵ parameters: slope −0.01 ± 0.02 per decade'."""
        half_width = (self.ci[1] - self.ci[0]) / 2
        phrase = {"improving": "keeps improving", "plateau": "stops improving", "degrading": "gets worse"}
        where = (f"above {format_scale(self.x_min)} {x_name}" if self.x_grows_with_scale
                 else f"below {x_name} {format_scale(self.x_max)}")
        return (f"{task} {metric} {phrase[self.verdict]} {where}: "
                f"slope {format_with_uncertainty(self.slope, half_width)} per decade "
                f"({self.n_points} points, {round(100 * self.ci_level)} % CI)")


def trend_at_largest_scales(x, metric, higher_is_better=True, top_fraction=0.5, ci_level=0.95,
                            x_grows_with_scale=True) -> ScaleTrend:
    """Slope of metric against log10 x over the largest scales (the top_fraction of distinct x values, at least 2).

    The verdict reads the slope's confidence interval in the metric's improving direction: entirely on the
    improving side → "improving", entirely on the other → "degrading", straddling zero → "plateau".
    For x = pretraining loss pass x_grows_with_scale=False: the window is then the lowest losses.
    """
    owner = "trend_at_largest_scales"
    columns = _as_columns(owner, x=x, metric=metric)
    x, metric = columns["x"], columns["metric"]
    x, metric = _usable_rows(owner, x, metric, ~(np.isfinite(x) & (x > 0) & np.isfinite(metric)),
                             "with x <= 0 or a non-finite value")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"{owner}: top_fraction must be in (0, 1], got {top_fraction}")
    scales = np.unique(x)  # ascending
    if scales.size < 2:
        raise ValueError(f"{owner}: need at least 2 distinct positive x values, got {scales.size}")
    n_scales = max(2, math.ceil(top_fraction * scales.size))
    window_scales = scales[-n_scales:] if x_grows_with_scale else scales[:n_scales]
    window = np.isin(x, window_scales)
    if window.sum() < 3:
        raise ValueError(f"{owner}: the {n_scales} largest scales hold {int(window.sum())} points; a slope "
                         "interval needs at least 3 (raise top_fraction or add seeds)")

    result = sm.OLS(metric[window], sm.add_constant(np.log10(x[window]))).fit()
    slope = float(result.params[1])
    lo, hi = (float(end) for end in result.conf_int(alpha=1 - ci_level)[1])
    # slope in the direction of "better metric as scale grows"
    improving_sign = (1 if higher_is_better else -1) * (1 if x_grows_with_scale else -1)
    improving_lo, improving_hi = sorted((improving_sign * lo, improving_sign * hi))
    verdict = "improving" if improving_lo > 0 else "degrading" if improving_hi < 0 else "plateau"
    return ScaleTrend(slope=slope, ci=(lo, hi), ci_level=ci_level, n_points=int(window.sum()), n_scales=n_scales,
                      x_min=float(window_scales[0]), x_max=float(window_scales[-1]),
                      higher_is_better=higher_is_better, x_grows_with_scale=x_grows_with_scale, verdict=verdict)


# --------------------------------------------------------------------------------------------
# Numbers in sentences

_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def format_scale(value: float) -> str:
    """3e5 → '3·10⁵', 3.2e5 → '3.2·10⁵'; values from 0.001 to 1000 are written plainly (0.318, 300)."""
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1000:
        return f"{value:.3g}"
    exponent = math.floor(math.log10(abs(value)))
    mantissa = round(value / 10**exponent, 1)
    if abs(mantissa) >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    mantissa_text = f"{mantissa:g}"
    prefix = "" if mantissa_text == "1" else f"{mantissa_text}·"
    return f"{prefix}10{str(exponent).translate(_SUPERSCRIPT)}"


def format_with_uncertainty(value: float, half_width: float) -> str:
    """'−0.01 ± 0.02': the half-width to one significant digit (two if it starts with 1), the value to match."""
    if not (math.isfinite(value) and math.isfinite(half_width)) or half_width <= 0:
        return _signed(f"{value:.3g}") + " ± " + f"{half_width:.3g}"
    decimals = -math.floor(math.log10(half_width))
    if f"{half_width:.{max(decimals, 0)}f}".lstrip("0.").startswith("1"):
        decimals += 1
    decimals = max(decimals, 0)
    return f"{_signed(f'{value:.{decimals}f}')} ± {half_width:.{decimals}f}"


def _signed(text: str) -> str:
    """A typographic minus for negatives and an explicit + for positives (slopes read better signed)."""
    if text.startswith("-"):
        return "−" + text[1:] if text.strip("-0.") else text[1:]
    return text if text.strip("0.") == "" else "+" + text
