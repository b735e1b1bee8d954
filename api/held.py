"""Slots for long-held requests (event streams, honoured `Prefer: wait`).

A request that holds its thread for seconds or minutes takes a slot of two
kinds: one of its tenant's (`GENQ_MAX_HELD_REQUESTS`, counted across every API
process in Redis, in this process when embedded with no Redis) and one of this
process's share of the server's threads (`GENQ_API_HELD_THREADS`), so that
/healthz and everyone's short requests always find a thread. Past the tenant's
cap a request is refused 429, past the process's share 503, both with
Retry-After; a `Prefer: wait` that cannot be held is simply not honoured.

A shared slot is an entry in a Redis sorted set that lapses HOLD_SECONDS after
its holder last renewed it: a killed API process cannot leak its slots.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable, Protocol

import redis
from flask import Flask, current_app

from api.errors import ApiError
from genq.settings import Settings

log = logging.getLogger(__name__)

# A slot whose holder stopped renewing it (its process was killed) is free
# again after this long; a live holder renews it every RENEW_SECONDS.
HOLD_SECONDS = 30.0
RENEW_SECONDS = 10.0
# What a refused client is told to wait before trying again (seconds).
RETRY_AFTER = 5


class Refused(ApiError):
    """No slot: 429 (the tenant's cap) or 503 (this process's share is in use)."""


class Store(Protocol):
    def acquire(self, tenant_id: str, slot: str, cap: int, now: float) -> bool: ...

    def renew(self, tenant_id: str, slot: str, now: float) -> None: ...

    def release(self, tenant_id: str, slot: str) -> None: ...


class MemoryStore:
    """Slots of this process only: the embedded default, and the fallback while Redis is down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, float]] = {}  # tenant -> slot -> lapses at

    def acquire(self, tenant_id: str, slot: str, cap: int, now: float) -> bool:
        with self._lock:
            slots = self._held.setdefault(tenant_id, {})
            for lapsed in [s for s, until in slots.items() if until <= now]:
                del slots[lapsed]
            if len(slots) >= cap:
                return False
            slots[slot] = now + HOLD_SECONDS
            return True

    def renew(self, tenant_id: str, slot: str, now: float) -> None:
        with self._lock:
            if slot in self._held.get(tenant_id, {}):
                self._held[tenant_id][slot] = now + HOLD_SECONDS

    def release(self, tenant_id: str, slot: str) -> None:
        with self._lock:
            slots = self._held.get(tenant_id, {})
            slots.pop(slot, None)
            if not slots:
                self._held.pop(tenant_id, None)

    def count(self, tenant_id: str, now: float) -> int:
        with self._lock:
            return sum(until > now for until in self._held.get(tenant_id, {}).values())


# Drop the lapsed entries, then take a slot if fewer than the cap are held; in
# one script, so two API processes can never both take the last slot.
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisStore:
    """Slots shared by every API process: a sorted set per tenant, slot -> lapses at.
    Scores are wall-clock seconds, so API hosts' clocks must agree to within a
    few seconds (NTP does far better)."""

    def __init__(self, client: redis.Redis, prefix: str = "genq-held") -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(ACQUIRE)

    def key(self, tenant_id: str) -> str:
        return f"{self.prefix}:{tenant_id}"

    def acquire(self, tenant_id: str, slot: str, cap: int, now: float) -> bool:
        # The set itself expires too, so a tenant who stops streaming leaves no key behind.
        return bool(self._acquire(keys=[self.key(tenant_id)],
                                  args=[now, now + HOLD_SECONDS, cap, slot, int(HOLD_SECONDS) * 2]))

    def renew(self, tenant_id: str, slot: str, now: float) -> None:
        key = self.key(tenant_id)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {slot: now + HOLD_SECONDS}, xx=True)
            pipe.expire(key, int(HOLD_SECONDS) * 2)
            pipe.execute()

    def release(self, tenant_id: str, slot: str) -> None:
        self.client.zrem(self.key(tenant_id), slot)

    def count(self, tenant_id: str, now: float) -> int:
        return self.client.zcount(self.key(tenant_id), f"({now}", "+inf")


class Hold:
    """One granted slot. `renew()` while holding (cheap: it acts every
    RENEW_SECONDS), `release()` when done; releasing twice is harmless."""

    def __init__(self, slots: "Slots", tenant_id: str, slot: str, store: Store | None, thread: bool = True) -> None:
        self.slots, self.tenant_id, self.slot, self.store = slots, tenant_id, slot, store
        self.thread = thread
        self.renewed = slots.clock()
        self._released = False
        self._lock = threading.Lock()

    def renew(self) -> None:
        now = self.slots.clock()
        if self.store is None or now - self.renewed < RENEW_SECONDS:
            return
        self.renewed = now
        try:
            self.store.renew(self.tenant_id, self.slot, now)
        except redis.RedisError as exc:  # the slot lapses meanwhile; the request goes on
            log.warning("could not renew a held-request slot: %s", exc)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        if self.thread:
            self.slots.threads.release()
        if self.store is not None:
            try:
                self.store.release(self.tenant_id, self.slot)
            except redis.RedisError as exc:  # it lapses on its own within HOLD_SECONDS
                log.warning("could not release a held-request slot: %s", exc)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Slots:
    """The held-request slots of one API process."""

    def __init__(self, per_tenant: int, threads: int, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.per_tenant = per_tenant
        self.share = threads
        self.threads = threading.BoundedSemaphore(threads) if threads else None
        self.store = store
        self.local = store if isinstance(store, MemoryStore) else MemoryStore()
        self.clock = clock

    def take(self, tenant_id: str, what: str, thread: bool = True) -> Hold:
        """A slot for the tenant, or Refused. `what` names the request in the
        refusal. `thread=False`: the request holds no server thread (an event
        stream handed to api/fanout.py), so only the tenant's cap applies."""
        store, slot = None, uuid.uuid4().hex
        if self.per_tenant:
            store = self.store
            try:
                taken = store.acquire(tenant_id, slot, self.per_tenant, self.clock())
            except redis.RedisError as exc:
                # Redis down must not take streams down: count in this process meanwhile.
                log.warning("held-request slots counted in this process only, Redis failed: %s", exc)
                store = self.local
                taken = store.acquire(tenant_id, slot, self.per_tenant, self.clock())
            if not taken:
                raise Refused(429, f"you have {self.per_tenant} event streams or Prefer: wait requests open, the most "
                                   f"allowed at once; close one, or poll GET /v1/jobs/<id> instead of this {what}",
                              headers={"Retry-After": RETRY_AFTER})
        if not thread:
            return Hold(self, tenant_id, slot, store, thread=False)
        if self.threads is None or not self.threads.acquire(blocking=False):
            if store is not None:
                try:
                    store.release(tenant_id, slot)
                except redis.RedisError:  # it lapses on its own within HOLD_SECONDS
                    pass
            raise Refused(503, f"this API process is holding its most event streams and Prefer: wait requests at "
                               f"once ({self.share}); retry in {RETRY_AFTER}s, or poll GET /v1/jobs/<id> instead of "
                               f"this {what}", headers={"Retry-After": RETRY_AFTER})
        return Hold(self, tenant_id, slot, store)


def make_slots(settings: Settings, storage_uri: str) -> Slots:
    """Shared through Redis when the rate limiter counts there, else in this process."""
    if storage_uri.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(storage_uri, socket_timeout=2, socket_connect_timeout=2)
        store: Store = RedisStore(client)
    else:
        if not storage_uri.startswith("memory://"):
            log.warning("held-request slots are counted per API process: %s is not a redis:// URL",
                        storage_uri.split("://")[0] + "://...")
        store = MemoryStore()
    return Slots(settings.max_held_requests, settings.held_threads, store)


def init_slots(app: Flask, settings: Settings, storage_uri: str) -> None:
    app.extensions["genq_held"] = make_slots(settings, storage_uri)


def slots() -> Slots:
    return current_app.extensions["genq_held"]
