"""Webhook deliveries on the record of truth: enqueued in the transaction of the
state change that causes them, claimed by a sender under a lease, retried on
the Standard Webhooks schedule, every attempt logged.

A delivery is a row before it is anything else. The Celery message that wakes
the sender carries its id only, and the sender's sweep rings again for rows
whose retry is due or whose message was lost, and takes back rows whose
sender died mid-POST (their lease ran out). So nothing a process or a broker
does can lose an event; at worst a receiver sees one twice, with the same
`webhook-id`, which Standard Webhooks receivers drop.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import enum
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from sqlalchemy import event as sa_event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from genq import serialize
from genq.errors import GenqError
from genq.keys import lock_tenant
from genq.queue import publish_delivery
from genq.schema import Batch, Job, WebhookAttempt, WebhookDelivery, new_id, utcnow

EVENTS = ("start", "progress", "completed")
# The events a webhook is sent for when its job names none.
DEFAULT_EVENTS = ("completed",)
# A batch's end, named as OpenAI names its batch webhook events.
BATCH_EVENTS = ("batch.completed", "batch.cancelled", "batch.expired", "batch.failed")
# At most one progress delivery per job this often; a dropped one is not
# missed for long, as the next (or the completed event) carries the newer state.
PROGRESS_EVERY = dt.timedelta(seconds=1)
# Retry waits vary by this fraction either way, so receivers that failed
# together are not all retried in the same instant.
JITTER = 0.2
# A pending row whose doorbell went out is rung again only after this long
# (a lost message); a duplicate message is harmless, just wasted.
DOORBELL_PATIENCE = dt.timedelta(seconds=30)
# Deliveries enqueued in a session, rung once it commits.
_TO_RING = "genq.webhook_deliveries_to_ring"


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"  # waiting for its first attempt or a retry at next_attempt_at
    DELIVERING = "delivering"  # a sender holds it until lease_until
    SUCCEEDED = "succeeded"  # the receiver answered 2xx
    FAILED = "failed"  # every attempt on the schedule failed
    GAVE_UP = "gave_up"  # the receiver answered 410 Gone: nothing more for this job


# --- enqueue, in the state change's transaction ----------------------------------


def enqueue(session: Session, job: Job | str, event: str, now: dt.datetime | None = None) -> WebhookDelivery | None:
    """Add a delivery of `event` for a job whose webhook asks for it, frozen
    as the job is now in this transaction. Returns None when nothing is sent:
    no webhook, an event outside the job's filter, a progress event within
    PROGRESS_EVERY of the last, or a receiver that answered 410 for this job."""
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    now = now or utcnow()
    if isinstance(job, str):
        job = session.scalars(select(Job).where(Job.id == job).execution_options(populate_existing=True)).one()
    if not job.webhook or event not in (job.webhook_events_filter or DEFAULT_EVENTS):
        return None
    if _gone(session, job.id):
        return None
    if event == "progress" and _recent_progress(session, job.id, now):
        return None
    delivery = WebhookDelivery(
        job_id=job.id,
        tenant_id=job.tenant_id,
        event=event,
        webhook_id=f"msg_{new_id()}",
        url=job.webhook,
        payload=serialize.job(job, None),
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(delivery)
    session.flush()
    session.info.setdefault(_TO_RING, []).append(delivery.id)
    return delivery


def enqueue_batch(session: Session, batch: Batch, payload: dict, now: dt.datetime | None = None) -> WebhookDelivery | None:
    """Add a delivery of the batch's end (`batch.<status>`) to its webhook, with
    `payload` (the batch object as GET shows it now). None when it has no webhook."""
    event = f"batch.{batch.status}"
    if event not in BATCH_EVENTS:
        raise ValueError(f"a batch's webhook is sent when it ends, one of {BATCH_EVENTS}; it is {batch.status!r}")
    if not batch.webhook:
        return None
    now = now or utcnow()
    delivery = WebhookDelivery(job_id=None, batch_id=batch.id, tenant_id=batch.tenant_id, event=event,
                               webhook_id=f"msg_{new_id()}", url=batch.webhook, payload=payload,
                               status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now,
                               created_at=now, updated_at=now)
    session.add(delivery)
    session.flush()
    session.info.setdefault(_TO_RING, []).append(delivery.id)
    return delivery


def same_owner(delivery: WebhookDelivery):
    """The condition selecting the deliveries of the job (or batch) `delivery` belongs to."""
    if delivery.job_id is not None:
        return WebhookDelivery.job_id == delivery.job_id
    return WebhookDelivery.batch_id == delivery.batch_id


def _gone(session: Session, job_id: str) -> bool:
    return session.scalar(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.job_id == job_id, WebhookDelivery.status == DeliveryStatus.GAVE_UP.value)
        .limit(1)
    ) is not None


def _recent_progress(session: Session, job_id: str, now: dt.datetime) -> bool:
    last = session.scalar(
        select(WebhookDelivery.created_at)
        .where(WebhookDelivery.job_id == job_id, WebhookDelivery.event == "progress")
        .order_by(WebhookDelivery.id.desc())
        .limit(1)
    )
    return last is not None and now - last < PROGRESS_EVERY


def ring_after_commit(sessions: sessionmaker, celery, queue: str) -> None:
    """Make sessions from `sessions` ring the sender's doorbell for the
    deliveries they enqueued, once (and only if) they commit. Sessions without
    this still work: the sender's sweep finds their rows within a sweep interval."""

    @sa_event.listens_for(sessions, "after_commit")
    def _ring(session: Session) -> None:
        for delivery_id in session.info.pop(_TO_RING, []):
            publish_delivery(celery, delivery_id, queue)

    @sa_event.listens_for(sessions, "after_rollback")
    def _forget(session: Session) -> None:
        session.info.pop(_TO_RING, None)


# --- one attempt, in the sender ---------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one POST came to."""

    status_code: int | None
    error: str | None
    duration_ms: int
    # Seconds the receiver asked us to wait (429 / 503 with Retry-After).
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def in_flight(session: Session, now: dt.datetime, tenant_id: str | None = None) -> dict[str, int]:
    """Deliveries per tenant that a sender is posting now, or whose doorbell
    the sweep has rung and not yet seen answered."""
    query = (
        select(WebhookDelivery.tenant_id, func.count())
        .where(WebhookDelivery.status.in_([DeliveryStatus.DELIVERING.value, DeliveryStatus.PENDING.value]),
               WebhookDelivery.lease_until > now)
        .group_by(WebhookDelivery.tenant_id)
    )
    if tenant_id is not None:
        query = query.where(WebhookDelivery.tenant_id == tenant_id)
    return dict(session.execute(query).all())


def claim(session: Session, delivery_id: str, lease_seconds: float, now: dt.datetime | None = None,
          tenant_limit: int = 0) -> WebhookDelivery | None:
    """Take a due delivery for one attempt, until now + lease_seconds. None when
    it is not due or another sender has it: the message was stale or a duplicate.

    With `tenant_limit`, a tenant already posting that many deliveries gets
    no more threads: the delivery stays pending, its doorbell mark cleared,
    and the sweep rings for it once one of the tenant's POSTs has ended. So a
    tenant whose receiver hangs holds at most `tenant_limit` sender threads."""
    now = now or utcnow()
    if tenant_limit:
        tenant_id = session.scalar(select(WebhookDelivery.tenant_id).where(WebhookDelivery.id == delivery_id))
        if tenant_id is None:
            return None
        # Senders claiming for one tenant at once take turns, so each counts what the last one took.
        lock_tenant(session, tenant_id)
        posting = session.scalar(select(func.count()).where(
            WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.status == DeliveryStatus.DELIVERING.value,
            WebhookDelivery.lease_until > now))
        if posting >= tenant_limit:
            session.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING.value)
                .values(lease_until=None))
            return None
    taken = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(
            status=DeliveryStatus.DELIVERING.value,
            attempts=WebhookDelivery.attempts + 1,
            lease_until=now + dt.timedelta(seconds=lease_seconds),
            updated_at=now,
        )
    ).rowcount
    if not taken:
        return None
    return session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).execution_options(populate_existing=True)
    ).one()


def next_delay(attempt: int, backoff: Sequence[float], retry_after: float | None = None,
               rng: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait after failed attempt number `attempt` (1-based), or None
    when the schedule is spent. A receiver's Retry-After is honoured as given,
    up to the schedule's longest wait."""
    if attempt > len(backoff):
        return None
    if retry_after is not None:
        return min(max(retry_after, 0.0), max(backoff))
    return backoff[attempt - 1] * (1 + JITTER * (2 * rng() - 1))


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max((when - (now or utcnow())).total_seconds(), 0.0)


def record(session: Session, delivery: WebhookDelivery, outcome: Outcome, backoff: Sequence[float],
           now: dt.datetime | None = None, rng: Callable[[], float] = random.random) -> str | None:
    """Log an attempt and move the delivery on: succeeded, a retry scheduled,
    failed (schedule spent) or gave_up (410). The move counts only while this
    attempt still holds the delivery; returns the new status, or None when the
    lease was lost meanwhile (the attempt is logged all the same)."""
    now = now or utcnow()
    session.add(WebhookAttempt(delivery_id=delivery.id, at=now, status_code=outcome.status_code,
                               error=outcome.error, duration_ms=outcome.duration_ms))
    values: dict = dict(last_status_code=outcome.status_code, last_error=outcome.error, lease_until=None, updated_at=now)
    if outcome.ok:
        values["status"] = DeliveryStatus.SUCCEEDED.value
    elif outcome.status_code == 410:
        values["status"] = DeliveryStatus.GAVE_UP.value
    else:
        delay = next_delay(delivery.attempts, backoff, outcome.retry_after, rng)
        if delay is None:
            values["status"] = DeliveryStatus.FAILED.value
        else:
            values["status"] = DeliveryStatus.PENDING.value
            values["next_attempt_at"] = now + dt.timedelta(seconds=delay)
    held = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery.id,
            WebhookDelivery.status == DeliveryStatus.DELIVERING.value,
            WebhookDelivery.attempts == delivery.attempts,
        )
        .values(**values)
    ).rowcount
    if not held:
        return None
    if values["status"] == DeliveryStatus.GAVE_UP.value:
        # The receiver says this job's webhook is gone: drop its other waiting events too.
        session.execute(
            update(WebhookDelivery)
            .where(same_owner(delivery), WebhookDelivery.status == DeliveryStatus.PENDING.value)
            .values(status=DeliveryStatus.GAVE_UP.value, last_error="not sent: the receiver answered 410 Gone for this job",
                    lease_until=None, updated_at=now)
        )
    return values["status"]


def body(delivery: WebhookDelivery, url_for_key: serialize.UrlForKey, output_retention: int = 0) -> dict:
    """The payload as sent: the job frozen at event time, its output URLs made
    now, and when its outputs expire given the tenant's `output_retention`
    (the frozen payload cannot know it: retention is the sender's setting)."""
    payload = dict(delivery.payload)
    if delivery.job_id is None:  # a batch's end: the batch object as it was, nothing to render
        return payload
    if payload.get("output") is not None:
        payload["output"] = serialize.with_urls(payload["output"], url_for_key)
    if payload.get("expires_at") is None and payload.get("completed_at") and output_retention:
        ended = dt.datetime.fromisoformat(payload["completed_at"].replace("Z", "+00:00"))
        payload["expires_at"] = serialize.rfc3339(ended + dt.timedelta(seconds=output_retention))
    return payload


# --- the sweep --------------------------------------------------------------------


def take_back_stale(session: Session, backoff: Sequence[float], now: dt.datetime | None = None) -> list[str]:
    """Deliveries whose sender died mid-attempt (lease run out): log the lost
    attempt and make them due again at once, or failed if that was the last.
    Returns their ids."""
    now = now or utcnow()
    stale = list(session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.status == DeliveryStatus.DELIVERING.value, WebhookDelivery.lease_until < now)
        .with_for_update(skip_locked=True)
    ))
    error = "the sender stopped before the receiver answered (its lease ran out); sending again"
    for d in stale:
        session.add(WebhookAttempt(delivery_id=d.id, at=now, status_code=None, error=error, duration_ms=0))
        spent = d.attempts > len(backoff)
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == d.id, WebhookDelivery.status == DeliveryStatus.DELIVERING.value,
                   WebhookDelivery.attempts == d.attempts)
            .values(status=(DeliveryStatus.FAILED if spent else DeliveryStatus.PENDING).value, next_attempt_at=now,
                    lease_until=None, last_status_code=None, last_error=error, updated_at=now)
        )
    return [d.id for d in stale]


def due(session: Session, now: dt.datetime | None = None, limit: int = 500, tenant_limit: int = 0) -> list[str]:
    """Pending deliveries whose attempt is due and whose doorbell is not
    already out (or is overdue): marked rung until now + DOORBELL_PATIENCE,
    so two sweeps never ring for the same row at once.

    Fair across tenants: rows are taken round robin (each tenant's oldest due
    row, then each one's second, ...), so one tenant's backlog of thousands
    does not push everyone else's behind it; and with `tenant_limit`, a
    tenant gets no more doorbells than it has free places (the limit less
    what it has in flight)."""
    now = now or utcnow()
    ranked = (
        select(WebhookDelivery.id, WebhookDelivery.tenant_id,
               func.row_number().over(partition_by=WebhookDelivery.tenant_id,
                                      order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id)).label("place"))
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.next_attempt_at <= now,
            (WebhookDelivery.lease_until.is_(None)) | (WebhookDelivery.lease_until < now),
        )
        .subquery()
    )
    query = select(ranked.c.id, ranked.c.tenant_id, ranked.c.place)
    if tenant_limit:
        query = query.where(ranked.c.place <= tenant_limit)
    candidates = session.execute(query.order_by(ranked.c.place, ranked.c.id).limit(limit)).all()
    if tenant_limit and candidates:
        busy = in_flight(session, now)
        candidates = [c for c in candidates if c.place <= tenant_limit - busy.get(c.tenant_id, 0)]
    if not candidates:
        return []
    # Postgres refuses FOR UPDATE beside a window function: the chosen rows
    # are locked by id, skipping any another sweep holds.
    locked = set(session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.id.in_([c.id for c in candidates]), WebhookDelivery.status == DeliveryStatus.PENDING.value)
        .with_for_update(skip_locked=True)
    ))
    ids = [c.id for c in candidates if c.id in locked]
    if ids:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == DeliveryStatus.PENDING.value)
            .values(lease_until=now + DOORBELL_PATIENCE)
        )
    return ids


# --- the log and redelivery -------------------------------------------------------


def deliveries(session: Session, job_id: str, limit: int, before: str | None = None) -> list[WebhookDelivery]:
    """A job's deliveries, newest first."""
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    if before:
        query = query.where(WebhookDelivery.id < before)
    return list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))


def attempts(session: Session, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
    out: dict[str, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
    if delivery_ids:
        rows = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(delivery_ids))).order_by(WebhookAttempt.id)
        )
        for a in rows:
            out[a.delivery_id].append(a)
    return out


class RedeliveryRefused(GenqError):
    """A redelivery that would only add load: one of the same event is still
    on its way, or the job has had its share of redeliveries."""

    code = "redelivery_refused"


def redeliveries(session: Session, job_id: str) -> int:
    """How many times the job's events were sent again on request: every
    delivery beyond the first of each webhook-id."""
    total, distinct = session.execute(
        select(func.count(), func.count(func.distinct(WebhookDelivery.webhook_id))).where(WebhookDelivery.job_id == job_id)
    ).one()
    return total - distinct


def redeliver(session: Session, delivery: WebhookDelivery, max_redeliveries: int,
              now: dt.datetime | None = None) -> WebhookDelivery:
    """Send an event again, as asked by its tenant: a new delivery of the same
    frozen payload with the same webhook-id (it is the same event, so a
    receiver that already has it may drop it), on a fresh schedule.

    Bounded, because each one is a new schedule of up to len(backoff) + 1
    POSTs: refused while a delivery of the same event is still pending or
    being sent, and once the job has been redelivered `max_redeliveries` times."""
    now = now or utcnow()
    busy = session.scalar(
        select(WebhookDelivery.id).where(
            WebhookDelivery.job_id == delivery.job_id, WebhookDelivery.webhook_id == delivery.webhook_id,
            WebhookDelivery.status.in_([DeliveryStatus.PENDING.value, DeliveryStatus.DELIVERING.value])).limit(1))
    if busy is not None:
        raise RedeliveryRefused(f"delivery {busy} of this event is still on its way; "
                                "redeliver it once it has succeeded or failed")
    done = redeliveries(session, delivery.job_id)
    if done >= max_redeliveries:
        raise RedeliveryRefused(f"job {delivery.job_id} has been redelivered {done} times, the most allowed "
                                f"(GENQ_WEBHOOK_MAX_REDELIVERIES={max_redeliveries})")
    again = WebhookDelivery(
        job_id=delivery.job_id,
        tenant_id=delivery.tenant_id,
        event=delivery.event,
        webhook_id=delivery.webhook_id,
        url=delivery.url,
        payload=delivery.payload,
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(again)
    session.flush()
    session.info.setdefault(_TO_RING, []).append(again.id)
    return again
