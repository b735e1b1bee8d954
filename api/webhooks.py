"""The webhook routes: the tenant's signing secret and its rotation, and each
job's delivery log with redelivery."""
from __future__ import annotations

from flask import Blueprint

from api.auth import caller, require_key
from api.context import ctx
from api.errors import ApiError
from api.jobs import ID_RE, own_job, page_args
from genq import webhook_secrets, webhooks
from genq.schema import WebhookAttempt, WebhookDelivery
from genq.serialize import rfc3339

bp = Blueprint("webhooks", __name__, url_prefix="/v1")


@bp.get("/webhooks/secret")
@require_key
def get_secret():
    """The key that verifies this tenant's deliveries (made on first use)."""
    with ctx().session() as session, session.begin():
        secret = webhook_secrets.current(session, caller().tenant_id, ctx().sealer)
    return {"key": secret}


@bp.post("/webhooks/secret/rotate")
@require_key
def rotate_secret():
    """A new key; the old one keeps signing beside it until `previous_key_expires_at`."""
    with ctx().session() as session, session.begin():
        secret, until = webhook_secrets.rotate(session, caller().tenant_id, ctx().settings.webhook_secret_grace,
                                               ctx().sealer)
    return {"key": secret, "previous_key_expires_at": rfc3339(until)}


def describe(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict:
    waiting = d.status == webhooks.DeliveryStatus.PENDING.value
    return {
        "id": d.id,
        "event": d.event,
        "webhook_id": d.webhook_id,
        "url": d.url,
        "status": d.status,
        "attempts": [
            {"at": rfc3339(a.at), "status_code": a.status_code, "error": a.error, "duration_ms": a.duration_ms}
            for a in attempts
        ],
        "next_attempt_at": rfc3339(d.next_attempt_at) if waiting else None,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at),
    }


@bp.get("/jobs/<job_id>/webhook-deliveries")
@require_key
def list_deliveries(job_id: str):
    """Every delivery of the job's events, newest first, each with every attempt."""
    limit, cursor = page_args()
    with ctx().session() as session:
        job = own_job(session, job_id)
        rows = webhooks.deliveries(session, job.id, limit + 1, before=cursor)
        page = rows[:limit]
        log = webhooks.attempts(session, [d.id for d in page])
    return {
        "data": [describe(d, log[d.id]) for d in page],
        "next_cursor": page[-1].id if len(rows) > limit else None,
    }


@bp.post("/jobs/<job_id>/webhook-deliveries/<delivery_id>/redeliver")
@require_key
def redeliver(job_id: str, delivery_id: str):
    """Send one of the job's events again (same payload and webhook-id), on a fresh schedule."""
    with ctx().session() as session, session.begin():
        job = own_job(session, job_id)
        delivery = session.get(WebhookDelivery, delivery_id) if ID_RE.match(delivery_id) else None
        if delivery is None or delivery.job_id != job.id:
            raise ApiError(404, f"job {job_id} has no webhook delivery {delivery_id!r}")
        again = webhooks.redeliver(session, delivery, ctx().settings.webhook_max_redeliveries)
    return describe(again, []), 202
