"""The report's figures: one function per PNG, tables and fits.json in, a file out.

Every function takes plain frames (already cleaned by RunDir.fit_inputs: counted checkpoints, rows with status ok)
and the fits.json dict, writes one PNG and returns its path; when there is nothing to draw it raises
`NoData` with a one-line reason, which the report prints instead of the figure.
Figures are built with matplotlib's object API (Figure + Agg canvas), never pyplot, so nothing global
is touched and nothing is kept open between figures.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.patches
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from clmscale.fits.downstream import format_scale
from clmscale.fits.slopes import compute_frontier_mask

DPI = 110
MODE_STYLE = {"finetune": ("tab:blue", "o", "fine-tuned"), "probe": ("tab:orange", "s", "linear probe")}
BASELINE_STYLE = {
    "morgan_fp": ("tab:green", "--", "Morgan fingerprints"),
    "random_init": ("tab:red", ":", "random init, fine-tuned"),
}
MAX_PANELS = 12  # small multiples beyond this are cut, and the caption says so


class NoData(Exception):
    """Nothing to draw; the message is the one-line note the report shows instead."""


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", metadata={"Software": None})
    return out


def _rung_colors(points: pd.DataFrame) -> dict[str, tuple]:
    """One colour per rung, dark (small) to light (large), from viridis without its pale yellow end."""
    order = (
        points.groupby("rung")["n_params_non_embedding"].first().sort_values().index.tolist()
        if "rung" in points.columns and len(points)
        else []
    )
    cmap = matplotlib.colormaps["viridis"]
    return {rung: cmap(0.85 * i / max(len(order) - 1, 1)) for i, rung in enumerate(order)}


def _rung_label(rung: str, n_params: float) -> str:
    return f"{rung} (N = {format_scale(n_params)})"


def _log_axis(ax, values, axis: str = "x") -> None:
    """A log axis labelled like the text ('3·10⁵'), with 1-2-5 ticks when the data span little more than a decade."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values) & (values > 0)]
    span = math.log10(values.max() / values.min()) if values.size else 3.0
    subs = (1.0,) if span > 2.5 else (1.0, 2.0, 5.0) if span > 0.6 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=subs))
    target.set_major_formatter(FuncFormatter(lambda value, _: format_scale(value)))
    target.set_minor_formatter(NullFormatter())


def _log_if_positive(ax, values, axis: str = "y") -> None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size and (values > 0).all() and values.max() / values.min() > 3:
        _log_axis(ax, values, axis)


def _ok(result: dict | None) -> bool:
    return result is not None and result.get("status") == "ok"


# --------------------------------------------------------------------------------------------
# pretraining loss


def loss_vs_compute(points: pd.DataFrame, left_out: pd.DataFrame, fits: dict, out: Path) -> Path:
    """Validation loss against FLOPs: one colour per rung, the fitted iso-N curves and the frontier."""
    if points.empty:
        raise NoData("no finished checkpoint with a validation loss")
    points = points[np.isfinite(points["flops"].to_numpy(float)) & (points["flops"].to_numpy(float) > 0)]
    left_out = left_out[np.isfinite(left_out["flops"].to_numpy(float)) & (left_out["flops"].to_numpy(float) > 0)]
    if points.empty:
        raise NoData("no finished checkpoint has a recorded FLOP count")
    figure = _figure(9.5, 5.0)
    ax = figure.subplots()
    colors = _rung_colors(points)
    law = fits.get("loss_law", {})
    handles = []
    for rung, rows in sorted(points.groupby("rung"), key=lambda item: item[1]["n_params_non_embedding"].iloc[0]):
        color, n_params = colors[rung], float(rows["n_params_non_embedding"].iloc[0])
        for _, trial in rows.sort_values("tokens").groupby("trial_id"):
            ax.plot(trial["flops"], trial["val_loss"], "o-", color=color, ms=6, lw=1.2)
        handles.append(Line2D([], [], color=color, marker="o", label=_rung_label(rung, n_params)))
        if _ok(law):
            # this rung's own FLOPs per (N·D), so the fitted curve lands on its points
            per_param_token = float(np.median(rows["flops"] / (rows["n_params_non_embedding"] * rows["tokens"])))
            tokens = np.logspace(math.log10(rows["tokens"].min() / 2), math.log10(rows["tokens"].max() * 2), 60)
            ax.plot(
                per_param_token * n_params * tokens,
                _chinchilla(law["params"], n_params, tokens),
                "--",
                color=color,
                lw=1,
                alpha=0.8,
            )
    if not left_out.empty:
        ax.scatter(left_out["flops"], left_out["val_loss"], marker="x", color="0.4", s=50, zorder=3)
        handles.append(Line2D([], [], color="0.4", marker="x", ls="", label="did not finish (left out of fits)"))
    if _ok(law):
        unpinned = "" if law.get("identified", True) else " (not identified from this grid)"
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1, label=f"L(N, D) fit at each model size{unpinned}"))
        frontier = law.get("frontier", {})
        if _ok(frontier):  # only an identified law has a frontier to draw
            ax.plot(frontier["flops"], frontier["loss"], color="black", lw=2)
            handles.append(Line2D([], [], color="black", lw=2, label="compute-optimal frontier of the fit"))
    compute = fits.get("compute_law", {})
    saturating = compute.get("saturating_frontier") if _ok(compute) else None
    if saturating is not None and _ok(saturating) and saturating.get("identified", True):
        flops = np.logspace(math.log10(points["flops"].min()), math.log10(points["flops"].max() * 10), 60)
        p = saturating["params"]
        ax.plot(flops, p["E"] + p["A"] * flops ** -p["gamma"], ":", color="tab:red", lw=2)
        handles.append(
            Line2D([], [], color="tab:red", ls=":", lw=2, label=r"$L(C) = E + A\,C^{-\gamma}$ on frontier points")
        )
    elif saturating is not None and _ok(saturating):
        handles.append(Line2D([], [], color="none", label="L(C) = E + A·C^−γ: not identified, not drawn"))
    xlim = (points["flops"].min() / 2, points["flops"].max() * 12)
    _log_axis(ax, xlim)
    ax.set_xlim(*xlim)
    y = points["val_loss"]
    ax.set_ylim(max(y.min() - 0.25 * np.ptp(y) - 0.05, 0), y.max() + 0.15 * np.ptp(y) + 0.05)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Pretraining loss against compute")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return _save(figure, out)


def _chinchilla(params: dict, n_params, tokens):
    return (
        params["E"]
        + params["A"] / np.asarray(n_params) ** params["alpha"]
        + params["B"] / np.asarray(tokens) ** params["beta"]
    )


def loss_surface(points: pd.DataFrame, fits: dict, out: Path) -> Path:
    """The fitted L(N, D) as contours with the measured points, and N*(C), D*(C) against C."""
    law = fits.get("loss_law", {})
    if not _ok(law):
        raise NoData(f"no L(N, D) fit ({law.get('reason', 'none was made')})")
    figure = _figure(11.5, 4.6)
    surface_ax, frontier_ax = figure.subplots(1, 2, width_ratios=[1.15, 1])
    from clmscale.fits.fit import D_COLUMNS

    measure = law.get("data_measure", "tokens")  # D's unit: fits.data_measure
    d_points = points[D_COLUMNS[measure]]
    n_lo, n_hi = points["n_params_non_embedding"].min() / 4, points["n_params_non_embedding"].max() * 10
    d_lo, d_hi = d_points.min() / 4, d_points.max() * 10
    n_grid, d_grid = np.meshgrid(
        np.logspace(math.log10(n_lo), math.log10(n_hi), 120), np.logspace(math.log10(d_lo), math.log10(d_hi), 120)
    )
    loss = _chinchilla(law["params"], n_grid, d_grid)
    levels = np.quantile(loss, np.linspace(0, 1, 14))
    filled = surface_ax.contourf(n_grid, d_grid, loss, levels=levels, cmap="viridis_r")
    lines = surface_ax.contour(n_grid, d_grid, loss, levels=levels[1::2], colors="white", linewidths=0.6)
    surface_ax.clabel(lines, fmt="%.2f", fontsize=7)
    surface_ax.scatter(
        points["n_params_non_embedding"],
        d_points,
        c=points["val_loss"],
        cmap="viridis_r",
        norm=filled.norm,
        edgecolors="black",
        s=45,
        zorder=3,
        label="measured checkpoints",
    )
    frontier = law.get("frontier", {})
    if _ok(frontier):
        surface_ax.plot(
            frontier["n_params"], frontier["n_tokens"], color="tab:red", lw=2, label="compute-optimal N*, D*"
        )
    _log_axis(surface_ax, (n_lo, n_hi), "x")
    _log_axis(surface_ax, (d_lo, d_hi), "y")
    identified = "" if law.get("identified", True) else ", not identified from this grid"
    if "R_star" in law["params"]:  # the data-constrained law, drawn where no token repeats (D' = D)
        identified += ", unrepeated data"
    surface_ax.set(
        xlim=(n_lo, n_hi),
        ylim=(d_lo, d_hi),
        xlabel="non-embedding parameters N",
        ylabel=f"training {measure} D",
        title=f"Fitted L(N, D) (nats/token{identified})",
    )
    surface_ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    figure.colorbar(filled, ax=surface_ax, label="fitted loss (nats/token)", format="%.2f")
    if not _ok(frontier):
        frontier_ax.axis("off")
        lines = ["No compute-optimal allocation: L(N, D) is not identified from this grid.", ""]
        lines += [
            textwrap.fill(f"• {p['parameter']}: {p['problem']}", 62, subsequent_indent="  ")
            for p in law["identification"]["problems"]
        ]
        lines += ["", textwrap.fill(f"What would identify it: {law['identification']['what_would_identify']}.", 62)]
        frontier_ax.text(0.0, 1.0, "\n".join(lines), transform=frontier_ax.transAxes, va="top", ha="left", fontsize=8.5)
        return _save(figure, out)

    flops = np.asarray(frontier["flops"], float)
    frontier_ax.plot(flops, frontier["n_params"], color="tab:purple", lw=2, label="N* (parameters)")
    frontier_ax.plot(flops, frontier["n_tokens"], color="tab:brown", lw=2, label=f"D* ({measure})")
    measured = points["flops"].to_numpy(float)
    measured = measured[np.isfinite(measured) & (measured > 0)]
    if measured.size:
        frontier_ax.axvspan(measured.min(), measured.max(), color="0.85", label="compute range of this sweep")
    _log_axis(frontier_ax, flops, "x")
    _log_axis(frontier_ax, np.concatenate([frontier["n_params"], frontier["n_tokens"]]), "y")
    frontier_ax.set(
        xlabel="training compute C (FLOPs)",
        ylabel="parameters or tokens",
        title=rf"Compute-optimal allocation: $N^* \propto C^{{{frontier['n_params_exponent']:.2f}}}$, "
        rf"$D^* \propto C^{{{frontier['n_tokens_exponent']:.2f}}}$",
    )
    frontier_ax.title.set_fontsize(10)
    frontier_ax.grid(True, which="major", alpha=0.3)
    frontier_ax.legend(fontsize=8, loc="upper left")
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# downstream


DOWNSTREAM_AXES = (  # verdict key, x column, column held fixed, axis label, held-fixed symbol
    ("n", "n_params_non_embedding", "tokens", "non-embedding parameters N", "D"),
    ("d", "tokens", "n_params_non_embedding", "training tokens D", "N"),
    ("c", "flops", None, "pretraining compute C (FLOPs)", None),
)
AXIS_TITLES = {"n": "N at fixed D", "d": "D at fixed N", "c": "C along the compute frontier"}
VERDICT_COLORS = {"improving": "tab:green", "degrading": "tab:red", "plateau": "tab:purple", "inconclusive": "0.45"}
HELD_STYLES = ("-", "--", ":", "-.")


def downstream(task: str, points: pd.DataFrame, rows: pd.DataFrame, entries: list[dict], out: Path) -> Path:
    """Test metric (mean ± sd over split seeds) along N at fixed D, D at fixed N and C along the compute frontier,
    with the baselines as lines; and, right, each slope's interval against its plateau margin with the verdict.

    entries: fits.json's downstream entries of this task (their `verdicts`)."""
    mine = points[points["task"] == task] if not points.empty else points
    if mine.empty:
        raise NoData("no fine-tuned or probed checkpoint for this task")
    metric = str(mine["metric"].iloc[0])
    higher_is_better = bool(mine["higher_is_better"].iloc[0])
    label = {"roc_auc": "ROC-AUC", "rmse": "RMSE"}.get(metric, metric)
    verdicts = {entry["mode"]: entry.get("verdicts", {}) for entry in entries}
    figure = _figure(16.0, 4.6)
    axes = figure.subplots(1, 4, width_ratios=[1, 1, 1, 1.15])
    for ax in axes[1:3]:
        ax.sharey(axes[0])
    baselines = (
        {mode: rows.loc[(rows["task"] == task) & (rows["mode"] == mode), "value"].dropna() for mode in BASELINE_STYLE}
        if not rows.empty
        else {}
    )
    held_handles: dict[str, Line2D] = {}
    # strict=False: the fourth axis holds the slope intervals, drawn below
    for ax, (key, column, held, xlabel, held_symbol) in zip(axes, DOWNSTREAM_AXES, strict=False):
        x = mine[column].to_numpy(float)
        usable = np.isfinite(x) & (x > 0)
        if not usable.any():
            ax.text(0.5, 0.5, "not recorded for these checkpoints", transform=ax.transAxes, ha="center", color="0.4")
            ax.set_xticks([])
        for mode, group in mine[usable].groupby("mode", sort=True):
            color, marker, _ = MODE_STYLE.get(mode, ("0.3", "o", mode))
            if held is not None:
                assert held_symbol is not None  # DOWNSTREAM_AXES gives both or neither
                _held_lines(ax, group, column, held, held_symbol, color, marker, held_handles)
            else:
                _frontier_points(ax, group, color, marker)
        for mode, values in baselines.items():
            if not values.empty:
                color, style, _ = BASELINE_STYLE[mode]
                mean, sd = values.mean(), (values.std() if len(values) > 1 else 0.0)
                ax.axhline(mean, color=color, ls=style, lw=1.8)
                ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.08)
        if usable.any():
            _log_axis(ax, x[usable], "x")
        said = [
            f"{MODE_STYLE.get(mode, ('', '', mode))[2]}: "
            + (v[key]["verdict"] if v[key]["status"] == "ok" else "not testable")
            for mode, v in verdicts.items()
            if key in v
        ]
        ax.set_title("\n".join([AXIS_TITLES[key], *said]), fontsize=9.5)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{label} on the test split ({'higher' if higher_is_better else 'lower'} is better)")
    _slope_intervals(axes[3], verdicts, label)
    handles = [
        Line2D([], [], color=MODE_STYLE[m][0], marker=MODE_STYLE[m][1], ls="", label=MODE_STYLE[m][2])
        for m in MODE_STYLE
        if m in set(mine["mode"])
    ]
    handles += [
        Line2D([], [], color=BASELINE_STYLE[m][0], ls=BASELINE_STYLE[m][1], lw=1.8, label=BASELINE_STYLE[m][2])
        for m, values in baselines.items()
        if not values.empty
    ]
    handles += list(held_handles.values())[:6]
    handles.append(Line2D([], [], color="0.3", marker="o", mfc="none", ls="", label="off the compute frontier"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False, fontsize=8.5)
    figure.suptitle(f"{task}: {label} after pretraining, mean ± sd over split seeds")
    return _save(figure, out)


def _held_lines(
    ax, group: pd.DataFrame, column: str, held: str, symbol: str, color, marker, handles: dict[str, Line2D]
) -> None:
    """One line per value of the held-fixed column (values within 2 % are one, as fits.verdicts groups them)."""
    key = np.round(np.log10(group[held].to_numpy(float)) / math.log10(1.02))
    for i, (_, line) in enumerate(sorted(group.groupby(key), key=lambda item: item[0])):
        line = line.sort_values(column)
        style = HELD_STYLES[i % len(HELD_STYLES)]
        ax.errorbar(
            line[column],
            line["mean"],
            yerr=line["sd"].fillna(0),
            fmt=marker + style,
            color=color,
            capsize=3,
            ms=5,
            lw=1,
            alpha=0.9,
        )
        text = f"{symbol} = {format_scale(float(line[held].median()))}"
        handles.setdefault(f"{symbol}{i}", Line2D([], [], color="0.3", ls=style, lw=1, label=text))


def _frontier_points(ax, group: pd.DataFrame, color, marker) -> None:
    """Checkpoints on the compute frontier (lowest pretraining loss at their C) filled and joined; the rest hollow."""
    on = compute_frontier_mask(group, "flops", "pretrain_val_loss", ("trial_id", "tokens"))
    frontier = group[on].sort_values("flops")
    ax.errorbar(
        frontier["flops"],
        frontier["mean"],
        yerr=frontier["sd"].fillna(0),
        fmt=marker + "-",
        color=color,
        capsize=3,
        ms=5,
        lw=1,
    )
    rest = group[~on]
    ax.scatter(rest["flops"], rest["mean"], marker=marker, facecolors="none", edgecolors=color, s=28, alpha=0.7)


def _slope_intervals(ax, verdicts: dict[str, dict], label: str) -> None:
    """Each slope per decade with its interval (bar) against ± its margin (grey band), labelled with the verdict."""
    rows = [(mode, key, v[key]) for mode, v in verdicts.items() for key in AXIS_TITLES if key in v]
    if not rows:
        ax.text(0.5, 0.5, "no verdicts", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_axis_off()
        return
    extent = 0.0
    for y, (_, _, v) in enumerate(rows):
        if v["status"] != "ok":
            ax.text(0, y, "not testable", ha="center", va="center", fontsize=8, color="0.4")
            continue
        lo, hi = v["ci"]
        margin = v["margin"]
        ax.add_patch(matplotlib.patches.Rectangle((-margin, y - 0.35), 2 * margin, 0.7, color="0.88", lw=0))
        color = VERDICT_COLORS[v["verdict"]]
        ax.errorbar([v["slope"]], [y], xerr=[[v["slope"] - lo], [hi - v["slope"]]], fmt="o", color=color, capsize=4)
        ax.annotate(
            v["verdict"],
            (1.0, y),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8.5,
            color=color,
        )
        extent = max(extent, abs(lo), abs(hi), margin)
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_yticks(
        range(len(rows)), [f"{MODE_STYLE.get(m, ('', '', m))[2]}\n{AXIS_TITLES[k]}" for m, k, _ in rows], fontsize=7.5
    )
    ax.set_ylim(len(rows) - 0.5, -0.5)
    if extent > 0:
        ax.set_xlim(-1.15 * extent, 1.15 * extent)
    ax.set_xlabel(f"slope, {label} per decade (grey: ± plateau margin)")
    ax.set_title("Slope intervals against the margin", fontsize=9.5)
    ax.grid(True, axis="x", alpha=0.3)


# --------------------------------------------------------------------------------------------
# Hessian


def hessian(rows: pd.DataFrame, out: Path) -> Path:
    """λmax, trace and trace per parameter (trace / hessian_dim, comparable across sizes) of the pretraining-loss
    Hessian against model size and against tokens seen."""
    if rows.empty or "loss" not in rows.columns:
        raise NoData("no Hessian measurements (results/hessian.parquet is missing or empty)")
    rows = rows[(rows["loss"] == "pretrain") & np.isfinite(rows["lambda_max"].to_numpy(float))]
    if rows.empty:
        raise NoData("no Hessian of the pretraining loss with a finite λmax")
    dim = pd.to_numeric(rows["hessian_dim"], errors="coerce") if "hessian_dim" in rows.columns else None
    panels = [("lambda_max", "top eigenvalue λmax"), ("trace", "trace")]
    if dim is not None and (dim > 0).any():
        rows = rows.assign(trace_per_param=pd.to_numeric(rows["trace"], errors="coerce") / dim.where(dim > 0))
        panels.append(("trace_per_param", "trace per parameter"))
    figure = _figure(5.5 * len(panels), 7.2)
    axes = figure.subplots(2, len(panels))
    colors = _rung_colors(rows)
    token_values = sorted(rows["tokens"].unique())
    token_cmap = matplotlib.colormaps["cividis"]
    for (column, what), row_axes in zip(panels, axes.T, strict=True):
        by_size, by_tokens = row_axes
        for i, (tokens, group) in enumerate(rows.groupby("tokens", sort=True)):
            group = group.sort_values("n_params_non_embedding")
            color = token_cmap(0.85 * i / max(len(token_values) - 1, 1))
            by_size.plot(
                group["n_params_non_embedding"], group[column], "o-", color=color, label=f"D = {format_scale(tokens)}"
            )
        for rung, group in sorted(rows.groupby("rung"), key=lambda item: item[1]["n_params_non_embedding"].iloc[0]):
            group = group.sort_values("tokens")
            by_tokens.plot(
                group["tokens"],
                group[column],
                "o-",
                color=colors[rung],
                label=_rung_label(rung, group["n_params_non_embedding"].iloc[0]),
            )
        _log_axis(by_size, rows["n_params_non_embedding"], "x")
        _log_axis(by_tokens, rows["tokens"], "x")
        by_size.set(xlabel="non-embedding parameters N", ylabel=f"Hessian {what}", title=f"{what} against model size")
        by_tokens.set(xlabel="training tokens D", ylabel=f"Hessian {what}", title=f"{what} against tokens seen")
        for ax in row_axes:
            _log_if_positive(ax, rows[column])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            ax.title.set_fontsize(10)
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# loss landscape


def _checkpoint_label(row) -> str:
    return f"{row['rung']}, {format_scale(float(row['tokens']))} tokens"


def landscape_1d(rows: pd.DataFrame, out: Path) -> Path:
    """Loss along one random filter-normalised direction, per checkpoint, relative to the loss at the weights."""
    rows = rows[rows["kind"] == "1d"] if not rows.empty and "kind" in rows.columns else pd.DataFrame()
    if rows.empty:
        raise NoData("no 1-D loss slices (analysis.landscape_resolution was 0, or analyze has not run)")
    figure = _figure(8.5, 4.6)
    ax = figure.subplots()
    colors = _rung_colors(rows)
    styles = ["-", "--", ":", "-."]
    token_values = sorted(rows["tokens"].unique())
    for (rung, tokens), curve in rows.groupby(["rung", "tokens"], sort=False):
        curve = curve.sort_values("alpha")
        center = curve["loss"].iloc[int(np.argmin(np.abs(curve["alpha"].to_numpy(float))))]
        ax.plot(
            curve["alpha"],
            curve["loss"] - center,
            styles[token_values.index(tokens) % len(styles)],
            color=colors[rung],
            lw=1.5,
            label=_checkpoint_label(curve.iloc[0]),
        )
    ax.set(
        xlabel="step α along a random filter-normalised direction",
        ylabel="loss − loss at the weights (nats/token)",
        title="1-D loss slices: a narrower bowl is a sharper minimum",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(figure, out)


def landscape_2d(rows: pd.DataFrame, out: Path) -> Path:
    """The 2-D loss surface of the largest checkpoint (most parameters, then most tokens)."""
    rows = rows[rows["kind"] == "2d"] if not rows.empty and "kind" in rows.columns else pd.DataFrame()
    if rows.empty:
        raise NoData("no 2-D loss surface (analysis.landscape_2d was false, or analyze has not run)")
    largest = rows.sort_values(["n_params_non_embedding", "tokens"]).iloc[-1]
    surface = rows[(rows["trial_id"] == largest["trial_id"]) & (rows["tokens"] == largest["tokens"])]
    grid = surface.pivot_table(index="beta", columns="alpha", values="loss", aggfunc="mean")
    if grid.shape[0] < 2 or grid.shape[1] < 2:
        raise NoData(f"the 2-D surface of {largest['trial_id']} has fewer than 2 points per axis")
    figure = _figure(6.4, 5.0)
    ax = figure.subplots()
    filled = ax.contourf(grid.columns, grid.index, grid.to_numpy(), levels=14, cmap="magma")
    ax.contour(grid.columns, grid.index, grid.to_numpy(), levels=7, colors="white", linewidths=0.5)
    ax.plot([0], [0], marker="*", color="cyan", ms=14, mec="black", ls="")
    figure.colorbar(filled, ax=ax, label="pretraining loss (nats/token)", format="%.2f")
    ax.set(
        xlabel="α (random direction 1)",
        ylabel="β (random direction 2)",
        aspect="equal",
        title=f"2-D loss surface around {_checkpoint_label(largest)}\n(N = "
        f"{format_scale(float(largest['n_params_non_embedding']))}; ★ = the trained weights)",
    )
    ax.title.set_fontsize(10)
    return _save(figure, out)


def landscape_pt_to_ft(rows: pd.DataFrame, out: Path) -> Path:
    """Pretraining loss on the straight line from the pretrained (α = 0) to the fine-tuned (α = 1) weights."""
    if rows.empty or "kind" not in rows.columns:
        raise NoData("no pretrained → fine-tuned lines")
    rows = rows[rows["kind"].astype(str).str.startswith("pt_to_ft:")]
    if rows.empty:
        raise NoData("no pretrained → fine-tuned lines (they need fine-tuning in downstream.modes)")
    tasks = sorted(rows["kind"].unique())[:4]
    figure = _figure(4.4 * len(tasks) + 2.2, 4.3)
    axes = np.atleast_1d(figure.subplots(1, len(tasks), sharey=True, squeeze=False)[0])
    colors = _rung_colors(rows)
    styles = ["-", "--", ":", "-."]
    token_values = sorted(rows["tokens"].unique())
    for ax, kind in zip(axes, tasks, strict=True):
        for (rung, tokens), line in rows[rows["kind"] == kind].groupby(["rung", "tokens"], sort=False):
            line = line.sort_values("alpha")
            ax.plot(
                line["alpha"],
                line["loss"],
                styles[token_values.index(tokens) % len(styles)],
                color=colors[rung],
                lw=1.5,
                label=_checkpoint_label(line.iloc[0]),
            )
        for x, text in ((0, "pretrained"), (1, "fine-tuned")):
            ax.axvline(x, color="0.5", ls=":", lw=1)
            ax.annotate(
                text,
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -12),
                textcoords="offset points",
                fontsize=8,
                color="0.3",
            )
        ax.set(xlabel="α along pretrained → fine-tuned", title=f"fine-tuned on {kind.split(':', 1)[1]}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("pretraining loss (nats/token)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# parameter-space PCA


def _pca_panel(ax, points: pd.DataFrame, group: str, left_out) -> None:
    """Axis labels with each component's share of the variance, and the checkpoint as the panel's title."""
    explained = points[["explained_1", "explained_2"]].iloc[0].to_numpy(float)
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)", fontsize=8)
    ax.set_ylabel(f"PC2 ({explained[1]:.0%})", fontsize=8)
    ax.set_title(_short_group(group) + (" (did not finish)" if group in left_out else ""), fontsize=9)
    ax.tick_params(labelsize=7)
    ax.margins(0.2)


def _short_group(group: str) -> str:
    """'…/trials/xs_100ktok_s0/checkpoints/100000' → 'xs_100ktok_s0 @ 10⁵'; anything else as it is."""
    parts = Path(str(group)).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        try:
            return f"{parts[-3]} @ {format_scale(float(parts[-1]))}"
        except ValueError:
            return f"{parts[-3]} @ {parts[-1]}"
    return str(group)


def pca(
    rows: pd.DataFrame,
    kind: str,
    out: Path,
    order: dict[str, int] | None = None,
    left_out: frozenset[str] = frozenset(),
) -> Path:
    """Small multiples, one per group: a run's checkpoint trajectory, or a checkpoint's fine-tuned endpoints.

    order: {group: rank} (smallest model first); left_out: groups from trials that did not finish, marked so.
    """
    rows = rows[rows["kind"] == kind] if not rows.empty and "kind" in rows.columns else pd.DataFrame()
    if rows.empty:
        raise NoData(f"no parameter-space PCA of kind '{kind}' in results/pca.parquet")
    order = order or {}
    groups = sorted(rows.groupby("group", sort=True), key=lambda item: (order.get(item[0], len(order)), item[0]))
    n_groups = len(groups)
    groups = groups[:MAX_PANELS]
    n_cols = min(len(groups), 4)
    n_rows = math.ceil(len(groups) / n_cols)
    figure = _figure(3.2 * n_cols + 0.4, 2.9 * n_rows + 0.5)
    axes = np.atleast_1d(figure.subplots(n_rows, n_cols, squeeze=False).ravel())
    for ax, (group, points) in zip(axes, groups, strict=False):  # the grid's spare axes are hidden below
        if kind == "trajectory":
            points = points.assign(_order=pd.to_numeric(points["label"], errors="coerce")).sort_values("_order")
            ax.plot(points["pc1"], points["pc2"], "-", color="0.6", lw=1, zorder=1)
            ax.scatter(points["pc1"], points["pc2"], c=np.arange(len(points)), cmap="viridis", s=40, zorder=2)
            labels = [
                format_scale(v) if np.isfinite(v) else str(t)
                for v, t in zip(points["_order"], points["label"], strict=True)
            ]
        else:
            ax.scatter(points["pc1"], points["pc2"], color="tab:blue", s=40)
            labels = points["label"].astype(str).tolist()
        for x, y, text in zip(points["pc1"], points["pc2"], labels, strict=True):
            ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        _pca_panel(ax, points, group, left_out)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    what = (
        "checkpoint trajectory of each run (labels: tokens seen)"
        if kind == "trajectory"
        else "pretrained and fine-tuned weights of each checkpoint (labels: task)"
    )
    shown = f" (the first {len(groups)} of {n_groups})" if n_groups > len(groups) else ""
    figure.suptitle(f"Parameter-space PCA: {what}{shown}", fontsize=11)
    return _save(figure, out)


def pca_finetuned(
    rows: pd.DataFrame,
    task: str,
    out: Path,
    order: dict[str, int] | None = None,
    left_out: frozenset[str] = frozenset(),
) -> Path:
    """One task's figure: a panel per pretrained checkpoint, with its pretrained weights (★, the origin) and the
    task's fine-tuned endpoints, one per split seed (labelled), on that checkpoint's first two principal
    components; the other tasks' endpoints faint, so a task's direction can be told from its seed scatter."""
    rows = rows[rows["kind"] == "finetuned"] if not rows.empty and "kind" in rows.columns else pd.DataFrame()
    mine = rows[rows["label"] == task] if not rows.empty else rows
    if mine.empty:
        raise NoData(f"no fine-tuned endpoints of {task} in results/pca.parquet")
    order = order or {}
    names = sorted(mine["group"].unique(), key=lambda g: (order.get(g, len(order)), g))
    n_groups = len(names)
    names = names[:MAX_PANELS]
    n_cols = min(len(names), 4)
    n_rows = math.ceil(len(names) / n_cols)
    figure = _figure(3.2 * n_cols + 0.4, 2.9 * n_rows + 0.6)
    axes = np.atleast_1d(figure.subplots(n_rows, n_cols, squeeze=False).ravel())
    for ax, group in zip(axes, names, strict=False):  # the grid may have spare axes, hidden below
        points = rows[rows["group"] == group]
        origin = points[points["label"] == "pretrained"]
        others = points[~points["label"].isin(["pretrained", task])]
        seeds = points[points["label"] == task]
        ax.scatter(others["pc1"], others["pc2"], color="0.8", s=18, label="other tasks")
        ax.scatter(seeds["pc1"], seeds["pc2"], color="tab:blue", s=40, label=f"{task}, one per split seed")
        ax.scatter(origin["pc1"], origin["pc2"], color="black", marker="*", s=120, label="pretrained (origin)")
        for x, y, seed in zip(
            seeds["pc1"], seeds["pc2"], seeds.get("split_seed", pd.Series(index=seeds.index)), strict=True
        ):
            if pd.notna(seed):
                ax.annotate(f"seed {int(seed)}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        _pca_panel(ax, points, group, left_out)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    handles = {label: handle for handle, label in zip(*axes[0].get_legend_handles_labels(), strict=True)}
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    shown = f" (the first {len(names)} of {n_groups} checkpoints)" if n_groups > len(names) else ""
    figure.suptitle(f"Parameter-space PCA: {task} fine-tuned from each checkpoint{shown}", fontsize=11)
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# per-task scaling against task characteristics (descriptive)


def task_scaling(section: dict, out: Path) -> Path:
    """One panel per task characteristic: each task's N slope per decade (signed so > 0 is improvement, in plateau
    margins) with its 95 % interval, against the characteristic; one colour per mode, tasks named."""
    if section.get("status") != "ok":
        raise NoData(section.get("reason", "no task characteristics"))
    relation = [row for row in section["relation"] if row["n_tasks"] > 0]
    if not relation:
        raise NoData("no task has both its characteristics and an N slope")
    columns = list(dict.fromkeys(row["characteristic"] for row in relation))
    n_cols = min(len(columns), 3)
    n_rows = math.ceil(len(columns) / n_cols)
    figure = _figure(3.6 * n_cols + 0.4, 3.0 * n_rows + 0.6)
    axes = np.atleast_1d(figure.subplots(n_rows, n_cols, squeeze=False).ravel())
    intervals = {
        (record["task"], mode): values["n_slope_in_margins_ci"]
        for record in section["tasks"]
        for mode, values in record["modes"].items()
    }
    for ax, column in zip(axes, columns, strict=False):  # the grid may have spare axes
        for row in (r for r in relation if r["characteristic"] == column):
            color, marker, label = MODE_STYLE.get(row["mode"], ("0.3", "o", row["mode"]))
            for task, x, y in zip(row["tasks"], row["x"], row["n_slope_in_margins"], strict=True):
                ci = intervals.get((task, row["mode"]))
                if ci is not None:
                    ax.plot([x, x], ci, "-", color=color, lw=1, alpha=0.6)
                ax.plot([x], [y], marker, color=color, label=label)
                ax.annotate(task, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
            rho = f"ρ = {row['spearman']:.2f} over {row['n_tasks']} tasks" if row["spearman"] is not None else ""
            if rho:
                ax.annotate(
                    f"{label}: {rho}",
                    (0.02, 0.97 - 0.08 * list(MODE_STYLE).index(row["mode"]) if row["mode"] in MODE_STYLE else 0.97),
                    xycoords="axes fraction",
                    va="top",
                    fontsize=7,
                    color=color,
                )
        ax.axhspan(-1, 1, color="0.9", zorder=0)
        ax.axhline(0, color="0.5", lw=0.8)
        if column == "n_molecules":  # sizes span decades
            ax.set_xscale("log")
        ax.set_xlabel(textwrap.fill(section["characteristics"].get(column, column), 32), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(0.25)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    for ax in axes[::n_cols]:
        ax.set_ylabel("N slope per decade\n(plateau margins; > 0 improves)", fontsize=8)
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8, frameon=False)
    figure.suptitle("Per-task scaling against task characteristics (descriptive)", fontsize=11)
    return _save(figure, out)
