"""Scaling-law fits and their read-outs: L(N, D), one-variable laws, downstream trends, proxy correlations.

Plain numpy/scipy/statsmodels; nothing here imports ray or torch, and the estimators use only
engine.files (JSON without NaN) of the engine. The fit stage and the report read the run directory
through engine.rundir.
"""

from fits.correlate import describe_correlation, proxy_correlations
from fits.downstream import (DownstreamPowerLaw, MonotoneTrend, ScaleTrend, mann_kendall, monotone_trend,
                             trend_at_largest_scales)
from fits.powerlaw import (BacktestResult, ChinchillaFit, ComputeOptimal, LogLogOLS, NotFittedError,
                           SaturatingPowerLaw, backtest)

__all__ = [
    "BacktestResult",
    "ChinchillaFit",
    "ComputeOptimal",
    "DownstreamPowerLaw",
    "LogLogOLS",
    "MonotoneTrend",
    "NotFittedError",
    "SaturatingPowerLaw",
    "ScaleTrend",
    "backtest",
    "describe_correlation",
    "mann_kendall",
    "monotone_trend",
    "proxy_correlations",
    "trend_at_largest_scales",
]
