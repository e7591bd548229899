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
import logging
import os
import sys
from pathlib import Path

import typer

from engine.config import SweepConfig, expand_grid, load_sweep

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


def _yaml_dump(cfg: SweepConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip()


def main() -> None:  # pragma: no cover - `python -m engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
