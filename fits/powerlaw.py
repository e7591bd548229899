"""Scaling laws for pretraining loss: L(N, D), one-variable saturating laws, pure power laws, backtests.

The two-variable law follows Hoffmann et al. 2022 (arXiv:2203.15556, Approach 3) as replicated by
Besiroglu et al. 2024 (arXiv:2404.10102, github.com/epoch-research/analyzing-chinchilla):
log L is modelled as logsumexp(a − α·log N, b − β·log D, e), fitted by a Huber loss (δ = 1e-3) on
log L with L-BFGS-B from a grid of starting points, best kept, then bootstrapped for 95 % intervals.
The one-variable law E + A·x^(−γ) is fitted the same way with two log-space terms.

Every fit here is an estimator in the scikit-learn sense: `__init__` stores hyperparameters,
`fit` validates, fits and returns `self`, and estimated values end in `_`.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import os
import types
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy.optimize import minimize

from clmscale.engine.files import json_safe
from clmscale.fits._blas import one_blas_thread

# --------------------------------------------------------------------------------------------
# The log-space Huber fit shared by both saturating laws.
#
# A law is "log y = logsumexp of K terms, each linear in the parameters". For a dataset of n
# points that is a design matrix of shape (K·n, n_parameters): rows [k·n, (k+1)·n) give term k.

CHINCHILLA_PARAMS = ("a", "b", "e", "alpha", "beta")  # a = log A, b = log B, e = log E
SATURATING_PARAMS = ("a", "e", "gamma")  # a = log A, e = log E

# Epoch AI's initialisation grid (6·6·5·5·5 = 4500 points).
CHINCHILLA_INIT_GRID = types.MappingProxyType(
    {
        "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
        "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    }
)

# scipy's L-BFGS-B stops when the decrease of f is below ftol·max(|f|, 1). The summed Huber loss is
# ~1e-3, so the default ftol (2.2e-9) acts as a loose absolute test: a bootstrap refit started at the
# point estimate stopped after ~15 steps up to 4 % above its minimum. Runs from the grid use the
# defaults (fast, they only pick a basin); the best one is then polished with these.
POLISH_OPTIONS = types.MappingProxyType({"ftol": 1e-14, "gtol": 1e-10, "maxiter": 5000})


def _chinchilla_design(log_n_params: np.ndarray, log_n_tokens: np.ndarray) -> np.ndarray:
    """Design of the terms a − α·log N, b − β·log D and e, as linear maps of CHINCHILLA_PARAMS."""
    zeros, ones = np.zeros_like(log_n_params), np.ones_like(log_n_params)
    term_n = {"a": ones, "b": zeros, "e": zeros, "alpha": -log_n_params, "beta": zeros}
    term_d = {"a": zeros, "b": ones, "e": zeros, "alpha": zeros, "beta": -log_n_tokens}
    term_e = {"a": zeros, "b": zeros, "e": ones, "alpha": zeros, "beta": zeros}
    terms = (term_n, term_d, term_e)
    return np.concatenate([np.column_stack([t[name] for name in CHINCHILLA_PARAMS]) for t in terms])  # (3n, 5)


def _saturating_design(log_x: np.ndarray) -> np.ndarray:
    """Design of the terms a − γ·log x and e, as linear maps of SATURATING_PARAMS."""
    zeros, ones = np.zeros_like(log_x), np.ones_like(log_x)
    term_x = {"a": ones, "e": zeros, "gamma": -log_x}
    term_e = {"a": zeros, "e": ones, "gamma": zeros}
    return np.concatenate([np.column_stack([t[name] for name in SATURATING_PARAMS]) for t in (term_x, term_e)])


def _huber_logsumexp(terms: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of logsumexp(terms) − log y over the n points, and its gradient in each term (K, n)."""
    top = terms.max(axis=0)
    weights = np.exp(terms - top)  # softmax numerators, ≤ 1: no overflow
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_y
    clipped = np.clip(residual, -delta, delta)  # Huber'(r)
    loss = float(clipped @ (residual - 0.5 * clipped))  # r²/2 inside ±δ, δ(|r| − δ/2) outside
    return loss, weights * (clipped / total)


def huber_logsumexp_loss(theta: np.ndarray, design, log_y: np.ndarray, delta: float):
    """Summed Huber loss of logsumexp(terms) − log y, and its gradient in theta (for L-BFGS-B, jac=True).

    design: a design matrix (K·n, n_parameters) whose rows are linear terms, or an `_EffectiveDataDesign`
    (the data-constrained law, whose D term is not linear in its parameters)."""
    if isinstance(design, _EffectiveDataDesign):
        return design.loss(theta, log_y, delta)
    loss, d_terms = _huber_logsumexp((design @ theta).reshape(-1, log_y.size), log_y, delta)
    return loss, design.T @ d_terms.ravel()


def _fit_from_grid(
    owner: str, grid_points: np.ndarray, design, log_y: np.ndarray, huber_delta: float, n_starts: int | None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Screen the grid, run L-BFGS-B from the best starts, keep the best; warn if it did not converge.

    Returns the best parameters, its objective, and the screened starts (best first)."""
    with one_blas_thread():
        starts = _screen_starts(grid_points, design, log_y, huber_delta, n_starts)
        theta, objective, converged = _minimize_from_starts(starts, design, log_y, huber_delta)
    if not np.all(np.isfinite(theta)):
        raise RuntimeError(f"{owner}: every L-BFGS-B run from {len(starts)} starting points diverged")
    if not converged:
        warnings.warn(
            f"{owner}: the best L-BFGS-B run stopped before convergence (loss {objective:.4g})",
            RuntimeWarning,
            stacklevel=3,
        )
    return theta, objective, starts


def _screen_starts(starts: np.ndarray, design: np.ndarray, log_y: np.ndarray, delta: float, n_keep):
    """The n_keep starting points with the lowest initial loss, best first (all of them if n_keep is None)."""
    initial = np.array([huber_logsumexp_loss(theta, design, log_y, delta)[0] for theta in starts])
    order = np.argsort(initial, kind="stable")
    return starts[order if n_keep is None else order[:n_keep]]


def _minimize_from_starts(starts: np.ndarray, design: np.ndarray, log_y: np.ndarray, delta: float):
    """L-BFGS-B from every start, then polish the best; returns (theta, loss, converged)."""
    args = (design, log_y, delta)
    runs = [minimize(huber_logsumexp_loss, theta, args=args, jac=True, method="L-BFGS-B") for theta in starts]
    finite = [run for run in runs if np.isfinite(run.fun) and np.all(np.isfinite(run.x))]
    if not finite:
        return np.full(starts.shape[1], np.nan), np.nan, False
    best = min(finite, key=lambda run: run.fun)
    polished = minimize(huber_logsumexp_loss, best.x, args=args, jac=True, method="L-BFGS-B", options=POLISH_OPTIONS)
    if polished.fun <= best.fun and np.all(np.isfinite(polished.x)):
        return polished.x, float(polished.fun), bool(polished.success)
    return best.x, float(best.fun), bool(best.success)


def _refit_resample(
    theta_hat: np.ndarray, extra_starts: np.ndarray, design: np.ndarray, log_y: np.ndarray, delta: float
) -> np.ndarray:
    """One bootstrap refit: polish from the point estimate; extra grid starts may still find a lower basin."""
    args = (design, log_y, delta)
    run = minimize(huber_logsumexp_loss, theta_hat, args=args, jac=True, method="L-BFGS-B", options=POLISH_OPTIONS)
    theta, loss = (run.x, run.fun) if np.all(np.isfinite(run.x)) and np.isfinite(run.fun) else (None, np.inf)
    if len(extra_starts):
        other_theta, other_loss, _ = _minimize_from_starts(extra_starts, design, log_y, delta)
        if other_loss < loss:
            theta, loss = other_theta, other_loss
    return np.full(theta_hat.size, np.nan) if theta is None else theta


def _bootstrap_chunk(
    design_fn: Callable,
    columns: tuple,
    log_y: np.ndarray,
    delta: float,
    theta_hat: np.ndarray,
    extra_starts: np.ndarray,
    resamples: np.ndarray,
) -> np.ndarray:
    """Refit one chunk of bootstrap resamples (rows of point indices). Runs in a worker process."""
    thetas = np.empty((len(resamples), theta_hat.size))
    with one_blas_thread():
        for row, index in enumerate(resamples):
            design = design_fn(*(column[index] for column in columns))
            thetas[row] = _refit_resample(theta_hat, extra_starts, design, log_y[index], delta)
    return thetas


def _bootstrap(
    design_fn: Callable,
    columns: tuple,
    log_y: np.ndarray,
    delta: float,
    theta_hat: np.ndarray,
    extra_starts: np.ndarray,
    n_bootstrap: int,
    seed: int,
    n_jobs: int | None,
) -> np.ndarray:
    """Refit n_bootstrap resamples of the points; (n_bootstrap, n_parameters), NaN rows for failed refits.

    All resamples are drawn up front from `seed`, so the result does not depend on n_jobs.
    """
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, log_y.size, size=(n_bootstrap, log_y.size))  # (n_bootstrap, n)
    n_workers = (os.cpu_count() or 1) if n_jobs is None else n_jobs  # cpu_count() is None when it cannot tell
    fixed = (design_fn, columns, log_y, delta, theta_hat, extra_starts)
    if n_workers <= 1 or n_bootstrap < 2:
        return _bootstrap_chunk(*fixed, resamples)
    chunks = np.array_split(resamples, min(n_bootstrap, 4 * n_workers))  # a few chunks per worker evens out load
    with ProcessPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(_bootstrap_chunk, *(itertools.repeat(value) for value in fixed), chunks)
        return np.concatenate(list(results))


def _bootstrap_summary(samples: pd.DataFrame, ci_level: float, owner: str):
    """Percentile intervals and standard errors per column; warns when some refits failed."""
    n_failed = int(samples.isna().any(axis=1).sum())
    if n_failed:
        warnings.warn(
            f"{owner}: {n_failed} of {len(samples)} bootstrap refits failed (non-finite); "
            f"intervals use the other {len(samples) - n_failed}.",
            RuntimeWarning,
            stacklevel=3,
        )
    ok = samples.dropna()
    tail = 100 * (1 - ci_level) / 2
    ci, se = {}, {}
    for name in samples.columns:
        if len(ok) < 2:
            ci[name], se[name] = (math.nan, math.nan), math.nan
            continue
        lo, hi = np.percentile(ok[name], [tail, 100 - tail])
        ci[name], se[name] = (float(lo), float(hi)), float(ok[name].std(ddof=1))
    return ci, se, n_failed


# --------------------------------------------------------------------------------------------
# Input checks shared by every estimator.


def _as_columns(owner: str, **columns) -> dict[str, np.ndarray]:
    """1-D float arrays of equal length, or a ValueError that names every field and its length."""
    arrays = {name: np.asarray(values, dtype=float) for name, values in columns.items()}
    for name, array in arrays.items():
        if array.ndim != 1:
            raise ValueError(f"{owner}: {name} must be 1-D, got shape {array.shape}")
    lengths = {name: array.size for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"{owner}: found input variables with inconsistent numbers of samples: [{described}]")
    return arrays


def _drop_invalid_rows(
    owner: str, arrays: dict[str, np.ndarray], min_points: int, parameter_names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Drop rows where any field is non-positive or not finite (log space needs > 0), warning with the rows."""
    bad = np.zeros(next(iter(arrays.values())).size, dtype=bool)
    reasons = []  # (row, text)
    for name, array in arrays.items():
        bad_here = ~np.isfinite(array) | (array <= 0)
        reasons += [(row, f"{name}={float(array[row])!r} at row {row}") for row in np.flatnonzero(bad_here)]
        bad |= bad_here
    if bad.any():
        rows = np.flatnonzero(bad).tolist()
        shown = "; ".join(text for _, text in sorted(reasons)[:10]) + ("; …" if len(reasons) > 10 else "")
        warnings.warn(
            f"{owner}: dropped {len(rows)} of {bad.size} rows with non-positive or non-finite values: "
            f"rows {rows} ({shown})",
            UserWarning,
            stacklevel=3,
        )
    kept = {name: array[~bad] for name, array in arrays.items()}
    n_kept = int((~bad).sum())
    if n_kept < min_points:
        raise ValueError(
            f"{owner}: need at least {min_points} points, one per parameter {parameter_names}; "
            f"got {n_kept} valid of {bad.size}"
        )
    return kept


class NotFittedError(ValueError, AttributeError):
    """Raised when predict and friends are called before fit (same bases as scikit-learn's)."""


def _check_hyperparameters(owner: str, huber_delta: float, n_bootstrap: int, ci_level: float) -> None:
    """Validated in fit, not __init__, as scikit-learn does."""
    if not huber_delta > 0:
        raise ValueError(f"{owner}: huber_delta must be > 0, got {huber_delta!r}")
    if not (isinstance(n_bootstrap, (int, np.integer)) and n_bootstrap >= 0):
        raise ValueError(f"{owner}: n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    if not 0 < ci_level < 1:
        raise ValueError(f"{owner}: ci_level must be in (0, 1), got {ci_level!r}")


def _check_is_fitted(estimator, attribute: str) -> None:
    if not hasattr(estimator, attribute):
        raise NotFittedError(
            f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with "
            "appropriate arguments before using this estimator."
        )


class _Estimator:
    """get_params / to_dict plumbing common to the fits (scikit-learn's BaseEstimator, minus the rest)."""

    # declared, not assigned: each subclass sets formula, and fit sets the rest (hasattr tells "fitted")
    formula: str
    params_: dict[str, Any]
    ci_: dict[str, tuple[float, ...]]
    se_: dict[str, float]
    n_points_: int
    bootstrap_: pd.DataFrame
    n_bootstrap_failed_: int

    def get_params(self) -> dict:
        """The hyperparameters passed to __init__, by name."""
        return {
            name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters if name != "self"
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def to_dict(self) -> dict:
        """JSON-ready summary: law, hyperparameters, parameters, intervals, standard errors."""
        _check_is_fitted(self, "params_")
        return json_safe(
            {
                "estimator": type(self).__name__,
                "law": self.formula,
                "hyperparameters": self.get_params(),
                "params": self.params_,
                "ci": {name: list(bounds) for name, bounds in self.ci_.items()},
                "se": self.se_,
                "n_points": self.n_points_,
                **self._extra_summary(),
            }
        )

    def _extra_summary(self) -> dict:
        return {}


def _set_bootstrap(
    est: Any, owner: str, design, columns: tuple, log_y: np.ndarray, theta: np.ndarray, starts: np.ndarray
) -> None:
    """A fitted law's resamples and their summary: est.bootstrap_ (one row per resample), ci_, se_ and
    n_bootstrap_failed_. Each refit is polished from `theta` and from the n_bootstrap_starts - 1 best of
    the screened `starts`; with n_bootstrap 0 the table is empty."""
    thetas = (
        _bootstrap(design, columns, log_y, est.huber_delta, theta, starts[: max(est.n_bootstrap_starts - 1, 0)],
                   est.n_bootstrap, est.seed, est.n_jobs)
        if est.n_bootstrap > 0
        else np.empty((0, len(est.param_names)))
    )  # fmt: skip
    est.bootstrap_ = pd.DataFrame([est._named(row) for row in thetas], columns=list(est.param_names))
    est.ci_, est.se_, est.n_bootstrap_failed_ = _bootstrap_summary(est.bootstrap_, est.ci_level, owner)


def _grid_summary(**columns: np.ndarray) -> dict[str, dict]:
    """Range and number of distinct values of each fitted column: what identification judges the law against."""
    return {
        name: {"min": float(values.min()), "max": float(values.max()), "n_distinct": int(np.unique(values).size)}
        for name, values in columns.items()
    }


# --------------------------------------------------------------------------------------------
# L(N, D) = E + A/N^α + B/D^β


class ComputeOptimal(NamedTuple):
    """The compute-optimal allocation along C = flops_per_param_token·N·D."""

    flops: np.ndarray
    n_params: np.ndarray
    n_tokens: np.ndarray
    loss: np.ndarray


class ChinchillaFit(_Estimator):
    """L(N, D) = E + A/N^α + B/D^β, fitted in log space with a Huber loss, as Hoffmann et al. / Epoch AI.

    n_starts: the grid points with the lowest starting loss that get a full L-BFGS-B run (None: all 4500,
        as Epoch; ~30 s on 240 points, while the best of the 100 screened ones reproduces their fit).
    n_bootstrap_starts: each bootstrap refit is polished from the point estimate and, if > 1, also run from
        the n_bootstrap_starts − 1 best screened grid points so that a resample can switch basin. On the
        Chinchilla 240 points four extra starts lowered no refit's loss by more than 2e-5 (relative) and
        one extra start made the bootstrap 5× slower, hence 1.
    init_grid: {parameter name: values} for a, b, e, alpha, beta; defaults to CHINCHILLA_INIT_GRID.
    """

    formula = "L(N, D) = E + A / N^alpha + B / D^beta"
    param_names: tuple[str, ...] = ("E", "A", "B", "alpha", "beta")
    E_: float  # fit sets one attribute per name in param_names
    A_: float
    B_: float
    alpha_: float
    beta_: float

    def __init__(
        self,
        huber_delta=1e-3,
        n_bootstrap=1000,
        seed=0,
        n_jobs=None,
        n_starts=100,
        n_bootstrap_starts=1,
        ci_level=0.95,
        init_grid=None,
    ):
        self.huber_delta = huber_delta
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.n_jobs = n_jobs
        self.n_starts = n_starts
        self.n_bootstrap_starts = n_bootstrap_starts
        self.ci_level = ci_level
        self.init_grid = init_grid

    def fit(self, n_params, n_tokens, loss) -> ChinchillaFit:
        """Fit to one point per (model size, token count); rows with non-positive or NaN values are dropped."""
        owner = "ChinchillaFit.fit"
        _check_hyperparameters(owner, self.huber_delta, self.n_bootstrap, self.ci_level)
        columns = _as_columns(owner, n_params=n_params, n_tokens=n_tokens, loss=loss)
        columns = _drop_invalid_rows(owner, columns, len(CHINCHILLA_PARAMS), CHINCHILLA_PARAMS)
        log_n, log_d, log_loss = (np.log(columns[name]) for name in ("n_params", "n_tokens", "loss"))

        grid = _grid_summary(n_params=columns["n_params"], n_tokens=columns["n_tokens"], loss=columns["loss"])
        return self._fit_law(owner, self._init_axes(owner), _chinchilla_design, (log_n, log_d), log_loss, grid)

    def _init_axes(self, owner: str) -> list[np.ndarray]:
        """The starting values of each of CHINCHILLA_PARAMS, from init_grid (default CHINCHILLA_INIT_GRID)."""
        grid = CHINCHILLA_INIT_GRID if self.init_grid is None else self.init_grid
        missing = set(CHINCHILLA_PARAMS) - set(grid)
        if missing:
            raise ValueError(f"{owner}: init_grid lacks values for {sorted(missing)}; it has {sorted(grid)}")
        return [np.asarray(grid[name], float) for name in CHINCHILLA_PARAMS]

    def _fit_law(self, owner: str, axes: list, design_fn, data: tuple, log_loss: np.ndarray, grid: dict):
        """Fit from the product of the starting `axes` with the design design_fn(*data), set the fitted
        attributes (grid_ is `grid`, the summary identification judges against), then bootstrap."""
        grid_points = np.array(list(itertools.product(*axes)))
        design = design_fn(*data)
        theta, objective, starts = _fit_from_grid(owner, grid_points, design, log_loss, self.huber_delta, self.n_starts)
        self.params_ = self._named(theta)
        for name, value in self.params_.items():
            setattr(self, f"{name}_", value)
        self.huber_loss_ = objective
        self.n_points_ = int(log_loss.size)
        self.grid_ = grid
        _set_bootstrap(self, owner, design_fn, data, log_loss, theta, starts)
        return self

    @staticmethod
    def _named(theta: np.ndarray) -> dict[str, float]:
        """Log-space optimiser vector → {E, A, B, alpha, beta}."""
        log_space = dict(zip(CHINCHILLA_PARAMS, theta, strict=True))
        return {
            "E": float(np.exp(log_space["e"])),
            "A": float(np.exp(log_space["a"])),
            "B": float(np.exp(log_space["b"])),
            "alpha": float(log_space["alpha"]),
            "beta": float(log_space["beta"]),
        }

    def predict(self, n_params, n_tokens) -> np.ndarray:
        """Predicted loss at each (N, D)."""
        _check_is_fitted(self, "params_")
        n_params, n_tokens = np.asarray(n_params, float), np.asarray(n_tokens, float)
        return self.E_ + self.A_ / n_params**self.alpha_ + self.B_ / n_tokens**self.beta_

    def frontier(self, flops, flops_per_param_token=6.0) -> ComputeOptimal:
        """Compute-optimal N*(C), D*(C) for C = flops_per_param_token·N·D (Hoffmann et al. eq. 4).

        N* = G·(C/k)^(β/(α+β)), D* = (C/k)^(α/(α+β)) / G with G = (αA/(βB))^(1/(α+β)).
        """
        _check_is_fitted(self, "params_")
        flops = np.asarray(flops, float)
        if np.any(~np.isfinite(flops) | (flops <= 0)):
            raise ValueError(f"ChinchillaFit.frontier: flops must be positive and finite, got {flops}")
        alpha, beta = self.alpha_, self.beta_
        scale = (alpha * self.A_ / (beta * self.B_)) ** (1 / (alpha + beta))  # G
        budget = flops / flops_per_param_token  # N·D
        n_params = scale * budget ** (beta / (alpha + beta))
        n_tokens = budget ** (alpha / (alpha + beta)) / scale
        return ComputeOptimal(flops, n_params, n_tokens, self.predict(n_params, n_tokens))

    def _extra_summary(self) -> dict:
        alpha, beta = self.params_["alpha"], self.params_["beta"]
        exponents = {"n_params_exponent": beta / (alpha + beta), "n_tokens_exponent": alpha / (alpha + beta)}
        return {
            "frontier": exponents,
            "huber_loss": self.huber_loss_,
            "n_bootstrap_failed": self.n_bootstrap_failed_,
            "grid": self.grid_,
            "identification": identification(self).to_dict(),
        }


# --------------------------------------------------------------------------------------------
# L(N, D) with repeated data: D replaced by the effective data D' of Muennighoff et al. 2023
#
# "Scaling Data-Constrained Language Models" (arXiv:2305.16264, eq. 5): with U unique tokens seen
# D / U times, the R = D / U − 1 repetitions are worth U·R*·(1 − e^(−R/R*)) fresh tokens, so
# D' = U + U·R*·(1 − e^(−R/R*)): repeated tokens lose value with a half-life set by R*, and D' → D as
# R* → ∞. Their fit gave R* ≈ 15 for English text. Only the data term is made effective (their N' term
# matters for models too large for their data, which a grid of rungs seldom trains).

LOG_R_STAR_BOUNDS = (-10.0, 30.0)  # log R*: beyond these D' no longer moves (all repeats worthless / as good as new)
R_STAR_INIT = (1.0, 4.0, 15.0, 60.0)  # Muennighoff et al.'s 15.4 and a decade around it


class _EffectiveDataDesign:
    """The terms a − α·log N, b − β·log D'(R*) and e of the data-constrained law; θ = (a, b, e, α, β, log R*)."""

    def __init__(self, log_n_params: np.ndarray, unique_tokens: np.ndarray, n_tokens: np.ndarray):
        self.log_n_params = log_n_params
        self.unique = np.minimum(
            unique_tokens, n_tokens
        )  # U_D = min(U, D): a point inside its first epoch repeats nothing
        self.repeats = n_tokens / self.unique - 1  # R_D ≥ 0

    def log_tokens(self, log_r_star: float) -> tuple[np.ndarray, np.ndarray]:
        """log D' and its derivative in log R*."""
        r_star = math.exp(min(max(log_r_star, LOG_R_STAR_BOUNDS[0]), LOG_R_STAR_BOUNDS[1]))
        x = self.repeats / r_star
        kept = -np.expm1(-x)  # 1 − e^(−R/R*)
        effective = self.unique * (1 + r_star * kept)
        d_effective = self.unique * r_star * (kept - x * np.exp(-x))  # dD'/d log R*
        inside = LOG_R_STAR_BOUNDS[0] < log_r_star < LOG_R_STAR_BOUNDS[1]
        return np.log(effective), (d_effective / effective if inside else np.zeros_like(effective))

    def loss(self, theta: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
        linear, log_r_star = theta[:5], float(theta[5])
        log_effective, d_log_effective = self.log_tokens(log_r_star)
        design = _chinchilla_design(self.log_n_params, log_effective)
        loss, d_terms = _huber_logsumexp((design @ linear).reshape(-1, log_y.size), log_y, delta)
        beta = linear[CHINCHILLA_PARAMS.index("beta")]
        return loss, np.append(design.T @ d_terms.ravel(), d_terms[1] @ (-beta * d_log_effective))


class DataConstrainedFit(ChinchillaFit):
    """L(N, D, U) = E + A/N^α + B/D'^β with D' the effective data of Muennighoff et al. 2023 (eq. 5).

    fit(n_params, n_tokens, loss, unique_tokens): unique_tokens is each point's unique data U (the tokens of
    the train set it drew from; epochs = D / U). R* (the repetitions after which repeated data has lost
    1 − 1/e of its value) is fitted with the other five; it is identified only by points that repeat their
    data, and by more than one unique size. Starting grid: ChinchillaFit's crossed with R_STAR_INIT.
    `frontier` is the compute-optimal allocation with unlimited unique data (D' = D).
    """

    formula = "L(N, D, U) = E + A / N^alpha + B / D'^beta, D' = U + U R* (1 - exp(-(D/U - 1) / R*))"
    param_names = ("E", "A", "B", "alpha", "beta", "R_star")
    R_star_: float

    def fit(self, n_params, n_tokens, loss, unique_tokens) -> DataConstrainedFit:  # type: ignore[override]
        """Fit to one point per (N, D, U); rows with non-positive or NaN values are dropped."""
        owner = "DataConstrainedFit.fit"
        names = (*CHINCHILLA_PARAMS, "log_R_star")
        _check_hyperparameters(owner, self.huber_delta, self.n_bootstrap, self.ci_level)
        columns = _as_columns(owner, n_params=n_params, n_tokens=n_tokens, loss=loss, unique_tokens=unique_tokens)
        columns = _drop_invalid_rows(owner, columns, len(names), names)
        log_n, log_loss = np.log(columns["n_params"]), np.log(columns["loss"])
        data = (log_n, columns["unique_tokens"], columns["n_tokens"])
        axes = [*self._init_axes(owner), np.log(R_STAR_INIT)]
        grid = _grid_summary(
            n_params=columns["n_params"],
            n_tokens=columns["n_tokens"],
            loss=columns["loss"],
            unique_tokens=columns["unique_tokens"],
            epochs=columns["n_tokens"] / columns["unique_tokens"],
        )
        return self._fit_law(owner, axes, _EffectiveDataDesign, data, log_loss, grid)

    @staticmethod
    def _named(theta: np.ndarray) -> dict[str, float]:
        log_r_star = min(max(float(theta[5]), LOG_R_STAR_BOUNDS[0]), LOG_R_STAR_BOUNDS[1])
        return {**ChinchillaFit._named(theta[:5]), "R_star": math.exp(log_r_star)}

    def effective_tokens(self, n_tokens, unique_tokens) -> np.ndarray:
        """D' at each (D, U) under the fitted R*."""
        _check_is_fitted(self, "params_")
        n_tokens, unique_tokens = np.broadcast_arrays(np.asarray(n_tokens, float), np.asarray(unique_tokens, float))
        design = _EffectiveDataDesign(np.zeros(n_tokens.shape), unique_tokens, n_tokens)
        return np.exp(design.log_tokens(math.log(self.R_star_))[0])

    def predict(self, n_params, n_tokens, unique_tokens=None) -> np.ndarray:
        """Predicted loss at each (N, D, U); unique_tokens None: no repetition (D' = D)."""
        tokens = n_tokens if unique_tokens is None else self.effective_tokens(n_tokens, unique_tokens)
        return super().predict(n_params, tokens)


# --------------------------------------------------------------------------------------------
# y = E + A·x^(−γ): L(C), L(N) or L(D) with an irreducible term


class SaturatingPowerLaw(_Estimator):
    """y = E + A·x^(−γ), fitted in log space with a Huber loss, as ChinchillaFit but in one variable.

    The starting grid is built from the data: γ from gamma_grid, E as fractions of min(y), and for each
    pair A from the median of (y − E)·x^γ, so it works for x in parameters, tokens or FLOPs alike.
    """

    formula = "y = E + A * x^(-gamma)"
    param_names = ("E", "A", "gamma")
    gamma_grid = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
    floor_fractions = (0.01, 0.25, 0.5, 0.75, 0.9, 0.97)  # E / min(y)

    def __init__(
        self, huber_delta=1e-3, n_bootstrap=1000, seed=0, n_jobs=None, n_starts=20, n_bootstrap_starts=1, ci_level=0.95
    ):
        self.huber_delta = huber_delta
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.n_jobs = n_jobs
        self.n_starts = n_starts
        self.n_bootstrap_starts = n_bootstrap_starts
        self.ci_level = ci_level

    def fit(self, x, y) -> SaturatingPowerLaw:
        """Fit y(x); rows with non-positive or NaN values are dropped with a warning."""
        owner = f"{type(self).__name__}.fit"
        _check_hyperparameters(owner, self.huber_delta, self.n_bootstrap, self.ci_level)
        columns = _drop_invalid_rows(owner, _as_columns(owner, x=x, y=y), len(SATURATING_PARAMS), SATURATING_PARAMS)
        log_x, log_y = np.log(columns["x"]), np.log(columns["y"])

        design = _saturating_design(log_x)
        grid_points = self._data_grid(log_x, log_y)
        theta, objective, starts = _fit_from_grid(owner, grid_points, design, log_y, self.huber_delta, self.n_starts)

        self.params_ = self._named(theta)
        self.E_, self.A_, self.gamma_ = (self.params_[name] for name in self.param_names)
        self.huber_loss_ = objective
        self.n_points_ = int(log_y.size)
        self.grid_ = _grid_summary(x=columns["x"], y=columns["y"])

        _set_bootstrap(self, owner, _saturating_design, (log_x,), log_y, theta, starts)
        return self

    def _data_grid(self, log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
        """Starting points (a, e, gamma) scaled to the data; see the class docstring."""
        y, floor = np.exp(log_y), np.exp(log_y.min())
        points = []
        for gamma, fraction in itertools.product(self.gamma_grid, self.floor_fractions):
            irreducible = fraction * floor
            log_amplitude = float(np.median(np.log(y - irreducible) + gamma * log_x))
            start = {"a": log_amplitude, "e": math.log(irreducible), "gamma": gamma}
            points.append([start[name] for name in SATURATING_PARAMS])
        return np.array(points)

    @staticmethod
    def _named(theta: np.ndarray) -> dict[str, float]:
        log_space = dict(zip(SATURATING_PARAMS, theta, strict=True))
        return {
            "E": float(np.exp(log_space["e"])),
            "A": float(np.exp(log_space["a"])),
            "gamma": float(log_space["gamma"]),
        }

    def predict(self, x) -> np.ndarray:
        _check_is_fitted(self, "params_")
        return self.E_ + self.A_ * np.asarray(x, float) ** (-self.gamma_)

    def _extra_summary(self) -> dict:
        return {
            "huber_loss": self.huber_loss_,
            "n_bootstrap_failed": self.n_bootstrap_failed_,
            "grid": self.grid_,
            "identification": identification(self).to_dict(),
        }


# --------------------------------------------------------------------------------------------
# y = A·x^k: a pure power law, ordinary least squares on log-log axes


class LogLogOLS(_Estimator):
    """y = A·x^k by statsmodels OLS of log y on log x; intervals are the OLS t intervals (A's mapped by exp)."""

    formula = "y = A * x^k"
    param_names = ("A", "k")

    def __init__(self, ci_level=0.95):
        self.ci_level = ci_level

    def fit(self, x, y) -> LogLogOLS:
        owner = "LogLogOLS.fit"
        columns = _drop_invalid_rows(owner, _as_columns(owner, x=x, y=y), 3, ("log A", "k", "residual variance"))
        log_x, log_y = np.log(columns["x"]), np.log(columns["y"])
        result = sm.OLS(log_y, sm.add_constant(log_x)).fit()
        (log_a, k), ((log_a_lo, log_a_hi), (k_lo, k_hi)) = result.params, result.conf_int(alpha=1 - self.ci_level)
        log_a_se, k_se = result.bse
        self.A_, self.k_ = float(np.exp(log_a)), float(k)
        self.params_ = {"A": self.A_, "k": self.k_}
        self.ci_ = {"A": (float(np.exp(log_a_lo)), float(np.exp(log_a_hi))), "k": (float(k_lo), float(k_hi))}
        self.se_ = {"log_A": float(log_a_se), "k": float(k_se)}
        self.r_squared_ = float(result.rsquared)
        self.n_points_ = int(log_y.size)
        self.grid_ = _grid_summary(x=columns["x"], y=columns["y"])
        return self

    def predict(self, x) -> np.ndarray:
        _check_is_fitted(self, "params_")
        return self.A_ * np.asarray(x, float) ** self.k_

    def _extra_summary(self) -> dict:
        return {"r_squared": self.r_squared_, "grid": self.grid_, "identification": identification(self).to_dict()}


# --------------------------------------------------------------------------------------------
# Backtest: does a law fitted on small models predict the largest ones?


@dataclasses.dataclass(frozen=True)
class BacktestResult:
    """Per-point and summary relative errors ((predicted − observed) / observed) on the held-out rungs."""

    points: pd.DataFrame  # n_params, n_tokens, loss, predicted, relative_error
    mean_abs_relative_error: float
    max_abs_relative_error: float
    n_train: int
    n_holdout: int
    holdout_n_params: tuple[float, ...]
    fit: ChinchillaFit


def backtest(n_params, n_tokens, loss, n_holdout_rungs=1, estimator=None, unique_tokens=None) -> BacktestResult:
    """Fit L(N, D) without the n_holdout_rungs largest model sizes, then predict the points held out.

    estimator: an unfitted ChinchillaFit (or DataConstrainedFit, which needs unique_tokens) whose
    hyperparameters are copied; default ChinchillaFit(n_bootstrap=0).
    """
    owner = "backtest"
    data = {"n_params": n_params, "n_tokens": n_tokens, "loss": loss}
    if unique_tokens is not None:
        data["unique_tokens"] = unique_tokens
    columns = _as_columns(owner, **data)
    columns = _drop_invalid_rows(owner, columns, len(CHINCHILLA_PARAMS), CHINCHILLA_PARAMS)
    rungs = np.unique(columns["n_params"])
    if not 1 <= n_holdout_rungs < rungs.size:
        raise ValueError(
            f"{owner}: n_holdout_rungs={n_holdout_rungs} must be between 1 and the number of "
            f"model sizes minus one ({rungs.size - 1})"
        )
    held_out_sizes = rungs[-n_holdout_rungs:]
    held_out = np.isin(columns["n_params"], held_out_sizes)
    template = ChinchillaFit(n_bootstrap=0) if estimator is None else estimator
    law = type(template)(**template.get_params())  # a fresh copy, so the caller's estimator is untouched
    law.fit(*(values[~held_out] for values in columns.values()))

    points = pd.DataFrame({name: values[held_out] for name, values in columns.items()})
    points["predicted"] = law.predict(*(points[name].to_numpy() for name in columns if name != "loss"))
    points["relative_error"] = (points["predicted"] - points["loss"]) / points["loss"]
    abs_error = points["relative_error"].abs()
    return BacktestResult(
        points=points,
        mean_abs_relative_error=float(abs_error.mean()),
        max_abs_relative_error=float(abs_error.max()),
        n_train=int((~held_out).sum()),
        n_holdout=int(held_out.sum()),
        holdout_n_params=tuple(float(n) for n in held_out_sizes),
        fit=law,
    )


# --------------------------------------------------------------------------------------------
# Is the law identified from this grid?
#
# The optimiser has no box bounds (log E, log A, log B, α, β are free), so the bounds that matter are the
# law's own: E, A, B > 0 (reached as their logs run off to −∞), exponents ≥ 0, and E below the lowest observed
# value. A parameter there, an interval wider than an order of magnitude, or a grid with too few distinct
# values of a variable, means the grid cannot pin the law, and nothing derived from it (N*(C), exponents) is
# a finding.

AT_BOUND = 1e-3  # a floor or a term below 0.1 % of the lowest observed value has run to its bound 0
SPAN_RATIO = 10.0  # hi / lo above this: the interval spans more than an order of magnitude
FLAT_WIDTH = 1e-3  # relative interval width below this, while another parameter's is FLAT_CONTRAST× wider:
FLAT_CONTRAST = 100.0  # the bootstrap refits did not move the parameter (a flat direction, as the demo's E)
ADVICE = types.MappingProxyType(
    {
        "floor": "a wider range of scales (larger rungs and budgets), so that the curve bends toward its floor",
        "n_params": "more model sizes (at least 3, better 5 or more) over a wider range of N",
        "n_tokens": "more token budgets (at least 3) over a wider range of D",
        "x": "more points over a wider range of x",
        "repeats": "points that repeat their data (a budget.unique_molecules axis with budgets of several epochs)",
    }
)


@dataclasses.dataclass(frozen=True)
class Identification:
    """Whether a fitted law is pinned by its grid; problems name the parameter, what is wrong, value and interval."""

    identified: bool
    problems: tuple[dict, ...]
    what_would_identify: str

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    def sentence(self, law: str = "the law") -> str:
        if self.identified:
            return (
                f"{law[0].upper() + law[1:]} is identified: no parameter at a bound, every interval within an "
                "order of magnitude."
            )
        listed = "; ".join(f"{p['parameter']}: {p['problem']}" for p in self.problems)
        return (
            f"{law[0].upper() + law[1:]} is not identified from this grid ({listed}). What would identify it: "
            f"{self.what_would_identify}."
        )


def identification(law) -> Identification:
    """Identification of a fitted ChinchillaFit, SaturatingPowerLaw, DownstreamPowerLaw or LogLogOLS."""
    _check_is_fitted(law, "params_")
    if hasattr(law, "law_") and hasattr(law, "asymptote_"):  # DownstreamPowerLaw: judge its gap law
        inner = identification(law.law_)
        renamed = tuple(
            {**p, "parameter": "asymptote" if p["parameter"] == "E" else p["parameter"]} for p in inner.problems
        )
        return dataclasses.replace(inner, problems=renamed)
    if isinstance(law, ChinchillaFit):
        terms = {"n_params": ("A", "alpha", "N", 3), "n_tokens": ("B", "beta", "D", 3)}
        floor_of = law.grid_["loss"]["min"]
    elif isinstance(law, SaturatingPowerLaw):
        terms = {"x": ("A", "gamma", "x", 4)}  # three parameters and one residual
        floor_of = law.grid_["y"]["min"]
    elif isinstance(law, LogLogOLS):
        return _identify_loglog(law)
    else:
        raise TypeError(f"identification: no rule for {type(law).__name__}")
    problems: list[tuple[str, str, str]] = []  # (parameter, problem, advice key)
    E = law.params_["E"]
    if E < AT_BOUND * floor_of:
        problems.append(
            ("E", f"at its lower bound 0 (E = {E:.2g}, below 0.1 % of the lowest value {floor_of:.3g})", "floor")
        )
    elif E > (1 - AT_BOUND) * floor_of:
        problems.append(("E", f"at its upper bound, the lowest observed value {floor_of:.3g}", "floor"))
    elif (interval := _interval(law, "E")) is not None and interval[1] >= floor_of:
        # resamples put the floor at or above points that were measured: the curve has not bent toward a
        # floor below the data, and E is only where its lowest points stopped
        problems.append(
            (
                "E",
                f"its interval {interval[0]:.3g}…{interval[1]:.3g} reaches the lowest observed value "
                f"{floor_of:.3g}: the floor cannot be told from the last points",
                "floor",
            )
        )
    for column, (amplitude, exponent, symbol, n_needed) in terms.items():
        grid = law.grid_[column]
        if grid["n_distinct"] < n_needed:
            problems.append(
                (
                    f"{amplitude}, {exponent}",
                    f"only {grid['n_distinct']} distinct {symbol}; the {symbol} term needs at least {n_needed}",
                    column,
                )
            )
        value = law.params_[exponent]
        if value < AT_BOUND:
            problems.append(
                (
                    exponent,
                    f"at its lower bound 0 ({exponent} = {value:.2g}): the {symbol} term is a "
                    "constant, inseparable from E",
                    column,
                )
            )
        term_at_grid = law.params_[amplitude] * grid["min"] ** -value
        if term_at_grid < AT_BOUND * floor_of:
            problems.append(
                (
                    amplitude,
                    f"the {symbol} term is below 0.1 % of the lowest value across the grid ({term_at_grid:.2g})",
                    column,
                )
            )
        problems += _interval_problems(law, exponent, column, exponent_like=True)
        problems += _term_interval_problems(law, amplitude, exponent, grid, symbol, column)
    problems += _interval_problems(law, "E", "floor", exponent_like=False)
    advice = {
        "E": "floor",
        **{a: c for c, (a, _, _, _) in terms.items()},
        **{e: c for c, (_, e, _, _) in terms.items()},
    }
    if isinstance(law, DataConstrainedFit):
        problems += _repeat_problems(law)
        advice["R_star"] = "repeats"
    problems += _flat_directions(law, advice)
    return _identification(problems)


def _repeat_problems(law: DataConstrainedFit) -> list[tuple[str, str, str]]:
    """R* needs points past their first epoch, and is at a bound when D' stops moving with it."""
    epochs = law.grid_["epochs"]
    if epochs["max"] <= 1:
        return [("R_star", f"no point repeats its data (at most {epochs['max']:.2g} epochs)", "repeats")]
    log_r_star = math.log(law.params_["R_star"])
    if not LOG_R_STAR_BOUNDS[0] + 1 < log_r_star < LOG_R_STAR_BOUNDS[1] - 1:
        return [("R_star", f"at a bound of its range (R* = {law.params_['R_star']:.3g})", "repeats")]
    return _interval_problems(law, "R_star", "repeats", exponent_like=False)


def _interval(law, name: str) -> tuple[float, float] | None:
    lo, hi = law.ci_.get(name, (math.nan, math.nan))
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _interval_problems(law, name: str, advice: str, exponent_like: bool) -> list[tuple[str, str, str]]:
    """An exponent's interval crossing 0, or any interval whose ends differ by more than SPAN_RATIO."""
    interval = _interval(law, name)
    if interval is None:
        return []
    lo, hi = interval
    if exponent_like and lo <= 0 <= hi:
        return [(name, f"its interval {lo:.3g}…{hi:.3g} crosses 0", advice)]
    if lo > 0 and hi / lo > SPAN_RATIO:
        return [(name, f"its interval {lo:.3g}…{hi:.3g} spans more than an order of magnitude", advice)]
    return []


def _term_interval_problems(
    law, amplitude: str, exponent: str, grid: dict, symbol: str, advice: str
) -> list[tuple[str, str, str]]:
    """An amplitude is judged by its term at the grid's geometric middle (A itself is the term at x = 1, far off
    any grid, and its interval is wide even for a well-pinned law)."""
    samples = getattr(law, "bootstrap_", pd.DataFrame()).dropna()
    if len(samples) < 2:
        return []
    middle = math.sqrt(grid["min"] * grid["max"])
    term = samples[amplitude] * middle ** -samples[exponent]
    tail = 100 * (1 - law.ci_level) / 2
    lo, hi = np.percentile(term, [tail, 100 - tail])
    if lo > 0 and hi / lo > SPAN_RATIO:
        return [
            (
                amplitude,
                f"the {symbol} term at the grid's middle has interval {lo:.3g}…{hi:.3g}, more than an "
                "order of magnitude",
                advice,
            )
        ]
    return []


def _flat_directions(law, advice: dict[str, str]) -> list[tuple[str, str, str]]:
    """Parameters whose bootstrap interval barely moved while another's is FLAT_CONTRAST× wider."""
    widths = {}
    for name in advice:
        interval = _interval(law, name)
        value = abs(law.params_[name])
        if interval is not None and value > 0:
            widths[name] = (interval[1] - interval[0]) / value
    out = []
    for name, width in widths.items():
        others = [w for other, w in widths.items() if other != name]
        if width < FLAT_WIDTH and others and max(others) > FLAT_CONTRAST * max(width, 1e-300):
            out.append(
                (
                    name,
                    f"its bootstrap interval barely moved (relative width {width:.1g}, another "
                    f"parameter's is {max(others):.2g}): a direction the data do not pin",
                    advice[name],
                )
            )
    return out


def _identify_loglog(law: LogLogOLS) -> Identification:
    problems = []
    if law.grid_["x"]["n_distinct"] < 3:
        problems.append(("k", f"only {law.grid_['x']['n_distinct']} distinct x; a line with an interval needs 3", "x"))
    lo, hi = law.ci_["k"]
    if lo <= 0 <= hi:
        problems.append(("k", f"its interval {lo:.3g}…{hi:.3g} crosses 0", "x"))
    elif min(abs(lo), abs(hi)) > 0 and max(abs(lo), abs(hi)) / min(abs(lo), abs(hi)) > SPAN_RATIO:
        problems.append(("k", f"its interval {lo:.3g}…{hi:.3g} spans more than an order of magnitude", "x"))
    return _identification(problems)


def _identification(problems: list[tuple[str, str, str]]) -> Identification:
    advice = list(dict.fromkeys(ADVICE[key] for _, _, key in problems))
    return Identification(
        identified=not problems,
        problems=tuple({"parameter": name, "problem": text} for name, text, _ in problems),
        what_would_identify="; ".join(advice),
    )
