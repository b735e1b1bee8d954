"""The SQLAlchemy 2.0 tables: tenants, their API keys, jobs and job events.

Postgres is the record of truth: a job exists once its row is committed, and
every status change is a conditional UPDATE on this table.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic migrations match on Postgres and SQLite.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    """A time-ordered id (UUIDv7 layout, hex): newest-first lists sort by id."""
    ms = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | (rand & ((1 << 76) - 1))
    return f"{value:032x}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # An admin's override of the retention settings for this tenant:
    # {"outputs": s, "jobs": s, "files": s}, each seconds (0 keeps), absent = the setting.
    retention: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the whole key: keys are 256-bit random, so a fast hash is enough
    # and the raw key is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # First characters of the key, shown in listings so a user can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(16), default="user")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_list", "tenant_id", "id"),
        # A tenant's jobs of one status, newest first (GET /v1/jobs?status=), and
        # its queued and running jobs for the active-jobs quota's count.
        Index("ix_jobs_tenant_status", "tenant_id", "status", "id"),
        Index("ix_jobs_lease", "status", "lease_until"),
        # When each tenant's last job in a pool started: whose turn it is (genq.line).
        # Partial, so that the planner never walks it for queued jobs.
        Index("ix_jobs_served", "pool", "tenant_id", "started_at", postgresql_where=text("started_at IS NOT NULL"),
              sqlite_where=text("started_at IS NOT NULL")),
        # The active-jobs quota's count, which leaves batch jobs out (genq.batches):
        # without it the count would step over every queued batch job.
        Index("ix_jobs_tenant_active", "tenant_id", "status", "id", postgresql_where=text("batch_id IS NULL"),
              sqlite_where=text("batch_id IS NULL")),
        # A batch's jobs in line order (its counts, its result files).
        Index("ix_jobs_batch", "batch_id", "batch_line", postgresql_where=text("batch_id IS NOT NULL"),
              sqlite_where=text("batch_id IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    pool: Mapped[str] = mapped_column(String(100))
    batch_key: Mapped[str] = mapped_column(String(200), default="")
    # The loaded model a job's batch runs on, which claims group by: the job's
    # model, or for a LoRA fine-tune served as an adapter, its base (rows of
    # different adapters of one base share a batch; models/text_adapters.py).
    batch_model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    input: Mapped[dict[str, Any]] = mapped_column(default=dict)
    output: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    webhook: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_events_filter: Mapped[list[Any]] = mapped_column(default=lambda: ["completed"])
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # When its outputs were deleted by retention (the row stays until job retention).
    expired_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The creating request's trace context (W3C headers) while traces are on
    # (genq.tracing): the worker's span for the job joins that trace.
    trace_context: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # A job of an OpenAI-style batch (genq.batches): the batch, and the line of its input file.
    batch_id: Mapped[str | None] = mapped_column(String(32), default=None)
    batch_line: Mapped[int | None] = mapped_column(Integer, default=None)


# The line (genq.line) reads these a tenant at a time, in each tenant's own
# order (priority, then age): a pool's queued jobs, for the pool's head, and
# those of one batch model and batch key, for the batch built around it.
Index("ix_jobs_line", Job.status, Job.pool, Job.tenant_id, Job.priority.desc(), Job.created_at, Job.id)
# The retention sweep: finished jobs by when they ended, those whose outputs are still kept.
Index("ix_jobs_expiry", Job.completed_at, postgresql_where=text("completed_at IS NOT NULL"),
      sqlite_where=text("completed_at IS NOT NULL"))
Index("ix_jobs_claim", Job.status, Job.batch_model, Job.batch_key, Job.tenant_id, Job.priority.desc(), Job.created_at, Job.id)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class File(Base):
    """An uploaded file (a fine-tuning dataset), stored in object storage."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_list", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    # What validation found: row count and row format ("prompt_completion" | "text").
    rows: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str] = mapped_column(String(32), default="")
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """A model a tenant made by fine-tuning: weights in object storage, usable
    by name (`<base>:ft-<suffix>-<short id>`) in that tenant's jobs only."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    base_model: Mapped[str] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))
    # Storage prefix holding the adapter (LoRA) or full weights, safetensors.
    storage_prefix: Mapped[str] = mapped_column(String(300))
    job_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class StorageDelete(Base):
    """Storage a deleted row owned, owed a delete: written in the same
    transaction as the row's delete, removed once the objects are gone. A
    crash between the two leaves this row, and the sweep finishes the job."""

    __tablename__ = "storage_deletes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    # A key, or a prefix ending in "/" (everything under it).
    key: Mapped[str] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """An Idempotency-Key a tenant sent with a POST, the request it came with
    (a hash) and what that request made. Inserted in the same transaction as
    the job or file, so of two concurrent duplicates exactly one commits."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key"),
        # The purge: keys older than GENQ_IDEMPOTENCY_TTL.
        Index("ix_idempotency_keys_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    # sha256 of the route and the request's content: a replay must match it.
    request_hash: Mapped[str] = mapped_column(String(64))
    # What the first request made: "job" or "file", and its id.
    resource: Mapped[str] = mapped_column(String(16))
    resource_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WebhookSecret(Base):
    """A tenant's webhook signing secret. The current one has no expiry; a
    rotated one keeps signing beside it until `expires_at`, so receivers can
    switch keys without dropping a delivery."""

    __tablename__ = "webhook_secrets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # The secret ("whsec_" + base64 of 32 random bytes) sealed by
    # genq.webhook_secrets.Sealer: signing needs the secret itself, so it
    # cannot be hashed, and the key that opens it is not in the database.
    sealed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class WebhookDelivery(Base):
    """One event of one job on its way to the job's webhook, written in the
    same transaction as the state change that caused it and retried until it
    succeeds or the schedule runs out."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # The sender's sweep: due pending rows, and in-flight rows whose lease lapsed.
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job", "job_id", "id"),
        Index("ix_webhook_deliveries_batch", "batch_id", "id", postgresql_where=text("batch_id IS NOT NULL"),
              sqlite_where=text("batch_id IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # Whose event it is: a job's, or (job_id NULL) an OpenAI-style batch's end.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), default=None)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), default=None)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(16))
    # The Standard Webhooks message id: the same on every attempt (and on a
    # redelivery) of one event, so a receiver can drop duplicates.
    webhook_id: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    # The job as GET returned it when the event happened (output URLs are
    # rendered at send time: a presigned URL would expire before late retries).
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Pending: a doorbell went out and is not yet overdue. Delivering: the
    # sender holding the row may post until then; past it the row is taken back.
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookAttempt(Base):
    """One POST of a delivery (or one the sender did not live to finish): the log."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


class Pool(Base):
    """An operator's switch on a pool. No row means running: pools themselves
    are defined by the registry, this only records a pause."""

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    # Paused: jobs are still accepted and queued, but no worker starts one.
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    paused_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Worker(Base):
    """A `genq worker` process, by its Celery node name: its heartbeat, and
    the operator's drain request (finish the batch in hand, claim nothing new)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Comma-separated pools it consumes.
    pools: Mapped[str] = mapped_column(String(500))
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    drain_requested_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Models this worker failed to load, {model: reason}, as of its last heartbeat:
    # their jobs fail with model_load_failed while its other models run on.
    model_errors: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class Batch(Base):
    """An OpenAI-style batch (genq.batches): a file of requests made jobs in
    bulk, and at its end files of their results and errors."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_list", "tenant_id", "id"),
                      Index("ix_batches_open", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(64))
    # validating | in_progress | finalizing | completed | failed | cancelling | cancelled | expired
    status: Mapped[str] = mapped_column(String(16), default="in_progress")
    input_file_id: Mapped[str] = mapped_column(String(32))
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    total: Mapped[int] = mapped_column(Integer, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(32), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(32), default=None)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    # Where the batch's end (completed, cancelled, expired) is posted, signed as a job's events are.
    webhook: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()
    in_progress_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finalizing_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    expired_at: Mapped[dt.datetime | None] = mapped_column(default=None)
