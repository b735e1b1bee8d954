"""Thin Celery tasks over the runner and the webhook sender: a message is a
doorbell naming a job or a webhook delivery."""
from __future__ import annotations

import threading

from genq import webhooks
from genq.queue import DELIVER_TASK, RUN_TASK, publish
# The app and settings `genq worker` made this process's (worker.app.make), or
# for `celery -A worker.app`, the environment's.
from worker.app import app, settings
from worker.shutdown import SHUTDOWN

_runner = None
_sender = None
_lock = threading.Lock()


def runner():
    """One Runner per worker process, built on first use (after any fork, so no
    CUDA context or DB connection is shared with a parent)."""
    global _runner
    with _lock:
        if _runner is None:
            from worker.build import build_runner

            # SHUTDOWN is set by genq worker's SIGTERM handling (worker/main.py); jobs handed back
            # on the way out ring their pool for another worker at once.
            _runner = build_runner(settings, shutdown=SHUTDOWN, ring=lambda job_id, pool: publish(app, job_id, pool))
            # Deliveries its state changes enqueue ring the sender once committed.
            webhooks.ring_after_commit(_runner.sessions, app, settings.webhook_queue)
        return _runner


def sender():
    """One webhook Sender per worker process, built on first use like the runner."""
    global _sender
    with _lock:
        if _sender is None:
            from worker.build import build_sender

            _sender = build_sender(settings)
        return _sender


@app.task(name=RUN_TASK, ignore_result=True)
def run_job(job_id: str) -> int:
    # The world may have changed since the message was sent: the runner re-reads
    # the row (and on a draining worker rings again for another one).
    return runner().on_doorbell(job_id)


@app.task(name=DELIVER_TASK, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str | None:
    # The delivery may be done, or taken by another sender, since the message was sent: claim re-reads the row.
    return sender().deliver(delivery_id)
