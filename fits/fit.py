"""The `fit` stage: a run directory's result tables in, results/fits.json and results/fits.parquet out.

`fit_run(run_dir)` answers the run's question with the estimators of this package, in this order:
1. which checkpoints count: diverged trials and failed measurements are left out, each with a note;
2. L(N, D) (ChinchillaFit) on every finished checkpoint, whether the grid identifies it, its compute-optimal
   frontier (only when it does), a back-test that refits without the largest rungs and predicts them, and
   L(C) on the compute frontier and on all points;
3. each downstream task and mode along one axis at a time (N at fixed D, D at fixed N, C along the compute
   frontier): a run-level slope per decade read as improving / degrading / plateau / inconclusive against an
   equivalence margin (fits.verdicts), with one Holm correction over every trend of the run;
4. the best pretrained checkpoint per task, chosen on the validation metric and reported on test, against the
   Morgan-fingerprint and random-init baselines split seed by split seed (fits.comparison), Holm-corrected;
5. proxies judged as a user would use them (fits.proxies): only what is measured before fine-tuning enters the
   leave-one-size-out prediction tests (Holm-corrected) and the selection regret; rank correlations, and
   everything measured at the fine-tuned weights (ft_*), are descriptive;
6. per task and mode, the two-step task ladder (fits.taskladder) predicting the largest rung from the smaller;
7. beside each task's verdicts, its characteristics (tasks.parquet), and per mode the tasks' N slopes (in
   plateau margins per decade) against them: descriptive, no p-values;
8. `findings`: plain sentences, verdict first, built from the numbers above and nothing else, each with the
   anchor of the figure or table of the report it rests on (`finding_links`).
Whatever a small run cannot support becomes {"status": "skipped", "reason": ...}, never an error.

Its inputs (the config, the tables, the checkpoints and measurements that count) come from
`RunDir.fit_inputs()`, the same call the report makes. Run-level statistics use the per-seed rows of
finetune.parquet (a trial is the run, a split seed the paired block), not the per-checkpoint means.
`fit_table(path, law)` fits one law, and `trend_table(path, ...)` judges one trend, on any table
(`clmscale fit --table`). No Ray and no torch here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clmscale.engine.config import FitsConfig
from clmscale.engine.files import json_safe
from clmscale.engine.rundir import PRETRAINED_MODES, TABLES, RunDir
from clmscale.fits.comparison import best_on_validation, paired_difference
from clmscale.fits.correlate import LABELS, proxy_correlations
from clmscale.fits.downstream import DownstreamPowerLaw, format_scale, format_with_uncertainty
from clmscale.fits.powerlaw import (
    ChinchillaFit,
    DataConstrainedFit,
    LogLogOLS,
    SaturatingPowerLaw,
    backtest,
    identification,
)
from clmscale.fits.proxies import LeaveOneSizeOut, leave_one_size_out, proxy_timing, selection_regret
from clmscale.fits.taskladder import BOUNDED_METRICS, TaskLadder, task_ladder_backtest
from clmscale.fits.verdicts import (
    CORRECTIONS,
    METRIC_WORDS,
    PLATEAU_MARGINS,
    UNTESTED,
    AxisTrend,
    PlateauMargin,
    TrendVerdict,
    adjust_pvalues,
    correct,
    plateau_margin,
    scaling_verdicts,
    trend_on_table,
    verdict_counts,
)

log = logging.getLogger(__name__)

MODES = {"finetune": "fine-tuned", "probe": "linear probe"}
BASELINES = {
    "morgan_fp": "Morgan fingerprints",
    "ecfp4_rf": "ECFP4 + random forest",
    "rdkit2d_rf": "RDKit 2D descriptors + random forest",
    "random_init": "random-init model",
}
# the three axes of a downstream trend: (symbol, words, column, what is held fixed)
AXES = {
    "n": ("N", "non-embedding parameters", "n_params_non_embedding", "N at fixed D"),
    "d": ("D", "tokens", "tokens", "D at fixed N"),
    "c": ("C", "FLOPs", "flops", "C along the compute frontier"),
}
PER_PARAM = "_per_param"  # a Hessian trace divided by hessian_dim: comparable across model sizes
SCALE_PROXIES = ("n_params", "tokens", "flops")
SHARPNESS = ("eps_sharpness", "adaptive_sharpness")  # landscape.parquet's sharpness columns
PROXIES = (
    *SCALE_PROXIES,
    "pretrain_val_loss",
    "lambda_max",
    "trace",
    "trace_per_param",
    *SHARPNESS,
    "pt_task_lambda_max",
    "pt_task_trace",
    "pt_task_trace_per_param",
    "pt_task_eps_sharpness",
    "pt_task_adaptive_sharpness",
    "ft_lambda_max",
    "ft_trace",
    "ft_trace_per_param",
)
PROXY_LABELS = {
    **LABELS,
    "trace_per_param": "Hessian trace per parameter",
    "pt_task_lambda_max": "task-loss Hessian λmax at the pretrained weights",
    "pt_task_trace": "task-loss Hessian trace at the pretrained weights",
    "pt_task_trace_per_param": "task-loss Hessian trace per parameter at the pretrained weights",
    "pt_task_eps_sharpness": "task-loss ε-sharpness at the pretrained weights",
    "pt_task_adaptive_sharpness": "task-loss adaptive sharpness at the pretrained weights",
    "ft_trace_per_param": "fine-tuning-loss Hessian trace per parameter",
}
# A proxy picks the checkpoint where it is lowest: lower pretraining loss, and flatter (lower curvature or
# sharpness) as the flat-minima hypothesis has it. Fixed in advance: a direction read off the test split (or
# off the validation metric of the very checkpoints it then picks among) would be selection on the outcome.
SELECT_BY = "min"
LEVEL = 0.95  # every interval and test
CORRECTION = "holm"  # family-wise error: each definite statement holds on its own, whatever else is tested
PROXY_BOOTSTRAP = 2000  # resamples of held-out sizes: cheap (sums of squares), so not tied to fits.n_bootstrap
MIN_LAW_POINTS = 5  # distinct (N, D) for L(N, D): one per parameter
MIN_CURVE_POINTS = 4  # distinct x for a three-parameter one-variable law, one more than its parameters
FRONTIER_DECADES_BEYOND = 2  # the frontier curve runs from the smallest measured C to 100x the largest
# what a fit may raise on data it cannot support; anything else is a bug and is not caught
FIT_ERRORS = (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError)


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """FitsConfig plus the knobs that only change run time."""

    huber_delta: float
    n_bootstrap: int
    seed: int
    holdout_rungs: int
    annealed_only: bool = True  # recorded here; RunDir.fit_inputs applies it
    data_law: str = "tokens"  # tokens: L(N, D); effective: L(N, D') with repeated data discounted
    data_measure: str = "tokens"  # D counts tokens, molecules or characters seen (D_COLUMNS)
    plateau_margin: dict[str, float] = dataclasses.field(default_factory=dict)  # metric -> margin per decade
    slope_method: str = "cluster_jackknife"  # a key of fits.slopes.METHODS: the run-level interval of a slope
    n_jobs: int | None = None  # bootstrap processes; None: one per CPU
    n_starts: int = 100  # ChinchillaFit's screened starting points
    level: float = LEVEL
    correction: str = CORRECTION

    @classmethod
    def from_config(cls, fits: FitsConfig, **overrides) -> FitSettings:
        values = {**fits.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)


def metric_label(metric: str) -> str:
    return METRIC_WORDS.get(metric, metric)


def downstream_anchor(task: str) -> str:
    """The report's figure (and HTML anchor) of one task's downstream results."""
    return "downstream_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", str(task)).strip("_") or "task")


# --------------------------------------------------------------------------------------------
# 2. Pretraining loss: L(N, D), its frontier and back-test, L(C)


@contextlib.contextmanager
def _kept_warnings(notes: list[str], what: str):
    """Collect the warnings of one fit into `notes`, which go into fits.json next to the fit; log them once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        log.warning("%s: %s (kept in fits.json)", what, warning.message)
        notes.append(str(warning.message))


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _fitted(estimator, *data) -> dict:
    """estimator.fit(*data).to_dict() with status, identification and warnings, or skipped with the reason."""
    notes: list[str] = []
    try:
        with _kept_warnings(notes, type(estimator).__name__):
            estimator.fit(*data)
    except FIT_ERRORS as err:
        return {**skipped(f"{type(err).__name__}: {err}"), "warnings": notes}
    found = identification(estimator)
    return {
        "status": "ok",
        **estimator.to_dict(),
        "identified": found.identified,
        "identification": {**found.to_dict(), "sentence": found.sentence(estimator.formula)},
        "warnings": notes,
    }


def _chinchilla(s: FitSettings, n_bootstrap: int | None = None) -> ChinchillaFit:
    """The L(N, D) estimator of `fits.data_law`: ChinchillaFit, or DataConstrainedFit for `effective`."""
    law = DataConstrainedFit if s.data_law == "effective" else ChinchillaFit
    return law(
        huber_delta=s.huber_delta,
        n_bootstrap=s.n_bootstrap if n_bootstrap is None else n_bootstrap,
        seed=s.seed,
        n_jobs=s.n_jobs,
        n_starts=s.n_starts,
    )


D_COLUMNS = {"tokens": "tokens", "molecules": "molecules_seen", "characters": "characters_seen"}  # fits.data_measure


def _law_data(points: pd.DataFrame, s: FitSettings) -> tuple[np.ndarray, ...]:
    """(N, D, loss), and each point's unique data (in D's unit) when the law is the data-constrained one; D in
    the unit of `fits.data_measure`."""
    n, tokens, loss = (points[name].to_numpy(float) for name in ("n_params_non_embedding", "tokens", "val_loss"))
    d = _d_of(points, s.data_measure)
    unique = (points["unique_tokens"].to_numpy(float) * d / tokens,) if s.data_law == "effective" else ()
    return (n, d, loss, *unique)


def _d_of(points: pd.DataFrame, measure: str) -> np.ndarray:
    column = D_COLUMNS[measure]
    if column not in points.columns:
        return np.full(len(points), np.nan)
    return points[column].to_numpy(float)


def fit_loss_law(points: pd.DataFrame, s: FitSettings) -> dict:
    """L(N, D) on (n_params_non_embedding, tokens, val_loss) of every usable checkpoint (with unique_tokens for
    fits.data_law: effective); N*(C), D*(C) only when the grid identifies the law (a frontier derived from an
    unpinned law is not a number to print)."""
    data = _law_data(points, s)
    n, d = data[0], data[1]
    if not np.isfinite(d).all():
        return skipped(
            f"fits.data_measure is {s.data_measure}, and {int((~np.isfinite(d)).sum())} checkpoints have no "
            f"{D_COLUMNS[s.data_measure]} (trained without a prepared data directory, or before it was recorded)"
        )
    n_distinct = len(set(zip(n, d, strict=True)))
    if n_distinct < MIN_LAW_POINTS:
        return skipped(
            f"{n_distinct} distinct (N, D) points; L(N, D) has 5 parameters and needs at least {MIN_LAW_POINTS}"
        )
    if np.unique(n).size < 2 or np.unique(d).size < 2:
        return skipped(
            f"{np.unique(n).size} model size(s) and {np.unique(d).size} token count(s): "
            "L(N, D) needs at least 2 of each"
        )
    law = _chinchilla(s)
    result = _fitted(law, *data)
    if result["status"] != "ok":
        return result
    result.update(n_distinct_points=n_distinct, n_rungs=int(np.unique(n).size), data_measure=s.data_measure)
    result["in_sample"] = in_sample_errors(n, data[2], law.predict(*data[:2], *data[3:]))
    if result["identified"]:
        result["frontier"] = {"status": "ok", **result["frontier"], **_frontier(law, points, s.data_measure)}
    else:
        result["frontier"] = skipped(
            "L(N, D) is not identified from this grid, so no compute-optimal allocation "
            f"is derived from it; what would identify it: "
            f"{result['identification']['what_would_identify']}"
        )
    return result


def in_sample_errors(n_params: np.ndarray, loss: np.ndarray, predicted: np.ndarray) -> dict:
    """How far the fitted law misses the points it was fitted on: the mean and largest absolute relative error
    and, per model size, the mean signed one ((predicted − loss) / loss, as the back-test counts it). Intervals
    say how well the data pin the parameters *if the form is right*; these say how closely the form follows the
    data (a mean miss far above the loss's noise, of opposite signs at the small and the large sizes, is the
    shape a plateau that larger models leave sooner gives it: tests/test_fits.py)."""
    relative = predicted / loss - 1
    by_size = pd.Series(relative).groupby(n_params).mean()
    return {
        "mean_abs_relative_error": float(np.abs(relative).mean()),
        "max_abs_relative_error": float(np.abs(relative).max()),
        "by_n_params": {"n_params": by_size.index.tolist(), "mean_relative_error": by_size.tolist()},
    }


def _frontier(law: ChinchillaFit, points: pd.DataFrame, measure: str = "tokens") -> dict:
    """N*(C), D*(C) over the measured range of C and two decades beyond, with bootstrap intervals of the exponents.

    C is taken as flops_per_param_token·N·D with the constant measured on this run (the median of
    flops / (N·D) over its checkpoints; 6 when no FLOPs were recorded), so the curve shares the FLOPs axis of
    the data instead of assuming the 6·N·D of Kaplan et al. for models whose embeddings and attention count.
    """
    n, flops = (points[name].to_numpy(float) for name in ("n_params_non_embedding", "flops"))
    d = _d_of(points, measure)
    ratio = flops / (n * d)
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    per_param_token = float(np.median(ratio)) if ratio.size else 6.0
    measured = per_param_token * n * d
    grid = np.logspace(math.log10(measured.min()), math.log10(measured.max()) + FRONTIER_DECADES_BEYOND, 25)
    curve = law.frontier(grid, flops_per_param_token=per_param_token)
    out = {
        "flops_per_param_token": per_param_token,
        "flops": curve.flops,
        "n_params": curve.n_params,
        "n_tokens": curve.n_tokens,
        "loss": curve.loss,
    }
    samples = law.bootstrap_.dropna()
    if len(samples) >= 2:
        tail = 100 * (1 - law.ci_level) / 2
        share = samples["beta"] / (samples["alpha"] + samples["beta"])
        out["n_params_exponent_ci"] = list(np.percentile(share, [tail, 100 - tail]))
        out["n_tokens_exponent_ci"] = list(np.percentile(1 - share, [tail, 100 - tail]))
    return out


def backtest_loss_law(points: pd.DataFrame, s: FitSettings) -> dict:
    """Refit L(N, D) without the holdout_rungs largest model sizes and predict their losses."""
    if s.holdout_rungs == 0:
        return skipped("fits.holdout_rungs is 0")
    n = points["n_params_non_embedding"].to_numpy(float)
    rungs = np.unique(n)
    if rungs.size - s.holdout_rungs < 2:
        return skipped(
            f"{rungs.size} model size(s): holding out the {s.holdout_rungs} largest leaves fewer than 2 to fit"
        )
    train = points[n < rungs[-s.holdout_rungs]]
    n_distinct = len(set(zip(train["n_params_non_embedding"], train["tokens"], strict=True)))
    if n_distinct < MIN_LAW_POINTS:
        return skipped(
            f"without the {s.holdout_rungs} largest rung(s) {n_distinct} distinct (N, D) points are "
            f"left; L(N, D) needs at least {MIN_LAW_POINTS}"
        )
    notes: list[str] = []
    try:
        with _kept_warnings(notes, "backtest"):
            _, d, loss, *unique = _law_data(points, s)
            result = backtest(
                n,
                d,
                loss,
                n_holdout_rungs=s.holdout_rungs,
                estimator=_chinchilla(s, n_bootstrap=0),
                unique_tokens=unique[0] if unique else None,
            )
    except FIT_ERRORS as err:
        return {**skipped(f"{type(err).__name__}: {err}"), "warnings": notes}
    return {
        "status": "ok",
        "holdout_rungs": s.holdout_rungs,
        "holdout_n_params": list(result.holdout_n_params),
        "n_train": result.n_train,
        "n_holdout": result.n_holdout,
        "mean_abs_relative_error": result.mean_abs_relative_error,
        "max_abs_relative_error": result.max_abs_relative_error,
        "params": result.fit.params_,
        "points": result.points.to_dict("records"),
        "warnings": notes,
    }


def compute_frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The checkpoints no cheaper checkpoint beats: the lower envelope of loss against C."""
    ordered = points.sort_values(["flops", "val_loss"])
    best_so_far = ordered["val_loss"].cummin().shift(fill_value=np.inf)
    return ordered[ordered["val_loss"] < best_so_far].reset_index(drop=True)


def fit_compute_law(points: pd.DataFrame, s: FitSettings) -> dict:
    """L(C) = E + A·C^(−γ) and L ∝ C^k, each on the compute frontier and on all points."""
    with_flops = points[np.isfinite(points["flops"].to_numpy(float)) & (points["flops"].to_numpy(float) > 0)]
    if with_flops.empty:
        return skipped("no checkpoint has a recorded FLOP count")
    frontier = compute_frontier(with_flops)
    out = {
        "status": "ok",
        "n_points": len(with_flops),
        "frontier_points": frontier[
            ["trial_id", "rung", "n_params_non_embedding", "tokens", "flops", "val_loss"]
        ].to_dict("records"),
    }
    for which, data in (("frontier", frontier), ("all", with_flops)):
        flops, loss = data["flops"].to_numpy(float), data["val_loss"].to_numpy(float)
        n_x = np.unique(flops).size
        out[f"saturating_{which}"] = (
            _fitted(
                SaturatingPowerLaw(huber_delta=s.huber_delta, n_bootstrap=s.n_bootstrap, seed=s.seed, n_jobs=s.n_jobs),
                flops,
                loss,
            )
            if n_x >= MIN_CURVE_POINTS
            else skipped(f"{n_x} distinct C on the {which} points; E + A·C^(−γ) needs at least {MIN_CURVE_POINTS}")
        )
        out[f"loglog_{which}"] = (
            _fitted(LogLogOLS(), flops, loss)
            if len(data) >= 3 and n_x >= 2
            else skipped(
                f"{len(data)} {which} point(s) at {n_x} distinct C; a log-log line with an "
                "interval needs 3 points at 2 or more C"
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# 3. Downstream: four verdicts along one axis at a time, one correction for all of them


def pretrained_rows(finetune: pd.DataFrame, checkpoints: pd.DataFrame) -> pd.DataFrame:
    """Per-seed rows of the pretrained modes with a finite test metric: the unit of every run-level statistic.

    Rows whose pretrain_val_loss is missing take the checkpoint's validation loss (as RunDir's points do)."""
    if finetune.empty:
        return finetune
    rows = finetune[finetune["mode"].isin(PRETRAINED_MODES)]
    rows = rows[np.isfinite(pd.to_numeric(rows["value"], errors="coerce").to_numpy(float))]
    losses = checkpoints[["trial_id", "tokens", "val_loss"]].astype({"tokens": float})
    rows = rows.astype({"tokens": float}).merge(losses, on=["trial_id", "tokens"], how="left")
    rows["pretrain_val_loss"] = pd.to_numeric(rows["pretrain_val_loss"], errors="coerce").fillna(rows.pop("val_loss"))
    for name in ("value", "val_value", "label_sd", "task_val_loss", "n_params_non_embedding", "flops"):
        rows[name] = pd.to_numeric(rows[name], errors="coerce").astype(float)
    return rows.reset_index(drop=True)


def trend_margin(metric: str, label_sd: float | None, s: FitSettings) -> tuple[PlateauMargin | None, str]:
    """The plateau margin of a metric (fits.plateau_margin, else the documented default), or None and why not."""
    override = s.plateau_margin.get(metric)
    if override is not None:
        chosen = plateau_margin(metric, margin=override)
        return dataclasses.replace(chosen, source=f"fits.plateau_margin.{metric} = {override:g} per decade"), ""
    if metric in PLATEAU_MARGINS and PLATEAU_MARGINS[metric][1] == "label_sd" and label_sd is None:
        fraction = PLATEAU_MARGINS[metric][0]
        return None, (
            f"the task's label sd is unknown (no finite label_sd in finetune.parquet), and the "
            f"{metric_label(metric)} margin is {fraction:g} × label sd per decade; set "
            f"fits.plateau_margin.{metric} to test it"
        )
    try:
        return plateau_margin(metric, label_sd=label_sd), ""
    except ValueError as err:
        return None, str(err).removeprefix("plateau_margin: ")


def _label_sd(rows: pd.DataFrame) -> float | None:
    values = rows["label_sd"].to_numpy(float)
    values = values[np.isfinite(values) & (values > 0)]
    return float(np.median(values)) if values.size else None


def _not_testable(verdict: TrendVerdict, reason: str) -> TrendVerdict:
    return dataclasses.replace(verdict, **UNTESTED, reason=reason, settle="", margin=math.nan, margin_source="")


def _subject(task: str, mode: str, metric: str) -> str:
    return f"{task} ({MODES.get(mode, mode)}) {metric_label(metric)}"


def downstream_trends(rows: pd.DataFrame, points: pd.DataFrame, s: FitSettings) -> tuple[list[dict], dict]:
    """Per (task, mode): the verdicts along N at fixed D, D at fixed N and C along the compute frontier, from the
    per-seed rows (runs as clusters, split seeds as blocks), corrected together; and the family's summary."""
    if rows.empty:
        return [], {
            "correction": s.correction,
            "correction_name": CORRECTIONS[s.correction],
            "n_tests": 0,
            "level": s.level,
            "counts": verdict_counts([]),
        }
    built: list[tuple[dict, dict[str, AxisTrend]]] = []
    by_arm = "arm" in rows.columns  # several arms: one entry per (arm, task, mode), one correction over all arms
    keys = ["arm", "task", "mode"] if by_arm else ["task", "mode"]
    for key, group in rows.groupby(keys, sort=True):
        arm, task, mode = key if by_arm else ("", *key)
        metric = str(group["metric"].iloc[0])
        higher_is_better = bool(group["higher_is_better"].iloc[0])
        label_sd = _label_sd(group)
        margin, margin_reason = trend_margin(metric, label_sd, s)
        frame = group.rename(columns={column: symbol for symbol, _, column, _ in AXES.values()})
        notes: list[str] = []
        with _kept_warnings(notes, f"trend {task} {mode}"):
            axes = scaling_verdicts(
                frame,
                y_col="value",
                higher_is_better=higher_is_better,
                margin=margin if margin is not None else 1.0,
                n_col="N",
                d_col="D",
                c_col="C",
                loss_col="pretrain_val_loss",
                run_col="trial_id",
                block_col="split_seed",
                method=s.slope_method,
                level=s.level,
                seed=s.seed,
            )
        if margin is None:
            axes = {
                key: dataclasses.replace(
                    trend,
                    combined=_not_testable(trend.combined, margin_reason),
                    per_stratum=tuple((value, _not_testable(v, margin_reason)) for value, v in trend.per_stratum),
                )
                for key, trend in axes.items()
            }
        mine = points[(points["task"] == task) & (points["mode"] == mode)] if not points.empty else points
        if by_arm and not mine.empty:
            mine = mine[mine["arm"] == arm]
        entry = {
            **({"arm": arm} if by_arm else {}),
            "task": task,
            "mode": mode,
            "metric": metric,
            "metric_label": metric_label(metric),
            "higher_is_better": higher_is_better,
            "n_checkpoints": len(mine),
            "n_runs": int(group["trial_id"].nunique()),
            "n_split_seeds": int(group["split_seed"].nunique()),
            "label_sd": label_sd,
            "margin": (
                {"per_decade": margin.per_decade, "source": margin.source}
                if margin is not None
                else skipped(margin_reason)
            ),
            "power_law": _downstream_laws(mine, higher_is_better, s),
            "warnings": notes,
        }
        built.append((entry, axes))
    family = correct([trend.combined for _, axes in built for trend in axes.values()], s.correction)
    corrected = iter(family)
    entries = []
    for entry, axes in built:
        entry["verdicts"] = {}
        for key, trend in axes.items():
            verdict = next(corrected)
            entry["verdicts"][key] = {
                **verdict.to_dict(),
                "combine": trend.combine,
                "axis_words": AXES[key][3],
                "sentence": verdict.sentence(_subject(entry["task"], entry["mode"], entry["metric"]), AXES[key][0]),
                "per_stratum": [{"value": value, **v.to_dict()} for value, v in trend.per_stratum],
            }
        entries.append(entry)
    summary = {
        "correction": s.correction,
        "correction_name": CORRECTIONS[s.correction],
        "n_tests": sum(v.testable for v in family),
        "level": s.level,
        "counts": verdict_counts(family),
        "per_stratum": "each held-fixed value alone, uncorrected and descriptive; the combined slope is the test",
    }
    return entries, summary


def _downstream_laws(points: pd.DataFrame, higher_is_better: bool, s: FitSettings) -> dict:
    """The saturating law metric(x) against N and C on the checkpoint means (descriptive; with identification)."""
    out = {}
    for x in ("n_params_non_embedding", "flops"):
        scale = points[x].to_numpy(float) if not points.empty else np.array([])
        n_x = np.unique(scale[np.isfinite(scale) & (scale > 0)]).size
        out[x] = (
            _fitted(
                DownstreamPowerLaw(
                    higher_is_better=higher_is_better,
                    huber_delta=s.huber_delta,
                    n_bootstrap=s.n_bootstrap,
                    seed=s.seed,
                    n_jobs=s.n_jobs,
                ),
                scale,
                points["mean"].to_numpy(float),
            )
            if n_x >= MIN_CURVE_POINTS
            else skipped(f"{n_x} distinct {x}; the saturating law needs at least {MIN_CURVE_POINTS}")
        )
    return out


# --------------------------------------------------------------------------------------------
# 4. Baselines: choose on validation, report on test, compare split seed by split seed


def _spread(values: pd.Series) -> dict | None:
    values = pd.to_numeric(values, errors="coerce")
    values = values[np.isfinite(values.to_numpy(float))]
    if values.empty:
        return None
    return {
        "mean": float(values.mean()),
        "sd": float(values.std()) if len(values) > 1 else math.nan,
        "n": int(len(values)),
    }


def baselines(finetune: pd.DataFrame, rows: pd.DataFrame, s: FitSettings) -> tuple[list[dict], dict]:
    """Per task: the pretrained checkpoint with the best validation metric (any mode), its test metric, and its
    paired per-seed difference from each baseline (random init: the same rung), Holm-corrected over all of them."""
    entries: list[dict] = []
    if finetune.empty:
        return entries, {"correction": s.correction, "n_tests": 0}
    for task, task_rows in finetune.groupby("task", sort=True):
        metric = str(task_rows["metric"].iloc[0])
        higher_is_better = bool(task_rows["higher_is_better"].iloc[0])
        entry = {
            "task": task,
            "metric": metric,
            "metric_label": metric_label(metric),
            "higher_is_better": higher_is_better,
            "comparisons": {},
        }
        for mode in BASELINES:
            entry[mode] = _spread(task_rows.loc[task_rows["mode"] == mode, "value"])
        random_init = task_rows[task_rows["mode"] == "random_init"]
        if entry["random_init"] is not None:
            entry["random_init"]["per_rung"] = {
                str(rung): _spread(group["value"]) for rung, group in random_init.groupby("rung", sort=False)
            }
        pretrained = rows[rows["task"] == task] if not rows.empty else rows
        entry["best_pretrained"] = _best_on_validation(pretrained, higher_is_better)
        best = entry["best_pretrained"]
        if best["status"] == "ok":
            pick = pretrained[
                (pretrained["mode"] == best["mode"])
                & (pretrained["trial_id"] == best["trial_id"])
                & (pretrained["tokens"] == best["tokens"])
            ]
            for mode, words in BASELINES.items():
                against = task_rows[task_rows["mode"] == mode]
                if mode == "random_init" and (against["rung"] == best["rung"]).any():
                    against, words = against[against["rung"] == best["rung"]], f"{words} ({best['rung']})"
                if against.empty:
                    entry["comparisons"][mode] = {**skipped(f"no {words} rows for {task}"), "against": words}
                    continue
                difference = paired_difference(
                    pick, against, on="split_seed", value_col="value", higher_is_better=higher_is_better, level=s.level
                )
                entry["comparisons"][mode] = {**difference.to_dict(), "against": words}
        entries.append(entry)
    tests = [c for e in entries for c in e["comparisons"].values() if c["status"] == "ok"]
    adjusted = adjust_pvalues([c["p"] if c["p"] is not None else math.nan for c in tests], s.correction)
    n_tests = int(np.isfinite(adjusted).sum())
    for comparison, p_adjusted in zip(tests, adjusted, strict=True):
        comparison["raw_finding"] = comparison["finding"]
        if np.isfinite(p_adjusted):
            comparison.update(
                p_adjusted=float(p_adjusted),
                correction=f"{CORRECTIONS[s.correction]} over {n_tests} baseline comparisons",
            )
            if not p_adjusted < 1 - s.level:
                comparison["finding"] = "no clear difference"
    for entry in entries:
        entry["sentence"] = _baseline_sentence(entry)
    return entries, {"correction": s.correction, "correction_name": CORRECTIONS[s.correction], "n_tests": n_tests}


def _best_on_validation(pretrained: pd.DataFrame, higher_is_better: bool) -> dict:
    if pretrained.empty:
        return skipped("no pretrained checkpoint was evaluated on this task")
    picks = best_on_validation(
        pretrained,
        val_col="val_value",
        higher_is_better=higher_is_better,
        group_cols=("task",),
        checkpoint_cols=("mode", "trial_id", "tokens"),
    )
    if picks.empty:
        return skipped("no finite validation metric (val_value), so no checkpoint can be chosen without the test split")
    pick = picks.iloc[0]
    rows = pretrained[
        (pretrained["mode"] == pick["mode"])
        & (pretrained["trial_id"] == pick["trial_id"])
        & (pretrained["tokens"] == pick["tokens"])
    ]
    return {
        "status": "ok",
        "chosen_on": "validation",
        "mode": pick["mode"],
        "trial_id": pick["trial_id"],
        "rung": rows["rung"].iloc[0],
        "tokens": float(pick["tokens"]),
        "val_mean": float(pick["val_mean"]),
        "test": _spread(rows["value"]),
        "n_candidates": int(pretrained.groupby(["mode", "trial_id", "tokens"]).ngroups),
    }


FINDING_WORDS = {"better": "beats", "worse": "is worse than", "no clear difference": "shows no clear difference from"}


def _baseline_sentence(entry: dict) -> str:
    """Verdict first (against Morgan fingerprints when there are any), then the pick and each paired difference."""
    task, label, best = entry["task"], entry["metric_label"], entry["best_pretrained"]
    if best["status"] != "ok":
        return f"Not compared with the baselines: {task}: {best['reason']}."
    picked = (
        f"the checkpoint chosen on validation ({MODES.get(best['mode'], best['mode'])}, {best['rung']}, "
        f"{format_scale(best['tokens'])} tokens, best of {best['n_candidates']}) reaches test {label} "
        f"{_mean_sd(best['test'])}"
    )
    clauses, head = [], None
    for mode, comparison in entry["comparisons"].items():
        if comparison["status"] != "ok":
            clauses.append(f"against {comparison['against']}: {comparison['reason']}")
            continue
        head = head or f"Pretraining {FINDING_WORDS[comparison['finding']]} {comparison['against']} on {task}"
        lo, hi = comparison["ci"]
        level = round(100 * comparison["level"])
        interval = f", {level} % CI {_number(lo, 3)}…{_number(hi, 3)}" if lo is not None else ""
        corrected = (
            f"; {comparison['correction']}, adjusted p = {comparison['p_adjusted']:.2g}"
            if comparison.get("correction")
            else ""
        )
        before = (
            f"; {comparison['raw_finding']} before the correction"
            if comparison.get("raw_finding", comparison["finding"]) != comparison["finding"]
            else ""
        )
        clauses.append(
            f"{comparison['against']} reach {_mean_sd(entry[mode])}, a paired difference of "
            f"{_number(comparison['mean'], 3)} per split seed{interval} ({comparison['n_pairs']} seeds"
            f"{corrected}{before})"
        )
    head = head or f"Not compared with the baselines on {task}"
    return f"{head}: {picked}; " + "; ".join(clauses) + " (a difference > 0 favours pretraining)."


def _mean_sd(spread: dict | None) -> str:
    if spread is None:
        return "n/a"
    seeds = f"{spread['n']} seed{'s' if spread['n'] != 1 else ''}"
    if spread["sd"] is None or not np.isfinite(spread["sd"]):
        return f"{spread['mean']:.3g} ({seeds})"
    return f"{spread['mean']:.3g} ± {spread['sd']:.2g} ({seeds})"


# --------------------------------------------------------------------------------------------
# 5. Proxies: what a user could measure before fine-tuning, judged by prediction and by selection


def checkpoint_proxies(points: pd.DataFrame, hessian: pd.DataFrame, landscape: pd.DataFrame) -> pd.DataFrame:
    """The downstream points with the proxies of their checkpoint joined: Hessian λmax, trace and trace per
    parameter (trace / hessian_dim) of the pretraining loss, of the point's own task's loss at the pretrained
    encoder with a probe head (pt_task_*, `pretrained_task:<task>` rows) and at the fine-tuned weights (ft_*),
    and sharpness of the pretraining loss (`random_directions` rows) and of the point's own task's loss at the
    pretrained encoder (pt_task_*, `pretrained_task:<task>` rows). A proxy that was not measured is NaN."""
    keys = ["trial_id", "tokens"]
    out = points.copy()
    measured = []
    if not hessian.empty and {"loss", "lambda_max", "trace"} <= set(hessian.columns):
        dim = pd.to_numeric(hessian.get("hessian_dim", pd.Series(np.nan, index=hessian.index)), errors="coerce")
        rows = hessian.assign(trace_per_param=pd.to_numeric(hessian["trace"], errors="coerce") / dim.where(dim > 0))
        values = ["lambda_max", "trace", "trace_per_param"]
        measured.append(rows[rows["loss"] == "pretrain"].groupby(keys, sort=False)[values].first().reset_index())
        for prefix, tag in (("pretrained_task:", "pt_task_"), ("finetune:", "ft_")):
            mine = rows[rows["loss"].astype(str).str.startswith(prefix)]
            mine = mine.assign(task=mine["loss"].astype(str).str[len(prefix) :])
            mine = mine.rename(columns={name: tag + name for name in values})
            measured.append(mine.groupby([*keys, "task"], sort=False)[[tag + n for n in values]].first().reset_index())
    if not landscape.empty:
        columns = [name for name in SHARPNESS if name in landscape.columns]
        surface = landscape["surface"].astype(str) if "surface" in landscape.columns else None
        rows = landscape[surface == "random_directions"] if surface is not None else landscape
        if columns:
            measured.append(rows.groupby(keys, sort=False)[columns].first().reset_index())
        if columns and surface is not None:
            prefix, tag = "pretrained_task:", "pt_task_"
            mine = landscape[surface.str.startswith(prefix)]
            mine = mine.assign(task=mine["surface"].astype(str).str[len(prefix) :])
            mine = mine.rename(columns={name: tag + name for name in columns})
            measured.append(mine.groupby([*keys, "task"], sort=False)[[tag + n for n in columns]].first().reset_index())
    for table in measured:
        on = [*keys, "task"] if "task" in table.columns else keys
        out = out.merge(table.astype({"tokens": float}), on=on, how="left")
    for name in PROXIES:
        out[name] = pd.to_numeric(out[name], errors="coerce").astype(float) if name in out.columns else np.nan
    return out


def proxy_groups(columns: Sequence[str]) -> dict[str, list[str]]:
    """fits.proxies.proxy_timing, with a per-parameter trace timed as the trace it divides."""
    groups: dict[str, list[str]] = {"before_finetuning": [], "descriptive": [], "scale": []}
    for column in columns:
        timing = proxy_timing([column.removesuffix(PER_PARAM)])
        group = next((g for g in groups if getattr(timing, g)), None)
        assert group is not None, f"{column}: fits.proxies.proxy_timing does not know when it is measured"
        groups[group].append(column)
    return groups


def checkpoint_table(rows: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """points (test-metric means per task, mode, checkpoint) with the validation metric's and task loss' means."""
    if points.empty:
        return points
    keys = ["task", "mode", "trial_id", "tokens"]
    extra = rows.groupby(keys, sort=True).agg(val_mean=("val_value", "mean"), task_val_loss=("task_val_loss", "mean"))
    return points.astype({"tokens": float}).merge(extra.reset_index(), on=keys, how="left")


def fit_proxies(table: pd.DataFrame, s: FitSettings) -> dict:
    """Leave-one-size-out prediction (Holm-corrected) and selection regret for the proxies measured before
    fine-tuning; rank correlations of every proxy as description. table: checkpoint_table + checkpoint_proxies."""
    if table.empty:
        return skipped("no downstream results")
    present = [name for name in PROXIES if np.isfinite(table[name].to_numpy(float)).any()]
    groups = proxy_groups(present)
    predictors = [name for name in groups["before_finetuning"] if name != "pretrain_val_loss"]
    correlations, prediction, regret = [], [], []
    for (task, mode), group in table.groupby(["task", "mode"], sort=True):
        metric = str(group["metric"].iloc[0])
        higher_is_better = bool(group["higher_is_better"].iloc[0])
        frame = group.rename(columns={"mean": metric}) if metric not in group.columns else group
        result = proxy_correlations(
            frame,
            metric,
            present,
            task_column="task",
            loss_column="pretrain_val_loss",
            n_bootstrap=s.n_bootstrap,
            ci_level=s.level,
            seed=s.seed,
        )
        result.insert(1, "mode", mode)
        result["timing"] = [next(g for g, names in groups.items() if p in names) for p in result["proxy"]]
        correlations += result.to_dict("records")
        for proxy in predictors:
            found = leave_one_size_out(group, "mean", proxy, level=s.level, n_bootstrap=PROXY_BOOTSTRAP, seed=s.seed)
            prediction.append(
                {
                    "task": task,
                    "mode": mode,
                    "metric": metric,
                    **found.to_dict(),
                    "p": improvement_p(found, seed=s.seed),
                    "test": "sign-flip over held-out sizes",
                    "smallest_possible_p": smallest_p(found.n_sizes) if not found.reason else None,
                }
            )
        regret.append(_regret(group, task, mode, metric, higher_is_better, predictors))
    adjusted = adjust_pvalues([row["p"] if row["p"] is not None else math.nan for row in prediction], s.correction)
    n_tests = int(np.isfinite(adjusted).sum())
    for row, p_adjusted in zip(prediction, adjusted, strict=True):
        row["interval_finding"] = row["finding"]  # read off the bootstrap interval: descriptive (improvement_p)
        if np.isfinite(p_adjusted):
            row.update(
                p_adjusted=float(p_adjusted),
                correction=f"{CORRECTIONS[s.correction]} over {n_tests} proxy prediction tests",
            )
            mean_per_size = np.mean([size["rmse_loss"] - size["rmse_loss_proxy"] for size in row["per_size"]])
            row["finding"] = (
                "no clear difference" if not p_adjusted < 1 - s.level else "better" if mean_per_size > 0 else "worse"
            )
    return json_safe(
        {
            "status": "ok",
            "proxies": present,
            "timing": groups,
            "predictors": predictors,
            "select_by": SELECT_BY,
            "not_measured": [name for name in PROXIES if name not in present],
            "labels": {name: PROXY_LABELS.get(name, name) for name in PROXIES},
            "prediction_tests": {
                "correction": s.correction,
                "correction_name": CORRECTIONS[s.correction],
                "n_tests": n_tests,
                "level": s.level,
                "test": "sign-flip over held-out sizes",
                "interval": f"percentile bootstrap over held-out sizes, {PROXY_BOOTSTRAP} resamples",
            },
            "prediction": prediction,
            "regret": regret,
            "correlations": correlations,
        }
    )


def improvement_p(result: LeaveOneSizeOut, seed: int = 0, n_exact_max: int = 16, n_random: int = 20_000) -> float:
    """Two-sided sign-flip p of "the proxy changes nothing" over held-out sizes, the independent unit: the mean
    per-size improvement (RMSE from loss alone − RMSE with the proxy) against its values under every flip of the
    signs (exact for up to n_exact_max sizes, else n_random random flips). NaN when not testable.

    Why not the bootstrap interval of fits.proxies: with k sizes it excludes 0 whenever all k agree in sign,
    which under the null happens 2·2^(−k) of the time (25 % for 3 sizes). The flip test's smallest p is that
    same 2·2^(−k), so it cannot call a difference from fewer than 6 sizes, and says so by its p."""
    if result.reason:
        return math.nan
    d = np.array([size["rmse_loss"] - size["rmse_loss_proxy"] for size in result.per_size], float)
    if d.size <= n_exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_random, d.size))
        signs = np.vstack([np.ones(d.size), signs])  # the observed signs count once (Phipson & Smyth 2010)
    flipped = np.abs((signs * d).mean(axis=1))
    return float(np.mean(flipped >= abs(d.mean()) * (1 - 1e-12)))


def smallest_p(n_sizes: int) -> float:
    """The smallest p the sign-flip test can give with n_sizes held-out sizes."""
    return min(1.0, 2.0 ** (1 - n_sizes))


def _regret(
    group: pd.DataFrame, task: str, mode: str, metric: str, higher_is_better: bool, predictors: list[str]
) -> dict:
    """Selection regret of one (task, mode): validation, pretraining loss and each predictor, metric units."""
    selectors = {name: SELECT_BY for name in ("pretrain_val_loss", *predictors)}
    picks = selection_regret(
        group, test_col="mean", val_col="val_mean", selectors=selectors, higher_is_better=higher_is_better
    )
    rows = picks.drop(columns="group").to_dict("records")
    return {
        "task": task,
        "mode": mode,
        "metric": metric,
        "metric_label": metric_label(metric),
        "higher_is_better": higher_is_better,
        "n_checkpoints": len(group),
        "test_best": rows[0]["test_best"] if rows else None,
        "selectors": rows,
    }


# --------------------------------------------------------------------------------------------
# 6. The task ladder: predict the largest rung of each task from the smaller ones


def task_ladders(table: pd.DataFrame, s: FitSettings) -> dict:
    """Per (task, mode): task_ladder_backtest on the checkpoint means of the task loss (task_val_loss) and test
    metric, holding out the fits.holdout_rungs largest sizes."""
    if table.empty:
        return skipped("no downstream results")
    if not np.isfinite(table["task_val_loss"].to_numpy(float)).any():
        return skipped(
            "finetune.parquet has no task_val_loss (the fine-tuned or probed model's validation loss), "
            "which step 1 of the ladder fits"
        )
    if s.holdout_rungs == 0:
        return skipped("fits.holdout_rungs is 0")
    entries = []
    for (task, mode), group in table.groupby(["task", "mode"], sort=True):
        metric = str(group["metric"].iloc[0])
        where = {"task": task, "mode": mode, "metric": metric, "metric_label": metric_label(metric)}
        usable = group[np.isfinite(group[["task_val_loss", "mean"]].to_numpy(float)).all(axis=1)]
        n_sizes = usable["n_params_non_embedding"].nunique()
        if n_sizes < s.holdout_rungs + 2:
            entries.append(
                {
                    **where,
                    **skipped(
                        f"{n_sizes} model size(s) with a task loss; holding out the "
                        f"{s.holdout_rungs} largest must leave 2 to fit"
                    ),
                }
            )
            continue
        notes: list[str] = []
        ladder = TaskLadder(metric_range=BOUNDED_METRICS.get(metric), huber_delta=s.huber_delta, seed=s.seed)
        try:
            with _kept_warnings(notes, f"task ladder {task} {mode}"):
                result = task_ladder_backtest(
                    usable["n_params_non_embedding"],
                    usable["tokens"],
                    usable["task_val_loss"],
                    usable["mean"],
                    n_holdout_rungs=s.holdout_rungs,
                    estimator=ladder,
                )
        except FIT_ERRORS as err:
            entries.append({**where, **skipped(f"{type(err).__name__}: {err}"), "warnings": notes})
            continue
        entries.append(
            {
                **where,
                "status": "ok",
                **result.to_dict(),
                "warnings": notes,
                "sentence": result.sentence(_subject(task, mode, metric), metric_label(metric)),
            }
        )
    return {"status": "ok", "holdout_rungs": s.holdout_rungs, "entries": json_safe(entries)}


# --------------------------------------------------------------------------------------------
# 7. Findings: sentences from the numbers, verdict first, each with the anchor of its figure or table


def _number(value: float | None, digits: int | None = None) -> str:
    """format_scale's three digits (or `digits` significant ones), a typographic minus; 'n/a' for a missing value."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return (format_scale(value) if digits is None else f"{value:.{digits}g}").replace("-", "−")


def _estimate(result: dict, name: str) -> str:
    """'0.35 [0.30, 0.41]' from a fit summary; the interval is left out when there is none."""
    value = result["params"][name]
    lo, hi = result.get("ci", {}).get(name, (None, None))
    if lo is None or hi is None:
        return f"{_number(value)} (no interval)"
    return f"{_number(value)} [{_number(lo)}, {_number(hi)}]"


def _level(result: dict) -> str:
    return f"{round(100 * result['hyperparameters'].get('ci_level', LEVEL))} %"


def _not_identified(what: str, result: dict) -> str:
    problems = "; ".join(f"{p['parameter']}: {p['problem']}" for p in result["identification"]["problems"])
    return (
        f"Not identified from this grid: {what} ({problems}). What would identify it: "
        f"{result['identification']['what_would_identify']}. No exponent or derived number of it is stated "
        "as a finding."
    )


def _law_findings(fits: dict) -> list[tuple[str, str]]:
    out = []
    law = fits["loss_law"]
    if law["status"] != "ok":
        out.append((f"L(N, D) was not fitted: {law['reason']}.", "laws"))
    elif not law["identified"]:
        out.append(
            (
                _not_identified(
                    f"L(N, D) = E + A/N^α + B/D^β on {law['n_points']} checkpoints of {law['n_rungs']} model sizes", law
                ),
                "loss_surface",
            )
        )
    else:
        n_boot = law["hyperparameters"]["n_bootstrap"]
        intervals = f"{_level(law)} bootstrap intervals over {n_boot} resamples" if n_boot else "no bootstrap"
        out.append(
            (
                f"Identified from this grid: pretraining loss follows L(N, D) = E + A/N^α + B/D^β over "
                f"{law['n_points']} checkpoints of {law['n_rungs']} model sizes with "
                f"α = {_estimate(law, 'alpha')}, β = {_estimate(law, 'beta')} and irreducible loss "
                f"E = {_estimate(law, 'E')} nats/token "
                f"({intervals}).",
                "laws",
            )
        )
        frontier = law["frontier"]
        a_ci, b_ci = frontier.get("n_params_exponent_ci"), frontier.get("n_tokens_exponent_ci")
        a = _number(frontier["n_params_exponent"], 2) + (
            f" [{_number(a_ci[0], 2)}, {_number(a_ci[1], 2)}]" if a_ci else ""
        )
        b = _number(frontier["n_tokens_exponent"], 2) + (
            f" [{_number(b_ci[0], 2)}, {_number(b_ci[1], 2)}]" if b_ci else ""
        )
        out.append((f"For a fixed compute budget C the fit puts N* ∝ C^{a} and D* ∝ C^{b}.", "loss_surface"))
    test = fits["loss_law_backtest"]
    if test["status"] == "ok":
        sizes = ", ".join(format_scale(n) for n in test["holdout_n_params"])
        which = "largest model size" if test["holdout_rungs"] == 1 else f"{test['holdout_rungs']} largest model sizes"
        out.append(
            (
                f"Back-test: refitted without the {which} (N = {sizes}), L(N, D) predicts the {test['n_holdout']} "
                f"held-out losses to within {test['mean_abs_relative_error']:.1%} on average (at most "
                f"{test['max_abs_relative_error']:.1%}).",
                "laws",
            )
        )
    elif law["status"] == "ok":
        out.append((f"No extrapolation back-test: {test['reason']}.", "laws"))
    compute = fits["compute_law"]
    if compute["status"] == "ok":
        fit = compute["saturating_frontier"]
        if fit["status"] == "ok" and fit["identified"]:
            out.append(
                (
                    f"Identified from this grid: along the compute frontier ({fit['n_points']} checkpoints), "
                    f"L(C) = E + A·C^−γ with γ = {_estimate(fit, 'gamma')} and E = {_estimate(fit, 'E')} "
                    "nats/token.",
                    "laws",
                )
            )
        elif fit["status"] == "ok":
            out.append(
                (
                    _not_identified(f"L(C) = E + A·C^−γ on the {fit['n_points']} compute-frontier checkpoints", fit),
                    "laws",
                )
            )
        fit = compute["loglog_frontier"]
        if fit["status"] == "ok" and fit["identified"]:
            out.append(
                (
                    f"A pure power law L ∝ C^k on the same points gives k = {_estimate(fit, 'k')} "
                    f"(R² = {_number(fit['r_squared'], 3)}).",
                    "laws",
                )
            )
    return out


def _clause(verdict: dict) -> str:
    """'fine-tuned, N at fixed D: slope +0.01 ± 0.05 per decade, margin ±0.04, detectable ±0.09'."""
    half = (verdict["ci"][1] - verdict["ci"][0]) / 2
    text = (
        f"slope {format_with_uncertainty(verdict['slope'], half)} per decade, margin ±{verdict['margin']:.2g}, "
        f"detectable ±{verdict['min_detectable_slope']:.2g}"
    )
    factor = (verdict["min_detectable_slope"] / verdict["margin"]) ** 2
    text += f", ~{factor:.0f}× the runs to settle" if factor > 1.5 else ", a few more runs to settle"
    if verdict["raw_verdict"] != verdict["verdict"]:
        text += f"; {verdict['raw_verdict']} before the correction"
    return text


def _downstream_findings(fits: dict) -> list[tuple[str, str]]:
    entries, tests = fits["downstream"], fits["trend_tests"]
    if not entries:
        return [("No downstream trends: finetune.parquet has no pretrained-checkpoint results.", "downstream")]
    counts = tests["counts"]
    n_all = sum(counts.values())
    out = [
        (
            f"Downstream trends, one axis at a time (N at fixed D, D at fixed N, C along the compute frontier; "
            f"run-level intervals): {counts['improving']} improving, {counts['degrading']} degrading, "
            f"{counts['plateau']} plateau, {counts['inconclusive']} inconclusive, {counts['not testable']} could not "
            f"be tested, of {n_all} ({tests['correction_name']} over {tests['n_tests']} trend tests at "
            f"{round(100 * tests['level'])} %).",
            "trends",
        )
    ]
    for entry in entries:  # the definite verdicts: each is a claim
        for verdict in entry["verdicts"].values():
            if verdict["status"] == "ok" and verdict["verdict"] != "inconclusive":
                out.append((verdict["sentence"], downstream_anchor(entry["task"])))
    for task in dict.fromkeys(entry["task"] for entry in entries):  # inconclusive: one line per task
        clauses = [
            f"{MODES.get(entry['mode'], entry['mode'])}, {AXES[key][3]}: {_clause(verdict)}"
            for entry in entries
            if entry["task"] == task
            for key, verdict in entry["verdicts"].items()
            if verdict["status"] == "ok" and verdict["verdict"] == "inconclusive"
        ]
        if clauses:
            label = next(e["metric_label"] for e in entries if e["task"] == task)
            out.append(
                (
                    f"Inconclusive (the interval neither excludes 0 nor lies inside the margin): {task} {label}: "
                    + "; ".join(clauses)
                    + ".",
                    downstream_anchor(task),
                )
            )
    untested: dict[str, dict[str, list[str]]] = {}  # reason: {task (mode): axes}
    for entry in entries:
        for key, verdict in entry["verdicts"].items():
            if verdict["status"] != "ok":
                who = f"{entry['task']} ({MODES.get(entry['mode'], entry['mode'])})"
                untested.setdefault(verdict["reason"], {}).setdefault(who, []).append(AXES[key][3])
    if untested:
        n_untested = sum(len(axes) for which in untested.values() for axes in which.values())
        listed = "; ".join(
            ", ".join(
                f"{who} {'all three axes' if len(axes) == len(AXES) else ' and '.join(axes)}"
                for who, axes in which.items()
            )
            + f": {reason}"
            for reason, which in untested.items()
        )
        out.append((f"Could not be tested: {n_untested} trends ({listed}).", "trends"))
    return out


def _proxy_findings(proxies: dict) -> list[tuple[str, str]]:
    """Per proxy with a test that could reject, its finding; one line for the proxies whose grid has too few sizes
    for any test to reject, one for those not testable at all, one for selection regret, one for the rest."""
    if proxies["status"] != "ok":
        return [(f"No proxy evaluation: {proxies['reason']}.", "proxies")]
    labels, tests = proxies["labels"], proxies["prediction_tests"]
    corrected = f"{tests['correction_name']} over {tests['n_tests']} tests"
    out: list[tuple[str, str]] = []
    untested: dict[str, list[str]] = {}  # reason: the predictions it stopped
    unpowered: dict[int, dict[str, None]] = {}  # n_sizes: proxy labels
    for proxy in proxies["predictors"]:
        mine = [row for row in proxies["prediction"] if row["proxy"] == proxy]
        for row in mine:
            if row["status"] != "ok":
                untested.setdefault(row["reason"], []).append(f"{labels[proxy]} for {row['task']} ({row['mode']})")
        testable = [row for row in mine if row["status"] == "ok"]
        powered = [row for row in testable if row["smallest_possible_p"] < 1 - tests["level"]]
        for row in testable:
            if row not in powered:
                unpowered.setdefault(row["n_sizes"], {})[labels[proxy]] = None  # ordered, once each
        if not powered:
            continue
        better = [row for row in powered if row["finding"] == "better"]
        worse = [row for row in powered if row["finding"] == "worse"]
        rmse = (
            f"RMSE {_range([r['rmse_loss'] for r in powered])} from loss alone, "
            f"{_range([r['rmse_loss_proxy'] for r in powered])} with it"
        )
        if better:
            pairs = ", ".join(
                f"{row['task']} ({MODES.get(row['mode'], row['mode'])}): RMSE {row['rmse_loss']:.3g} → "
                f"{row['rmse_loss_proxy']:.3g}, adjusted p = {row['p_adjusted']:.2g}"
                for row in better
            )
            head = (
                f"Adds to pretraining loss: {labels[proxy]} predicts held-out model sizes better than loss alone "
                f"in {len(better)} of {len(powered)} task/mode pairs ({pairs}; {corrected})"
            )
        elif worse:
            head = (
                f"Hurts prediction: loss + {labels[proxy]} predicts held-out model sizes worse than loss alone "
                f"in {len(worse)} of {len(powered)} task/mode pairs ({rmse}; {corrected})"
            )
        else:
            head = (
                f"No clear difference: loss + {labels[proxy]} against loss alone on held-out model sizes in "
                f"{len(powered)} task/mode pairs ({rmse}; {corrected}): no evidence either way that it adds to "
                "pretraining loss"
            )
        out.append((head + ".", "proxy-prediction"))
    for n_sizes, names in unpowered.items():
        out.append(
            (
                f"Could not be tested with {n_sizes} model sizes: whether {', '.join(names)} add to "
                f"pretraining loss in predicting a held-out size (the sign-flip test over sizes cannot go below "
                f"p = {smallest_p(n_sizes):.2g}; 6 or more sizes are needed); their prediction errors are in "
                "the proxy table.",
                "proxy-prediction",
            )
        )
    if untested:
        listed = "; ".join(f"{', '.join(which)}: {reason}" for reason, which in untested.items())
        out.append(
            (
                f"Could not be tested: {sum(map(len, untested.values()))} proxy predictions ({listed}).",
                "proxy-prediction",
            )
        )
    selectors: dict[str, list[float]] = {}  # selector: regrets over task/mode pairs
    for group in proxies["regret"]:
        for pick in group["selectors"]:
            if pick["regret"] is not None:
                selectors.setdefault(pick["selector"], []).append(pick["regret"])
    if selectors:
        words = {"validation": "the validation metric", **labels}
        listed = ", ".join(f"{words.get(name, name)} {_range(values)}" for name, values in selectors.items())
        out.append(
            (
                f"Selection regret, metric units below the test-best checkpoint, when one checkpoint per task "
                f"and mode is picked by each quantity (where it is best: the validation metric; where it is "
                f"lowest: the others), over {len(proxies['regret'])} task/mode pairs: {listed}.",
                "proxy-regret",
            )
        )
    descriptive = proxies["timing"]["descriptive"]
    if descriptive:
        out.append(
            (
                f"Descriptive only (measured at the fine-tuned weights, so they cannot predict before "
                f"fine-tuning): {', '.join(labels[p] for p in descriptive)}; their rank correlations are in the "
                "proxy table.",
                "proxy-correlations",
            )
        )
    missing = [p for p in proxies["not_measured"] if p not in SCALE_PROXIES]
    if missing:
        out.append((f"Not measured in this run: {', '.join(labels[p] for p in missing)}.", "proxy-correlations"))
    return out


def _range(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    lo, hi = min(values) + 0.0, max(values) + 0.0  # + 0.0: no "-0" from a regret of −0.0
    return f"{lo:.2g}" if math.isclose(lo, hi) else f"{lo:.2g}–{hi:.2g}"


def _ladder_findings(ladder: dict) -> list[tuple[str, str]]:
    if ladder["status"] != "ok":
        return [(f"No task ladder: {ladder['reason']}.", "task-ladder")]
    out = [(entry["sentence"] + ".", "task-ladder") for entry in ladder["entries"] if entry["status"] == "ok"]
    untested = [
        f"{e['task']} ({MODES.get(e['mode'], e['mode'])}): {e['reason']}"
        for e in ladder["entries"]
        if e["status"] != "ok"
    ]
    if untested:
        out.append(
            (
                f"Task ladder could not be back-tested for {len(untested)} task/mode pair(s): "
                + "; ".join(untested)
                + ".",
                "task-ladder",
            )
        )
    return out


def _excluded_findings(excluded: list[dict]) -> list[tuple[str, str]]:
    out = []
    trials = [e for e in excluded if e["table"] == "pretrain" and e["status"] != "finished"]
    if trials:
        listed = "; ".join(f"{e['trial_id']} ({e['reason']})" for e in trials)
        head = "1 trial did not finish and was" if len(trials) == 1 else f"{len(trials)} trials did not finish and were"
        out.append((f"{head} left out of every fit: {listed}.", "excluded"))
    failures = [e for e in excluded if e["status"] == "error"]
    if failures:
        listed = "; ".join(f"{e['table']} on {e['trial_id'] or 'no checkpoint'}, {e['reason']}" for e in failures[:10])
        more = f"; and {len(failures) - 10} more" if len(failures) > 10 else ""
        n_rows = sum(e["n_rows"] for e in failures)
        head = "1 measurement failed and was" if n_rows == 1 else f"{n_rows} measurement rows failed and were"
        out.append((f"{head} left out: {listed}{more}.", "excluded"))
    return out


ARM_ANCHOR = "--"  # an arm's anchors in the report: "<anchor>--<slug>"


def arm_views(fits: dict) -> list[tuple[str, str, dict]]:
    """(arm, slug, fits as one arm's) for each arm of a run split by its axes; one ("", "", fits) otherwise."""
    if not fits.get("arms"):
        return [("", "", fits)]
    return [(arm["arm"], arm["slug"], {**fits, **arm}) for arm in fits["arms"]]


def findings(fits: dict) -> list[tuple[str, str]]:
    """(sentence, report anchor) pairs, from the JSON-ready fits dict; per arm, each sentence names its arm."""
    if fits.get("arms"):
        found = [
            (f"[{arm}] {text}", f"{anchor}{ARM_ANCHOR}{slug}")
            for arm, slug, view in arm_views(fits)
            for text, anchor in _arm_findings(view)
        ]
        return found + _excluded_findings(fits["excluded"])
    return _arm_findings(fits) + _excluded_findings(fits["excluded"])


def _arm_findings(fits: dict) -> list[tuple[str, str]]:
    return (
        _law_findings(fits)
        + _downstream_findings(fits)
        + [(e["sentence"], "baselines") for e in fits["baselines"]]
        + _proxy_findings(fits["proxies"])
        + _ladder_findings(fits["task_ladder"])
    )


# --------------------------------------------------------------------------------------------
# 8. Task characteristics beside each task's verdicts, and per-task scaling against them (descriptive)

# (column of tasks.parquet, words, log10 on the axis): the scalar characteristics related to the scaling slope
TASK_CHARACTERISTICS = {
    "n_molecules": ("molecules", True),
    "scaffold_diversity": ("scaffolds per molecule", False),
    "largest_scaffold_fraction": ("largest scaffold's share", False),
    "min_positive_fraction": ("smallest positive (class) fraction", False),
    "nn_tanimoto_mean": ("mean nearest-neighbour ECFP4 Tanimoto to the corpus", False),
    "fraction_nn_unrelated": ("share with nearest neighbour below 0.4", False),
}
MIN_RELATION_TASKS = 3  # below this a rank correlation over tasks is ±1 or undefined by construction


def _scalar(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _scaled_n_slope(entry: dict) -> tuple[float | None, tuple[float, float] | None]:
    """The N-axis slope per decade signed so that > 0 is improvement and divided by the task's plateau margin, so
    tasks scored in different metrics share one scale (1 = one margin per decade); with its interval."""
    verdict = entry.get("verdicts", {}).get("n", {})
    margin = _scalar(verdict.get("margin"))
    if verdict.get("status") != "ok" or not margin or _scalar(verdict.get("slope")) is None:
        return None, None
    sign = 1.0 if entry["higher_is_better"] else -1.0
    lo, hi = sorted(sign * float(end) / margin for end in verdict["ci"])
    return sign * float(verdict["slope"]) / margin, (lo, hi)


def task_scaling(characteristics: pd.DataFrame, trends: list[dict]) -> dict:
    """Per task: its characteristics (tasks.parquet) and its verdicts per mode and axis; per mode and characteristic,
    the tasks' margin-scaled N slopes beside the characteristic, with Spearman's rho over tasks when there are at
    least MIN_RELATION_TASKS. Descriptive: tasks are few and not sampled from anything, so no p-values."""
    if characteristics.empty:
        return skipped("no task characteristics (results/tasks.parquet is missing or has no usable row)")
    by_task = {row["task"]: row for row in characteristics.to_dict("records")}
    tasks = []
    for name in sorted(set(by_task) | {entry["task"] for entry in trends}):
        row = by_task.get(name)
        record = {"task": name, "measured": row is not None}
        if row is not None:
            counts = {key: _scalar(row.get(key)) for key in ("n_molecules", "n_labels", "n_classes", "n_scaffolds")}
            record.update({key: None if value is None else int(value) for key, value in counts.items()})
            record.update(
                {key: _scalar(row.get(key)) for key in (*TASK_CHARACTERISTICS, "nn_tanimoto_median", "max_label_sd")}
            )
            record["task_type"] = row.get("task_type")
        record["modes"] = {}
        for entry in (e for e in trends if e["task"] == name):
            slope, ci = _scaled_n_slope(entry)
            record["modes"][entry["mode"]] = {
                "metric": entry["metric"],
                "higher_is_better": entry["higher_is_better"],
                "n_slope_in_margins": slope,
                "n_slope_in_margins_ci": ci,
                "verdicts": {
                    key: {
                        "verdict": v.get("verdict"),
                        "status": v["status"],
                        "reason": v.get("reason"),
                        "slope": v.get("slope"),
                        "ci": v.get("ci"),
                        "margin": v.get("margin"),
                    }
                    for key, v in entry["verdicts"].items()
                },
            }
        tasks.append(record)
    relation = []
    for mode in sorted({mode for record in tasks for mode in record["modes"]}):
        for column, (words, _) in TASK_CHARACTERISTICS.items():
            pairs = [
                (record["task"], record[column], record["modes"][mode]["n_slope_in_margins"])
                for record in tasks
                if record["measured"] and mode in record["modes"]
            ]
            pairs = [(task, x, y) for task, x, y in pairs if x is not None and y is not None]
            out = {
                "mode": mode,
                "characteristic": column,
                "words": words,
                "n_tasks": len(pairs),
                "tasks": [task for task, _, _ in pairs],
                "x": [x for _, x, _ in pairs],
                "n_slope_in_margins": [y for _, _, y in pairs],
                "spearman": None,
                "reason": "",
            }
            xs, ys = np.array(out["x"], float), np.array(out["n_slope_in_margins"], float)
            if len(pairs) < MIN_RELATION_TASKS:
                out["reason"] = f"{len(pairs)} task(s) with both values; a rank correlation needs {MIN_RELATION_TASKS}"
            elif np.ptp(xs) == 0 or np.ptp(ys) == 0:
                out["reason"] = "no spread in one of the two"
            else:
                out["spearman"] = float(pd.Series(xs).rank().corr(pd.Series(ys).rank()))
            relation.append(out)
    return {
        "status": "ok",
        "descriptive": "few tasks, not a sample: rank correlations describe, no p-values",
        "slope": "N at fixed D, per decade, signed so > 0 is improvement, in units of the task's plateau margin",
        "characteristics": {column: words for column, (words, _) in TASK_CHARACTERISTICS.items()},
        "tasks": tasks,
        "relation": relation,
    }


# --------------------------------------------------------------------------------------------
# the stage


def fit_run(
    run_dir: Path | RunDir, *, n_bootstrap: int | None = None, n_jobs: int | None = None, n_starts: int = 100
) -> dict:
    """Fit everything in run_dir/results; write results/fits.json and results/fits.parquet; return the JSON dict.

    n_bootstrap: overrides sweep.yaml's fits.n_bootstrap (0 skips the law intervals). n_jobs: bootstrap processes.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    inputs = rd.fit_inputs()
    s = FitSettings.from_config(inputs.config.fits, n_bootstrap=n_bootstrap, n_jobs=n_jobs, n_starts=n_starts)
    checkpoints, points = inputs.checkpoints, inputs.points
    finetune, hessian, landscape = (inputs.measured[name] for name in ("finetune", "hessian", "landscape"))
    rows = pretrained_rows(finetune, checkpoints)
    log.info(
        "fit %s: %d checkpoints, %d downstream points, %d bootstrap resamples",
        inputs.config.name,
        len(checkpoints),
        len(points),
        s.n_bootstrap,
    )
    fits: dict[str, Any] = {
        "run": inputs.config.name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(s),
        "tables": {name: (len(table) if inputs.present[name] else None) for name, table in inputs.tables.items()},
        "n_checkpoints": len(checkpoints),
        "excluded": inputs.excluded,
    }
    arms = checkpoint_arms(checkpoints)
    if arms.nunique() <= 1:
        trends, trend_tests = downstream_trends(rows, points, s)
        fits.update(_arm_fits(checkpoints, points, rows, finetune, hessian, landscape, trends, inputs, s))
        fits["trend_tests"] = trend_tests
    else:
        # never pooled across an axis: every law, proxy and ladder per arm; the downstream trends of all arms
        # are computed together so that one correction covers every test the report makes
        arm_of = dict(zip(checkpoints["trial_id"], arms, strict=True))
        tagged_rows = rows.assign(arm=rows["trial_id"].map(arm_of)) if not rows.empty else rows
        tagged_points = points.assign(arm=points["trial_id"].map(arm_of)) if not points.empty else points
        trends, trend_tests = downstream_trends(tagged_rows, tagged_points, s)
        fits["axes"] = {column: values for column, values in axis_values(checkpoints).items() if len(values) > 1}
        fits["trend_tests"] = trend_tests
        fits["arms"] = []
        for arm in sorted(arms.unique()):
            trials = set(checkpoints.loc[arms == arm, "trial_id"])

            def mine(table: pd.DataFrame, trials: set = trials) -> pd.DataFrame:
                return table[table["trial_id"].isin(trials)] if not table.empty else table

            # the feature baselines (Morgan, random forests) belong to no trial: every arm is compared with them
            arm_finetune = (
                finetune[finetune["trial_id"].isin(trials) | ~finetune["mode"].isin([*PRETRAINED_MODES, "random_init"])]
                if not finetune.empty
                else finetune
            )
            arm_trends = [entry for entry in trends if entry["arm"] == arm]
            section = _arm_fits(
                mine(checkpoints), mine(points), mine(rows), arm_finetune, mine(hessian), mine(landscape),
                arm_trends, inputs, s,
            )  # fmt: skip
            values = {column: _axis_value(value) for column, value in _axis_row(checkpoints[arms == arm]).items()}
            fits["arms"].append(
                {"arm": arm, "slug": arm_slug(arm), "axes": values, "n_checkpoints": len(mine(checkpoints)), **section}
            )
    fits = json_safe(fits)
    found = findings(fits)
    fits["findings"] = [text for text, _ in found]
    fits["finding_links"] = [anchor for _, anchor in found]
    rd.write_fits(fits, fits_table(fits))
    return fits


# --------------------------------------------------------------------------------------------
# the grid's axes: a law or a verdict is fitted per arm (one value of each axis), never pooled across them

AXIS_COLUMNS = ("representation", "family", "mlm_probability")  # pretrain.parquet's record of each trial's axis values


def _axis_value(value):
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(value) else float(value)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def axis_values(checkpoints: pd.DataFrame) -> dict[str, list]:
    """Per axis column present: its distinct values among the checkpoints (None for not applicable or unrecorded)."""
    out = {}
    for column in AXIS_COLUMNS:
        if column in checkpoints.columns and not checkpoints.empty:
            values = {_axis_value(v) for v in checkpoints[column]}
            out[column] = sorted(values, key=lambda v: (v is None, str(v)))
    return out


def _axis_row(rows: pd.DataFrame) -> dict:
    return {column: rows[column].iloc[0] for column in AXIS_COLUMNS if column in rows.columns and not rows.empty}


def checkpoint_arms(checkpoints: pd.DataFrame, axes_of: pd.DataFrame | None = None) -> pd.Series:
    """Each checkpoint's arm: the values of the axes that vary in this run, e.g. "family=llama" or
    "family=mlm, mlm_probability=0.3" ("" when no axis varies). A value that does not apply (the masking ratio of
    a clm family) is left out of the label. axes_of: the rows that decide which axes vary (default: these)."""
    reference = checkpoints if axes_of is None else axes_of
    varying = [column for column, values in axis_values(reference).items() if len(values) > 1]
    if checkpoints.empty or not varying:
        return pd.Series([""] * len(checkpoints), index=checkpoints.index, dtype=object)

    def label(row) -> str:
        parts = [(column, _axis_value(row[column])) for column in varying]
        return ", ".join(f"{column}={value:g}" if isinstance(value, float) else f"{column}={value}"
                         for column, value in parts if value is not None)  # fmt: skip

    return checkpoints.apply(label, axis=1).astype(object)


def arm_slug(arm: str) -> str:
    """An arm as a file-name and HTML-anchor suffix: "family=mlm, mlm_probability=0.3" ->
    "family-mlm-mlm_probability-0.3"."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", arm).strip("-")


def _arm_fits(checkpoints, points, rows, finetune, hessian, landscape, trends, inputs, s: FitSettings) -> dict:
    """The fits of one arm (or of the whole run when no axis varies): laws, trends, baselines, proxies, ladders."""
    per_checkpoint = checkpoint_table(rows, points)
    compared, baseline_tests = baselines(finetune, rows, s)
    proxies = (
        fit_proxies(checkpoint_proxies(per_checkpoint, hessian, landscape), s)
        if not per_checkpoint.empty
        else skipped("no downstream results")
    )
    return {
        "loss_law": fit_loss_law(checkpoints, s),
        "loss_law_backtest": backtest_loss_law(checkpoints, s),
        "compute_law": fit_compute_law(checkpoints, s),
        "downstream": trends,
        "baselines": compared,
        "baseline_tests": baseline_tests,
        "proxies": proxies,
        "task_ladder": task_ladders(per_checkpoint, s),
        "task_characteristics": task_scaling(inputs.characteristics, trends),
    }


# --------------------------------------------------------------------------------------------
# fits.parquet: fits.json in long format, one row per estimated quantity; each section gives its own rows


def _row(what, parameter="", estimate=None, ci=(None, None), n_points=None, task="", mode="", x="", note="") -> dict:
    lo, hi = ci if ci is not None else (None, None)
    return {
        "what": what,
        "task": task,
        "mode": mode,
        "x": x,
        "parameter": parameter,
        "estimate": estimate,
        "ci_lo": lo,
        "ci_hi": hi,
        "n_points": n_points,
        "note": note,
    }


def _fit_rows(what: str, result: dict, **where) -> list[dict]:
    """One row per parameter of a fitted law (with its interval), or one row saying why it was skipped; the note
    says whether the grid identifies the law."""
    if result["status"] != "ok":
        return [_row(what, note=f"skipped: {result['reason']}", **where)]
    note = (
        "identified"
        if result.get("identified", True)
        else "not identified: "
        + "; ".join(f"{p['parameter']}: {p['problem']}" for p in result["identification"]["problems"])
    )
    return [
        _row(what, name, value, result.get("ci", {}).get(name), result.get("n_points"), note=note, **where)
        for name, value in result["params"].items()
    ]


def loss_law_rows(law: dict) -> list[dict]:
    rows = _fit_rows("loss_law", law)
    if law["status"] == "ok" and law["frontier"]["status"] == "ok":
        frontier = law["frontier"]
        rows += [
            _row(
                "loss_law_frontier",
                name,
                frontier[name],
                frontier.get(f"{name}_ci"),
                law["n_points"],
                note="N* ∝ C^a, D* ∝ C^b",
            )
            for name in ("n_params_exponent", "n_tokens_exponent")
        ]
    return rows


def backtest_rows(test: dict) -> list[dict]:
    if test["status"] != "ok":
        return [_row("loss_law_backtest", note=f"skipped: {test['reason']}")]
    return [
        _row("loss_law_backtest", name, test[name], n_points=test["n_holdout"])
        for name in ("mean_abs_relative_error", "max_abs_relative_error")
    ]


def compute_law_rows(compute: dict) -> list[dict]:
    if compute["status"] != "ok":
        return [_row("compute_law", note=f"skipped: {compute['reason']}")]
    return [
        row
        for key in ("saturating_frontier", "saturating_all", "loglog_frontier", "loglog_all")
        for row in _fit_rows(f"compute_law_{key}", compute[key], x="flops")
    ]


def downstream_rows(entries: list[dict]) -> list[dict]:
    """Per (task, mode, axis): the slope with its interval, the margin, the detectable slope, raw and adjusted p;
    the note carries the verdict."""
    rows = []
    for entry in entries:
        where = {"task": entry["task"], "mode": entry["mode"]}
        for key, v in entry["verdicts"].items():
            x = AXES[key][2]
            if v["status"] != "ok":
                rows.append(_row("downstream_trend", note=f"not testable: {v['reason']}", x=x, **where))
                continue
            note = f"{v['verdict']}; {v['held_fixed']}; {v['correction']}"
            rows.append(
                _row(
                    "downstream_trend", "slope_per_decade", v["slope"], v["ci"], v["n_points"], x=x, note=note, **where
                )
            )
            rows += [
                _row("downstream_trend", name, v[name], n_points=v["n_points"], x=x, note=note, **where)
                for name in ("margin", "min_detectable_slope", "p_verdict", "p_adjusted")
            ]
        for x, result in entry["power_law"].items():
            rows += _fit_rows("downstream_law", result, x=x, **where)
    return rows


def baseline_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for entry in entries:
        for mode in BASELINES:
            spread = entry[mode]
            if spread is not None:
                sd = spread["sd"] if spread["sd"] is not None else math.nan
                rows.append(
                    _row(
                        "baseline",
                        entry["metric"],
                        spread["mean"],
                        (spread["mean"] - sd, spread["mean"] + sd),
                        spread["n"],
                        task=entry["task"],
                        mode=mode,
                        note="interval: mean ± 1 sd over split seeds",
                    )
                )
        best = entry["best_pretrained"]
        if best["status"] == "ok" and best["test"] is not None:
            rows.append(
                _row(
                    "best_pretrained",
                    entry["metric"],
                    best["test"]["mean"],
                    n_points=best["test"]["n"],
                    task=entry["task"],
                    mode=best["mode"],
                    x=f"{best['trial_id']}@{best['tokens']:.0f}",
                    note=f"chosen on validation (mean {best['val_mean']:.4g}); test mean over split seeds",
                )
            )
        for mode, comparison in entry["comparisons"].items():
            if comparison["status"] == "ok":
                rows.append(
                    _row(
                        "baseline_comparison",
                        "paired_difference",
                        comparison["mean"],
                        comparison["ci"],
                        comparison["n_pairs"],
                        task=entry["task"],
                        mode=mode,
                        note=f"{comparison['finding']}; p = {comparison['p']}, adjusted "
                        f"{comparison.get('p_adjusted')} ({comparison.get('correction', '')})",
                    )
                )
    return rows


def proxy_rows(proxies: dict) -> list[dict]:
    if proxies["status"] != "ok":
        return []
    rows = []
    for row in proxies["correlations"]:
        where = {
            "task": row["task"],
            "mode": row["mode"],
            "x": row["proxy"],
            "note": f"descriptive ({row['timing']}){'; ' + row['reason'] if row['reason'] else ''}",
        }
        rows.append(
            _row("proxy_correlation", "spearman", row["spearman"], (row["ci_lo"], row["ci_hi"]), row["n"], **where)
        )
        rows.append(
            _row(
                "proxy_correlation",
                "partial_given_loss",
                row["partial_given_loss"],
                (row["partial_ci_lo"], row["partial_ci_hi"]),
                row["n_partial"],
                **where,
            )
        )
    for row in proxies["prediction"]:
        where = {"task": row["task"], "mode": row["mode"], "x": row["proxy"]}
        if row["status"] != "ok":
            rows.append(_row("proxy_prediction", note=f"not testable: {row['reason']}", **where))
            continue
        note = f"{row['finding']}; p = {row['p']:.3g}, adjusted {row.get('p_adjusted')} ({row.get('correction', '')})"
        rows += [
            _row("proxy_prediction", name, row[name], n_points=row["n_points"], note=note, **where)
            for name in ("rmse_loss", "rmse_loss_proxy")
        ]
        rows.append(
            _row(
                "proxy_prediction",
                "improvement",
                row["improvement"],
                row["improvement_ci"],
                row["n_points"],
                note=note,
                **where,
            )
        )
    for group in proxies["regret"]:
        rows += [
            _row(
                "selection_regret",
                pick["selector"],
                pick["regret"],
                n_points=pick["n_candidates"],
                task=group["task"],
                mode=group["mode"],
                x=pick["column"],
                note=f"picks the {pick['direction']}; regret against the test-best, metric units",
            )
            for pick in group["selectors"]
        ]
    return rows


def ladder_rows(ladder: dict) -> list[dict]:
    if ladder["status"] != "ok":
        return [_row("task_ladder_backtest", note=f"skipped: {ladder['reason']}")]
    rows = []
    for entry in ladder["entries"]:
        where = {"task": entry["task"], "mode": entry["mode"]}
        if entry["status"] != "ok":
            rows.append(_row("task_ladder_backtest", note=f"skipped: {entry['reason']}", **where))
            continue
        rows += [
            _row(
                "task_ladder_backtest",
                name,
                entry[name],
                n_points=entry["n_holdout"],
                note=f"{entry['fit']['loss_law']} law, {entry['fit']['link']} link",
                **where,
            )
            for name in (
                "mean_abs_error",
                "max_abs_error",
                "link_only_mean_abs_error",
                "task_loss_mean_abs_relative_error",
            )
        ]
    return rows


def task_scaling_rows(section: dict) -> list[dict]:
    """Per (mode, characteristic): Spearman's rho over tasks of the margin-scaled N slope (descriptive)."""
    if section.get("status") != "ok":
        return []
    return [
        _row(
            "task_scaling",
            "spearman",
            row["spearman"],
            n_points=row["n_tasks"],
            mode=row["mode"],
            x=row["characteristic"],
            note="descriptive, over tasks; " + (row["reason"] or "no p-value"),
        )
        for row in section["relation"]
    ]


def fits_table(fits: dict) -> pd.DataFrame:
    """fits.json in long format: one row per estimated quantity (arm, what, task, mode, x, parameter, estimate, CI)."""
    rows = [
        {"arm": arm, **row}
        for arm, _, view in arm_views(fits)
        for row in (
            loss_law_rows(view["loss_law"])
            + backtest_rows(view["loss_law_backtest"])
            + compute_law_rows(view["compute_law"])
            + downstream_rows(view["downstream"])
            + baseline_rows(view["baselines"])
            + proxy_rows(view["proxies"])
            + ladder_rows(view["task_ladder"])
            + task_scaling_rows(view.get("task_characteristics", {}))
        )
    ]
    table = pd.DataFrame(rows, columns=list(TABLES["fits"].columns))
    for name in ("estimate", "ci_lo", "ci_hi", "n_points"):
        table[name] = pd.to_numeric(table[name], errors="coerce").astype(float)
    return table


# --------------------------------------------------------------------------------------------
# `clmscale fit --table`: one law, or one trend, on any table


LAWS = {
    "chinchilla": "L(N, D) = E + A/N^alpha + B/D^beta (Huber fit in log space, bootstrap intervals)",
    "effective": "L(N, D, U) with D' discounting repeated tokens, R* fitted (Muennighoff et al. 2023)",
    "compute": "y = E + A·x^(−gamma), e.g. L(C) (Huber fit in log space, bootstrap intervals)",
    "power": "y = A·x^k (OLS on log-log axes, t intervals)",
    "trend": "the slope of y per decade of x, read as improving / degrading / plateau / inconclusive",
}


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    if suffixes.endswith(".parquet"):
        return pd.read_parquet(path)
    raise ValueError(f"{path}: expected a .csv, .csv.gz or .parquet table, got '{path.suffix}'")


def _check_columns(path: Path, table: pd.DataFrame, wanted: dict[str, str]) -> None:
    """Every {option: column} names a column of the table, or a ValueError that names the option and the columns."""
    for option, column in wanted.items():
        if column not in table.columns:
            available = ", ".join(map(str, table.columns))
            raise ValueError(f"{path}: no column '{column}' ({option}); the columns are {available}")


def fit_table(
    path: Path,
    law: str = "chinchilla",
    *,
    n_col: str = "N",
    d_col: str = "D",
    y_col: str = "loss",
    x_col: str = "C",
    u_col: str = "U",
    bootstrap: int = 1000,
    huber_delta: float = 1e-3,
    seed: int = 0,
    n_jobs: int | None = None,
    n_starts: int = 100,
) -> dict:
    """Fit one law (see LAWS; "trend" is `trend_table`) to columns of a CSV or Parquet table; the summary dict
    with intervals, identification and warnings."""
    if law not in LAWS or law == "trend":
        raise ValueError(
            f"unknown law '{law}'; expected one of {', '.join(name for name in LAWS if name != 'trend')}"
            + (" (trend: see trend_table)" if law == "trend" else "")
        )
    table = read_table(path)
    wanted = (
        {"--n-col": n_col, "--d-col": d_col, "--y-col": y_col, **({"--u-col": u_col} if law == "effective" else {})}
        if law in ("chinchilla", "effective")
        else {"--x-col": x_col, "--y-col": y_col}
    )
    _check_columns(path, table, wanted)
    values = {column: pd.to_numeric(table[column], errors="coerce").to_numpy(float) for column in wanted.values()}
    estimator: ChinchillaFit | SaturatingPowerLaw | LogLogOLS
    data: tuple[np.ndarray, ...]
    if law in ("chinchilla", "effective"):
        estimator = (DataConstrainedFit if law == "effective" else ChinchillaFit)(
            huber_delta=huber_delta, n_bootstrap=bootstrap, seed=seed, n_jobs=n_jobs, n_starts=n_starts
        )
        data = (values[n_col], values[d_col], values[y_col]) + ((values[u_col],) if law == "effective" else ())
    elif law == "compute":
        estimator = SaturatingPowerLaw(huber_delta=huber_delta, n_bootstrap=bootstrap, seed=seed, n_jobs=n_jobs)
        data = (values[x_col], values[y_col])
    else:
        estimator = LogLogOLS()
        data = (values[x_col], values[y_col])
    notes: list[str] = []
    with _kept_warnings(notes, type(estimator).__name__):
        estimator.fit(*data)
    found = identification(estimator)
    return json_safe(
        {
            "table": str(path),
            "law_name": law,
            "columns": {k.strip("-"): v for k, v in wanted.items()},
            "n_rows": len(table),
            **estimator.to_dict(),
            "identified": found.identified,
            "identification_sentence": found.sentence(estimator.formula),
            "warnings": notes,
        }
    )


def trend_table(
    path: Path,
    x_col: str,
    y_col: str,
    *,
    group_col: str | None = None,
    higher_is_better: bool = True,
    margin: float | None = None,
    method: str | None = None,
) -> dict:
    """fits.verdicts.trend_on_table on a CSV or Parquet table: the slope of y_col per decade of x_col (log10), its
    interval, the margin, the minimal detectable slope and the verdict. group_col: the independent unit (a run);
    method: the interval (fits.slopes.METHODS; default the cluster jackknife with group_col, else OLS)."""
    table = read_table(path)
    _check_columns(
        path,
        table,
        {"--x-col": x_col, "--y-col": y_col, **({"--group-col": group_col} if group_col is not None else {})},
    )
    if margin is None and y_col not in PLATEAU_MARGINS:
        raise ValueError(
            f"{path}: no default plateau margin for '{y_col}' (defaults exist for "
            f"{', '.join(sorted(PLATEAU_MARGINS))}); give --margin M in {y_col} units per decade of "
            f"{x_col}"
        )
    if margin is None and PLATEAU_MARGINS[y_col][1] == "label_sd":
        raise ValueError(
            f"{path}: the default {metric_label(y_col)} margin is a fraction of the task's label sd, "
            f"which a table does not carry; give --margin M in {y_col} units per decade of {x_col}"
        )
    return {
        "table": str(path),
        **trend_on_table(
            table, x_col, y_col, group_col=group_col, higher_is_better=higher_is_better, margin=margin, method=method
        ),
    }


def format_fit(result: dict) -> str:
    """A fit summary as a few lines of text: the law, each parameter with its interval, identification, warnings."""
    level = round(100 * result["hyperparameters"].get("ci_level", LEVEL))
    lines = [f"{result['table']}: {result['law']}  ({result['n_points']} of {result['n_rows']} rows used)"]
    for name, value in result["params"].items():
        lo, hi = result["ci"].get(name, (None, None))
        interval = f"   {level} % CI [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else ""
        lines.append(f"  {name:>6s} = {value:.4g}{interval}")
    if "frontier" in result and result["identified"]:
        frontier = result["frontier"]
        lines.append(
            f"  compute-optimal: N* ∝ C^{frontier['n_params_exponent']:.3f}, D* ∝ C^{frontier['n_tokens_exponent']:.3f}"
        )
    if "r_squared" in result:
        lines.append(f"  R² = {result['r_squared']:.4f}")
    lines.append(f"  {result['identification_sentence']}")
    lines += [f"  warning: {note}" for note in result["warnings"]]
    return "\n".join(lines)
