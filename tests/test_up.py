"""`genq up` with nothing running but the process: SQLite, a storage folder and
the filesystem broker, API and worker started by one command."""
from __future__ import annotations

import io
import json
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
            lines.append(line.rstrip("\n"))
            if " ready." in line:
                ready.release()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(ready_lines):
        assert ready.acquire(timeout=180), "\n".join(lines)
    # What it printed before it was ready: the start banner.
    banner = list(lines)
    text = "\n".join(lines)
    if env_vars.get("GENQ_LOG_FORMAT") == "json":
        # One JSON line says where; the key is not logged, only kept in GENQ_HOME.
        url = next(json.loads(line)["url"] for line in banner if '"genq is up at ' in line)
        key = (home / "api-key").read_text().strip()
    else:
        url = re.search(r"API:\s+(http://\S+)", text).group(1)
        key = re.search(r"API key:\s+(gq_\S+)", text).group(1)
    return {"url": url, "headers": {"Authorization": f"Bearer {key}"}, "proc": proc, "home": home, "lines": lines,
            "banner": banner, "reader": reader}


def stop_up(up: dict) -> None:
    """Ctrl-C, then every line it and its children printed has been read."""
    proc = up["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    up["reader"].join(30)


@pytest.fixture(scope="module")
def up(tmp_path_factory, model_dir):
    home = tmp_path_factory.mktemp("up") / "genq-home"  # made by genq up
    # The one exception to the defaults: the tests' webhook receiver listens on 127.0.0.1, over http.
    started = start_up(home, model_dir, ready_lines=2, GENQ_WEBHOOK_ALLOW_HTTP="true",
                       GENQ_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
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


ANSI = "\x1b["
# A line of the log format (genq.logs.TEXT_FORMAT): date, time, level, logger.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ")


def test_the_start_banner_is_short_and_clean(up):
    """What `genq up` prints until its worker and webhook sender are ready:
    the banner with the URL and the key, then a few INFO lines from each
    child; no warnings, tracebacks, progress bars, ANSI codes or library
    chatter."""
    banner = up["banner"]
    text = "\n".join(banner)
    assert len(banner) <= 24, text
    assert re.search(r"^  API:\s+http://127\.0\.0\.1:\d+$", text, re.M), text
    assert re.search(r"^  API key:\s+gq_\S+$", text, re.M), text
    assert "Traceback" not in text and ANSI not in text and "\r" not in text, text
    logged = [line for line in banner if LOG_LINE.match(line)]
    # Every line is the banner's own (before the first log line) or a log line at INFO.
    first = banner.index(logged[0])
    assert all(LOG_LINE.match(line) for line in banner[first:]), text
    assert {LOG_LINE.match(line).group(1) for line in logged} == {"INFO"}, text
    assert sum(" ready." in line for line in logged) == 2, text


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


def test_no_line_has_ansi_codes(up):
    # werkzeug colours the access lines of 3xx-5xx answers, whatever the output is.
    marker = secrets.token_hex(6)
    for path in (f"/v1/no-such-route?m={marker}", f"/v1/jobs/{marker}"):
        assert requests.get(f"{up['url']}{path}", headers=up["headers"], timeout=10).status_code in (400, 404)
    deadline = time.monotonic() + 30
    while sum(marker in line for line in list(up["lines"])) < 2:
        assert time.monotonic() < deadline, "\n".join(up["lines"])
        time.sleep(0.1)
    assert not [line for line in up["lines"] if ANSI in line]


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
    from tests.helpers import free_port_pair

    home = tmp_path_factory.mktemp("up-broken-home")
    doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    doc["models"]["broken-text"] = {**doc["models"]["demo-text"], "checkpoint": str(home / "no-such-checkpoint")}
    registry = home / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    metrics_port = free_port_pair()  # the worker's, and the webhook sender's next to it
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

    def scrape(p: int) -> requests.Response:
        # `genq up` is ready once its model workers are; the sender may still be starting.
        deadline = time.monotonic() + 60
        while True:
            try:
                return requests.get(f"http://127.0.0.1:{p}/metrics", timeout=10)
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "\n".join(up["lines"])
                time.sleep(0.2)

    worker, sender = scrape(port), scrape(port + 1)
    assert worker.status_code == sender.status_code == 200
    assert "genq_model_cache_lookups_total" in worker.text and "genq_webhook_attempts_total" in sender.text
    assert f":{port}/metrics" in "\n".join(up["lines"]) and up["proc"].poll() is None


def test_a_killed_worker_comes_back_and_its_job_is_taken_back_at_once(tmp_path_factory, model_dir):
    """The model worker of a real `genq up` is SIGKILLed (as the OOM killer
    would) mid-job: the API keeps answering, the worker is started again, and
    the job, taken back at once, succeeds on the next attempt long before its
    10-minute lease could have lapsed, without ever running twice at once."""
    import yaml
    from types import SimpleNamespace

    from genq.settings import Settings
    from tests.faults.harness import Figures, check_nothing_lost

    home = tmp_path_factory.mktemp("up-killed-home")
    # One model of the fault-test family: a job runs as long as it is told, and nothing heavy is preloaded.
    registry = home / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"slow": {"family": "tests.faults.family", "checkpoint": "none",
                                                            "pool": "slow"}}}))
    execution_log = home / "executions.jsonl"
    env = dict(GENQ_REGISTRY=str(registry), GENQ_LEASE_SECONDS="600", GENQ_EXECUTION_LOG=str(execution_log),
               GENQ_HEARTBEAT_INTERVAL="0.5")
    up = start_up(home, model_dir, ready_lines=2, **env)
    try:
        job = requests.post(f"{up['url']}/v1/jobs", headers=up["headers"], timeout=10, json={
            "model": "slow", "input": {"prompt": "long", "steps": 40, "step_seconds": 0.25}}).json()

        def workers() -> list[dict]:
            listed = requests.get(f"{up['url']}/v1/admin/workers", headers=up["headers"], timeout=10).json()["data"]
            return [w for w in listed if w["alive"] and "slow" in w["pools"]]

        deadline = time.monotonic() + 60
        while not (requests.get(f"{up['url']}/v1/jobs/{job['id']}", headers=up["headers"], timeout=10)
                   .json()["status"] == "running" and workers()):
            assert time.monotonic() < deadline, "\n".join(up["lines"])
            time.sleep(0.1)
        [victim] = workers()
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.time()
        # The API in genq up's own process answers on while its worker is gone.
        assert requests.get(f"{up['url']}/healthz", timeout=10).status_code == 200
        done = wait(up, job["id"], timeout=180)  # far less than the 600 s lease
        assert (done["status"], done["attempts"]) == ("succeeded", 2), done
        assert up["proc"].poll() is None
        # Another worker process serves the pool now, and the log said what happened, in one line.
        [back] = workers()
        assert back["pid"] != victim["pid"]
        said = [line for line in up["lines"] if f"(pid {victim['pid']})" in line]
        assert len(said) == 1 and "was killed by SIGKILL; 1 of its jobs queued again at once; starting it again in 1s" \
            in said[0], said
        # From the execution log: the killed attempt ended at the kill, the next began after it, once.
        settings = Settings.from_env({"GENQ_HOME": str(home)}, **{"execution_log": execution_log})
        check_nothing_lost(settings, [job["id"]], [SimpleNamespace(pid=victim["pid"], exited_at=killed_at)],
                           Figures("genq up: worker SIGKILLed mid-job"))
    finally:
        stop_up(up)


def test_json_logs_are_json_on_every_line_with_job_and_request_ids(tmp_path_factory, model_dir):
    """GENQ_LOG_FORMAT=json: every line `genq up`, its worker and its webhook
    sender print, from start to Ctrl-C, is one JSON object; lines about a job
    name it, the API's access lines name their request."""
    home = tmp_path_factory.mktemp("up-json") / "genq-home"
    up = start_up(home, model_dir, ready_lines=2, GENQ_LOG_FORMAT="json")
    try:
        sent = f"trace-{secrets.token_hex(4)}"
        resp = requests.post(f"{up['url']}/v1/jobs", headers={**up["headers"], "Prefer": "wait=60", "X-Request-Id": sent},
                             json={"model": "demo-text", "input": {"prompt": "json", "max_new_tokens": 4}}, timeout=70)
        job = resp.json()
        assert (resp.status_code, job["status"], resp.headers["X-Request-Id"]) == (200, "succeeded", sent), job
        # Not a sane id (a space): the API makes its own, and says which.
        made = requests.get(f"{up['url']}/v1/no-such-route", headers={"X-Request-Id": "a b"}, timeout=10)
        assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-Id"])
    finally:
        stop_up(up)
    assert up["proc"].returncode == 0
    records = []
    for line in up["lines"]:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    about_the_job = [r for r in records if job["id"] in r["message"]]
    assert len(about_the_job) >= 2  # its batch, and how it ended
    assert all(r.get("job_id") == job["id"] or job["id"] in r.get("job_ids", []) for r in about_the_job), about_the_job
    access = [r for r in records if r["logger"] == "werkzeug"]
    assert all(r.get("request_id") for r in access), access
    assert [r["request_id"] for r in access if "POST /v1/jobs" in r["message"]] == [sent]
    assert [r["request_id"] for r in access if "/v1/no-such-route" in r["message"]] == [made.headers["X-Request-Id"]]
