"""The web console's files as the API serves them (api/console): the policy
on every answer, no inline script, and a script that calls documented routes
only. What it does in a browser: tests/client/test_console_browser.py."""
from __future__ import annotations

import re

from api.app import create_app
from api.console import STATIC

PAGES = ("/console", "/console/jobs", "/console/jobs/01a2420fe4317aecdc6b0db767e6d63e", "/console/operators")


def policy(resp) -> dict[str, str]:
    return {d.split()[0]: d.partition(" ")[2] for d in (p.strip() for p in resp.headers["Content-Security-Policy"].split(";")) if d}


def test_every_console_answer_allows_this_origin_only(client):
    for path in (*PAGES, "/console/assets/console.js", "/console/assets/console.css"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        found = policy(resp)
        assert found["default-src"] == "'none'" and found["frame-ancestors"] == "'none'"
        assert found["script-src"] == found["style-src"] == found["connect-src"] == "'self'"
        # Outputs are fetched with the key and shown from blob: URLs; nothing from another host.
        assert found["img-src"] == "'self' blob: data:" and found["media-src"] == "'self' blob:"
        assert "unsafe" not in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["Referrer-Policy"] == "no-referrer"
        resp.close()


def test_the_page_has_no_inline_script_or_style_and_names_no_other_host(client):
    page = client.get("/console").get_data(as_text=True)
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all('src="/console/assets/' in s for s in scripts)
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S) == [""] * len(scripts)  # no code inline
    assert not re.search(r"\son[a-z]+=|\sstyle=|<style", page)
    assert not re.search(r"https?://", page)
    for name in ("console.js", "console.css"):
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", (STATIC / name).read_text()), name


def test_only_the_two_assets_are_served(client):
    assert client.get("/console/assets/index.html").status_code == 404
    # Any other path under /console is the page (the script draws its view), never a file beside it.
    resp = client.get("/console/assets/..%2F__init__.py")
    assert resp.mimetype == "text/html" and b"import" not in resp.data


def test_the_script_calls_documented_routes_only(client):
    """Every API path console.js names is an operation of the OpenAPI document
    (no private endpoint), and the ones it needs most are among them."""
    doc = client.get("/openapi.json").get_json()
    routes = [re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(p)) + "$") for p in doc["paths"]]
    script = (STATIC / "console.js").read_text()
    named = {re.sub(r"\$\{[^}]*\}", "X", m).split("?")[0] for m in re.findall(r"[`\"'](/(?:v1/|openapi\.json)[^`\"']*)", script)}
    undocumented = sorted(p for p in named if not any(r.match(p) for r in routes))
    assert undocumented == []
    assert {"/v1/events", "/v1/jobs/X/events", "/v1/jobs", "/v1/models", "/v1/admin/pools", "/v1/files"} <= named


def test_presigned_outputs_are_allowed_from_the_storage_origin(embedded_settings, s3_settings):
    client = create_app(embedded_settings.replace(**s3_settings)).test_client()
    found = policy(client.get("/console"))
    origin = s3_settings["s3_endpoint_url"].rstrip("/")
    assert found["img-src"] == f"'self' blob: {origin} data:" and found["media-src"] == f"'self' blob: {origin}"
    assert found["connect-src"] == "'self'"
