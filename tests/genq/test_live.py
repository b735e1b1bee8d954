"""Live output (genq/live.py) on real Redis and on files: what is published is
read back in order after a cursor, a waiting read wakes when deltas arrive, a
retried publish changes nothing, tenants never meet, and a store that fails
never raises to the publisher."""
from __future__ import annotations

import logging
import secrets
import threading
import time

import pytest
import redis

from genq import live as livemod
from genq.live import TTL_SECONDS, FileLive, RedisLive, live_for
from genq.settings import Settings
from tests.conftest import REDIS_URL


def new_id() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def client():
    c = redis.Redis.from_url(REDIS_URL)
    yield c
    c.close()


@pytest.fixture(params=["redis", "file"])
def live(request, tmp_path):
    if request.param == "file":
        yield FileLive(tmp_path / "live")
        return
    prefix = f"genq-live-test-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(REDIS_URL)
    store = RedisLive(redis.Redis.from_url(REDIS_URL), prefix=prefix)
    yield store
    store.close()
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def text(deltas) -> str:
    return "".join(d for _, d in deltas)


def test_deltas_come_back_in_order_after_the_cursor(live):
    tenant, job = new_id(), new_id()
    pieces = ["Once", " upon", " a tíme", "\n", "日本語", " 🙂", ""]
    live.publish(tenant, job, list(enumerate(pieces[:3])))
    live.publish(tenant, job, [(i, p) for i, p in enumerate(pieces) if i >= 3])
    assert live.read(tenant, job) == list(enumerate(pieces))
    assert text(live.read(tenant, job, after=-1)) == "".join(pieces)
    assert live.read(tenant, job, after=2) == [(i, p) for i, p in enumerate(pieces) if i > 2]
    assert live.read(tenant, job, after=len(pieces) - 1) == []


def test_nothing_published_reads_as_nothing(live):
    assert live.read(new_id(), new_id(), after=-1, block_seconds=0) == []
    assert live.read(new_id(), new_id(), after=5, block_seconds=0.1) == []


def test_a_waiting_read_returns_what_arrives(live):
    tenant, job = new_id(), new_id()
    live.publish(tenant, job, [(0, "first")])
    go = threading.Event()

    def worker():
        go.wait()
        live.publish(tenant, job, [(1, " second"), (2, " third")])

    t = threading.Thread(target=worker)
    t.start()
    go.set()
    got = []
    # Whatever the thread's timing, the read waits for index 1 and returns
    # deltas after the cursor only; a second read picks up any remainder.
    while len(got) < 2:
        batch = live.read(tenant, job, after=got[-1][0] if got else 0, block_seconds=30)
        assert batch, "a read waiting 30 s returned nothing though deltas were published"
        got += batch
    t.join()
    assert got == [(1, " second"), (2, " third")]


def test_a_retried_publish_changes_nothing(live, caplog):
    caplog.set_level(logging.WARNING, logger="genq.live")
    tenant, job = new_id(), new_id()
    live.publish(tenant, job, [(0, "a"), (1, "b")])
    live.publish(tenant, job, [(1, "B"), (2, "c")])  # index 1 again, then a new one
    live.publish(tenant, job, [(0, "A")])  # all old: ignored, not raised
    assert live.read(tenant, job) == [(0, "a"), (1, "b"), (2, "c")]
    assert not [r for r in caplog.records if r.name == "genq.live"]  # a retry is not a fault


def test_tenants_never_meet(live):
    alice, bob, job = new_id(), new_id(), new_id()
    live.publish(alice, job, [(0, "alice's")])
    assert live.read(bob, job, block_seconds=0.1) == []
    live.publish(bob, job, [(0, "bob's")])
    assert live.read(alice, job) == [(0, "alice's")] and live.read(bob, job) == [(0, "bob's")]


@pytest.mark.parametrize("tenant, job", [("../etc", "x"), ("a/b", "x"), ("t", "a/../b"), ("t", ".."), ("a:b", "c"),
                                         ("t", ""), ("t", "x\x00")])
def test_ids_that_are_not_generated_ids_are_refused(live, tenant, job):
    with pytest.raises(ValueError, match="tenant_id|job_id"):
        live.publish(tenant, job, [(0, "x")])
    with pytest.raises(ValueError, match="tenant_id|job_id"):
        live.read(tenant, job)


@pytest.mark.parametrize("deltas", [[(-1, "x")], [("0", "x")], [(0, b"x")], [(0, "\ud800")]])
def test_bad_deltas_are_refused_naming_them(live, deltas):
    with pytest.raises(ValueError, match="delta"):
        live.publish(new_id(), new_id(), deltas)


def test_a_redis_stream_is_scoped_to_its_tenant_and_expires(client):
    prefix = f"genq-live-test-{secrets.token_hex(4)}"
    live, tenant, job = RedisLive(redis.Redis.from_url(REDIS_URL), prefix=prefix), new_id(), new_id()
    try:
        live.publish(tenant, job, [(0, "x")])
        key = f"{prefix}:{tenant}:{job}"
        assert client.type(key) == b"stream"
        # The delta index is the stream id: `index + 1`-0.
        assert [entry_id for entry_id, _ in client.xrange(key)] == [b"1-0"]
        assert 0 < client.ttl(key) <= TTL_SECONDS
        client.expire(key, 5)
        live.publish(tenant, job, [(1, "y")])  # each publish renews it
        assert client.ttl(key) > 5
    finally:
        live.close()
        client.delete(f"{prefix}:{tenant}:{job}")


def test_with_redis_down_publish_drops_and_read_is_empty(caplog):
    # Nothing listens on port 1.
    live = RedisLive(redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1))
    caplog.set_level(logging.WARNING, logger="genq.live")
    tenant, job = new_id(), new_id()
    for i in range(5):
        live.publish(tenant, job, [(i, "x")])
    assert live.read(tenant, job, after=-1, block_seconds=0.05) == []
    warnings = [r for r in caplog.records if r.name == "genq.live"]
    assert len(warnings) == 1 and "Redis" in warnings[0].getMessage()  # once per outage, not per step


def test_after_redis_comes_back_publishes_go_through(monkeypatch, client):
    prefix = f"genq-live-test-{secrets.token_hex(4)}"
    live, tenant, job = RedisLive(redis.Redis.from_url(REDIS_URL), prefix=prefix), new_id(), new_id()
    try:
        live._failed(redis.ConnectionError("gone"))
        live.publish(tenant, job, [(0, "dropped")])  # within the retry window: not even tried
        assert live.read(tenant, job) == []
        monkeypatch.setattr(livemod, "RETRY_SECONDS", 0.0)
        live._down_until = time.monotonic() - 1
        live.publish(tenant, job, [(1, "kept")])
        assert live.read(tenant, job) == [(1, "kept")]
    finally:
        live.close()
        client.delete(f"{prefix}:{tenant}:{job}")


def test_a_file_publisher_that_cannot_write_does_not_raise(tmp_path):
    (tmp_path / "live").write_text("a file where the folder should be")
    FileLive(tmp_path / "live").publish(new_id(), new_id(), [(0, "x")])


def test_a_half_written_line_is_not_read_and_is_mended_by_the_next_publish(tmp_path):
    live, tenant, job = FileLive(tmp_path), new_id(), new_id()
    live.publish(tenant, job, [(0, "a")])
    with open(live.path(tenant, job), "ab") as f:
        f.write(b'{"i": 1, "d": "b')  # a writer killed mid-line
    assert live.read(tenant, job) == [(0, "a")]
    live.publish(tenant, job, [(1, "b"), (2, "c")])
    assert live.read(tenant, job) == [(0, "a"), (1, "b"), (2, "c")]


def test_a_file_takes_at_most_max_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(livemod, "MAX_ENTRIES", 3)
    live, tenant, job = FileLive(tmp_path), new_id(), new_id()
    live.publish(tenant, job, [(i, str(i)) for i in range(5)])
    assert live.read(tenant, job) == [(0, "0"), (1, "1"), (2, "2")]


def test_live_for_follows_the_broker(tmp_path):
    embedded = Settings.from_env({}, home=tmp_path)
    assert isinstance(live_for(embedded), FileLive) and live_for(embedded).root == tmp_path.resolve() / "live"
    on_redis = live_for(embedded.replace(broker_url=REDIS_URL))
    assert isinstance(on_redis, RedisLive)
    on_redis.close()


def test_a_new_attempt_clears_the_last_ones_deltas(live):
    tenant, job, other = new_id(), new_id(), new_id()
    live.publish(tenant, job, [(0, "first attempt"), (1, " went this far")])
    live.publish(tenant, other, [(0, "untouched")])
    live.clear(tenant, job)
    assert live.read(tenant, job) == []
    live.publish(tenant, job, [(0, "second")])
    assert live.read(tenant, job) == [(0, "second")]
    assert live.read(tenant, other) == [(0, "untouched")]
    live.clear(tenant, new_id())  # nothing there: no error


def test_a_batch_publishes_for_many_jobs_at_once(live):
    tenant, other = new_id(), new_id()
    jobs = [new_id() for _ in range(3)]
    live.publish_many([(tenant, jobs[0], [(0, "a")]), (tenant, jobs[1], [(0, "b"), (1, "c")]),
                       (other, jobs[2], [(0, "d")]), (tenant, jobs[2], [])])
    live.publish_many([(tenant, jobs[0], [(0, "again"), (1, "e")])])  # index 0 again: ignored
    assert [live.read(tenant, j) for j in jobs] == [[(0, "a"), (1, "e")], [(0, "b"), (1, "c")], []]
    assert live.read(other, jobs[2]) == [(0, "d")]
