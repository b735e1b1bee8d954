"""`genq up` with nothing running but the process: SQLite, a storage folder and
the filesystem broker, API and worker started by one command."""
from __future__ import annotations

import io
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque

import pytest
import requests
from PIL import Image



def start_up(home, model_dir, ready_lines: int = 1, **env_vars) -> dict:
    """`genq up` as a newcomer runs it: only GENQ_HOME, the prebuilt demo
    checkpoints and `env_vars`; every other setting is the embedded default (no
    GENQ_DATABASE_URL, no broker URL). Port 0: it listens on a free port, and
    every URL it hands out names it. Waits for `ready_lines` " ready." lines
    (the model worker's, then the webhook sender's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_HOME=str(home), GENQ_MODEL_DIR=str(model_dir), GENQ_API_PORT="0", PYTHONUNBUFFERED="1", **env_vars)
    proc = subprocess.Popen([sys.executable, "-m", "genq.cli", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: deque[str] = deque(maxlen=3000)
    ready = threading.Semaphore(0)

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if " ready." in line:
                ready.release()

    threading.Thread(target=read, daemon=True).start()
    for _ in range(ready_lines):
        assert ready.acquire(timeout=180), "\n".join(lines)
    text = "\n".join(lines)
    url = re.search(r"API:\s+(http://\S+)", text).group(1)
    key = re.search(r"API key:\s+(gq_\S+)", text).group(1)
    return {"url": url, "headers": {"Authorization": f"Bearer {key}"}, "proc": proc, "home": home, "lines": lines}


def stop_up(up: dict) -> None:
    proc = up["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def up(tmp_path_factory, model_dir):
    home = tmp_path_factory.mktemp("up") / "genq-home"  # made by genq up
    # The one exception to the defaults: the tests' webhook receiver listens on 127.0.0.1, over http.
    started = start_up(home, model_dir, GENQ_WEBHOOK_ALLOW_HTTP="true", GENQ_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    yield started
    stop_up(started)


def wait(up, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{up['url']}/v1/jobs/{job_id}", headers=up["headers"], timeout=10).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_embedded_defaults_are_in_use(up):
    home = up["home"]
    assert (home / "genq.db").exists()
    assert (home / "broker").is_dir()
    # The database, the API key and the outputs are the owner's only.
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "genq.db").stat().st_mode) == 0o600
    ready = requests.get(f"{up['url']}/readyz", timeout=10).json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_text_job_with_prefer_wait(up):
    resp = requests.post(f"{up['url']}/v1/jobs", headers={**up["headers"], "Prefer": "wait=60"},
                         json={"model": "demo-text", "input": {"prompt": "Once upon a time", "max_new_tokens": 8, "seed": 1}},
                         timeout=70)
    job = resp.json()
    assert resp.status_code == 200, job
    assert job["status"] == "succeeded", ("\n".join(up["lines"]), job)
    assert job["output"]["tokens"] >= 1


def test_image_job_is_served_by_the_api_to_its_owner_only(up):
    body = {"model": "demo-image", "input": {"prompt": "a blue circle", "width": 32, "height": 40, "num_inference_steps": 2, "seed": 5}}
    job = wait(up, requests.post(f"{up['url']}/v1/jobs", headers=up["headers"], json=body, timeout=10).json()["id"])
    assert job["status"] == "succeeded", ("\n".join(up["lines"]), job)
    url = job["output"]["images"][0]["url"]
    assert url.startswith(up["url"] + "/v1/jobs/")
    png = requests.get(url, headers=up["headers"], timeout=10)
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (32, 40)
    assert requests.get(url, timeout=10).status_code == 401
    again = wait(up, requests.post(f"{up['url']}/v1/jobs", headers=up["headers"], json=body, timeout=10).json()["id"])
    same = requests.get(again["output"]["images"][0]["url"], headers=up["headers"], timeout=10).content
    assert same == png.content


def test_sse_streams_events_until_completed(up):
    job = requests.post(f"{up['url']}/v1/jobs", headers=up["headers"],
                        json={"model": "demo-text", "input": {"prompt": "stream", "max_new_tokens": 8}}, timeout=10).json()
    with requests.get(f"{up['url']}/v1/jobs/{job['id']}/events", headers={**up["headers"], "Accept": "text/event-stream"},
                      stream=True, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        kinds = [line.split(": ", 1)[1] for line in resp.iter_lines(decode_unicode=True) if line.startswith("event: ")]
    assert kinds[0] == "queued" and "start" in kinds and kinds[-1] == "completed"


def test_webhook_is_delivered_signed_by_the_embedded_sender(up):
    from standardwebhooks import Webhook

    from tests.receiver import Receiver

    secret = requests.get(f"{up['url']}/v1/webhooks/secret", headers=up["headers"], timeout=10).json()["key"]
    receiver = Receiver()
    try:
        receiver.script("/up", 200, secret=secret)
        job = requests.post(f"{up['url']}/v1/jobs", headers=up["headers"], timeout=10, json={
            "model": "demo-text", "input": {"prompt": "hook", "max_new_tokens": 4}, "webhook": receiver.url("/up")}).json()
        done = wait(up, job["id"])
        receiver.wait_for(lambda: receiver.processed, timeout=60, what="webhook")
        [hit] = receiver.to("/up")
        assert hit.verify_error is None
        assert Webhook(secret).verify(hit.body, hit.headers) == done
    finally:
        receiver.close()


def test_keys_in_urls_are_refused_and_never_logged(up):
    from genq.settings import Settings
    from tests.helpers import make_key

    # A key of its own: the one up's banner printed is in its output already.
    key = make_key(Settings.from_env({"GENQ_HOME": str(up["home"])}), "careless")["Authorization"].split(" ", 1)[1]
    marker = secrets.token_hex(6)
    for query in (f"api_key={key}", f"token={key}", f"x={key}&m={marker}"):
        resp = requests.get(f"{up['url']}/v1/jobs?{query}", timeout=10)
        assert resp.status_code == 400 and "Authorization header" in resp.json()["detail"]
        assert resp.headers["Server"] == "genq"
    deadline = time.monotonic() + 30
    while not any(marker in line for line in list(up["lines"])):
        assert time.monotonic() < deadline, "\n".join(up["lines"])
        time.sleep(0.1)
    assert key not in "\n".join(up["lines"])
    assert requests.get(f"{up['url']}/healthz", timeout=10).headers["Server"] == "genq"


def test_ctrl_c_stops_api_and_worker(up):
    proc = up["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{up['url']}/healthz", timeout=2)


@pytest.fixture(scope="module")
def up_with_a_broken_model(tmp_path_factory, model_dir):
    """`genq up` whose registry has a model that cannot load beside demo-text,
    with worker metrics on."""
    import yaml

    from genq.settings import DEFAULT_REGISTRY
    from tests.helpers import free_port

    home = tmp_path_factory.mktemp("up-broken-home")
    doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    doc["models"]["broken-text"] = {**doc["models"]["demo-text"], "checkpoint": str(home / "no-such-checkpoint")}
    registry = home / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    metrics_port = free_port()
    started = start_up(home, model_dir, ready_lines=2, GENQ_REGISTRY=str(registry),
                       GENQ_METRICS_PORT=str(metrics_port), GENQ_HEARTBEAT_INTERVAL="0.5")
    yield {**started, "metrics_port": metrics_port}
    stop_up(started)


def test_a_model_that_cannot_load_fails_its_jobs_and_the_rest_runs_on(up_with_a_broken_model):
    up = up_with_a_broken_model
    assert up["proc"].poll() is None, "\n".join(up["lines"])
    post = lambda model: requests.post(f"{up['url']}/v1/jobs", headers=up["headers"], timeout=10,  # noqa: E731
                                       json={"model": model, "input": {"prompt": "hi", "max_new_tokens": 4}}).json()
    broken = wait(up, post("broken-text")["id"])
    assert broken["status"] == "failed" and broken["error"]["code"] == "model_load_failed", broken
    assert wait(up, post("demo-text")["id"])["status"] == "succeeded"
    assert up["proc"].poll() is None

    def reported() -> list[dict]:
        workers = requests.get(f"{up['url']}/v1/admin/workers", headers=up["headers"], timeout=10).json()["data"]
        return [w for w in workers if w["alive"] and "broken-text" in w["model_errors"]]

    deadline = time.monotonic() + 30
    while not reported():
        assert time.monotonic() < deadline, requests.get(f"{up['url']}/v1/admin/workers", headers=up["headers"]).json()
        time.sleep(0.2)
    [worker] = reported()
    assert "no-such-checkpoint" in worker["model_errors"]["broken-text"] and "demo-text" not in worker["model_errors"]
    pools = requests.get(f"{up['url']}/v1/admin/pools", headers=up["headers"], timeout=10).json()["data"]
    assert [p["model_errors"] for p in pools if "broken-text" in p["models"]][0].keys() == {"broken-text"}


def test_worker_metrics_port_serves_the_worker_and_the_sender(up_with_a_broken_model):
    up = up_with_a_broken_model
    port = up["metrics_port"]
    worker = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    sender = requests.get(f"http://127.0.0.1:{port + 1}/metrics", timeout=10)
    assert worker.status_code == sender.status_code == 200
    assert "genq_model_cache_lookups_total" in worker.text and "genq_webhook_attempts_total" in sender.text
    assert f":{port}/metrics" in "\n".join(up["lines"]) and up["proc"].poll() is None
