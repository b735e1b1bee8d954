"""Doorbells for event streams: "job X has new durable events", published over
Redis pub/sub once the transaction that wrote them commits.

The events table stays the record; a notification carries no event, only the
job's id (in the channel name, `genq-events:<job id>`) and the highest event id
it knows of (0 for events written by Core, whose ids were not read back; the
API reads the job's new events either way). API processes subscribe to the pattern `genq-events:*` once each
(api/fanout.py), read the job's new events once, and hand them to every watcher
of that job or its tenant. A notification is best-effort: one lost (Redis
restarting, a publish that failed) is made up by the API's slow re-check, so a
failing publish is logged and dropped, never raised into a job's transition.

Publishing hooks a sessionmaker: every JobEvent a session flushes is noted in
the session, and published after (and only if) the session commits.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref

import redis
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from genq.schema import JobEvent
from genq.settings import Settings

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "genq-events"
PATTERN = f"{CHANNEL_PREFIX}:*"
# After a failed publish, publishes are dropped without trying for this long
# (seconds): a worker's commit must not wait out a connect timeout each time.
RETRY_SECONDS = 5.0
_NOTED = "genq_notify_jobs"
_hooked: "weakref.WeakSet[sessionmaker]" = weakref.WeakSet()


def channel(job_id: str) -> str:
    return f"{CHANNEL_PREFIX}:{job_id}"


class Notifier:
    """Publishes "new events" doorbells; never raises for Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._down_until = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Notifier | None":
        """A Notifier on the broker's Redis; None when the broker is not Redis
        (embedded: the event streams poll the database there)."""
        if not settings.broker_url.startswith(("redis://", "rediss://")):
            return None
        return cls(redis.Redis.from_url(settings.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0))

    def publish(self, jobs: dict[str, int]) -> None:
        """`jobs`: job id -> the highest event id written for it."""
        if not jobs or time.monotonic() < self._down_until:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for job_id, last in jobs.items():
                    pipe.publish(channel(job_id), str(last))
                pipe.execute()
        except redis.RedisError as exc:
            with self._lock:
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + RETRY_SECONDS
            if first:
                log.warning("event notifications dropped while Redis fails (streams re-check the database): %s", exc)
            return
        if self._down_until:
            self._down_until = 0.0


def note(session: Session, job_id: str, event_id: int = 0) -> None:
    """Note events written without the ORM (a Core INSERT, as genq.jobs.submit
    does): the flush hook below cannot see them, the commit hook publishes them
    all the same. Harmless in a session that is not hooked."""
    noted = session.info.setdefault(_NOTED, {})
    noted[job_id] = max(noted.get(job_id, 0), event_id)


def notify_after_commit(sessions: sessionmaker, notifier: Notifier | None) -> None:
    """Make sessions from `sessions` publish a doorbell for each job whose
    events they wrote, once they commit. No notifier: nothing is hooked."""
    if notifier is None:
        return
    # One hook per sessionmaker, however often a process asks.
    if sessions in _hooked:
        return
    _hooked.add(sessions)

    @sa_event.listens_for(sessions, "after_flush")
    def _note(session: Session, _context) -> None:
        # After a flush the new objects have their ids; `session.new` still
        # lists what this flush inserted.
        for obj in session.new:
            if isinstance(obj, JobEvent) and obj.id is not None:
                note(session, obj.job_id, obj.id)

    @sa_event.listens_for(sessions, "after_commit")
    def _publish(session: Session) -> None:
        jobs = session.info.pop(_NOTED, None)
        if jobs:
            try:
                notifier.publish(jobs)
            except Exception:  # never a transition's failure
                log.exception("event notification failed")

    @sa_event.listens_for(sessions, "after_rollback")
    def _forget(session: Session) -> None:
        session.info.pop(_NOTED, None)
