"""Admin routes (admin keys only): tenants and their API keys; pools (pause,
resume), workers (drain) and retrying failed jobs."""
from __future__ import annotations

from typing import Annotated

from flask import Blueprint
from pydantic import BaseModel, ConfigDict, Field, with_config
from sqlalchemy import func, null, select
from typing_extensions import TypedDict

from api import serialize
from api.auth import require_admin
from api.context import ctx
from api.errors import ApiError
from api.jobs import ID_RE, json_body, render
from genq import pools as poollib
from genq import retention
from genq.keys import create_key, revoke
from genq.queue import publish
from genq.schema import ApiKey, Job, Tenant
from genq.serialize import Timestamp, rfc3339

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


class RetentionSet(BaseModel):
    """A tenant's own retention (seconds; 0 keeps; null or absent: the service's setting)."""

    model_config = ConfigDict(extra="forbid", title="RetentionSet")

    outputs_seconds: int | None = Field(None, ge=0, le=10 * 365 * 24 * 3600)
    jobs_seconds: int | None = Field(None, ge=0, le=10 * 365 * 24 * 3600)
    files_seconds: int | None = Field(None, ge=0, le=10 * 365 * 24 * 3600)


def _named_tenant(session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise ApiError(404, f"no tenant {name!r}")
    return tenant


def _retention(name: str, own: dict | None) -> dict:
    own = own or {}
    found = retention.effective(ctx().settings, own)
    return {"tenant": name, "own": {f"{k}_seconds": own.get(k) for k in retention.KINDS},
            "effective": {f"{k}_seconds": v for k, v in found.items()}}


@bp.get("/tenants/<name>/retention")
@require_admin
def get_retention(name: str):
    with ctx().session() as session:
        tenant = _named_tenant(session, name)
        return _retention(tenant.name, tenant.retention)


@bp.put("/tenants/<name>/retention")
@require_admin
def set_retention(name: str):
    """How long this tenant's outputs, finished jobs and files are kept, in
    place of the settings; the next sweep applies it, `expires_at` shows it
    within 30 s."""
    req = RetentionSet.model_validate(json_body(), strict=True)
    own = {k: v for k, v in (("outputs", req.outputs_seconds), ("jobs", req.jobs_seconds),
                             ("files", req.files_seconds)) if v is not None}
    with ctx().session() as session, session.begin():
        tenant = _named_tenant(session, name)
        # SQL NULL, not JSON null: no override at all.
        tenant.retention = own or null()
        answer = _retention(tenant.name, own)
    # Each API process shows it in `expires_at` once its cached keys of this
    # tenant are verified again (GENQ_KEY_CACHE_SECONDS); the sweep reads it now.
    return answer


@bp.get("/keys")
@require_admin
def list_keys():
    """Every key by its prefix (never the key, stored only hashed), newest first, revoked ones too."""
    with ctx().session() as session:
        rows = session.execute(select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
                               .order_by(ApiKey.created_at.desc())).all()
        return {"data": [{"prefix": k.prefix, "tenant": name, "role": k.role, "created_at": rfc3339(k.created_at),
                          "revoked_at": rfc3339(k.revoked_at)} for k, name in rows],
                "next_cursor": None}


@bp.post("/keys")
@require_admin
def make_key():
    req = KeyCreate.model_validate(json_body(), strict=True)
    with ctx().session() as session, session.begin():
        tenant, raw = create_key(session, req.tenant, req.role)
    # The only time the key is shown; it is stored as a hash.
    return {"key": raw, "prefix": raw[:10], "tenant": tenant.name, "role": req.role}, 201


@bp.post("/keys/<prefix>/revoke")
@require_admin
def revoke_key(prefix: str):
    with ctx().session() as session, session.begin():
        count = revoke(session, prefix)
    # This process stops honouring the key now; others within GENQ_KEY_CACHE_SECONDS.
    ctx().keys.forget(prefix)
    if not count:
        raise ApiError(404, f"no active key with prefix {prefix!r}")
    return {"revoked": count}


def known_pools() -> dict[str, list[str]]:
    """Every pool that runs jobs, with its models: the registry's and training."""
    c = ctx()
    out: dict[str, list[str]] = {c.settings.training_pool: []}
    for spec in c.registry:
        out.setdefault(spec.pool, []).append(spec.name)
    return out


def _times(row: dict, *names: str) -> dict:
    return {**row, **{n: rfc3339(row[n]) for n in names}}


@with_config(ConfigDict(title="Pool"))
class PoolView(TypedDict):
    name: str
    models: list[str]
    paused: bool
    paused_at: Timestamp | None
    queued: int
    running: int
    oldest_queued_seconds: float | None
    workers: int
    succeeded_last_5m: int
    throughput_per_minute: float
    model_errors: Annotated[dict[str, str], Field(description="Models a live worker of the pool could not load, "
                                                              "with the reason.")]


def pool_view(row: dict) -> PoolView:
    return _times(row, "paused_at")


def _pool(session, name: str) -> PoolView:
    return pool_view(next(p for p in poollib.stats(session, known_pools(), ctx().settings.heartbeat_interval)
                          if p["name"] == name))


@bp.get("/pools")
@require_admin
def list_pools():
    with ctx().session() as session:
        rows = poollib.stats(session, known_pools(), ctx().settings.heartbeat_interval)
    return {"data": [pool_view(r) for r in rows], "next_cursor": None}


def _existing_pool(name: str) -> str:
    if name not in known_pools():
        raise ApiError(404, f"no pool {name!r}; pools: {sorted(known_pools())}")
    return name


@bp.post("/pools/<name>/pause")
@require_admin
def pause_pool(name: str):
    with ctx().session() as session, session.begin():
        poollib.set_paused(session, _existing_pool(name), True)
    with ctx().session() as session:
        return _pool(session, name)


@bp.post("/pools/<name>/resume")
@require_admin
def resume_pool(name: str):
    with ctx().session() as session, session.begin():
        ring = poollib.resume(session, _existing_pool(name))
    # Doorbells that came while paused were dropped; ring for what waits now.
    for job_id, pool in ring:
        publish(ctx().celery, job_id, pool)
    with ctx().session() as session:
        return _pool(session, name)


def _worker(row: dict) -> dict:
    return _times(row, "started_at", "last_seen_at", "drain_requested_at")


@bp.get("/workers")
@require_admin
def list_workers():
    with ctx().session() as session:
        rows = poollib.workers(session, ctx().settings.heartbeat_interval)
    return {"data": [_worker(r) for r in rows], "next_cursor": None}


@bp.post("/workers/<name>/drain")
@require_admin
def drain_worker(name: str):
    with ctx().session() as session, session.begin():
        if poollib.request_drain(session, name) is None:
            raise ApiError(404, f"no worker {name!r} has reported; GET /v1/admin/workers lists them")
    with ctx().session() as session:
        return _worker(next(r for r in poollib.workers(session, ctx().settings.heartbeat_interval) if r["name"] == name))


@bp.post("/jobs/<job_id>/retry")
@require_admin
def retry_job(job_id: str):
    with ctx().session() as session, session.begin():
        job = session.get(Job, job_id) if ID_RE.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        job = poollib.retry(session, job)
    publish(ctx().celery, job.id, job.pool)
    return render(job)
