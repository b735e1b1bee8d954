"""Graceful shutdown of a model worker. On SIGTERM (Celery's warm shutdown)
the worker claims nothing new and gives the batch in hand GENQ_SHUTDOWN_TIMEOUT
to finish; past it the batch's jobs are asked to stop at their next step and
handed back to the queue without counting an attempt, and the worker exits.
A model that does not come back from its step within HARD_MARGIN after that
is abandoned: the process exits and the jobs' leases lapse (the reconciler
queues them again, counting the attempt, as for a crash)."""
from __future__ import annotations

import time
from multiprocessing.sharedctypes import RawValue

# Seconds past the shutdown timeout that a model gets to reach its next step.
HARD_MARGIN = 10.0


class Shutdown:
    """When shutdown began (wall-clock seconds), 0 until it does. Kept in shared
    memory made before Celery forks its pool, so prefork children (which do
    not see the signal; the main process does) stop claiming too."""

    def __init__(self) -> None:
        self._began = RawValue("d", 0.0)

    def begin(self, now: float | None = None) -> None:
        # Runs inside a signal handler: set a number, nothing else.
        if not self._began.value:
            self._began.value = now or time.time()

    @property
    def requested(self) -> bool:
        return self._began.value > 0

    def past(self, timeout: float, now: float | None = None) -> bool:
        """True once `timeout` seconds have gone by since shutdown began."""
        return self.requested and (now or time.time()) >= self._began.value + timeout


# The worker process's own; cmd_worker connects it to Celery's worker_shutting_down.
SHUTDOWN = Shutdown()
