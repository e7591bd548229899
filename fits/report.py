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

from clmscale.engine.rundir import RunDir
from clmscale.fits import figures
from clmscale.fits.downstream import format_scale, format_with_uncertainty
from clmscale.fits.fit import (
    ARM_ANCHOR,
    AXES,
    BASELINES,
    MODES,
    arm_views,
    checkpoint_arms,
    downstream_anchor,
    fit_run,
)

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
    cfg, tables, checkpoints, measured, points = (
        inputs.config,
        inputs.tables,
        inputs.checkpoints,
        inputs.measured,
        inputs.points,
    )
    tasks = (
        sorted(measured["finetune"]["task"].unique()) if not measured["finetune"].empty else list(cfg.downstream.tasks)
    )

    pretrain = tables["pretrain"]
    ladder = pretrain.sort_values(["n_params_non_embedding", "budget_tokens", "tokens"])
    order: dict[str, int] = {}  # trial ids and checkpoint paths, smallest model first: the order of the PCA panels
    for key in ("trial_id", "checkpoint"):
        for value in ladder[key].dropna():
            order.setdefault(str(value), len(order))
    left_out = pretrain["trial_id"].isin(inputs.left_out_trials)
    left_out_groups = frozenset(inputs.left_out_trials) | frozenset(
        str(c) for c in pretrain.loc[left_out, "checkpoint"].dropna()
    )
    pca_view = {"order": order, "left_out": left_out_groups}
    facets: list[Facet] = []
    arms = checkpoint_arms(checkpoints)
    for arm, slug, view in arm_views(fits):
        if not slug:  # no axis varies: the whole run, as one
            sections = _figures(checkpoints, inputs.left_out, fits, points, measured, tables["pca"], tasks, pca_view)
        else:  # one facet per arm: its checkpoints, measurements and fits alone, figures and anchors suffixed
            trials = set(checkpoints.loc[arms == arm, "trial_id"])
            paths = set(checkpoints.loc[arms == arm, "checkpoint"].astype(str))
            left = inputs.left_out[checkpoint_arms(inputs.left_out, axes_of=checkpoints) == arm]
            mine = {name: _of_trials(table, trials) for name, table in measured.items()}
            mine["finetune"] = measured["finetune"][
                measured["finetune"]["trial_id"].isin(trials)
                | ~measured["finetune"]["mode"].isin(["finetune", "probe", "random_init"])
            ]
            pca = tables["pca"][tables["pca"]["group"].astype(str).isin(trials | paths)]
            sections = _figures(
                checkpoints[arms == arm], left, view, _of_trials(points, trials), mine, pca, tasks, pca_view
            )
            for figure in (f for figure_list in sections.values() for f in figure_list):
                figure.name = f"{figure.name}{ARM_ANCHOR}{slug}"
        facets.append(Facet(arm, slug, view, sections))
    rd.report.mkdir(parents=True, exist_ok=True)
    for facet in facets:
        for figure_list in facet.sections.values():
            for figure in figure_list:
                _draw(figure, rd.figure(figure.name))
    inputs_html = _inputs_html(rd.manifest() if rd.data.has_manifest() else None, tables["finetune"])
    return rd.write_report(_page(cfg.name, rd, fits, facets, tasks, checkpoints, inputs_html))


@dataclasses.dataclass
class Facet:
    """One arm of the grid (one value of each axis that varies) as the report shows it; one facet, arm "", when
    no axis varies."""

    arm: str
    slug: str
    fits: dict  # fits.json as this arm's (fit.arm_views)
    sections: dict[str, list[Figure]]


def _of_trials(table: pd.DataFrame, trials: set[str]) -> pd.DataFrame:
    return table[table["trial_id"].isin(trials)] if "trial_id" in table.columns and not table.empty else table


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
    entries = fits.get("downstream", [])
    for task in tasks:
        mine = [entry for entry in entries if entry["task"] == task]
        sentences = [verdict["sentence"] for entry in mine for verdict in entry.get("verdicts", {}).values()]
        downstream[task] = Figure(
            downstream_anchor(task),
            f"{task}: does downstream performance follow scale?",
            "One axis at a time. Left: the test metric against model size N, one line per token budget D (held "
            "fixed; line style); middle: against D, one line per N; right of those: against compute C, where filled "
            "points joined by a line are the compute frontier (no cheaper checkpoint has a lower pretraining loss) "
            "and hollow ones are off it. Fine-tuned in blue, linear probe in orange; bars are ± 1 sd over split "
            "seeds. Green dashed: Morgan fingerprints; red dotted: the same architecture fine-tuned from random "
            "initialisation (shaded: ± 1 sd). Far right: each slope per decade with its 95 % run-level interval, "
            "against the grey band of ± the plateau margin: a bar inside the band is a plateau, a bar clear of 0 "
            "(and not inside the band) is improving or degrading, anything else is inconclusive. Look for: which "
            "verdicts the grid supports, and how far an inconclusive bar is from fitting inside its band.",
            functools.partial(figures.downstream, task, points, measured["finetune"], mine),
            sentences,
        )
    law = fits.get("loss_law", {})
    surface_caption = (
        "Left: contours of the fitted loss; dots are the measured checkpoints on the same colour scale, so a dot "
        "that stands out from its background is poorly fitted. Red: the compute-optimal model size and token count. "
        "Right: how the fit would split a larger compute budget between parameters and tokens; outside the grey band "
        "it is extrapolating."
        if law.get("frontier", {}).get("status") == "ok"
        else "Left: contours of the fitted loss; dots are the measured checkpoints on the same colour scale, so a dot "
        "that stands out from its background is poorly fitted. Right: why no compute-optimal allocation is drawn: "
        "the grid does not identify the law, so nothing derived from it is a finding."
    )
    return {
        "pretraining": [
            Figure(
                "loss_vs_compute",
                "Pretraining loss against compute",
                "Each point is a saved checkpoint and lines join the checkpoints of one training run; colours are "
                "model sizes. Dashed: the fitted L(N, D) at each size; black: the lowest loss the fit predicts for "
                "each compute budget; red dotted: a one-variable L(C) fitted to the best checkpoint at each "
                "compute. "
                "Look for: larger models reaching lower loss at the same compute, and whether the frontier is "
                "still falling at the right edge.",
                lambda out: figures.loss_vs_compute(checkpoints, left_out, fits, out),
            ),
            Figure(
                "loss_surface",
                "The fitted L(N, D) and the compute-optimal frontier",
                surface_caption,
                lambda out: figures.loss_surface(checkpoints, fits, out),
            ),
        ],
        "downstream": list(downstream.values()),
        "hessian": [
            Figure(
                "hessian",
                "Curvature of the pretraining loss",
                "Largest Hessian eigenvalue λmax (how sharp the steepest direction is), the trace (total "
                "curvature) and, where hessian_dim was recorded, the trace per parameter (comparable across sizes) "
                "of the pretraining loss on fixed validation batches, against model size (coloured by tokens seen) "
                "and against tokens seen (coloured by model size). Look for: whether curvature "
                "grows or shrinks with scale; the proxy table says whether it tells you anything about downstream "
                "performance that pretraining loss does not.",
                lambda out: figures.hessian(measured["hessian"], out),
            ),
        ],
        "landscape": [
            Figure(
                "landscape_1d",
                "1-D loss slices",
                "Loss along one random direction (filter-normalised, so models of different size are comparable), "
                "minus the loss at the trained weights. Look for: narrower bowls (sharper minima) as models grow.",
                lambda out: figures.landscape_1d(landscape, out),
            ),
            Figure(
                "landscape_2d",
                "2-D loss surface of the largest checkpoint",
                "Loss on a plane spanned by two random filter-normalised directions through the trained weights "
                "(★). Look for: round, wide basins (flat) versus elongated or narrow ones (sharp).",
                lambda out: figures.landscape_2d(landscape, out),
            ),
            Figure(
                "landscape_pt_to_ft",
                "From pretrained to fine-tuned weights",
                "Pretraining loss on the straight line from the pretrained weights (α = 0) to the weights after "
                "fine-tuning (α = 1), and a half step beyond either end. Look for: a barrier between the two "
                "(fine-tuning left the pretraining basin) or a smooth slope (it stayed nearby).",
                lambda out: figures.landscape_pt_to_ft(landscape, out),
            ),
        ],
        "tasks": [
            Figure(
                "task_scaling",
                "Per-task scaling against task characteristics",
                "One panel per characteristic of results/tasks.parquet; each point is one task and mode: its "
                "slope along N at fixed D, per decade, signed so that up is improvement and divided by that task's "
                "plateau margin (so tasks scored in different metrics share one scale), with its 95 % run-level "
                "interval. "
                "Grey: ± one margin. Descriptive: a handful of tasks is not a sample, so no line is fitted and no "
                "p-value is given; ρ (Spearman, over tasks) is printed only from three tasks on.",
                lambda out: figures.task_scaling(fits.get("task_characteristics", {}), out),
            ),
        ],
        "pca": [
            Figure(
                "pca_trajectory",
                "Training trajectories in parameter space",
                "Each panel is one training run, projected on the first two principal components of its own "
                "checkpoints (labels: tokens seen). Look for: long straight paths (still moving) versus paths "
                "that curl up (settling).",
                lambda out: figures.pca(pca, "trajectory", out, **pca_view),
            ),
            *(
                Figure(
                    f"pca_finetuned_{downstream_anchor(task).removeprefix('downstream_')}",
                    f"{task}: where fine-tuning moves the weights",
                    "Each panel is one pretrained checkpoint (★, the origin) with its fine-tuned versions on this "
                    "task, one per split seed, on the first two principal components of that checkpoint's "
                    "endpoints (every task and split seed; the other tasks' endpoints in grey). Look for: seeds "
                    "that land together, away from the origin (a task direction), versus scatter as wide as the "
                    "distance moved (seed noise).",
                    functools.partial(figures.pca_finetuned, pca, task, **pca_view),
                )
                for task in tasks
            ),
        ],
    }


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
    return format_scale(float(value) + 0.0).replace("-", "−")  # + 0.0: a regret of −0.0 reads 0


def _interval(lo, hi) -> str:
    missing = [end is None or (isinstance(end, float) and not np.isfinite(end)) for end in (lo, hi)]
    return "–" if any(missing) else f"[{_number(lo)}, {_number(hi)}]"


def _table(header: list[str], rows: list[list], numeric: frozenset[int] | set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(figure: Figure) -> str:
    if figure.path is None:
        return f'<h3 id="{_e(figure.name)}">{_e(figure.title)}</h3><p class="note">No figure: {_e(figure.note)}.</p>'
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    sentences = "".join(f"<li>{_e(sentence)}</li>" for sentence in figure.sentences)
    return (
        f'<figure id="{_e(figure.name)}"><h3>{_e(figure.title)}</h3>'
        f'<img alt="{_e(figure.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure.caption)}{'<ul>' + sentences + '</ul>' if sentences else ''}</figcaption>"
        "</figure>"
    )


def _findings_html(fits: dict) -> str:
    """One item per finding, each ending in a link to the figure or table it rests on."""
    texts, links = fits.get("findings", []), fits.get("finding_links", [])
    if not texts:
        return "<li>No findings: nothing could be fitted.</li>"
    links = links if len(links) == len(texts) else [""] * len(texts)
    return "".join(
        f'<li>{_e(text)} <a href="#{_e(link)}">({_e(ANCHOR_WORDS.get(link.split(ARM_ANCHOR)[0], "figure"))})</a></li>'
        if link
        else f"<li>{_e(text)}</li>"
        for text, link in zip(texts, links, strict=True)
    )


ANCHOR_WORDS = {
    "laws": "table",
    "trends": "table",
    "baselines": "table",
    "proxy-prediction": "table",
    "proxy-regret": "table",
    "proxy-correlations": "table",
    "task-ladder": "table",
    "excluded": "list",
    "downstream": "section",
    "proxies": "section",
}


def _suffix_anchors(html_text: str, slug: str) -> str:
    """An arm's tables with their ids and in-page links made that arm's ("laws" -> "laws--<slug>")."""
    if not slug:
        return html_text
    return re.sub(r'(id="|href="#)([^"]+)"', lambda m: f'{m.group(1)}{m.group(2)}{ARM_ANCHOR}{slug}"', html_text)


def _faceted(topic: str, facets: list[Facet], parts: Callable[[Facet], list[str]]) -> list[str]:
    """A section's content once per arm, each under a heading naming the arm (figures first, then tables)."""
    if len(facets) == 1 and not facets[0].slug:
        return parts(facets[0])
    out = []
    for facet in facets:
        out.append(f'<h3 id="{_e(topic)}{ARM_ANCHOR}{_e(facet.slug)}" class="arm">{_e(facet.arm)}</h3>')
        out += parts(facet)
    return out


def _page(
    name: str,
    rd: RunDir,
    fits: dict,
    facets: list[Facet],
    tasks: list[str],
    checkpoints: pd.DataFrame,
    inputs_html: str = "",
) -> str:
    n_trials = checkpoints["trial_id"].nunique() if not checkpoints.empty else 0
    n_rungs = checkpoints["rung"].nunique() if not checkpoints.empty else 0
    built = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>clmscale report: {_e(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Scaling report: {_e(name)}</h1>",
        f'<p class="meta">{len(checkpoints)} finished checkpoints from {n_trials} training runs over {n_rungs} model '
        f"sizes; downstream tasks: {_e(', '.join(tasks) or 'none')}. Fits from {_e(fits.get('created', '?'))}, "
        f"page built {built} from <code>{_e(rd.results)}</code> and <code>sweep.yaml</code>.</p>",
        "<p>The question: as a chemical language model grows in parameters N, training tokens D and compute C, its "
        "pretraining loss falls. Does property prediction after fine-tuning follow? The findings below are written "
        "from the measured numbers only, verdict first; each links to the figure or table it rests on.</p>",
        '<section id="findings"><h2>Findings</h2><ul>',
        _findings_html(fits),
        "</ul></section>",
        '<section id="inputs"><h2>Corpus and task inputs</h2>',
        inputs_html,
        "</section>",
        *([_axes_html(fits)] if fits.get("arms") else []),  # a run without axes reads as it always did
        '<section id="pretraining"><h2>Pretraining loss</h2>',
        *_faceted(
            "pretraining",
            facets,
            lambda f: [
                *(_figure_html(x) for x in f.sections["pretraining"]),
                _suffix_anchors(_law_tables(f.fits), f.slug),
            ],
        ),
        "</section>",
        '<section id="downstream"><h2>Downstream property prediction</h2>',
        *_faceted(
            "downstream",
            facets,
            lambda f: [
                _suffix_anchors(_baseline_html(f.fits), f.slug),
                *(_figure_html(x) for x in f.sections["downstream"]),
                _suffix_anchors(_trend_table(f.fits), f.slug),
                _suffix_anchors(_tasks_html(f.fits), f.slug),
                *(_figure_html(x) for x in f.sections["tasks"]),
                _suffix_anchors(_ladder_html(f.fits), f.slug),
            ],
        ),
        "</section>",
        '<section id="proxies"><h2>What predicts downstream performance?</h2>',
        *_faceted("proxies", facets, lambda f: [_suffix_anchors(_proxy_html(f.fits), f.slug)]),
        "</section>",
        '<section id="hessian"><h2>Hessian spectrum</h2>',
        *_faceted("hessian", facets, lambda f: [_figure_html(x) for x in f.sections["hessian"]]),
        "</section>",
        '<section id="landscape"><h2>Loss landscape</h2>',
        *_faceted("landscape", facets, lambda f: [_figure_html(x) for x in f.sections["landscape"]]),
        "</section>",
        '<section id="pca"><h2>Parameter space</h2>',
        *_faceted("pca", facets, lambda f: [_figure_html(x) for x in f.sections["pca"]]),
        "</section>",
        '<section id="excluded"><h2>Left out: diverged trials and failed measurements</h2>',
        _excluded_html(fits),
        _events_html(rd),
        "</section>",
        '<section id="config"><h2>Sweep configuration</h2><p>The resolved <code>sweep.yaml</code> of this run:</p>',
        f"<pre>{_e(rd.config_text())}</pre></section>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _axes_html(fits: dict) -> str:
    """When the grid has axes besides size, budget and seed: which, and that every law and verdict is per arm."""
    if not fits.get("arms"):
        return ""

    def words(value) -> str:
        return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    axes = "; ".join(
        f"{_e(column)}: {_e(', '.join(words(v) for v in values))}" for column, values in fits.get("axes", {}).items()
    )
    arms = "".join(f"<li>{_e(arm['arm'])}: {arm['n_checkpoints']} checkpoints</li>" for arm in fits["arms"])
    tests = fits.get("trend_tests", {})
    return (
        '<section id="axes"><h2>Axes of the grid</h2>'
        f"<p>Beyond model size, tokens and seed this grid varies {axes}. Every law, verdict, baseline comparison, "
        "proxy and task ladder below is computed for each arm (one value of each axis) on that arm's checkpoints "
        "alone, never pooled across arms, and each section shows one facet per arm. The downstream trends of all "
        f"arms are corrected together ({_e(tests.get('correction_name', ''))} over {tests.get('n_tests', 0)} tests); "
        f"the baseline and proxy comparisons within each arm.</p><ul>{arms}</ul></section>"
    )


GREEK = {"alpha": "α", "beta": "β", "gamma": "γ"}


def _fit_rows(what: str, result: dict) -> list[list]:
    """Rows of a parameter table; the law and whether the grid identifies it are named on its first row only."""
    if not result or result.get("status") != "ok":
        return [[what, "skipped", (result or {}).get("reason", "not fitted"), "", "", ""]]
    found = result.get("identification", {})
    identified = (
        "yes"
        if result.get("identified", True)
        else "no: " + "; ".join(f"{p['parameter']}: {p['problem']}" for p in found.get("problems", []))
    )
    return [
        [
            what if i == 0 else "",
            GREEK.get(name, name),
            _number(value),
            _interval(*result.get("ci", {}).get(name, (None, None))),
            result.get("n_points", ""),
            identified if i == 0 else "",
        ]
        for i, (name, value) in enumerate(result["params"].items())
    ]


def _law_tables(fits: dict) -> str:
    law, compute = fits.get("loss_law", {}), fits.get("compute_law", {})
    effective = "R_star" in law.get("params", {})
    unit = {"tokens": "tokens", "molecules": "molecules", "characters": "characters"}.get(
        law.get("data_measure", "tokens"), "tokens"
    )  # fits.data_measure: what D counts
    rows = _fit_rows(
        ("L(N, D, U) = E + A/N^α + B/D′^β, D′ = U + U·R*·(1 − e^(−(D/U − 1)/R*))"
         if effective else "L(N, D) = E + A/N^α + B/D^β") + f", D in {unit} seen",
        law,
    )  # fmt: skip
    if compute.get("status") == "ok":
        rows += _fit_rows("L(C) = E + A·C^−γ, compute frontier", compute.get("saturating_frontier"))
        rows += _fit_rows("L(C) = E + A·C^−γ, all checkpoints", compute.get("saturating_all"))
        rows += _fit_rows("L = A·C^k, compute frontier", compute.get("loglog_frontier"))
    table = _table(
        ["law", "parameter", "estimate", "95 % interval", "points", "identified from this grid"],
        rows,
        numeric={2, 3, 4},
    )
    test = fits.get("loss_law_backtest", {})
    if test.get("status") == "ok":
        sizes = ", ".join(format_scale(n) for n in test["holdout_n_params"])
        back = (
            f"Back-test: fitted without N = {sizes}, the law predicts those {test['n_holdout']} checkpoints with "
            f"a mean absolute relative error of {test['mean_abs_relative_error']:.1%} (largest "
            f"{test['max_abs_relative_error']:.1%})."
        )
    else:
        back = f"Back-test skipped: {test.get('reason', 'not run')}."
    fitted = law.get("in_sample")
    if fitted:
        by_size = fitted["by_n_params"]
        sizes = ", ".join(
            f"{format_scale(n)} {e:+.1%}"
            for n, e in zip(by_size["n_params"], by_size["mean_relative_error"], strict=True)
        )
        back = (
            f"In sample, L(N, D) misses the losses it was fitted on by {fitted['mean_abs_relative_error']:.1%} on "
            f"average (largest {fitted['max_abs_relative_error']:.1%}); mean signed error (fitted / measured − 1) "
            f"by N: {sizes}. The intervals above assume the form is right; these misses say how closely it "
            f"follows the points. {back}"
        )
    unpinned = [row[0] for row in rows if row[0] and row[-1].startswith("no")]
    note = (
        f"<p>Not identified from this grid: {_e(', '.join(unpinned))}. Their parameters are listed so that the "
        "fit can be checked, not as findings: a parameter at its bound, an interval spanning more than an "
        "order of magnitude, or a floor whose interval reaches the lowest measured value means the grid cannot "
        "pin it, and nothing derived from such a law (exponents, the compute-optimal frontier) is stated or "
        "drawn.</p>"
        if unpinned
        else ""
    )
    return (
        f'<h3 id="laws">Fitted laws</h3><p>Loss in nats/token, N in non-embedding parameters, D in tokens, C in '
        f"FLOPs; intervals are bootstrap percentiles (OLS t intervals for A·C^k).</p>{table}{note}"
        f"<p>{_e(back)}</p>"
    )


def _moleculenet_table(entries: list[dict]) -> str:
    """Task x method, test mean ± sd over seeds on the task's primary metric: the layout of MoleculeNet's tables."""
    header = ["task", "metric", "pretrained (chosen on validation)", *BASELINES.values()]
    rows = []
    for entry in entries:
        best = entry["best_pretrained"]
        rows.append(
            [
                entry["task"],
                entry["metric_label"],
                _mean_sd(best["test"]) if best["status"] == "ok" else "–",
                *(_mean_sd(entry[mode]) if entry.get(mode) else "–" for mode in BASELINES),
            ]
        )
    return (
        "<p>Test metric, mean ± sd over split and fine-tuning seeds, as MoleculeNet lays its tables out:</p>"
        + _table(header, rows)
    )


def _baseline_html(fits: dict) -> str:
    entries = fits.get("baselines", [])
    if not entries:
        return '<p class="note">No downstream results (results/finetune.parquet is missing or empty).</p>'
    rows = []
    for entry in entries:
        best = entry["best_pretrained"]
        direction = "higher" if entry["higher_is_better"] else "lower"
        cells = [entry["task"], f"{entry['metric_label']} ({direction} is better)"]
        if best["status"] != "ok":
            rows.append(cells + [best["reason"], "", "", "", ""])
            continue
        cells += [
            f"{MODES.get(best['mode'], best['mode'])}, {best['rung']}, {format_scale(best['tokens'])} tokens "
            f"(of {best['n_candidates']})",
            _number(best["val_mean"]),
            _mean_sd(best["test"]),
        ]
        for mode in BASELINES:
            comparison = entry["comparisons"].get(mode)
            if comparison is None or comparison["status"] != "ok":
                cells.append(comparison["reason"] if comparison else "–")
                continue
            adjusted = comparison.get("p_adjusted")
            cells.append(
                f"{_mean_sd(entry[mode])}; difference {_signed(comparison['mean'])} "
                f"{_interval(*comparison['ci'])}, p = {_p(comparison['p'])}, adjusted {_p(adjusted)}: "
                f"{comparison['finding']}"
            )
        rows.append(cells)
    table = _table(
        [
            "task",
            "metric",
            "checkpoint chosen on validation",
            "validation mean",
            "test (reported)",
            *(f"{words}: test, paired difference" for words in BASELINES.values()),
        ],
        rows,
        numeric={3},
    )
    tests = fits.get("baseline_tests", {})
    table = _moleculenet_table(entries) + table
    sentences = "".join(f"<li>{_e(entry['sentence'])}</li>" for entry in entries)
    return (
        '<h3 id="baselines">Against the baselines</h3><p>The pretrained checkpoint (any mode) with the best mean '
        "validation metric over split seeds is chosen without looking at the test split, then reported on test. "
        "Each comparison is the paired difference pick − baseline on the split seeds both saw (> 0 favours "
        "pretraining), with its t interval over seeds; "
        f"{_e(tests.get('correction_name', 'Holm'))} over the {tests.get('n_tests', 0)} comparisons.</p>"
        f"{table}<ul>{sentences}</ul>"
    )


def _mean_sd(spread: dict | None) -> str:
    if spread is None:
        return "–"
    sd = spread.get("sd")
    sd_text = f" ± {sd:.2g}" if sd is not None and np.isfinite(sd) else ""
    return f"{_number(spread['mean'])}{sd_text} (n = {spread['n']})"


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.3g}".replace("-", "−")


def _p(value) -> str:
    return "–" if value is None else f"{value:.2g}"


def _trend_table(fits: dict) -> str:
    rows = []
    for entry in fits.get("downstream", []):
        for key, v in entry.get("verdicts", {}).items():
            who = [entry["task"], MODES.get(entry["mode"], entry["mode"]), f"{AXES[key][3]} ({v['held_fixed']})"]
            if v["status"] != "ok":
                rows.append(who + ["not testable: " + v["reason"], "", "", "", "", "", "", ""])
                continue
            half = (v["ci"][1] - v["ci"][0]) / 2
            changed = f" ({v['raw_verdict']} before the correction)" if v["raw_verdict"] != v["verdict"] else ""
            rows.append(
                who
                + [
                    v["verdict"] + changed,
                    format_with_uncertainty(v["slope"], half),
                    _interval(*v["ci"]),
                    f"±{v['margin']:.3g} ({v['margin_source']})",
                    f"±{v['min_detectable_slope']:.2g}",
                    _p(v["p_verdict"]),
                    _p(v["p_adjusted"]),
                    f"{v['n_runs']} / {v['n_points']}",
                ]
            )
    if not rows:
        return ""
    tests = fits.get("trend_tests", {})
    return (
        '<h3 id="trends">Trends, one axis at a time</h3><p>The slope of the test metric per decade of one scale '
        "axis, with the others held fixed (N at fixed D: one intercept per token budget; D at fixed N: one per "
        "model size) or along the compute frontier for C. Intervals are run-level (a cluster jackknife over "
        "training runs, split seeds as paired blocks), at 95 %. Four verdicts: <b>plateau</b> when the whole "
        "interval lies inside ± the margin (two one-sided tests), <b>improving</b> or <b>degrading</b> when it "
        "excludes 0 (and is not inside the margin), <b>inconclusive</b> otherwise, with the smallest slope the "
        "grid could detect (80 % power). The p on which each verdict rests is shown raw and after "
        f"{_e(tests.get('correction_name', 'Holm'))} over the {tests.get('n_tests', 0)} trend tests of this "
        "run; a definite verdict whose adjusted p fails becomes inconclusive.</p>"
        + _table(
            [
                "task",
                "mode",
                "axis (held fixed)",
                "verdict",
                "slope per decade",
                "95 % interval",
                "plateau margin",
                "detectable (80 %)",
                "p",
                "adjusted p",
                "runs / points",
            ],
            rows,
            numeric={4, 5, 7, 8, 9},
        )
    )


def _verdict_cell(mode: dict) -> str:
    """'N: improving +0.021 [0.01, 0.03]; D: …; C: …' for one task and mode."""
    parts = []
    for key, v in sorted(mode["verdicts"].items(), key=lambda item: list(AXES).index(item[0])):
        if v["status"] != "ok":
            parts.append(f"{AXES[key][0]}: not testable")
            continue
        parts.append(f"{AXES[key][0]}: {v['verdict']} {_signed(v['slope'])} {_interval(*v['ci'])}")
    return "; ".join(parts)


def _count(value) -> str:
    return "–" if value is None else str(int(value))


def _balance(record: dict) -> str:
    """Label balance (classification) or spread (regression) of one task, in a few words."""
    if record.get("task_type") == "classification":
        return f"smallest positive fraction {_number(record.get('min_positive_fraction'))}"
    if record.get("task_type") == "regression":
        return f"label sd {_number(record.get('max_label_sd'))}"
    return "–"


def _tasks_html(fits: dict) -> str:
    """Each task's characteristics beside its verdicts, then the tasks' N slopes against each characteristic."""
    section = fits.get("task_characteristics", {})
    head = '<h3 id="task-characteristics">Tasks: what they are, and how each scales</h3>'
    if section.get("status") != "ok":
        return head + f'<p class="note">No task characteristics: {_e(section.get("reason", "not computed"))}.</p>'
    modes = sorted({mode for record in section["tasks"] for mode in record["modes"]})
    rows = []
    for r in section["tasks"]:
        if r["measured"]:
            cells = [
                r["task"],
                r.get("task_type") or "–",
                _count(r.get("n_molecules")),
                _count(r.get("n_labels")),
                f"{_number(r.get('scaffold_diversity'))} ({_count(r.get('n_scaffolds'))} scaffolds)",
                _balance(r),
                f"{_number(r.get('nn_tanimoto_mean'))} (median {_number(r.get('nn_tanimoto_median'))})",
                _number(r.get("fraction_nn_unrelated")),
            ]
        else:
            cells = [r["task"], "not measured", "", "", "", "", "", ""]
        rows.append(cells + [_verdict_cell(r["modes"][m]) if m in r["modes"] else "–" for m in modes])
    table = _table(
        [
            "task",
            "type",
            "molecules",
            "labels",
            "scaffolds per molecule",
            "balance or spread",
            "nearest-neighbour Tanimoto to the corpus",
            "share below 0.4",
            *(f"{MODES.get(m, m)}: verdict, slope per decade [95 %]" for m in modes),
        ],
        rows,
        numeric={2, 3, 6, 7},
    )
    relation = [
        [
            MODES.get(row["mode"], row["mode"]),
            row["words"],
            row["n_tasks"],
            ", ".join(
                f"{task} ({_number(x)}: {_signed(y)})"
                for task, x, y in sorted(
                    zip(row["tasks"], row["x"], row["n_slope_in_margins"], strict=True), key=lambda t: t[1]
                )
            ),
            _number(row["spearman"]) if row["spearman"] is not None else row["reason"],
        ]
        for row in section["relation"]
    ]
    return (
        head + "<p>Each task's characteristics (results/tasks.parquet: size, label balance or spread, Bemis–Murcko "
        "scaffold diversity, and the nearest-neighbour ECFP4 Tanimoto of its molecules to a sample of the "
        "pretraining corpus) beside its verdicts along N, D and C (slopes in the task's metric per decade, the "
        "Holm-corrected verdicts of the trend table).</p>"
        + table
        + "<p>Does how a task scales go with what it is? Per mode and characteristic, the tasks ordered by the "
        "characteristic, each with its N slope per decade in units of its plateau margin (signed so that > 0 "
        "is improvement). <b>Descriptive only</b>: the tasks are few and chosen, not sampled, so no p-value or "
        "interval is given; Spearman's ρ over tasks is shown from three tasks on.</p>"
        + _table(
            ["mode", "characteristic", "tasks", "tasks by characteristic (value: scaled N slope)", "ρ"],
            relation,
            numeric={2},
        )
    )


def _ladder_html(fits: dict) -> str:
    ladder, law = fits.get("task_ladder", {}), fits.get("loss_law_backtest", {})
    beside = (
        f"{law['mean_abs_relative_error']:.1%}"
        if law.get("status") == "ok"
        else f"not run ({law.get('reason', 'no back-test')})"
    )
    head = (
        '<h3 id="task-ladder">Predicting the largest rung of each task (task ladder)</h3><p>The two-step method of '
        "Bhagia et al. 2024: the task loss (validation loss of the fine-tuned or probed model) as a function of N "
        "and D, then a monotone link from task loss to the metric, both fitted without the largest rung(s) and "
        f"used to predict them. The pretraining-loss law's own back-test error on the same rungs is {_e(beside)} "
        "(relative); compare it with the task loss' relative error (step 1).</p>"
    )
    if ladder.get("status") != "ok":
        return head + f'<p class="note">No task ladder: {_e(ladder.get("reason", "not run"))}.</p>'
    rows = []
    for e in ladder["entries"]:
        who = [e["task"], MODES.get(e["mode"], e["mode"])]
        if e["status"] != "ok":
            rows.append(who + ["skipped: " + e["reason"], "", "", "", "", ""])
            continue
        rows.append(
            who
            + [
                f"{e['fit']['loss_law']}, {e['fit']['link']} link",
                ", ".join(format_scale(n) for n in e["holdout_n_params"]),
                f"{_number(e['mean_abs_error'])} (max {_number(e['max_abs_error'])}) {e['metric_label']}",
                f"{e['task_loss_mean_abs_relative_error']:.1%}",
                beside,
                f"{_number(e['link_only_mean_abs_error'])}",
            ]
        )
    return head + _table(
        [
            "task",
            "mode",
            "task-loss law, link",
            "held-out N",
            "metric error (both steps)",
            "task-loss error (step 1)",
            "pretraining-loss law error",
            "link alone (step 2)",
        ],
        rows,
        numeric={4, 5, 6, 7},
    )


def _proxy_html(fits: dict) -> str:
    proxies = fits.get("proxies", {})
    if proxies.get("status") != "ok":
        return f'<p class="note">No proxy evaluation: {_e(proxies.get("reason", "not fitted"))}.</p>'
    labels, tests = proxies["labels"], proxies["prediction_tests"]
    timing = {name: group for group, names in proxies["timing"].items() for name in names}
    prediction = [
        [row["task"], MODES.get(row["mode"], row["mode"]), labels.get(row["proxy"], row["proxy"])]
        + (
            ["not testable: " + row["reason"], "", "", "", "", ""]
            if row["status"] != "ok"
            else [
                _number(row["rmse_loss"]),
                _number(row["rmse_loss_proxy"]),
                f"{_signed(row['improvement'])} {_interval(*row['improvement_ci'])}",
                f"{_p(row['p'])} (≥ {_p(row['smallest_possible_p'])})",
                _p(row.get("p_adjusted")),
                row["finding"],
            ]
        )
        for row in proxies["prediction"]
    ]
    words = {"validation": "validation metric", **labels}
    regret = []
    for group in proxies["regret"]:
        for pick in group["selectors"]:
            picked = pick["picked"] or {}
            regret.append(
                [
                    group["task"],
                    MODES.get(group["mode"], group["mode"]),
                    words.get(pick["selector"], pick["selector"]),
                    "highest"
                    if pick["selector"] == "validation" and group["higher_is_better"]
                    else "lowest"
                    if pick["selector"] != "validation" or not group["higher_is_better"]
                    else "",
                    f"{picked.get('trial_id', '–')} @ {_number(picked.get('tokens'))}",
                    _number(pick["picked_test"]),
                    _number(pick["test_best"]),
                    _number(pick["regret"]),
                ]
            )
    correlations = [
        [
            row["task"],
            MODES.get(row["mode"], row["mode"]),
            labels.get(row["proxy"], row["proxy"]),
            TIMING_WORDS[timing.get(row["proxy"], "scale")],
            row["n"],
            _number(row["spearman"]),
            _interval(row["ci_lo"], row["ci_hi"]),
            _number(row["partial_given_loss"]),
            _interval(row["partial_ci_lo"], row["partial_ci_hi"]),
            row["reason"] or "",
        ]
        for row in proxies["correlations"]
    ]
    missing = [labels.get(m, m) for m in proxies.get("not_measured", [])]
    note = f"<p>Not measured in this run: {_e(', '.join(missing))}.</p>" if missing else ""
    return (
        "<p>A proxy is judged as a user would use it: only what can be measured before fine-tuning (pretraining "
        "loss; Hessian and sharpness of the pretraining loss at the pretrained weights; the task loss' Hessian and "
        "sharpness at the pretrained encoder with a probe head) can predict; what is measured at the fine-tuned "
        "weights is descriptive.</p>"
        '<h3 id="proxy-prediction">Leave one model size out: loss alone against loss + proxy</h3>'
        "<p>Each model size in turn is held out; the metric of its checkpoints is predicted from the other sizes, "
        "by a line in pretraining loss and by one in loss and the proxy (log10 when positive). Both errors are RMSE "
        "in metric units; improvement = the first − the second, with a percentile bootstrap interval over held-out "
        "sizes (descriptive). The test is a sign-flip test over held-out sizes (its smallest possible p, with k "
        f"sizes 2·2^−k, in brackets), {_e(tests['correction_name'])} over the {tests['n_tests']} tests.</p>"
        + _table(
            [
                "task",
                "mode",
                "proxy",
                "RMSE, loss alone",
                "RMSE, loss + proxy",
                "improvement (95 %)",
                "p",
                "adjusted p",
                "finding",
            ],
            prediction,
            numeric={3, 4, 5, 6, 7},
        )
        + '<h3 id="proxy-regret">Selection regret</h3><p>One checkpoint per task and mode picked by each quantity '
        "(the proxies where they are lowest, fixed in advance: lower loss, flatter minima), scored by how far its "
        "test metric falls short of the best test metric among the candidates (metric units; the test-best is an "
        "oracle used only for scoring).</p>"
        + _table(
            ["task", "mode", "picked by", "where it is", "picked checkpoint", "its test metric", "test-best", "regret"],
            regret,
            numeric={5, 6, 7},
        )
        + '<h3 id="proxy-correlations">Rank correlations (descriptive)</h3><p>Spearman ρ of each quantity with the '
        "test metric across checkpoints, and the partial ρ given pretraining loss, with bootstrap intervals over "
        "checkpoints. Checkpoints of one run are not independent, so these describe; they are not tests.</p>"
        + note
        + _table(
            [
                "task",
                "mode",
                "quantity",
                "measured",
                "n",
                "ρ",
                "95 % interval",
                "partial ρ | loss",
                "95 % interval",
                "note",
            ],
            correlations,
            numeric={4, 5, 6, 7, 8},
        )
    )


TIMING_WORDS = {
    "before_finetuning": "before fine-tuning",
    "descriptive": "after fine-tuning (descriptive)",
    "scale": "scale axis",
}


INPUT_FLAG = 0.01  # a task whose [UNK] or truncated share is above this is flagged in the report


def _inputs_html(manifest, finetune: pd.DataFrame) -> str:
    """The corpus's overlap with the tasks (manifest.json's decontamination) and, per task, the largest [UNK] and
    truncated shares of its encoded SMILES over every fine-tuning and probing row, flagged above 1 %."""
    if manifest is None:
        parts = ["<p>No <code>data/manifest.json</code>: the corpus's overlap with the tasks is unknown.</p>"]
    elif not manifest.decontamination:
        off = manifest.options.get("decontaminate") is False
        why = "data.decontaminate: false" if off else "no task to clean against"
        parts = [
            f"<p>The corpus was not decontaminated ({why}): downstream molecules may have been seen in pretraining.</p>"
        ]
    else:
        key = {"inchikey": "the same InChIKey", "connectivity": "the same InChIKey connectivity layer (any stereo)"}
        rows = [[task, o.task_molecules, o.removed] for task, o in manifest.decontamination.items()]
        parts = [
            f"<h3>Decontamination</h3><p>Corpus molecules with {key.get(manifest.decontamination_key or '', '?')} "
            f"as a task molecule (any split) were removed before the train/validation split: "
            f"{manifest.counts.n_decontaminated:,} in all (listed in <code>data/rejects.csv</code>).</p>",
            _table(["task", "task molecules", "removed from corpus"], rows, numeric={1, 2}),
        ]
    if manifest is not None and manifest.representations:
        c = manifest.counts
        refused = ", ".join(f"{r}: {n:,}" for r, n in c.unconverted.items()) or "none"
        parts.append(
            f"<h3>Representations</h3><p>Every molecule was prepared as SMILES and as "
            f"{_e(', '.join(manifest.representations))}, each read back to the same canonical SMILES; "
            f"{c.n_unconverted:,} molecules that a representation could not write or read back were left out of all "
            f"of them ({_e(refused)}; listed in <code>data/rejects.csv</code>), so every arm trained on the same "
            f"{c.n_kept:,} molecules.</p>"
        )
    if manifest is not None and manifest.tokenizer.task_tokens:
        parts.append(
            f"<p>Token types only the tasks have, added to the vocabulary after the corpus's (no labels "
            f"involved): {_e(' '.join(manifest.tokenizer.task_tokens))}.</p>"
        )
    read = finetune[(finetune["status"] == "ok") & finetune["mode"].isin(["finetune", "probe", "random_init"])]
    shares = []
    for task, group in read.groupby("task", sort=True):
        unk, cut = (pd.to_numeric(group[c], errors="coerce").max() for c in ("unk_fraction", "truncated_fraction"))
        flagged = [what for what, v in (("[UNK]", unk), ("truncated", cut)) if pd.notna(v) and v > INPUT_FLAG]
        shares.append(
            [
                task,
                _percent(unk),
                _percent(cut),
                f"flagged: {' and '.join(flagged)} above {INPUT_FLAG:.0%}" if flagged else "",
            ]
        )
    if shares:
        parts.append(
            "<h3>Task inputs as the models read them</h3><p>Largest share over checkpoints and seeds of "
            "the task's tokens read as [UNK], and of its molecules cut to the model's length; task SMILES "
            "are canonicalised as the corpus was before tokenisation.</p>"
            + _table(["task", "[UNK] tokens", "truncated molecules", "flag"], shares, numeric={1, 2})
        )
    return "\n".join(parts)


def _percent(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * float(value):.2f} %"


def _events_html(rd: RunDir) -> str:
    """The faults the run survived (restarts, corrupt checkpoints set aside), from RunDir.fault_events."""
    events = rd.fault_events()
    if not events:
        return "<p>No faults were recorded: no restarts and no corrupt checkpoints.</p>"
    rows = [
        [
            e.get("stage", ""),
            e.get("trial_id", "–"),
            e.get("event", ""),
            ", ".join(f"{k}: {v}" for k, v in e.items() if k not in ("stage", "trial_id", "event", "time")),
        ]
        for e in events
    ]
    return "<h3>Faults handled</h3>" + _table(["stage", "trial", "event", "details"], rows)


def _excluded_html(fits: dict) -> str:
    excluded = fits.get("excluded", [])
    if not excluded:
        return "<p>Nothing was left out: every trial finished and every measurement succeeded.</p>"
    rows = [[e["table"], e["trial_id"] or "–", e["status"], e["n_rows"], e["reason"]] for e in excluded]
    return _table(["table", "trial", "status", "rows", "why"], rows, numeric={3})
