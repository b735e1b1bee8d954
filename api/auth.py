"""Bearer API keys: every /v1 route knows its tenant, or answers 401."""
from __future__ import annotations

from dataclasses import dataclass
from functools import wraps

from flask import g, request

from api.context import ctx
from api.errors import ApiError
from genq.keys import authenticate


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    tenant_name: str
    role: str


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, headers={"WWW-Authenticate": 'Bearer realm="genq"'})


def require_key(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise _unauthorized("send an API key as 'Authorization: Bearer <key>'")
        with ctx().session() as session:
            found = authenticate(session, raw.strip())
            if found is None:
                raise _unauthorized("the API key is not valid or has been revoked")
            tenant, key = found
            g.caller = Caller(tenant.id, tenant.name, key.role)
        return view(*args, **kwargs)

    return wrapper


def caller() -> Caller:
    return g.caller
