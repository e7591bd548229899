"""The Ray Data settings of the training stream, set on the driver's DataContext (Train V2 copies it to the
executor that runs the stream, in its SplitCoordinator actor).

- `preserve_order`: the split deals batches in stream order, so a rerun repeats every batch.
- `use_datasource_v2 = False`: ray 2.60's default Parquet path starts 32 footer-reader actors, each a process
  wanting a whole CPU, at every pass: minutes of start-up per epoch on a small node. Our shards are few and
  their sizes known (manifest.json), so the plain path is used.
- `IdleBackoff`: ray 2.60's streaming executor calls `ray.wait(..., timeout=0.1)` only while some task is
  running. A training stream is held back by its consumer nearly all the time: every operator is
  backpressured, no task runs, and the scheduling loop spins without blocking, burning ~40 % of a core per
  trial (measured with py-spy on the 2-core machine: the SplitCoordinator beside each trainer). The callback
  sleeps a few milliseconds after a step that returned at once; a step that waited on a task is left alone.

Imports Ray: `engine.data` loads this module only on its Ray path.
"""

from __future__ import annotations

import time

from ray.data import DataContext

# ray.data exposes the callback hook (DataContext.custom_execution_callback_classes) but not its base class
from ray.data._internal.execution.execution_callback import ExecutionCallback

FAST_STEP_S = 0.002  # a scheduling step this short did not block in ray.wait: nothing was running
BACKOFF_S = (
    0.05  # the pause after it: the output queue holds several blocks of batches, so a refill 50 ms late starves nothing
)


class IdleBackoff(ExecutionCallback):
    """Sleep BACKOFF_S after a scheduling step that returned within FAST_STEP_S (see the module docstring)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if now - self._last < FAST_STEP_S:
            time.sleep(BACKOFF_S)
            now = time.perf_counter()
        self._last = now


def configure(context: DataContext | None = None) -> DataContext:
    """The settings above on `context` (default: the current one); returns it."""
    context = context or DataContext.get_current()
    context.execution_options.preserve_order = True
    context.use_datasource_v2 = False
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)
    return context
