"""The /v1/jobs contract on the embedded stack (SQLite, local storage, filesystem
broker), with no worker running: validation, auth, isolation, listing, cancel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import Job
from tests.conftest import WEBHOOK_KEYS
from tests.helpers import make_key

PROBLEM = "application/problem+json"


@pytest.fixture
def alice(embedded_settings):
    return make_key(embedded_settings, "alice")


@pytest.fixture
def bob(embedded_settings):
    return make_key(embedded_settings, "bob")


def count_jobs(settings) -> int:
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        return session.scalar(select(func.count()).select_from(Job))


def queued_messages(settings) -> int:
    """Doorbells waiting in the filesystem broker's folder."""
    return len(list(Path(settings.home, "broker", "queue").glob("*.msg")))


def submit(client, headers, **body):
    body.setdefault("model", "demo-text")
    body.setdefault("input", {"prompt": "Once upon a time"})
    return client.post("/v1/jobs", json=body, headers=headers)


def test_submit_returns_202_with_location_and_a_recorded_seed(client, alice, embedded_settings):
    resp = submit(client, alice, input={"prompt": "hello", "max_new_tokens": 4})
    assert resp.status_code == 202
    job = resp.get_json()
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["type"] == "text-generation"
    # Defaults are filled in and a seed is chosen, so the job can be reproduced.
    assert job["input"]["max_new_tokens"] == 4
    assert isinstance(job["input"]["seed"], int)
    assert job["webhook_events_filter"] == ["completed"]
    # Its doorbell is sent after the answer, by the process's doorbell thread.
    assert client.application.extensions["genq"].doorbells.flush(10)
    assert queued_messages(embedded_settings) == 1
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).get_json()["id"] == job["id"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "demo-text", "input": {}}, "input.prompt"),
        ({"model": "demo-text", "input": {"prompt": "x", "max_new_tokens": "many"}}, "input.max_new_tokens"),
        ({"model": "demo-text", "input": {"prompt": "x", "max_new_tokens": 100000}}, "input.max_new_tokens"),
        ({"model": "demo-text", "input": {"prompt": "x", "colour": "red"}}, "input.colour"),
        ({"model": "demo-image", "input": {"prompt": "x", "width": 100}}, "input.width"),
        ({"model": "demo-image", "input": {"prompt": "x", "height": 4096}}, "input.height"),
        ({"model": "demo-image", "input": {"prompt": "x", "scheduler": "fastest"}}, "input.scheduler"),
        ({"model": "demo-image-xl", "input": {"prompt": "x", "scheduler": "pndm"}}, "input.scheduler"),
        ({"model": "demo-audio", "input": {"prompt": "x", "duration_s": 60}}, "input.duration_s"),
        ({"model": "demo-video", "input": {"prompt": "x", "num_frames": 17}}, "input.num_frames"),
        ({"model": "demo-vision-text", "input": {"prompt": "x", "image": "ftp://x/y.png"}}, "input.image"),
        ({"model": "demo-vision-text", "input": {"prompt": "x", "image": "0" * 32, "max_new_tokens": 257}},
         "input.max_new_tokens"),
        ({"model": "demo-video", "input": {"prompt": "x", "num_frames": 16, "fps": 1}}, "input.fps"),
        ({"model": "demo-digits", "input": {"label": 10}}, "input.label"),
        ({"model": "demo-image", "type": "fine-tune", "input": {"training_file": "0" * 32}}, "input.trigger_word"),
        ({"model": "no-such-model", "input": {"prompt": "x"}}, "model"),
        ({"model": "demo-text", "type": "image-generation", "input": {"prompt": "x"}}, "type"),
        ({"model": "demo-text", "input": {"prompt": "x"}, "priority": "high"}, "priority"),
        ({"model": "demo-text", "input": {"prompt": "x"}, "webhook_events_filter": ["sometimes"]}, "webhook_events_filter.0"),
        ({"model": "demo-text", "input": {"prompt": "x"}, "extra": 1}, "extra"),
        ({"input": {"prompt": "x"}}, "model"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_nothing_is_queued(client, alice, embedded_settings, body, field):
    resp = client.post("/v1/jobs", json=body, headers=alice)
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    problem = resp.get_json()
    assert problem["status"] == 422
    assert field in [e["field"] for e in problem["errors"]], problem
    assert count_jobs(embedded_settings) == 0
    assert queued_messages(embedded_settings) == 0


def test_malformed_json_is_400(client, alice):
    resp = client.post("/v1/jobs", data=b'{"model": "demo-text", "input": ', headers={**alice, "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.mimetype == PROBLEM
    assert "not valid JSON" in resp.get_json()["detail"]


def test_too_large_body_is_413(client, alice, embedded_settings):
    prompt = "x" * (embedded_settings.max_body_bytes + 10)
    resp = client.post("/v1/jobs", data=json.dumps({"model": "demo-text", "input": {"prompt": prompt}}),
                       headers={**alice, "Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.mimetype == PROBLEM
    assert count_jobs(embedded_settings) == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer gq_nope"}, {"Authorization": "Basic abc"}])
def test_missing_or_bad_key_is_401(client, headers):
    resp = client.get("/v1/jobs", headers=headers)
    assert resp.status_code == 401
    assert resp.mimetype == PROBLEM
    assert "Bearer" in resp.headers["WWW-Authenticate"]


def test_another_tenants_job_is_404_everywhere(client, alice, bob):
    job = submit(client, alice).get_json()
    for method, path in [("get", ""), ("get", "/events"), ("post", "/cancel"), ("get", "/outputs/0.png")]:
        resp = getattr(client, method)(f"/v1/jobs/{job['id']}{path}", headers=bob)
        assert resp.status_code == 404, (method, path)
        assert resp.mimetype == PROBLEM
    assert client.get("/v1/jobs", headers=bob).get_json()["data"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=alice).get_json()["data"]] == [job["id"]]


def test_list_is_newest_first_with_cursor_and_filters(client, alice):
    ids = [submit(client, alice, model="demo-text" if i % 2 else "demo-image").get_json()["id"] for i in range(5)]
    page1 = client.get("/v1/jobs?limit=2", headers=alice).get_json()
    page2 = client.get(f"/v1/jobs?limit=2&cursor={page1['next_cursor']}", headers=alice).get_json()
    page3 = client.get(f"/v1/jobs?limit=2&cursor={page2['next_cursor']}", headers=alice).get_json()
    seen = [j["id"] for p in (page1, page2, page3) for j in p["data"]]
    assert seen == list(reversed(ids))
    assert page3["next_cursor"] is None
    texts = client.get("/v1/jobs?model=demo-text", headers=alice).get_json()["data"]
    assert {j["model"] for j in texts} == {"demo-text"} and len(texts) == 2
    images = client.get("/v1/jobs?type=image-generation&status=queued", headers=alice).get_json()["data"]
    assert len(images) == 3
    bad = client.get("/v1/jobs?status=done", headers=alice)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "status"
    assert client.get("/v1/jobs?limit=1000", headers=alice).get_json()["errors"][0]["field"] == "limit"


def test_cancel_queued_is_immediate_and_cancel_again_is_409(client, alice):
    job = submit(client, alice).get_json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "canceled"
    assert resp.get_json()["completed_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert again.status_code == 409 and again.mimetype == PROBLEM
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).get_json()["data"]
    assert [e["type"] for e in events] == ["queued", "completed"]
    assert events[-1]["data"] == {"status": "canceled"}


def test_models_list_and_detail_carry_input_schemas(client, alice):
    models = {m["name"]: m for m in client.get("/v1/models", headers=alice).get_json()["data"]}
    assert models["demo-text"]["type"] == "text-generation"
    assert "prompt" in models["demo-text"]["input_schema"]["properties"]
    assert models["demo-image"]["input_schema"]["properties"]["width"]["type"] == "integer"
    assert client.get("/v1/models/demo-image", headers=alice).get_json()["name"] == "demo-image"
    assert client.get("/v1/models/nope", headers=alice).status_code == 404


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_what_is_down(embedded_settings):
    app = create_app(embedded_settings.replace(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
                                                 webhook_secret_keys=WEBHOOK_KEYS))
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.mimetype == PROBLEM
    assert resp.headers["Retry-After"]
    body = resp.get_json()
    assert "database" in body["detail"] and body["checks"]["storage"] == "ok"


def test_unknown_route_and_method_are_problems(client, alice):
    assert client.get("/v1/nothing", headers=alice).mimetype == PROBLEM
    resp = client.delete("/v1/jobs", headers=alice)
    assert resp.status_code == 405 and resp.mimetype == PROBLEM
