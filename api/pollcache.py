"""What this API process answered lately for each job it read (its ETag, and
the answer's body), so that a poll of an unchanged job is answered with no
database statement: a 304 to a caller that names the ETag, the same body to
one that does not.

Every change to a job that its answer shows writes a job event, and every
commit that writes job events publishes a notification on
`genq-events:<job id>` (genq.notify). This process subscribes to them all (one
pattern subscription, in a thread) and drops a job's entry the moment its
notification arrives. An entry also lapses GENQ_POLL_CACHE_SECONDS after the
read that made it: that is how stale an answer can be when a notification is
lost. Doubt means the database: nothing is answered from the cache unless
the subscription has heard from Redis within HEARD_WITHIN seconds (it pings
every PING_SECONDS), and an entry is not kept when its job was notified
after the read that made it began.

An entry names its job's owner: a caller of another tenant never gets a 304
from it (the database read answers, 404).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

import redis

from genq import notify

log = logging.getLogger(__name__)

# The subscription pings Redis this often (seconds); a process that heard
# nothing from it for HEARD_WITHIN answers every poll from the database.
PING_SECONDS = 1.0
HEARD_WITHIN = 3.0
# Entries kept at most; past it the cache starts again empty.
MAX_ENTRIES = 50_000
# Notification times kept at most (they guard reads in flight); past it they
# are forgotten and no read begun before then is cached.
MAX_NOTIFIED = 50_000


class Entry(NamedTuple):
    tenant_id: str
    etag: str
    headers: dict
    until: float
    body: bytes | None = None  # the 200 answer's body, when the read that made it sent one


class PollCache:
    """One per API process; its subscription starts on first use (after a
    pre-forking server has forked)."""

    def __init__(self, redis_url: str, seconds: float, clock=time.monotonic) -> None:
        self.redis_url = redis_url
        self.seconds = seconds
        self.clock = clock
        self._entries: dict[str, Entry] = {}
        self._notified: dict[str, float] = {}
        self._floor = float("-inf")  # reads begun before this are not cached
        self._heard = float("-inf")
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def live(self) -> bool:
        """Subscribed, and heard from Redis lately."""
        return self.clock() - self._heard < HEARD_WITHIN

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self.seconds <= 0:
                return
            self._thread = threading.Thread(target=self._listen, name="poll-cache", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def lookup(self, job_id: str, tenant_id: str) -> Entry | None:
        """The job's entry if `tenant_id` owns it, it has not lapsed and the
        subscription is live; else None (read the database)."""
        if self._thread is None:
            self.start()
            return None
        entry = self._entries.get(job_id)
        if entry is None or entry.tenant_id != tenant_id or entry.until <= self.clock() or not self.live:
            return None
        return entry

    def put(self, job_id: str, tenant_id: str, etag: str, headers: dict, read_at: float,
            body: bytes | None = None) -> None:
        """Keep what a read begun at `read_at` (this cache's clock) found,
        unless the job was notified since it began."""
        if self._thread is None:
            self.start()
        if self.seconds <= 0 or not self.live:
            return
        with self._lock:
            if read_at <= self._floor or self._notified.get(job_id, float("-inf")) >= read_at:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[job_id] = Entry(tenant_id, etag, headers, read_at + self.seconds, body)

    def changed(self, job_id: str) -> None:
        """A notification for the job: its entry goes, and a read in flight is not kept."""
        now = self.clock()
        with self._lock:
            self._entries.pop(job_id, None)
            if len(self._notified) >= MAX_NOTIFIED:
                self._notified.clear()
                self._floor = now
            self._notified[job_id] = now

    def _forget_all(self) -> None:
        with self._lock:
            self._heard = float("-inf")
            self._entries.clear()
            self._notified.clear()
            self._floor = self.clock()

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
                pubsub = client.pubsub()
                pubsub.psubscribe(notify.PATTERN)
                next_ping = 0.0
                while not self._stop.is_set():
                    if time.monotonic() >= next_ping:
                        pubsub.ping()
                        next_ping = time.monotonic() + PING_SECONDS
                    message = pubsub.get_message(timeout=PING_SECONDS)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "pmessage":
                        channel = message["channel"]
                        self.changed((channel.decode() if isinstance(channel, bytes) else channel).partition(":")[2])
                    elif kind in ("pong", "psubscribe"):
                        # Only once subscribed: every notification since reaches us.
                        self._heard = self.clock()
            except Exception as exc:  # noqa: BLE001 - Redis away: answer from the database meanwhile
                self._forget_all()
                log.warning("poll cache: event notifications unreadable, polls read the database: %s", exc)
                self._stop.wait(1.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass
