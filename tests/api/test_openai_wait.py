"""How the OpenAI-compatible routes wait (api/openai_compat.py), in process with
no worker: the wait's bound, the tenant's held-request cap, and a streaming
client that goes away. The routes' answers with a worker are in tests/test_openai.py."""
from __future__ import annotations

import json
import secrets

import pytest

from api.app import create_app
from tests.api.test_held import held_by, tenant_id
from tests.helpers import make_key


@pytest.fixture
def app(embedded_settings):
    return create_app(embedded_settings.replace(max_held_requests=2, openai_wait_seconds=0.2))


@pytest.fixture
def alice(embedded_settings):
    return make_key(embedded_settings, f"alice-{secrets.token_hex(3)}")


def jobs(client, headers) -> list[dict]:
    return client.get("/v1/jobs", headers=headers).get_json()["data"]


def test_past_the_wait_504_in_openais_shape_and_the_job_is_canceled(app, embedded_settings, alice):
    client = app.test_client()
    resp = client.post("/v1/completions", json={"model": "demo-text", "prompt": "hi", "max_tokens": 2}, headers=alice)
    assert resp.status_code == 504
    error = resp.get_json()["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout"
    [job] = jobs(client, alice)
    assert job["status"] == "canceled" and job["id"] in error["message"]
    assert held_by(app, tenant_id(embedded_settings, alice)) == 0


def test_past_the_tenants_held_requests_429_and_nothing_queued(app, embedded_settings, alice):
    client, tid = app.test_client(), tenant_id(embedded_settings, alice)
    slots = app.extensions["genq_held"]
    taken = [slots.take(tid, "stream"), slots.take(tid, "stream")]
    resp = client.post("/openai/v1/chat/completions", headers=alice,
                       json={"model": "demo-text", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 429 and resp.headers["Retry-After"]
    assert resp.get_json()["error"]["code"] == "too_many_held_requests"
    assert jobs(client, alice) == []
    for hold in taken:
        hold.release()


def sse_data(chunks) -> list:
    out = []
    for chunk in chunks:
        for line in chunk.decode().splitlines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_a_stream_past_the_wait_ends_with_an_error_chunk(app, alice):
    client = app.test_client()
    resp = client.post("/v1/chat/completions", headers=alice,
                       json={"model": "demo-text", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    data = sse_data([resp.get_data()])
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[-1]["error"]["code"] == "timeout"
    assert [j["status"] for j in jobs(client, alice)] == ["canceled"]


def test_a_streaming_client_that_goes_away_cancels_its_jobs(embedded_settings, alice):
    app = create_app(embedded_settings.replace(openai_wait_seconds=60))
    client, tid = app.test_client(), tenant_id(embedded_settings, alice)
    resp = client.post("/v1/completions", headers=alice, buffered=False,
                       json={"model": "demo-text", "prompt": "hi", "n": 2, "stream": True})
    chunks = iter(resp.response)
    next(chunks)  # the stream has started; no worker runs, so nothing more comes
    assert held_by(app, tid) == 1
    resp.close()
    assert sorted(j["status"] for j in jobs(client, alice)) == ["canceled", "canceled"]
    assert held_by(app, tid) == 0
