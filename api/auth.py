"""Bearer API keys: every /v1 route knows its tenant, or answers 401."""
from __future__ import annotations

from dataclasses import dataclass
from functools import wraps

from flask import g, request

from api.context import ctx
from api.errors import ApiError
from genq.keys import verify


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    tenant_name: str
    role: str
    # The tenant's own retention override, read with the key (so cached with it).
    retention: dict | None = None


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, headers={"WWW-Authenticate": 'Bearer realm="genq"'})


_MISSING = object()


def current_caller() -> Caller | None:
    """The authenticated caller of this request, or None. Looked up once per
    request: the rate limiter keys on it before the view runs."""
    found = g.get("caller", _MISSING)
    if found is not _MISSING:
        return found
    scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
    raw = raw.strip()
    result = None
    if scheme.lower() == "bearer" and raw:
        # A key verified moments ago in this process needs no statement; see
        # GENQ_KEY_CACHE_SECONDS for how long a revocation elsewhere takes.
        keys = ctx().keys
        found = keys.get(raw)
        if found is None:
            with ctx().read() as conn:
                found = verify(conn, raw)
            if found is not None:
                keys.put(raw, found)
        if found is not None:
            result = Caller(found.tenant_id, found.tenant_name, found.role, found.retention)
    g.caller = result
    return result


def require_key(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise _unauthorized("send an API key as 'Authorization: Bearer <key>'")
        if current_caller() is None:
            raise _unauthorized("the API key is not valid or has been revoked")
        return view(*args, **kwargs)

    return wrapper


def require_admin(view):
    """Admin routes: a valid key with the admin role, else 401 / 403."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        if caller().role != "admin":
            raise ApiError(403, "this route needs an admin key")
        return view(*args, **kwargs)

    return require_key(wrapper)


def caller() -> Caller:
    return g.caller
