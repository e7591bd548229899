"""`clmscale status`: a run directory's progress, read as `ray status` reads a cluster.

    driver    who holds the run directory's lock: command, pid, host, since, heartbeat age (or nobody)
    trials    per trial: state, tokens of its budget, last loss, tokens/s, ETA, restarts (its folder)
    analysis  per result table: the analysis' own plan against the rows there (done, failed, to run)
    faults    restarts and corrupt checkpoints (`RunDir.fault_events()`)

Everything is read through `engine.rundir`; nothing here needs Ray or a running driver. A trial with
records but no result is `running` while a driver holds the lock, else `stopped` (continue it with
`clmscale sweep FILE --resume`).
"""

from __future__ import annotations

import math
import time
from typing import Any

from clmscale.engine.rundir import ANALYSIS_TABLES, TABLES, RunDir, RunDirLock


def run_status(rd: RunDir) -> dict[str, Any]:
    """Plain data (JSON-ready) for the run directory: driver, trials, analysis, faults."""
    rd.config()  # raises "not a run directory" for a wrong path
    holder = rd.lock_holder()
    stale = RunDirLock(rd.lock_path, "status").stale_reason(holder) if holder else None
    driver = (
        None
        if holder is None
        else {
            "command": holder.command,
            "pid": holder.pid,
            "host": holder.host,
            "since": holder.since,
            "heartbeat_age_s": max(0.0, time.time() - holder.heartbeat),
            "alive": stale is None,
            "stale_reason": stale,
        }
    )
    return {
        "run_dir": str(rd.root),
        "driver": driver,
        "trials": trial_rows(rd, driver_alive=bool(driver and driver["alive"])),
        "analysis": analysis_rows(rd),
        "faults": rd.fault_events(),
    }


def trial_rows(rd: RunDir, driver_alive: bool) -> list[dict[str, Any]]:
    """One row per trial of the grid: state, tokens, budget, loss, tokens/s, ETA (s), restarts."""
    rows = []
    for trial_id, trial in rd.trials_by_id().items():
        folder = rd.trial(trial_id)
        result, records = folder.result(), folder.metrics()
        logs = [r for r in records if "event" not in r and "n_tokens" in r]
        last = logs[-1] if logs else {}
        restarts = sum(r.get("event") == "resumed" for r in records)
        budget = (result.budget_tokens if result else None) or last.get("budget_tokens") or trial.budget_tokens
        speed = last.get("tokens_per_s")
        state: str
        tokens: float
        loss: float | None
        eta: float | None
        if result is not None:
            state, tokens, loss = result.status, result.n_tokens, result.train_loss
            eta = 0.0 if result.status == "finished" else None
            speed = speed or (result.n_tokens / result.wall_s if result.wall_s else None)
        elif records:
            state = "running" if driver_alive else "stopped"
            tokens, loss = last.get("n_tokens", 0), last.get("train_loss")
            eta = (budget - tokens) / speed if driver_alive and speed and budget else None
        else:
            state, tokens, loss, eta = "pending", 0, None, None
        rows.append(
            {
                "trial_id": trial_id,
                "state": state,
                "tokens": tokens,
                "budget_tokens": budget,
                "loss": loss,
                "tokens_per_s": speed,
                "eta_s": eta,
                "restarts": restarts,
            }
        )
    return rows


def analysis_rows(rd: RunDir) -> list[dict[str, Any]]:
    """Per result table the analysis writes: jobs planned, done (rows with status ok), failed (only error
    rows) and still to run; empty before the sweep has written its table."""
    if not rd.has_table("pretrain"):
        return []
    from clmscale.engine.analyze import Context, plan_jobs, select_checkpoints  # the analysis' own plan, not a copy

    ctx = Context.of(rd)
    counted = rd.counted_checkpoints().checkpoints
    jobs = plan_jobs(ctx, select_checkpoints(counted, ctx.cfg.analysis))
    rows = []
    for name in ANALYSIS_TABLES:
        planned = {j.key for j in jobs if j.table == name}
        if not planned:
            continue
        table = rd.read_table(name)
        keys = list(TABLES[name].key)
        ok = {tuple(k) for k in table[table["status"] == "ok"][keys].itertuples(index=False)}
        error = {tuple(k) for k in table[table["status"] == "error"][keys].itertuples(index=False)} - ok
        done, failed = len(planned & ok), len(planned & error)
        rows.append(
            {
                "table": name,
                "planned": len(planned),
                "done": done,
                "failed": failed,
                "to_run": len(planned) - done - failed,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# as text


def format_status(status: dict[str, Any]) -> str:
    lines = [f"======== {status['run_dir']} ========", _driver_line(status["driver"]), ""]
    trials = status["trials"]
    order = ("finished", "diverged", "running", "stopped", "pending")
    counts = {s: n for s in order if (n := sum(t["state"] == s for t in trials))}
    lines.append(f"Trials: {len(trials)} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    lines += _table(
        [
            {
                "trial": t["trial_id"],
                "state": t["state"],
                "tokens": f"{_count(t['tokens'])}/{_count(t['budget_tokens'])}",
                "loss": _number(t["loss"], "{:.4f}"),
                "tokens/s": _number(t["tokens_per_s"], "{:,.0f}"),
                "ETA": _duration(t["eta_s"]),
                "restarts": str(t["restarts"]),
            }
            for t in trials
        ]
    )
    jobs = status["analysis"]
    if jobs:
        total = {k: sum(r[k] for r in jobs) for k in ("planned", "done", "failed", "to_run")}
        lines += [
            "",
            f"Analysis: {total['done']}/{total['planned']} jobs done, {total['failed']} failed, "
            f"{total['to_run']} to run",
        ]
        lines += _table(
            [
                {
                    "table": r["table"],
                    "done": str(r["done"]),
                    "failed": str(r["failed"]),
                    "to run": str(r["to_run"]),
                    "planned": str(r["planned"]),
                }
                for r in jobs
            ]
        )
    else:
        lines += ["", "Analysis: not started (no results/pretrain.parquet yet)"]
    if status["faults"]:
        lines += ["", f"Faults: {len(status['faults'])}"]
        lines += [" " + " ".join(f"{k}={v}" for k, v in event.items()) for event in status["faults"]]
    return "\n".join(lines)


def _driver_line(driver: dict[str, Any] | None) -> str:
    if driver is None:
        return "driver: none"
    who = f"`{driver['command']}` (pid {driver['pid']} on {driver['host']}, since {driver['since']})"
    if driver["alive"]:
        return f"driver: {who}, heartbeat {driver['heartbeat_age_s']:.0f} s ago"
    return f"driver: none ({who} left a stale lock: {driver['stale_reason']}; the next driver takes it over)"


def _table(rows: list[dict[str, str]]) -> list[str]:
    """Columns padded to their widest cell: text left, numbers right."""
    if not rows:
        return []
    names = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in names}
    left = {"trial", "state", "table"}
    cell = lambda c, v: v.ljust(width[c]) if c in left else v.rjust(width[c])  # noqa: E731
    return [" " + "  ".join(cell(c, c) for c in names)] + [" " + "  ".join(cell(c, r[c]) for c in names) for r in rows]


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def _number(value: Any, fmt: str) -> str:
    return fmt.format(value) if _finite(value) else "-"


def _count(n: Any) -> str:
    """12_500 -> '12.5k': token counts a person can compare at a glance."""
    if not _finite(n):
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
