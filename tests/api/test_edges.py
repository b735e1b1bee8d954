"""What the API accepts at its edges: API keys refused in URLs, NUL refused
in path and query parameters (on Postgres too), unknown job types named."""
from __future__ import annotations

import logging
import secrets

import pytest
from api.app import create_app
from tests.helpers import make_key

PROBLEM = "application/problem+json"


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


# --- job types ------------------------------------------------------------------


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
    assert type_param["schema"]["enum"] == ["fine-tune", "image-generation", "text-generation"]
