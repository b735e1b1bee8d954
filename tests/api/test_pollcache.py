"""The poll cache (api/pollcache.py) on real Postgres and Redis: a conditional
poll of a job this process read lately is a 304 with no statement; a change's
notification drops the entry; another tenant still gets 404; nothing is kept
while the subscription is not live or when a change raced the read."""
from __future__ import annotations

import secrets
import time

import pytest
import redis

from api.app import create_app
from api.pollcache import PollCache
from genq.notify import Notifier
from tests.api.test_hot_path import set_job, statements
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import make_key

TEXT_JOB = {"model": "demo-text", "input": {"prompt": "hi", "max_new_tokens": 4}}
HEADERS = {"ETag": 'W/"x"', "Cache-Control": "private, no-cache", "Retry-After": "2"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def until(condition, what: str, seconds: float = 10.0) -> None:
    """Wait for something another thread does (a bound on waiting, not a measurement)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def cache():
    clock = Clock()
    cache = PollCache(REDIS_URL, 1.0, clock=clock)
    cache.start()
    until(lambda: cache.live, "the subscription")
    yield cache
    cache.stop()


def polled_until_live(client, path: str, headers: dict, cache: PollCache) -> None:
    """Poll until the process's cache is subscribed (its subscription starts at the first poll)."""

    def polled_and_live() -> bool:
        assert client.get(path, headers=headers).status_code == 200
        return cache.live

    until(polled_and_live, "the subscription")


def ring(job_id: str) -> None:
    Notifier(redis.Redis.from_url(REDIS_URL)).publish({job_id: 0})


def test_an_entry_is_for_its_owner_until_it_lapses(cache):
    job = secrets.token_hex(16)
    cache.put(job, "owner", 'W/"x"', HEADERS, cache.clock())
    assert cache.lookup(job, "owner").etag == 'W/"x"'
    assert cache.lookup(job, "someone-else") is None
    cache.clock.now += 1.01
    assert cache.lookup(job, "owner") is None


def test_a_notification_drops_the_entry(cache):
    job, other = secrets.token_hex(16), secrets.token_hex(16)
    for j in (job, other):
        cache.put(j, "owner", 'W/"x"', HEADERS, cache.clock())
    ring(job)
    until(lambda: cache.lookup(job, "owner") is None, "the notification")
    assert cache.lookup(other, "owner") is not None


def test_a_read_a_notification_overtook_is_not_kept(cache):
    job = secrets.token_hex(16)
    read_at = cache.clock()
    ring(job)  # the job changed while the read was in flight
    until(lambda: job in cache._notified, "the notification")
    cache.put(job, "owner", 'W/"x"', HEADERS, read_at)
    assert cache.lookup(job, "owner") is None
    cache.clock.now += 0.01
    cache.put(job, "owner", 'W/"x"', HEADERS, cache.clock())  # a read begun after it
    assert cache.lookup(job, "owner") is not None


def test_nothing_is_kept_or_answered_without_a_live_subscription():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = PollCache(f"redis://127.0.0.1:{port}/0", 1.0)
    cache.start()
    job = secrets.token_hex(16)
    cache.put(job, "owner", 'W/"x"', HEADERS, cache.clock())
    assert not cache.live and cache.lookup(job, "owner") is None
    cache.stop()


@pytest.fixture
def settings(service_settings):
    return service_settings.replace(ratelimit_storage_url=REDIS_URL, rate_limit="100000/minute")


def test_a_conditional_poll_of_an_unchanged_job_needs_no_statement(settings):
    app = create_app(settings)
    client, lane = app.test_client(), app.wsgi_app
    owner = make_key(settings, f"pc-{secrets.token_hex(4)}")
    other = make_key(settings, f"pc-{secrets.token_hex(4)}")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=owner).get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    polled_until_live(client, path, owner, lane.cache)
    client.get("/v1/jobs", headers=other)  # the other tenant's key is verified
    tag = client.get(path, headers=owner).headers["ETag"]
    tenant_id = lane.context.keys.get(owner["Authorization"][7:]).tenant_id

    def cached() -> bool:
        # A poll without a leased token goes through Flask, which does not fill the cache.
        client.get(path, headers=owner)
        return lane.cache.lookup(job_id, tenant_id) is not None

    until(cached, "the entry")
    with statements(app) as sent:
        resp = client.get(path, headers={**owner, "If-None-Match": tag})
    assert resp.status_code == 304 and resp.headers["ETag"] == tag and resp.headers["Retry-After"] == "2"
    assert sent == []
    # A poll that names no ETag gets the body the process sent, again: no statement either.
    # (A poll without a leased rate-limit token is Flask's, which reads the database: the lane's is the one.)
    for _ in range(50):
        read = lane.served
        with statements(app) as sent:
            again = client.get(path, headers=owner)
        if lane.served == read + 1:
            break
    assert lane.served == read + 1 and sent == []
    assert again.status_code == 200 and again.headers["ETag"] == tag and again.get_json()["id"] == job_id
    assert again.get_json()["status"] == "queued" and again.mimetype == "application/json"
    assert int(again.headers["Content-Length"]) == len(again.data)
    # Another tenant, with the tag or without, reads the database and gets 404.
    for headers in ({**other, "If-None-Match": tag}, other):
        resp = client.get(path, headers=headers)
        assert resp.status_code == 404 and resp.mimetype == "application/problem+json"
    # A change that writes an event (a cancel, by another process) is a new answer once notified.
    other_app = create_app(settings)
    assert other_app.test_client().post(f"{path}/cancel", headers=owner).status_code == 200
    until(lambda: lane.cache.lookup(job_id, tenant_id) is None, "the cancel's notification")
    resp = client.get(path, headers={**owner, "If-None-Match": tag})
    assert resp.status_code == 200 and resp.get_json()["status"] == "canceled" and resp.headers["ETag"] != tag
    assert client.get(path, headers=owner).get_json()["status"] == "canceled"
    lane.cache.stop()


def test_a_change_that_writes_no_event_shows_within_the_bound(settings):
    """A direct UPDATE publishes nothing: the entry's lapse is the bound."""
    app = create_app(settings.replace(poll_cache_seconds=0.3))
    client, lane = app.test_client(), app.wsgi_app
    owner = make_key(settings, f"pc-{secrets.token_hex(4)}")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=owner).get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    polled_until_live(client, path, owner, lane.cache)
    tag = client.get(path, headers=owner).headers["ETag"]
    set_job(settings, job_id, progress={"step": 1, "total": 2})
    time.sleep(0.35)  # past the bound: an invariant, not a measurement
    resp = client.get(path, headers={**owner, "If-None-Match": tag})
    assert resp.status_code == 200 and resp.get_json()["progress"] == {"step": 1, "total": 2}
    set_job(settings, job_id, progress={"step": 2, "total": 2})
    time.sleep(0.35)
    assert client.get(path, headers=owner).get_json()["progress"] == {"step": 2, "total": 2}  # no tag: the same bound
    lane.cache.stop()
