"""Held-request slots (api/held.py): the per-tenant count in Redis and in
memory, the per-process share of threads, and the event stream and
`Prefer: wait` that take them — released however a stream ends, lapsing when
their process dies, resumed after Last-Event-ID. Time is a fake clock."""
from __future__ import annotations

import secrets

import pytest
import redis

from api.app import create_app
from api.held import HOLD_SECONDS, RENEW_SECONDS, MemoryStore, RedisStore, Refused, Slots
from genq.db import make_engine, make_sessionmaker
from genq.keys import authenticate
from tests.conftest import REDIS_URL
from tests.helpers import make_key

PROBLEM = "application/problem+json"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(redis.Redis.from_url(REDIS_URL), prefix=f"genq-held-test-{secrets.token_hex(4)}")


def tenant() -> str:
    return secrets.token_hex(16)


def test_a_tenant_gets_at_most_its_cap_and_a_released_slot_is_free_again(store):
    alice, bob, now = tenant(), tenant(), 1000.0
    assert [store.acquire(alice, f"s{i}", 2, now) for i in range(4)] == [True, True, False, False]
    assert store.acquire(bob, "b0", 2, now)  # each tenant has a cap of its own
    store.release(alice, "s0")
    assert store.count(alice, now) == 1
    assert store.acquire(alice, "s4", 2, now) and not store.acquire(alice, "s5", 2, now)


def test_a_slot_lapses_unless_renewed(store):
    """A killed process renews nothing: its slots free themselves."""
    alice, now = tenant(), 1000.0
    assert store.acquire(alice, "kept", 2, now) and store.acquire(alice, "abandoned", 2, now)
    store.renew(alice, "kept", now + HOLD_SECONDS - 1)
    later = now + HOLD_SECONDS + 1
    assert store.count(alice, later) == 1
    assert store.acquire(alice, "new", 2, later)
    assert not store.acquire(alice, "one more", 2, later)


def test_redis_slots_are_shared_by_api_processes():
    alice, prefix = tenant(), f"genq-held-test-{secrets.token_hex(4)}"
    first, second = (Slots(2, 4, RedisStore(redis.Redis.from_url(REDIS_URL), prefix)) for _ in range(2))
    held = [first.take(alice, "stream"), second.take(alice, "stream")]
    with pytest.raises(Refused) as refused:
        first.take(alice, "stream")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] >= 1
    held[1].release()
    first.take(alice, "stream").release()


def test_the_process_share_of_threads_is_503_for_everyone_past_it():
    slots = Slots(per_tenant=4, threads=2, store=MemoryStore())
    held = [slots.take(tenant(), "stream") for _ in range(2)]
    with pytest.raises(Refused) as refused:
        slots.take(tenant(), "stream")
    assert refused.value.status == 503
    held[0].release()
    held[0].release()  # twice is harmless: the share is not over-released
    slots.take(tenant(), "stream")
    with pytest.raises(Refused):
        slots.take(tenant(), "stream")


def test_a_refused_share_gives_back_the_tenant_slot():
    alice, store = tenant(), MemoryStore()
    slots = Slots(per_tenant=1, threads=1, store=store)
    slots.take(tenant(), "stream")
    with pytest.raises(Refused):
        slots.take(alice, "stream")
    assert store.count(alice, slots.clock()) == 0


def test_a_hold_renews_its_slot_while_it_lives():
    alice, clock, store = tenant(), Clock(), MemoryStore()
    slots = Slots(per_tenant=1, threads=4, store=store, clock=clock)
    hold = slots.take(alice, "stream")
    for _ in range(10):  # a stream far longer than HOLD_SECONDS
        clock.now += RENEW_SECONDS
        hold.renew()
    assert store.count(alice, clock()) == 1
    with pytest.raises(Refused):
        slots.take(alice, "stream")


def test_with_redis_down_slots_are_counted_in_the_process():
    alice = tenant()
    # Nothing listens on port 1.
    slots = Slots(2, 4, RedisStore(redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)))
    held = [slots.take(alice, "stream"), slots.take(alice, "stream")]
    with pytest.raises(Refused):
        slots.take(alice, "stream")
    for hold in held:
        hold.release()
    slots.take(alice, "stream")


# --- the routes that take slots, through the app -----------------------------

@pytest.fixture
def app(embedded_settings):
    return create_app(embedded_settings.replace(max_held_requests=2, api_threads=8, api_held_threads=3))


@pytest.fixture
def alice(embedded_settings):
    return make_key(embedded_settings, f"alice-{secrets.token_hex(3)}")


def tenant_id(settings, headers) -> str:
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        return authenticate(session, headers["Authorization"].split()[1])[0].id


def held_by(app, tid: str) -> int:
    slots = app.extensions["genq_held"]
    return slots.store.count(tid, slots.clock())


def submit(client, headers, **extra) -> str:
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}}, headers={**headers, **extra})
    assert resp.status_code in (200, 202), resp.get_json()
    return resp.get_json()["id"]


def stream(client, headers, job_id, **extra):
    return client.get(f"/v1/jobs/{job_id}/events", headers={**headers, "Accept": "text/event-stream", **extra},
                      buffered=False)


def events_of(chunks) -> list[tuple[int, str]]:
    out = []
    for chunk in chunks:
        text = chunk.decode()
        if text.startswith("id: "):
            lines = dict(line.split(": ", 1) for line in text.strip().splitlines())
            out.append((int(lines["id"]), lines["event"]))
    return out


def test_a_stream_frees_its_slot_when_it_ends(app, embedded_settings, alice):
    client, tid = app.test_client(), tenant_id(embedded_settings, alice)
    job = submit(client, alice)
    resp = stream(client, alice, job)
    chunks = iter(resp.response)
    assert next(chunks).startswith(b"retry: ")
    assert events_of([next(chunks)]) and held_by(app, tid) == 1
    client.post(f"/v1/jobs/{job}/cancel", headers=alice)
    assert [kind for _, kind in events_of(chunks)] == ["completed"]
    assert held_by(app, tid) == 0
    resp.close()


def test_a_stream_frees_its_slot_when_the_client_goes(app, embedded_settings, alice):
    """The WSGI server closes the response on a disconnect: that closes the
    generator mid-stream."""
    client, tid = app.test_client(), tenant_id(embedded_settings, alice)
    job = submit(client, alice)
    # The test client reads each stream's first chunk (the retry line) before it returns.
    streams = [stream(client, alice, job), stream(client, alice, job)]
    assert held_by(app, tid) == 2
    over = stream(client, alice, job)
    assert over.status_code == 429 and over.mimetype == PROBLEM and over.headers["Retry-After"] == "5"
    assert "event streams" in over.get_json()["detail"]
    # Last opened, first closed: in one thread each open stream holds its request context.
    for resp in reversed(streams):
        resp.close()
    assert held_by(app, tid) == 0
    # The process's share (3 threads) is whole again.
    slots = app.extensions["genq_held"]
    taken = [slots.take(secrets.token_hex(8), "stream") for _ in range(3)]
    with pytest.raises(Refused):
        slots.take(secrets.token_hex(8), "stream")
    for hold in taken:
        hold.release()


def test_a_stream_closed_before_its_first_byte_frees_its_slot(app, embedded_settings, alice):
    """A generator never started runs no `finally`: the response's close frees the slot."""
    tid = tenant_id(embedded_settings, alice)
    job = submit(app.test_client(), alice)
    with app.test_request_context(f"/v1/jobs/{job}/events", headers={**alice, "Accept": "text/event-stream"}):
        resp = app.full_dispatch_request()
        assert resp.status_code == 200 and held_by(app, tid) == 1
        resp.close()
    assert held_by(app, tid) == 0


def test_a_stream_ends_after_its_lifetime_and_resumes_after_last_event_id(embedded_settings, alice):
    app = create_app(embedded_settings.replace(event_stream_seconds=1))
    client, tid = app.test_client(), tenant_id(embedded_settings, alice)
    job = submit(client, alice)
    first = stream(client, alice, job)
    seen = events_of(first.response)  # ends by itself, the job still queued
    first.close()
    assert [kind for _, kind in seen] == ["queued"] and held_by(app, tid) == 0
    client.post(f"/v1/jobs/{job}/cancel", headers=alice)
    resumed = stream(client, alice, job, **{"Last-Event-ID": str(seen[-1][0])})
    rest = events_of(resumed.response)
    resumed.close()
    assert [kind for _, kind in rest] == ["completed"] and rest[0][0] > seen[-1][0]
    # Resumed after the end: 204, which tells an EventSource to stop reconnecting.
    done = stream(client, alice, job, **{"Last-Event-ID": str(rest[-1][0])})
    assert done.status_code == 204 and held_by(app, tid) == 0


@pytest.mark.parametrize("value", ["abc", "-1", "1" * 30])
def test_a_bad_last_event_id_is_422_naming_it(app, alice, value):
    client = app.test_client()
    resp = stream(client, alice, submit(client, alice), **{"Last-Event-ID": value})
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "Last-Event-ID"


def test_prefer_wait_is_honoured_with_a_slot_and_ignored_without(app, embedded_settings, alice):
    client, tid = app.test_client(), tenant_id(embedded_settings, alice)
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}},
                       headers={**alice, "Prefer": "wait=1"})
    # Honoured: held for the whole second (no worker runs), and said so.
    assert resp.status_code == 202 and resp.headers["Preference-Applied"] == "wait=1"
    assert held_by(app, tid) == 0
    job = resp.get_json()["id"]
    held = [app.extensions["genq_held"].take(tid, "stream") for _ in range(2)]
    # At the tenant's cap: the submit still succeeds, answered at once without the header.
    refused = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}},
                          headers={**alice, "Prefer": "wait=60"})
    assert refused.status_code == 202 and "Preference-Applied" not in refused.headers
    assert "Preference-Applied" not in client.get(f"/v1/jobs/{job}", headers={**alice, "Prefer": "wait=60"}).headers
    for hold in held:
        hold.release()
    client.post(f"/v1/jobs/{job}/cancel", headers=alice)
    # An ended job needs no wait and no slot: the preference is met at once.
    done = client.get(f"/v1/jobs/{job}", headers={**alice, "Prefer": "wait=60"})
    assert done.get_json()["status"] == "canceled" and done.headers["Preference-Applied"] == "wait=60"
