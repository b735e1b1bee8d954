"""Idempotency-Key on POST /v1/jobs and POST /v1/files, on SQLite and Postgres:
a replay returns the original, a different body is 422, concurrent duplicates
make one job, keys are per tenant and purged after their TTL."""
from __future__ import annotations

import datetime as dt
import io
import threading

import pytest
from sqlalchemy import func, select, update

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.queue import make_celery
from genq.schema import File, IdempotencyKey, Job, utcnow
from tests.conftest import WEBHOOK_KEYS
from tests.helpers import make_key
from worker.reconciler import Reconciler

BODY = {"model": "demo-text", "input": {"prompt": "Once upon a time", "max_new_tokens": 4}}


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, embedded_settings):
    if request.param == "postgres":
        return embedded_settings.replace(database_url=request.getfixturevalue("pg_url"), webhook_secret_keys=WEBHOOK_KEYS)
    return embedded_settings


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()


@pytest.fixture
def alice(settings):
    import secrets

    return make_key(settings, f"alice-{secrets.token_hex(3)}")


def count(settings, model, **where) -> int:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        n = session.scalar(query)
    engine.dispose()
    return n


def post(client, headers, key, body=BODY):
    return client.post("/v1/jobs", json=body, headers={**headers, "Idempotency-Key": key})


def test_a_replay_returns_the_original_job(client, alice, settings):
    first = post(client, alice, "k-1")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    job = first.get_json()
    # The same request again, its keys in another order: the same job, not a second one.
    reordered = {"input": {"max_new_tokens": 4, "prompt": "Once upon a time"}, "model": "demo-text"}
    again = post(client, alice, "k-1", reordered)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert again.get_json()["id"] == job["id"]
    # The seed chosen the first time stands: a replay is the same job, not a re-roll.
    assert again.get_json()["input"]["seed"] == job["input"]["seed"]
    assert count(settings, Job, tenant_id=_tenant(settings, job["id"])) == 1


def _tenant(settings, job_id) -> str:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        tenant = session.get(Job, job_id).tenant_id
    engine.dispose()
    return tenant


def test_the_same_key_with_another_body_is_422_and_makes_nothing(client, alice, settings):
    job = post(client, alice, "k-2").get_json()
    other = post(client, alice, "k-2", {**BODY, "input": {"prompt": "something else"}})
    assert other.status_code == 422 and other.mimetype == "application/problem+json"
    problem = other.get_json()
    assert problem["errors"][0]["field"] == "Idempotency-Key"
    assert "'k-2' was already used with a different request" in problem["detail"] and job["id"] in problem["detail"]
    assert count(settings, Job, tenant_id=_tenant(settings, job["id"])) == 1


def test_keys_are_per_tenant(client, alice, settings):
    import secrets

    bob = make_key(settings, f"bob-{secrets.token_hex(3)}")
    mine = post(client, alice, "shared").get_json()["id"]
    theirs = post(client, bob, "shared").get_json()["id"]
    assert mine != theirs


def test_a_failed_request_does_not_use_up_its_key(client, alice):
    bad = post(client, alice, "k-3", {"model": "demo-text", "input": {}})
    assert bad.status_code == 422
    assert post(client, alice, "k-3").status_code == 202


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "naïve"])
def test_a_malformed_key_is_400(client, alice, key):
    resp = client.post("/v1/jobs", json=BODY, headers={**alice, "Idempotency-Key": key})
    assert resp.status_code == 400 and "Idempotency-Key" in resp.get_json()["detail"]


def test_the_structured_field_form_is_the_same_key(client, alice):
    first = post(client, alice, "k-4").get_json()["id"]
    assert post(client, alice, '"k-4"').get_json()["id"] == first


def test_concurrent_duplicates_create_one_job(settings, alice):
    app = create_app(settings)
    n = 8
    barrier = threading.Barrier(n)
    answers: list = [None] * n

    def submit(i):
        client = app.test_client()
        barrier.wait()
        resp = post(client, alice, "race")
        answers[i] = (resp.status_code, resp.get_json()["id"], resp.headers.get("Idempotent-Replayed"))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {status for status, _, _ in answers} == {202}
    assert len({job_id for _, job_id, _ in answers}) == 1
    assert sum(replayed is None for _, _, replayed in answers) == 1  # one made it, the rest got it back
    assert count(settings, Job, tenant_id=_tenant(settings, answers[0][1])) == 1


def upload(client, headers, key, data=b'{"prompt": "a", "completion": "b"}\n'):
    return client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(data), "d.jsonl")},
                       headers={**headers, "Idempotency-Key": key}, content_type="multipart/form-data")


def test_file_upload_replays_and_refuses_other_content(client, alice, settings):
    first = upload(client, alice, "f-1")
    assert first.status_code == 201
    again = upload(client, alice, "f-1")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    other = upload(client, alice, "f-1", b'{"prompt": "c", "completion": "d"}\n')
    assert other.status_code == 422
    # A key used for a file is not a key for a job.
    assert post(client, alice, "f-1").status_code == 422
    assert count(settings, File, id=first.get_json()["id"]) == 1


def test_keys_past_their_ttl_are_purged_by_the_reconciler(client, alice, settings):
    old = post(client, alice, "old").get_json()["id"]
    recent = post(client, alice, "recent").get_json()["id"]
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    long_ago = utcnow() - dt.timedelta(seconds=settings.idempotency_ttl + 1)
    with sessions.begin() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.resource_id == old).values(created_at=long_ago))
    Reconciler(settings, ["no-such-pool"]).round(sessions, make_celery(settings))
    engine.dispose()
    # The old key is forgotten: the same key now makes a new job. The recent one still replays.
    assert post(client, alice, "old").get_json()["id"] != old
    assert post(client, alice, "recent").get_json()["id"] == recent
