"""OpenAI-style batches on the record of truth: a batch's jobs inserted in
bulk, its counts, its cancel and expiry, and its end (the result and error
files written, its status final). Plain functions over a Session; callers commit.

A batch's jobs are ordinary jobs (a `batch_id` and the `batch_line` of the
input file they came from) queued at BATCH_PRIORITY, the lowest there is: the
line (genq.line) takes turns across tenants, so a batch never delays another
tenant's jobs by more than a turn, and within its own tenant every interactive
job (priority 0 by default) goes first. They are not counted against the
active-jobs quota (GENQ_MAX_ACTIVE_JOBS): a batch is bounded by its line count.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Iterable

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from genq import tracing, webhooks
from genq.jobs import transition
from genq.openai_shapes import completion_body
from genq.schema import Batch, File, Job, JobEvent, new_id, utcnow
from genq.states import JobStatus
from genq.storage import NotFound, Storage

log = logging.getLogger(__name__)

# Below every priority a job's submitter may choose (-100..100).
BATCH_PRIORITY = -101
# Jobs per INSERT statement: 1,000 rows of the jobs table's columns stay under
# SQLite's 32,766 bound parameters (and Postgres' 65,535).
CHUNK = 1000
# The only window OpenAI offers, and the only one taken here.
WINDOWS = {"24h": dt.timedelta(hours=24)}
TERMINAL = [s.value for s in JobStatus if s.terminal]
OPEN = ("in_progress", "cancelling")


def insert_jobs(session: Session, *, tenant_id: str, batch_id: str, rows: Iterable[tuple[int, object, object]],
                max_attempts: int) -> list[tuple[str, str]]:
    """Queue a batch's jobs: `rows` are (line, model spec, validated input), inserted
    CHUNK to a statement with their `queued` events. Returns (job id, pool) of
    each, in line order."""
    now = utcnow()
    conn = session.connection()
    out: list[tuple[str, str]] = []
    chunk: list[dict] = []
    carrier = tracing.carrier()

    def flush():
        if chunk:
            # A list of parameter sets: SQLAlchemy's "insertmanyvalues" sends them as
            # one multi-row INSERT, compiled once (a .values(list) would be compiled anew each chunk).
            conn.execute(insert(Job.__table__), chunk)
            conn.execute(insert(JobEvent.__table__),
                         [{"job_id": r["id"], "type": "queued", "data": {}, "at": now} for r in chunk])
            chunk.clear()

    for line, spec, inp in rows:
        job_id = new_id()
        chunk.append(dict(id=job_id, tenant_id=tenant_id, type=spec.family, model=spec.name,
                          batch_model=spec.batch_model, pool=spec.pool,
                          batch_key=spec.batch_key(inp), status=JobStatus.QUEUED.value,
                          input=inp.model_dump(mode="json"), output=None, error=None, progress=None, priority=BATCH_PRIORITY, attempts=0,
                          max_attempts=max_attempts, cancel_requested=False, lease_owner=None, lease_until=None,
                          webhook=None, webhook_events_filter=["completed"], metrics={}, created_at=now,
                          started_at=None, completed_at=None, updated_at=now, expired_at=None,
                          trace_context=carrier, batch_id=batch_id, batch_line=line))
        out.append((job_id, spec.pool))
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return out


def counts(session: Session, batch_id: str) -> dict[str, int]:
    """The batch's jobs by status."""
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status))
    return {status: n for status, n in rows}


def request_counts(batch: Batch, by_status: dict[str, int]) -> dict[str, int]:
    return {"total": batch.total, "completed": by_status.get(JobStatus.SUCCEEDED.value, 0),
            "failed": by_status.get(JobStatus.FAILED.value, 0) + by_status.get(JobStatus.CANCELED.value, 0)}


def cancel_jobs(session: Session, batch_id: str, now: dt.datetime | None = None) -> int:
    """Queued jobs of the batch canceled in one statement (their `completed`
    events in another); running ones asked to stop. Returns how many were queued."""
    now = now or utcnow()
    ids = list(session.scalars(
        transition(JobStatus.QUEUED, JobStatus.CANCELED, Job.batch_id == batch_id, cancel_requested=True,
                   completed_at=now, updated_at=now).returning(Job.id).execution_options(synchronize_session=False)))
    for start in range(0, len(ids), CHUNK):
        session.execute(insert(JobEvent.__table__),
                        [{"job_id": i, "type": "completed", "data": {"status": "canceled"}, "at": now}
                         for i in ids[start:start + CHUNK]])
    session.execute(update(Job).where(Job.batch_id == batch_id, Job.status == JobStatus.RUNNING.value)
                    .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))
    return len(ids)


# What each endpoint's result body is (genq.openai_shapes).
KINDS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


def _epoch(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def describe(batch: Batch, by_status: dict[str, int] | None = None) -> dict:
    """The batch object in OpenAI's shape (GET /openai/v1/batches/<id>, and its webhook's body)."""
    counts = request_counts(batch, by_status or {})
    return {"id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
            "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
            "status": batch.status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
            "created_at": _epoch(batch.created_at), "in_progress_at": _epoch(batch.in_progress_at),
            "expires_at": _epoch(batch.expires_at), "finalizing_at": _epoch(batch.finalizing_at),
            "completed_at": _epoch(batch.completed_at), "failed_at": None, "expired_at": _epoch(batch.expired_at),
            "cancelling_at": _epoch(batch.cancelling_at), "cancelled_at": _epoch(batch.cancelled_at),
            "request_counts": counts, "metadata": batch.metadata_}


def custom_ids(data: bytes) -> list[str]:
    """The custom_id of each line of a batch input file (checked at upload)."""
    return [json.loads(raw)["custom_id"] for raw in data.decode("utf-8").splitlines() if raw.strip()]


def settle(session: Session, storage: Storage, batch: Batch, now: dt.datetime | None = None) -> bool:
    """Move an open batch along: past its window its queued jobs are canceled;
    once none of its jobs is queued or running its result files are written
    and its status made final (completed, cancelled or expired). Returns
    whether it changed. Lock the batch's row first (two settlers would write
    the files twice): the API does when a batch is read or cancelled, the
    workers' reconciler every round (settle_open)."""
    if batch.status not in OPEN:
        return False
    now = now or utcnow()
    expired = now >= batch.expires_at
    if expired and batch.status == "in_progress":
        cancel_jobs(session, batch.id, now)
    by_status = counts(session, batch.id)
    if by_status.get(JobStatus.QUEUED.value) or by_status.get(JobStatus.RUNNING.value):
        return expired
    # The input file may have been deleted meanwhile: then each line is named by its number.
    source = session.get(File, batch.input_file_id)
    try:
        ids = custom_ids(storage.get(source.storage_key)) if source is not None else []
    except NotFound:  # its content went from storage (deleted, or another store): lines by number
        ids = []
    kind = KINDS[batch.endpoint]
    results, errors = [], []
    jobs = session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.batch_line))
    for job in jobs:
        custom_id = ids[job.batch_line] if job.batch_line < len(ids) else str(job.batch_line)
        line = {"id": f"batch_req_{job.id}", "custom_id": custom_id}
        if job.status == JobStatus.SUCCEEDED.value and not isinstance(job.output, dict):
            # Its outputs were deleted (retention, or DELETE) before the batch settled.
            errors.append({**line, "response": None, "error": {
                "code": "output_expired", "message": f"its job {job.id} succeeded, but its output was deleted "
                                                     "before the batch's results were written"}})
        elif job.status == JobStatus.SUCCEEDED.value:
            results.append({**line, "response": {"status_code": 200, "request_id": job.id, "body": completion_body(kind, [job], job.model)},
                            "error": None})
        elif job.status == JobStatus.CANCELED.value:
            if batch.status == "cancelling":
                error = {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"}
            elif expired:
                error = {"code": "batch_expired", "message": "the batch expired before this request ran"}
            else:  # its job canceled on its own (POST /v1/jobs/<id>/cancel)
                error = {"code": "cancelled", "message": f"its job {job.id} was canceled"}
            errors.append({**line, "response": None, "error": error})
        else:
            error = job.error or {}
            errors.append({**line, "response": {"status_code": 500, "request_id": job.id, "body": {"error": {
                "message": error.get("message", "the job failed"), "type": "server_error", "param": None,
                "code": error.get("code")}}}, "error": None})
    batch.output_file_id = _result_file(session, storage, batch, results, "output") if results else None
    batch.error_file_id = _result_file(session, storage, batch, errors, "errors") if errors else None
    batch.finalizing_at = now
    if batch.status == "cancelling":
        batch.status, batch.cancelled_at = "cancelled", now
    elif expired:
        batch.status, batch.expired_at = "expired", now
    else:
        batch.status, batch.completed_at = "completed", now
    if batch.webhook:
        session.flush()
        webhooks.enqueue_batch(session, batch, describe(batch, counts(session, batch.id)), now)
    return True


def _result_file(session: Session, storage: Storage, batch: Batch, lines: list[dict], kind: str) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = new_id()
    key = f"files/{file_id}/content"
    storage.put(key, data, "application/jsonl")
    session.add(File(id=file_id, tenant_id=batch.tenant_id, purpose="batch_output",
                     filename=f"batch_{batch.id}_{kind}.jsonl", bytes=len(data), rows=len(lines), format="batch",
                     storage_key=key))
    return file_id


def settle_open(sessions, storage: Storage, limit: int = 100) -> int:
    """Settle up to `limit` open batches, each in its own transaction under its
    row's lock (a batch another settler holds is skipped this time). Returns how many changed."""
    with sessions() as session:
        ids = list(session.scalars(select(Batch.id).where(Batch.status.in_(OPEN)).order_by(Batch.id).limit(limit)))
    changed = 0
    for batch_id in ids:
        try:
            with sessions.begin() as session:
                query = select(Batch).where(Batch.id == batch_id)
                if session.get_bind().dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                batch = session.scalar(query)
                if batch is not None and settle(session, storage, batch):
                    changed += 1
        except Exception:  # noqa: BLE001 - one batch that cannot settle must not stop the others (or the round)
            log.exception("settling batch %s failed; trying again next round", batch_id)
    return changed
