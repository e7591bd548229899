"""What a person sees while a sweep or an analysis runs, and where Ray's own output goes instead.

By default the console shows one table, live on a terminal (rich): per trial its state, tokens,
loss, tokens/s and ETA; per analysis table its jobs done, failed and total. Above it go one line
per trial that ended or failed, one per analysis job that failed, and the final paths. When stdout
is not a terminal (CI, `ray job logs`), the table is a plain status line every `every_s` seconds
instead, printed even when nothing changed, so a reader always sees that the run is alive.

Ray's output goes to runs/<name>/logs/ instead of the console: `ray-workers.log` (every worker's
stdout and stderr, from every node: Ray Data's progress bars, Ray Train's and Tune's per-report
echoes, tracebacks) and `driver.log` (the driver's logging: Ray's, Tune's and clmscale's own
lines). Errors still reach the console: Ray's ERROR records by their first line, a failed trial or
analysis job with its message. `verbose=True` prints everything as Ray does; the logs are written
then too.

The engine does not import this module. sweep.py and analyze.py log to "clmscale" as always; a
record that carries `extra={"console": {...}}` also updates the table, and the ones that only
report progress are not printed as lines:
    {"trials": [ids], "ended": [ids]}                                        the grid, as a sweep starts
    {"trial": id, "tokens": n, "budget": n, "loss": x, "tokens_per_s": x}    a trial's progress (no line)
    {"trial": id, "state": "started" | "finished" | "diverged" | "failed"}  a trial started or ended
    {"jobs": {table: n}}                                                     analysis jobs to run
    {"job": table, "ok": bool}                                               one analysis job ended (no line)
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from clmscale.engine.rundir import RunDir

STATUS_EVERY_S = 20.0  # plain output: one status line this often, under the promised 30 s (a live table: every 1 s)
WORKERS_LOG = "ray-workers"  # logs/ray-workers.log
DRIVER_LOG = "driver"  # logs/driver.log
OUR_LOGGERS = ("clmscale", "engine", "fits")  # their INFO lines are events; other libraries' only from WARNING
RAY_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives its worker-log printer (ray._private.worker)
AIR_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"  # read by Tune when a run starts, on the driver
HIDDEN = ("Tuner.restore(", "Trials did not complete")  # Tune's advice after Ctrl-C: clmscale prints its own
SAID_BY_CLMSCALE = ("Trial task failed for trial",)  # sweep.py's "[trial] failed: <error>" says it (full in driver.log)


# ---------------------------------------------------------------------------------------------
# the state the table shows


class Board:
    """Trials and analysis jobs, as the log records report them; written by logging, read by the view."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.trials: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, list[int]] = {}  # table -> [done, failed, total]
        self.start = time.monotonic()

    def update(self, c: dict[str, Any]) -> None:
        with self._lock:
            if "trials" in c:
                for t in c["trials"]:
                    self.trials.setdefault(t, {"state": "pending"})
                for t in c.get("ended", []):
                    self.trials[t]["state"] = "ended before"
            elif "trial" in c:
                row = self.trials.setdefault(c["trial"], {"state": "pending"})
                row.update({k: v for k, v in c.items() if k != "trial"}, at=time.monotonic())
                if "state" not in c:
                    row["state"] = "running"
                    row.setdefault("first", (row["tokens"], row["at"]))  # for the ETA's wall-clock rate
            elif "jobs" in c:
                for table, n in c["jobs"].items():
                    self.jobs[table] = [0, 0, n]
            elif "job" in c:
                counts = self.jobs.setdefault(c["job"], [0, 0, 0])
                counts[0 if c["ok"] else 1] += 1

    def _rows(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(t, dict(r)) for t, r in self.trials.items()]

    def _job_rows(self) -> list[tuple[str, list[int]]]:
        with self._lock:
            return [(k, list(v)) for k, v in self.jobs.items()]

    def elapsed(self) -> str:
        return _duration(time.monotonic() - self.start)

    def table(self):
        """The live view: a table of trials, then one of analysis jobs (rich renderables)."""
        from rich.console import Group
        from rich.table import Table

        parts = []
        trials = self._rows()
        if trials:
            t = Table(title=f"trials ({self.elapsed()})", title_justify="left", expand=False)
            for col in ("trial", "state", "tokens", "loss", "tokens/s", "ETA"):
                t.add_column(col, justify="left" if col in ("trial", "state") else "right")
            for trial_id, r in trials:
                t.add_row(
                    trial_id,
                    r["state"],
                    _tokens(r),
                    _num(r.get("loss"), ".4f"),
                    _num(r.get("tokens_per_s"), ",.0f"),
                    _eta(r),
                )
            parts.append(t)
        jobs = self._job_rows()
        if jobs:
            t = Table(title=f"analysis ({self.elapsed()})", title_justify="left", expand=False)
            for col in ("jobs", "done", "failed", "total"):
                t.add_column(col, justify="left" if col == "jobs" else "right")
            for table, (done, failed, total) in jobs:
                t.add_row(table, str(done), str(failed), str(total))
            parts.append(t)
        if not parts:
            from rich.text import Text

            parts.append(Text(f"starting ({self.elapsed()})"))
        return Group(*parts)

    def status_line(self) -> str:
        """The plain view: one line with the counts and every running trial."""
        parts = []
        trials = self._rows()
        if trials:
            counts: dict[str, int] = {}
            for _, r in trials:
                counts[r["state"]] = counts.get(r["state"], 0) + 1
            parts.append("trials " + ", ".join(f"{n} {state}" for state, n in counts.items()))
            running = [
                f"{t} {_tokens(r)} loss {_num(r.get('loss'), '.4f')} {_num(r.get('tokens_per_s'), ',.0f')} "
                f"tok/s ETA {_eta(r)}"
                for t, r in trials
                if r["state"] == "running"
            ]
            parts += running[:4] + ([f"+{len(running) - 4} more running"] if len(running) > 4 else [])
        jobs = self._job_rows()
        if jobs:
            parts.append(
                "analysis "
                + ", ".join(
                    f"{table} {done}/{total}" + (f" ({failed} failed)" if failed else "")
                    for table, (done, failed, total) in jobs
                )
            )
        return f"status +{self.elapsed()}: " + (" | ".join(parts) if parts else "starting")


def _duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _tokens(r: dict[str, Any]) -> str:
    tokens, budget = r.get("tokens"), r.get("budget")
    if tokens is None:
        return "-"
    return f"{tokens:.3g}/{budget:.3g} ({100 * tokens / budget:.0f}%)" if budget else f"{tokens:.3g}"


def _eta(r: dict[str, Any]) -> str:
    """Seconds left at the wall-clock rate since the trial's first report (the tokens/s it reports leaves out
    data loading, validation and checkpoints), else at that speed; counted down since the last report."""
    tokens, budget, speed = r.get("tokens"), r.get("budget"), r.get("tokens_per_s")
    if r["state"] != "running" or tokens is None or not budget:
        return "-"
    first_tokens, first_at = r.get("first", (tokens, r["at"]))
    if tokens > first_tokens and r["at"] > first_at:
        speed = (tokens - first_tokens) / (r["at"] - first_at)
    if not speed or speed <= 0:
        return "-"
    return _duration((budget - tokens) / speed - (time.monotonic() - r["at"]))


# ---------------------------------------------------------------------------------------------
# two views: a live table on a terminal, plain lines elsewhere


class PlainView:
    """Event lines as they come (errors on stderr), and the status line every `every_s` seconds."""

    def __init__(
        self, board: Board, every_s: float = STATUS_EVERY_S, out: TextIO | None = None, err: TextIO | None = None
    ):
        self.board, self.every_s = board, every_s
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="clmscale-status", daemon=True)
        self._lock = threading.Lock()

    def line(self, text: str, error: bool = False) -> None:
        with self._lock:
            sink = self.err if error else self.out
            print(f"{time.strftime('%H:%M:%S')} {text}", file=sink, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self.line(self.board.status_line())
            self._beaten = True

    def start(self) -> None:
        self._beaten = False
        self._thread.start()

    def stop(self) -> None:
        """The last status line, unless nothing ran (a refusal in the first seconds prints just its error)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self._beaten or self.board.trials or self.board.jobs:
            self.line(self.board.status_line())


class LiveView:
    """The table, redrawn in place once a second; event lines are printed above it."""

    def __init__(self, board: Board):
        from rich.console import Console
        from rich.live import Live

        self.board = board
        self.live = Live(get_renderable=board.table, console=Console(), refresh_per_second=1, transient=False)

    def line(self, text: str, error: bool = False) -> None:
        self.live.console.print(
            text, style="bold red" if error else None, markup=False, highlight=False, soft_wrap=True
        )

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()


# ---------------------------------------------------------------------------------------------
# log records -> the board and the view


class ConsoleHandler(logging.Handler):
    """Progress records update the board; events print a line; Ray's records only when they are errors."""

    def __init__(self, board: Board, view: PlainView | LiveView, driver_log: str):
        super().__init__(level=logging.INFO)
        self.board, self.view, self.driver_log = board, view, driver_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            c = getattr(record, "console", None)
            if isinstance(c, dict):
                self.board.update(c)
                if ("tokens" in c and "state" not in c) or "job" in c:
                    return  # progress: the table shows it
            message = record.getMessage()
            if any(h in message for h in HIDDEN + SAID_BY_CLMSCALE):
                return
            name = record.name
            if name == "ray" or name.startswith("ray."):
                if record.levelno >= logging.ERROR:
                    first = message.strip().splitlines()[0] if message.strip() else record.levelname
                    self.view.line(f"ray: {first} (more in {self.driver_log})", error=True)
                return
            ours = any(name == n or name.startswith(n + ".") for n in OUR_LOGGERS)
            if ours or record.levelno >= logging.WARNING:
                self.view.line(message, error=record.levelno >= logging.ERROR)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


class _HideTuneAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(h in record.getMessage() for h in HIDDEN)


# ---------------------------------------------------------------------------------------------
# the session: what a CLI command wraps around its work


class Session:
    """The console of one command; `ray_started()` after ray.init moves worker output to the logs."""

    def __init__(self, rd: RunDir, verbose: bool, view: PlainView | LiveView | None):
        self.rd, self.verbose, self.view = rd, verbose, view
        self._workers_file: TextIO | None = None
        self._saved_ray_handler: tuple | None = None
        self._worker_lock = threading.Lock()

    def line(self, text: str, error: bool = False) -> None:
        """An event line: through the view (above the live table), or plain with --verbose."""
        if self.view is not None:
            self.view.line(text, error=error)
        else:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def ray_started(self, context: Any = None) -> None:
        """Send every worker's output to logs/ray-workers.log (and, with --verbose, to the console too).
        `context`: what ray.init returned, if this command connected: then the cluster is said once."""
        import ray

        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # Ray moved it: its printer stays, so nothing is lost from the console
            logging.getLogger("clmscale").warning(
                "Ray's worker output stays on the console (this Ray has no global_worker_stdstream_dispatcher)"
            )
            return
        self._workers_file = self.rd.open_log(WORKERS_LOG)
        if not self.verbose:
            with dispatcher._lock:
                found = [pair for pair in dispatcher.handlers if pair[0] == RAY_PRINT_HANDLER]
            if found:
                self._saved_ray_handler = found[0]
                dispatcher.remove_handler(RAY_PRINT_HANDLER)
        dispatcher.add_handler("clmscale_logs", self._write_worker_lines)
        if context is None:
            return
        resources, dashboard = ray.cluster_resources(), getattr(context, "dashboard_url", None)
        where = f", dashboard http://{dashboard}" if dashboard else ""
        self.line(
            f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs{where}; "
            f"its output goes to {self.rd.logs}/" + (" and here" if self.verbose else "")
        )

    def _write_worker_lines(self, data: dict[str, Any]) -> None:
        """One batch of a worker's lines, as Ray prints them: '(<actor or task> pid=.., ip=..) line'."""
        out = self._workers_file
        if out is None:
            return
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')}{', stderr' if data.get('is_err') else ''})"
        with self._worker_lock:
            for line in data.get("lines", []):
                out.write(f"{prefix} {line}\n")

    def close(self) -> None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher
        except ImportError:
            global_worker_stdstream_dispatcher = None  # type: ignore[assignment]  # a private API: gone, Ray prints
        dispatcher = global_worker_stdstream_dispatcher
        if dispatcher is not None and self._workers_file is not None:
            dispatcher.remove_handler("clmscale_logs")
            if self._saved_ray_handler is not None:
                dispatcher.add_handler(*self._saved_ray_handler)
        if self._workers_file is not None:
            with self._worker_lock:
                self._workers_file.close()
                self._workers_file = None


@contextmanager
def session(
    rd: RunDir, *, verbose: bool = False, live: bool | None = None, every_s: float = STATUS_EVERY_S
) -> Iterator[Session]:
    """The console around a command's work (see the module docstring). `live`: a redrawn table; default:
    when stdout is a terminal. Logging is put back as it was on the way out."""
    import ray  # noqa: F401 - its import sets up the "ray" logger, which is rerouted here
    from ray.data import DataContext

    driver_file = rd.open_log(DRIVER_LOG)
    to_file = logging.StreamHandler(driver_file)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    saved = (list(root.handlers), root.level, list(ray_logger.handlers))
    hide = _HideTuneAdvice()
    data_context = DataContext.get_current()
    saved_bars = data_context.enable_progress_bars
    saved_output = os.environ.get(AIR_NEW_OUTPUT)
    view: PlainView | LiveView | None = None
    if verbose:  # as before, plus the file
        for h in ray_logger.handlers:
            h.addFilter(hide)
        ray_logger.addHandler(to_file)
        root.addHandler(to_file)
    else:
        board = Board()
        live = sys.stdout.isatty() if live is None else live
        view = LiveView(board) if live else PlainView(board, every_s=every_s)
        handler = ConsoleHandler(board, view, str(rd.log_file(DRIVER_LOG)))
        root.handlers = [to_file, handler]
        ray_logger.handlers = [to_file, handler]
        data_context.enable_progress_bars = False  # the driver's own datasets; workers' bars go to the log
        # Tune's "new output" prints (not logs) its experiment path and each trial error even at verbose=0;
        # the old reporter at verbose=0 prints nothing, and the errors still come as log records
        os.environ[AIR_NEW_OUTPUT] = "0"
    root.setLevel(logging.INFO)
    s = Session(rd, verbose, view)
    if view is not None:
        view.start()
    try:
        yield s
    finally:
        if view is not None:
            view.stop()
        s.close()
        root.handlers, ray_logger.handlers = saved[0], saved[2]
        root.setLevel(saved[1])
        for h in ray_logger.handlers:
            h.removeFilter(hide)
        data_context.enable_progress_bars = saved_bars
        if saved_output is None:
            os.environ.pop(AIR_NEW_OUTPUT, None)
        else:
            os.environ[AIR_NEW_OUTPUT] = saved_output
        to_file.close()
        driver_file.close()
