"""`clmscale`: one command per pipeline stage, each a thin wrapper over a plain function.

    clmscale validate sweeps/demo.yaml      # the resolved config and the trial grid
    clmscale plan     sweeps/paper.yaml     # memory, ZeRO stage, micro-batch, device-hours, makespan
    clmscale prepare  sweeps/demo.yaml      # corpus -> shards + manifest + tokenizer
    clmscale sweep    sweeps/demo.yaml      # the pretraining grid on Ray Tune
    clmscale status   runs/demo             # a table of trials
    clmscale analyze  runs/demo             # fine-tuning, Hessians, landscapes as Ray tasks
    clmscale fit      runs/demo             # scaling laws and proxy correlations
    clmscale report   runs/demo             # report/index.html
    clmscale demo     sweeps/demo.yaml      # all of the above, in order

Errors in what the user gave (a sweep file, a corpus, a task) print one line and exit 2; set
CLMSCALE_DEBUG=1 to see the traceback instead. `sweep`, `analyze` and `demo` show one table of
progress (engine.console) and send Ray's own output to RUN_DIR/logs/ (`--verbose`: as Ray prints
it); Ctrl-C exits 130 with the command that continues.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import typer

from engine.config import SweepConfig, expand_grid, load_sweep
from engine.rundir import RunDir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
log = logging.getLogger("clmscale")


@app.callback()
def _group() -> None:
    """Scaling-law sweeps for chemical language models: prepare, sweep, analyze, fit, report."""


def user_errors(fn):
    """Turn the errors a user can fix into `error: <message>` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as err:
            if os.environ.get("CLMSCALE_DEBUG"):
                raise
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@user_errors
def validate(sweep_file: Path) -> None:
    """Check SWEEP_FILE (and its downstream tasks) and print the resolved config and the expanded trial grid."""
    cfg = _load_checked(sweep_file)
    trials = expand_grid(cfg)
    typer.echo(f"# {sweep_file}: valid; run dir {cfg.run_dir}")
    typer.echo(_yaml_dump(cfg))
    typer.echo(f"# {len(trials)} trials (rung x budget x seed)")
    for t in trials:
        s = t.size
        budget = f"{t.budget_tokens:.3g} tokens" if t.budget_tokens else f"{t.budget_epochs:g} epochs"
        typer.echo(
            f"{t.trial_id:24s} {t.family} layers={s.n_layer:<3d} d_model={s.d_model:<5d} heads={s.n_head:<3d} "
            f"{budget:>16s} seed={t.seed} lr={t.train.lr:g} batch={t.train.batch_size} "
            f"zero={t.train.zero_stage} workers={t.resources.workers} gpus/worker={t.resources.gpus_per_worker:g}"
        )


@app.command()
@user_errors
def plan(
    sweep_file: Path,
    gpus: int = typer.Option(8, help="GPUs of the cluster to plan for (0: CPU workers)."),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="Memory of one GPU, GB."),
    mfu: float = typer.Option(0.4, help="Model FLOPs utilisation assumed for the device-hours and makespan."),
    gpu: str = typer.Option("H100", help="GPU model (a key of engine.models.PEAK_FLOPS) or its peak in TF/s."),
    gpus_per_node: int = typer.Option(None, help="GPUs per node (default: all on one node)."),
    cpus_per_node: float = typer.Option(None, help="CPUs per node (default: 16 per GPU)."),
    vocab_size: int = typer.Option(None, help="Vocabulary size (default: the run's tokenizer, else 512)."),
) -> None:
    """Per trial: parameters, FLOPs, memory per device, the ZeRO stage and micro-batch `auto` picks, device-hours;
    per grid: the makespan packed and one trial at a time. Nothing runs."""
    from engine import plan as planner

    cfg = load_sweep(sweep_file)
    rd = RunDir(cfg.run_dir)
    tokens_per_epoch = None
    if rd.data.has_manifest():
        manifest = rd.manifest()
        vocab_size = vocab_size or manifest.tokenizer.vocab_size
        tokens_per_epoch = manifest.counts.train.n_tokens + 2 * manifest.counts.train.n_molecules  # sweep.epoch_tokens
    result = planner.plan_sweep(cfg, gpus=gpus, gpu_memory_gb=gpu_memory, mfu=mfu,
                                peak_flops=planner.peak_flops_per_s(gpu), vocab_size=vocab_size or 512,
                                tokens_per_epoch=tokens_per_epoch, gpus_per_node=gpus_per_node,
                                cpus_per_node=cpus_per_node)
    typer.echo(planner.format_plan(result))


@app.command()
@user_errors
def prepare(
    sweep_file: Path,
    overwrite: bool = typer.Option(False, help="Replace shards made from other inputs."),
) -> None:
    """Turn the sweep's corpus into canonical, deduplicated shards, a manifest and a tokenizer."""
    from engine.prepare import prepare as run_prepare
    cfg = load_sweep(sweep_file)
    data = RunDir(cfg.run_dir).data
    manifest = run_prepare(cfg.data, data, overwrite=overwrite)
    c = manifest.counts
    typer.echo(
        f"{data.path}: read {c.n_in}, invalid {c.n_invalid}, duplicate {c.n_duplicate}, filtered {c.n_filtered}, "
        f"kept {c.n_kept} (train {c.train.n_molecules}, val {c.val.n_molecules}); vocab {manifest.tokenizer.vocab_size}"
    )


VERBOSE = typer.Option(False, "--verbose", help="Print Ray's own output (progress bars, every report) as Ray does; "
                       "by default it goes to RUN_DIR/logs/ and the console shows one table.")


@app.command()
@user_errors
def sweep(
    sweep_file: Path,
    resume: bool = typer.Option(False, help="Continue an interrupted sweep in the same run directory."),
    address: str = typer.Option(None, help="Ray cluster address; default: the one `ray start` made, else a new local one."),
    verbose: bool = VERBOSE,
) -> None:
    """Run the pretraining grid on Ray Tune (prepare first if needed); results/pretrain.parquet."""
    from engine import sweep as sweep_mod

    cfg = _load_checked(sweep_file)
    rd = RunDir(cfg.run_dir)
    with _console(rd, verbose, f"clmscale sweep {sweep_file} --resume") as console:
        console.ray_started(_init_ray(address))
        table = sweep_mod.run_sweep(cfg, resume=resume)
        tables = None
        if cfg.analysis.run_after_sweep:
            from engine.analyze import run_analysis

            tables = run_analysis(rd.root)
    typer.echo(f"{len(table)} checkpoints in {rd.table_path('pretrain')}")
    if tables is not None:
        _say_tables(rd, tables)


@app.command()
@user_errors
def status(run_dir: Path) -> None:
    """A table of the trials in RUN_DIR: state, tokens done, last loss, ETA."""
    from engine.sweep import trial_status

    rd = RunDir(run_dir)
    table = trial_status(rd, expand_grid(rd.config()))
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for event in rd.fault_events():  # restarts and corrupt checkpoints: what the run survived
        typer.echo(" ".join(f"{k}={v}" for k, v in event.items()))


@app.command()
@user_errors
def analyze(
    run_dir: Path,
    data_dir: Path = typer.Option(None, help="Folder with the MoleculeNet CSVs (else CLMSCALE_DATA_DIR, else download)."),
    address: str = typer.Option(None, help="Ray cluster address; default as for `sweep`."),
    verbose: bool = VERBOSE,
) -> None:
    """Fine-tune, probe, Hessian and landscape jobs for every selected checkpoint, as Ray tasks."""
    from engine.analyze import run_analysis

    rd = RunDir(run_dir)
    rd.config()  # not a run directory: said now, before logs/ is made in it
    with _console(rd, verbose, f"clmscale analyze {run_dir}  (finished jobs are kept)") as console:
        console.ray_started(_init_ray(address))
        tables = run_analysis(run_dir, data_dir=data_dir)
    if _say_tables(rd, tables):
        raise typer.Exit(code=1)  # the rows that worked are written; a rerun retries only the failed jobs


def _say_tables(rd: RunDir, tables: dict) -> int:
    """Each analysis table's path and row count, and every error row on stderr; returns the errors."""
    n_errors = 0
    for name, table in tables.items():
        errors = table[table["status"] == "error"] if "status" in table else table.iloc[0:0]
        n_errors += len(errors)
        typer.echo(f"{rd.table_path(name)}: {len(table)} rows, {len(errors)} errors")
        for row in errors.to_dict("records"):
            where = " ".join(str(row[c]) for c in ("task", "mode", "checkpoint") if c in row and row[c] == row[c])
            typer.echo(f"error: {name} {where}: {row['error']}", err=True)
    return n_errors


@app.command()
@user_errors
def fit(
    run_dir: Path = typer.Argument(None, help="Run directory to fit (not needed with --table)."),
    table: Path = typer.Option(None, help="Fit one law to this CSV or Parquet table instead of a run directory."),
    law: str = typer.Option("chinchilla", help="With --table: chinchilla (L(N, D)), compute (E + A·x^-γ), power (A·x^k) or trend (the verdict on y per decade of x)."),
    n_col: str = typer.Option("N", help="With --table: parameter-count column."),
    d_col: str = typer.Option("D", help="With --table: token-count column."),
    y_col: str = typer.Option("loss", help="With --table: loss column."),
    x_col: str = typer.Option("C", help="With --table and --law compute/power: the scale column."),
    bootstrap: int = typer.Option(None, min=0, help="Bootstrap resamples; default: sweep.yaml's fits.n_bootstrap, or 1000 with --table."),
    group_col: str = typer.Option(None, help="With --law trend: the independent unit (a run); its rows are resampled together."),
    higher_is_better: bool = typer.Option(True, "--higher-is-better/--lower-is-better", help="With --law trend: the direction in which y improves."),
    margin: float = typer.Option(None, help="With --law trend: the plateau margin, y units per decade of x (default: the metric's, for roc_auc / prc_auc)."),
    as_json: bool = typer.Option(False, "--json", help="With --table: print the fit as JSON."),
) -> None:
    """Fit scaling laws, downstream trends and proxy correlations in RUN_DIR (results/fits.json), or one law to --table."""
    import json

    from fits import fit as fits_fit

    if table is not None and law == "trend":
        result = fits_fit.trend_table(table, x_col, y_col, group_col=group_col, higher_is_better=higher_is_better,
                                      margin=margin)
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else result["sentence"])
        return
    if table is not None:
        result = fits_fit.fit_table(table, law, n_col=n_col, d_col=d_col, y_col=y_col, x_col=x_col,
                                    bootstrap=1000 if bootstrap is None else bootstrap)
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else fits_fit.format_fit(result))
        return
    if run_dir is None:
        raise ValueError("give a RUN_DIR to fit, or --table FILE")
    result = fits_fit.fit_run(run_dir, n_bootstrap=bootstrap)
    rd = RunDir(run_dir)
    typer.echo(f"wrote {rd.fits_path()} and {rd.table_path('fits')}")
    for sentence in result["findings"]:
        typer.echo(f"- {sentence}")


@app.command()
@user_errors
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report/index.html (self-contained, figures embedded); fits first if needed."""
    from fits.report import build_report

    typer.echo(build_report(run_dir))


@app.command()
@user_errors
def demo(
    sweep_file: Path = typer.Argument(Path("sweeps/demo.yaml")),
    address: str = typer.Option(None, help="Ray cluster address; default as for `sweep`."),
    verbose: bool = VERBOSE,
) -> None:
    """prepare -> sweep -> analyze -> fit -> report on SWEEP_FILE, then print the report's path.

    Run it again and it continues where it stopped: finished trials and analysis rows are kept.
    """
    import time

    from engine.analyze import run_analysis
    from engine.sweep import run_sweep
    from fits.report import build_report
    from fits.fit import fit_run

    start = time.monotonic()
    cfg = _load_checked(sweep_file)
    rd = RunDir(cfg.run_dir)
    with _console(rd, verbose, f"clmscale demo {sweep_file}  (it continues where it stopped)") as console:
        console.ray_started(_init_ray(address))
        table = run_sweep(cfg, resume=rd.tune.exists())
        console.line(f"{len(table)} checkpoints in {rd.table_path('pretrain')}")
        tables = run_analysis(rd.root)
        fit_run(rd.root)
        path = build_report(rd.root)
    _say_tables(rd, tables)
    typer.echo(f"Ray's output: {rd.logs}/")
    typer.echo(f"demo finished in {time.monotonic() - start:.0f} s; open the report: {path.resolve()}")


def _init_ray(address: str | None):
    """Join the cluster at `address` (or RAY_ADDRESS, or a running `ray start`), else start a local one;
    returns ray.init's context (None when Ray was already initialised)."""
    import ray

    if ray.is_initialized():
        return None
    if address:
        return ray.init(address=address)
    try:
        return ray.init(address="auto")
    except ConnectionError:
        return ray.init(dashboard_host="127.0.0.1")  # Ray's default too; said here, as the dashboard can submit jobs


@contextlib.contextmanager
def _console(rd: RunDir, verbose: bool, again: str):
    """engine.console's table around a command's work; Ctrl-C exits 130 with the command that continues."""
    from engine.console import session
    from engine.sweep import SweepInterrupted

    try:
        with session(rd, verbose=verbose) as console:
            yield console
    except (KeyboardInterrupt, SweepInterrupted):
        typer.echo(f"interrupted; continue with: {again}", err=True)
        raise typer.Exit(code=130) from None


def _load_checked(sweep_file: Path) -> SweepConfig:
    """The sweep file, with its downstream tasks checked too: a typo there fails now, not after pretraining."""
    from engine.tasks import check_tasks

    cfg = load_sweep(sweep_file)
    check_tasks(cfg.downstream)
    return cfg


def _yaml_dump(cfg: SweepConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip()


def main() -> None:  # pragma: no cover - `python -m engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
