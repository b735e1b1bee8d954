"""GET /v1/events served from the request's thread, as embedded (SQLite, no
Redis) and werkzeug serve it: scoped to the caller, resumable, filtered."""
from __future__ import annotations

import json
import secrets

from tests.helpers import make_key


def submit(client, headers) -> str:
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "Once"}}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def events(client, headers, query: str = "", count: int = 1, **extra) -> list[dict]:
    """The first `count` events of a tenant stream, then it is closed."""
    resp = client.get(f"/v1/events{query}", headers={**headers, "Accept": "text/event-stream", **extra}, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    out = []
    try:
        for chunk in resp.response:
            fields = dict(line.split(": ", 1) for line in chunk.decode().strip().splitlines()
                          if line and not line.startswith(":") and ": " in line)
            if "event" in fields:
                out.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
                if len(out) == count:
                    return out
    finally:
        resp.close()
    return out


def test_the_tenant_stream_is_scoped_resumable_and_filtered(app, embedded_settings):
    client = app.test_client()
    alice = make_key(embedded_settings, f"alice-{secrets.token_hex(3)}")
    mallory = make_key(embedded_settings, f"mallory-{secrets.token_hex(3)}")
    theirs = submit(client, mallory)
    first, second = submit(client, alice), submit(client, alice)
    # From the start: only alice's jobs, each event naming its job, ids growing.
    got = events(client, alice, "?after=0", count=2)
    assert [(e["event"], e["data"]["job_id"]) for e in got] == [("queued", first), ("queued", second)]
    assert int(got[0]["id"]) < int(got[1]["id"]) and got[0]["id"] == str(got[0]["data"]["id"])
    # Resumed after the first: the second, not the first again.
    assert client.post(f"/v1/jobs/{first}/cancel", headers=alice).status_code == 200
    again = events(client, alice, count=2, **{"Last-Event-ID": got[0]["id"]})
    assert [(e["event"], e["data"]["job_id"]) for e in again] == [("queued", second), ("completed", first)]
    # Filtered: another tenant's id matches nothing; only the named job's events.
    only = events(client, alice, f"?after=0&jobs={theirs},{second}", count=1)
    assert [(e["event"], e["data"]["job_id"]) for e in only] == [("queued", second)]
    # The JSON form: the same events, scoped.
    listed = client.get("/v1/events?after=0", headers={**alice, "Accept": "application/json"}).get_json()["data"]
    assert {e["job_id"] for e in listed} == {first, second}
    assert client.get("/v1/events?after=0", headers=mallory).get_json()["data"][0]["job_id"] == theirs


def test_tenant_stream_errors_are_problem_json_naming_the_field(app, embedded_settings):
    client = app.test_client()
    alice = make_key(embedded_settings, f"alice-{secrets.token_hex(3)}")
    sse = {**alice, "Accept": "text/event-stream"}
    for query, field in (("?job=x", "job"), ("?jobs=", "jobs"), ("?after=-1", "after"), ("?nope=1", "nope"),
                         ("?jobs=" + ",".join(secrets.token_hex(16) for _ in range(101)), "jobs")):
        resp = client.get(f"/v1/events{query}", headers=sse)
        assert resp.status_code == 422 and resp.mimetype == "application/problem+json", (query, resp.status_code)
        assert [e["field"] for e in resp.get_json()["errors"]] == [field], query
    assert client.get("/v1/events", headers={"Accept": "text/event-stream"}).status_code == 401
