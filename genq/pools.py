"""Pools and workers as operators see them: pause and resume a pool, the
workers' heartbeats and drain requests, and each pool's queue at a glance.

Pools themselves live in the registry (a pool is a Celery queue plus the
models assigned to it); the database only holds what operators switch and
what workers report, so a pause survives every restart.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq.errors import IllegalTransition
from genq.jobs import queued_heads, record_event, transition
from genq.schema import Job, Pool, Worker, utcnow
from genq.states import JobStatus

# A worker silent for this many heartbeat intervals is listed as gone.
MISSED_BEATS = 3
# Throughput is counted over this window.
THROUGHPUT_WINDOW = dt.timedelta(minutes=5)


def set_paused(session: Session, name: str, paused: bool, now: dt.datetime | None = None) -> Pool:
    now = now or utcnow()
    pool = session.get(Pool, name) or Pool(name=name, paused=False)
    if pool.paused != paused:
        pool.paused_at = now if paused else None
    pool.paused = paused
    pool.updated_at = now
    session.add(pool)
    session.flush()
    return pool


def resume(session: Session, name: str) -> list[tuple[str, str]]:
    """Unpause a pool; returns the doorbells to ring once committed (doorbells
    that arrived while it was paused were dropped: the rows are the truth)."""
    set_paused(session, name, False)
    return queued_heads(session, [name])


def paused_pools(session: Session) -> set[str]:
    return set(session.scalars(select(Pool.name).where(Pool.paused.is_(True))))


def heartbeat(session: Session, name: str, pools: list[str], now: dt.datetime | None = None,
              model_errors: dict[str, str] | None = None) -> bool:
    """Record that worker `name` is alive, and the models it could not load;
    returns whether it has been asked to drain."""
    now = now or utcnow()
    worker = session.get(Worker, name)
    if worker is None:
        worker = Worker(name=name, pools=",".join(pools), hostname=socket.gethostname(), pid=os.getpid(),
                        started_at=now, draining=False)
        session.add(worker)
    worker.last_seen_at = now
    worker.model_errors = dict(model_errors) if model_errors else None
    session.flush()
    return worker.draining


def is_draining(session: Session, name: str) -> bool:
    if not name:
        return False
    return bool(session.scalar(select(Worker.draining).where(Worker.name == name)))


def request_drain(session: Session, name: str, now: dt.datetime | None = None) -> Worker | None:
    """Ask a worker to finish what it runs and claim nothing new. None if no
    worker of that name has ever reported."""
    worker = session.get(Worker, name)
    if worker is None:
        return None
    if not worker.draining:
        worker.draining, worker.drain_requested_at = True, now or utcnow()
    session.flush()
    return worker


def retry(session: Session, job: Job, now: dt.datetime | None = None) -> Job:
    """A failed job goes back to the queue with a fresh set of attempts; the
    caller rings its doorbell after the commit."""
    now = now or utcnow()
    done = session.execute(transition(
        JobStatus.FAILED, JobStatus.QUEUED, Job.id == job.id, attempts=0, error=None, output=None, progress=None,
        lease_owner=None, lease_until=None, started_at=None, completed_at=None, cancel_requested=False, updated_at=now,
    )).rowcount
    if not done:
        raise IllegalTransition(f"job {job.id} is {job.status}; only a failed job can be retried")
    record_event(session, job.id, "queued", {"retry": True}, at=now)
    session.flush()
    session.refresh(job)
    return job


def owner_worker(lease_owner: str) -> str:
    """The worker name in a lease owner ("<worker name>:<pid>:<random>")."""
    return lease_owner.split(":", 1)[0]


def workers(session: Session, heartbeat_interval: float, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    now = now or utcnow()
    running: dict[str, int] = {}
    for owner, count in session.execute(select(Job.lease_owner, func.count()).where(
            Job.status == JobStatus.RUNNING.value).group_by(Job.lease_owner)).all():
        if owner:
            running[owner_worker(owner)] = running.get(owner_worker(owner), 0) + count
    gone_after = dt.timedelta(seconds=MISSED_BEATS * heartbeat_interval)
    out = []
    for w in session.scalars(select(Worker).order_by(Worker.name)):
        alive = now - w.last_seen_at <= gone_after
        out.append({"name": w.name, "pools": [p for p in w.pools.split(",") if p], "hostname": w.hostname,
                    "pid": w.pid, "alive": alive, "draining": w.draining, "running_jobs": running.get(w.name, 0),
                    "model_errors": w.model_errors or {},
                    "started_at": w.started_at, "last_seen_at": w.last_seen_at,
                    "drain_requested_at": w.drain_requested_at})
    return out


def forget_gone_workers(session: Session, older_than: dt.datetime) -> int:
    """Rows of workers not seen since `older_than` (a scaled-down replica)."""
    from sqlalchemy import delete

    return session.execute(delete(Worker).where(Worker.last_seen_at < older_than)).rowcount


def stats(session: Session, pools: dict[str, list[str]], heartbeat_interval: float,
          now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Per pool: paused, its models, jobs queued and running, the oldest queued
    job's age, live workers, and jobs finished over the last minutes."""
    now = now or utcnow()
    names = sorted(set(pools) | set(session.scalars(select(Pool.name))))
    counts: dict[tuple[str, str], int] = {
        (p, s): n for p, s, n in session.execute(
            select(Job.pool, Job.status, func.count()).where(
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])).group_by(Job.pool, Job.status))}
    oldest = dict(session.execute(select(Job.pool, func.min(Job.created_at))
                                  .where(Job.status == JobStatus.QUEUED.value).group_by(Job.pool)).all())
    since = now - THROUGHPUT_WINDOW
    finished = dict(session.execute(select(Job.pool, func.count()).where(
        Job.completed_at >= since, Job.status == JobStatus.SUCCEEDED.value).group_by(Job.pool)).all())
    paused = {p.name: p for p in session.scalars(select(Pool))}
    live = [w for w in workers(session, heartbeat_interval, now) if w["alive"]]
    out = []
    # Models of a pool that a live worker of it could not load, with the reason.
    errors: dict[str, dict[str, str]] = {}
    for w in live:
        for model, reason in w["model_errors"].items():
            for pool in w["pools"]:
                if model in pools.get(pool, []):
                    errors.setdefault(pool, {})[model] = reason
    for name in names:
        first = oldest.get(name)
        if first is not None and first.tzinfo is None:  # SQLite's aggregate loses the type decorator
            first = first.replace(tzinfo=dt.timezone.utc)
        if isinstance(first, str):
            first = dt.datetime.fromisoformat(first).replace(tzinfo=dt.timezone.utc)
        row = paused.get(name)
        out.append({
            "name": name, "models": sorted(pools.get(name, [])), "paused": bool(row and row.paused),
            "paused_at": row.paused_at if row else None,
            "queued": counts.get((name, JobStatus.QUEUED.value), 0),
            "running": counts.get((name, JobStatus.RUNNING.value), 0),
            "oldest_queued_seconds": round(max((now - first).total_seconds(), 0.0), 3) if first else None,
            "workers": sum(1 for w in live if name in w["pools"]),
            "succeeded_last_5m": finished.get(name, 0),
            "throughput_per_minute": round(finished.get(name, 0) / (THROUGHPUT_WINDOW.total_seconds() / 60), 3),
            "model_errors": errors.get(name, {}),
        })
    return out
