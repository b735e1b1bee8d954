"""Per-tenant request rate limits (counted in Redis so every API process
shares them), the quota on jobs queued or running at once and the quota on
bytes of uploaded files."""
from __future__ import annotations

import logging
import math
import threading
import time

from flask import Flask, request
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy import func, select

from api.auth import current_caller
from api.errors import ApiError, problem
from genq.jobs import TooManyActive
from genq.keys import lock_tenant
from genq.schema import File
from genq.settings import Settings

log = logging.getLogger(__name__)

# Probes and documents are never limited: a load balancer must always see them.
EXEMPT_ENDPOINTS = {"health.healthz", "health.readyz", "docs.openapi", "docs.docs", "docs.docs_asset", "static",
                    "metrics.metrics"}
# After Redis fails, count in memory this long (seconds) before trying it again.
REDIS_RETRY_SECONDS = 5.0
PREFIX = "genq-rl"


def limit_key() -> str:
    c = current_caller()
    return f"tenant:{c.tenant_id}" if c else f"ip:{request.remote_addr or '-'}"


def storage_uri(settings: Settings) -> str:
    if settings.ratelimit_storage_url:
        return settings.ratelimit_storage_url
    # With a Redis broker, count in that Redis; embedded, in this process.
    return settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else "memory://"


class Limiter:
    """One budget per caller (a tenant, or an address without a key) across
    every route: a sliding-window counter (the `limits` library's), one Redis
    round trip (a Lua script) per request. Redis down is no outage: requests
    are counted in this process's memory meanwhile, and Redis is tried again
    every REDIS_RETRY_SECONDS."""

    def __init__(self, item: RateLimitItem, uri: str):
        self.item = item
        self.memory = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.shared = None
        if not uri.startswith("memory://"):
            options = {"socket_timeout": 1, "socket_connect_timeout": 1} if uri.startswith(("redis", "rediss")) else {}
            self.shared = SlidingWindowCounterRateLimiter(storage_from_string(uri, **options))
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _strategy(self) -> SlidingWindowCounterRateLimiter:
        if self.shared is not None and time.monotonic() >= self._down_until:
            return self.shared
        return self.memory

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if time.monotonic() >= self._down_until:
                log.warning("rate limits are counted in this process for %gs: their storage failed: %s",
                            REDIS_RETRY_SECONDS, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            self._down_until = time.monotonic() + REDIS_RETRY_SECONDS

    def hit(self, key: str) -> bool:
        """Count a request; False when it is over the budget."""
        strategy = self._strategy()
        try:
            return strategy.hit(self.item, PREFIX, key)
        except Exception as exc:  # the shared storage is down: count here meanwhile
            if strategy is self.memory:
                raise
            self._failed(exc)
            return self.memory.hit(self.item, PREFIX, key)

    def retry_after(self, key: str) -> int:
        """Seconds until the budget has room again: at least 1, at most the window."""
        strategy = self._strategy()
        try:
            reset = strategy.get_window_stats(self.item, PREFIX, key).reset_time
        except Exception as exc:
            if strategy is self.memory:
                raise
            self._failed(exc)
            reset = self.memory.get_window_stats(self.item, PREFIX, key).reset_time
        return max(1, min(math.ceil(reset - time.time()), self.item.get_expiry()))


def init_limiter(app: Flask, settings: Settings) -> Limiter | None:
    if not settings.rate_limit:
        return None
    limiter = Limiter(parse(settings.rate_limit), storage_uri(settings))

    @app.before_request
    def _limit():
        if request.endpoint in EXEMPT_ENDPOINTS:
            return None
        key = limit_key()
        if limiter.hit(key):
            return None
        retry = limiter.retry_after(key)
        return problem(429, f"rate limit of {limiter.item} exceeded; retry in {retry}s",
                       headers={"Retry-After": retry})

    return limiter


def lock_for_active_jobs(session, tenant_id: str, settings: Settings) -> int:
    """A tenant may have at most `max_active_jobs` queued or running at once.
    Call it in the transaction that inserts the job, then pass what it returns
    to genq.jobs.submit(max_active=...), which counts and inserts in one
    statement: the tenant's row stays locked until the commit, so concurrent
    submits count one after another and never all see room for one more."""
    if not settings.max_active_jobs:
        return 0
    lock_tenant(session, tenant_id)
    return settings.max_active_jobs


def too_many_active(exc: TooManyActive, settings: Settings) -> ApiError:
    return ApiError(429, f"you have {exc.active} jobs queued or running, the most allowed at once is "
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
