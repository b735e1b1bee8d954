"""Live output on a job's event stream: deltas a worker publishes (genq.live)
come as `output` events among the durable ones, in order and before the final
`output` and `completed`; each event id is the stream's cursor (`N` or `N.k`),
so resuming after any event -- by Last-Event-ID or `?after=` -- replays
nothing. On the embedded files and on Redis. The worker is played here by
genq.jobs calls and live_for(settings), as a worker makes them."""
from __future__ import annotations

import json
import re
import secrets

import pytest
import redis

from api.app import create_app
from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import authenticate
from genq.live import KEY_PREFIX, live_for
from genq.schema import Job
from genq.states import JobStatus
from tests.conftest import REDIS_URL
from tests.helpers import make_key

OWNER = "text-worker.1@test:1:live"
PIECES = ["Once", " upon", " a tíme", ",\n", "日本", " 🙂", " the", " end."]
CURSOR = re.compile(r"^[0-9]+\.[0-9]+$")


@pytest.fixture(params=["file", "redis"])
def settings(request, embedded_settings):
    if request.param == "redis":
        return embedded_settings.replace(broker_url=REDIS_URL)
    return embedded_settings


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def live(settings):
    store = live_for(settings)
    yield store
    store.close()


@pytest.fixture
def alice(settings):
    return make_key(settings, f"alice-{secrets.token_hex(3)}")


@pytest.fixture
def cleanup(settings):
    """Redis keys the test made, deleted afterwards (they would expire within the hour)."""
    keys: list[str] = []
    yield keys
    if settings.broker_url.startswith("redis://"):
        client = redis.Redis.from_url(REDIS_URL)
        for key in keys:
            client.delete(key)
        client.close()


def tenant_id(settings, headers) -> str:
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        return authenticate(session, headers["Authorization"].split()[1])[0].id


def submit(client, headers) -> str:
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "Once"}}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def worker_session(settings):
    return make_sessionmaker(make_engine(settings.database_url)).begin()


def claim(settings, job_id: str) -> None:
    with worker_session(settings) as session:
        job = session.get(Job, job_id)
        [claimed] = joblib.claim_batch(session, model=job.model, batch_key=job.batch_key, limit=1, owner=OWNER,
                                       lease_seconds=30)
        assert claimed.id == job_id


def progress(settings, job_id: str, current: int) -> None:
    with worker_session(settings) as session:
        assert joblib.set_progress(session, job_id, OWNER, {"current": current, "total": len(PIECES), "unit": "tokens"})


def finish(settings, job_id: str, text: str) -> None:
    with worker_session(settings) as session:
        assert joblib.finish(session, job_id, OWNER, JobStatus.SUCCEEDED,
                             output={"text": text, "tokens": len(PIECES), "finish_reason": "length"})


def run_job(settings, client, headers, live, cleanup) -> str:
    """A job claimed, its output published as it grows, then finished: the
    worker publishes the last delta before it finishes the job."""
    job_id, tid = submit(client, headers), tenant_id(settings, headers)
    cleanup.append(f"{KEY_PREFIX}:{tid}:{job_id}")
    claim(settings, job_id)
    live.publish(tid, job_id, list(enumerate(PIECES))[:3])
    progress(settings, job_id, 3)
    live.publish(tid, job_id, list(enumerate(PIECES))[3:])
    finish(settings, job_id, "".join(PIECES))
    return job_id


def stream(client, headers, job_id, query: str = "", **extra):
    return client.get(f"/v1/jobs/{job_id}/events{query}",
                      headers={**headers, "Accept": "text/event-stream", **extra}, buffered=False)


def parse(chunk: bytes) -> tuple[str, str, dict] | None:
    """(id, event, data) of one SSE event; None for the retry line and comments."""
    fields = dict(line.split(": ", 1) for line in chunk.decode().strip().splitlines() if not line.startswith(":"))
    if "event" not in fields:
        return None
    return fields["id"], fields["event"], json.loads(fields["data"])


def events_of(resp) -> list[tuple[str, str, dict]]:
    try:
        return [e for e in map(parse, resp.response) if e]
    finally:
        resp.close()


def deltas(events) -> list[tuple[str, int, str]]:
    """(id, index, delta) of the live output events."""
    return [(i, d["index"], d["delta"]) for i, kind, d in events if kind == "output" and "delta" in d]


def test_live_output_streams_in_order_before_completed(settings, app, alice, live, cleanup):
    client = app.test_client()
    job_id = run_job(settings, client, alice, live, cleanup)
    events = events_of(stream(client, alice, job_id))
    kinds = [kind for _, kind, _ in events]
    live_out = deltas(events)
    assert [index for _, index, _ in live_out] == list(range(len(PIECES)))
    assert "".join(delta for _, _, delta in live_out) == "".join(PIECES)
    assert all(CURSOR.fullmatch(event_id) for event_id, _, _ in live_out)
    # The job had ended: its durable events, every delta, then the durable
    # output (the whole text) and completed, which ends the stream.
    assert kinds == ["queued", "start", "progress"] + ["output"] * len(PIECES) + ["output", "completed"]
    assert all(event_id.isdigit() for event_id, _, _ in events[:3])  # before any output: plain durable ids
    progress_id = events[2][0]
    assert [event_id for event_id, _, _ in live_out] == [f"{progress_id}.{k}" for k in range(len(PIECES))]
    assert events[-2][2]["data"]["text"] == "".join(PIECES) and "delta" not in events[-2][2]
    assert events[-1][0] == f"{events[-1][2]['id']}.{len(PIECES) - 1}"
    # The JSON list is the record only: no live output in it.
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=alice).get_json()["data"]
    assert [e["type"] for e in listed] == ["queued", "start", "progress", "output", "completed"]


def test_output_merges_with_durable_events_as_the_job_runs(settings, app, alice, live, cleanup):
    """The stream is open while the worker publishes: each event id is the
    cursor at that point, durable ones included once output was sent."""
    client, tid = app.test_client(), tenant_id(settings, alice)
    job_id = submit(client, alice)
    cleanup.append(f"{KEY_PREFIX}:{tid}:{job_id}")
    resp = stream(client, alice, job_id)
    chunks = (e for e in map(parse, resp.response) if e)
    seen = [next(chunks)]
    assert seen[0][1] == "queued" and seen[0][0].isdigit()
    claim(settings, job_id)
    seen.append(next(chunks))
    assert seen[-1][1] == "start"
    start_id = int(seen[-1][0])
    live.publish(tid, job_id, [(0, PIECES[0]), (1, PIECES[1])])
    seen += [next(chunks), next(chunks)]
    assert [(i, kind, d) for i, kind, d in seen[-2:]] == [
        (f"{start_id}.0", "output", {"delta": PIECES[0], "index": 0}),
        (f"{start_id}.1", "output", {"delta": PIECES[1], "index": 1})]
    progress(settings, job_id, 2)
    seen.append(next(chunks))
    progress_id = seen[-1][0]
    assert seen[-1][1] == "progress" and progress_id.endswith(".1") and int(progress_id.split(".")[0]) > start_id
    live.publish(tid, job_id, [(i, p) for i, p in enumerate(PIECES) if i >= 2])
    finish(settings, job_id, "".join(PIECES))
    seen += list(chunks)
    resp.close()
    assert "".join(delta for _, _, delta in deltas(seen)) == "".join(PIECES)
    assert deltas(seen)[2][0] == f"{progress_id.split('.')[0]}.2"
    assert [kind for _, kind, _ in seen][-2:] == ["output", "completed"]
    # Resumed after the durable progress event: no delta replayed.
    rest = events_of(stream(client, alice, job_id, **{"Last-Event-ID": progress_id}))
    assert [index for _, index, _ in deltas(rest)] == list(range(2, len(PIECES)))


@pytest.mark.parametrize("how", ["Last-Event-ID", "after"])
def test_a_stream_resumes_after_a_cursor_without_replaying(settings, app, alice, live, cleanup, how):
    client = app.test_client()
    job_id = run_job(settings, client, alice, live, cleanup)
    full = events_of(stream(client, alice, job_id))
    for position in (0, 4, len(PIECES) - 1):
        cursor = deltas(full)[position][0]
        if how == "after":
            rest = events_of(stream(client, alice, job_id, f"?after={cursor}"))
        else:
            rest = events_of(stream(client, alice, job_id, **{"Last-Event-ID": cursor}))
        assert [index for _, index, _ in deltas(rest)] == list(range(position + 1, len(PIECES)))
        # Everything after the cursor, in the order the full stream sent it.
        after = full[[event_id for event_id, _, _ in full].index(cursor) + 1:]
        assert [(kind, d) for _, kind, d in rest] == [(kind, d) for _, kind, d in after]
    # Resumed after the last event: nothing more comes (204 stops an EventSource).
    last = full[-1][0]
    query, headers = (f"?after={last}", {}) if how == "after" else ("", {"Last-Event-ID": last})
    assert stream(client, alice, job_id, query, **headers).status_code == 204


def test_last_event_id_wins_over_after(settings, app, alice, live, cleanup):
    """An EventSource reconnects with Last-Event-ID while its URL keeps the first `after`."""
    client = app.test_client()
    job_id = run_job(settings, client, alice, live, cleanup)
    full = events_of(stream(client, alice, job_id))
    first, later = deltas(full)[1][0], deltas(full)[5][0]
    rest = events_of(stream(client, alice, job_id, f"?after={first}", **{"Last-Event-ID": later}))
    assert [index for _, index, _ in deltas(rest)] == list(range(6, len(PIECES)))


@pytest.mark.parametrize("value", ["abc", "-1", "1" * 30, "7.", ".5", "7.x", "7.1.2", "7,1", "7.-1", "7." + "1" * 30])
@pytest.mark.parametrize("how", ["Last-Event-ID", "after"])
def test_a_bad_cursor_is_422_naming_it(settings, app, alice, how, value):
    client = app.test_client()
    job_id = submit(client, alice)
    if how == "after":
        resp = stream(client, alice, job_id, "?" + "&".join([f"after={value}"]))
    else:
        resp = stream(client, alice, job_id, **{"Last-Event-ID": value})
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    assert resp.get_json()["errors"][0]["field"] == how
    # The JSON list reads the same parameters, and refuses them alike.
    if how == "after":
        listed = client.get(f"/v1/jobs/{job_id}/events?after={value}", headers=alice)
        assert listed.status_code == 422 and listed.get_json()["errors"][0]["field"] == "after"


def test_after_reads_the_json_list_from_its_durable_part(settings, app, alice, live, cleanup):
    client = app.test_client()
    job_id = run_job(settings, client, alice, live, cleanup)
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=alice).get_json()["data"]
    start = listed[1]["id"]
    later = client.get(f"/v1/jobs/{job_id}/events?after={start}.3", headers=alice).get_json()["data"]
    assert [e["type"] for e in later] == ["progress", "output", "completed"]


def test_another_tenants_stream_is_404(settings, app, alice, live, cleanup):
    client = app.test_client()
    job_id = run_job(settings, client, alice, live, cleanup)
    bob = make_key(settings, f"bob-{secrets.token_hex(3)}")
    for query, headers in (("", {}), ("?after=1.0", {}), ("", {"Last-Event-ID": "1.0"})):
        resp = stream(client, bob, job_id, query, **headers)
        assert resp.status_code == 404 and resp.mimetype == "application/problem+json"
        resp.close()
    # The live output is the owner's: read with bob's tenant id, there is none.
    assert live.read(tenant_id(settings, bob), job_id) == []
    assert len(live.read(tenant_id(settings, alice), job_id)) == len(PIECES)
