"""Live output: a running job's output as it grows (text deltas), from the
worker to the event streams.

Live data is best-effort, not record: the final output and the durable events
are in the database, so a delta that cannot be published is dropped (and
logged), never raised to the worker, whose job must not fail for it. A
worker publishes numbered deltas; an API process reads those after a cursor,
waiting briefly for the first. Both calls are keyed by tenant and job, and
every key and path is scoped to the tenant.

- RedisLive (a Redis broker): one stream per job, `genq-live:<tenant>:<job>`,
  entry id `<index + 1>-0` so the delta index is the stream id: a retried
  publish of an index already there is refused by Redis and ignored here, and
  XREAD after `<after + 1>-0` is "deltas after `after`". Each publish renews
  the key's expiry (TTL_SECONDS) and the stream keeps its newest MAX_ENTRIES,
  so a runaway job cannot fill Redis and a finished job's stream goes away.
- FileLive (the embedded default, no Redis): an append-only file of JSON lines
  `{"i": index, "d": delta}` per job under `$GENQ_HOME/live/<tenant>/<job>`,
  read by polling. Nothing removes the files of finished jobs yet: a cleanup
  (e.g. the reconciler's round) may delete those older than TTL_SECONDS.

One Live per process; both are safe to share between threads.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterable, Protocol

import redis

from genq.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "genq-live"
# A job's live output outlives its last publish by this long (seconds): long
# enough for a client to reconnect and read the end, short enough that Redis
# holds only the output of recent jobs.
TTL_SECONDS = 3600
# The most deltas kept per job. At the worker's ~20 publishes a second that is
# over 8 minutes of output; past it Redis drops the oldest (a late reader
# misses the head, never the tail) and a file takes no more.
MAX_ENTRIES = 10_000
# How often FileLive looks at a file while a read waits (seconds).
POLL_SECONDS = 0.05
# After Redis fails, publishes are dropped without trying for this long
# (seconds): a worker's decode loop must not wait out a connect timeout at
# every step while Redis is away.
RETRY_SECONDS = 5.0
# The longest one XREAD blocks; a longer read waits in several, so the
# socket's read timeout stays short (redis-py would time out a longer BLOCK).
MAX_BLOCK_SECONDS = 1.0
SOCKET_TIMEOUT = MAX_BLOCK_SECONDS + 1.0
CONNECT_TIMEOUT = 1.0

# Tenant and job ids are generated (32 hex digits); anything else -- a path
# separator, `..`, a `:` that would make two tenants' keys meet -- is refused.
ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")

Delta = tuple[int, str]


class Live(Protocol):
    def publish(self, tenant_id: str, job_id: str, deltas: Iterable[Delta]) -> None:
        """Append (index, delta) pairs; index 0, 1, 2... per job. An index at or
        below one already published is ignored. Never raises for the store."""

    def publish_many(self, batch: Iterable[tuple[str, str, list[Delta]]]) -> None:
        """publish() for several jobs at once, (tenant_id, job_id, deltas) each:
        a running batch's step in one round trip."""

    def read(self, tenant_id: str, job_id: str, after: int = -1, block_seconds: float = 0.0) -> list[Delta]:
        """The deltas with index > after (after=-1: all), in order, waiting up to
        block_seconds for the first when there are none yet."""

    def clear(self, tenant_id: str, job_id: str) -> None:
        """Forget a job's deltas: a new attempt writes its own from index 0."""
        ...

    def close(self) -> None: ...


def live_for(settings: Settings) -> Live:
    """Redis streams when the broker is Redis, else files under GENQ_HOME."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisLive(redis.Redis.from_url(settings.broker_url, socket_timeout=SOCKET_TIMEOUT,
                                              socket_connect_timeout=CONNECT_TIMEOUT))
    return FileLive(settings.home / "live")


def check_ids(tenant_id: str, job_id: str) -> None:
    for name, value in (("tenant_id", tenant_id), ("job_id", job_id)):
        if not isinstance(value, str) or not ID_RE.fullmatch(value):
            raise ValueError(f"{name} must be a generated id (letters, digits, - or _), got {value!r}")


def _check_after(after: int) -> None:
    if not isinstance(after, int) or after < -1:
        raise ValueError(f"after must be -1 (all deltas) or a delta index, got {after!r}")


def _checked(deltas: Iterable[Delta]) -> list[Delta]:
    out = []
    for index, delta in deltas:
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"a delta index must be an int of 0 or more, got {index!r}")
        if not isinstance(delta, str):
            raise ValueError(f"delta {index} must be a str, got {type(delta).__name__}")
        try:
            delta.encode()
        except UnicodeEncodeError:
            raise ValueError(f"delta {index} is not valid text (a lone surrogate: a character split?): {delta!r}") from None
        out.append((index, delta))
    return out


def stream_key(tenant_id: str, job_id: str, prefix: str = KEY_PREFIX) -> str:
    """The Redis stream of a job's live output (RedisLive's key)."""
    check_ids(tenant_id, job_id)
    return f"{prefix}:{tenant_id}:{job_id}"


def stream_cursor(after: int) -> str:
    """The XREAD id that reads the deltas after index `after`."""
    return f"{after + 1}-0"


def decode_entries(entries) -> list[Delta]:
    """(index, delta) pairs from the entries XREAD answered for one stream."""
    return [(int(entry_id.split(b"-")[0]) - 1, fields[b"d"].decode()) for entry_id, fields in entries]


class RedisLive:
    """One Redis stream per job (see the module's doc)."""

    def __init__(self, client: redis.Redis, prefix: str = KEY_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._down_until = 0.0
        self._lock = threading.Lock()

    def key(self, tenant_id: str, job_id: str) -> str:
        return stream_key(tenant_id, job_id, self.prefix)

    def publish(self, tenant_id: str, job_id: str, deltas: Iterable[Delta]) -> None:
        self.publish_many([(tenant_id, job_id, deltas)])

    def publish_many(self, batch: Iterable[tuple[str, str, Iterable[Delta]]]) -> None:
        entries = [(self.key(t, j), j, _checked(d)) for t, j, d in batch]
        entries = [e for e in entries if e[2]]
        if not entries or time.monotonic() < self._down_until:
            return
        # One round trip for the lot; each XADD's error comes back in its own
        # slot, so an index already there (a retried publish) spoils nothing else.
        sent = []
        with self.client.pipeline(transaction=False) as pipe:
            for key, job_id, deltas in entries:
                for index, delta in deltas:
                    pipe.xadd(key, {"d": delta}, id=f"{index + 1}-0", maxlen=MAX_ENTRIES, approximate=True)
                    sent.append((job_id, index))
                pipe.expire(key, TTL_SECONDS)
                sent.append(None)
            try:
                results = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                self._failed(exc)
                return
        self._recovered()
        for what, result in zip(sent, results):
            if what and isinstance(result, redis.ResponseError) and "equal or smaller" not in str(result):
                log.warning("live output: delta %d of job %s not kept: %s", what[1], what[0], result)

    def read(self, tenant_id: str, job_id: str, after: int = -1, block_seconds: float = 0.0) -> list[Delta]:
        key = self.key(tenant_id, job_id)
        _check_after(after)
        deadline = time.monotonic() + max(block_seconds, 0.0)
        while True:
            left = deadline - time.monotonic()
            # BLOCK 0 would wait forever: no BLOCK at all when there is no time left.
            block = int(min(left, MAX_BLOCK_SECONDS) * 1000) if left >= 0.001 else None
            try:
                answer = self.client.xread({key: stream_cursor(after)}, block=block)
            except redis.RedisError as exc:
                # The stream goes on with its durable events: wait as asked, so
                # a caller's loop does not spin while Redis is away.
                self._failed(exc)
                time.sleep(max(deadline - time.monotonic(), 0.0))
                return []
            if answer:
                return decode_entries(answer[0][1])
            if block is None or time.monotonic() >= deadline:
                return []

    def clear(self, tenant_id: str, job_id: str) -> None:
        try:
            self.client.delete(self.key(tenant_id, job_id))
        except redis.RedisError as exc:
            self._failed(exc)

    def close(self) -> None:
        self.client.close()

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            first = self._down_until == 0.0
            self._down_until = time.monotonic() + RETRY_SECONDS
        if first:  # once per outage, not once per step
            log.warning("live output dropped while Redis fails (retrying every %.0fs): %s", RETRY_SECONDS, exc)

    def _recovered(self) -> None:
        if self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.info("live output reaches Redis again")


class FileLive:
    """One append-only JSON-lines file per job (see the module's doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._failing = False

    def path(self, tenant_id: str, job_id: str) -> Path:
        check_ids(tenant_id, job_id)
        return self.root / tenant_id / job_id

    def publish(self, tenant_id: str, job_id: str, deltas: Iterable[Delta]) -> None:
        path, deltas = self.path(tenant_id, job_id), _checked(deltas)
        if not deltas:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a+b") as f:
                # Two publishers of one job (a retry on another worker) take
                # turns, so the file's indices only ever go up.
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    last = _last_index(f)
                except ValueError:
                    # Half a line a crashed writer left: end it, and go by the lines that parse.
                    f.write(b"\n")
                    f.flush()
                    last = max((i for i, _ in _read_lines(path)), default=-1)
                lines = []
                for index, delta in deltas:
                    if index > last and index < MAX_ENTRIES:
                        lines.append(json.dumps({"i": index, "d": delta}) + "\n")
                        last = index
                # One write per publish; a reader may still catch its last line
                # half-written, and reads only lines that end.
                f.write("".join(lines).encode())
                f.flush()
        except OSError as exc:
            if not self._failing:
                log.warning("live output dropped: cannot write %s: %s", path, exc)
            self._failing = True
            return
        self._failing = False

    def publish_many(self, batch: Iterable[tuple[str, str, Iterable[Delta]]]) -> None:
        for tenant_id, job_id, deltas in batch:
            self.publish(tenant_id, job_id, deltas)

    def read(self, tenant_id: str, job_id: str, after: int = -1, block_seconds: float = 0.0) -> list[Delta]:
        path = self.path(tenant_id, job_id)
        _check_after(after)
        deadline = time.monotonic() + max(block_seconds, 0.0)
        seen_size = -1
        while True:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size != seen_size:
                seen_size = size
                found = [d for d in _read_lines(path) if d[0] > after]
                if found:
                    return found
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            time.sleep(min(POLL_SECONDS, left))

    def clear(self, tenant_id: str, job_id: str) -> None:
        try:
            self.path(tenant_id, job_id).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("live output: cannot remove %s: %s", self.path(tenant_id, job_id), exc)

    def close(self) -> None:
        pass


def _read_lines(path: Path) -> list[Delta]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    # A line still being written has no newline yet: it is read next time.
    for line in data.split(b"\n")[:-1]:
        try:
            entry = json.loads(line)
            out.append((int(entry["i"]), str(entry["d"])))
        except (ValueError, KeyError, TypeError):  # half a line a crashed writer left: skipped
            continue
    return out


def _last_index(f) -> int:
    """The index on the file's last line, -1 for an empty file: read from the end."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return -1
    chunk, start = b"", end
    while start > 0:
        start = max(0, start - 4096)
        f.seek(start)
        chunk = f.read(end - start)
        # The last line ends in a newline; the one before it starts after the previous.
        if chunk.rfind(b"\n", 0, len(chunk) - 1) >= 0:
            break
    last = chunk[chunk.rfind(b"\n", 0, len(chunk) - 1) + 1:]
    try:
        return int(json.loads(last)["i"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a delta line: {last[:80]!r}") from exc
