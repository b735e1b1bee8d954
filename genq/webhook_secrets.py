"""Per-tenant webhook secrets, sealed at rest, and the Standard Webhooks
signature made with them.

A tenant has one current secret, made on first use. Rotating it makes a new
one and lets the old one keep signing beside it for a grace period: during
that time each delivery carries one signature per live secret
(`webhook-signature: v1,<new> v1,<old>`), and a receiver holding either key
verifies it, so keys can be swapped without dropping a delivery.

Signing needs the secret itself, so it cannot be stored hashed; it is stored
sealed (Fernet: AES-128-CBC and an HMAC-SHA256) under a key that is not in the
database (GENQ_WEBHOOK_SECRET_KEYS, or a file in GENQ_HOME when embedded), so a
dump of the database alone reveals no secret. A row from before sealing (its
secret in plain, "whsec_...") is sealed the first time it is read, or all at
once by `python -m genq.webhook_secrets reencrypt`.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from genq.errors import ConfigError
from genq.keys import lock_tenant
from genq.schema import WebhookSecret, utcnow

PREFIX = "whsec_"
# The embedded default's key, made once in GENQ_HOME (mode 600) like its API key.
KEY_FILE = "webhook-key"
# Rotated-out secrets that keep signing during their grace period, at most.
# Each one is a signature on every delivery; a rotation past this ends the
# grace of the oldest at once (the tenant rotated again since, so its
# receivers have had two newer keys to move to).
MAX_PREVIOUS = 2


class Sealer:
    """Seals secrets for the database and opens them again: the first key
    seals, any key opens, so keys rotate by putting a new one first."""

    def __init__(self, keys: Sequence[str | bytes]):
        if not keys:
            raise ValueError("a Sealer needs at least one key, got none")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def from_settings(cls, settings) -> "Sealer":
        """The Sealer these settings describe. Embedded (SQLite, every process
        on one machine), a key is made once in GENQ_HOME when none is
        configured; a shared database needs the same key in every API and
        webhook sender, so there one must be configured."""
        keys = settings.webhook_secret_keys
        if not keys:
            if not settings.embedded_database:
                raise ConfigError("GENQ_WEBHOOK_SECRET_KEYS is unset: with a shared database the API and the webhook "
                                  "sender seal and open the tenants' webhook secrets with the same key. Make one "
                                  "with `python -m genq.webhook_secrets new-key` and give it to both")
            keys = (home_key(Path(settings.home)),)
        return cls(keys)

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise ConfigError(UNKNOWN_KEY) from None

    def reseal(self, sealed: str) -> str:
        """The same secret sealed under the first key."""
        try:
            return self._fernet.rotate(sealed.encode()).decode()
        except InvalidToken:
            raise ConfigError(UNKNOWN_KEY) from None


UNKNOWN_KEY = ("a webhook secret in the database was sealed with a key that is not among GENQ_WEBHOOK_SECRET_KEYS "
               "(or the embedded default's, GENQ_HOME/webhook-key); add that key back, after the current one")


def home_key(home: Path) -> bytes:
    """The embedded default's key: GENQ_HOME/webhook-key, made on first use,
    readable by its owner only. Written whole and then linked into place, so
    processes starting together all read the one key that won."""
    path = home / KEY_FILE
    if not path.exists():
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=home, prefix=".webhook-key-")  # mode 600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key() + b"\n")
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_bytes().strip()


def _secret(session: Session, row: WebhookSecret, sealer: Sealer) -> str:
    """The secret of a row; a row stored before sealing is sealed now."""
    if row.sealed.startswith(PREFIX):
        secret = row.sealed
        row.sealed = sealer.seal(secret)
        session.flush()
        return secret
    return sealer.open(row.sealed)


def reencrypt(session: Session, sealer: Sealer) -> int:
    """Every stored secret sealed again under the first key (plain ones sealed
    for the first time); once done, the other keys can be dropped. Returns
    how many rows it rewrote."""
    rows = session.scalars(select(WebhookSecret).with_for_update()).all()
    for row in rows:
        row.sealed = sealer.seal(row.sealed) if row.sealed.startswith(PREFIX) else sealer.reseal(row.sealed)
    session.flush()
    return len(rows)


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


def current(session: Session, tenant_id: str, sealer: Sealer) -> str:
    """The tenant's current secret, made now if it has none yet."""
    found = _current(session, tenant_id)
    if found is not None:
        return _secret(session, found, sealer)
    # Two first requests at once must not both make a "current" secret.
    lock_tenant(session, tenant_id)
    found = _current(session, tenant_id)
    if found is not None:
        return _secret(session, found, sealer)
    secret = new_secret()
    session.add(WebhookSecret(tenant_id=tenant_id, sealed=sealer.seal(secret)))
    session.flush()
    return secret


def rotate(session: Session, tenant_id: str, grace_seconds: float, sealer: Sealer,
           now: dt.datetime | None = None) -> tuple[str, dt.datetime]:
    """Make a new current secret; the old one signs beside it until the
    returned time. Secrets whose grace has run out are deleted, and so are
    the oldest in grace beyond MAX_PREVIOUS, so rotating in a loop never
    piles up signing keys."""
    now = now or utcnow()
    lock_tenant(session, tenant_id)
    current(session, tenant_id, sealer)
    old = _current(session, tenant_id)
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
    secret = new_secret()
    session.add(WebhookSecret(tenant_id=tenant_id, sealed=sealer.seal(secret), created_at=now))
    session.flush()
    return secret, until


def signing_keys(session: Session, tenant_id: str, sealer: Sealer, now: dt.datetime | None = None) -> list[str]:
    """Every secret that signs now: the current one first, then those still in their grace period."""
    now = now or utcnow()
    key = current(session, tenant_id, sealer)
    older = session.scalars(
        select(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_not(None), WebhookSecret.expires_at > now)
        .order_by(WebhookSecret.created_at.desc())
    ).all()
    return [key, *[k for k in (_secret(session, row, sealer) for row in older) if k != key]]


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


def main(argv: list[str]) -> int:
    """`python -m genq.webhook_secrets new-key`: a key for GENQ_WEBHOOK_SECRET_KEYS.
    `python -m genq.webhook_secrets reencrypt`: every stored secret sealed
    under the first of the configured keys (after a new one was put first)."""
    if argv == ["new-key"]:
        print(Fernet.generate_key().decode())
        return 0
    if argv == ["reencrypt"]:
        from genq.db import make_engine, make_sessionmaker
        from genq.settings import Settings

        try:
            settings = Settings.from_env()
            with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
                count = reencrypt(session, Sealer.from_settings(settings))
        except ConfigError as exc:
            print(f"genq.webhook_secrets: {exc.message}", file=sys.stderr)
            return 2
        print(f"{count} webhook secret(s) sealed under the first key")
        return 0
    print("usage: python -m genq.webhook_secrets new-key | reencrypt", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
