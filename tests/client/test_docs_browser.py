"""/docs in a real browser (Debian's chromium, driven by playwright): Swagger UI
renders genq's OpenAPI 3.1 document, operations and all, with no internet."""
from __future__ import annotations

import httpx

# Kept where a person can look at it after a run.
SCREENSHOT = "/tmp/genq-docs.png"


def test_docs_render_every_operation_in_chromium(up, browser):
    requests_seen = []
    page = browser.new_page(viewport={"width": 1280, "height": 2000})
    try:
        page.on("request", lambda r: requests_seen.append(r.url))
        page.goto(up["url"] + "/docs", wait_until="load")
        page.wait_for_selector(".opblock", timeout=30_000)
        operations = page.locator(".opblock").count()
        paths = set(page.locator(".opblock-summary-path").all_inner_texts())
        errors = page.locator(".errors-wrapper, .loading-container .loading").count()
        title = page.locator(".info .title").inner_text()
        page.screenshot(path=SCREENSHOT, full_page=False)
    finally:
        page.close()
    doc = httpx.get(up["url"] + "/openapi.json").json()
    expected = sum(len(ops) for ops in doc["paths"].values())
    assert operations == expected and errors == 0
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/files"} <= {p.replace("\u200b", "") for p in paths}
    assert title.startswith("genq")
    assert all(url.startswith(up["url"]) for url in requests_seen), requests_seen  # nothing from the internet
