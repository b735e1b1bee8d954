"""Per-tenant request rate limits (counted in Redis so every API process
shares them, in leased batches), the quota on jobs queued or running at once and the quota on
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
                    "console.page", "console.asset",
                    "metrics.metrics"}
# After Redis fails, count in memory this long (seconds) before trying it again.
REDIS_RETRY_SECONDS = 5.0
PREFIX = "genq-rl"
# Set in a request's environ once its token was spent below Flask (api/fastpoll.py).
COUNTED = "genq.rate_counted"


def limit_key() -> str:
    c = current_caller()
    return f"tenant:{c.tenant_id}" if c else f"ip:{request.remote_addr or '-'}"


def storage_uri(settings: Settings) -> str:
    if settings.ratelimit_storage_url:
        return settings.ratelimit_storage_url
    # With a Redis broker, count in that Redis; embedded, in this process.
    return settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else "memory://"


# A process leases tokens from the shared budget in batches and spends them
# locally: most requests cost no Redis round trip. A lease is at most
# 1/LEASE_SHARE of the limit and at most MAX_LEASE tokens (so a limit under
# LEASE_SHARE is counted one request at a time, exactly as before), and its
# tokens lapse LEASE_SECONDS after they were counted.
LEASE_SHARE = 100
MAX_LEASE = 50
LEASE_SECONDS = 1.0
# Leases held at once (one per caller a process served in the last second);
# past it, lapsed ones are dropped.
MAX_LEASES = 10_000


class Lease:
    """Tokens of one caller's budget this process has counted in the shared
    storage and not spent yet; `size` is what the next lease asks for."""

    __slots__ = ("left", "until", "size")

    def __init__(self) -> None:
        self.left, self.until, self.size = 0, 0.0, 1


class Limiter:
    """One budget per caller (a tenant, or an address without a key) across
    every route: a sliding-window counter (the `limits` library's), shared by
    every API process through Redis.

    Tokens are leased: a process takes a batch of them from the shared budget
    in one round trip (a Lua script) and spends them locally, so most requests
    make no round trip at all. A lease starts at one token, doubles while the
    caller keeps spending them all within LEASE_SECONDS and halves when some
    lapse unspent, up to the cap: 1/LEASE_SHARE of the limit, at most MAX_LEASE
    (`lease_cap`). Near the limit, when a whole lease no longer fits, one
    token is counted at a time (a second round trip). The bound: tokens are counted up to LEASE_SECONDS before the requests
    they admit, so in any window a caller gets at most the limit plus one
    lease cap per API process (1200/minute: 12 per process; under 100 per
    window: exact); tokens that lapse unspent count against the caller, at
    most a lease per process and second.

    Redis down is no outage: requests are counted in this process's memory
    meanwhile (one at a time), and Redis is tried again every
    REDIS_RETRY_SECONDS."""

    def __init__(self, item: RateLimitItem, uri: str, clock=time.monotonic):
        self.item = item
        self.memory = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.shared = None
        if not uri.startswith("memory://"):
            options = {"socket_timeout": 1, "socket_connect_timeout": 1} if uri.startswith(("redis", "rediss")) else {}
            self.shared = SlidingWindowCounterRateLimiter(storage_from_string(uri, **options))
        self.lease_cap = max(1, min(MAX_LEASE, item.amount // LEASE_SHARE))
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _strategy(self) -> SlidingWindowCounterRateLimiter:
        if self.shared is not None and self.clock() >= self._down_until:
            return self.shared
        return self.memory

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self.clock() >= self._down_until:
                log.warning("rate limits are counted in this process for %gs: their storage failed: %s",
                            REDIS_RETRY_SECONDS, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            self._down_until = self.clock() + REDIS_RETRY_SECONDS

    def hit(self, key: str) -> bool:
        """Count a request; False when it is over the budget."""
        strategy = self._strategy()
        if strategy is self.memory:
            return self.memory.hit(self.item, PREFIX, key)
        size = self._spend_or_size(key)
        if not size:
            return True
        try:
            granted = self._take(key, size)
        except Exception as exc:  # the shared storage is down: count here meanwhile
            self._failed(exc)
            return self.memory.hit(self.item, PREFIX, key)
        if not granted:
            return False
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None:
                now = self.clock()
                if lease.left <= 0 or lease.until <= now:
                    lease.left, lease.until = 0, now + LEASE_SECONDS
                # Tokens another thread leased meanwhile keep their (earlier) lapse time.
                lease.left += granted - 1
        return True

    def spend_leased(self, key: str) -> bool:
        """Spend a token this process holds already, with no I/O: False when
        it holds none (then `hit`, which may lease more, decides)."""
        if self._strategy() is self.memory:
            return False
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease.left > 0 and lease.until > self.clock():
                lease.left -= 1
                return True
        return False

    def _spend_or_size(self, key: str) -> int:
        """0 when a token of this process's lease was spent; else how many to
        lease: twice the last lease when it was all spent before it lapsed,
        half when some of it lapsed unspent, the cap at most."""
        now = self.clock()
        with self._lock:
            lease = self._leases.get(key)
            if lease is None:
                if len(self._leases) >= MAX_LEASES:
                    self._leases = {k: v for k, v in self._leases.items() if v.until > now}
                lease = self._leases[key] = Lease()
            elif lease.left > 0 and lease.until > now:
                lease.left -= 1
                return 0
            elif lease.until:
                spent = lease.left <= 0 and lease.until > now
                lease.size = min(self.lease_cap, lease.size * 2) if spent else max(1, lease.size // 2)
            # Judged once: a thread that finds it empty too asks for the same size.
            lease.left, lease.until = 0, 0.0
            return lease.size

    def _take(self, key: str, size: int) -> int:
        """Count `size` tokens in the shared budget, or one when fewer are left;
        how many were counted (0: none are left)."""
        for cost in (size, 1) if size > 1 else (1,):
            if self.shared.hit(self.item, PREFIX, key, cost=cost):
                return cost
        return 0

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
        if request.endpoint in EXEMPT_ENDPOINTS or request.environ.get(COUNTED):
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
