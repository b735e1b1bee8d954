"""Event streams handed from gunicorn's threads to the stream server
(api/fanout.py), fed by Redis notifications: `genq api` in its own process on
Postgres and Redis, spoken to over real sockets."""
from __future__ import annotations

import json
import secrets
import socket
import time

import pytest
import requests

from genq.db import make_engine, make_sessionmaker
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import genq_api, make_key

PROBLEM = "application/problem+json"
# Few threads, on purpose: streams must not need them.
THREADS, HELD = 4, 2
PER_TENANT = 50
# Safety nets, not measurements: a loaded machine answers well within these.
SAFETY = 45


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url, registry_path):
    """`genq api --workers 1` with 4 threads (2 for held requests) and a tenant cap of 50."""
    home = tmp_path_factory.mktemp("fanout-home")
    settings = Settings.from_env({}, home=home, database_url=pg_url, broker_url=REDIS_URL, registry_path=registry_path,
                                 webhook_secret_keys=WEBHOOK_KEYS)
    extra = dict(GENQ_API_THREADS=str(THREADS), GENQ_API_HELD_THREADS=str(HELD),
                 GENQ_MAX_HELD_REQUESTS=str(PER_TENANT), GENQ_RATE_LIMIT="100000/minute")
    engine = make_engine(pg_url)
    with genq_api(settings, extra) as api:
        yield {**api, "settings": settings, "sessions": make_sessionmaker(engine)}
    engine.dispose()


def tenant(server, name: str) -> dict:
    return make_key(server["settings"], f"{name}-{secrets.token_hex(3)}")


def submit(server, headers) -> str:
    """A job that stays queued: no worker runs in these tests."""
    resp = requests.post(f"{server['url']}/v1/jobs", headers=headers, timeout=SAFETY,
                         json={"model": "demo-text", "input": {"prompt": "watched"}})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def cancel(server, headers, job_id: str) -> None:
    resp = requests.post(f"{server['url']}/v1/jobs/{job_id}/cancel", headers=headers, timeout=SAFETY)
    assert resp.status_code == 200, resp.text


class Stream:
    """An event stream on a raw socket: many of these cost the test no thread."""

    def __init__(self, server, headers: dict, path: str, last_event_id: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=SAFETY)
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n"
                           f"Authorization: {headers['Authorization']}\r\n{extra}\r\n").encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        out, _, self.buf = self.buf.partition(mark)
        return out

    def body(self) -> bytes:
        """A refused stream's whole body (its Content-Length)."""
        n = int(self.headers.get("content-length", 0))
        while len(self.buf) < n:
            self.buf += self.sock.recv(65536)
        return self.buf[:n]

    def event(self, skip: tuple[str, ...] = ("queue",)) -> dict:
        """The next SSE event (comments and retry lines skipped, and a queued
        job's place in line unless asked for: it comes when it comes)."""
        while True:
            block = self._until(b"\n\n").decode()
            fields: dict = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "event" in fields and fields["event"] not in skip:
                fields["data"] = json.loads(fields["data"])
                return fields

    def events_until(self, kind: str) -> list[dict]:
        out = []
        while not out or out[-1]["event"] != kind:
            out.append(self.event())
        return out

    def closed_by_server(self) -> bool:
        try:
            self._until(b"\x00never")
        except EOFError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def test_a_cancel_reaches_the_jobs_stream_and_ends_it(server):
    alice = tenant(server, "fan")
    job = submit(server, alice)
    s = Stream(server, alice, f"/v1/jobs/{job}/events")
    try:
        assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["server"] == "genq" and s.headers["connection"] == "close"
        first = s.event()
        assert first["event"] == "queued" and first["id"] == str(first["data"]["id"])
        cancel(server, alice, job)
        end = s.event()
        assert end["event"] == "completed" and end["data"]["data"] == {"status": "canceled"}
        assert s.closed_by_server()
    finally:
        s.close()



def test_a_queued_jobs_stream_tells_its_place_in_line(server):
    """`event: queue` with genq.position's place, and no id: resuming goes by
    the durable events and the deltas only."""
    alice = tenant(server, "place")
    job = submit(server, alice)
    s = Stream(server, alice, f"/v1/jobs/{job}/events")
    try:
        assert s.event()["event"] == "queued"
        place = s.event(skip=())
        assert place["event"] == "queue" and "id" not in place
        assert place["data"]["position"] >= 0 and set(place["data"]) == {"position", "position_is_lower_bound",
                                                                         "eta_seconds"}
        cancel(server, alice, job)
        assert s.event()["event"] == "completed"
    finally:
        s.close()


def test_a_resumed_job_stream_replays_nothing_and_misses_nothing(server):
    alice = tenant(server, "resume")
    job = submit(server, alice)
    s = Stream(server, alice, f"/v1/jobs/{job}/events")
    queued = s.event()
    s.close()
    cancel(server, alice, job)  # while nobody watches
    again = Stream(server, alice, f"/v1/jobs/{job}/events", last_event_id=queued["id"])
    try:
        assert again.status == 200
        end = again.event()
        assert end["event"] == "completed" and int(end["id"]) > int(queued["id"])
        assert again.closed_by_server()
    finally:
        again.close()
    # Resumed after the end: 204, so an EventSource stops reconnecting.
    done = Stream(server, alice, f"/v1/jobs/{job}/events", last_event_id=end["id"])
    assert done.status == 204
    done.close()


def test_the_tenant_stream_resumes_from_last_event_id_without_replay_or_loss(server):
    alice = tenant(server, "tenant-resume")
    s = Stream(server, alice, "/v1/events")
    first = submit(server, alice)
    queued = s.event()
    assert queued["event"] == "queued" and queued["data"]["job_id"] == first and queued["id"] == str(queued["data"]["id"])
    s.close()
    # While disconnected: another job, and the first one's end.
    second = submit(server, alice)
    cancel(server, alice, first)
    again = Stream(server, alice, "/v1/events", last_event_id=queued["id"])
    try:
        got = [again.event(), again.event()]
        assert [(e["event"], e["data"]["job_id"]) for e in got] == [("queued", second), ("completed", first)]
        assert all(int(e["id"]) > int(queued["id"]) for e in got) and int(got[0]["id"]) < int(got[1]["id"])
        # And it goes on live.
        cancel(server, alice, second)
        live = again.event()
        assert (live["event"], live["data"]["job_id"]) == ("completed", second)
    finally:
        again.close()


def test_the_tenant_stream_shows_only_the_callers_jobs_and_filters_by_job(server):
    alice, mallory = tenant(server, "scoped"), tenant(server, "other")
    theirs = submit(server, mallory)
    everything = Stream(server, alice, "/v1/events")
    # Someone else's job id in the filter matches nothing.
    mine = submit(server, alice)
    filtered = Stream(server, alice, f"/v1/events?jobs={theirs},{mine}")
    try:
        other = submit(server, alice)
        cancel(server, mallory, theirs)
        cancel(server, alice, other)
        cancel(server, alice, mine)
        seen = [everything.event() for _ in range(3)]
        assert [(e["event"], e["data"]["job_id"]) for e in seen] == [
            ("queued", mine), ("queued", other), ("completed", other)]
        assert (e := everything.event())["event"] == "completed" and e["data"]["job_id"] == mine
        only = filtered.event()
        assert (only["event"], only["data"]["job_id"]) == ("completed", mine)
    finally:
        everything.close()
        filtered.close()
    # Another tenant's job's own stream is 404, as the job is.
    s = Stream(server, alice, f"/v1/jobs/{theirs}/events")
    assert s.status == 404 and s.headers["content-type"] == PROBLEM
    s.close()


@pytest.mark.parametrize("query, header, field", [
    ("?jobs=" + ",".join(secrets.token_hex(16) for _ in range(101)), None, "jobs"),
    ("?job=nope", None, "job"),
    ("?after=1.2", None, "after"),
    ("", "x", "Last-Event-ID"),
])
def test_a_bad_tenant_stream_request_is_422_naming_the_field(server, query, header, field):
    alice = tenant(server, "bad")
    s = Stream(server, alice, f"/v1/events{query}", last_event_id=header)
    try:
        assert s.status == 422 and s.headers["content-type"] == PROBLEM
        assert [e["field"] for e in json.loads(s.body())["errors"]] == [field]
    finally:
        s.close()


def test_200_open_streams_leave_submits_answered_and_the_tenant_cap_holds(server):
    """More streams than the server has threads by fifty times: a submit is still
    answered while every one of them is open, and each still hears its job end."""
    tenants = [tenant(server, f"many{i}") for i in range(4)]
    jobs = [submit(server, t) for t in tenants]
    streams = []
    try:
        for t, job in zip(tenants, jobs):
            for _ in range(PER_TENANT):
                s = Stream(server, t, f"/v1/jobs/{job}/events")
                streams.append(s)
                assert s.status == 200, s.body()
        assert len(streams) == 200
        for s in streams:
            assert s.event()["event"] == "queued"
        # Past the tenant's cap: 429, problem+json, Retry-After.
        over = Stream(server, tenants[0], f"/v1/jobs/{jobs[0]}/events")
        assert over.status == 429 and over.headers["content-type"] == PROBLEM
        assert int(over.headers["retry-after"]) >= 1 and "event streams" in json.loads(over.body())["detail"]
        over.close()
        # With all 200 open, a fifth tenant submits: answered.
        bystander = tenant(server, "bystander")
        assert requests.get(f"{server['url']}/healthz", timeout=SAFETY).status_code == 200
        job = submit(server, bystander)
        assert requests.get(f"{server['url']}/v1/jobs/{job}", headers=bystander, timeout=SAFETY).status_code == 200
        # ... and every stream was still open: each hears its job's end.
        for t, job in zip(tenants, jobs):
            cancel(server, t, job)
        for s in streams:
            assert s.event()["event"] == "completed"
            assert s.closed_by_server()
    finally:
        for s in streams:
            s.close()
    # Their slots are free again.
    deadline = time.monotonic() + SAFETY
    while True:
        s = Stream(server, tenants[0], f"/v1/jobs/{submit(server, tenants[0])}/events")
        s.close()
        if s.status == 200:
            break
        assert time.monotonic() < deadline, s.status
        time.sleep(0.2)


class FakeHold:
    def __init__(self) -> None:
        self.released = False

    def renew(self) -> None:
        pass

    def release(self) -> None:
        self.released = True


def test_a_state_change_reaches_every_watcher_with_one_read_and_no_polling(pg_url, registry_path, tmp_path):
    """In this process: the stream server on an engine that counts its statements.
    Idle watchers cost the database nothing; a cancel costs one read for all of them."""
    from types import SimpleNamespace

    from sqlalchemy import event as sa_event

    from api import fanout
    from genq import jobs as joblib
    from genq.keys import create_key
    from genq.notify import Notifier, notify_after_commit
    from genq.schema import Job
    from genq.storage import make_storage

    settings = Settings.from_env({}, home=tmp_path, database_url=pg_url, broker_url=REDIS_URL,
                                 registry_path=registry_path)
    hub_engine = make_engine(pg_url)
    statements: list[str] = []
    sa_event.listen(hub_engine, "before_cursor_execute", lambda conn, cursor, sql, *a: statements.append(sql))
    context = SimpleNamespace(sessions=make_sessionmaker(hub_engine), storage=make_storage(settings), settings=settings)
    server = fanout.StreamServer(context)
    writer_engine = make_engine(pg_url)
    sessions = make_sessionmaker(writer_engine)
    import redis

    notify_after_commit(sessions, Notifier(redis.Redis.from_url(REDIS_URL)))
    with sessions.begin() as session:
        owner, _ = create_key(session, f"inproc-{secrets.token_hex(3)}")
        session.flush()
        job_id = joblib.submit(session, tenant_id=owner.id, type_="text-generation", model="demo-text", pool="p",
                               batch_key="k", input_={}).id
    n = 50
    clients, holds = [], []
    try:
        for _ in range(n):
            ours, theirs = socket.socketpair()
            holds.append(FakeHold())
            server.adopt(ours.detach(), b"HTTP/1.1 200 OK\r\n\r\n",
                         fanout.Plan(tenant_id=owner.id, hold=holds[-1], job_id=job_id, seconds=300))
            theirs.settimeout(SAFETY)
            clients.append(theirs)
        readers = []
        for c in clients:
            r = c.makefile("rb")
            readers.append(r)

        def next_event(r) -> str:
            while True:
                line = r.readline()
                assert line, "the stream ended"
                if line.startswith(b"event: ") and line != b"event: queue\n":  # its place: a hint, when it comes
                    return line.split(b": ", 1)[1].strip().decode()

        assert {next_event(r) for r in readers} == {"queued"}
        # Once subscribed (which reads everything watched once more), idle
        deadline = time.monotonic() + SAFETY
        while not server.hub.subscribed:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        # Idle: a few seconds without reading events (the slow re-check is 15 s
        # apart); the queued job's place in line is read for the job, not per
        # watcher, and kept 5 s: one reading at most (its row, rank, the pool's counts).
        statements.clear()
        time.sleep(3)
        assert not [s for s in statements if "job_events" in s], statements
        assert len(statements) <= 5, statements
        with sessions.begin() as session:
            joblib.cancel(session, session.get(Job, job_id))
        assert {next_event(r) for r in readers} == {"completed"}
        # One read served all fifty watchers.
        assert len([s for s in statements if "job_events" in s]) == 1, statements
        deadline = time.monotonic() + SAFETY
        while not all(h.released for h in holds):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.streams == 0
    finally:
        for c in clients:
            c.close()
        hub_engine.dispose()
        writer_engine.dispose()


def test_live_output_reaches_the_handed_off_stream_before_the_end_and_resumes_at_n_k(server):
    import redis

    from genq import jobs as joblib
    from genq.live import RedisLive
    from genq.notify import Notifier, notify_after_commit
    from genq.schema import Job
    from genq.states import JobStatus

    owner = "fanout-test-worker"
    alice = tenant(server, "live")
    job_id = submit(server, alice)
    sessions = server["sessions"]
    notify_after_commit(sessions, Notifier(redis.Redis.from_url(REDIS_URL)))
    live = RedisLive(redis.Redis.from_url(REDIS_URL))
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        tenant_id = job.tenant_id
        [claimed] = joblib.claim_batch(session, model=job.model, batch_key=job.batch_key, limit=1, owner=owner,
                                       lease_seconds=30, pool=job.pool, first=job_id)
        assert claimed.id == job_id
    s = Stream(server, alice, f"/v1/jobs/{job_id}/events")
    try:
        assert [s.event()["event"] for _ in range(2)] == ["queued", "start"]
        pieces = ["Hel", "lo", ", ", "world"]
        live.publish(tenant_id, job_id, list(enumerate(pieces))[:2])
        first = [s.event(), s.event()]
        assert [e["data"] for e in first] == [{"delta": "Hel", "index": 0}, {"delta": "lo", "index": 1}]
        n = first[0]["id"].split(".")[0]
        assert [e["id"] for e in first] == [f"{n}.0", f"{n}.1"]
        s.close()
        # The rest while disconnected; the job ends.
        live.publish(tenant_id, job_id, list(enumerate(pieces))[2:])
        with sessions.begin() as session:
            assert joblib.finish(session, job_id, owner, JobStatus.SUCCEEDED,
                                 output={"text": "".join(pieces), "tokens": 4, "finish_reason": "length"})
        s = Stream(server, alice, f"/v1/jobs/{job_id}/events", last_event_id=first[-1]["id"])
        rest = s.events_until("completed")
        assert [(e["event"], e["data"].get("delta")) for e in rest] == [
            ("output", ", "), ("output", "world"), ("output", None), ("completed", None)]
        assert rest[0]["id"] == f"{n}.2" and rest[-1]["data"]["data"]["status"] == "succeeded"
    finally:
        s.close()
        live.close()


def test_a_lost_notification_is_made_up_by_the_slow_recheck(pg_url, registry_path, tmp_path, monkeypatch):
    """An event written by a session that publishes nothing (as when Redis drops
    the notification) still reaches the watcher, at the next re-check."""
    from types import SimpleNamespace

    from api import fanout
    from genq import jobs as joblib
    from genq.keys import create_key
    from genq.schema import Job
    from genq.storage import make_storage

    monkeypatch.setattr(fanout, "RESYNC_SECONDS", 1.0)
    settings = Settings.from_env({}, home=tmp_path, database_url=pg_url, broker_url=REDIS_URL,
                                 registry_path=registry_path)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)  # no notifier: nothing is published
    server = fanout.StreamServer(SimpleNamespace(sessions=sessions, storage=make_storage(settings), settings=settings))
    with sessions.begin() as session:
        owner, _ = create_key(session, f"lost-{secrets.token_hex(3)}")
        session.flush()
        job_id = joblib.submit(session, tenant_id=owner.id, type_="text-generation", model="demo-text", pool="p",
                               batch_key="k", input_={}).id
    ours, theirs = socket.socketpair()
    theirs.settimeout(SAFETY)
    server.adopt(ours.detach(), b"HTTP/1.1 200 OK\r\n\r\n",
                 fanout.Plan(tenant_id=owner.id, hold=FakeHold(), after=0, seconds=300))  # the tenant's stream
    reader = theirs.makefile("rb")
    try:
        def next_event() -> tuple[str, dict]:
            kind = None
            while True:
                line = reader.readline()
                assert line, "the stream ended"
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                elif line.startswith(b"data: ") and kind:
                    return kind, json.loads(line[6:])

        kind, data = next_event()
        assert (kind, data["job_id"]) == ("queued", job_id)
        # Subscribed first (which reads everything once), so only the re-check can find the cancel.
        deadline = time.monotonic() + SAFETY
        while not server.hub.subscribed:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        reads = server.hub.reads
        with sessions.begin() as session:
            joblib.cancel(session, session.get(Job, job_id))
        kind, data = next_event()
        assert (kind, data["job_id"], data["data"]) == ("completed", job_id, {"status": "canceled"})
        assert server.hub.reads > reads
    finally:
        reader.close()
        theirs.close()
        engine.dispose()


def test_a_tenant_stream_resuming_from_far_back_gets_all_it_missed(pg_url, registry_path, tmp_path, monkeypatch):
    """The re-checks move their floor up as time passes; a stream that joins
    later with an older resume point still reads from its own."""
    from types import SimpleNamespace

    from api import fanout
    from genq import jobs as joblib
    from genq.keys import create_key
    from genq.storage import make_storage

    monkeypatch.setattr(fanout, "RESYNC_SECONDS", 0.3)
    monkeypatch.setattr(fanout, "LAG_SECONDS", 0.0)
    settings = Settings.from_env({}, home=tmp_path, database_url=pg_url, broker_url=REDIS_URL,
                                 registry_path=registry_path)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    server = fanout.StreamServer(SimpleNamespace(sessions=sessions, storage=make_storage(settings), settings=settings))

    def submit_job(tenant_id: str) -> tuple[str, int]:
        with sessions.begin() as session:
            job = joblib.submit(session, tenant_id=tenant_id, type_="text-generation", model="demo-text", pool="p",
                                batch_key="k", input_={})
            session.flush()
            return job.id, joblib.events(session, job.id)[0].id

    def watch(tenant_id: str, after: int):
        ours, theirs = socket.socketpair()
        theirs.settimeout(SAFETY)
        server.adopt(ours.detach(), b"HTTP/1.1 200 OK\r\n\r\n",
                     fanout.Plan(tenant_id=tenant_id, hold=FakeHold(), after=after, seconds=300))
        return theirs, theirs.makefile("rb")

    def next_job(reader) -> str:
        while True:
            line = reader.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                return json.loads(line[6:])["job_id"]

    with sessions.begin() as session:
        owner, _ = create_key(session, f"far-{secrets.token_hex(3)}")
    old_job, old_event = submit_job(owner.id)
    first_sock, first = watch(owner.id, old_event)
    new_job, _ = submit_job(owner.id)
    assert next_job(first) == new_job
    time.sleep(1.0)  # re-checks come and go; their floor passes both jobs
    late_sock, late = watch(owner.id, old_event - 1)
    try:
        assert [next_job(late), next_job(late)] == [old_job, new_job]
    finally:
        for f in (first, first_sock, late, late_sock):
            f.close()
        engine.dispose()


def test_the_server_logged_no_error(server):
    bad = [line for line in server["lines"] if "Traceback" in line or "[ERROR]" in line or "Socket error" in line]
    assert not bad, "\n".join(server["lines"])


@pytest.mark.parametrize("starts_meanwhile", [True, False])
def test_a_place_read_while_the_job_starts_is_not_sent_after_its_start(monkeypatch, starts_meanwhile):
    """A queued job's place is read in a thread; its start event, handled on the loop meanwhile, makes the place
    stale. Sent after the start, the place came with the start's id (an SSE client keeps the last id for an event
    without one), and a client saw that event twice (CI: ids ['474', '475', '475', ...])."""
    import asyncio
    from types import SimpleNamespace

    from api import fanout

    monkeypatch.setattr(fanout.position, "POOL_SECONDS", 0.02)
    loop = asyncio.new_event_loop()
    hub = fanout.Hub.__new__(fanout.Hub)
    hub.loop, hub.running, written = loop, set(), []
    hub.by_job = {"j": [SimpleNamespace(place=None, write=lambda data: written.append(data) or True)]}

    def read_places(jobs):
        if starts_meanwhile:
            loop.call_soon_threadsafe(hub.running.add, "j")
            time.sleep(0.05)  # the loop takes the start in while the place is read
        return {"j": {"position": 1, "ahead": 0}}

    hub.read_places = read_places

    async def rounds():
        task = asyncio.ensure_future(hub.places())
        await asyncio.sleep(0.3)
        task.cancel()

    try:
        loop.run_until_complete(rounds())
    finally:
        loop.close()
    assert written == ([] if starts_meanwhile else ['event: queue\ndata: {"position": 1, "ahead": 0}\n\n'])
