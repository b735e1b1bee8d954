"""The poll's fast lane (api/fastpoll.py) on real Postgres and Redis: it
answers a plain poll exactly as the Flask view does, counts it in the metrics,
and leaves everything else (another tenant's job, a cold key, Prefer, a
query string) to Flask."""
from __future__ import annotations

import secrets

import pytest

from api.app import create_app
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import make_key

TEXT_JOB = {"model": "demo-text", "input": {"prompt": "hi", "max_new_tokens": 4}}
SAME = ("ETag", "Cache-Control", "Retry-After", "Content-Type")


@pytest.fixture
def settings(embedded_settings, pg_url):
    return embedded_settings.replace(database_url=pg_url, webhook_secret_keys=WEBHOOK_KEYS,
                                     ratelimit_storage_url=REDIS_URL, rate_limit="100000/minute")


@pytest.fixture
def app(settings):
    return create_app(settings)


def lane(app):
    return app.wsgi_app


def warm(client, path, headers):
    """Poll until the process holds a leased token (the first polls lease them through Flask)."""
    for _ in range(5):
        assert client.get(path, headers=headers).status_code == 200


def test_the_lane_answers_a_poll_as_the_view_does(app, settings):
    client = app.test_client()
    headers = make_key(settings, f"fast-{secrets.token_hex(4)}")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=headers).get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    warm(client, path, headers)
    before = lane(app).served
    fast = client.get(path, headers={**headers, "X-Request-Id": "req-1"})
    assert lane(app).served == before + 1
    # Prefer sends the same poll through Flask's view.
    slow = client.get(path, headers={**headers, "Prefer": "wait=0"})
    assert lane(app).served == before + 1
    assert fast.status_code == slow.status_code == 200
    assert fast.get_json() == slow.get_json() and fast.get_json()["id"] == job_id
    assert {h: fast.headers.get(h) for h in SAME} == {h: slow.headers.get(h) for h in SAME}
    assert fast.headers["Retry-After"] == "2" and fast.headers["X-Request-Id"] == "req-1"
    assert fast.headers["Content-Length"] == str(len(fast.data))
    # A conditional poll: 304 with no body, from the lane as from the view.
    tag = fast.headers["ETag"]
    fast = client.get(path, headers={**headers, "If-None-Match": tag})
    slow = client.get(path, headers={**headers, "If-None-Match": tag, "Prefer": "wait=0"})
    assert lane(app).served == before + 2
    assert fast.status_code == slow.status_code == 304 and fast.data == slow.data == b""
    assert fast.headers["ETag"] == slow.headers["ETag"] == tag and fast.headers["Retry-After"] == "2"
    assert len(fast.headers["X-Request-Id"]) == 32
    # Counted in the metrics under the view's route, as Flask counts it.
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'genq_http_requests_total{method="GET",route="/v1/jobs/<job_id>",status="304"} 2.0' in metrics


def test_what_the_lane_leaves_to_flask(app, settings):
    client = app.test_client()
    owner = make_key(settings, f"own-{secrets.token_hex(4)}")
    other = make_key(settings, f"oth-{secrets.token_hex(4)}")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=owner).get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    warm(client, path, owner)
    tag = client.get(path, headers=owner).headers["ETag"]
    warm(client, "/v1/jobs", other)  # the other tenant's key is verified and it holds tokens
    before = lane(app).served
    # Another tenant's job is no job at all, whatever tag it sends: Flask's 404.
    for extra in ({}, {"If-None-Match": tag}, {"If-None-Match": "*"}):
        resp = client.get(path, headers={**other, **extra})
        assert resp.status_code == 404 and resp.mimetype == "application/problem+json"
        assert "ETag" not in resp.headers
    # A key this process has not verified, a malformed id, a query string: Flask.
    assert client.get(path, headers={"Authorization": "Bearer gq_nope"}).status_code == 401
    assert client.get(f"/v1/jobs/{job_id[:-1]}X", headers=owner).status_code == 404
    assert client.get(f"{path}?colour=red", headers=owner).status_code == 422
    assert lane(app).served == before
