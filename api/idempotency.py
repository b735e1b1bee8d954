"""The Idempotency-Key header on POST /v1/jobs and POST /v1/files.

A client that did not hear back (a timeout, a 503, an API that died after the
commit) sends the same request again with the same key and gets what the first
one made, never a second job. The same key with a different request is 422.
Keys are per tenant and kept for at least GENQ_IDEMPOTENCY_TTL (24 h).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from flask import request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import caller
from api.context import ctx
from api.errors import ApiError
from genq import idempotency

HEADER = "Idempotency-Key"
# Visible ASCII, as Stripe and the IETF draft use them (UUIDs, ULIDs, hashes).
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
# Replies that return what an earlier request made carry this header.
REPLAYED = {"Idempotent-Replayed": "true"}


@dataclass(frozen=True)
class Key:
    tenant_id: str
    value: str
    request_hash: str
    resource: str

    def earlier(self) -> str | None:
        """The id of what an earlier request with this key made, or None.
        The key used with a different request is a 422."""
        with ctx().read() as conn:
            found = idempotency.find(conn, self.tenant_id, self.value, self.request_hash)
        if found is None:
            return None
        if not found.same_request or found.resource != self.resource:
            message = (f"was already used with a different request (it made {found.resource} {found.resource_id}); "
                       f"send a new key with a new request")
            raise ApiError(422, f"{HEADER} {self.value!r} {message}", errors=[{"field": HEADER, "message": message}])
        return found.resource_id


def from_request(resource: str, content) -> Key | None:
    """The request's key, or None without the header. `content` is what makes
    two requests the same (the parsed JSON body, or a file's digest)."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # the draft's structured-field string form: "abc"
    if not KEY_RE.match(value):
        raise ApiError(400, f"the {HEADER} header must be 1 to 255 visible ASCII characters, got {raw[:80]!r}")
    route = f"{request.method} {request.path}"
    return Key(caller().tenant_id, value, idempotency.request_hash(route, content), resource)


class Race:
    """Records the key beside what it made; after the transaction, `winner` is
    the id a concurrent duplicate committed first, if one did."""

    def __init__(self, key: Key | None):
        self.key = key
        self.winner: str | None = None

    def record(self, session: Session, resource_id: str) -> None:
        if self.key is not None:
            idempotency.record(session, self.key.tenant_id, self.key.value, self.key.request_hash, self.key.resource,
                               resource_id)


@contextmanager
def race(key: Key | None) -> Iterator[Race]:
    """Wrap the transaction that makes the resource: a duplicate that lost the
    race on the unique (tenant, key) constraint has had its transaction rolled
    back (its job with it) and gets the winner's id instead of an error."""
    state = Race(key)
    try:
        yield state
    except IntegrityError:
        winner = key.earlier() if key is not None else None
        if winner is None:  # some other constraint failed
            raise
        state.winner = winner
