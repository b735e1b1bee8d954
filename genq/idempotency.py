"""Idempotency keys on the record of truth: what a (tenant, key) pair made,
recorded in the same transaction as the thing it made, and purged once old.

The unique constraint on (tenant_id, key) is what makes concurrent duplicates
safe: of two transactions inserting the same pair, one commits and the other
fails on the constraint, rolls back its job with it, and returns the winner's.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from genq.schema import IdempotencyKey, utcnow


@dataclass(frozen=True)
class Earlier:
    """What an earlier request with the same key made, and whether it was the same request."""

    resource: str
    resource_id: str
    same_request: bool


def request_hash(route: str, content) -> str:
    """sha256 of the route and the request's content as canonical JSON, so a
    replay that only reorders keys or whitespace is the same request."""
    canonical = json.dumps([route, content], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def find(session: Session | Connection, tenant_id: str, key: str, hash_: str) -> Earlier | None:
    """One statement, on a session or a plain connection (autocommit: no transaction to begin and end)."""
    row = session.execute(select(IdempotencyKey.resource, IdempotencyKey.resource_id, IdempotencyKey.request_hash)
                          .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)).first()
    if row is None:
        return None
    return Earlier(row.resource, row.resource_id, row.request_hash == hash_)


def record(session: Session, tenant_id: str, key: str, hash_: str, resource: str, resource_id: str) -> None:
    """Add the key in the caller's transaction; flushing raises IntegrityError
    when another request with the same key got there first."""
    session.add(IdempotencyKey(tenant_id=tenant_id, key=key, request_hash=hash_, resource=resource,
                               resource_id=resource_id))
    session.flush()


def purge(session: Session, older_than: dt.timedelta, now: dt.datetime | None = None) -> int:
    """Forget keys older than `older_than`; returns how many."""
    cutoff = (now or utcnow()) - older_than
    return session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)).rowcount
