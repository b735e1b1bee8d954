"""The API's hot path on real Postgres and Redis: a poll is one SQL statement
with a warm key cache, a submit is as few as its guarantees allow, a job's
ETag makes an unchanged poll a bodiless 304 (for its owner only), and a
revoked key stops working within GENQ_KEY_CACHE_SECONDS."""
from __future__ import annotations

import secrets
import time
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy import event, update

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.keys import revoke
from genq.schema import Job, utcnow
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import finish_with_outputs, make_key

PROBLEM = "application/problem+json"
TEXT_JOB = {"model": "demo-text", "input": {"prompt": "hi", "max_new_tokens": 4}}


@pytest.fixture
def settings(embedded_settings, pg_url):
    return embedded_settings.replace(database_url=pg_url, webhook_secret_keys=WEBHOOK_KEYS,
                                     ratelimit_storage_url=REDIS_URL)


@pytest.fixture
def app(settings):
    # tests/api/conftest.py's `client` serves this app.
    return create_app(settings)


@contextmanager
def statements(app):
    """Every SQL statement the app's engine sends while the block runs, as
    psycopg is asked to send it: SQLAlchemy's and those the poll sends to
    psycopg itself (api.context.Context.driver) alike."""
    engine = app.extensions["genq"].sessions.kw["bind"]
    sent: list[str] = []
    mine: set[int] = set()  # the engine's connections, as its pool hands them out

    def checkout(dbapi_conn, record, proxy):
        mine.add(id(dbapi_conn))

    original = psycopg.Cursor.execute

    def execute(cursor, query, *args, **kwargs):
        if id(cursor.connection) in mine:
            sent.append(str(query))
        return original(cursor, query, *args, **kwargs)

    event.listen(engine, "checkout", checkout)
    psycopg.Cursor.execute = execute
    try:
        yield sent
    finally:
        psycopg.Cursor.execute = original
        event.remove(engine, "checkout", checkout)


def tenant(settings, name="t"):
    return make_key(settings, f"{name}-{secrets.token_hex(4)}")


def submit(client, headers, **extra):
    resp = client.post("/v1/jobs", json=TEXT_JOB, headers={**headers, **extra})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def set_job(settings, job_id, **values):
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **values))
    engine.dispose()


def test_a_poll_with_a_warm_key_cache_is_one_statement(app, client, settings):
    headers = tenant(settings)
    job_id = submit(client, headers)  # verifies the key: the cache is warm
    # A queued job's first poll reads its place in line too (genq.position):
    # its row, its rank, its pool's counts. The process keeps the place 5 s.
    with statements(app) as sent:
        assert client.get(f"/v1/jobs/{job_id}", headers=headers).get_json()["queue"]["position"] >= 0
    assert len(sent) > 1
    checkouts = []
    engine = app.extensions["genq"].sessions.kw["bind"]
    event.listen(engine, "checkout", lambda *a: checkouts.append(1))
    with statements(app) as sent:
        resp = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert resp.status_code == 200 and resp.get_json()["id"] == job_id
    assert len(sent) == 1, sent
    # And one connection: the place in line, kept in memory, needs none.
    assert len(checkouts) == 1
    # By id and owner at once: another tenant's job is never read into the process.
    assert "FROM jobs" in sent[0] and "jobs.id =" in sent[0] and "jobs.tenant_id =" in sent[0]
    # A cold process verifies the key first, in one statement of its own
    # (the job running now: no place in line to read).
    set_job(settings, job_id, status="running")
    cold = create_app(settings)
    with statements(cold) as sent:
        assert cold.test_client().get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
    assert len(sent) == 2 and "api_keys" in sent[0] and "tenants" in sent[0], sent


def test_a_submit_is_two_statements_and_an_idempotency_key_adds_two(app, client, settings):
    headers = tenant(settings)
    submit(client, headers)  # warm the key cache
    with statements(app) as sent:
        submit(client, headers)
    # Lock the tenant's row (the quota), then count its active jobs and insert
    # the job with its event, in one statement.
    assert len(sent) == 2, sent
    assert "FOR NO KEY UPDATE" in sent[0]
    assert "count(" in sent[1] and "INSERT INTO jobs" in sent[1] and "INSERT INTO job_events" in sent[1]
    assert not any("idempotency" in s for s in sent)
    with statements(app) as sent:
        first = submit(client, headers, **{"Idempotency-Key": secrets.token_hex(8)})
    # The key's lookup before, and its record in the job's transaction.
    assert len(sent) == 4 and sum("idempotency_keys" in s for s in sent) == 2, sent
    # Without a quota there is nothing to lock or count: one statement.
    unlimited = create_app(settings.replace(max_active_jobs=0))
    unlimited.test_client().post("/v1/jobs", json=TEXT_JOB, headers=headers)  # warm its key cache
    with statements(unlimited) as sent:
        submit(unlimited.test_client(), headers)
    assert len(sent) == 1 and "INSERT INTO jobs" in sent[0] and "count(" not in sent[0], sent
    assert client.get(f"/v1/jobs/{first}", headers=headers).get_json()["status"] == "queued"


def test_the_active_jobs_quota_still_holds(settings):
    client = create_app(settings.replace(max_active_jobs=2)).test_client()
    headers = tenant(settings)
    first = submit(client, headers)
    submit(client, headers)
    over = client.post("/v1/jobs", json=TEXT_JOB, headers=headers)
    assert over.status_code == 429 and over.mimetype == PROBLEM and over.headers["Retry-After"] == "5"
    assert "2 jobs queued or running" in over.get_json()["detail"]
    # Nothing of the refused job was written; a finished job makes room.
    assert len(client.get("/v1/jobs", headers=headers).get_json()["data"]) == 2
    set_job(settings, first, status="succeeded", completed_at=utcnow())
    submit(client, headers)


def test_etag_and_if_none_match(client, settings):
    headers = tenant(settings)
    job_id = submit(client, headers)
    first = client.get(f"/v1/jobs/{job_id}", headers=headers)
    tag = first.headers["ETag"]
    assert tag.startswith('W/"') and tag.endswith('"')
    again = client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": tag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == tag
    assert client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": f'"other", {tag}'}).status_code == 304
    assert client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": '"other"'}).status_code == 200
    # Any change GET shows is a new tag, and the old one gets the whole job.
    for change in ({"progress": {"step": 1, "total": 4}}, {"status": "running", "started_at": utcnow()},
                   {"progress": {"step": 2, "total": 4}}):
        set_job(settings, job_id, **change)
        changed = client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": tag})
        assert changed.status_code == 200 and changed.headers["ETag"] != tag
        tag = changed.headers["ETag"]


def test_another_tenants_etag_gets_404_never_304(client, settings):
    owner, other = tenant(settings, "owner"), tenant(settings, "other")
    job_id = submit(client, owner)
    tag = client.get(f"/v1/jobs/{job_id}", headers=owner).headers["ETag"]
    for match in (tag, "*"):
        resp = client.get(f"/v1/jobs/{job_id}", headers={**other, "If-None-Match": match})
        assert resp.status_code == 404 and resp.mimetype == PROBLEM
        assert "ETag" not in resp.headers and job_id in resp.get_json()["detail"]


def test_retry_after_while_queued_or_running_not_once_ended(client, settings):
    headers = make_key(settings, f"r-{secrets.token_hex(4)}")
    image = client.post("/v1/jobs", json={"model": "demo-image", "input": {"prompt": "x"}}, headers=headers)
    job_id = image.get_json()["id"]
    queued = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert queued.get_json()["status"] == "queued" and int(queued.headers["Retry-After"]) >= 1
    set_job(settings, job_id, status="running", started_at=utcnow())
    running = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert running.get_json()["status"] == "running" and int(running.headers["Retry-After"]) >= 1
    not_modified = client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": running.headers["ETag"]})
    assert not_modified.status_code == 304 and "Retry-After" in not_modified.headers
    set_job(settings, job_id, status="queued", started_at=None)
    finish_with_outputs(settings, job_id, "w")
    done = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert done.get_json()["status"] == "succeeded" and "Retry-After" not in done.headers
    # Prefer: wait still answers at once for an ended job, and says so.
    waited = client.get(f"/v1/jobs/{job_id}", headers={**headers, "Prefer": "wait=5"})
    assert waited.status_code == 200 and waited.headers["Preference-Applied"] == "wait=5"


def test_a_key_revoked_elsewhere_stops_within_the_bound(settings):
    client = create_app(settings.replace(key_cache_seconds=0.5)).test_client()
    headers = tenant(settings)
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    engine = make_engine(settings.database_url)  # another process's revocation, as `genq keys revoke` does it
    with make_sessionmaker(engine).begin() as session:
        assert revoke(session, headers["Authorization"].split()[1][:10]) == 1
    engine.dispose()
    time.sleep(0.6)  # past the bound
    resp = client.get("/v1/jobs", headers=headers)
    assert resp.status_code == 401 and resp.mimetype == PROBLEM


def test_a_key_revoked_through_this_process_stops_at_once(client, settings):
    admin = make_key(settings, f"ops-{secrets.token_hex(4)}", "admin")
    made = client.post("/v1/admin/keys", json={"tenant": f"leaky-{secrets.token_hex(4)}"}, headers=admin).get_json()
    headers = {"Authorization": f"Bearer {made['key']}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200  # cached now, for 5 s
    assert client.post(f"/v1/admin/keys/{made['prefix']}/revoke", headers=admin).status_code == 200
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_the_rate_limit_is_one_redis_round_trip(app, client, settings):
    headers = tenant(settings)
    redis_client = app.extensions["genq_limiter"].shared.storage.storage
    sent = []
    original = redis_client.execute_command

    def counting(*args, **kwargs):
        sent.append(args[0])
        return original(*args, **kwargs)

    redis_client.execute_command = counting
    try:
        job_id = submit(client, headers)
        sent.clear()
        assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
    finally:
        del redis_client.execute_command
    assert len(sent) == 1, sent


def test_redis_down_counts_in_memory(settings):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = create_app(settings.replace(rate_limit="3/minute",
                                         ratelimit_storage_url=f"redis://127.0.0.1:{port}/0")).test_client()
    headers = tenant(settings)
    assert [client.get("/v1/jobs", headers=headers).status_code for _ in range(3)] == [200] * 3
    over = client.get("/v1/jobs", headers=headers)
    assert over.status_code == 429 and over.mimetype == PROBLEM and 1 <= int(over.headers["Retry-After"]) <= 60


def test_list_pages_by_cursor_with_filters(client, settings):
    headers = tenant(settings)
    ids = [submit(client, headers) for _ in range(5)]
    set_job(settings, ids[1], status="running", started_at=utcnow())
    page = client.get("/v1/jobs?limit=2", headers=headers).get_json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["next_cursor"] == ids[3]
    rest = client.get(f"/v1/jobs?limit=10&cursor={page['next_cursor']}", headers=headers).get_json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and rest["next_cursor"] is None
    queued = client.get("/v1/jobs?status=queued&model=demo-text&type=text-generation", headers=headers).get_json()
    assert [j["id"] for j in queued["data"]] == [i for i in ids[::-1] if i != ids[1]]
    bad = client.get("/v1/jobs?status=nope", headers=headers)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "status"


def test_a_poll_survives_a_connection_the_database_dropped(app, client, settings, pg_url):
    """Within the idle bound no ping runs: a connection Postgres dropped is
    met by the read itself, which is tried once more on a new connection."""
    from tests.genq.test_db import kill_backends

    headers = tenant(settings)
    job_id = submit(client, headers)
    set_job(settings, job_id, status="running")  # a queued job's place in line would add its own reads
    engine = app.extensions["genq"].sessions.kw["bind"]
    pooled = [record.dbapi_connection.info.backend_pid for record in list(engine.pool._pool.queue)]
    assert pooled
    kill_backends(pg_url, pooled)  # every connection the pool holds
    with statements(app) as sent:
        resp = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert resp.status_code == 200 and resp.get_json()["id"] == job_id
    assert len(sent) == 2, sent  # the read on the dropped connection, then again on a new one


def test_the_driver_read_gives_what_the_core_read_gives(app, client, settings):
    from api.jobs import etag
    from genq import jobs as joblib
    from genq.keys import verify

    headers = tenant(settings)
    job_id = submit(client, headers)
    set_job(settings, job_id, status="succeeded", attempts=1, progress={"step": 2, "total": 2},
            output={"text": "hi", "files": [{"key": f"jobs/{job_id}/0.txt"}]}, metrics={"tokens": 2},
            started_at=utcnow(), completed_at=utcnow())
    context = app.extensions["genq"]
    with context.read() as conn:
        tenant_id = verify(conn, headers["Authorization"].split()[1]).tenant_id
        core = joblib.read_own(conn, job_id, tenant_id)
    with context.driver() as conn:
        driver = joblib.read_own_driver(conn, job_id, tenant_id)
        assert joblib.read_own_driver(conn, job_id, "someone-else") is None
    assert driver._asdict() == core._asdict() and etag(driver) == etag(core)
    assert driver.output is not None and driver.completed_at.tzinfo is not None
