"""Thin Celery tasks over the runner and the webhook sender: a message is a
doorbell naming a job or a webhook delivery."""
from __future__ import annotations

import threading
import time

from genq import webhooks
from genq.queue import DELIVER_TASK, RUN_TASK, publish
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

            # SHUTDOWN is set by cmd_worker's SIGTERM handling; jobs handed back
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


# A draining worker waits this long before handing a doorbell back, so that
# alone on its queue it does not spin on the same message.
DRAIN_HANDBACK_SECONDS = 1.0


@app.task(name=RUN_TASK, ignore_result=True, bind=True)
def run_job(self, job_id: str) -> int:
    r = runner()
    if r.draining():
        # Claim nothing; ring again so another worker of the pool takes it.
        time.sleep(DRAIN_HANDBACK_SECONDS)
        queue = (self.request.delivery_info or {}).get("routing_key")
        if queue:
            publish(app, job_id, queue)
        return 0
    # The world may have changed since the message was sent: the runner re-reads the row.
    return r.on_doorbell(job_id)


@app.task(name=DELIVER_TASK, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str | None:
    # The delivery may be done, or taken by another sender, since the message was sent: claim re-reads the row.
    return sender().deliver(delivery_id)
