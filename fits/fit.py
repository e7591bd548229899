"""The `fit` stage: a run directory's result tables in, results/fits.json and results/fits.parquet out.

`fit_run(run_dir)` answers the run's question with the estimators of this package, in this order:
1. which checkpoints count: diverged trials and failed measurements are left out, each with a note;
2. L(N, D) (ChinchillaFit) on every finished checkpoint, its compute-optimal frontier, and a back-test
   that refits without the largest rungs and predicts them; L(C) on the compute frontier and on all points;
3. each downstream task and mode against N, C and pretraining loss: the trend at the largest scales,
   a monotone-trend test, a saturating law; and the Morgan-fingerprint and random-init baselines;
4. which proxies (N, D, C, pretraining loss, Hessian λmax and trace, sharpness) rank-correlate with
   the downstream metric, and whether any predicts it beyond pretraining loss;
5. `findings`: plain sentences built from the numbers above and nothing else.
Whatever a small run cannot support becomes {"status": "skipped", "reason": ...}, never an error.

Its inputs (the config, the tables, the checkpoints and measurements that count) come from
`RunDir.fit_inputs()`, the same call the report makes. `fit_table(path, law)` fits one law to any
table (e.g. published points) for `clmscale fit --table`. No Ray and no torch here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from engine.config import FitsConfig
from engine.files import json_safe
from engine.rundir import TABLES, RunDir
from fits.correlate import LABELS, describe_correlation, proxy_correlations
from fits.downstream import (DownstreamPowerLaw, format_scale, monotone_trend, trend_at_largest_scales)
from fits.powerlaw import ChinchillaFit, LogLogOLS, SaturatingPowerLaw, backtest

log = logging.getLogger(__name__)

MODES = {"finetune": "fine-tuned", "probe": "linear probe"}
BASELINES = {"morgan_fp": "Morgan fingerprints", "random_init": "random-init model"}
METRIC_LABELS = {"roc_auc": "ROC-AUC", "rmse": "RMSE"}
# downstream trends are read against these columns: (words in sentences, does the column grow with scale?)
SCALES = {
    "n_params_non_embedding": ("non-embedding parameters", True),
    "flops": ("FLOPs", True),
    "pretrain_val_loss": ("pretraining loss", False),
}
PROXIES = ("n_params", "tokens", "flops", "pretrain_val_loss", "lambda_max", "trace", "ft_lambda_max", "ft_trace",
           "eps_sharpness", "adaptive_sharpness")
MIN_LAW_POINTS = 5  # distinct (N, D) for L(N, D): one per parameter
MIN_CURVE_POINTS = 4  # distinct x for a three-parameter one-variable law, one more than its parameters
MIN_PROXY_POINTS = 8  # checkpoints below which a bootstrap interval of a partial rank correlation is degenerate
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
    n_jobs: int | None = None  # bootstrap processes; None: one per CPU
    n_starts: int = 100  # ChinchillaFit's screened starting points

    @classmethod
    def from_config(cls, fits: FitsConfig, **overrides) -> FitSettings:
        values = {**fits.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)


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
    """estimator.fit(*data).to_dict() with status and warnings, or skipped with the reason it could not fit."""
    notes: list[str] = []
    try:
        with _kept_warnings(notes, type(estimator).__name__):
            estimator.fit(*data)
    except FIT_ERRORS as err:
        return {**skipped(f"{type(err).__name__}: {err}"), "warnings": notes}
    return {"status": "ok", **estimator.to_dict(), "warnings": notes}


def _chinchilla(s: FitSettings, n_bootstrap: int | None = None) -> ChinchillaFit:
    return ChinchillaFit(huber_delta=s.huber_delta, n_bootstrap=s.n_bootstrap if n_bootstrap is None else n_bootstrap,
                         seed=s.seed, n_jobs=s.n_jobs, n_starts=s.n_starts)


def fit_loss_law(points: pd.DataFrame, s: FitSettings) -> dict:
    """L(N, D) on (n_params_non_embedding, tokens, val_loss) of every usable checkpoint, and N*(C), D*(C)."""
    n, d, loss = (points[name].to_numpy(float) for name in ("n_params_non_embedding", "tokens", "val_loss"))
    n_distinct = len(set(zip(n, d)))
    if n_distinct < MIN_LAW_POINTS:
        return skipped(f"{n_distinct} distinct (N, D) points; L(N, D) has 5 parameters and needs at least "
                       f"{MIN_LAW_POINTS}")
    if np.unique(n).size < 2 or np.unique(d).size < 2:
        return skipped(f"{np.unique(n).size} model size(s) and {np.unique(d).size} token count(s): "
                       "L(N, D) needs at least 2 of each")
    law = _chinchilla(s)
    result = _fitted(law, n, d, loss)
    if result["status"] != "ok":
        return result
    result.update(n_distinct_points=n_distinct, n_rungs=int(np.unique(n).size))
    result["frontier"].update(_frontier(law, points))
    return result


def _frontier(law: ChinchillaFit, points: pd.DataFrame) -> dict:
    """N*(C), D*(C) over the measured range of C and two decades beyond, with bootstrap intervals of the exponents.

    C is taken as flops_per_param_token·N·D with the constant measured on this run (the median of
    flops / (N·D) over its checkpoints; 6 when no FLOPs were recorded), so the curve shares the FLOPs axis of
    the data instead of assuming the 6·N·D of Kaplan et al. for models whose embeddings and attention count.
    """
    n, d, flops = (points[name].to_numpy(float) for name in ("n_params_non_embedding", "tokens", "flops"))
    ratio = flops / (n * d)
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    per_param_token = float(np.median(ratio)) if ratio.size else 6.0
    measured = per_param_token * n * d
    grid = np.logspace(math.log10(measured.min()), math.log10(measured.max()) + FRONTIER_DECADES_BEYOND, 25)
    curve = law.frontier(grid, flops_per_param_token=per_param_token)
    out = {"flops_per_param_token": per_param_token, "flops": curve.flops, "n_params": curve.n_params,
           "n_tokens": curve.n_tokens, "loss": curve.loss}
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
        return skipped(f"{rungs.size} model size(s): holding out the {s.holdout_rungs} largest leaves fewer than 2 "
                       "to fit")
    train = points[n < rungs[-s.holdout_rungs]]
    n_distinct = len(set(zip(train["n_params_non_embedding"], train["tokens"])))
    if n_distinct < MIN_LAW_POINTS:
        return skipped(f"without the {s.holdout_rungs} largest rung(s) {n_distinct} distinct (N, D) points are "
                       f"left; L(N, D) needs at least {MIN_LAW_POINTS}")
    notes: list[str] = []
    try:
        with _kept_warnings(notes, "backtest"):
            result = backtest(n, points["tokens"], points["val_loss"], n_holdout_rungs=s.holdout_rungs,
                              estimator=_chinchilla(s, n_bootstrap=0))
    except FIT_ERRORS as err:
        return {**skipped(f"{type(err).__name__}: {err}"), "warnings": notes}
    return {"status": "ok", "holdout_rungs": s.holdout_rungs, "holdout_n_params": list(result.holdout_n_params),
            "n_train": result.n_train, "n_holdout": result.n_holdout,
            "mean_abs_relative_error": result.mean_abs_relative_error,
            "max_abs_relative_error": result.max_abs_relative_error, "params": result.fit.params_,
            "points": result.points.to_dict("records"), "warnings": notes}


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
    out = {"status": "ok", "n_points": len(with_flops),
           "frontier_points": frontier[["trial_id", "rung", "n_params_non_embedding", "tokens", "flops",
                                        "val_loss"]].to_dict("records")}
    for which, data in (("frontier", frontier), ("all", with_flops)):
        flops, loss = data["flops"].to_numpy(float), data["val_loss"].to_numpy(float)
        n_x = np.unique(flops).size
        out[f"saturating_{which}"] = (
            _fitted(SaturatingPowerLaw(huber_delta=s.huber_delta, n_bootstrap=s.n_bootstrap, seed=s.seed,
                                       n_jobs=s.n_jobs), flops, loss)
            if n_x >= MIN_CURVE_POINTS else
            skipped(f"{n_x} distinct C on the {which} points; E + A·C^(−γ) needs at least {MIN_CURVE_POINTS}"))
        out[f"loglog_{which}"] = (_fitted(LogLogOLS(), flops, loss) if len(data) >= 3 and n_x >= 2 else
                                  skipped(f"{len(data)} {which} point(s) at {n_x} distinct C; a log-log line with an "
                                          "interval needs 3 points at 2 or more C"))
    return out


# --------------------------------------------------------------------------------------------
# 3. Downstream: trends against scale, and the baselines


def downstream_trends(points: pd.DataFrame, s: FitSettings) -> list[dict]:
    """Per (task, mode): trend at the largest scales, monotone trend and a saturating law, against N, C and loss."""
    entries: list[dict] = []
    if points.empty:
        return entries
    for (task, mode), group in points.groupby(["task", "mode"], sort=True):
        metric = str(group["metric"].iloc[0])
        higher_is_better = bool(group["higher_is_better"].iloc[0])
        label = METRIC_LABELS.get(metric, metric)
        entry = {"task": task, "mode": mode, "metric": metric, "metric_label": label,
                 "higher_is_better": higher_is_better, "n_checkpoints": len(group),
                 "trends": {}, "monotone": {}, "power_law": {}}
        metric_values = group["mean"].to_numpy(float)
        for x, (words, grows) in SCALES.items():
            scale = group[x].to_numpy(float)
            entry["trends"][x] = _trend(scale, metric_values, higher_is_better, grows,
                                        f"{task} ({MODES.get(mode, mode)})", label, words)
            entry["monotone"][x] = _monotone(scale, metric_values, higher_is_better == grows)
        for x in ("n_params_non_embedding", "flops"):
            scale = group[x].to_numpy(float)
            n_x = np.unique(scale[np.isfinite(scale) & (scale > 0)]).size
            entry["power_law"][x] = (
                _fitted(DownstreamPowerLaw(higher_is_better=higher_is_better, huber_delta=s.huber_delta,
                                           n_bootstrap=s.n_bootstrap, seed=s.seed, n_jobs=s.n_jobs), scale,
                        metric_values)
                if n_x >= MIN_CURVE_POINTS else
                skipped(f"{n_x} distinct {SCALES[x][0]}; the saturating law needs at least {MIN_CURVE_POINTS}"))
        entries.append(entry)
    return entries


def _trend(x, metric, higher_is_better, grows, who, metric_label, x_words) -> dict:
    notes: list[str] = []
    try:
        with _kept_warnings(notes, "trend_at_largest_scales"):
            trend = trend_at_largest_scales(x, metric, higher_is_better=higher_is_better, x_grows_with_scale=grows)
    except FIT_ERRORS as err:
        return {**skipped(str(err)), "warnings": notes}
    return {"status": "ok", **dataclasses.asdict(trend), "sentence": trend.sentence(who, metric_label, x_words),
            "warnings": notes}


def _monotone(x, metric, improving_when_rising) -> dict:
    """monotone_trend with `direction` read in the sense of growing scale (x = loss falls as scale grows)."""
    notes: list[str] = []
    try:
        with _kept_warnings(notes, "monotone_trend"):
            result = monotone_trend(x, metric, higher_is_better=improving_when_rising)
    except FIT_ERRORS as err:
        return {**skipped(str(err)), "warnings": notes}
    return {"status": "ok", **dataclasses.asdict(result), "warnings": notes}


def _spread(values: pd.Series) -> dict | None:
    values = values[np.isfinite(values.to_numpy(float))]
    if values.empty:
        return None
    return {"mean": float(values.mean()), "sd": float(values.std()) if len(values) > 1 else math.nan,
            "n": int(len(values))}


def baselines(finetune: pd.DataFrame, points: pd.DataFrame) -> list[dict]:
    """Per task: Morgan-fingerprint and random-init means, the best pretrained checkpoint, and a verdict sentence."""
    if finetune.empty:
        return []
    entries = []
    for task, rows in finetune.groupby("task", sort=True):
        metric = str(rows["metric"].iloc[0])
        higher_is_better = bool(rows["higher_is_better"].iloc[0])
        entry = {"task": task, "metric": metric, "metric_label": METRIC_LABELS.get(metric, metric),
                 "higher_is_better": higher_is_better}
        for mode in BASELINES:
            entry[mode] = _spread(rows.loc[rows["mode"] == mode, "value"])
        random_init = rows[rows["mode"] == "random_init"]
        if entry["random_init"] is not None:
            entry["random_init"]["per_rung"] = {str(rung): _spread(group["value"])
                                                for rung, group in random_init.groupby("rung", sort=False)}
        mine = points[points["task"] == task] if not points.empty else points
        entry["best_pretrained"] = None
        if not mine.empty:
            best = mine.loc[mine["mean"].idxmax() if higher_is_better else mine["mean"].idxmin()]
            entry["best_pretrained"] = {"mode": best["mode"], "trial_id": best["trial_id"], "rung": best.get("rung"),
                                        "tokens": float(best["tokens"]), "mean": float(best["mean"]),
                                        "sd": float(best["sd"]), "n": int(best["n_seeds"])}
        entry["sentence"] = _baseline_sentence(entry)
        entries.append(entry)
    return entries


def _baseline_sentence(entry: dict) -> str:
    task, label = entry["task"], entry["metric_label"]
    best, fingerprints, random_init = entry["best_pretrained"], entry["morgan_fp"], entry["random_init"]
    if best is None:
        return f"{task}: no pretrained checkpoint was evaluated, so pretraining cannot be compared with the baselines."
    reached = (f"On {task}, the best pretrained checkpoint ({MODES.get(best['mode'], best['mode'])}, {best['rung']}, "
               f"{format_scale(best['tokens'])} tokens) reaches {label} {_mean_sd(best)}")
    if fingerprints is None:
        return reached + "; there is no Morgan-fingerprint baseline to compare it with."
    versus = f" against {_mean_sd(fingerprints)} with Morgan fingerprints"
    if random_init is not None:
        versus += f" and {_mean_sd(random_init)} for the same architectures trained from random initialisation"
    sign = 1 if entry["higher_is_better"] else -1
    gain = sign * (best["mean"] - fingerprints["mean"])
    spread = max(np.nan_to_num(best["sd"]), np.nan_to_num(fingerprints["sd"]))
    if gain > spread:
        verdict = f"pretraining beats fingerprints on {task}"
    elif gain > 0:
        verdict = (f"pretraining does not beat fingerprints on {task} (it is ahead by {abs(gain):.3g}, within one "
                   f"seed-to-seed standard deviation)")
    else:
        verdict = f"pretraining does not beat fingerprints on {task}"
    return f"{reached}{versus}: {verdict}."


def _mean_sd(spread: dict) -> str:
    seeds = f"{spread['n']} seed{'s' if spread['n'] != 1 else ''}"
    if spread["sd"] is None or not np.isfinite(spread["sd"]):
        return f"{spread['mean']:.3g} ({seeds})"
    return f"{spread['mean']:.3g} ± {spread['sd']:.2g} ({seeds})"


# --------------------------------------------------------------------------------------------
# 4. Proxies: what predicts the downstream metric, beyond pretraining loss?


def checkpoint_proxies(points: pd.DataFrame, hessian: pd.DataFrame, landscape: pd.DataFrame) -> pd.DataFrame:
    """The downstream points with the proxies of their checkpoint joined: Hessian λmax and trace of the
    pretraining loss and of the point's own task's fine-tuning loss (ft_*), and sharpness."""
    keys = ["trial_id", "tokens"]
    out = points.copy()
    measured = []
    if not hessian.empty and {"loss", "lambda_max", "trace"} <= set(hessian.columns):
        rows = hessian[hessian["loss"] == "pretrain"]
        measured.append(rows.groupby(keys, sort=False)[["lambda_max", "trace"]].first().reset_index())
        rows = hessian[hessian["loss"].str.startswith("finetune:")].assign(task=lambda t: t["loss"].str[9:])
        rows = rows.rename(columns={"lambda_max": "ft_lambda_max", "trace": "ft_trace"})
        measured.append(rows.groupby([*keys, "task"], sort=False)[["ft_lambda_max", "ft_trace"]].first().reset_index())
    if not landscape.empty:
        rows = landscape[landscape["surface"] == "random_directions"] if "surface" in landscape.columns else landscape
        columns = [name for name in ("eps_sharpness", "adaptive_sharpness") if name in rows.columns]
        if columns:
            measured.append(rows.groupby(keys, sort=False)[columns].first().reset_index())
    for table in measured:
        on = [*keys, "task"] if "task" in table.columns else keys
        out = out.merge(table.astype({"tokens": float}), on=on, how="left")
    for name in PROXIES:
        if name not in out.columns:
            out[name] = np.nan
    return out


def fit_proxies(table: pd.DataFrame, s: FitSettings) -> dict:
    """proxy_correlations per (task, mode), with a sentence per row."""
    if table.empty:
        return skipped("no downstream results")
    present = [name for name in PROXIES if np.isfinite(table[name].to_numpy(float)).any()]
    rows = []
    for (task, mode), group in table.groupby(["task", "mode"], sort=True):
        metric = str(group["metric"].iloc[0])
        frame = group.rename(columns={"mean": metric}) if metric not in group.columns else group
        result = proxy_correlations(frame, metric, present, task_column="task", loss_column="pretrain_val_loss",
                                    n_bootstrap=s.n_bootstrap, seed=s.seed)
        result.insert(1, "mode", mode)
        who = f"{task} ({MODES.get(mode, mode)})"
        result["sentence"] = [describe_correlation({**row, "task": who}) for row in result.to_dict("records")]
        rows += result.to_dict("records")
    return {"status": "ok", "proxies": present, "not_measured": [name for name in PROXIES if name not in present],
            "labels": {name: LABELS.get(name, name) for name in PROXIES}, "rows": rows}


# --------------------------------------------------------------------------------------------
# 5. Findings: sentences from the numbers


def _estimate(result: dict, name: str) -> str:
    """'0.35 [0.30, 0.41]' from a fit summary; the interval is left out when there is none."""
    value = result["params"][name]
    lo, hi = result.get("ci", {}).get(name, (None, None))
    if value is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{_number(value)} (no interval)"
    return f"{_number(value)} [{_number(lo)}, {_number(hi)}]"


def _number(value: float | None, digits: int | None = None) -> str:
    """Three significant digits (or `digits` decimals), powers of ten outside 0.001…1000, a typographic minus."""
    if value is None:
        return "n/a"
    return (format_scale(value) if digits is None else f"{value:.{digits}f}").replace("-", "−")


def _level(result: dict) -> str:
    return f"{round(100 * result['hyperparameters'].get('ci_level', 0.95))} %"


def findings(fits: dict) -> list[str]:
    out = []
    law = fits["loss_law"]
    if law["status"] == "ok":
        n_boot = law["hyperparameters"]["n_bootstrap"]
        intervals = f"{_level(law)} bootstrap intervals over {n_boot} resamples" if n_boot else "no bootstrap"
        out.append(f"Pretraining loss follows L(N, D) = E + A/N^α + B/D^β over {law['n_points']} checkpoints of "
                   f"{law['n_rungs']} model sizes with α = {_estimate(law, 'alpha')}, β = {_estimate(law, 'beta')} "
                   f"and irreducible loss E = {_estimate(law, 'E')} nats/token ({intervals}).")
        frontier = law["frontier"]
        out.append(f"For a fixed compute budget C the fit puts N* ∝ C^{_number(frontier['n_params_exponent'], 2)} and "
                   f"D* ∝ C^{_number(frontier['n_tokens_exponent'], 2)}.")
    else:
        out.append(f"L(N, D) was not fitted: {law['reason']}.")
    test = fits["loss_law_backtest"]
    if test["status"] == "ok":
        sizes = ", ".join(format_scale(n) for n in test["holdout_n_params"])
        which = "largest model size" if test["holdout_rungs"] == 1 else f"{test['holdout_rungs']} largest model sizes"
        out.append(f"Refitted without the {which} (N = {sizes}), L(N, D) "
                   f"predicts the {test['n_holdout']} held-out losses to within "
                   f"{test['mean_abs_relative_error']:.1%} on average (at most {test['max_abs_relative_error']:.1%}).")
    elif law["status"] == "ok":
        out.append(f"No extrapolation back-test: {test['reason']}.")
    compute = fits["compute_law"]
    if compute["status"] == "ok" and compute["saturating_frontier"]["status"] == "ok":
        fit = compute["saturating_frontier"]
        out.append(f"Along the compute frontier ({fit['n_points']} checkpoints), L(C) = E + A·C^−γ with "
                   f"γ = {_estimate(fit, 'gamma')} and E = {_estimate(fit, 'E')} nats/token.")
    if compute["status"] == "ok" and compute["loglog_frontier"]["status"] == "ok":
        fit = compute["loglog_frontier"]
        out.append(f"A pure power law L ∝ C^k on the same points gives k = {_estimate(fit, 'k')} "
                   f"(R² = {_number(fit['r_squared'], 3)}).")
    for entry in fits["downstream"]:
        out.append(_downstream_sentence(entry))
    out += [entry["sentence"] for entry in fits["baselines"]]
    out += _proxy_sentences(fits["proxies"])
    out += _excluded_sentences(fits["excluded"])
    return out


def _downstream_sentence(entry: dict) -> str:
    phrase = {"improving": "still improves", "plateau": "is flat", "degrading": "gets worse"}
    by_n = entry["trends"]["n_params_non_embedding"]
    who = f"{entry['task']} ({MODES.get(entry['mode'], entry['mode'])}) {entry['metric_label']}"
    head = by_n["sentence"] if by_n["status"] == "ok" else f"{who}: no trend against parameters ({by_n['reason']})"
    others = [f"against {SCALES[x][0]} it {phrase[trend['verdict']]} at the largest scales "
              f"(slope {_signed(trend['slope'])} per decade)"
              for x, trend in entry["trends"].items() if x != "n_params_non_embedding" and trend["status"] == "ok"]
    return "; ".join([head, *others]) + "."


def _signed(value: float | None) -> str:
    """'+0.16', '−0.49': two significant digits and a typographic minus."""
    return "n/a" if value is None else f"{value:+.2g}".replace("-", "−")


def _proxy_sentences(proxies: dict) -> list[str]:
    """One sentence per proxy: in how many task/mode pairs its partial correlation given loss is non-zero."""
    if proxies["status"] != "ok":
        return [f"No proxy correlations: {proxies['reason']}."]
    out = []
    rows = pd.DataFrame(proxies["rows"])
    for proxy in proxies["proxies"]:
        if proxy == "pretrain_val_loss":
            continue
        mine = rows[rows["proxy"] == proxy].to_dict("records")
        words = proxies["labels"][proxy]
        testable = [row for row in mine if row["partial_ci_lo"] is not None and row["partial_ci_hi"] is not None
                    and row["n_partial"] >= MIN_PROXY_POINTS]
        predicts = [row for row in testable if row["partial_ci_lo"] > 0 or row["partial_ci_hi"] < 0]
        untested: dict[str, int] = {}  # reason: number of pairs
        for row in mine:
            if row in testable:
                continue
            reason = row["reason"] or (
                f"only {row['n_partial']} checkpoints; a verdict needs at least {MIN_PROXY_POINTS}"
                if row["n_partial"] else "too few checkpoints")
            untested[reason] = untested.get(reason, 0) + 1
        why = "; ".join(f"{count} pair{'s' if count > 1 else ''}: {reason}" for reason, count in untested.items())
        if not testable:
            out.append(f"Whether {words} predicts downstream performance beyond pretraining loss could not be "
                       f"tested in any of the {len(mine)} task/mode pairs ({why}).")
            continue
        capital = words[0].upper() + words[1:] if words[0].isascii() else words  # 'ε-sharpness' stays as it is
        sizes = sorted({row["n_partial"] for row in testable})
        n_text = f"n = {sizes[0]}" + (f"–{sizes[-1]}" if len(sizes) > 1 else "") + " checkpoints"
        if predicts:
            pairs = ", ".join(f"{row['task']} ({MODES.get(row['mode'], row['mode'])})" for row in predicts)
            verdict = (f"{capital} predicts downstream performance beyond pretraining loss in {len(predicts)} of "
                       f"{len(testable)} testable task/mode pairs ({n_text}): {pairs}")
        else:
            verdict = (f"{capital} does not predict downstream performance beyond pretraining loss in any of the "
                       f"{len(testable)} testable task/mode pairs ({n_text}; every partial rank correlation's "
                       "interval contains 0)")
        out.append(verdict + (f"; not testable in the others ({why})." if untested else "."))
    return out


def _excluded_sentences(excluded: list[dict]) -> list[str]:
    out = []
    trials = [e for e in excluded if e["table"] == "pretrain" and e["status"] != "finished"]
    if trials:
        listed = "; ".join(f"{e['trial_id']} ({e['reason']})" for e in trials)
        head = "1 trial did not finish and was" if len(trials) == 1 else f"{len(trials)} trials did not finish and were"
        out.append(f"{head} left out of every fit: {listed}.")
    failures = [e for e in excluded if e["status"] == "error"]
    if failures:
        listed = "; ".join(f"{e['table']} on {e['trial_id'] or 'no checkpoint'}, {e['reason']}" for e in failures[:10])
        more = f"; and {len(failures) - 10} more" if len(failures) > 10 else ""
        n_rows = sum(e["n_rows"] for e in failures)
        head = "1 measurement failed and was" if n_rows == 1 else f"{n_rows} measurement rows failed and were"
        out.append(f"{head} left out: {listed}{more}.")
    return out


# --------------------------------------------------------------------------------------------
# the stage


def fit_run(run_dir: Path | RunDir, *, n_bootstrap: int | None = None, n_jobs: int | None = None,
            n_starts: int = 100) -> dict:
    """Fit everything in run_dir/results; write results/fits.json and results/fits.parquet; return the JSON dict.

    n_bootstrap: overrides sweep.yaml's fits.n_bootstrap (0 skips intervals). n_jobs: bootstrap processes.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    inputs = rd.fit_inputs()
    s = FitSettings.from_config(inputs.config.fits, n_bootstrap=n_bootstrap, n_jobs=n_jobs, n_starts=n_starts)
    checkpoints, points = inputs.checkpoints, inputs.points
    log.info("fit %s: %d checkpoints, %d downstream points, %d bootstrap resamples", inputs.config.name,
             len(checkpoints), len(points), s.n_bootstrap)
    fits = {
        "run": inputs.config.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(s),
        "tables": {name: (len(table) if inputs.present[name] else None) for name, table in inputs.tables.items()},
        "n_checkpoints": len(checkpoints),
        "excluded": inputs.excluded,
        "loss_law": fit_loss_law(checkpoints, s),
        "loss_law_backtest": backtest_loss_law(checkpoints, s),
        "compute_law": fit_compute_law(checkpoints, s),
        "downstream": downstream_trends(points, s),
        "baselines": baselines(inputs.measured["finetune"], points),
        "proxies": fit_proxies(checkpoint_proxies(points, inputs.measured["hessian"], inputs.measured["landscape"]), s)
        if not points.empty else skipped("no downstream results"),
    }
    fits = json_safe(fits)
    fits["findings"] = findings(fits)
    rd.write_fits(fits, fits_table(fits))
    return fits


# --------------------------------------------------------------------------------------------
# fits.parquet: fits.json in long format, one row per estimated quantity; each section gives its own rows


def _row(what, parameter="", estimate=None, ci=(None, None), n_points=None, task="", mode="", x="", note="") -> dict:
    lo, hi = ci if ci is not None else (None, None)
    return {"what": what, "task": task, "mode": mode, "x": x, "parameter": parameter, "estimate": estimate,
            "ci_lo": lo, "ci_hi": hi, "n_points": n_points, "note": note}


def _fit_rows(what: str, result: dict, **where) -> list[dict]:
    """One row per parameter of a fitted law (with its interval), or one row saying why it was skipped."""
    if result["status"] != "ok":
        return [_row(what, note=f"skipped: {result['reason']}", **where)]
    return [_row(what, name, value, result.get("ci", {}).get(name), result.get("n_points"), **where)
            for name, value in result["params"].items()]


def loss_law_rows(law: dict) -> list[dict]:
    rows = _fit_rows("loss_law", law)
    if law["status"] == "ok":
        frontier = law["frontier"]
        rows += [_row("loss_law_frontier", name, frontier[name], frontier.get(f"{name}_ci"), law["n_points"],
                      note="N* ∝ C^a, D* ∝ C^b") for name in ("n_params_exponent", "n_tokens_exponent")]
    return rows


def backtest_rows(test: dict) -> list[dict]:
    if test["status"] != "ok":
        return [_row("loss_law_backtest", note=f"skipped: {test['reason']}")]
    return [_row("loss_law_backtest", name, test[name], n_points=test["n_holdout"])
            for name in ("mean_abs_relative_error", "max_abs_relative_error")]


def compute_law_rows(compute: dict) -> list[dict]:
    if compute["status"] != "ok":
        return [_row("compute_law", note=f"skipped: {compute['reason']}")]
    return [row for key in ("saturating_frontier", "saturating_all", "loglog_frontier", "loglog_all")
            for row in _fit_rows(f"compute_law_{key}", compute[key], x="flops")]


def downstream_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for entry in entries:
        where = {"task": entry["task"], "mode": entry["mode"]}
        for x, trend in entry["trends"].items():
            if trend["status"] == "ok":
                rows.append(_row("downstream_trend", "slope_per_decade", trend["slope"], trend["ci"],
                                 trend["n_points"], x=x, note=trend["verdict"], **where))
            else:
                rows.append(_row("downstream_trend", note=f"skipped: {trend['reason']}", x=x, **where))
        for x, test in entry["monotone"].items():
            if test["status"] == "ok":
                rows += [_row("downstream_monotone", name, test[name], n_points=test["n_points"], x=x,
                              note=test["direction"], **where) for name in ("spearman", "mann_kendall_p")]
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
                rows.append(_row("baseline", entry["metric"], spread["mean"], (spread["mean"] - sd, spread["mean"] + sd),
                                 spread["n"], task=entry["task"], mode=mode,
                                 note="interval: mean ± 1 sd over split seeds"))
    return rows


def proxy_rows(proxies: dict) -> list[dict]:
    if proxies["status"] != "ok":
        return []
    rows = []
    for row in proxies["rows"]:
        where = {"task": row["task"], "mode": row["mode"], "x": row["proxy"], "note": row["reason"] or ""}
        rows.append(_row("proxy", "spearman", row["spearman"], (row["ci_lo"], row["ci_hi"]), row["n"], **where))
        rows.append(_row("proxy", "partial_given_loss", row["partial_given_loss"],
                         (row["partial_ci_lo"], row["partial_ci_hi"]), row["n_partial"], **where))
    return rows


def fits_table(fits: dict) -> pd.DataFrame:
    """fits.json in long format: one row per estimated quantity (what, task, mode, x, parameter, estimate, CI)."""
    rows = (loss_law_rows(fits["loss_law"]) + backtest_rows(fits["loss_law_backtest"])
            + compute_law_rows(fits["compute_law"]) + downstream_rows(fits["downstream"])
            + baseline_rows(fits["baselines"]) + proxy_rows(fits["proxies"]))
    table = pd.DataFrame(rows, columns=list(TABLES["fits"].columns))
    for name in ("estimate", "ci_lo", "ci_hi", "n_points"):
        table[name] = pd.to_numeric(table[name], errors="coerce").astype(float)
    return table


# --------------------------------------------------------------------------------------------
# `clmscale fit --table`: one law on any table


LAWS = {
    "chinchilla": "L(N, D) = E + A/N^alpha + B/D^beta (Huber fit in log space, bootstrap intervals)",
    "compute": "y = E + A·x^(−gamma), e.g. L(C) (Huber fit in log space, bootstrap intervals)",
    "power": "y = A·x^k (OLS on log-log axes, t intervals)",
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


def fit_table(path: Path, law: str = "chinchilla", *, n_col: str = "N", d_col: str = "D", y_col: str = "loss",
              x_col: str = "C", bootstrap: int = 1000, huber_delta: float = 1e-3, seed: int = 0,
              n_jobs: int | None = None, n_starts: int = 100) -> dict:
    """Fit one law (see LAWS) to columns of a CSV or Parquet table; the summary dict with intervals and warnings."""
    if law not in LAWS:
        raise ValueError(f"unknown law '{law}'; expected one of {', '.join(LAWS)}")
    table = read_table(path)
    wanted = {"--n-col": n_col, "--d-col": d_col, "--y-col": y_col} if law == "chinchilla" else \
        {"--x-col": x_col, "--y-col": y_col}
    for option, column in wanted.items():
        if column not in table.columns:
            available = ", ".join(map(str, table.columns))
            raise ValueError(f"{path}: no column '{column}' ({option}); the columns are {available}")
    values = {column: pd.to_numeric(table[column], errors="coerce").to_numpy(float) for column in wanted.values()}
    estimator: ChinchillaFit | SaturatingPowerLaw | LogLogOLS
    data: tuple[np.ndarray, ...]
    if law == "chinchilla":
        estimator = ChinchillaFit(huber_delta=huber_delta, n_bootstrap=bootstrap, seed=seed, n_jobs=n_jobs,
                                  n_starts=n_starts)
        data = (values[n_col], values[d_col], values[y_col])
    elif law == "compute":
        estimator = SaturatingPowerLaw(huber_delta=huber_delta, n_bootstrap=bootstrap, seed=seed, n_jobs=n_jobs)
        data = (values[x_col], values[y_col])
    else:
        estimator = LogLogOLS()
        data = (values[x_col], values[y_col])
    notes: list[str] = []
    with _kept_warnings(notes, type(estimator).__name__):
        estimator.fit(*data)
    return json_safe({"table": str(path), "law_name": law, "columns": {k.strip("-"): v for k, v in wanted.items()},
                        "n_rows": len(table), **estimator.to_dict(), "warnings": notes})


def format_fit(result: dict) -> str:
    """A fit summary as a few lines of text: the law, each parameter with its interval, warnings."""
    level = round(100 * result["hyperparameters"].get("ci_level", 0.95))
    lines = [f"{result['table']}: {result['law']}  ({result['n_points']} of {result['n_rows']} rows used)"]
    for name, value in result["params"].items():
        lo, hi = result["ci"].get(name, (None, None))
        interval = f"   {level} % CI [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else ""
        lines.append(f"  {name:>6s} = {value:.4g}{interval}")
    if "frontier" in result:
        frontier = result["frontier"]
        lines.append(f"  compute-optimal: N* ∝ C^{frontier['n_params_exponent']:.3f}, "
                     f"D* ∝ C^{frontier['n_tokens_exponent']:.3f}")
    if "r_squared" in result:
        lines.append(f"  R² = {result['r_squared']:.4f}")
    lines += [f"  warning: {note}" for note in result["warnings"]]
    return "\n".join(lines)
