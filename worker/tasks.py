"""Thin Celery tasks over the runner: a message is a doorbell naming a job."""
from __future__ import annotations

import threading

from genq.queue import RUN_TASK
from worker.app import app, settings

_runner = None
_lock = threading.Lock()


def runner():
    """One Runner per worker process, built on first use (after any fork, so no
    CUDA context or DB connection is shared with a parent)."""
    global _runner
    with _lock:
        if _runner is None:
            from worker.build import build_runner

            _runner = build_runner(settings)
        return _runner


@app.task(name=RUN_TASK, ignore_result=True)
def run_job(job_id: str) -> int:
    # The world may have changed since the message was sent: the runner re-reads the row.
    return runner().on_doorbell(job_id)
