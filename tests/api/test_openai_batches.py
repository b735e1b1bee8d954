"""Batches (api/openai_batches.py, genq/batches.py) in process with no worker,
on SQLite and Postgres: bad files refused by line with nothing stored or
queued, cancel, expiry, tenant isolation, the quota, Idempotency-Key. A batch
run to its end by a worker, through the `openai` package: tests/test_openai.py."""
from __future__ import annotations

import io
import json
import secrets

import pytest
from sqlalchemy import update

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import Batch, utcnow
from tests.helpers import make_key


@pytest.fixture
def app(any_db):
    return create_app(any_db.replace(max_active_jobs=2))


@pytest.fixture
def alice(any_db):
    return make_key(any_db, f"alice-{secrets.token_hex(3)}")


def line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "demo-text", "prompt": "hi", "max_tokens": 2, **body}}


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def upload(client, headers, data: bytes):
    return client.post("/openai/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(data), "batch.jsonl")})


def jobs(client, headers) -> list[dict]:
    return client.get("/v1/jobs", headers=headers, query_string={"limit": 100}).get_json()["data"]


def batch_of(client, headers, n: int, body: dict | None = None, **extra) -> dict:
    f = upload(client, headers, jsonl(line(f"r{k}") for k in range(n))).get_json()
    resp = client.post("/openai/v1/batches", headers={**headers, **extra},
                       json={"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h",
                             **(body or {})})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


@pytest.mark.parametrize("rows, where", [
    ([line("a"), "{not json", line("c")], "line 2, line: is not valid JSON"),
    ([line("a"), line("b"), {**line("c"), "url": "/v1/embeddings"}], "line 3, url"),
    ([line("a"), line("b", temperature=5)], "line 2, body.temperature"),
    ([line("a"), line("b", max_tokens=100_000)], "line 2, body.max_tokens"),
    ([line("a"), line("b", model="no-such-model")], "line 2, body.model"),
    ([line("a"), line("a")], "line 2, custom_id"),
    ([line("a"), {**line("b"), "method": "GET"}], "line 2, method"),
    ([line("a"), {**line("b"), "extra": 1}], "line 2, extra"),
])
def test_a_bad_line_is_named_and_nothing_is_stored_or_queued(app, alice, rows, where):
    client = app.test_client()
    resp = upload(client, alice, jsonl(rows))
    assert resp.status_code == 422
    error = resp.get_json()["error"]
    assert error["message"].startswith(where), error
    assert (error["param"], error["code"]) == ("file", "invalid_batch_file")
    assert jobs(client, alice) == []
    assert client.get("/v1/files", headers=alice).get_json()["data"] == []


def test_more_than_50000_lines_are_refused(app, alice):
    client = app.test_client()
    resp = upload(client, alice, jsonl([json.dumps(line("x"))] * 50_001))
    assert resp.status_code == 422 and "50001 lines" in resp.get_json()["error"]["message"]
    assert jobs(client, alice) == []


def test_a_batch_is_jobs_at_the_lowest_priority_outside_the_quota(app, alice):
    client = app.test_client()
    batch = batch_of(client, alice, 5)
    assert batch["status"] == "in_progress" and batch["request_counts"] == {"total": 5, "completed": 0, "failed": 0}
    listed = jobs(client, alice)
    assert len(listed) == 5 and {j["priority"] for j in listed} == {-101}
    assert sorted(j["input"]["prompt"] for j in listed) == ["hi"] * 5
    # Five batch jobs queued, the quota is 2: interactive jobs still go in.
    for _ in range(2):
        resp = client.post("/v1/jobs", headers=alice, json={"model": "demo-text", "input": {"prompt": "x"}})
        assert resp.status_code == 202, resp.get_json()
    assert client.post("/v1/jobs", headers=alice, json={"model": "demo-text", "input": {"prompt": "x"}}).status_code == 429
    got = client.get(f"/openai/v1/batches/{batch['id']}", headers=alice).get_json()
    assert got["status"] == "in_progress" and got["request_counts"]["total"] == 5


def test_cancel_ends_queued_lines_in_the_error_file(app, alice):
    client = app.test_client()
    batch = batch_of(client, alice, 3)
    resp = client.post(f"/openai/v1/batches/{batch['id']}/cancel", headers=alice)
    got = resp.get_json()
    assert got["status"] == "cancelled" and got["output_file_id"] is None
    assert got["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert {j["status"] for j in jobs(client, alice)} == {"canceled"}
    errors = client.get(f"/openai/v1/files/{got['error_file_id']}/content", headers=alice).get_data(as_text=True)
    rows = [json.loads(r) for r in errors.splitlines()]
    assert [r["custom_id"] for r in rows] == ["r0", "r1", "r2"]
    assert {r["error"]["code"] for r in rows} == {"batch_cancelled"}
    # Cancelling again changes nothing.
    assert client.post(f"/openai/v1/batches/{batch['id']}/cancel", headers=alice).get_json()["status"] == "cancelled"


def test_past_its_window_a_batch_expires(app, any_db, alice):
    client = app.test_client()
    batch = batch_of(client, alice, 2)
    engine = make_engine(any_db.database_url)
    with make_sessionmaker(engine).begin() as session:
        session.execute(update(Batch).where(Batch.id == batch["id"]).values(expires_at=utcnow()))
    engine.dispose()
    got = client.get(f"/openai/v1/batches/{batch['id']}", headers=alice).get_json()
    assert got["status"] == "expired" and got["expired_at"]
    errors = client.get(f"/openai/v1/files/{got['error_file_id']}/content", headers=alice).get_data(as_text=True)
    assert {json.loads(r)["error"]["code"] for r in errors.splitlines()} == {"batch_expired"}


def test_another_tenants_batch_and_files_are_404(app, any_db, alice):
    client = app.test_client()
    batch = batch_of(client, alice, 1)
    bob = make_key(any_db, f"bob-{secrets.token_hex(3)}")
    for method, path in (("get", f"/openai/v1/batches/{batch['id']}"),
                         ("post", f"/openai/v1/batches/{batch['id']}/cancel"),
                         ("get", f"/openai/v1/files/{batch['input_file_id']}"),
                         ("get", f"/openai/v1/files/{batch['input_file_id']}/content")):
        resp = getattr(client, method)(path, headers=bob)
        assert resp.status_code == 404 and "error" in resp.get_json(), path
    resp = client.post("/openai/v1/batches", headers=bob, json={
        "input_file_id": batch["input_file_id"], "endpoint": "/v1/completions", "completion_window": "24h"})
    assert resp.status_code == 404
    assert client.get("/openai/v1/batches", headers=bob).get_json()["data"] == []
    assert [b["id"] for b in client.get("/openai/v1/batches", headers=alice).get_json()["data"]] == [batch["id"]]


def test_idempotency_key_makes_one_batch(app, alice):
    client = app.test_client()
    f = upload(client, alice, jsonl([line("a"), line("b")])).get_json()
    body = {"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    first = client.post("/openai/v1/batches", headers={**alice, "Idempotency-Key": "k1"}, json=body)
    again = client.post("/openai/v1/batches", headers={**alice, "Idempotency-Key": "k1"}, json=body)
    assert first.get_json()["id"] == again.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(jobs(client, alice)) == 2


def test_bad_batch_parameters_name_the_param(app, alice):
    client = app.test_client()
    f = upload(client, alice, jsonl([line("a")])).get_json()
    for body, param in (({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1h"}, "completion_window"),
                        ({"endpoint": "/v1/chat/completions"}, "file")):
        resp = client.post("/openai/v1/batches", headers=alice, json={
            "input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h", **body})
        assert resp.status_code in (400, 422) and resp.get_json()["error"]["param"] == param, resp.get_json()
    assert jobs(client, alice) == []


def test_the_reconciler_ends_a_batch_nobody_reads(app, any_db, alice):
    """A batch whose jobs have all ended gets its files from the workers'
    reconciler, whether or not anyone polls it."""
    from genq.queue import make_celery
    from worker.reconciler import Reconciler

    client = app.test_client()
    batch = batch_of(client, alice, 2)
    for job in jobs(client, alice):
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 200
    engine = make_engine(any_db.database_url)
    sessions = make_sessionmaker(engine)
    Reconciler(any_db, ["no-such-pool"]).round(sessions, make_celery(any_db))
    with sessions() as session:
        row = session.get(Batch, batch["id"])
        assert (row.status, row.output_file_id) == ("completed", None) and row.error_file_id
    engine.dispose()
    got = client.get(f"/openai/v1/batches/{batch['id']}", headers=alice).get_json()
    assert got["status"] == "completed" and got["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    errors = client.get(f"/openai/v1/files/{got['error_file_id']}/content", headers=alice).get_data(as_text=True)
    assert {json.loads(r)["error"]["code"] for r in errors.splitlines()} == {"cancelled"}


def test_interactive_jobs_go_before_a_queued_batch(app, any_db, alice):
    """The line (genq.line) with a 30-line batch queued: the batch tenant's own
    interactive job goes before its batch, and another tenant's takes its
    turn at once, not after the batch."""
    from genq import line

    client = app.test_client()
    batch_of(client, alice, 30)
    bob = make_key(any_db, f"bob-{secrets.token_hex(3)}")
    mine = client.post("/v1/jobs", headers=alice, json={"model": "demo-text", "input": {"prompt": "now"}}).get_json()
    theirs = client.post("/v1/jobs", headers=bob, json={"model": "demo-text", "input": {"prompt": "now"}}).get_json()
    engine = make_engine(any_db.database_url)
    with make_sessionmaker(engine)() as session:
        spec = app.extensions["genq"].registry.get("demo-text")
        key = spec.batch_key(spec.validate({"prompt": "now"}))
        # The run's Postgres database holds other tests' tenants too: only these two are looked at.
        ours = {j["id"] for j in jobs(client, alice)} | {theirs["id"]}
        order = [row.id for row in line.batch(session, model="demo-text", batch_key=key, limit=10_000, pool=spec.pool)
                 if row.id in ours]
    engine.dispose()
    assert len(order) == 32, order
    assert set(order[:2]) == {mine["id"], theirs["id"]}, order


def test_a_batch_whose_input_file_was_deleted_still_ends(app, alice):
    client = app.test_client()
    batch = batch_of(client, alice, 2)
    assert client.delete(f"/v1/files/{batch['input_file_id']}", headers=alice).status_code == 204
    got = client.post(f"/openai/v1/batches/{batch['id']}/cancel", headers=alice).get_json()
    assert got["status"] == "cancelled"
    errors = client.get(f"/openai/v1/files/{got['error_file_id']}/content", headers=alice).get_data(as_text=True)
    # Named by line number, the custom ids having gone with the file.
    assert [json.loads(r)["custom_id"] for r in errors.splitlines()] == ["0", "1"]


def test_a_batch_posts_its_end_to_its_webhook_signed(any_db, alice):
    """A batch made with a webhook (genq's own field; the `openai` package sends
    it in extra_body) gets one delivery when it ends: the batch object as GET
    shows it, signed with the tenant's secret like a job's events, through
    the same sender."""
    from sqlalchemy import select

    from genq.schema import WebhookDelivery
    from genq.storage import make_storage
    from tests.receiver import Receiver
    from worker.webhook_sender import Sender

    settings = any_db.replace(max_active_jobs=2, webhook_allow_http=True, webhook_allowed_hosts=("127.0.0.1",))
    client = create_app(settings).test_client()
    receiver = Receiver()
    engine = make_engine(settings.database_url)
    try:
        secret = client.get("/v1/webhooks/secret", headers=alice).get_json()["key"]
        receiver.script("/batch", 200, secret=secret)
        batch = batch_of(client, alice, 2, {"webhook": receiver.url("/batch")})
        quiet = batch_of(client, alice, 1)  # no webhook: no delivery
        for job in jobs(client, alice):
            assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 200
        got = client.get(f"/openai/v1/batches/{batch['id']}", headers=alice).get_json()
        assert client.get(f"/openai/v1/batches/{quiet['id']}", headers=alice).get_json()["status"] == "completed"
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            rows = list(session.scalars(select(WebhookDelivery).where(
                WebhookDelivery.batch_id.in_([batch["id"], quiet["id"]]))))
        assert [(d.batch_id, d.job_id, d.event) for d in rows] == [(batch["id"], None, "batch.completed")]
        assert Sender(settings, sessions, make_storage(settings)).deliver(rows[0].id) == "succeeded"
        [sent] = receiver.to("/batch")
        assert sent.verify_error is None and sent.headers["webhook-id"] == rows[0].webhook_id
        assert json.loads(sent.body) == got and got["status"] == "completed"
        assert got["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    finally:
        receiver.close()
        engine.dispose()


@pytest.mark.parametrize("webhook, says", [
    ("http://10.1.2.3/hook", "webhook"),
    ("ftp://example.com/hook", "webhook"),
])
def test_a_batch_webhook_is_checked_like_a_jobs(app, alice, webhook, says):
    f = upload(app.test_client(), alice, jsonl([line("a")])).get_json()
    resp = app.test_client().post("/openai/v1/batches", headers=alice, json={
        "input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h", "webhook": webhook})
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["param"] == says
    assert jobs(app.test_client(), alice) == []
