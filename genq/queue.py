"""The Celery app: one queue per worker pool, a doorbell message per job.

A message carries a job id and nothing else; the worker re-reads the row
(Postgres is the record of truth), so a lost, stale or duplicate message never
changes what a job does.
"""
from __future__ import annotations

import logging

from celery import Celery

from genq.settings import Settings

log = logging.getLogger(__name__)

RUN_TASK = "genq.run_job"
# Its message carries a webhook delivery's id; the sender re-reads the row.
DELIVER_TASK = "genq.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    broker = settings.broker_url
    if broker == "filesystem://":
        # The host kombu assumes anyway, named so that it does not warn about it on every connection.
        broker = "filesystem://localhost/"
    app = Celery("genq", broker=broker)
    transport_options: dict = {}
    if settings.embedded_broker:
        # Kombu's filesystem transport: messages are files in a shared folder,
        # so API and worker processes talk with no broker server running.
        folder = settings.home / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "data_folder_processed": str(folder / "processed"),
            # Broadcast (control) messages; kombu's default is ./control in the cwd.
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # The worker lists the folder this often when it is empty: 0.1 s
            # keeps submit-to-start latency low at the cost of a few stat calls.
            "polling_interval": 0.1,
        }
    else:
        transport_options = {
            # An unacknowledged message (acks_late: every message of a running
            # batch) is delivered again once it is older than this. The job
            # row, not the message, decides whether anything runs, so a
            # redelivery is a no-op; set it above the longest job anyway, so a
            # long batch does not wake another worker for nothing.
            "visibility_timeout": settings.broker_visibility_timeout,
            # Idle workers sweep for such messages this often (kombu scans on
            # every Nth call of its timer; throttle 1 makes the interval exact).
            "unacked_restore_interval": settings.broker_restore_interval,
            "unacked_restore_throttle": 1,
            # A publish to a Redis that is gone fails in seconds instead of
            # hanging the request; the job is committed and the reconciler rings.
            "socket_connect_timeout": 5,
            "socket_timeout": 10,
        }
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # A worker waits for a broker that went away for as long as it takes
        # (the default gives up after 100 tries and the worker exits).
        broker_connection_max_retries=None,
        task_serializer="json",
        accept_content=["json"],
        # Results live in the job row, never in a Celery backend.
        task_ignore_result=True,
        # Ack after the doorbell is handled: a worker killed mid-batch leaves
        # its message unacked in Redis rather than lost. (The lease and the
        # reconciler bring the job back anyway; this is the cheap first line.)
        task_acks_late=True,
        # One message at a time per process: a worker busy with a batch must
        # not hoard doorbells that an idle worker could answer.
        worker_prefetch_multiplier=1,
        # A prefork child that dies (a segfault, the OOM killer) returns its
        # message to the queue instead of acking it. A job that kills its
        # worker every time cannot loop on this: attempts are counted on the
        # job row and the reconciler fails it past max_attempts.
        task_reject_on_worker_lost=True,
        # Keep running a batch when the broker connection drops: the job row
        # and its lease decide what counts, not the message.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Soft shutdown: on a cold shutdown (SIGQUIT, a second Ctrl-C) wait
        # this long for running tasks before cancelling them. A prefork
        # worker's children use it to finish or hand back their batch (they
        # stop claiming at once; worker/shutdown.py). `genq worker` turns it
        # off for the solo pool: there Celery's wait runs inside the signal
        # handler, on the very thread running the batch, and only pauses it.
        # SIGTERM (warm) needs none of this: the runner bounds it itself.
        worker_soft_shutdown_timeout=settings.shutdown_deadline,
        # No ETA or countdown messages here, so an idle worker has nothing to
        # wait for: exit at once.
        worker_enable_soft_shutdown_on_idle=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def publish(app: Celery, job_id: str, pool: str) -> bool:
    """Ring the pool's doorbell for a committed job. Returns False when the broker
    is unreachable: the job stays queued in the database and a worker sweep
    picks it up, so the caller need not fail the request."""
    return _ring(app, RUN_TASK, job_id, pool)


def publish_delivery(app: Celery, delivery_id: str, queue: str) -> bool:
    """Ring the webhook sender's doorbell for a committed delivery; when the
    broker is down the sender's sweep finds the row instead."""
    return _ring(app, DELIVER_TASK, delivery_id, queue)


def _ring(app: Celery, task: str, row_id: str, queue: str) -> bool:
    try:
        app.send_task(
            task,
            args=[row_id],
            queue=queue,
            routing_key=queue,
            retry=True,
            # Give up within about a second: the row is committed already.
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.3, "interval_max": 0.5},
        )
        return True
    except Exception as exc:  # broker down: the row is the truth, log and move on
        log.warning("publish of %s(%s) to queue %s failed: %s", task, row_id, queue, exc)
        return False
