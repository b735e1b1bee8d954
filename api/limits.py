"""Per-tenant request rate limits (flask-limiter, counted in Redis so every API
process shares them), the quota on jobs queued or running at once and the
quota on bytes of uploaded files."""
from __future__ import annotations

import logging
import math
import time

from flask import Flask, request
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from sqlalchemy import func, select

from api.auth import current_caller
from api.errors import ApiError, problem
from genq.keys import lock_tenant
from genq.schema import File, Job
from genq.settings import Settings
from genq.states import JobStatus

log = logging.getLogger(__name__)

# Probes and documents are never limited: a load balancer must always see them.
EXEMPT_ENDPOINTS = {"health.healthz", "health.readyz", "docs.openapi", "docs.docs", "docs.docs_asset", "static",
                    "metrics.metrics"}


def limit_key() -> str:
    c = current_caller()
    return f"tenant:{c.tenant_id}" if c else f"ip:{get_remote_address()}"


def storage_uri(settings: Settings) -> str:
    if settings.ratelimit_storage_url:
        return settings.ratelimit_storage_url
    # With a Redis broker, count in that Redis; embedded, in this process.
    return settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else "memory://"


def init_limiter(app: Flask, settings: Settings) -> Limiter:
    limiter = Limiter(
        key_func=limit_key,
        app=app,
        storage_uri=storage_uri(settings),
        # One budget per tenant across every route (application limits share
        # one counter per key); default limits would count each route apart.
        application_limits=[settings.rate_limit] if settings.rate_limit else [],
        application_limits_exempt_when=lambda: request.endpoint in EXEMPT_ENDPOINTS,
        # Our 429 problem sets Retry-After itself; the limiter's header injection
        # would overwrite the quota's own Retry-After on every 429.
        headers_enabled=False,
        strategy="moving-window",
        # Redis down must not take the API down with it: count in memory meanwhile.
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        key_prefix="genq-rl",
    )

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded):
        current = limiter.current_limit
        retry = 60
        if current is not None:
            # The moving window reports its reset a second past the window; never say more than the window.
            retry = max(1, min(math.ceil(current.reset_at - time.time()), current.limit.get_expiry()))
        return problem(429, f"rate limit of {exc.description} exceeded; retry in {retry}s",
                       headers={"Retry-After": retry})

    return limiter


def check_active_jobs(session, tenant_id: str, settings: Settings) -> None:
    """A tenant may have at most `max_active_jobs` queued or running at once.
    Call it in the transaction that inserts the job: it locks the tenant's row
    until the commit, so concurrent submits count one after another and never
    all see room for one more."""
    if not settings.max_active_jobs:
        return
    lock_tenant(session, tenant_id)
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])))
    if active >= settings.max_active_jobs:
        raise ApiError(429, f"you have {active} jobs queued or running, the most allowed at once is "
                            f"{settings.max_active_jobs}; wait for some to finish", headers={"Retry-After": 5})


def check_file_quota(session, tenant_id: str, new_bytes: int, settings: Settings, *, lock: bool = False) -> None:
    """A tenant's uploaded files may total at most `max_tenant_file_bytes`.
    With `lock`, first take the tenant's row for the rest of the transaction
    (a row lock on Postgres, the write lock on SQLite), so two concurrent
    uploads count each other: the second sums only after the first commits."""
    quota = settings.max_tenant_file_bytes
    if not quota:
        return
    if lock:
        lock_tenant(session, tenant_id)
    used = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id))
    if used + new_bytes > quota:
        message = (f"is {new_bytes} bytes; with the {used} bytes of files you have stored it would pass your "
                   f"quota of {quota} bytes (GENQ_MAX_TENANT_FILE_BYTES)")
        raise ApiError(413, f"file: {message}", errors=[{"field": "file", "message": message}])
