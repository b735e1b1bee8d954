"""Trust at the door: roles, revocation, rate limits shared through Redis,
the active-jobs quota, input bounds, bad bodies, secrets kept out of logs,
and the docs page that needs no internet."""
from __future__ import annotations

import io
import json
import logging
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.app import create_app
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import make_key

PROBLEM = "application/problem+json"


def submit(client, headers, **inp):
    return client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi", **inp}}, headers=headers)


def test_user_keys_are_refused_on_admin_routes(client, embedded_settings):
    user, admin = make_key(embedded_settings, "acme"), make_key(embedded_settings, "ops", "admin")
    for method, path, body in [("get", "/v1/admin/tenants", None), ("post", "/v1/admin/keys", {"tenant": "x"}),
                               ("post", "/v1/admin/keys/gq_abcdefg/revoke", None)]:
        resp = getattr(client, method)(path, json=body, headers=user)
        assert resp.status_code == 403 and resp.mimetype == PROBLEM, path
        assert getattr(client, method)(path, json=body).status_code == 401
    made = client.post("/v1/admin/keys", json={"tenant": "newco"}, headers=admin)
    assert made.status_code == 201
    key = made.get_json()
    assert key["key"].startswith("gq_") and key["role"] == "user"
    tenants = {t["name"]: t for t in client.get("/v1/admin/tenants", headers=admin).get_json()["data"]}
    assert tenants["newco"]["active_keys"] == 1


def test_a_revoked_key_is_401(client, embedded_settings):
    admin = make_key(embedded_settings, "ops", "admin")
    made = client.post("/v1/admin/keys", json={"tenant": "leaky"}, headers=admin).get_json()
    headers = {"Authorization": f"Bearer {made['key']}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert client.post(f"/v1/admin/keys/{made['prefix']}/revoke", headers=admin).get_json() == {"revoked": 1}
    resp = client.get("/v1/jobs", headers=headers)
    assert resp.status_code == 401 and "revoked" in resp.get_json()["detail"]


def test_genq_keys_revoke_on_the_command_line(embedded_settings):
    # Another process revokes: this API stops honouring the key within GENQ_KEY_CACHE_SECONDS.
    client = create_app(embedded_settings.replace(key_cache_seconds=0.5)).test_client()
    env = {**embedded_settings.as_env(), "PATH": "/usr/bin:/bin"}
    made = subprocess.run([sys.executable, "-m", "genq.cli", "keys", "create", "--tenant", "cli"], env=env,
                          capture_output=True, text=True, check=True)
    raw = made.stdout.strip()
    headers = {"Authorization": f"Bearer {raw}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    out = subprocess.run([sys.executable, "-m", "genq.cli", "keys", "revoke", raw[:10]], env=env,
                         capture_output=True, text=True, check=True)
    assert "revoked 1" in out.stdout
    time.sleep(0.6)  # past the bound: an invariant, not a measurement
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_request_rate_limit_is_shared_by_api_processes_through_redis(embedded_settings):
    limited = embedded_settings.replace(rate_limit="5/minute", ratelimit_storage_url=REDIS_URL)
    first, second = create_app(limited).test_client(), create_app(limited).test_client()
    headers = make_key(embedded_settings, f"busy-{secrets.token_hex(3)}")
    codes = [c.get("/v1/jobs", headers=headers).status_code for c in (first, second, first, second, first)]
    assert codes == [200] * 5
    over = second.get("/v1/jobs", headers=headers)
    assert over.status_code == 429 and over.mimetype == PROBLEM
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    # Another tenant has a budget of its own; probes are never limited.
    assert first.get("/v1/jobs", headers=make_key(embedded_settings, f"calm-{secrets.token_hex(3)}")).status_code == 200
    assert all(first.get("/healthz").status_code == 200 for _ in range(10))


def test_a_tenant_has_one_request_budget_across_routes(embedded_settings):
    client = create_app(embedded_settings.replace(rate_limit="5/minute")).test_client()
    headers = make_key(embedded_settings, f"roamer-{secrets.token_hex(3)}")
    codes = [client.get(path, headers=headers).status_code
             for path in ("/v1/jobs", "/v1/models", "/v1/files", "/v1/jobs", "/v1/models")]
    assert codes == [200] * 5
    for path in ("/v1/files", "/v1/jobs", "/v1/models", "/v1/models/demo-text"):
        over = client.get(path, headers=headers)
        assert over.status_code == 429 and over.mimetype == PROBLEM, path
        assert "5 per 1 minute" in over.get_json()["detail"]
    # Probes, documents and metrics stay outside every budget.
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert client.get(path, headers=headers).status_code == 200, path
    assert client.get("/v1/jobs", headers=make_key(embedded_settings, f"other-{secrets.token_hex(3)}")).status_code == 200


def test_jobs_queued_or_running_at_once_are_capped(embedded_settings):
    client = create_app(embedded_settings.replace(max_active_jobs=3)).test_client()
    headers = make_key(embedded_settings, "greedy")
    ids = [submit(client, headers).get_json()["id"] for _ in range(3)]
    over = submit(client, headers)
    assert over.status_code == 429 and over.headers["Retry-After"] == "5"
    assert "3 jobs queued or running" in over.get_json()["detail"]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    assert submit(client, headers).status_code == 202


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_submits_never_pass_the_active_jobs_quota(embedded_settings, request, backend):
    settings = embedded_settings.replace(max_active_jobs=5)
    if backend == "postgres":
        settings = settings.replace(database_url=request.getfixturevalue("pg_url"), webhook_secret_keys=WEBHOOK_KEYS)
    app = create_app(settings)
    headers = make_key(settings, f"rush-{secrets.token_hex(3)}")
    submitters = 24
    start = threading.Barrier(submitters)

    def one(_) -> int:
        client = app.test_client()
        start.wait(timeout=60)  # all at once: each check runs beside the others' inserts
        return submit(client, headers).status_code

    with ThreadPoolExecutor(submitters) as pool:
        codes = list(pool.map(one, range(submitters)))
    # No worker runs here, so none of the accepted jobs finishes: exactly the quota gets in.
    assert sorted(codes) == [202] * 5 + [429] * (submitters - 5)
    assert len(app.test_client().get("/v1/jobs?limit=100", headers=headers).get_json()["data"]) == 5


@pytest.mark.parametrize("model, inp, field", [
    ("demo-text", {"prompt": "x", "max_new_tokens": 257}, "input.max_new_tokens"),
    ("demo-text", {"prompt": "x" * 2001}, "input.prompt"),
    ("demo-text", {"prompt": "x", "stop": ["a"] * 5}, "input.stop"),
    ("demo-text", {"prompt": "x", "temperature": 1000}, "input.temperature"),
    ("demo-image", {"prompt": "x", "width": 264}, "input.width"),
    ("demo-image", {"prompt": "x", "height": 100000}, "input.height"),
    ("demo-image", {"prompt": "x", "num_inference_steps": 51}, "input.num_inference_steps"),
    ("demo-image", {"prompt": "x", "num_images": 5}, "input.num_images"),
    ("demo-image", {"prompt": "x", "guidance_scale": 1e9}, "input.guidance_scale"),
])
def test_every_costly_input_is_bounded(client, embedded_settings, model, inp, field):
    resp = client.post("/v1/jobs", json={"model": model, "input": inp}, headers=make_key(embedded_settings, "b"))
    assert resp.status_code == 422, resp.get_json()
    assert field in [e["field"] for e in resp.get_json()["errors"]]


def test_dataset_size_and_rows_are_bounded(embedded_settings):
    client = create_app(embedded_settings.replace(max_file_bytes=600, max_dataset_rows=2)).test_client()
    headers = make_key(embedded_settings, "data")

    def up(data: bytes):
        return client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(data), "d.jsonl")},
                           headers=headers, content_type="multipart/form-data")

    assert up(b'{"text": "' + b"x" * 800 + b'"}').status_code == 413
    rows = up(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    assert rows.status_code == 422 and "at most 2" in rows.get_json()["detail"]


@pytest.mark.parametrize("body, status, field", [
    ('{"model": "demo-text", "input": {"prompt": "a\\u0000b"}}', 422, "input.prompt"),
    ('{"model": "demo-text", "input": {"prompt": "x", "stop": ["ok", "\\u0000"]}}', 422, "input.stop.1"),
    ('{"model": "demo-text", "input": {"prompt": "x"}, "extra": ' + "[" * 40 + "]" * 40 + "}", 400, None),
    ('{"model": "demo-text", "input": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}", 400, None),
    ('{"model": "demo-text", "input": {"prompt": 5}}', 422, "input.prompt"),
    ('{"model": "demo-text", "input": {"prompt": "x", "seed": "7"}}', 422, "input.seed"),
    ('{"model": "demo-text", "input": {"prompt": "x", "max_new_tokens": 8.5}}', 422, "input.max_new_tokens"),
    ('[1, 2]', 400, None),
    ('"just a string"', 400, None),
])
def test_bad_bodies_are_400_or_422_never_500(client, embedded_settings, body, status, field):
    resp = client.post("/v1/jobs", data=body, headers={**make_key(embedded_settings, "fz"), "Content-Type": "application/json"})
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    assert resp.mimetype == PROBLEM
    if field:
        assert field in [e["field"] for e in resp.get_json()["errors"]]


def test_integral_floats_count_as_integers(client, embedded_settings):
    resp = submit(client, make_key(embedded_settings, "f"), max_new_tokens=8.0)
    assert resp.status_code == 202 and resp.get_json()["input"]["max_new_tokens"] == 8


def test_unknown_query_parameters_are_named(client, embedded_settings):
    resp = client.get("/v1/jobs?limit=5&colour=red", headers=make_key(embedded_settings, "q"))
    assert resp.status_code == 422 and resp.get_json()["errors"] == [{"field": "colour", "message": "is not a known query parameter"}]


def test_no_key_or_secret_reaches_logs_or_error_bodies(client, embedded_settings, caplog):
    headers = make_key(embedded_settings, "quiet")
    raw = headers["Authorization"].split(" ", 1)[1]
    bad = "gq_" + "A" * 43
    caplog.set_level(logging.DEBUG)
    bodies = [client.get("/v1/jobs", headers=headers).get_data(as_text=True),
              client.get("/v1/jobs", headers={"Authorization": f"Bearer {bad}"}).get_data(as_text=True),
              client.post("/v1/jobs", json={"model": "nope", "input": {}}, headers=headers).get_data(as_text=True),
              client.get("/v1/webhooks/secret", headers=headers).get_data(as_text=True)]
    secret = json.loads(bodies[3])["key"]
    text = caplog.text + "".join(bodies[:3])
    assert raw not in text and bad not in text and secret not in caplog.text


def test_openapi_and_docs_need_no_internet(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/files", "/v1/models", "/v1/admin/keys",
                                 "/v1/webhooks/secret", "/v1/jobs/{job_id}/webhook-deliveries"}
    text_input = doc["components"]["schemas"]["Input_demo_text"]["properties"]
    assert text_input["max_new_tokens"]["maximum"] == 256
    page = client.get("/docs").get_data(as_text=True)
    assert "http://" not in page and "https://" not in page
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        resp = client.get(asset)
        assert resp.status_code == 200 and len(resp.data) > 10_000
        resp.close()


def test_every_flask_route_is_in_the_openapi_document(app, client):
    doc = client.get("/openapi.json").get_json()
    import re

    undocumented = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/docs", "/console")):
            # Pages for browsers, not API operations (the console uses only documented routes).
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if method.lower() not in doc["paths"].get(path, {}):
                undocumented.append(f"{method} {path}")
    assert undocumented == []
