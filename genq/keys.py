"""Tenants and their API keys: random, shown once, stored as a hash."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select, update
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


def revoke(session: Session, prefix: str) -> int:
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
    for key in keys:
        key.revoked_at = utcnow()
    return len(keys)


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
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    else:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
                        .execution_options(synchronize_session=False))
