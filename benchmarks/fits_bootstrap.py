"""Time one ChinchillaFit against the same fit with a 1000-sample bootstrap (target: ≤ 30 s in total).

Uses Epoch AI's 240 Chinchilla points when /work/shared is staged, else 300 synthetic points.
The machine may be shared: the load average before and after is printed next to the times.

    python benchmarks/fits_bootstrap.py                       # 1000 bootstrap refits on all cores
    python benchmarks/fits_bootstrap.py --n-bootstrap 200 --n-jobs 1 --synthetic
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clmscale.fits import ChinchillaFit

CHINCHILLA_240 = Path(__file__).resolve().parents[2] / "shared/data/scaling/chinchilla_epoch_240.csv"
TARGET_S = 30.0


def load_points(synthetic: bool) -> tuple[str, pd.DataFrame]:
    if CHINCHILLA_240.exists() and not synthetic:
        return f"Epoch AI Chinchilla points ({CHINCHILLA_240.name})", pd.read_csv(CHINCHILLA_240)
    # 15 model sizes × 20 token counts from Hoffmann et al.'s law, 1 % multiplicative noise
    n_params, n_tokens = (grid.ravel() for grid in np.meshgrid(np.logspace(7, 10, 15), np.logspace(9, 12, 20)))
    loss = 1.69 + 406.4 / n_params**0.34 + 410.7 / n_tokens**0.28
    loss *= np.exp(np.random.default_rng(0).normal(0, 0.01, loss.size))
    points = pd.DataFrame({"N": n_params, "D": n_tokens, "loss": loss})
    return "synthetic points (Hoffmann et al. law, 1 % noise)", points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--n-jobs", type=int, default=None, help="bootstrap worker processes (default: all cores)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use synthetic points even if the Chinchilla file exists")
    args = parser.parse_args()

    source, points = load_points(args.synthetic)
    n_jobs = args.n_jobs or os.cpu_count()
    print(f"{len(points)} {source}; {os.cpu_count()} cores, n_jobs={n_jobs}; load average {os.getloadavg()}")

    start = time.perf_counter()
    single = ChinchillaFit(n_bootstrap=0).fit(points["N"], points["D"], points["loss"])
    single_s = time.perf_counter() - start
    print(f"single fit:    {single_s:6.2f} s  " + ", ".join(f"{k}={v:.4g}" for k, v in single.params_.items()))

    start = time.perf_counter()
    boot = ChinchillaFit(n_bootstrap=args.n_bootstrap, n_jobs=n_jobs).fit(points["N"], points["D"], points["loss"])
    total_s = time.perf_counter() - start
    print(f"fit + {args.n_bootstrap} bootstrap refits: {total_s:6.2f} s  (ratio to single fit "
          f"{total_s / single_s:.1f}×; bootstrap part ≈ {total_s - single_s:.2f} s, "
          f"{boot.n_bootstrap_failed_} failed refits)")
    for name in boot.param_names:
        lo, hi = boot.ci_[name]
        print(f"  {name:>5} = {boot.params_[name]:.4g}  95 % CI {lo:.4g} – {hi:.4g}  (se {boot.se_[name]:.3g})")
    verdict = "meets" if total_s <= TARGET_S else "misses"
    print(f"total {total_s:.2f} s {verdict} the ≤ {TARGET_S:.0f} s target; load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
