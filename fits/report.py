"""The `report` stage: results/ and sweep.yaml in, report/index.html and report/*.png out.

`build_report(run_dir)` fits first when results/fits.json is missing, draws every figure of
fits.figures (a figure with nothing to draw becomes a one-line note), and writes one self-contained
HTML page: the PNGs are embedded as base64 data URIs and the page has no external CSS, JS or links,
so it can be mailed or opened offline. Every number on the page comes from results/ and fits.json.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import html
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from engine.rundir import RunDir
from fits import figures
from fits.downstream import format_scale
from fits.fit import MODES, SCALES, fit_run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Figure:
    """One figure of the page: its file name, title, what to look for, and how to draw it."""
    name: str
    title: str
    caption: str
    draw: Callable[[Path], Path]
    sentences: list[str] = dataclasses.field(default_factory=list)  # read-outs from fits.json, listed under it
    note: str = ""  # set when it could not be drawn
    path: Path | None = None


def build_report(run_dir: Path, **fit_options) -> Path:
    """Write RUN_DIR/report/index.html and its figures; returns the HTML path. fit_options go to fit_run."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    if not rd.has_fits():
        log.info("report: %s missing, fitting first", rd.fits_path())
        fit_run(rd, **fit_options)
    fits = rd.fits()
    inputs = rd.fit_inputs()
    cfg, tables, checkpoints, measured, points = (inputs.config, inputs.tables, inputs.checkpoints, inputs.measured,
                                                  inputs.points)
    tasks = sorted(measured["finetune"]["task"].unique()) if not measured["finetune"].empty else list(
        cfg.downstream.tasks)

    pretrain = tables["pretrain"]
    ladder = pretrain.sort_values(["n_params_non_embedding", "budget_tokens", "tokens"])
    order: dict[str, int] = {}  # trial ids and checkpoint paths, smallest model first: the order of the PCA panels
    for key in ("trial_id", "checkpoint"):
        for value in ladder[key].dropna():
            order.setdefault(str(value), len(order))
    left_out = pretrain["trial_id"].isin(inputs.left_out_trials)
    left_out_groups = frozenset(inputs.left_out_trials) | frozenset(str(c) for c in pretrain.loc[left_out, "checkpoint"]
                                                                    .dropna())
    pca_view = {"order": order, "left_out": left_out_groups}
    sections = _figures(checkpoints, inputs.left_out, fits, points, measured, tables["pca"], tasks, pca_view)
    rd.report.mkdir(parents=True, exist_ok=True)
    for figure_list in sections.values():
        for figure in figure_list:
            _draw(figure, rd.figure(figure.name))
    return rd.write_report(_page(cfg.name, rd, fits, sections, tasks, checkpoints))


def _draw(figure: Figure, target: Path) -> None:
    """Draw one figure; no data, or a failure, becomes its note (a failure is also logged with its traceback)."""
    try:
        figure.path = figure.draw(target)
        return
    except figures.NoData as reason:
        figure.note = str(reason)
    except Exception as err:  # noqa: BLE001 - one broken figure must not cost the whole report; it is logged
        log.exception("report: figure %s failed", figure.name)
        figure.note = f"could not draw this figure: {type(err).__name__}: {err}"
    target.unlink(missing_ok=True)  # a PNG from an earlier report would no longer match the data


# --------------------------------------------------------------------------------------------
# what is drawn, and what to look for in it


def _figures(checkpoints, left_out, fits, points, measured, pca, tasks, pca_view) -> dict[str, list[Figure]]:
    landscape = measured["landscape"]
    downstream = {}
    for task in tasks:
        sentences = [entry["trends"][x]["sentence"] + "." for entry in fits.get("downstream", [])
                     if entry["task"] == task for x in SCALES if entry["trends"].get(x, {}).get("status") == "ok"]
        downstream[task] = Figure(
            f"downstream_{_slug(task)}", f"{task}: does downstream performance follow scale?",
            "Each point is one pretrained checkpoint, fine-tuned (blue) or used as frozen features for a linear probe "
            "(orange); bars are ± 1 sd over split seeds, thin lines join the means at each scale. Green dashed: "
            "Morgan fingerprints; red dotted: the same architecture fine-tuned from random initialisation (shaded: "
            "± 1 sd). Look for: whether points keep moving toward 'better' as models grow (left, middle) and as "
            "pretraining loss falls (right, read left to right), and whether they clear the baseline lines.",
            functools.partial(figures.downstream, task, points, measured["finetune"]), sentences)
    return {
        "pretraining": [
            Figure("loss_vs_compute", "Pretraining loss against compute",
                   "Each point is a saved checkpoint and lines join the checkpoints of one training run; colours are "
                   "model sizes. Dashed: the fitted L(N, D) at each size; black: the lowest loss the fit predicts for "
                   "each compute budget; red dotted: a one-variable L(C) fitted to the best checkpoint at each "
                   "compute. "
                   "Look for: larger models reaching lower loss at the same compute, and whether the frontier is "
                   "still falling at the right edge.",
                   lambda out: figures.loss_vs_compute(checkpoints, left_out, fits, out)),
            Figure("loss_surface", "The fitted L(N, D) and the compute-optimal frontier",
                   "Left: contours of the fitted loss; dots are the measured checkpoints on the same colour scale, so "
                   "a dot that stands out from its background is poorly fitted. Red: the compute-optimal model size "
                   "and token count. Right: how the fit would split a larger compute budget between parameters and "
                   "tokens; outside the grey band it is extrapolating.",
                   lambda out: figures.loss_surface(checkpoints, fits, out)),
        ],
        "downstream": list(downstream.values()),
        "hessian": [
            Figure("hessian", "Curvature of the pretraining loss",
                   "Largest Hessian eigenvalue λmax (how sharp the steepest direction is) and the trace (total "
                   "curvature) of the pretraining loss on fixed validation batches, against model size (coloured by "
                   "tokens seen) and against tokens seen (coloured by model size). Look for: whether curvature "
                   "grows or shrinks with scale; the proxy table says whether it tells you anything about downstream "
                   "performance that pretraining loss does not.",
                   lambda out: figures.hessian(measured["hessian"], out)),
        ],
        "landscape": [
            Figure("landscape_1d", "1-D loss slices",
                   "Loss along one random direction (filter-normalised, so models of different size are comparable), "
                   "minus the loss at the trained weights. Look for: narrower bowls (sharper minima) as models grow.",
                   lambda out: figures.landscape_1d(landscape, out)),
            Figure("landscape_2d", "2-D loss surface of the largest checkpoint",
                   "Loss on a plane spanned by two random filter-normalised directions through the trained weights "
                   "(★). Look for: round, wide basins (flat) versus elongated or narrow ones (sharp).",
                   lambda out: figures.landscape_2d(landscape, out)),
            Figure("landscape_pt_to_ft", "From pretrained to fine-tuned weights",
                   "Pretraining loss on the straight line from the pretrained weights (α = 0) to the weights after "
                   "fine-tuning (α = 1), and a half step beyond either end. Look for: a barrier between the two "
                   "(fine-tuning left the pretraining basin) or a smooth slope (it stayed nearby).",
                   lambda out: figures.landscape_pt_to_ft(landscape, out)),
        ],
        "pca": [
            Figure("pca_trajectory", "Training trajectories in parameter space",
                   "Each panel is one training run, projected on the first two principal components of its own "
                   "checkpoints (labels: tokens seen). Look for: long straight paths (still moving) versus paths "
                   "that curl up (settling).",
                   lambda out: figures.pca(pca, "trajectory", out, **pca_view)),
            Figure("pca_finetuned", "Where fine-tuning moves the weights",
                   "Each panel is one pretrained checkpoint with its fine-tuned versions, on their first two "
                   "principal components (labels: task). Look for: tasks that pull the weights in similar or "
                   "opposite directions.",
                   lambda out: figures.pca(pca, "finetuned", out, **pca_view)),
        ],
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "task"


# --------------------------------------------------------------------------------------------
# the page


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1.2em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 0.3em; }
.meta { color: #555; }
figure { margin: 1.2em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; max-width: 70em; }
.note { background: #f6f6f6; border-left: 4px solid #bbb; padding: 0.5em 0.8em; color: #555; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
#findings li { margin-bottom: 0.4em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; column-count: 3; }
figcaption ul { margin-top: 0.4em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return format_scale(float(value)).replace("-", "−")


def _interval(lo, hi) -> str:
    missing = [end is None or (isinstance(end, float) and not np.isfinite(end)) for end in (lo, hi)]
    return "–" if any(missing) else f"[{_number(lo)}, {_number(hi)}]"


def _table(header: list[str], rows: list[list], numeric: frozenset[int] | set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(figure: Figure) -> str:
    if figure.path is None:
        return f'<h3>{_e(figure.title)}</h3><p class="note">No figure: {_e(figure.note)}.</p>'
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    sentences = "".join(f"<li>{_e(sentence)}</li>" for sentence in figure.sentences)
    return (f'<figure id="{_e(figure.name)}"><h3>{_e(figure.title)}</h3>'
            f'<img alt="{_e(figure.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(figure.caption)}{'<ul>' + sentences + '</ul>' if sentences else ''}</figcaption>"
            "</figure>")


def _page(name: str, rd: RunDir, fits: dict, sections: dict[str, list[Figure]], tasks: list[str],
          checkpoints: pd.DataFrame) -> str:
    n_trials = checkpoints["trial_id"].nunique() if not checkpoints.empty else 0
    n_rungs = checkpoints["rung"].nunique() if not checkpoints.empty else 0
    built = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    findings = "".join(f"<li>{_e(sentence)}</li>" for sentence in fits.get("findings", [])) or \
        "<li>No findings: nothing could be fitted.</li>"
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>clmscale report: {_e(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Scaling report: {_e(name)}</h1>",
        f'<p class="meta">{len(checkpoints)} finished checkpoints from {n_trials} training runs over {n_rungs} model '
        f"sizes; downstream tasks: {_e(', '.join(tasks) or 'none')}. Fits from {_e(fits.get('created', '?'))}, "
        f"page built {built} from <code>{_e(rd.results)}</code> and <code>sweep.yaml</code>.</p>",
        "<p>The question: as a chemical language model grows in parameters N, training tokens D and compute C, its "
        "pretraining loss falls. Does property prediction after fine-tuning follow? The findings below are written "
        "from the measured numbers only; the figures and tables after them show where each comes from.</p>",
        '<section id="findings"><h2>Findings</h2><ul>', findings, "</ul></section>",
        '<section id="pretraining"><h2>Pretraining loss</h2>',
        *(_figure_html(f) for f in sections["pretraining"]), _law_tables(fits), "</section>",
        '<section id="downstream"><h2>Downstream property prediction</h2>',
        _baseline_html(fits), *(_figure_html(f) for f in sections["downstream"]), _trend_table(fits), "</section>",
        '<section id="proxies"><h2>What predicts downstream performance?</h2>', _proxy_html(fits), "</section>",
        '<section id="hessian"><h2>Hessian spectrum</h2>', *(_figure_html(f) for f in sections["hessian"]),
        "</section>",
        '<section id="landscape"><h2>Loss landscape</h2>', *(_figure_html(f) for f in sections["landscape"]),
        "</section>",
        '<section id="pca"><h2>Parameter space</h2>', *(_figure_html(f) for f in sections["pca"]), "</section>",
        '<section id="excluded"><h2>Left out: diverged trials and failed measurements</h2>',
        _excluded_html(fits), _events_html(rd), "</section>",
        '<section id="config"><h2>Sweep configuration</h2><p>The resolved <code>sweep.yaml</code> of this run:</p>',
        f"<pre>{_e(rd.config_text())}</pre></section>",
        "</body></html>",
    ]
    return "\n".join(parts)


GREEK = {"alpha": "α", "beta": "β", "gamma": "γ"}


def _fit_rows(what: str, result: dict) -> list[list]:
    """Rows of a parameter table; the law is named on its first row only."""
    if not result or result.get("status") != "ok":
        return [[what, "skipped", (result or {}).get("reason", "not fitted"), "", ""]]
    return [[what if i == 0 else "", GREEK.get(name, name), _number(value),
             _interval(*result.get("ci", {}).get(name, (None, None))), result.get("n_points", "")]
            for i, (name, value) in enumerate(result["params"].items())]


def _law_tables(fits: dict) -> str:
    law, compute = fits.get("loss_law", {}), fits.get("compute_law", {})
    rows = _fit_rows("L(N, D) = E + A/N^α + B/D^β", law)
    if compute.get("status") == "ok":
        rows += _fit_rows("L(C) = E + A·C^−γ, compute frontier", compute.get("saturating_frontier"))
        rows += _fit_rows("L(C) = E + A·C^−γ, all checkpoints", compute.get("saturating_all"))
        rows += _fit_rows("L = A·C^k, compute frontier", compute.get("loglog_frontier"))
    table = _table(["law", "parameter", "estimate", "95 % interval", "points"], rows, numeric={2, 3, 4})
    test = fits.get("loss_law_backtest", {})
    if test.get("status") == "ok":
        sizes = ", ".join(format_scale(n) for n in test["holdout_n_params"])
        back = (f"Back-test: fitted without N = {sizes}, the law predicts those {test['n_holdout']} checkpoints with "
                f"a mean absolute relative error of {test['mean_abs_relative_error']:.1%} (largest "
                f"{test['max_abs_relative_error']:.1%}).")
    else:
        back = f"Back-test skipped: {test.get('reason', 'not run')}."
    return (f"<h3>Fitted laws</h3><p>Loss in nats/token, N in non-embedding parameters, D in tokens, C in FLOPs; "
            f"intervals are bootstrap percentiles (OLS t intervals for A·C^k).</p>{table}<p>{_e(back)}</p>")


def _baseline_html(fits: dict) -> str:
    entries = fits.get("baselines", [])
    if not entries:
        return '<p class="note">No downstream results (results/finetune.parquet is missing or empty).</p>'
    rows = []
    for entry in entries:
        cells = [entry["task"], f"{entry['metric_label']} ({'higher' if entry['higher_is_better'] else 'lower'} "
                                "is better)"]
        for key in ("best_pretrained", "morgan_fp", "random_init"):
            spread = entry.get(key)
            cells.append("–" if spread is None else _mean_sd(spread))
        best = entry.get("best_pretrained")
        cells.append("–" if best is None else
                     f"{MODES.get(best['mode'], best['mode'])}, {best['rung']}, {format_scale(best['tokens'])} tokens")
        rows.append(cells)
    table = _table(["task", "metric", "best pretrained checkpoint", "Morgan fingerprints", "random init",
                    "best checkpoint is"], rows)
    sentences = "".join(f"<li>{_e(entry['sentence'])}</li>" for entry in entries)
    return f"<h3>Against the baselines</h3>{table}<ul>{sentences}</ul>"


def _mean_sd(spread: dict) -> str:
    sd = spread.get("sd")
    sd_text = f" ± {sd:.2g}" if sd is not None and np.isfinite(sd) else ""
    return f"{_number(spread['mean'])}{sd_text} (n = {spread['n']})"


def _trend_table(fits: dict) -> str:
    rows = []
    for entry in fits.get("downstream", []):
        for x in (x for x in SCALES if x in entry["trends"]):  # fits.json has its keys sorted; read them in order
            trend = entry["trends"][x]
            who = [entry["task"], MODES.get(entry["mode"], entry["mode"]), SCALES[x][0]]
            if trend["status"] == "ok":
                rows.append(who + [trend["verdict"], _number(trend["slope"]), _interval(*trend["ci"]),
                                   trend["n_points"]])
            else:
                rows.append(who + ["skipped: " + trend["reason"], "", "", ""])
    if not rows:
        return ""
    return ("<h3>Trends at the largest scales</h3><p>Slope of the metric per decade of the scale variable over the "
            "largest half of the scales, with its 95 % interval; 'plateau' means the interval contains 0.</p>"
            + _table(["task", "mode", "against", "verdict", "slope per decade", "95 % interval", "points"], rows,
                     numeric={4, 5, 6}))


def _proxy_html(fits: dict) -> str:
    proxies = fits.get("proxies", {})
    if proxies.get("status") != "ok":
        reason = proxies.get("reason", "not fitted")
        return f'<p class="note">No proxy correlations: {_e(reason)}.</p>'
    labels = proxies["labels"]
    tables = []
    for (task, mode), group in pd.DataFrame(proxies["rows"]).groupby(["task", "mode"], sort=False):
        rows = [[labels.get(row["proxy"], row["proxy"]), row["n"], _number(row["spearman"]),
                 _interval(row["ci_lo"], row["ci_hi"]), _number(row["partial_given_loss"]),
                 _interval(row["partial_ci_lo"], row["partial_ci_hi"]), row["sentence"]]
                for row in group.to_dict("records")]
        metric = {"roc_auc": "ROC-AUC", "rmse": "RMSE"}.get(group["metric"].iloc[0], group["metric"].iloc[0])
        tables.append(f"<h3>{_e(task)}, {_e(MODES.get(mode, mode))} ({_e(metric)})</h3>"
                      + _table(["proxy", "n", "ρ", "95 % interval", "partial ρ | loss", "95 % interval", "in words"],
                               rows, numeric={1, 2, 3, 4, 5}))
    missing = proxies.get("not_measured", [])
    note = (f"<p>Not measured in this run: {_e(', '.join(labels.get(m, m) for m in missing))}.</p>" if missing else "")
    return ("<p>Spearman rank correlation ρ of each proxy with the downstream metric across checkpoints, and the "
            "partial correlation given pretraining loss: a proxy only adds information if the partial correlation's "
            "interval excludes 0. Intervals are bootstrap percentiles over checkpoints.</p>" + note + "".join(tables))


def _events_html(rd: RunDir) -> str:
    """The faults the run survived (restarts, corrupt checkpoints set aside), from RunDir.fault_events."""
    events = rd.fault_events()
    if not events:
        return "<p>No faults were recorded: no restarts and no corrupt checkpoints.</p>"
    rows = [[e.get("stage", ""), e.get("trial_id", "–"), e.get("event", ""),
             ", ".join(f"{k}: {v}" for k, v in e.items() if k not in ("stage", "trial_id", "event", "time"))]
            for e in events]
    return "<h3>Faults handled</h3>" + _table(["stage", "trial", "event", "details"], rows)


def _excluded_html(fits: dict) -> str:
    excluded = fits.get("excluded", [])
    if not excluded:
        return "<p>Nothing was left out: every trial finished and every measurement succeeded.</p>"
    rows = [[e["table"], e["trial_id"] or "–", e["status"], e["n_rows"], e["reason"]] for e in excluded]
    return _table(["table", "trial", "status", "rows", "why"], rows, numeric={3})
