"""Doorbells rung after the answer: a submit's Celery message is sent by a
thread of the API process, not by the request's thread.

A doorbell is a hint (genq.queue.publish): the job's row, committed before
the answer, is the record, and the reconciler beside every worker rings for
each job queued longer than its grace period (2 x GENQ_RECONCILE_INTERVAL).
So a doorbell this process had not sent yet when it died (a crash, a kill)
delays its job by that much and never loses it; a process that exits in
good order sends what is pending first (for at most EXIT_SECONDS). What a
submit gains: its answer waits neither for the broker's round trip nor for
Celery's message building (together ~1.7 ms of a submit's 4.4 ms in a
profile). The queue is bounded: a doorbell that finds it full is left to the
reconciler, with a warning.
"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import time

from celery import Celery

import genq.queue
from genq import tracing
from genq.notify import Notifier

log = logging.getLogger(__name__)

# Doorbells waiting to be sent, at most; past it they are left to the reconciler.
MAX_PENDING = 10_000
# At exit, pending doorbells are sent for at most this long (seconds).
EXIT_SECONDS = 2.0


class Doorbells:
    """One sender thread per process, started on the first ring (after a
    pre-forking server has forked)."""

    def __init__(self, celery: Celery, notifier: Notifier | None = None) -> None:
        self.celery = celery
        self.notifier = notifier
        self._pending: queue.Queue[tuple[str, str, bool, dict | None]] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ring(self, job_id: str, pool: str, notify: bool = False) -> None:
        """Send the job's doorbell soon, and with `notify` its event notification
        first (genq.notify: for a job submitted with no session hook to publish
        it); never blocks, never raises for the broker."""
        if self._thread is None:
            self._start()
        try:
            # The request's trace context goes along: the doorbell's span joins its trace.
            self._pending.put_nowait((job_id, pool, notify, tracing.carrier()))
        except queue.Full:
            log.warning("doorbell of job %s not sent: %d are waiting already; the reconciler rings for it",
                        job_id, MAX_PENDING)

    def flush(self, seconds: float) -> bool:
        """Wait up to `seconds` for every pending doorbell to be sent; whether they were."""
        deadline = time.monotonic() + seconds
        while self._pending.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._send, name="doorbells", daemon=True)
            self._thread.start()
            atexit.register(self.flush, EXIT_SECONDS)

    def _send(self) -> None:
        while True:
            job_id, pool, notify, trace = self._pending.get()
            try:
                if notify and self.notifier is not None:
                    self.notifier.publish({job_id: 0})  # logs and drops it when Redis fails
                # Looked up on each send: publish logs a broker that is down and returns.
                with tracing.attached(trace):
                    genq.queue.publish(self.celery, job_id, pool)
            except Exception:  # noqa: BLE001 - the thread must outlive any one doorbell
                log.exception("doorbell of job %s failed", job_id)
            finally:
                self._pending.task_done()
