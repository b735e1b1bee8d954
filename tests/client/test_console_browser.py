"""The web console (/console) in a real browser, Debian's chromium driven by
playwright, against a real `genq up` and its worker: sign in from a link,
a field error beside its input, submit from the form, watch the job reach
`succeeded` in the jobs table with no reload, its image inline and in the
gallery, cancel, an admin pausing and resuming a pool, another tenant seeing
none of it, and a phone-width layout with no sideways scroll.

Screenshots of each page go to test-output/console/ (git-ignored) for a person to look at."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.client.conftest import new_tenant
from tests.receiver import Receiver

SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "console"
POOL = "gpu-image"  # demo-image's pool under `genq up` (the shipped registry)
# Small and quick: two denoising steps of a 64 px image.
IMAGE_INPUT = {"prompt": "a red square", "width": 64, "height": 64, "num_inference_steps": 2}
WAIT_MS = 90_000


def signed_in(browser, up, key: str, width: int = 1280):
    """A fresh tab signed in through /console#key=..., as a shared link would; every URL it asks for is kept."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(f"{up['url']}/console#key={key}")
    page.wait_for_selector("#nav:not([hidden])")
    return page


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def image_shown(page, selector: str, width: int, timeout: float = 30) -> bool:
    """The first image at `selector` decoded at `width` pixels, polled from here: the
    console's policy allows no eval, which page.wait_for_function needs."""
    image = page.locator(selector).first
    image.wait_for(timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if image.evaluate("img => img.complete && img.naturalWidth") == width:
            return True
        time.sleep(0.1)
    return False


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_a_tenant_watches_its_job_run_live_and_another_sees_none_of_it(up, browser):
    key_a, key_b = new_tenant(up), new_tenant(up)
    admin = signed_in(browser, up, up["key"])
    a = signed_in(browser, up, key_a)
    try:
        # The fragment signed in and is gone from the address bar; the key is in this tab's session storage only.
        assert "#" not in a.url and a.url.endswith("/console/jobs")
        assert a.evaluate("sessionStorage.getItem('genq.key')") == key_a
        assert a.evaluate("document.cookie") == ""
        a.wait_for_selector("#jobs-table + .empty:not([hidden])")
        assert a.locator("#nav-operators").is_hidden()

        # An admin pauses the image pool, so A's job waits in line until it is resumed.
        admin.click("#nav-operators")
        admin.get_by_role("button", name=f"Pause pool {POOL}").click()
        admin.wait_for_selector(f"tr[data-pool='{POOL}'] .status.paused")
        shot(admin, "operators")

        # The form: a bad width is refused by the API, and the message stands beside the width input.
        a.click("text=Run a model")
        a.select_option("#run-model", "demo-image")
        a.wait_for_selector("form[aria-label='Input of demo-image']")
        a.get_by_role("textbox", name="Prompt", exact=True).fill(IMAGE_INPUT["prompt"])
        a.get_by_label("Width").fill("63")
        a.click("#submit")
        error = a.locator("[data-field='input.width'] .field-error")
        error.wait_for()
        assert "multiple of 8" in error.inner_text()
        assert a.get_by_label("Width").get_attribute("aria-invalid") == "true"
        assert a.locator(".field-error:not(:empty)").count() == 1 and a.url.endswith("/console/run?model=demo-image")
        shot(a, "run-field-error")

        a.get_by_label("Width").fill("64")
        a.get_by_label("Num Inference Steps").fill("2")
        a.click("#submit")
        a.wait_for_url("**/console/jobs/*")
        job_id = a.url.rsplit("/", 1)[1]
        assert a.inner_text("#job-status") == "queued"  # the pool is paused

        # Cancel, from another job's page.
        other = httpx.post(f"{up['url']}/v1/jobs", headers={"Authorization": f"Bearer {key_a}"},
                           json={"model": "demo-image", "input": IMAGE_INPUT}, timeout=30).json()["id"]
        a.goto(f"{up['url']}/console/jobs/{other}")
        a.click("#cancel")
        a.wait_for_selector("#job-status.canceled")
        a.wait_for_selector("#job-events li[data-type='completed']")

        # The jobs table: job_id waits, queued; resumed, it runs to succeeded with no reload of the page.
        a.click("#nav a[href='/console/jobs']")
        status = a.locator(f"tr[data-job-id='{job_id}'] .status-cell")
        status.wait_for()
        assert status.inner_text() == "queued"
        navigations = []
        a.on("framenavigated", lambda frame: navigations.append(frame.url))
        a.evaluate("window.stillThisDocument = true")
        admin.get_by_role("button", name=f"Resume pool {POOL}").click()
        admin.wait_for_selector(f"tr[data-pool='{POOL}'] .status.active")
        a.wait_for_selector(f"tr[data-job-id='{job_id}'] .status.succeeded", timeout=WAIT_MS)
        assert a.evaluate("window.stillThisDocument") is True and navigations == []
        assert a.inner_text(f"tr[data-job-id='{job_id}'] .progress-cell").strip().endswith("2/2 step")
        assert a.inner_text(f"tr[data-job-id='{other}'] .status-cell") == "canceled"
        shot(a, "jobs")

        # Its page: the image inline (fetched with the key: the API serves outputs to their owner only).
        a.click(f"tr[data-job-id='{job_id}'] a")
        assert image_shown(a, "#job-output img", 64)
        a.wait_for_selector("#job-events li[data-type='completed']")
        assert a.inner_text("#job-status") == "succeeded"
        shot(a, "job")

        a.click("text=Gallery")
        assert image_shown(a, "#gallery img", 64)
        assert a.locator(f"#gallery a[href='/console/jobs/{job_id}']").count() == 1
        shot(a, "gallery")

        # A phone: every page fits its width.
        a.set_viewport_size({"width": 390, "height": 844})
        for name, path in (("jobs", "/console/jobs"), ("job", f"/console/jobs/{job_id}"), ("run", "/console/run"),
                           ("gallery", "/console/gallery"), ("fine-tunes", "/console/fine-tunes")):
            a.goto(up["url"] + path)
            a.wait_for_selector("main h1")
            a.wait_for_load_state("networkidle")
            assert no_sideways_scroll(a), path
            shot(a, f"phone-{name}")

        a.click("#sign-out")
        a.wait_for_selector("#key")
        assert a.evaluate("sessionStorage.getItem('genq.key')") is None

        # The key never went into a URL, and nothing was asked of any other host.
        for page in (a, admin):
            assert not [u for u in page.requests if key_a in u or up["key"] in u]
            assert all(u.startswith(up["url"]) or u.startswith(("blob:", "data:")) for u in page.requests)
    finally:
        # Never leave the shared `genq up` with a paused pool.
        httpx.post(f"{up['url']}/v1/admin/pools/{POOL}/resume", headers=up["headers"], timeout=30)
        admin.context.close()
        a.context.close()

    # Another tenant: no jobs, no images, A's job is 404, and no operators' page.
    b = signed_in(browser, up, key_b)
    try:
        # The keyboard: the first Tab reaches the skip link, then the navigation, in reading order.
        b.keyboard.press("Tab")
        assert b.evaluate("document.activeElement.textContent") == "Skip to content"
        b.keyboard.press("Tab")
        b.keyboard.press("Tab")
        assert b.evaluate("document.activeElement.textContent") == "Jobs"
        b.wait_for_selector("#jobs-table + .empty:not([hidden])")
        assert b.locator("#jobs-table tbody tr").count() == 0
        b.click("text=Gallery")
        b.wait_for_selector("#gallery + .empty:not([hidden])")
        assert b.locator("#gallery img").count() == 0
        b.goto(f"{up['url']}/console/jobs/{job_id}")
        assert "404" in b.locator("main .alert").inner_text()
        assert b.locator("#job-status").count() == 0
        assert b.locator("#nav-operators").is_hidden()
        b.goto(f"{up['url']}/console/operators")
        assert "admin key" in b.locator("main .alert").inner_text()
        assert b.locator("#pools-table").count() == 0
    finally:
        b.context.close()


def test_a_fine_tune_from_an_uploaded_dataset_draws_its_loss_live(up, browser):
    key = new_tenant(up)
    page = signed_in(browser, up, key)
    try:
        page.click("text=Fine-tunes")
        page.wait_for_selector("#ft-model")
        rows = "\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": f" {2 * i}"}) for i in range(24))
        page.set_input_files("#upload-input-training_file",
                             files=[{"name": "sums.jsonl", "mimeType": "application/jsonl", "buffer": rows.encode()}])
        training_file = page.locator("#field-input-training_file")
        deadline = time.monotonic() + 30
        while not training_file.input_value() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(training_file.input_value()) == 32  # the uploaded file's id
        assert "24 rows" in page.inner_text("#hint-input-training_file")
        page.get_by_label("Max Steps").fill("6")
        page.click("#submit")
        page.wait_for_url("**/console/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        page.wait_for_selector("#job-status.succeeded", timeout=WAIT_MS)
        page.wait_for_selector("#run-fine-tuned")
        shot(page, "fine-tune")
        # One point per loss the job recorded: the chart is drawn from the same events.
        events = httpx.get(f"{up['url']}/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"},
                           timeout=30).json()["data"]
        losses = [e["data"]["loss"] for e in events if e["type"] == "progress" and "loss" in e["data"]]
        points = page.get_attribute("#loss-chart polyline", "points").split()
        assert len(losses) >= 1 and len(points) == len(losses)
        assert f"last {losses[-1]:.4f}" in page.get_attribute("#loss-chart", "aria-label")

        # The new model, from its link to the form; its text streams into the job's page.
        page.click("#run-fine-tuned")
        model = httpx.get(f"{up['url']}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30).json()["output"]["model"]
        page.wait_for_selector(f"form[aria-label='Input of {model}']")
        page.get_by_role("textbox", name="Prompt", exact=True).fill("3+3=")
        page.get_by_label("Max New Tokens").fill("8")
        page.click("#submit")
        page.wait_for_url("**/console/jobs/*")
        page.wait_for_selector("#job-status.succeeded", timeout=WAIT_MS)
        text_job = httpx.get(page.url.replace("/console/", "/v1/"), headers={"Authorization": f"Bearer {key}"},
                             timeout=30).json()
        # Six steps of LoRA leave the first token near a tie: the new model may end at once (EOS first,
        # text ""), so that its text is non-empty is checked on the fixed demo-text model below.
        assert text_job["model"] == model and text_job["output"]["tokens"] >= 1
        assert page.locator("#job-text").evaluate("e => e.textContent") == text_job["output"]["text"]
    finally:
        page.context.close()


def test_a_jobs_webhook_deliveries_are_listed_and_one_is_sent_again(up, browser):
    key = new_tenant(up)
    headers = {"Authorization": f"Bearer {key}"}
    receiver = Receiver()
    receiver.script("/hook", 200, secret=httpx.get(f"{up['url']}/v1/webhooks/secret", headers=headers).json()["key"])
    page = signed_in(browser, up, key)
    try:
        page.goto(f"{up['url']}/console/run?model=demo-text")
        page.get_by_role("textbox", name="Prompt", exact=True).fill("hello")
        page.get_by_label("Webhook URL").fill(receiver.url("/hook"))
        page.get_by_label("Priority").fill("500")  # out of bounds: the error stands beside it
        page.click("#submit")
        error = page.locator("[data-field='opt.priority'] .field-error")
        error.wait_for()
        assert "100" in error.inner_text()
        page.get_by_label("Priority").fill("")
        page.click("#submit")
        page.wait_for_url("**/console/jobs/*")
        page.wait_for_selector("#job-status.succeeded", timeout=WAIT_MS)
        # The text streamed into the page is the job's output, whole.
        text = httpx.get(page.url.replace("/console/", "/v1/"), headers=headers, timeout=30).json()["output"]["text"]
        assert text and page.locator("#job-text").evaluate("e => e.textContent") == text
        receiver.wait_for(lambda: len(receiver.processed) == 1, what="first delivery")
        deadline = time.monotonic() + 30
        while "succeeded" not in page.inner_text("#deliveries tbody") and time.monotonic() < deadline:
            page.click("text=Refresh deliveries")
            time.sleep(0.3)
        page.click("#deliveries tbody button:not([disabled])")
        page.wait_for_selector("#deliveries tbody tr:nth-child(2)")
        receiver.wait_for(lambda: len(receiver.to("/hook")) == 2, what="redelivery")
        first, again = receiver.to("/hook")
        # The same event again: same webhook-id, so the receiver processes it once.
        assert first.headers["webhook-id"] == again.headers["webhook-id"] and receiver.duplicates == 1
        assert page.locator("#deliveries tbody tr").count() == 2
        shot(page, "webhook-deliveries")
    finally:
        page.context.close()
        receiver.close()
