"""Which errors mean a dependency is unreachable — an outage to wait out and
retry — rather than a bug: the API answers them 503 with Retry-After, and
workers retry their writes through them instead of failing a job."""
from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import botocore.exceptions
import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a client is told to wait (Retry-After) while a dependency is down.
RETRY_AFTER = 5


def unavailable(exc: BaseException | None) -> str | None:
    """"database", "storage" or "broker" when `exc`, or an exception it was
    raised from, says that dependency cannot be reached; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _database_down(exc):
            return "database"
        if _storage_down(exc):
            return "storage"
        if isinstance(exc, (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
                            redis.exceptions.TimeoutError)):
            return "broker"
        exc = exc.__cause__ or exc.__context__
    return None


def _database_down(exc: BaseException) -> bool:
    # OperationalError: refused, reset, server shutting down, too many
    # connections. TimeoutError: the pool had no connection to give in time.
    # Any other DBAPIError counts only when the driver says the connection died.
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)):
        return True
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and bool(exc.connection_invalidated)


def _storage_down(exc: BaseException) -> bool:
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        return True
    # S3's own 5xx answers (503 SlowDown, 500 InternalError) are transient too.
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return False


def retry(fn: Callable[[], T], *, within: float, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `fn` until it stops failing for an outage, waiting 0.2 s, 0.4 s...
    (at most 5 s) between tries, for up to `within` seconds; any other error,
    or an outage that outlasts `within`, is raised."""
    deadline = time.monotonic() + within
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            down = unavailable(exc)
            if down is None or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: the %s is unreachable (%s); trying again in %.1fs", what, down,
                        (str(exc) or type(exc).__name__).splitlines()[0][:200], delay)
        sleep(delay)
        delay = min(delay * 2, 5.0)
