"""The API's HTTP servers as genq runs them, over real connections: gunicorn
(`genq api`, its own process) and werkzeug's (`genq up`'s server, in a
thread). Both say `Server: genq` and keep API keys out of their access logs."""
from __future__ import annotations

import http.client
import json
import logging
import re
import secrets
import threading
import time

import pytest

from api.app import create_app
from api.serve import bind_dev_server
from tests.helpers import finish_with_outputs, genq_api, make_key

SAFETY = 60  # seconds; a net for a loaded machine, not a measurement


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def leaky_requests(key: str, marker: str) -> list[str]:
    """Paths a careless client sends a key in; the last one carries `marker`."""
    return [f"/v1/jobs?api_key={key}", f"/v1/jobs?token={key}", f"/v1/models/{key}", f"/v1/jobs?x={key}&m={marker}"]


def test_werkzeug_says_genq_and_logs_no_key(embedded_settings, caplog):
    caplog.set_level(logging.INFO)
    server = bind_dev_server("127.0.0.1", 0)
    server.app = create_app(embedded_settings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        key = make_key(embedded_settings, "w")["Authorization"].split(" ", 1)[1]
        marker = secrets.token_hex(6)
        statuses = [get(server.server_port, path)[0] for path in leaky_requests(key, marker)]
        status, headers, _ = get(server.server_port, "/healthz")
    finally:
        server.shutdown()
        server.server_close()
    assert statuses == [400, 400, 401, 400]
    assert (status, headers["server"]) == (200, "genq")
    assert marker in caplog.text and "api_key=[redacted]" in caplog.text
    assert key not in caplog.text


def serve_gunicorn(settings):
    """`genq api --workers 1` on a free port, its output collected line by line."""
    return genq_api(settings, timeout=SAFETY)


@pytest.fixture
def gunicorn(embedded_settings):
    with serve_gunicorn(embedded_settings.replace(api_access_log=True)) as server:
        yield server


@pytest.fixture
def gunicorn_json(embedded_settings):
    with serve_gunicorn(embedded_settings.replace(log_format="json", api_access_log=True)) as server:
        yield server


def test_gunicorn_says_genq_and_logs_no_key(gunicorn, embedded_settings):
    key = make_key(embedded_settings, "g")["Authorization"].split(" ", 1)[1]
    marker = secrets.token_hex(6)
    answers = [get(gunicorn["port"], path) for path in leaky_requests(key, marker)]
    assert [status for status, _, _ in answers] == [400, 400, 401, 400]
    assert all(headers["server"] == "genq" for _, headers, _ in answers)
    assert all(key not in body.decode() for _, _, body in answers)
    # Every request's access line: gunicorn's workers each write their own,
    # so the last request's line can come before an earlier one's.
    expected = (marker, "api_key=[redacted]", "/v1/models/gq_[redacted]")
    deadline = time.monotonic() + SAFETY
    while not all(part in "\n".join(gunicorn["lines"]) for part in expected):
        assert time.monotonic() < deadline, "\n".join(gunicorn["lines"])
        time.sleep(0.1)
    assert key not in "\n".join(gunicorn["lines"])


def test_gunicorn_output_urls_name_the_bound_port(gunicorn, embedded_settings):
    headers = make_key(embedded_settings, "u")
    conn = http.client.HTTPConnection("127.0.0.1", gunicorn["port"], timeout=30)
    conn.request("POST", "/v1/jobs", body=b'{"model": "demo-image", "input": {"prompt": "x"}}',
                 headers={**headers, "Content-Type": "application/json"})
    job_id = json.loads(conn.getresponse().read())["id"]
    conn.close()
    finish_with_outputs(embedded_settings, job_id, "w")
    status, _, body = get(gunicorn["port"], f"/v1/jobs/{job_id}", {**headers, "Host": "elsewhere.example"})
    url = json.loads(body)["output"]["images"][0]["url"]
    assert url == f"http://127.0.0.1:{gunicorn['port']}/v1/jobs/{job_id}/outputs/0.png"


def test_gunicorn_access_log_is_off_by_default(embedded_settings):
    with serve_gunicorn(embedded_settings) as server:
        assert get(server["port"], "/healthz")[0] == 200
        assert get(server["port"], "/v1/jobs")[0] == 401
        time.sleep(0.5)  # a line would be written as the answer goes out; none is
        lines = list(server["lines"])
        assert not any("GET /healthz" in line or "GET /v1/jobs" in line for line in lines), "\n".join(lines)


def test_gunicorn_json_logs_every_line_with_request_ids(gunicorn_json, embedded_settings):
    """GENQ_LOG_FORMAT=json: gunicorn's own lines (start, workers, stop) and
    its access lines are JSON; each access line carries the request's id, the
    caller's when sane, the one the API made otherwise, as the answer says."""
    server = gunicorn_json
    key = make_key(embedded_settings, "j")["Authorization"].split(" ", 1)[1]
    sent = f"req-{secrets.token_hex(4)}"
    _, given, _ = get(server["port"], "/healthz", {"X-Request-Id": sent})
    _, replaced, _ = get(server["port"], "/healthz", {"X-Request-Id": "x" * 129})
    status, refused, _ = get(server["port"], f"/v1/jobs?api_key={key}")
    assert (given["x-request-id"], status) == (sent, 400)
    ids = [sent, replaced["x-request-id"], refused["x-request-id"]]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[1:])
    deadline = time.monotonic() + SAFETY
    while not all(any(i in line for line in list(server["lines"])) for i in ids):
        assert time.monotonic() < deadline, "\n".join(server["lines"])
        time.sleep(0.1)
    server["proc"].terminate()
    server["proc"].wait(SAFETY)
    records = [json.loads(line) for line in server["lines"]]
    assert any(r["logger"] == "gunicorn.error" and r["message"].startswith("Listening at") for r in records)
    assert any(r["logger"] == "gunicorn.error" and r["message"] == "Shutting down: Master" for r in records)
    access = {r.get("request_id"): r for r in records if r["logger"] == "gunicorn.access"}
    assert set(ids) <= access.keys() and None not in access
    assert "api_key=[redacted]" in access[ids[2]]["message"] and key not in "\n".join(server["lines"])
