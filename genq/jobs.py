"""Job lifecycle on the record of truth: submit, claim under a lease, progress,
cancel and finish. Plain functions over a Session; callers commit.

Every status change is made by `transition`: checked against the state table
(genq.states), and a conditional UPDATE (on the current status, and for a
worker on the lease it holds), so a stale or duplicate Celery message, or a
worker whose lease has expired, changes nothing.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
from collections import namedtuple
from typing import Any, Iterable, NamedTuple

from sqlalchemy import JSON, Update, and_, bindparam, cast, func, insert, literal_column, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, make_transient_to_detached

from psycopg.types.json import Json

from genq import keys, line, notify, tracing, webhooks
from genq.errors import IllegalTransition
from genq.schema import Job, JobEvent, new_id, utcnow
from genq.states import JobStatus, check_transition

log = logging.getLogger(__name__)


def transition(current: JobStatus, new: JobStatus, *where, **values) -> Update:
    """The one way a job's status changes. The state table must allow it
    (genq.states.ALLOWED; IllegalTransition otherwise), and it is a
    conditional UPDATE: on the current status, and on whatever else the
    caller holds (`where`: the jobs, a worker's lease), so a change that lost
    a race changes nothing. Returns the statement, for the caller to execute
    (adding `.returning(...)` where it needs the rows)."""
    check_transition(current, new)
    return update(Job).where(Job.status == current.value, *where).values(status=new.value, **values)


def record_event(session: Session, job_id: str, type_: str, data: dict | None = None, at: dt.datetime | None = None) -> None:
    session.add(JobEvent(job_id=job_id, type=type_, data=data or {}, at=at or utcnow()))


_EVENTS = JobEvent.__table__
_INSERT_EVENTS = insert(_EVENTS).returning(_EVENTS.c.id, _EVENTS.c.job_id, sort_by_parameter_order=True)


def record_events(session: Session, events: list[dict]) -> None:
    """Write `events` (dicts of job_id, type, data, at) in one Core INSERT, and
    note them for the commit's notifications (genq.notify.note). A batch's
    finishes gather their events here: the ORM's unit of work for the same
    rows cost more than the finishes' statements, on the worker's interpreter
    beside the decode."""
    if not events:
        return
    for event_id, job_id in session.execute(_INSERT_EVENTS, events):
        notify.note(session, job_id, event_id)


# A job by id and owner, in one statement with no ORM between the row and its
# reader (the poll's one round trip). Built once; SQLAlchemy caches it compiled.
# Only the columns a job's answer shows (genq.serialize) and its ETag: each
# column read costs the driver a description per statement.
SHOWN = tuple(c for c in Job.__table__.c if c.name not in ("tenant_id", "pool", "batch_key", "batch_model",
                                                            "max_attempts",
                                                            "batch_id", "batch_line",
                                                            "lease_owner", "lease_until", "trace_context"))
_OWN_JOB = select(*SHOWN).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))


def read_own(conn, job_id: str, tenant_id: str):
    """The job's row (attributes as a Job's) if `tenant_id` owns it, else None."""
    return conn.execute(_OWN_JOB, {"job_id": job_id, "tenant_id": tenant_id}).first()


# The same statement for psycopg itself (Postgres), compiled once by SQLAlchemy.
_OWN_JOB_SQL = str(_OWN_JOB.compile(dialect=postgresql.psycopg.dialect()))
JobRow = namedtuple("JobRow", [c.name for c in SHOWN])


def read_own_driver(conn, job_id: str, tenant_id: str) -> JobRow | None:
    """read_own on a psycopg connection (api.context.Context.driver): a
    prepared statement, its row as a JobRow (the same attributes, the same
    values: psycopg decodes JSON and timestamps either way)."""
    with conn.cursor() as cur:
        cur.execute(_OWN_JOB_SQL, {"job_id": job_id, "tenant_id": tenant_id}, prepare=True)
        row = cur.fetchone()
    return None if row is None else JobRow._make(row)


# A job and its `queued` event, one statement (Postgres), built once: the
# event's INSERT takes the job's id and time from the job's, in a CTE.
_NEW_JOB = insert(Job.__table__).values({c.name: bindparam(c.name, type_=c.type) for c in Job.__table__.c}) \
    .returning(Job.__table__.c.id, Job.__table__.c.created_at).cte("new_job")
# The event's constants are inline SQL, not parameters: the statement's only
# parameters are the job's columns (submit_pipelined passes them to psycopg).
_QUEUED_EVENT = (literal_column("'queued'"), cast(literal_column("'{}'"), JobEvent.data.type))
_SUBMIT = insert(JobEvent.__table__).from_select(
    ["job_id", "type", "data", "at"],
    select(_NEW_JOB.c.id, *_QUEUED_EVENT, _NEW_JOB.c.created_at))


# The same, only while the tenant has fewer than :most jobs queued or running:
# the count and the insert in one statement, which returns the count (the
# job is inserted if and only if it is below :most). Counted no further than
# :most rows (ix_jobs_tenant_status). Run it after locking the tenant's row
# (genq.keys.lock_tenant) in an earlier statement of the transaction: under
# READ COMMITTED this statement's snapshot then sees every job a concurrent
# submit committed before the lock was granted.
_ACTIVE = select(func.count().label("n")).select_from(
    select(Job.__table__.c.id).where(Job.__table__.c.tenant_id == bindparam("tenant_id"),
                                     Job.__table__.c.status.in_([literal_column(f"'{s.value}'")
                                                                 for s in (JobStatus.QUEUED, JobStatus.RUNNING)]),
                                     # A batch's jobs are not counted: the batch is bounded on its own (genq.batches).
                                     Job.__table__.c.batch_id.is_(None))
    .limit(bindparam("most")).subquery()).cte("active")
_NEW_JOB_BELOW = insert(Job.__table__).from_select(
    [c.name for c in Job.__table__.c],
    select(*[bindparam(c.name, type_=c.type) for c in Job.__table__.c]).select_from(_ACTIVE)
    .where(_ACTIVE.c.n < bindparam("most"))) \
    .returning(Job.__table__.c.id, Job.__table__.c.created_at).cte("new_job")
_SUBMIT_BELOW = select(_ACTIVE.c.n).add_cte(insert(JobEvent.__table__).from_select(
    ["job_id", "type", "data", "at"],
    select(_NEW_JOB_BELOW.c.id, *_QUEUED_EVENT, _NEW_JOB_BELOW.c.created_at)).cte("new_event"))


class TooManyActive(Exception):
    """The tenant already has `active` jobs queued or running, the most allowed."""

    def __init__(self, active: int):
        super().__init__(active)
        self.active = active


def count_active(session: Session, tenant_id: str, most: int) -> int:
    """A tenant's jobs queued or running, counted no further than `most`."""
    return session.connection().scalar(select(_ACTIVE.c.n), {"tenant_id": tenant_id, "most": most})


def new_job_values(*, tenant_id: str, type_: str, model: str, pool: str, batch_key: str, input_: dict[str, Any],
                   priority: int = 0, webhook: str | None = None, webhook_events_filter: list[str] | None = None,
                   max_attempts: int = 3, batch_model: str | None = None) -> dict[str, Any]:
    """Every column of a job about to be submitted, queued now. `batch_model`:
    the loaded model its batch runs on (ModelSpec.batch_model), the model itself by default."""
    now = utcnow()
    return dict(id=new_id(), tenant_id=tenant_id, type=type_, model=model, batch_model=batch_model or model,
                pool=pool, batch_key=batch_key,
                status=JobStatus.QUEUED.value, input=input_, output=None, error=None, progress=None,
                priority=priority, attempts=0, max_attempts=max_attempts, cancel_requested=False,
                lease_owner=None, lease_until=None, webhook=webhook,
                webhook_events_filter=webhook_events_filter or ["completed"], metrics={}, created_at=now,
                started_at=None, completed_at=None, updated_at=now, expired_at=None,
                trace_context=tracing.carrier(), batch_id=None, batch_line=None)


# submit_pipelined's statements, for psycopg itself, compiled once by SQLAlchemy.
_PG = postgresql.psycopg.dialect()
_SUBMIT_SQL = str(_SUBMIT.compile(dialect=_PG))
_SUBMIT_BELOW_SQL = str(_SUBMIT_BELOW.compile(dialect=_PG))
_LOCK_TENANT_SQL = str(keys._LOCK_TENANT.compile(dialect=_PG))
_JSON_COLUMNS = frozenset(c.name for c in Job.__table__.c if isinstance(c.type, JSON))


def submit_pipelined(conn, values: dict[str, Any], max_active: int = 0) -> Job:
    """submit() as a transaction of its own on a psycopg connection (Postgres,
    not in autocommit), `values` from new_job_values: BEGIN, the tenant's lock
    (with `max_active`), the count-and-insert and COMMIT go to Postgres in one
    pipeline. The tenant's row is then locked only while the server runs the
    insert and the commit, never across a round trip to this process or its
    wait for the GIL: concurrent submits of one tenant queue on that lock, and
    the time each holds it bounds their rate. The same statements as submit's,
    the same guarantees; the caller publishes the notification (none is hooked
    here). Raises TooManyActive (nothing inserted) as submit does."""
    params = {k: Json(v) if k in _JSON_COLUMNS and v is not None else v for k, v in values.items()}
    with conn.pipeline():
        if max_active:
            conn.execute(_LOCK_TENANT_SQL, {"tenant_id": values["tenant_id"]})
            counted = conn.execute(_SUBMIT_BELOW_SQL, {**params, "most": max_active})
        else:
            conn.execute(_SUBMIT_SQL, params)
        # Committed whatever the count said: at or past the quota the insert inserted nothing.
        conn.commit()
    if max_active and (active := counted.fetchone()[0]) >= max_active:
        raise TooManyActive(active)
    job = Job(**values)
    make_transient_to_detached(job)
    return job


def submit(
    session: Session,
    *,
    tenant_id: str,
    type_: str,
    model: str,
    pool: str,
    batch_key: str,
    input_: dict[str, Any],
    priority: int = 0,
    webhook: str | None = None,
    webhook_events_filter: list[str] | None = None,
    max_attempts: int = 3,
    max_active: int = 0,
    batch_model: str | None = None,
) -> Job:
    """Insert a queued job and its `queued` event in the caller's transaction:
    one statement on Postgres (the event's INSERT takes the job's from a CTE),
    two on SQLite, and no ORM unit of work. The Job returned is in the session
    as if loaded from it, so a caller may change or refresh it.

    With `max_active`, only while the tenant has fewer jobs queued or running
    (else TooManyActive, nothing inserted); lock the tenant's row first
    (genq.keys.lock_tenant). On Postgres the count is part of the one statement."""
    values = new_job_values(tenant_id=tenant_id, type_=type_, model=model, pool=pool, batch_key=batch_key,
                            input_=input_, priority=priority, webhook=webhook,
                            webhook_events_filter=webhook_events_filter, max_attempts=max_attempts,
                            batch_model=batch_model)
    now = values["created_at"]
    # Core on the session's connection: the ORM's bulk path would coerce every value anew.
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        if max_active:
            active = conn.scalar(_SUBMIT_BELOW, {**values, "most": max_active})
            if active >= max_active:
                raise TooManyActive(active)
        else:
            conn.execute(_SUBMIT, values)
    else:  # SQLite has no INSERT in a CTE
        if max_active and (active := count_active(session, tenant_id, max_active)) >= max_active:
            raise TooManyActive(active)
        conn.execute(insert(Job.__table__), values)
        conn.execute(insert(JobEvent.__table__), {"job_id": values["id"], "type": "queued", "data": {}, "at": now})
    # Its queued event went in by Core, unseen by the notify hook's flush.
    notify.note(session, values["id"])
    job = Job(**values)
    make_transient_to_detached(job)
    session.add(job)
    return job


def cancel(session: Session, job: Job) -> Job:
    """Queued: canceled now. Running: flag it; the worker stops it at its next step.
    Terminal: IllegalTransition (the API answers 409)."""
    now = utcnow()
    if job.status == JobStatus.QUEUED.value:
        done = session.execute(transition(JobStatus.QUEUED, JobStatus.CANCELED, Job.id == job.id,
                                          cancel_requested=True, completed_at=now, updated_at=now)).rowcount
        if done:
            record_event(session, job.id, "completed", {"status": "canceled"}, at=now)
            session.flush()
            session.refresh(job)
            webhooks.enqueue(session, job, "completed", now=now)
            return job
        session.refresh(job)  # a worker claimed it meanwhile: fall through to running
    if job.status == JobStatus.RUNNING.value:
        session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING.value).values(cancel_requested=True, updated_at=now)
        )
        # No event, but a change polls show: API processes drop their cached ETag (api/pollcache.py).
        notify.note(session, job.id)
        session.flush()
        session.refresh(job)
        return job
    raise IllegalTransition(f"job {job.id} is already {job.status} and cannot be canceled")


def queued_pool(session: Session, job_id: str) -> str | None:
    """The pool of a job a doorbell names, or None if it is no longer queued."""
    row = session.execute(select(Job.pool, Job.status).where(Job.id == job_id)).first()
    if row is None or row.status != JobStatus.QUEUED.value:
        return None
    return row.pool


class Head(NamedTuple):
    """The first job in a pool's line: what the next batch is built around."""

    id: str
    model: str
    batch_key: str
    type: str
    # What its batch runs on: its model, or the base its LoRA adapter is served on.
    batch_model: str


def pool_head(session: Session, pool: str) -> Head | None:
    """The pool's first claimable job in line (genq.line), or None when none
    is (an empty or paused pool)."""
    row = line.head(session, pool)
    return Head(*row) if row else None


def claim_batch(
    session: Session,
    *,
    model: str,
    batch_key: str,
    limit: int,
    owner: str,
    lease_seconds: float,
    pool: str | None = None,
    first: str | None = None,
    now: dt.datetime | None = None,
    top_up: bool = False,
    only_model: str | None = None,
) -> list[Job]:
    """Take up to `limit` queued jobs of one batch model and batch key under a lease,
    in line (genq.line: tenants take turns, each tenant's jobs by priority
    then age). A worker passes the pool it serves and the pool's head the
    batch is built around (`first`), which leads the batch if still queued.
    Jobs of a paused pool are not claimable: they wait, queued, for a resume.

    The chosen rows are then locked with SKIP LOCKED, so two workers on
    Postgres never wait on (or take) the same rows: where another worker is
    claiming them at this moment, the next ones in line are taken. The status
    check in the UPDATE makes the claim safe on SQLite too, where writers are
    serialised (and FOR UPDATE is not a thing).

    A job on its second or later attempt lost its last worker, and may be what
    killed it: it is claimed alone, so a poison job takes no batch-mates down
    with it (and fails alone after max_attempts). `top_up` fills a batch
    already claimed: only jobs on their first attempt join it.

    `model` is matched against the jobs' batch model (genq.schema.Job): a
    model's own jobs, and where it is a base serving LoRA adapters, those of
    its fine-tunes too. `only_model` keeps to the jobs of one model exactly."""
    now = now or utcnow()
    passed_over: set[str] = set()
    while True:
        rows = line.batch(session, model=model, batch_key=batch_key, limit=limit, pool=pool, first=first,
                          passed_over=passed_over, only_model=only_model)
        if not rows:
            return []
        free = set(session.scalars(
            select(Job.id).where(Job.id.in_([r.id for r in rows]), Job.status == JobStatus.QUEUED.value)
            .with_for_update(skip_locked=True)))
        if free:
            rows = [r for r in rows if r.id in free]
            break
        passed_over.update(r.id for r in rows)
    if rows[0].attempts > 0 and not top_up:
        ids = [rows[0].id]
    else:
        ids = [r.id for r in rows if r.attempts == 0]
    if not ids:
        return []
    # The claimed rows come back from the UPDATE itself: no second read.
    jobs = list(
        session.scalars(
            transition(JobStatus.QUEUED, JobStatus.RUNNING, Job.id.in_(ids), lease_owner=owner,
                       lease_until=now + dt.timedelta(seconds=lease_seconds), attempts=Job.attempts + 1,
                       started_at=now, updated_at=now)
            .returning(Job)
            .execution_options(populate_existing=True, synchronize_session=False)
        )
    )
    # RETURNING gives rows in whatever order the update visited them: put the
    # batch back in line order, so rows and start events follow the line.
    place = {job_id: k for k, job_id in enumerate(ids)}
    jobs.sort(key=lambda job: place[job.id])
    for job in jobs:
        record_event(session, job.id, "start", {"attempt": job.attempts, "worker": owner}, at=now)
        webhooks.enqueue(session, job, "start", now=now)
    order = {jid: i for i, jid in enumerate(ids)}
    return sorted(jobs, key=lambda j: order[j.id])


def _held(job_id: str, owner: str):
    return and_(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.lease_owner == owner)


def renew_leases(session: Session, job_ids: Iterable[str], owner: str, lease_seconds: float) -> set[str]:
    """Extend the lease on jobs this worker still holds; returns those it holds."""
    now = utcnow()
    ids = list(job_ids)
    if not ids:
        return set()
    held = session.scalars(
        update(Job)
        .where(Job.id.in_(ids), Job.status == JobStatus.RUNNING.value, Job.lease_owner == owner)
        .values(lease_until=now + dt.timedelta(seconds=lease_seconds))
        .returning(Job.id)
    )
    return set(held)


def hand_back(session: Session, job_ids: Iterable[str], owner: str, reason: str, counted: bool = False) -> list[str]:
    """Running jobs this worker holds go back to the queue. By default without
    counting the attempt: the worker is shutting down, the job did nothing
    wrong. `counted` keeps the attempt (its outputs could not be stored), so
    a job that keeps coming back ends after max_attempts; the caller fails it
    on its last one rather than hand it back. Returns the ids handed back
    (those whose lease the worker still held)."""
    ids = list(job_ids)
    if not ids:
        return []
    now = utcnow()
    back = list(session.scalars(
        transition(JobStatus.RUNNING, JobStatus.QUEUED, Job.id.in_(ids), Job.lease_owner == owner,
                   lease_owner=None, lease_until=None, attempts=Job.attempts - (0 if counted else 1), updated_at=now)
        .returning(Job.id)
    ))
    for job_id in back:
        record_event(session, job_id, "log", {"message": reason, "worker": owner}, at=now)
    return back


def json_safe(job_id: str, name: str, value: Any) -> Any:
    """`value` with every non-finite number (NaN, ±infinity) made null, and a
    warning naming where each was. JSON has no such numbers: SQLite stores them
    as bare `NaN`, which every reader but Python rejects, and Postgres refuses
    the whole write. Null rather than an error, because refusing a job's final
    write would leave it running until its lease lapsed and then run it again,
    blaming a dead worker; a number a model could not compute is no number."""
    bad: list[str] = []
    clean = _finite(value, name, bad)
    if bad:
        log.warning("job %s: non-finite numbers written as null at %s", job_id, ", ".join(bad[:10]),
                    extra={"job_id": job_id})
    return clean


def _finite(value: Any, path: str, bad: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    return value


def set_progress(session: Session, job_id: str, owner: str, progress: dict[str, Any]) -> bool:
    progress = json_safe(job_id, "progress", progress)
    # The job's webhook comes back with the update: a job with no progress
    # webhook (most) costs this one statement, not a read of its whole row for
    # the delivery check too (a running batch writes every row's progress each
    # second, on the worker's interpreter beside the decode). No autoflush: the
    # events of a batch's rows go in one insert at the commit.
    with session.no_autoflush:
        hook = session.execute(
            update(Job).where(_held(job_id, owner)).values(progress=progress)
            .returning(Job.webhook, Job.webhook_events_filter).execution_options(synchronize_session=False)
        ).first()
    if hook is None:
        return False
    record_event(session, job_id, "progress", progress)
    if hook.webhook and "progress" in (hook.webhook_events_filter or webhooks.DEFAULT_EVENTS):
        webhooks.enqueue(session, job_id, "progress")
    return True


def cancel_requested(session: Session, job_ids: Iterable[str]) -> set[str]:
    ids = list(job_ids)
    if not ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.cancel_requested.is_(True))))


def finish(
    session: Session,
    job_id: str,
    owner: str,
    status: JobStatus,
    *,
    output: dict | None = None,
    error: dict | None = None,
    metrics: dict | None = None,
    progress: dict | None = None,
    webhook: bool = True,
    events: list[dict] | None = None,
) -> bool:
    """Write a job's final state, only while `owner` holds its lease. Returns
    False (and writes nothing) when the lease was lost: the write does not count.

    `webhook=False` says the caller knows the job has no webhook (it is fixed
    at submit): the delivery check, a read of the whole row, is skipped, and
    the batch's events go to the database in one insert at the commit.
    `events`: the job's events are appended there for the caller to write
    with record_events (a batch's in one statement), not added to the session."""
    now = utcnow()
    output, error = json_safe(job_id, "output", output), json_safe(job_id, "error", error)
    metrics, progress = json_safe(job_id, "metrics", metrics), json_safe(job_id, "progress", progress)
    values: dict[str, Any] = dict(output=output, error=error, completed_at=now, updated_at=now, lease_until=None)
    if metrics is not None:
        values["metrics"] = metrics
    if progress is not None:
        values["progress"] = progress
    # No autoflush: the events of the jobs finished before this one in the same
    # transaction stay pending and go in one insert at the commit, rather than
    # one round trip per job. No Job object of this session is read after a
    # finish, so none needs synchronising with the update.
    with session.no_autoflush:
        done = session.execute(
            transition(JobStatus.RUNNING, status, Job.id == job_id, Job.lease_owner == owner, **values)
            .execution_options(synchronize_session=False)
        ).rowcount
    if done:
        data = {"status": status.value}
        if error:
            data["error"] = error
        written = ([dict(job_id=job_id, type="output", data=output, at=now)] if output is not None else []) + \
            [dict(job_id=job_id, type="completed", data=data, at=now)]
        if events is not None:
            events.extend(written)
        else:
            for e in written:
                record_event(session, e["job_id"], e["type"], e["data"], at=e["at"])
        if webhook:
            webhooks.enqueue(session, job_id, "completed", now=now)
    return bool(done)


def events(session: Session, job_id: str, after_id: int = 0) -> list[JobEvent]:
    return list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id))
    )


def tenant_events(session: Session, tenant_id: str, after_id: int = 0, job_ids: Iterable[str] | None = None,
                  limit: int = 1000) -> list[JobEvent]:
    """A tenant's events (of every job, or of `job_ids`) with ids above `after_id`, oldest first."""
    query = (select(JobEvent).join(Job, Job.id == JobEvent.job_id)
             .where(Job.tenant_id == tenant_id, JobEvent.id > after_id))
    if job_ids is not None:
        query = query.where(JobEvent.job_id.in_(list(job_ids)))
    return list(session.scalars(query.order_by(JobEvent.id).limit(limit)))


def last_event_id(session: Session) -> int:
    """The highest event id there is: where a stream that starts now resumes."""
    return session.scalar(select(func.max(JobEvent.id))) or 0


def queued_heads(session: Session, pools: list[str], older_than: dt.datetime | None = None) -> list[tuple[str, str]]:
    """(job id, pool) of the first queued job of each batch model and batch key in
    these pools: the doorbells to ring when messages may have been lost."""
    if not pools:
        return []
    query = select(func.min(Job.id), Job.pool).where(Job.status == JobStatus.QUEUED.value, Job.pool.in_(pools))
    if older_than is not None:
        query = query.where(Job.created_at <= older_than)
    rows = session.execute(query.group_by(Job.batch_model, Job.batch_key, Job.pool)).all()
    return [(r[0], r[1]) for r in rows]


def requeue_expired(session: Session, pools: list[str], now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """Running jobs whose lease ran out (their worker died or hung) go back to
    queued for another attempt, or fail once they have had max_attempts; one
    whose cancel was requested ends canceled.
    Returns (job id, pool) of those requeued, to ring for. Each change is
    conditional on the lease still being expired, so two reconcilers agree."""
    now = now or utcnow()
    expired = session.execute(
        select(Job.id, Job.pool, Job.attempts, Job.max_attempts, Job.lease_owner, Job.cancel_requested)
        .where(Job.status == JobStatus.RUNNING.value, Job.lease_until < now, Job.pool.in_(pools))
    ).all()
    requeued = []
    for job_id, pool, attempts, max_attempts, owner, cancel in expired:
        still = (Job.id == job_id, Job.lease_until < now)
        if cancel:
            # Its owner asked to stop it and nothing runs it any more: it ends
            # canceled, as a cancel the worker saw would have ended it.
            if session.execute(transition(JobStatus.RUNNING, JobStatus.CANCELED, *still,
                                          completed_at=now, updated_at=now, lease_until=None)).rowcount:
                record_event(session, job_id, "completed", {"status": JobStatus.CANCELED.value}, at=now)
                webhooks.enqueue(session, job_id, "completed", now=now)
        elif attempts >= max_attempts:
            error = {"code": "attempts_exhausted",
                     "message": f"the job's worker stopped responding on each of {attempts} attempts; "
                                "it may be crashing the worker, so it was not retried again"}
            if session.execute(transition(JobStatus.RUNNING, JobStatus.FAILED, *still,
                                          error=error, completed_at=now, updated_at=now, lease_until=None)).rowcount:
                record_event(session, job_id, "completed", {"status": "failed", "error": error, "worker": owner}, at=now)
                webhooks.enqueue(session, job_id, "completed", now=now)
        elif session.execute(transition(JobStatus.RUNNING, JobStatus.QUEUED, *still,
                                        lease_owner=None, lease_until=None, updated_at=now)).rowcount:
            record_event(session, job_id, "log", {"message": "its worker stopped responding (lease expired); queued again", "attempt": attempts, "worker": owner}, at=now)
            requeued.append((job_id, pool))
    return requeued


def node_process(lease_owner: str) -> tuple[str, int] | None:
    """(host, pid) of the worker process a lease owner names, when its worker
    name is a `genq worker` node name: "<pools>.<pid>@<host>:<pid>:<random>"
    (the second pid is a prefork child's). None for any other owner."""
    node = lease_owner.rsplit(":", 2)[0]
    name, at, host = node.rpartition("@")
    pid = name.rpartition(".")[2]
    return (host, int(pid)) if at and pid.isdigit() else None


def requeue_dead_worker(session: Session, host: str, pid: int, now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """The running jobs of the `genq worker` process `pid` on `host`, known to
    be dead (its parent reaped it), are taken back now instead of when their
    leases lapse: the leases end at once and requeue_expired's rules apply
    (the attempt counts; past max_attempts the job fails, a cancel asked for
    ends it canceled). Returns (job id, pool) of every job queued again, these
    and any other of their pools' jobs whose lease had lapsed, to ring for.
    Only for a process known dead: a live one would lose its jobs' leases."""
    now = now or utcnow()
    # The LIKE narrows the search; node_process decides (an `_` in a host name matches any character).
    candidates = session.execute(
        select(Job.id, Job.pool, Job.lease_owner)
        .where(Job.status == JobStatus.RUNNING.value, Job.lease_owner.like(f"%.{pid}@{host}:%"))
    ).all()
    dead = [(job_id, pool) for job_id, pool, owner in candidates if node_process(owner) == (host, pid)]
    if not dead:
        return []
    ended = now - dt.timedelta(microseconds=1)
    for job_id, _ in dead:
        if session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                           .values(lease_until=ended)).rowcount:
            # The worker's name in "worker", which tenants are never shown (api/serialize.py).
            record_event(session, job_id, "log", {"message": "its worker process died; its lease ended at once",
                                                  "worker": f"pid {pid} on {host}"}, at=now)
    return requeue_expired(session, sorted({pool for _, pool in dead}), now=now)
