"""/docs in a real browser (Debian's chromium, driven by playwright): Swagger UI
renders genq's OpenAPI 3.1 document, operations and all, with no internet."""
from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Kept where a person can look at it after a run.
SCREENSHOT = "/tmp/genq-docs.png"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (make test installs Debian's where apt-get is "
                                              "at hand and it runs as root)")
def test_docs_render_every_operation_in_chromium(up):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    requests_seen = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            page.on("request", lambda r: requests_seen.append(r.url))
            page.goto(up["url"] + "/", wait_until="load")  # a browser asking for / lands on /docs
            assert page.url == up["url"] + "/docs"
            page.wait_for_selector(".opblock", timeout=30_000)
            operations = page.locator(".opblock").count()
            paths = set(page.locator(".opblock-summary-path").all_inner_texts())
            errors = page.locator(".errors-wrapper, .loading-container .loading").count()
            title = page.locator(".info .title").inner_text()
            page.screenshot(path=SCREENSHOT, full_page=False)
        finally:
            browser.close()
    doc = __import__("httpx").get(up["url"] + "/openapi.json").json()
    expected = sum(len(ops) for ops in doc["paths"].values())
    assert operations == expected and errors == 0
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/files"} <= {p.replace("\u200b", "") for p in paths}
    assert title.startswith("genq")
    assert all(url.startswith(up["url"]) for url in requests_seen), requests_seen  # nothing from the internet
