"""A running batch: its rows (one per job, each with the one reason it was
asked to stop, if any), the side thread that tracks them (progress, cancel
requests, leases, shutdown), and what becomes of each job once the model
returns (`verdict`, a pure function of the row, what the model gave it and
whether the worker is shutting down).

The runner (inference batches) and the trainer (a fine-tune, a batch of one)
both build on it; neither imports the other.
"""
from __future__ import annotations

import enum
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from sqlalchemy.orm import Session, sessionmaker

from genq import jobs as joblib
from genq.errors import GenqError
from genq.schema import Job
from genq.settings import Settings
from genq.states import JobStatus
from genq.storage import Storage
from models.base import Result
from worker.executions import ExecutionLog
from worker.shutdown import Shutdown

log = logging.getLogger(__name__)

# A batch whose leases could not be renewed for this share of the lease stops
# its jobs, so they are no longer running here by the time the lease lapses
# and another worker may take them; the rest of the lease is the model's time
# to reach its next step.
LEASE_SAFE_SHARE = 0.8


class Stop(enum.IntEnum):
    """Why a row was asked to stop at the model's next step. A row has one
    reason; a stronger one replaces a weaker (the order below), never the
    other way, so a row cannot be both handed back and lost."""

    # The worker is shutting down: back to the queue, the attempt not counted.
    SHUTDOWN = 1
    # Its owner asked: it ends canceled (an owner's wish outranks a shutdown).
    CANCEL = 2
    # The lease is gone, or could not be renewed in time: write nothing.
    LEASE_LOST = 3


class Phase(enum.Enum):
    """Where a row is: claimed, executing (recorded as started in the
    execution log), or done (its outcome written, handed back or given up:
    nothing more is done with it)."""

    CLAIMED = "claimed"
    EXECUTING = "executing"
    DONE = "done"


@dataclass
class Row:
    """One job's place in a running batch."""

    job: Job
    progress: dict[str, Any] | None = None
    progress_dirty: bool = False
    phase: Phase = Phase.CLAIMED
    stop: Stop | None = None
    # When the model saw the stop (wall clock): where its execution ended.
    stopped_at: float | None = None

    def ask_to_stop(self, why: Stop) -> bool:
        """Ask the row to stop for `why`, unless it is done or has as strong a
        reason already. Returns whether the reason changed."""
        if self.phase is Phase.DONE or (self.stop is not None and self.stop >= why):
            return False
        self.stop = why
        return True

    @property
    def held(self) -> bool:
        """Not done, and as far as this worker knows its lease is still its own."""
        return self.phase is not Phase.DONE and self.stop is not Stop.LEASE_LOST

    def settle(self) -> bool:
        """Mark the row done; returns whether its execution had started (the
        execution log then records where it ended)."""
        executing = self.phase is Phase.EXECUTING
        self.phase = Phase.DONE
        return executing


class Ran(enum.Enum):
    """What the model gave one row."""

    RESULT = "result"    # a result
    NOTHING = "nothing"  # no result: it stopped the row, as asked
    FAILED = "failed"    # its own error for this row (a fine-tune whose loss became NaN)
    RAISED = "raised"    # the model raised: the whole batch has no results


class Verdict(enum.Enum):
    """What becomes of a row's job."""

    SUCCEED = "succeed"      # store its result; finish it succeeded
    FAIL = "fail"            # finish it failed
    CANCEL = "cancel"        # finish it canceled
    HAND_BACK = "hand_back"  # back to the queue, the attempt not counted; ring for another worker
    DROP = "drop"            # the lease is lost: write nothing, another worker has or will have it
    NONE = "none"            # already done (an owner's cancel, finished the moment it was seen)


# A row the model returned nothing for, though nothing asked it to stop.
NO_RESULT = {"code": "model_error", "message": "the model returned no result for this job"}


def error_for(exc: Exception, default_code: str = "model_error") -> dict:
    """A job's error for what the model (or the trainer) raised, in words its owner can act on."""
    if isinstance(exc, GenqError):
        return {"code": exc.code, "message": exc.message}
    text = str(exc) or type(exc).__name__
    if "out of memory" in text.lower():
        return {"code": "out_of_memory", "message": "the model ran out of memory on this batch; try smaller inputs"}
    return {"code": default_code, "message": f"{type(exc).__name__}: {text[:500]}"}


def verdict(phase: Phase, stop: Stop | None, ran: Ran, shutting_down: bool) -> Verdict:
    """The outcome of one row of a batch that has returned: a pure function of
    where the row is, why it was asked to stop, what the model gave it, and
    whether the worker is shutting down."""
    if phase is Phase.DONE:
        return Verdict.NONE
    if stop is Stop.LEASE_LOST:
        return Verdict.DROP
    if ran is Ran.RAISED:
        if not shutting_down:
            return Verdict.FAIL
        # Raised during a shutdown: most likely cut short by it (a cold
        # shutdown cancels tasks from its signal handler, inside the model).
        # The job did nothing wrong; it ends as its owner asked, or goes back.
        return Verdict.CANCEL if stop is Stop.CANCEL else Verdict.HAND_BACK
    if ran is Ran.FAILED:
        return Verdict.FAIL
    if ran is Ran.RESULT:
        # Done before it saw any stop (its last step came first): keep it.
        return Verdict.SUCCEED
    if stop is Stop.CANCEL:
        return Verdict.CANCEL
    if stop is Stop.SHUTDOWN:
        return Verdict.HAND_BACK
    return Verdict.FAIL  # no result and never asked to stop: NO_RESULT


def verdicts(rows: Sequence[Row], results: Sequence[Result | None] | None, shutting_down: bool) -> list[Verdict]:
    """The outcome of each row of a batch: `results` in row order, or None
    when the model raised."""
    if results is None:
        ran = [Ran.RAISED] * len(rows)
    else:
        ran = [Ran.NOTHING if r is None else Ran.RESULT for r in results]
    return [verdict(row.phase, row.stop, r, shutting_down) for row, r in zip(rows, ran)]


class Host(Protocol):
    """What a running batch needs of the worker that runs it (worker.runner.Runner)."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    owner: str
    shutdown: Shutdown
    executions: ExecutionLog

    def started(self, row: Row) -> None: ...

    def finish(self, outcomes: list[tuple[Row, JobStatus, dict]]) -> None: ...

    def hand_back(self, rows: list[Row], counted: bool = False, reason: str = ...) -> None: ...


class BatchTracker:
    """Progress, cancel checks, lease renewal and shutdown for one running batch.

    The model calls on_progress / is_cancelled from its inner loop, many times
    a second, so they only touch memory. A side thread does the database work
    off the model's path: it writes progress at most once per
    `progress_interval`, reads cancel flags every `cancel_poll_interval`
    (finishing a cancelled job at once, so its batch-mates run on) and renews
    the leases, so a long step cannot let them lapse. The same thread stops
    rows whose lease is lost, and every row once a shutdown has waited
    GENQ_SHUTDOWN_TIMEOUT for the batch."""

    def __init__(self, runner: Host, rows: list[Row], unit: str, finish_cancelled: bool = True):
        self.runner = runner
        self.rows = rows
        self.unit = unit
        # Inference rows are finished the moment their cancel is seen; a
        # trainer finishes its own, after saving a last checkpoint.
        self.finish_cancelled = finish_cancelled
        # When the last renewal that succeeded was sent (the claim, at first).
        self._lease_ok = time.monotonic()
        # Failures in a row of each piece of the side thread's work, for the log.
        self._failures: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-tracker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def on_progress(self, row: int, current: int, total: int, **extra) -> None:
        r = self.rows[row]
        r.progress = {"current": int(current), "total": int(total), "unit": self.unit, **extra}
        r.progress_dirty = True

    def is_cancelled(self, row: int) -> bool:
        r = self.rows[row]
        if r.stop is not None and r.stopped_at is None:
            r.stopped_at = time.time()  # the model knows now, and stops spending on the row
        return r.stop is not None

    def _loop(self) -> None:
        s = self.runner.settings
        tick = max(min(s.cancel_poll_interval, s.progress_interval), 0.02)
        renew_every = max(s.lease_seconds / 3, tick)
        last_progress = last_renew = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            self.check_shutdown()
            self.check_lease(now)
            # Each piece of work fails alone: a progress write the database
            # refuses must not skip the renewal beside it, or the lease lapses
            # and a live worker's job is queued again as if the worker had died.
            self._beat("reading cancel requests", self.poll_cancels)
            if now - last_progress >= s.progress_interval:
                last_progress = now
                self._beat("writing progress", self.flush_progress)
            if now - last_renew >= renew_every:
                last_renew = now
                self._beat("renewing leases", self.renew)

    def _beat(self, what: str, work: Callable[[], None]) -> None:
        """Run one piece of the loop's work; a failure is logged and the work
        tried again at its next beat (progress: the next report is written).
        The first failure in a row is logged with its trace, then one line
        every 100, so a failure lasting hours does not flood the log."""
        try:
            work()
        except Exception as exc:
            failures = self._failures.get(what, 0) + 1
            self._failures[what] = failures
            if failures == 1:
                log.exception("batch tracker: %s failed; trying again at its next beat", what)
            elif failures % 100 == 0:
                log.error("batch tracker: %s has failed %d times in a row: %s", what, failures, exc)
        else:
            if self._failures.pop(what, 0):
                log.info("batch tracker: %s works again", what)

    def held(self) -> list[Row]:
        return [r for r in self.rows if r.held]

    def check_shutdown(self) -> None:
        runner, settings = self.runner, self.runner.settings
        # A cold shutdown asks at once; the model then has as long to stop as after a warm one's timeout.
        cold = getattr(runner.shutdown, "cold", False)
        timeout = 0.0 if cold else settings.shutdown_timeout
        if runner.shutdown.past(settings.shutdown_deadline - settings.shutdown_timeout + timeout):
            # The model has not come back from its step: nothing more can be
            # done in this process. Record that the jobs stop running here, and go.
            for r in self.rows:
                if r.phase is Phase.EXECUTING:
                    runner.executions.ended(r.job.id, r.job.attempts, "abandoned")
            log.error("shutdown: the model did not stop within %.0fs of being asked; exiting now, "
                      "the leases of jobs %s will lapse and they will be queued again",
                      settings.shutdown_deadline - settings.shutdown_timeout,
                      [r.job.id for r in self.rows if r.phase is not Phase.DONE])
            logging.shutdown()
            os._exit(1)
        if runner.shutdown.past(timeout):
            stopped = [r for r in self.rows if r.ask_to_stop(Stop.SHUTDOWN)]
            if stopped:
                log.warning("shutdown: batch still running %.0fs after the signal%s; handing jobs %s back at their "
                            "next step", timeout, " (a cold shutdown)" if cold else "", [r.job.id for r in stopped])

    def check_lease(self, now: float) -> None:
        lease = self.runner.settings.lease_seconds
        held = self.held()
        if held and now - self._lease_ok > LEASE_SAFE_SHARE * lease:
            log.warning("could not renew the lease on jobs %s for %.1fs of %ss; stopping them before it lapses",
                        [r.job.id for r in held], now - self._lease_ok, lease)
            for r in held:
                r.ask_to_stop(Stop.LEASE_LOST)

    def poll_cancels(self) -> None:
        # A row asked to stop by the shutdown is still its owner's to cancel.
        live = [r for r in self.rows if r.held and r.stop is not Stop.CANCEL]
        if not live:
            return
        with self.runner.sessions() as session:
            flagged = joblib.cancel_requested(session, [r.job.id for r in live])
        for r in live:
            if r.job.id in flagged and r.ask_to_stop(Stop.CANCEL) and self.finish_cancelled:
                self.runner.finish([(r, JobStatus.CANCELED, {})])

    def flush_progress(self) -> None:
        dirty = [r for r in self.held() if r.progress_dirty]
        if not dirty:
            return
        with self.runner.sessions.begin() as session:
            for r in dirty:
                r.progress_dirty = False
                joblib.set_progress(session, r.job.id, self.runner.owner, r.progress)

    def renew(self) -> None:
        rows = self.held()
        sent = time.monotonic()
        if not rows:
            # Nothing held, nothing at risk. A continuous batch's rows come and
            # go between renewals: one claimed now has a fresh lease, and must
            # not be judged by a renewal that found nothing to renew.
            self._lease_ok = sent
            return
        with self.runner.sessions.begin() as session:
            held = joblib.renew_leases(session, [r.job.id for r in rows], self.runner.owner,
                                       self.runner.settings.lease_seconds)
        self._lease_ok = sent
        if lost := [r for r in rows if r.job.id not in held]:
            log.warning("lost the lease on jobs %s; stopping them, their results will not be written",
                        [r.job.id for r in lost])
            for r in lost:
                r.ask_to_stop(Stop.LEASE_LOST)
