"""`clmscale`: one command per pipeline stage, each a thin wrapper over a plain function.

    clmscale validate sweeps/demo.yaml      # the resolved config and the trial grid
    clmscale plan     sweeps/paper.yaml     # memory, ZeRO stage, micro-batch, device-hours, makespan
    clmscale prepare  sweeps/demo.yaml      # corpus -> shards + manifest + tokenizer
    clmscale sweep    sweeps/demo.yaml      # the pretraining grid on Ray Tune
    clmscale status   runs/demo             # a table of trials
    clmscale analyze  runs/demo             # fine-tuning, Hessians, landscapes as Ray tasks
    clmscale fit      runs/demo             # scaling laws and proxy correlations
    clmscale report   runs/demo             # report/index.html
    clmscale demo     sweeps/demo.yaml      # all of the above, in order (no file: the shipped demo sweep)

Errors in what the user gave (a sweep file, a corpus, a task, a run directory another driver holds,
a cluster address that does not answer) print one line and exit 2; set CLMSCALE_DEBUG=1 to see the
traceback instead. `prepare`, `sweep`, `analyze` and `demo` hold the run directory's lock while they run.
`sweep`, `analyze` and `demo` show one table of progress (engine.console) and send Ray's own output to
RUN_DIR/logs/ (`--verbose`: as Ray prints it); Ctrl-C exits 130 with the command that continues.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import typer

from clmscale.engine.config import SweepConfig, expand_grid, load_sweep, with_storage_root
from clmscale.engine.rundir import RunDir

STORAGE_ROOT_ENV = "CLMSCALE_STORAGE_ROOT"
GCS_TIMEOUT_S = 5.0  # a cluster address that accepts no connection in this long is an error, not a wait

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


def _storage_root_option() -> Any:  # typer.Option(...) returns an OptionInfo, typed as Any by typer
    return typer.Option(
        None,
        "--storage-root",
        help=f"Replaces the sweep file's storage.root (also {STORAGE_ROOT_ENV}); inside `ray job "
        "submit --working-dir` it must be absolute: a path every node shares.",
    )


@app.command()
@user_errors
def validate(sweep_file: Path, storage_root: Path = _storage_root_option()) -> None:
    """Check SWEEP_FILE (and its downstream tasks) and print the resolved config and the expanded trial grid."""
    cfg = _load_checked(sweep_file, storage_root)
    trials = expand_grid(cfg)
    typer.echo(f"# {sweep_file}: valid; run dir {cfg.run_dir}")
    typer.echo(_yaml_dump(cfg))
    axes = [name for name, n in (("family", len(cfg.model.families())),
                                 ("mlm_probability", len(cfg.train.mlm_probabilities()))) if n > 1]  # fmt: skip
    typer.echo(f"# {len(trials)} trials (rung x budget x seed{''.join(f' x {a}' for a in axes)})")
    for t in trials:
        s = t.size
        budget = f"{t.budget_tokens:.3g} tokens" if t.budget_tokens else f"{t.budget_epochs:g} epochs"
        masking = f" mask={t.mlm_probability:g}" if "mlm_probability" in axes and t.mlm_probability is not None else ""
        typer.echo(
            f"{t.trial_id:24s} {t.family}{masking} layers={s.n_layer:<3d} d_model={s.d_model:<5d} heads={s.n_head:<3d} "
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
    storage_root: Path = _storage_root_option(),
) -> None:
    """Per trial: parameters, FLOPs, memory per device, the ZeRO stage and micro-batch `auto` picks, device-hours;
    per grid: the makespan packed and one trial at a time. Nothing runs."""
    from clmscale.engine import plan as planner

    cfg = _load(sweep_file, storage_root)
    rd = RunDir(cfg.run_dir)
    tokens_per_epoch = None
    if rd.data.has_manifest():
        manifest = rd.manifest()
        vocab_size = vocab_size or manifest.tokenizer.vocab_size
        tokens_per_epoch = {n: rd.data.pass_tokens(n) for n in [None, *(cfg.budget.unique_molecules or [])]}
    result = planner.plan_sweep(
        cfg,
        gpus=gpus,
        gpu_memory_gb=gpu_memory,
        mfu=mfu,
        peak_flops=planner.peak_flops_per_s(gpu),
        vocab_size=vocab_size or 512,
        tokens_per_epoch=tokens_per_epoch,
        gpus_per_node=gpus_per_node,
        cpus_per_node=cpus_per_node,
    )
    typer.echo(planner.format_plan(result))


@app.command()
@user_errors
def prepare(
    sweep_file: Path,
    overwrite: bool = typer.Option(False, help="Replace shards made from other inputs."),
    storage_root: Path = _storage_root_option(),
) -> None:
    """Turn the sweep's corpus into canonical, deduplicated shards, a manifest and a tokenizer."""
    from clmscale.engine.prepare import prepare as run_prepare

    cfg = _load(sweep_file, storage_root)
    data = RunDir(cfg.run_dir).data
    with _driver(RunDir(cfg.run_dir), f"clmscale prepare {sweep_file}"):
        import ray

        if not ray.is_initialized():  # its Ray tasks join RAY_ADDRESS or the recorded cluster, else start one
            _check_cluster_answers(None)
        manifest = run_prepare(cfg.data, data, downstream=cfg.downstream, overwrite=overwrite)
    c = manifest.counts
    overlap = ", ".join(f"{task} {o.removed}/{o.task_molecules}" for task, o in manifest.decontamination.items())
    typer.echo(
        f"{data.path}: read {c.n_in}, invalid {c.n_invalid}, duplicate {c.n_duplicate}, task molecules "
        f"{c.n_decontaminated}, filtered {c.n_filtered}, kept {c.n_kept} (train {c.train.n_molecules}, val "
        f"{c.val.n_molecules}); vocab {manifest.tokenizer.vocab_size}"
        + (f"; removed per task (of its molecules): {overlap}" if overlap else "")
    )


VERBOSE = typer.Option(
    False,
    "--verbose",
    help="Print Ray's own output (progress bars, every report) as Ray does; "
    "by default it goes to RUN_DIR/logs/ and the console shows one table.",
)


@app.command()
@user_errors
def sweep(
    sweep_file: Path,
    resume: bool = typer.Option(False, help="Continue an interrupted sweep in the same run directory."),
    address: str = typer.Option(
        None, help="Ray cluster address; default: the one `ray start` made, else a new local one."
    ),
    storage_root: Path = _storage_root_option(),
    expect_gpus: int = typer.Option(
        None, min=0, help="GPUs an autoscaling cluster can grow to (resources.cluster_max GPU)."
    ),
    verbose: bool = VERBOSE,
) -> None:
    """Run the pretraining grid on Ray Tune (prepare first if needed); results/pretrain.parquet."""
    from clmscale.engine import sweep as sweep_mod

    cfg = sweep_mod.expect_gpus(_load_checked(sweep_file, storage_root), expect_gpus)
    rd = RunDir(cfg.run_dir)
    with (
        _driver(rd, f"clmscale sweep {sweep_file}"),
        _console(rd, verbose, f"clmscale sweep {sweep_file} --resume") as console,
    ):
        console.ray_started(_init_ray(address))
        table = sweep_mod.run_sweep(cfg, resume=resume)
        tables = None
        if cfg.analysis.run_after_sweep:
            from clmscale.engine.analyze import run_analysis

            tables = run_analysis(rd.root)
    typer.echo(f"{len(table)} checkpoints in {rd.table_path('pretrain')}")
    if tables is not None:
        _say_tables(rd, tables)


@app.command()
@user_errors
def status(
    run_dir: Path,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON, for scripts."),
) -> None:
    """RUN_DIR's progress, as `ray status` shows a cluster's: its driver, a table of trials (state, tokens,
    loss, tokens/s, ETA, restarts), analysis jobs done / failed per table, and the faults it survived."""
    import json

    from clmscale.engine.files import json_safe
    from clmscale.engine.status import format_status, run_status

    found = run_status(RunDir(run_dir))
    typer.echo(json.dumps(json_safe(found), indent=2) if as_json else format_status(found))


@app.command()
@user_errors
def analyze(
    run_dir: Path,
    data_dir: Path = typer.Option(
        None, help="Folder with the MoleculeNet CSVs (else CLMSCALE_DATA_DIR, else download)."
    ),
    address: str = typer.Option(None, help="Ray cluster address; default as for `sweep`."),
    verbose: bool = VERBOSE,
) -> None:
    """Fine-tune, probe, Hessian and landscape jobs for every selected checkpoint, as Ray tasks."""
    from clmscale.engine.analyze import run_analysis

    rd = RunDir(run_dir)
    rd.config()  # a run directory (else the error says so), not a typo the lock or logs/ would create
    with (
        _driver(rd, f"clmscale analyze {run_dir}"),
        _console(rd, verbose, f"clmscale analyze {run_dir}  (finished jobs are kept)") as console,
    ):
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
    law: str = typer.Option(
        "chinchilla",
        help="With --table: chinchilla (L(N, D)), effective (L(N, D, U), repeated data discounted),"
        " compute (E + A·x^-γ), power (A·x^k) or trend (the verdict on y per decade of x).",
    ),
    n_col: str = typer.Option("N", help="With --table: parameter-count column."),
    d_col: str = typer.Option("D", help="With --table: token-count column."),
    u_col: str = typer.Option("U", help="With --law effective: the unique-token column (D / U = epochs)."),
    y_col: str = typer.Option("loss", help="With --table: loss column."),
    x_col: str = typer.Option(
        "C", help="With --table and --law compute/power/trend: the scale column (log10 for trend)."
    ),
    bootstrap: int = typer.Option(
        None, min=0, help="Bootstrap resamples; default: sweep.yaml's fits.n_bootstrap, or 1000 with --table."
    ),
    group_col: str = typer.Option(
        None, help="With --law trend: the independent unit (a run); its rows are resampled together."
    ),
    higher_is_better: bool = typer.Option(
        True, "--higher-is-better/--lower-is-better", help="With --law trend: the direction in which y improves."
    ),
    margin: float = typer.Option(
        None,
        help="With --law trend: the plateau margin, y units per decade of x"
        " (default: the metric's, for roc_auc / prc_auc).",
    ),
    method: str = typer.Option(
        None,
        help="With --law trend: the slope's interval, one of cluster_jackknife"
        " (default with --group-col), cluster, cluster_bootstrap, mixedlm, iid"
        " (default without).",
    ),
    as_json: bool = typer.Option(False, "--json", help="With --table: print the fit as JSON."),
) -> None:
    """Fit scaling laws, downstream trends and proxy correlations in RUN_DIR (results/fits.json), or one law to --table."""  # noqa: E501  typer's command list keeps a docstring's line breaks
    import json

    from clmscale.fits import fit as fits_fit

    if table is not None and law == "trend":
        result = fits_fit.trend_table(
            table, x_col, y_col, group_col=group_col, higher_is_better=higher_is_better, margin=margin, method=method
        )
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else result["sentence"])
        return
    if table is not None:
        result = fits_fit.fit_table(
            table,
            law,
            n_col=n_col,
            d_col=d_col,
            y_col=y_col,
            x_col=x_col,
            u_col=u_col,
            bootstrap=1000 if bootstrap is None else bootstrap,
        )
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
    from clmscale.fits.report import build_report

    typer.echo(build_report(run_dir))


@app.command()
@user_errors
def demo(
    sweep_file: Path = typer.Argument(None, help="Sweep file; default the demo sweep installed with clmscale."),
    address: str = typer.Option(None, help="Ray cluster address; default as for `sweep`."),
    storage_root: Path = _storage_root_option(),
    verbose: bool = VERBOSE,
) -> None:
    """prepare -> sweep -> analyze -> fit -> report on SWEEP_FILE, then print the report's path.

    Without SWEEP_FILE it runs the demo sweep installed with clmscale (its corpus and tasks come with it);
    results go to ./runs/demo of the current directory, as for any sweep whose storage.root is relative.
    Run it again and it continues where it stopped: finished trials and analysis rows are kept.
    """
    import time

    from clmscale.engine.analyze import run_analysis
    from clmscale.engine.sweep import run_sweep
    from clmscale.fits.fit import fit_run
    from clmscale.fits.report import build_report

    start = time.monotonic()
    sweep_file = sweep_file or shipped_sweep("demo.yaml")
    cfg = _load_checked(sweep_file, storage_root)
    rd = RunDir(cfg.run_dir)
    with (
        _driver(rd, f"clmscale demo {sweep_file}"),
        _console(rd, verbose, f"clmscale demo {sweep_file}  (it continues where it stopped)") as console,
    ):
        console.ray_started(_init_ray(address))
        table = run_sweep(cfg, resume=rd.tune.exists())
        console.line(f"{len(table)} checkpoints in {rd.table_path('pretrain')}")
        tables = run_analysis(rd.root)
        fit_run(rd.root)
        path = build_report(rd.root)
    _say_tables(rd, tables)
    typer.echo(f"Ray's output: {rd.logs}/")
    typer.echo(f"demo finished in {time.monotonic() - start:.0f} s; open the report: {path.resolve()}")


def shipped_sweep(name: str) -> Path:
    """An example sweep file installed with clmscale: sweeps/ in the repository, clmscale/sweeps/ in a wheel.
    Its corpus path is relative to the file, so it finds the shipped data beside it either way."""
    from importlib.resources import files

    return Path(str(files("clmscale.sweeps") / name))


def _init_ray(address: str | None):
    """Join the cluster at `address` (or RAY_ADDRESS, or a running `ray start`), else start a local one;
    returns ray.init's context (None when Ray was already initialised)."""
    import ray

    if ray.is_initialized():
        return None
    _check_cluster_answers(address)
    if address:
        return ray.init(address=address)
    try:
        return ray.init(address="auto")
    except ConnectionError:
        return ray.init(dashboard_host="127.0.0.1")  # Ray's default too; said here, as the dashboard can submit jobs


@contextlib.contextmanager
def _console(rd: RunDir, verbose: bool, again: str):
    """engine.console's table around a command's work; Ctrl-C exits 130 with the command that continues."""
    from clmscale.engine.console import session
    from clmscale.engine.sweep import SweepInterrupted

    try:
        with session(rd, verbose=verbose) as console:
            yield console
    except (KeyboardInterrupt, SweepInterrupted):
        typer.echo(f"interrupted; continue with: {again}", err=True)
        raise typer.Exit(code=130) from None


def _check_cluster_answers(address: str | None) -> None:
    """Fail fast, naming it, on the cluster address ray.init would join (--address, RAY_ADDRESS, or the
    one the last `ray start` recorded) when nothing accepts a connection there: ray.init would retry a
    dead GCS for minutes."""
    recorded = _recorded_address_file()
    if address:
        source, hint = "--address", "leave out --address to start a local cluster"
    elif os.environ.get("RAY_ADDRESS"):
        address, source, hint = os.environ["RAY_ADDRESS"], "RAY_ADDRESS", "unset RAY_ADDRESS to start a local cluster"
    elif recorded.is_file() and recorded.read_text().strip():
        address, source = recorded.read_text().strip(), f"{recorded}, left by `ray start`"
        hint = "run `ray stop` (it clears that file) to start a local cluster"
    else:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("auto", "local") or "://" in address.removeprefix("ray://") or not port.isdigit():
        return  # not host:port: ray.init's own handling
    try:
        socket.create_connection((host, int(port)), timeout=GCS_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(
            f"no Ray cluster answers at {address} (from {source}) within {GCS_TIMEOUT_S:g} s "
            f"({err.strerror or err}); start it there, or {hint}"
        ) from None


def _recorded_address_file() -> Path:
    """Ray's record of the last `ray start` on this machine (/tmp/ray/ray_current_cluster by default)."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except (ImportError, AttributeError):  # where Ray keeps it has moved before: its documented default
        tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return Path(tmp) / "ray" / "ray_current_cluster"


@contextlib.contextmanager
def _driver(rd: RunDir, command: str):
    """Hold RD's lock while the command runs: a second driver on it exits 2 naming this one. SIGTERM (`ray
    job stop`, `kill`) becomes an exit that releases it, as Ctrl-C does."""
    catch = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and _main_thread()
    if catch:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with rd.lock(command):
            yield
    finally:
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _load(sweep_file: Path, storage_root: Path | None = None) -> SweepConfig:
    """The sweep file, with --storage-root (else CLMSCALE_STORAGE_ROOT) in place of its storage.root; a
    relative root is refused inside a Ray job's temporary working directory."""
    source = f"{sweep_file}"
    if storage_root is not None:
        source = "--storage-root"
    elif os.environ.get(STORAGE_ROOT_ENV):
        storage_root, source = Path(os.environ[STORAGE_ROOT_ENV]), STORAGE_ROOT_ENV
    return with_storage_root(load_sweep(sweep_file), storage_root, source=source)


def _load_checked(sweep_file: Path, storage_root: Path | None = None) -> SweepConfig:
    """The sweep file, with its downstream tasks checked too: a typo there fails now, not after pretraining."""
    from clmscale.engine.tasks import check_tasks

    cfg = _load(sweep_file, storage_root)
    check_tasks(cfg.downstream)
    return cfg


def _yaml_dump(cfg: SweepConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip()


def main() -> None:  # pragma: no cover - `python -m clmscale.engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
