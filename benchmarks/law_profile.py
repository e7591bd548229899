"""Profile of L(N, D)'s floor E on a finished run: the fit's objective with E held at each of a few values.

`clmscale fit` reports E at its bound 0 when the data prefer no floor; this says how strongly. For each E, the
other four parameters (A, B, alpha, beta) are refitted by the same Huber loss on log residuals as
fits.ChinchillaFit (delta = fits.huber_delta), from a small grid of starts. A profile that rises steadily from
E = 0 says the points prefer no floor; a flat one says they do not pin it. Printed beside each: its ratio to
the lowest objective of the profile (the baseline: the best of the floors asked for, E = 0 included by
default). `--min-tokens` drops the early checkpoints (a rung still on its plateau), to see whether they alone
push E to 0.

    PYTHONPATH=$PWD python benchmarks/law_profile.py runs/small
    PYTHONPATH=$PWD python benchmarks/law_profile.py runs/small --min-tokens 1.2e6 --floors 0 0.1 0.2
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

from clmscale.engine.rundir import RunDir

STARTS = {"log_a": (0, 2, 5, 10), "log_b": (2, 5, 10, 15), "alpha": (0.1, 0.3, 0.6), "beta": (0.3, 0.6, 1.0)}


def profile(n: np.ndarray, d: np.ndarray, loss: np.ndarray, floor: float, delta: float) -> tuple[float, np.ndarray]:
    """(objective, [A, B, alpha, beta]) of the best fit of E + A/N^alpha + B/D^beta with E = floor."""
    log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)

    def objective(theta: np.ndarray) -> float:
        log_a, log_b, alpha, beta = theta
        predicted = np.log(floor + np.exp(log_a - alpha * log_n) + np.exp(log_b - beta * log_d))
        return float(huber(delta, log_loss - predicted).sum())

    bounds = [(None, None), (None, None), (0, 3), (0, 3)]
    best = min(
        (minimize(objective, start, method="L-BFGS-B", bounds=bounds) for start in itertools.product(*STARTS.values())),
        key=lambda run: run.fun,
    )
    log_a, log_b, alpha, beta = best.x
    return float(best.fun), np.array([np.exp(log_a), np.exp(log_b), alpha, beta])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--floors", type=float, nargs="+", default=[0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    parser.add_argument("--min-tokens", type=float, default=0.0)
    args = parser.parse_args()
    rd = RunDir(args.run_dir)
    points = rd.fit_inputs().checkpoints
    points = points[points["tokens"] >= args.min_tokens]
    n, d, loss = (points[c].to_numpy(float) for c in ("n_params_non_embedding", "tokens", "val_loss"))
    delta = rd.config().fits.huber_delta
    print(f"{args.run_dir}: {len(points)} checkpoints with D >= {args.min_tokens:g}, Huber delta {delta:g}")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # starts far from the fit overflow
        rows = [(floor, *profile(n, d, loss, floor, delta)) for floor in args.floors]
    lowest = min(value for _, value, _ in rows)
    print(f"{'E':>6} {'objective':>10} {'/ lowest':>8} {'A':>9} {'B':>9} {'alpha':>6} {'beta':>6}")
    for floor, value, (a, b, alpha, beta) in rows:
        print(f"{floor:6.3f} {value:10.5f} {value / lowest:8.3f} {a:9.3g} {b:9.3g} {alpha:6.3f} {beta:6.3f}")


if __name__ == "__main__":
    main()
