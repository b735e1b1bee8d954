"""Deleting and expiring what genq keeps: jobs and their outputs, uploaded
files, fine-tuned models.

A row that owns objects in storage goes (or, for outputs, its `output` is
cleared) in one transaction with a `StorageDelete` row naming what it owned.
The objects are removed after the commit, then that row. A crash in between
leaves the `StorageDelete` row behind, and the next sweep finishes the work
(retried with a growing pause while storage refuses). Storage deletes are
idempotent, so two sweepers, or a sweeper and an API process racing for the
same row, do no harm.

Retention: a finished job's outputs go `output_retention_seconds` after it
ended (the row stays, `output` null, `expired_at` set), its row (with its
events and webhook deliveries, by cascade) `job_retention_seconds` after it
ended, an uploaded file `file_retention_seconds` after its upload unless a
queued or running fine-tune uses it. 0 keeps. An admin can set a tenant's own
values (`tenants.retention`); the sweep reads them fresh on every round.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import NamedTuple

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from genq.errors import IllegalTransition
from genq.schema import File, Job, ModelVersion, StorageDelete, Tenant, utcnow
from genq.settings import Settings
from genq.states import TERMINAL, JobStatus, JobType

log = logging.getLogger(__name__)

KINDS = ("outputs", "jobs", "files")
# A failed storage delete waits this long times 2**attempts, at most MAX_PAUSE.
FIRST_PAUSE, MAX_PAUSE = 10.0, 3600.0
_TERMINAL = tuple(s.value for s in TERMINAL)


def defaults(settings: Settings) -> dict[str, int]:
    return {"outputs": settings.output_retention_seconds, "jobs": settings.job_retention_seconds,
            "files": settings.file_retention_seconds}


def effective(settings: Settings, override: dict | None) -> dict[str, int]:
    """The tenant's retention: its own values where an admin set them, else the settings'."""
    found = defaults(settings)
    found.update({k: int(v) for k, v in (override or {}).items() if k in KINDS and v is not None})
    return found


def expires_at(since: dt.datetime | None, seconds: int) -> dt.datetime | None:
    """When something `since` then goes, or None (not started its clock, or kept)."""
    if since is None or not seconds:
        return None
    return since + dt.timedelta(seconds=seconds)


# --- deletes -----------------------------------------------------------------

def owe(session: Session, *keys: str) -> list[StorageDelete]:
    """Record, in the caller's transaction, storage to delete after it commits."""
    rows = [StorageDelete(key=k) for k in keys]
    session.add_all(rows)
    session.flush()
    return rows


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def delete_job(session: Session, job: Job) -> list[int]:
    """Remove a finished job: its row (events and webhook deliveries go with it)
    and, after the commit, its outputs. A job that has not ended is refused:
    it must be canceled first. Returns the storage deletes owed."""
    if job.status not in _TERMINAL:
        raise IllegalTransition(f"job {job.id} is {job.status}: cancel it first (POST /v1/jobs/{job.id}/cancel), "
                                "then delete it once it has ended")
    owed = owe(session, job_prefix(job.id))
    session.execute(delete(Job).where(Job.id == job.id))
    return [o.id for o in owed]


def fine_tunes_using(session: Session, file_id: str) -> list[str]:
    """Ids of queued or running fine-tunes that train on `file_id` or validate on it."""
    return list(session.scalars(select(Job.id).where(
        Job.type == JobType.FINE_TUNE.value,
        Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)),
        or_(Job.input["training_file"].as_string() == file_id,
            Job.input["validation_file"].as_string() == file_id))))


def delete_file(session: Session, f: File) -> list[int]:
    """Remove an uploaded file, unless a queued or running fine-tune uses it."""
    using = fine_tunes_using(session, f.id)
    if using:
        raise IllegalTransition(f"file {f.id} is the training or validation file of fine-tune job(s) {using} that "
                                "have not ended: cancel them or wait for them, then delete the file")
    owed = owe(session, f.storage_key)
    session.execute(delete(File).where(File.id == f.id))
    return [o.id for o in owed]


def delete_model(session: Session, version: ModelVersion) -> list[int]:
    """Remove a fine-tuned model: its weights and its fine-tune's checkpoints.
    Jobs still queued for it fail when a worker reaches them (unknown model)."""
    owed = owe(session, f"{version.storage_prefix.rstrip('/')}/", f"jobs/{version.job_id}/checkpoints/")
    session.execute(delete(ModelVersion).where(ModelVersion.id == version.id))
    return [o.id for o in owed]


def settle_deletes(sessions, storage, ids: list[int] | None = None, limit: int = 500,
                   now: dt.datetime | None = None) -> int:
    """Carry out the storage deletes owed (those `ids`, or every due one, up to
    `limit`): each row goes once its objects are gone; a failure is kept for a
    later try. Returns how many were done."""
    now = now or utcnow()
    with sessions() as session:
        query = select(StorageDelete.id, StorageDelete.key, StorageDelete.attempts)
        query = query.where(StorageDelete.id.in_(ids)) if ids is not None else \
            query.where(StorageDelete.next_attempt_at <= now).order_by(StorageDelete.next_attempt_at)
        owed = list(session.execute(query.limit(limit)))
    done = 0
    for row in owed:
        try:
            storage.delete(row.key)
        except Exception as exc:
            pause = min(MAX_PAUSE, FIRST_PAUSE * 2 ** row.attempts)
            log.warning("deleting %r from storage failed (%s); trying again in %.0fs", row.key, exc, pause)
            with sessions.begin() as session:
                session.execute(update(StorageDelete).where(StorageDelete.id == row.id).values(
                    attempts=StorageDelete.attempts + 1, last_error=str(exc)[:500],
                    next_attempt_at=utcnow() + dt.timedelta(seconds=pause)))
            continue
        with sessions.begin() as session:
            session.execute(delete(StorageDelete).where(StorageDelete.id == row.id))
        done += 1
    return done


# --- the sweep ---------------------------------------------------------------

def sweep(sessions, storage, settings: Settings, now: dt.datetime | None = None) -> dict[str, int]:
    """One round of retention: expire outputs, job rows and files past their
    time, in transactions of at most `sweep_batch` rows, then carry out the
    storage deletes owed. Returns counts by kind."""
    now = now or utcnow()
    batch = settings.sweep_batch
    with sessions() as session:
        overrides = {tid: own for tid, own in session.execute(
            select(Tenant.id, Tenant.retention).where(Tenant.retention.is_not(None))) if own}
    # Who is swept by which values: each tenant with its own, the rest by the settings'.
    groups: list[tuple[Whose, dict[str, int]]] = [(Whose(None, tuple(overrides)), defaults(settings))]
    groups += [(Whose(tid, ()), effective(settings, override)) for tid, override in overrides.items()]
    counts = dict.fromkeys(KINDS, 0)
    for who, seconds in groups:
        counts["outputs"] += _expire_outputs(sessions, who, seconds["outputs"], now, batch)
        counts["jobs"] += _expire_jobs(sessions, who, seconds["jobs"], now, batch)
        counts["files"] += _expire_files(sessions, who, seconds["files"], now, batch)
    counts["storage"] = 0
    # Debts written just now are due too (a `now` given in the past would not reach them).
    due = max(now, utcnow())
    while (done := settle_deletes(sessions, storage, limit=batch, now=due)):
        counts["storage"] += done
        if done < batch:
            break
    if any(counts.values()):
        log.info("retention sweep: %s", counts)
    return counts


class Whose(NamedTuple):
    """The tenants a sweep step covers: one (`tenant`), or all but `others`."""

    tenant: str | None
    others: tuple[str, ...]


def _whose(column, who: Whose) -> list:
    if who.tenant is not None:
        return [column == who.tenant]
    return [column.not_in(list(who.others))] if who.others else []


def _expire_outputs(sessions, who, seconds: int, now: dt.datetime, batch: int) -> int:
    if not seconds:
        return 0
    cutoff, total = now - dt.timedelta(seconds=seconds), 0
    while True:
        with sessions.begin() as session:
            ids = list(session.scalars(select(Job.id).where(
                Job.completed_at.is_not(None), Job.completed_at < cutoff, Job.expired_at.is_(None),
                Job.status.in_(_TERMINAL), *_whose(Job.tenant_id, who)).limit(batch)))
            if not ids:
                return total
            session.execute(update(Job).where(Job.id.in_(ids), Job.expired_at.is_(None))
                            .values(output=None, expired_at=now, updated_at=now)
                            .execution_options(synchronize_session=False))
            owe(session, *(job_prefix(i) for i in ids))
        total += len(ids)
        if len(ids) < batch:
            return total


def _expire_jobs(sessions, who, seconds: int, now: dt.datetime, batch: int) -> int:
    if not seconds:
        return 0
    cutoff, total = now - dt.timedelta(seconds=seconds), 0
    while True:
        with sessions.begin() as session:
            rows = list(session.execute(select(Job.id, Job.expired_at).where(
                Job.completed_at.is_not(None), Job.completed_at < cutoff, Job.status.in_(_TERMINAL),
                *_whose(Job.tenant_id, who)).limit(batch)))
            if not rows:
                return total
            # Outputs already expired owe nothing more; the rest go with the row.
            owe(session, *(job_prefix(r.id) for r in rows if r.expired_at is None))
            session.execute(delete(Job).where(Job.id.in_([r.id for r in rows]))
                            .execution_options(synchronize_session=False))
        total += len(rows)
        if len(rows) < batch:
            return total


def _expire_files(sessions, who, seconds: int, now: dt.datetime, batch: int) -> int:
    if not seconds:
        return 0
    cutoff, total, kept = now - dt.timedelta(seconds=seconds), 0, set()
    while True:
        with sessions.begin() as session:
            files = list(session.scalars(select(File).where(
                File.created_at < cutoff, File.id.not_in(list(kept)) if kept else and_(),
                *_whose(File.tenant_id, who)).limit(batch)))
            if not files:
                return total
            gone = []
            for f in files:
                if fine_tunes_using(session, f.id):
                    kept.add(f.id)  # in use: it goes once its fine-tunes have ended
                else:
                    gone.append(f)
            owe(session, *(f.storage_key for f in gone))
            if gone:
                session.execute(delete(File).where(File.id.in_([f.id for f in gone]))
                                .execution_options(synchronize_session=False))
        total += len(gone)
        if len(files) < batch:
            return total
