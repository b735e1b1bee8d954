"""Admin routes (admin keys only): tenants and their API keys."""
from __future__ import annotations

from flask import Blueprint
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from api import serialize
from api.auth import require_admin
from api.context import ctx
from api.errors import ApiError
from api.jobs import json_body
from genq.keys import create_key, revoke
from genq.schema import ApiKey, Job, Tenant
from models.base import pydantic_errors

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                        description="Tenant name; made if new.")
    role: str = Field("user", pattern="^(user|admin)$")


@bp.get("/tenants")
@require_admin
def list_tenants():
    with ctx().session() as session:
        jobs = dict(session.execute(select(Job.tenant_id, func.count()).group_by(Job.tenant_id)).all())
        keys = dict(session.execute(select(ApiKey.tenant_id, func.count()).where(ApiKey.revoked_at.is_(None))
                                    .group_by(ApiKey.tenant_id)).all())
        tenants = session.scalars(select(Tenant).order_by(Tenant.name)).all()
        return {"data": [{"id": t.id, "name": t.name, "created_at": serialize.rfc3339(t.created_at),
                          "jobs": jobs.get(t.id, 0), "active_keys": keys.get(t.id, 0)} for t in tenants],
                "next_cursor": None}


@bp.post("/keys")
@require_admin
def make_key():
    try:
        req = KeyCreate.model_validate(json_body(), strict=True)
    except ValidationError as exc:
        errors = pydantic_errors(exc, prefix="")
        raise ApiError(422, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors) from None
    with ctx().session() as session, session.begin():
        tenant, raw = create_key(session, req.tenant, req.role)
    # The only time the key is shown; it is stored as a hash.
    return {"key": raw, "prefix": raw[:10], "tenant": tenant.name, "role": req.role}, 201


@bp.post("/keys/<prefix>/revoke")
@require_admin
def revoke_key(prefix: str):
    with ctx().session() as session, session.begin():
        count = revoke(session, prefix)
    if not count:
        raise ApiError(404, f"no active key with prefix {prefix!r}")
    return {"revoked": count}
