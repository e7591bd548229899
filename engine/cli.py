"""`clmscale`: one command per pipeline stage, each a thin wrapper over a plain function.

    clmscale validate sweeps/demo.yaml      # the resolved config and the trial grid
    clmscale prepare  sweeps/demo.yaml      # corpus -> shards + manifest + tokenizer
    clmscale sweep    sweeps/demo.yaml      # the pretraining grid on Ray Tune
    clmscale status   runs/demo             # a table of trials
    clmscale analyze  runs/demo             # fine-tuning, Hessians, landscapes as Ray tasks
    clmscale fit      runs/demo             # scaling laws and proxy correlations
    clmscale report   runs/demo             # report/index.html
    clmscale demo     sweeps/demo.yaml      # all of the above, in order

Errors in what the user gave (a sweep file, a corpus, a task) print one line and exit 2; set
CLMSCALE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import typer

from engine.config import SweepConfig, expand_grid, load_sweep
from engine.rundir import RunDir

app = typer.Typer(add_completion=False, no_args_is_help=True)
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
    """Check SWEEP_FILE and print the resolved config and the expanded trial grid."""
    cfg = load_sweep(sweep_file)
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
def prepare(
    sweep_file: Path,
    overwrite: bool = typer.Option(False, help="Replace shards made from other inputs."),
) -> None:
    """Turn the sweep's corpus into canonical, deduplicated shards, a manifest and a tokenizer."""
    from engine.prepare import prepare as run_prepare
    cfg = load_sweep(sweep_file)
    data_dir = RunDir(cfg.run_dir).data
    manifest = run_prepare(cfg.data, data_dir, overwrite=overwrite)
    counts = manifest["counts"] if isinstance(manifest, dict) else manifest.counts
    typer.echo(f"wrote {data_dir}: {json.dumps(counts)}")


@app.command()
@user_errors
def sweep(
    sweep_file: Path,
    resume: bool = typer.Option(False, help="Continue an interrupted sweep in the same run directory."),
    address: str = typer.Option(None, help="Ray cluster address; default: the one `ray start` made, else a new local one."),
) -> None:
    """Run the pretraining grid on Ray Tune (prepare first if needed); results/pretrain.parquet."""
    from engine import sweep as sweep_mod

    cfg = load_sweep(sweep_file)
    _init_ray(address)
    table = sweep_mod.run_sweep(cfg, resume=resume)
    typer.echo(f"{len(table)} checkpoints in {RunDir(cfg.run_dir).table('pretrain')}")
    if cfg.analysis.run_after_sweep:
        from engine.analyze import run_analysis

        run_analysis(RunDir(cfg.run_dir).root)


@app.command()
@user_errors
def status(run_dir: Path) -> None:
    """A table of the trials in RUN_DIR: state, tokens done, last loss, ETA."""
    from engine.sweep import trial_status

    rd = RunDir(run_dir)
    if not rd.sweep_yaml.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no sweep.yaml)")
    import yaml

    cfg = SweepConfig.model_validate(yaml.safe_load(rd.sweep_yaml.read_text()))
    table = trial_status(rd, expand_grid(cfg))
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _init_ray(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, or a running `ray start`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        ray.init()


def _yaml_dump(cfg: SweepConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip()


def main() -> None:  # pragma: no cover - `python -m engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
