"""What the API accepts and shows at its edges: API keys refused in URLs,
NUL refused in path and query parameters (on Postgres too), unknown job
types named, dependency errors kept to the log, output URLs from the
configured public URL, worker names kept from tenants."""
from __future__ import annotations

import datetime as dt
import json
import logging
import secrets

import pytest
from sqlalchemy import select, update

from api.app import create_app
from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.schema import Job, JobEvent
from tests.conftest import WEBHOOK_KEYS
from tests.helpers import finish_with_outputs, make_key

PROBLEM = "application/problem+json"


def sessions_for(settings):
    return make_sessionmaker(make_engine(settings.database_url))


# --- API keys in URLs ---------------------------------------------------------


@pytest.mark.parametrize("query, field", [
    ("api_key={key}", "api_key"), ("key={key}", "key"), ("token={key}", "token"), ("access_token={key}", "access_token"),
    ("API_KEY={key}", "API_KEY"), ("model={key}", "model"), ("cursor={key}", "cursor"), ("x={key}", "x"),
    ("limit=5&apikey=whatever", "apikey"),
])
def test_a_key_in_the_query_string_is_refused_before_anything_logs_it(client, embedded_settings, caplog, query, field):
    headers = make_key(embedded_settings, "leaky")
    raw = headers["Authorization"].split(" ", 1)[1]
    caplog.set_level(logging.DEBUG)
    for with_header in (headers, {}):
        resp = client.get(f"/v1/jobs?{query.format(key=raw)}", headers=with_header)
        assert resp.status_code == 400, resp.get_data(as_text=True)
        assert resp.mimetype == PROBLEM
        problem = resp.get_json()
        assert "Authorization header" in problem["detail"] and "revoke" in problem["detail"]
        assert problem["errors"][0]["field"] == field
        assert raw not in resp.get_data(as_text=True)
    assert raw not in caplog.text


def test_a_key_prefix_in_a_path_is_no_key(client, embedded_settings):
    admin = make_key(embedded_settings, "ops", "admin")
    made = client.post("/v1/admin/keys", json={"tenant": "someone"}, headers=admin).get_json()
    resp = client.post(f"/v1/admin/keys/{made['prefix']}/revoke", headers=admin)
    assert resp.status_code == 200 and resp.get_json() == {"revoked": 1}


# --- NUL in parameters --------------------------------------------------------


@pytest.mark.parametrize("method, path, query, field", [
    ("get", "/v1/jobs", {"model": "demo\x00text"}, "model"),
    ("get", "/v1/jobs", {"type": "\x00"}, "type"),
    ("get", "/v1/jobs", {"status": "queued\x00"}, "status"),
    ("get", "/v1/jobs", {"cursor": "\x00"}, "cursor"),
    ("get", "/v1/models/demo%00text", None, "name"),
    ("get", "/v1/jobs/%00/outputs/0.png", None, "job_id"),
    ("get", "/v1/jobs/0123456789abcdef0123456789abcdef/outputs/%00", None, "name"),
    ("post", "/v1/admin/keys/gq_%00/revoke", None, "prefix"),
    ("post", "/v1/admin/pools/a%00b/pause", None, "name"),
    ("post", "/v1/admin/workers/a%00b/drain", None, "name"),
])
def test_nul_in_a_path_or_query_parameter_is_422_naming_it(any_db, method, path, query, field):
    client = create_app(any_db).test_client()
    admin = make_key(any_db, f"ops-{secrets.token_hex(3)}", "admin")
    resp = getattr(client, method)(path, query_string=query, headers=admin)
    assert resp.status_code == 422, resp.get_data(as_text=True)[:300]
    assert resp.mimetype == PROBLEM
    assert resp.get_json()["errors"][0]["field"] == field


# --- readiness, public URLs, worker names, job types ---------------------------


def test_readyz_says_down_without_the_error_text(embedded_settings, caplog):
    app = create_app(embedded_settings.replace(database_url="postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none",
                                                 webhook_secret_keys=WEBHOOK_KEYS))
    caplog.set_level(logging.WARNING)
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503
    body = resp.get_data(as_text=True)
    assert resp.get_json()["checks"] == {"database": "down", "broker": "ok", "storage": "ok"}
    for leak in ("OperationalError", "127.0.0.1", "nobody", "connection", "psycopg"):
        assert leak not in body
    assert "readyz: the database is down: OperationalError" in caplog.text


def test_output_urls_use_the_public_url_not_the_host_header(embedded_settings):
    settings = embedded_settings.replace(public_url="https://genq.example.com/api")
    client = create_app(settings).test_client()
    headers = make_key(settings, "urls")
    job_id = client.post("/v1/jobs", json={"model": "demo-image", "input": {"prompt": "x"}}, headers=headers).get_json()["id"]
    finish_with_outputs(settings, job_id, "w")
    expected = f"https://genq.example.com/api/v1/jobs/{job_id}/outputs/0.png"
    for host in ("evil.example", "127.0.0.1:1"):
        job = client.get(f"/v1/jobs/{job_id}", headers={**headers, "Host": host}).get_json()
        assert job["output"]["images"][0]["url"] == expected
        listed = client.get("/v1/jobs", headers={**headers, "Host": host}).get_json()["data"][0]
        assert listed["output"]["images"][0]["url"] == expected
        events = client.get(f"/v1/jobs/{job_id}/events", headers={**headers, "Host": host}).get_json()["data"]
        assert [e["data"]["images"][0]["url"] for e in events if e["type"] == "output"] == [expected]


def test_tenants_never_see_the_worker_host_or_pid(embedded_settings):
    client = create_app(embedded_settings).test_client()
    headers = make_key(embedded_settings, "curious")
    owner = "gpu-text.4242@gpu-host-7.internal:4242:abc123"
    sessions = sessions_for(embedded_settings)
    job_id = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "x"}},
                         headers=headers).get_json()["id"]
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=2))

    def claim():
        with sessions.begin() as session:
            job = session.get(Job, job_id)
            assert joblib.claim_batch(session, model=job.model, batch_key=job.batch_key, limit=1, owner=owner,
                                      lease_seconds=30)

    def lapse():
        with sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(
                lease_until=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
            joblib.requeue_expired(session, [session.get(Job, job_id).pool])

    claim()  # handed back by a shutdown, the attempt not counted
    with sessions.begin() as session:
        assert joblib.hand_back(session, [job_id], owner, "its worker shut down; queued again") == [job_id]
    claim()  # its lease lapses: queued again
    lapse()
    claim()  # its lease lapses again: attempts exhausted
    lapse()
    seen = [client.get(f"/v1/jobs/{job_id}", headers=headers).get_data(as_text=True),
            client.get(f"/v1/jobs/{job_id}/events", headers=headers).get_data(as_text=True),
            client.get(f"/v1/jobs/{job_id}/events", headers={**headers, "Accept": "text/event-stream"}).get_data(as_text=True)]
    job = json.loads(seen[0])
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted", job
    types = [e["type"] for e in json.loads(seen[1])["data"]]
    assert "start" in types and "log" in types and types[-1] == "completed"
    for text in seen:
        for leak in ("gpu-host-7", "4242", "abc123", '"worker"'):
            assert leak not in text, (leak, text)
    # Operators keep it: the events in the database name the worker.
    with sessions() as session:
        recorded = [e.data.get("worker") for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
                    if e.type in ("start", "log", "completed") and e.data.get("worker")]
    assert recorded and set(recorded) == {owner}


def test_an_unknown_job_type_is_422_naming_type(client, embedded_settings):
    headers = make_key(embedded_settings, "types")
    resp = client.get("/v1/jobs?type=bogus", headers=headers)
    assert resp.status_code == 422 and resp.mimetype == PROBLEM
    problem = resp.get_json()
    assert problem["errors"][0]["field"] == "type"
    assert "fine-tune" in problem["detail"] and "text-generation" in problem["detail"]
    for known in ("text-generation", "image-generation", "fine-tune"):
        assert client.get(f"/v1/jobs?type={known}", headers=headers).status_code == 200
    doc = client.get("/openapi.json").get_json()
    [type_param] = [p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "type"]
    # Every family the registry serves, and fine-tune.
    from models.registry import FAMILIES

    assert type_param["schema"]["enum"] == sorted(set(FAMILIES) | {"fine-tune"})
