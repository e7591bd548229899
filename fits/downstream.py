"""Downstream metrics against scale: a saturating law, and the number formats the sentences share.

A fine-tuned metric (ROC-AUC, RMSE, …) measured at several pretraining scales is read as a trend by
fits.verdicts (four verdicts against an equivalence margin, run-level intervals); `DownstreamPowerLaw`
extrapolates it toward the metric's best possible value.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from clmscale.fits.powerlaw import SaturatingPowerLaw, _as_columns, _check_is_fitted, _Estimator


def _usable_rows(owner: str, x: np.ndarray, metric: np.ndarray, bad: np.ndarray, why: str):
    """x and metric without the rows flagged `bad`, warning with their indices and values."""
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = "; ".join(f"x={float(x[row])!r}, metric={float(metric[row])!r} at row {row}" for row in rows[:10])
        warnings.warn(
            f"{owner}: dropped {rows.size} of {x.size} rows {why}: rows {rows.tolist()} ({shown})",
            UserWarning,
            stacklevel=3,
        )
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

    def __init__(
        self,
        higher_is_better=True,
        best_possible=None,
        huber_delta=1e-3,
        n_bootstrap=1000,
        seed=0,
        n_jobs=None,
        ci_level=0.95,
    ):
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
        x, metric = _usable_rows(
            owner, x, metric, bad, f"with x <= 0, a non-finite value, or metric at best_possible={self._best()}"
        )
        law = SaturatingPowerLaw(
            huber_delta=self.huber_delta,
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
            n_jobs=self.n_jobs,
            ci_level=self.ci_level,
        )
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
