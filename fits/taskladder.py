"""Predict a task at a larger scale in two steps, and measure how well that works on the largest rung.

Bhagia et al. 2024, "Establishing Task Scaling Laws via Compute-Efficient Model Ladders" (arXiv:2412.04403):
step 1 fits the task loss (here the fine-tuned or probed model's validation NLL / MSE) as a function of
N and D, L(N, D) = E + A/N^α + B/D^β; step 2 maps task loss to the task metric with a fitted monotone link,
metric = b + a / (1 + exp(−k (L − L0))) for a bounded metric (their accuracy link), fitted on every
checkpoint. Predicting the largest rung from the smaller ones, and comparing with what it measured, makes
"downstream is (not) predictable from pretraining scale" a number per task.

Step 1 uses the richest law the ladder can identify (fits.powerlaw.identification): L(N, D) with at least
3 sizes and 3 budgets, else log L linear in log N and log D (pure power laws, 3 coefficients), or, with one
budget, E + A·N^(−γ) (4+ sizes) or a pure power law in N.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.special import expit

from clmscale.engine.files import json_safe
from clmscale.fits.downstream import format_scale
from clmscale.fits.powerlaw import (
    ChinchillaFit,
    SaturatingPowerLaw,
    _as_columns,
    _check_is_fitted,
    _Estimator,
    identification,
)

LOSS_LAWS = {
    "chinchilla": "L(N, D) = E + A/N^alpha + B/D^beta",
    "loglinear_nd": "log L = c + a log N + b log D",
    "saturating_n": "L(N) = E + A N^(-gamma)",
    "loglinear_n": "log L = c + a log N",
}
LINKS = {
    "sigmoid": "metric = b + a / (1 + exp(-k (L - L0)))",
    "loglinear": "log metric = c + p log L",
    "linear": "metric = c + p L",
}
BOUNDED_METRICS = {"roc_auc": (0.0, 1.0), "prc_auc": (0.0, 1.0), "accuracy": (0.0, 1.0)}


def _usable(owner: str, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Rows with positive finite N, D, task loss and a finite metric; a warning names the others."""
    positive = [columns[name] for name in ("n_params", "n_tokens", "task_loss")]
    valid = np.all([np.isfinite(v) & (v > 0) for v in positive], axis=0) & np.isfinite(columns["metric"])
    if not valid.all():
        warnings.warn(
            f"{owner}: dropped {int((~valid).sum())} of {valid.size} rows with a non-positive or "
            f"non-finite N, D or task loss, or a non-finite metric: rows {np.flatnonzero(~valid).tolist()}",
            UserWarning,
            stacklevel=3,
        )
    if valid.sum() < 3:
        raise ValueError(f"{owner}: need at least 3 usable checkpoints, got {int(valid.sum())} of {valid.size}")
    return tuple(columns[name][valid] for name in ("n_params", "n_tokens", "task_loss", "metric"))


def _loglinear(log_columns: list[np.ndarray], log_y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of log y on [1, log columns…]."""
    design = np.column_stack([np.ones_like(log_y), *log_columns])
    coefficients, *_ = np.linalg.lstsq(design, log_y, rcond=None)
    return coefficients


class TaskLadder(_Estimator):
    """(N, D) → task loss → task metric (module docstring). Fit on a ladder; predict a rung it has not seen.

    loss_law: "auto" or a key of LOSS_LAWS; link: "auto" or a key of LINKS ("auto": sigmoid for a bounded
    metric, i.e. metric_range given, else loglinear when metric and loss are positive, else linear).
    metric_range: (lowest, highest) possible metric for the sigmoid, e.g. (0, 1) for ROC-AUC.
    """

    formula = "metric = link(L_task(N, D))"

    def __init__(self, loss_law="auto", link="auto", metric_range=None, huber_delta=1e-3, n_starts=20, seed=0):
        self.loss_law = loss_law
        self.link = link
        self.metric_range = metric_range
        self.huber_delta = huber_delta
        self.n_starts = n_starts
        self.seed = seed

    def fit(self, n_params, n_tokens, task_loss, metric) -> TaskLadder:
        owner = "TaskLadder.fit"
        if self.loss_law != "auto" and self.loss_law not in LOSS_LAWS:
            raise ValueError(f"{owner}: loss_law must be 'auto' or one of {sorted(LOSS_LAWS)}, got {self.loss_law!r}")
        if self.link != "auto" and self.link not in LINKS:
            raise ValueError(f"{owner}: link must be 'auto' or one of {sorted(LINKS)}, got {self.link!r}")
        columns = _as_columns(owner, n_params=n_params, n_tokens=n_tokens, task_loss=task_loss, metric=metric)
        n, d, loss, metric = _usable(owner, columns)
        self.loss_law_, self.loss_law_reason_, self.loss_fit_ = self._fit_loss_law(owner, n, d, loss)
        self.link_, self.link_params_ = self._fit_link(owner, loss, metric)
        self.n_points_ = int(loss.size)
        self.n_rungs_ = int(np.unique(n).size)
        self.params_ = {"loss_law": self.loss_law_, "link": self.link_, **self.link_params_}
        fitted_loss = self.predict_task_loss(n, d)
        self.link_rmse_ = float(np.sqrt(np.mean((self.predict_from_loss(loss) - metric) ** 2)))
        self.loss_rmse_relative_ = float(np.sqrt(np.mean(((fitted_loss - loss) / loss) ** 2)))
        return self

    # step 1 ---------------------------------------------------------------------------------

    def _fit_loss_law(self, owner: str, n: np.ndarray, d: np.ndarray, loss: np.ndarray):
        """(law name, why it was chosen, fitted law or coefficients)."""
        n_sizes, n_budgets = np.unique(n).size, np.unique(d).size
        n_points = len(set(zip(n, d, strict=True)))
        if self.loss_law != "auto":
            return self.loss_law, "given", self._fit_named(self.loss_law, n, d, loss)
        reasons = []
        if n_sizes >= 3 and n_budgets >= 3 and n_points >= 6:
            law = self._fit_named("chinchilla", n, d, loss)
            found = identification(law)
            if found.identified:
                return "chinchilla", f"{n_sizes} sizes × {n_budgets} budgets identify L(N, D)", law
            reasons.append(
                "L(N, D) was not identified ("
                + "; ".join(f"{p['parameter']}: {p['problem']}" for p in found.problems)
                + ")"
            )
        else:
            reasons.append(
                f"{n_sizes} sizes, {n_budgets} budgets, {n_points} distinct points: L(N, D) needs at least 3, 3 and 6"
            )
        if n_budgets >= 2:
            if n_sizes < 2:
                raise ValueError(f"{owner}: one model size; a task loss law needs at least 2")
            return "loglinear_nd", "; ".join(reasons), self._fit_named("loglinear_nd", n, d, loss)
        if n_sizes >= 4:
            law = self._fit_named("saturating_n", n, d, loss)
            found = identification(law)
            if found.identified:
                return "saturating_n", "; ".join([*reasons, "one budget; E + A·N^(−γ) identified"]), law
            reasons.append("E + A·N^(−γ) was not identified")
        if n_sizes < 2:
            raise ValueError(f"{owner}: one model size; a task loss law needs at least 2")
        return "loglinear_n", "; ".join([*reasons, "one budget"]), self._fit_named("loglinear_n", n, d, loss)

    def _fit_named(self, name: str, n: np.ndarray, d: np.ndarray, loss: np.ndarray):
        if name == "chinchilla":
            return ChinchillaFit(
                huber_delta=self.huber_delta, n_bootstrap=0, seed=self.seed, n_jobs=1, n_starts=self.n_starts
            ).fit(n, d, loss)
        if name == "saturating_n":
            return SaturatingPowerLaw(
                huber_delta=self.huber_delta, n_bootstrap=0, seed=self.seed, n_jobs=1, n_starts=self.n_starts
            ).fit(n, loss)
        if name == "loglinear_nd":
            return _loglinear([np.log(n), np.log(d)], np.log(loss))
        return _loglinear([np.log(n)], np.log(loss))

    def predict_task_loss(self, n_params, n_tokens) -> np.ndarray:
        """Step 1: the task loss at each (N, D)."""
        _check_is_fitted(self, "loss_fit_")
        n, d = np.asarray(n_params, float), np.asarray(n_tokens, float)
        if self.loss_law_ == "chinchilla":
            return self.loss_fit_.predict(n, d)
        if self.loss_law_ == "saturating_n":
            return self.loss_fit_.predict(n)
        coefficients = self.loss_fit_
        log_loss = coefficients[0] + coefficients[1] * np.log(n)
        if self.loss_law_ == "loglinear_nd":
            log_loss = log_loss + coefficients[2] * np.log(d)
        return np.exp(log_loss)

    # step 2 ---------------------------------------------------------------------------------

    def _fit_link(self, owner: str, loss: np.ndarray, metric: np.ndarray) -> tuple[str, dict]:
        link = self.link
        if link == "auto":
            link = "sigmoid" if self.metric_range is not None else "loglinear" if np.all(metric > 0) else "linear"
        if link == "sigmoid":
            if self.metric_range is None:
                raise ValueError(f"{owner}: the sigmoid link needs metric_range=(lowest, highest)")
            return link, _fit_sigmoid(loss, metric, *map(float, self.metric_range))
        if link == "loglinear":
            if np.any(metric <= 0):
                raise ValueError(f"{owner}: the loglinear link needs a positive metric; min is {metric.min():g}")
            c, p = _loglinear([np.log(loss)], np.log(metric))
            return link, {"c": float(c), "p": float(p)}
        design = np.column_stack([np.ones_like(loss), loss])
        (c, p), *_ = np.linalg.lstsq(design, metric, rcond=None)
        return link, {"c": float(c), "p": float(p)}

    def predict_from_loss(self, task_loss) -> np.ndarray:
        """Step 2: the metric at each task loss."""
        _check_is_fitted(self, "link_params_")
        loss, q = np.asarray(task_loss, float), self.link_params_
        if self.link_ == "sigmoid":
            return q["b"] + q["a"] * expit(-q["k"] * (loss - q["L0"]))
        if self.link_ == "loglinear":
            return np.exp(q["c"] + q["p"] * np.log(loss))
        return q["c"] + q["p"] * loss

    def predict(self, n_params, n_tokens) -> np.ndarray:
        """Both steps: the metric at each (N, D)."""
        return self.predict_from_loss(self.predict_task_loss(n_params, n_tokens))

    def to_dict(self) -> dict:
        _check_is_fitted(self, "params_")
        law = self.loss_fit_
        loss_law = (
            {"params": law.params_, "identification": identification(law).to_dict()}
            if hasattr(law, "params_")
            else {"coefficients": list(law)}
        )
        return json_safe(
            {
                "estimator": type(self).__name__,
                "law": self.formula,
                "hyperparameters": self.get_params(),
                "loss_law": self.loss_law_,
                "loss_law_formula": LOSS_LAWS[self.loss_law_],
                "loss_law_reason": self.loss_law_reason_,
                "loss_law_fit": loss_law,
                "link": self.link_,
                "link_formula": LINKS[self.link_],
                "link_params": self.link_params_,
                "n_points": self.n_points_,
                "n_rungs": self.n_rungs_,
                "link_rmse": self.link_rmse_,
                "loss_rmse_relative": self.loss_rmse_relative_,
            }
        )


def _fit_sigmoid(loss: np.ndarray, metric: np.ndarray, lowest: float, highest: float) -> dict:
    """b + a·σ(−k(L − L0)) with b and b + a inside [lowest, highest], from a few starts; the best kept.

    Parameterised by (b, top, log k, L0): the box bounds keep the link inside the metric's range, and the fitted
    top − b may be negative (a metric that rises with loss): the link is monotone in either direction.
    """
    if not lowest < highest:
        raise ValueError(
            f"TaskLadder: metric_range must be (lowest, highest) with lowest < highest, got {(lowest, highest)}"
        )
    spread = max(float(np.ptp(loss)), 1e-12)

    def residual(theta):
        b, top, log_k, centre = theta
        return b + (top - b) * expit(-math.exp(log_k) * (loss - centre)) - metric

    lo, hi = metric.min(), metric.max()
    b0, top0 = max(lowest, lo - 0.1 * (hi - lo)), min(highest, hi + 0.1 * (hi - lo))
    best = None
    for scale in (1.0, 4.0, 16.0):
        for centre in np.quantile(loss, [0.1, 0.5, 0.9]):
            start = [b0, top0, math.log(scale / spread), float(centre)]
            fit = least_squares(
                residual, start, bounds=([lowest, lowest, -np.inf, -np.inf], [highest, highest, np.inf, np.inf])
            )
            if best is None or fit.cost < best.cost:
                best = fit
    assert best is not None  # the loops above ran
    b, top, log_k, centre = best.x
    if not best.success:
        warnings.warn(
            f"TaskLadder: the sigmoid link stopped before convergence ({best.message})", RuntimeWarning, stacklevel=4
        )
    return {"b": float(b), "a": float(top - b), "k": float(math.exp(log_k)), "L0": float(centre)}


# --------------------------------------------------------------------------------------------
# Back-test: predict the largest rung from the smaller ones


@dataclasses.dataclass(frozen=True)
class TaskBacktest:
    """Errors on the held-out rung(s), metric units: both steps chained, and each step alone.

    points: n_params, n_tokens, task_loss, predicted_task_loss, metric, predicted_metric, link_only (the link
    applied to the measured task loss), error (predicted_metric − metric).
    """

    points: pd.DataFrame
    mean_abs_error: float  # both steps, metric units
    max_abs_error: float
    link_only_mean_abs_error: float  # step 2 alone, on the measured task loss
    task_loss_mean_abs_relative_error: float  # step 1 alone
    n_train: int
    n_holdout: int
    holdout_n_params: tuple[float, ...]
    fit: TaskLadder

    def to_dict(self) -> dict:
        return json_safe(
            {
                "mean_abs_error": self.mean_abs_error,
                "max_abs_error": self.max_abs_error,
                "link_only_mean_abs_error": self.link_only_mean_abs_error,
                "task_loss_mean_abs_relative_error": self.task_loss_mean_abs_relative_error,
                "n_train": self.n_train,
                "n_holdout": self.n_holdout,
                "holdout_n_params": list(self.holdout_n_params),
                "points": self.points.to_dict("records"),
                "fit": self.fit.to_dict(),
            }
        )

    def sentence(self, subject: str, metric_words: str) -> str:
        sizes = ", ".join(format_scale(n) for n in self.holdout_n_params)
        return (
            f"{subject}: predicted from the smaller rungs, the largest ({sizes} parameters) is off by "
            f"{self.mean_abs_error:.3g} {metric_words} on average (max "
            f"{self.max_abs_error:.3g}; task loss off by {100 * self.task_loss_mean_abs_relative_error:.1f} %, the "
            f"link alone by {self.link_only_mean_abs_error:.3g}; {self.fit.loss_law_} law, {self.fit.link_} link)"
        )


def task_ladder_backtest(
    n_params, n_tokens, task_loss, metric, n_holdout_rungs: int = 1, estimator: TaskLadder | None = None
) -> TaskBacktest:
    """Fit the two steps without the n_holdout_rungs largest sizes, then predict the held-out checkpoints."""
    owner = "task_ladder_backtest"
    columns = _as_columns(owner, n_params=n_params, n_tokens=n_tokens, task_loss=task_loss, metric=metric)
    columns = dict(zip(("n_params", "n_tokens", "task_loss", "metric"), _usable(owner, columns), strict=True))
    rungs = np.unique(columns["n_params"])
    if not 1 <= n_holdout_rungs <= rungs.size - 2:
        raise ValueError(
            f"{owner}: n_holdout_rungs={n_holdout_rungs} must leave at least 2 of the {rungs.size} model sizes to fit"
        )
    held_out_sizes = rungs[-n_holdout_rungs:]
    held = np.isin(columns["n_params"], held_out_sizes)
    template = estimator if estimator is not None else TaskLadder()
    ladder = type(template)(**template.get_params())
    ladder.fit(*(columns[name][~held] for name in ("n_params", "n_tokens", "task_loss", "metric")))
    points = pd.DataFrame({name: columns[name][held] for name in ("n_params", "n_tokens", "task_loss", "metric")})
    points["predicted_task_loss"] = ladder.predict_task_loss(points["n_params"], points["n_tokens"])
    points["predicted_metric"] = ladder.predict_from_loss(points["predicted_task_loss"])
    points["link_only"] = ladder.predict_from_loss(points["task_loss"])
    points["error"] = points["predicted_metric"] - points["metric"]
    relative = ((points["predicted_task_loss"] - points["task_loss"]) / points["task_loss"]).abs()
    return TaskBacktest(
        points=points,
        mean_abs_error=float(points["error"].abs().mean()),
        max_abs_error=float(points["error"].abs().max()),
        link_only_mean_abs_error=float((points["link_only"] - points["metric"]).abs().mean()),
        task_loss_mean_abs_relative_error=float(relative.mean()),
        n_train=int((~held).sum()),
        n_holdout=int(held.sum()),
        holdout_n_params=tuple(float(n) for n in held_out_sizes),
        fit=ladder,
    )
