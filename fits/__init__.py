"""Scaling-law fits and their read-outs: L(N, D), one-variable laws, downstream trends and their verdicts,
proxy correlations and proxy predictions, two-step task prediction.

Plain numpy/scipy/statsmodels; nothing here imports ray or torch, and the estimators use only
engine.files (JSON without NaN) of the engine. The fit stage and the report read the run directory
through engine.rundir.
"""

from clmscale.fits.comparison import PairedDifference, best_on_validation, paired_difference
from clmscale.fits.correlate import proxy_correlations
from clmscale.fits.downstream import DownstreamPowerLaw
from clmscale.fits.powerlaw import (
    BacktestResult,
    ChinchillaFit,
    ComputeOptimal,
    DataConstrainedFit,
    Identification,
    LogLogOLS,
    NotFittedError,
    SaturatingPowerLaw,
    backtest,
    identification,
)
from clmscale.fits.proxies import LeaveOneSizeOut, ProxyTiming, leave_one_size_out, proxy_timing, selection_regret
from clmscale.fits.slopes import SlopeEstimate, compute_frontier_mask, fit_slope, pool_inverse_variance
from clmscale.fits.taskladder import TaskBacktest, TaskLadder, task_ladder_backtest
from clmscale.fits.verdicts import (
    AxisTrend,
    PlateauMargin,
    TrendVerdict,
    adjust_pvalues,
    axis_trend,
    correct,
    judge,
    plateau_margin,
    scaling_verdicts,
    trend_on_table,
    verdict_counts,
)

__all__ = [
    "AxisTrend",
    "BacktestResult",
    "ChinchillaFit",
    "ComputeOptimal",
    "DataConstrainedFit",
    "DownstreamPowerLaw",
    "Identification",
    "LeaveOneSizeOut",
    "LogLogOLS",
    "NotFittedError",
    "PairedDifference",
    "PlateauMargin",
    "ProxyTiming",
    "SaturatingPowerLaw",
    "SlopeEstimate",
    "TaskBacktest",
    "TaskLadder",
    "TrendVerdict",
    "adjust_pvalues",
    "axis_trend",
    "backtest",
    "best_on_validation",
    "compute_frontier_mask",
    "correct",
    "fit_slope",
    "identification",
    "judge",
    "leave_one_size_out",
    "paired_difference",
    "plateau_margin",
    "pool_inverse_variance",
    "proxy_correlations",
    "proxy_timing",
    "scaling_verdicts",
    "selection_regret",
    "task_ladder_backtest",
    "trend_on_table",
    "verdict_counts",
]
