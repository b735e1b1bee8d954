"""Graceful shutdown of a model worker. On SIGTERM (Celery's warm shutdown)
the worker claims nothing new and gives the batch in hand GENQ_SHUTDOWN_TIMEOUT
to finish; past it the batch's jobs are asked to stop at their next step and
handed back to the queue without counting an attempt, and the worker exits.
A model that has not stopped by Settings.shutdown_deadline (10 s later) is
abandoned: the process exits and the jobs' leases lapse (the reconciler queues
them again, counting the attempt, as for a crash).

A cold shutdown (SIGQUIT) stops claiming the same way and asks the batch's
rows to stop at their next step at once; what Celery interrupts meanwhile is
handed back rather than failed (worker/runner.py)."""
from __future__ import annotations

import time
from multiprocessing.sharedctypes import RawValue


class Shutdown:
    """When shutdown began (wall-clock seconds), 0 until it does. Kept in shared
    memory made before Celery forks its pool, so prefork children (which do
    not see the signal; the main process does) stop claiming too."""

    def __init__(self) -> None:
        self._began = RawValue("d", 0.0)
        self._cold = RawValue("b", 0)

    def begin(self, now: float | None = None, cold: bool = False) -> None:
        # Runs inside a signal handler: set numbers, nothing else.
        if cold:
            self._cold.value = 1
        if not self._began.value:
            self._began.value = now or time.time()

    @property
    def requested(self) -> bool:
        return self._began.value > 0

    @property
    def cold(self) -> bool:
        """A cold shutdown (SIGQUIT): the batch in hand is asked to stop at once,
        not after GENQ_SHUTDOWN_TIMEOUT (worker/batch.py)."""
        return bool(self._cold.value)

    def past(self, timeout: float, now: float | None = None) -> bool:
        """True once `timeout` seconds have gone by since shutdown began."""
        return self.requested and (now or time.time()) >= self._began.value + timeout


# The worker process's own; `genq worker` sets it from the shutdown signals.
SHUTDOWN = Shutdown()


def begin_on_signals() -> None:
    """Begin SHUTDOWN on any of Celery's shutdown signals, before Celery acts
    on it: on SIGTERM through worker_shutting_down (sent before the warm
    shutdown starts); on SIGQUIT and SIGINT by running first in their handlers,
    since for a cold shutdown Celery cancels running tasks before it sends
    worker_shutting_down, and the runner must know why its batch was cut."""
    from celery import platforms
    from celery.signals import worker_ready, worker_shutting_down

    worker_shutting_down.connect(lambda **_: SHUTDOWN.begin(), weak=False)

    def wrap_handlers(**_) -> None:
        # worker_ready comes after Celery installed its handlers (main process only).
        for name in ("SIGTERM", "SIGQUIT", "SIGINT"):
            celery_handler = platforms.signals[name]
            if callable(celery_handler):
                platforms.signals[name] = _first_begin(celery_handler, cold=name == "SIGQUIT")

    worker_ready.connect(wrap_handlers, weak=False)


def _first_begin(handler, cold: bool = False):
    # A cold shutdown is not left to Celery's interrupting the running task
    # alone: where its cancel does not reach the model (CI saw a batch run its
    # 6 s to the end), the rows are asked to stop at their next step.
    def begin_then(signum, frame):
        SHUTDOWN.begin(cold=cold)
        return handler(signum, frame)

    return begin_then
