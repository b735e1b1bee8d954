"""Tenants and their API keys: random, shown once, stored as a hash."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from genq.schema import ApiKey, Tenant, utcnow

KEY_PREFIX = "gq_"
ROLES = ("user", "admin")
# A key inside other text (a URL, a log line): the prefix, its `_` perhaps
# percent-encoded, and at least 16 of the URL-safe characters a key is made of
# (a key's 10-character display prefix, as `genq keys revoke` takes, is not one).
KEY_IN_TEXT = re.compile(r"gq(?:_|%5[Ff])[A-Za-z0-9_-]{16,}")
# Query parameters clients commonly put API keys in.
KEY_PARAMS = ("api_key", "apikey", "key", "token", "access_token")


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, role: str = "user") -> tuple[Tenant, str]:
    """Make a key for a tenant (created if new). The raw key is returned once and never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    tenant = get_or_create_tenant(session, tenant_name)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(raw), prefix=raw[:10], role=role))
    session.flush()
    return tenant, raw


def authenticate(session: Session, raw: str) -> tuple[Tenant, ApiKey] | None:
    if not raw or not raw.startswith(KEY_PREFIX) or len(raw) > 200:
        return None
    digest = hash_key(raw)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # The lookup is by hash, so timing reveals nothing about the raw key; the
    # constant-time compare guards against a collation or index surprise.
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.key_hash, digest):
        return None
    tenant = session.get(Tenant, key.tenant_id)
    return (tenant, key) if tenant else None


@dataclass(frozen=True)
class Verified:
    """What a valid key says about its caller."""

    tenant_id: str
    tenant_name: str
    role: str
    prefix: str
    # The tenant's own retention (genq.retention), if an admin set one.
    retention: dict | None = None


# One statement: the key by its hash, with its tenant. Built once; SQLAlchemy
# caches its compiled form.
_VERIFY = (select(ApiKey.key_hash, ApiKey.revoked_at, ApiKey.role, ApiKey.prefix, Tenant.id, Tenant.name,
                   Tenant.retention)
           .join(Tenant, Tenant.id == ApiKey.tenant_id)
           .where(ApiKey.key_hash == bindparam("digest")))


def verify(conn: Connection | Session, raw: str) -> Verified | None:
    """The caller a raw key stands for, in one statement; None if the key is
    malformed, unknown or revoked."""
    if not raw or not raw.startswith(KEY_PREFIX) or len(raw) > 200:
        return None
    digest = hash_key(raw)
    row = conn.execute(_VERIFY, {"digest": digest}).first()
    # The lookup is by hash, so timing reveals nothing about the raw key; the
    # constant-time compare guards against a collation or index surprise.
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return Verified(row.id, row.name, row.role, row.prefix, row.retention)


class KeyCache:
    """Keys verified in the last `seconds`, in this process: a poll needs no
    statement to know its caller. A key revoked elsewhere keeps working here
    for at most `seconds`; `forget` drops a prefix's keys at once (the process
    that revokes a key calls it). Only valid keys are kept, at most
    `max_entries` (past that it starts again empty), by their hash: the raw key
    is never held."""

    def __init__(self, seconds: float, max_entries: int = 10_000):
        self.seconds = seconds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Verified]] = {}

    def get(self, raw: str) -> Verified | None:
        if self.seconds <= 0:
            return None
        found = self._entries.get(hash_key(raw))
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, raw: str, verified: Verified) -> None:
        if self.seconds <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[hash_key(raw)] = (time.monotonic() + self.seconds, verified)

    def forget(self, prefix: str) -> None:
        with self._lock:
            self._entries = {d: e for d, e in self._entries.items() if e[1].prefix != prefix}


def revoke(session: Session, prefix: str) -> int:
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
    for key in keys:
        key.revoked_at = utcnow()
    return len(keys)


_LOCK_TENANT = select(Tenant.id).where(Tenant.id == bindparam("tenant_id")).with_for_update(key_share=True)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until the transaction ends, so that what reads
    then writes on the tenant's behalf (the active-jobs quota, a first webhook
    secret) runs one transaction at a time, each reading what the one before
    it committed.

    Postgres: SELECT ... FOR NO KEY UPDATE, which still lets other
    transactions insert rows that reference the tenant (a worker's webhook
    deliveries). SQLite: pysqlite begins its transaction only at the first
    write, so a SELECT would run outside it and lock nothing; a no-op UPDATE
    takes the database's write lock (waiting busy_timeout for it), and the
    reads after it see every write committed before."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_TENANT, {"tenant_id": tenant_id})
    else:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
                        .execution_options(synchronize_session=False))
