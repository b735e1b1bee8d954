"""Per-tenant webhook secrets and the Standard Webhooks signature made with them.

A tenant has one current secret, made on first use. Rotating it makes a new
one and lets the old one keep signing beside it for a grace period: during
that time each delivery carries one signature per live secret
(`webhook-signature: v1,<new> v1,<old>`), and a receiver holding either key
verifies it, so keys can be swapped without dropping a delivery.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from genq.keys import lock_tenant
from genq.schema import WebhookSecret, utcnow

PREFIX = "whsec_"
# Rotated-out secrets that keep signing during their grace period, at most.
# Each one is a signature on every delivery; a rotation past this ends the
# grace of the oldest at once (the tenant rotated again since, so its
# receivers have had two newer keys to move to).
MAX_PREVIOUS = 2


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes: the form standardwebhooks.Webhook reads."""
    return PREFIX + base64.b64encode(os.urandom(32)).decode()


def _current(session: Session, tenant_id: str) -> WebhookSecret | None:
    return session.scalar(
        select(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None))
        .order_by(WebhookSecret.created_at.desc(), WebhookSecret.id.desc())
        .limit(1)
    )


def current(session: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's current secret, made now if it has none yet."""
    found = _current(session, tenant_id)
    if found is not None:
        return found
    # Two first requests at once must not both make a "current" secret.
    lock_tenant(session, tenant_id)
    found = _current(session, tenant_id)
    if found is None:
        found = WebhookSecret(tenant_id=tenant_id, secret=new_secret())
        session.add(found)
        session.flush()
    return found


def rotate(session: Session, tenant_id: str, grace_seconds: float, now: dt.datetime | None = None) -> tuple[WebhookSecret, dt.datetime]:
    """Make a new current secret; the old one signs beside it until the
    returned time. Secrets whose grace has run out are deleted, and so are
    the oldest in grace beyond MAX_PREVIOUS, so rotating in a loop never
    piles up signing keys."""
    now = now or utcnow()
    lock_tenant(session, tenant_id)
    old = current(session, tenant_id)
    until = now + dt.timedelta(seconds=grace_seconds)
    old.expires_at = until
    session.execute(
        delete(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at <= now)
    )
    session.flush()
    in_grace = session.scalars(
        select(WebhookSecret.id)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_not(None))
        .order_by(WebhookSecret.created_at.desc(), WebhookSecret.id.desc())
    ).all()
    if len(in_grace) > MAX_PREVIOUS:
        session.execute(delete(WebhookSecret).where(WebhookSecret.id.in_(in_grace[MAX_PREVIOUS:])))
    new = WebhookSecret(tenant_id=tenant_id, secret=new_secret(), created_at=now)
    session.add(new)
    session.flush()
    return new, until


def signing_keys(session: Session, tenant_id: str, now: dt.datetime | None = None) -> list[str]:
    """Every secret that signs now: the current one first, then those still in their grace period."""
    now = now or utcnow()
    key = current(session, tenant_id).secret
    older = session.scalars(
        select(WebhookSecret.secret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_not(None), WebhookSecret.expires_at > now)
        .order_by(WebhookSecret.created_at.desc())
    )
    return [key, *[k for k in older if k != key]]


def encode(payload: dict) -> bytes:
    """The exact bytes that are signed and sent."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sign(keys: list[str], msg_id: str, body: bytes, timestamp: dt.datetime) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt: webhook-id (the same on
    every attempt of an event), webhook-timestamp (this attempt's, so retries
    are not refused as stale) and one v1 signature per key."""
    if not keys:
        raise ValueError("sign needs at least one key, got none")
    text = body.decode()
    signatures = [Webhook(key).sign(msg_id=msg_id, timestamp=timestamp, data=text) for key in keys]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }
