"""Webhooks end to end with real parts: the API (in process) on Postgres and
Redis, `genq worker` for the text pool and `genq worker --pool <webhook queue>`
(the sender) as real subprocesses, and a real HTTP receiver on 127.0.0.1 that
verifies every request with standardwebhooks.Webhook(secret).verify.

The retry schedule is shortened to 0.5 s, 1 s, 2 s and the POST timeout to
2 s, so a delivery's whole life fits in a few seconds."""
from __future__ import annotations

import datetime as dt
import re
import secrets
import time
from dataclasses import dataclass

import pytest
import redis
import yaml
from standardwebhooks import Webhook, WebhookVerificationError

from api.app import create_app
from genq import webhook_secrets
from genq.settings import Settings
from tests.conftest import REDIS_URL, RUN_ID, WEBHOOK_KEYS
from tests.helpers import WorkerProcess, make_key, wait_job
from tests.receiver import Answer, Receiver

BACKOFF = (0.5, 1.0, 2.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir, registry_path, pg_url):
    settings = Settings.from_env(
        {}, home=tmp_path_factory.mktemp("webhooks-home"), model_dir=model_dir, registry_path=registry_path,
        database_url=pg_url, broker_url=REDIS_URL, progress_interval=0.2, cancel_poll_interval=0.1, lease_seconds=30,
        webhook_secret_keys=WEBHOOK_KEYS,
        # This run's own queue on the shared Redis; the receiver on 127.0.0.1 over plain http.
        webhook_queue=f"webhooks-{RUN_ID}", webhook_allow_http=True, webhook_allowed_hosts=("127.0.0.1",),
        webhook_backoff=BACKOFF, webhook_timeout=2.0, webhook_sweep_interval=0.1,
        # The sender runs 8 threads; a tenant may hold 2 of them.
        webhook_tenant_concurrency=2,
    )
    text_pool = yaml.safe_load(registry_path.read_text())["models"]["demo-text"]["pool"]
    worker = WorkerProcess(settings, [text_pool]).start()
    sender = WorkerProcess(settings, [settings.webhook_queue], preload=False).start()
    receiver = Receiver()
    stack = {"settings": settings, "client": create_app(settings).test_client(), "receiver": receiver,
             "worker": worker, "sender": sender}
    yield stack
    receiver.close()
    stack["sender"].stop()
    worker.stop()


@dataclass
class Tenant:
    headers: dict
    secret: str


@pytest.fixture
def tenant(stack) -> Tenant:
    headers = make_key(stack["settings"], f"wh-{secrets.token_hex(4)}")
    return Tenant(headers, stack["client"].get("/v1/webhooks/secret", headers=headers).get_json()["key"])


def submit(stack, tenant: Tenant, path: str, **extra) -> dict:
    body = {"model": "demo-text", "input": {"prompt": "Once upon a time", "max_new_tokens": 8, "seed": 3},
            "webhook": stack["receiver"].url(path), **extra}
    resp = stack["client"].post("/v1/jobs", json=body, headers=tenant.headers)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def finished(stack, tenant: Tenant, job: dict) -> dict:
    done = wait_job(stack["client"].get, job["id"], tenant.headers)
    assert done["status"] == "succeeded", (done, stack["worker"].log())
    return done


def deliveries(stack, tenant: Tenant, job_id: str) -> list[dict]:
    resp = stack["client"].get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=tenant.headers)
    assert resp.status_code == 200
    return list(reversed(resp.get_json()["data"]))  # oldest first


def settle(stack, tenant, job_id, *, until=("succeeded", "failed", "gave_up"), count=1, timeout=30) -> list[dict]:
    """Wait until the job has `count` deliveries, all in a final state."""
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(stack, tenant, job_id)
        if len(found) >= count and all(d["status"] in until for d in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"deliveries of {job_id} not settled: {found}\n{stack['sender'].log()[-3000:]}")
        time.sleep(0.05)


def test_500_three_times_then_200_is_processed_once_after_four_attempts(stack, tenant):
    receiver = stack["receiver"]
    receiver.script("/retry", 500, 500, 500, 200, secret=tenant.secret)
    job = submit(stack, tenant, "/retry")
    done = finished(stack, tenant, job)
    [delivery] = settle(stack, tenant, job["id"])
    hits = receiver.to("/retry")
    assert [h.answered for h in hits] == [500, 500, 500, 200]
    assert [h.verify_error for h in hits] == [None] * 4
    # One event: the same webhook-id on every attempt, each attempt signed at its own time.
    [msg_id] = {h.headers["webhook-id"] for h in hits}
    assert delivery["status"] == "succeeded" and delivery["webhook_id"] == msg_id
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500, 200]
    assert [a["error"] for a in delivery["attempts"]] == ["HTTP 500: answer 500"] * 3 + [None]
    # Processed once, and the body is the job exactly as GET returns it.
    assert receiver.processed[msg_id] == done
    # Each wait follows the schedule (±20% jitter), plus a sweep interval, the doorbell and
    # the POST itself (slack for a busy two-core CI machine).
    gaps = [b.at - a.at for a, b in zip(hits, hits[1:])]
    for gap, wait in zip(gaps, BACKOFF):
        assert wait * 0.8 - 0.02 <= gap <= wait * 1.2 + 0.75, (gaps, BACKOFF)
    time.sleep(BACKOFF[0] * 2)
    assert len(receiver.to("/retry")) == 4  # nothing after the success
    offsets = [round(h.at - hits[0].at, 3) for h in hits]
    print(f"\nretry test: answers {[h.answered for h in hits]} at t={offsets} s "
          f"(gaps {[round(g, 3) for g in gaps]} s for schedule {BACKOFF} s ±20%); "
          f"POST durations {[a['duration_ms'] for a in delivery['attempts']]} ms; processed once")


def test_tampered_body_stale_timestamp_and_other_keys_fail_verification(stack, tenant):
    receiver = stack["receiver"]
    receiver.script("/verify", 200, secret=tenant.secret)
    job = submit(stack, tenant, "/verify")
    finished(stack, tenant, job)
    settle(stack, tenant, job["id"])
    [hit] = receiver.to("/verify")
    assert hit.verify_error is None
    hook = Webhook(tenant.secret)
    assert hook.verify(hit.body, hit.headers)["id"] == job["id"]
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        hook.verify(hit.body.replace(b'"succeeded"', b'"failed"'), hit.headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        hook.verify(hit.body, {**hit.headers, "webhook-id": "msg_other"})
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(webhook_secrets.new_secret()).verify(hit.body, hit.headers)
    # The same body and id, signed with the right key six minutes ago: refused as stale.
    old = webhook_secrets.sign([tenant.secret], hit.headers["webhook-id"], hit.body,
                               dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=6))
    with pytest.raises(WebhookVerificationError, match="too old"):
        hook.verify(hit.body, old)


def test_after_rotation_both_keys_verify_during_the_grace_period(stack, tenant):
    new = stack["client"].post("/v1/webhooks/secret/rotate", headers=tenant.headers).get_json()["key"]
    stack["receiver"].script("/rotated", 200, secret=new)
    job = submit(stack, tenant, "/rotated")
    finished(stack, tenant, job)
    settle(stack, tenant, job["id"])
    [hit] = stack["receiver"].to("/rotated")
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    for key in (new, tenant.secret):
        assert Webhook(key).verify(hit.body, hit.headers)["id"] == job["id"]


def test_the_filter_holds(stack, tenant):
    receiver = stack["receiver"]
    receiver.script("/only-completed", 200, secret=tenant.secret)
    receiver.script("/everything", 200, secret=tenant.secret)
    plain = submit(stack, tenant, "/only-completed")
    every = submit(stack, tenant, "/everything", webhook_events_filter=["start", "progress", "completed"])
    finished(stack, tenant, plain)
    done = finished(stack, tenant, every)
    [only] = settle(stack, tenant, plain["id"])
    assert only["event"] == "completed"
    logged = settle(stack, tenant, every["id"], count=2)
    events = [d["event"] for d in logged]
    assert events[0] == "start" and events[-1] == "completed" and set(events[1:-1]) <= {"progress"}
    # Progress is throttled to one delivery a second per job.
    assert events.count("progress") <= done["metrics"]["run_seconds"] + 1
    time.sleep(0.5)
    [hit] = receiver.to("/only-completed")
    assert hit.verify_error is None and receiver.processed[hit.headers["webhook-id"]]["status"] == "succeeded"
    bodies = {h.headers["webhook-id"]: receiver.processed[h.headers["webhook-id"]] for h in receiver.to("/everything")}
    by_event = {d["event"]: bodies[d["webhook_id"]] for d in logged}
    assert by_event["start"]["status"] == "running" and by_event["completed"]["status"] == "succeeded"


def test_a_sender_killed_mid_delivery_and_a_lost_doorbell_lose_nothing(stack, tenant):
    receiver, settings = stack["receiver"], stack["settings"]
    # The first POST is held for 3 s: the sender is killed while it waits.
    receiver.script("/killed", Answer(200, delay=3), 200, secret=tenant.secret)
    receiver.script("/while-down", 200, secret=tenant.secret)
    held = submit(stack, tenant, "/killed")
    finished(stack, tenant, held)
    receiver.wait_for(lambda: len(receiver.to("/killed")) == 1, what="first POST")
    stack["sender"].stop("kill")
    # With no sender running, another job completes: its delivery row is
    # committed with the job's final state, and its doorbell is then lost.
    later = submit(stack, tenant, "/while-down")
    finished(stack, tenant, later)
    redis.Redis.from_url(REDIS_URL).delete(settings.webhook_queue)
    stopped = time.monotonic()
    stack["sender"] = WorkerProcess(settings, [settings.webhook_queue], preload=False).start()
    [first] = settle(stack, tenant, held["id"])
    [second] = settle(stack, tenant, later["id"])
    print(f"\nafter the kill: both delivered {time.monotonic() - stopped:.1f}s after the sender was killed")
    assert first["status"] == second["status"] == "succeeded"
    assert [a["status_code"] for a in first["attempts"]] == [None, 200]
    assert "the sender stopped before the receiver answered" in first["attempts"][0]["error"]
    hits = receiver.to("/killed")
    assert len(hits) == 2 and len({h.headers["webhook-id"] for h in hits}) == 1
    # The held POST was processed as the sender died; the retry was the same event, dropped as a duplicate.
    assert first["webhook_id"] in receiver.processed and receiver.duplicates >= 1
    assert [h.answered for h in receiver.to("/while-down")] == [200]


def test_a_name_resolving_inside_is_refused_at_send_time(stack, tenant):
    """Submit-time and send-time checks are separate: an API that lets
    `localhost` through (as a name that resolved publicly at submit would be)
    cannot make the sender post to a loopback address."""
    lax = create_app(stack["settings"].replace(webhook_allowed_hosts=("127.0.0.1", "localhost"))).test_client()
    stack["receiver"].script("/ssrf", 200, secret=tenant.secret)
    url = stack["receiver"].url("/ssrf", host="localhost")
    job = lax.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "x", "max_new_tokens": 2}, "webhook": url},
                   headers=tenant.headers).get_json()
    finished(stack, tenant, job)
    [delivery] = settle(stack, tenant, job["id"], timeout=30)
    assert delivery["status"] == "failed" and len(delivery["attempts"]) == len(BACKOFF) + 1
    for attempt in delivery["attempts"]:
        assert attempt["status_code"] is None
        assert re.match(r"refused: webhook host localhost resolves to (127\.0\.0\.1|::1), a loopback address", attempt["error"])
    assert stack["receiver"].to("/ssrf") == []


def test_410_stops_retrying_for_the_job(stack, tenant):
    stack["receiver"].script("/gone", 410, secret=tenant.secret)
    job = submit(stack, tenant, "/gone", webhook_events_filter=["start", "completed"])
    finished(stack, tenant, job)
    logged = settle(stack, tenant, job["id"], until=("gave_up",))
    time.sleep(BACKOFF[0] * 3)  # past the first retry's time
    logged = deliveries(stack, tenant, job["id"])
    assert all(d["status"] == "gave_up" and len(d["attempts"]) <= 1 for d in logged), logged
    assert logged[0]["attempts"][0]["status_code"] == 410
    assert 1 <= len(stack["receiver"].to("/gone")) <= len(logged)


def test_429_retry_after_is_honoured(stack, tenant):
    stack["receiver"].script("/busy", Answer(429, {"Retry-After": "1"}), 200, secret=tenant.secret)
    job = submit(stack, tenant, "/busy")
    finished(stack, tenant, job)
    [delivery] = settle(stack, tenant, job["id"])
    assert [a["status_code"] for a in delivery["attempts"]] == [429, 200]
    first, second = stack["receiver"].to("/busy")
    # The schedule alone would retry after 0.4-0.6 s.
    assert second.at - first.at >= 0.98


def test_redirects_are_not_followed(stack, tenant):
    receiver = stack["receiver"]
    receiver.script("/moved", Answer(302, {"Location": receiver.url("/elsewhere")}), 200, secret=tenant.secret)
    receiver.script("/elsewhere", 200, secret=tenant.secret)
    job = submit(stack, tenant, "/moved")
    finished(stack, tenant, job)
    [delivery] = settle(stack, tenant, job["id"])
    assert [a["status_code"] for a in delivery["attempts"]] == [302, 200]
    assert "not followed" in delivery["attempts"][0]["error"]
    assert receiver.to("/elsewhere") == []


def test_redeliver_sends_the_same_event_again(stack, tenant):
    receiver = stack["receiver"]
    receiver.script("/again", 200, secret=tenant.secret)
    job = submit(stack, tenant, "/again")
    finished(stack, tenant, job)
    [delivery] = settle(stack, tenant, job["id"])
    resp = stack["client"].post(f"/v1/jobs/{job['id']}/webhook-deliveries/{delivery['id']}/redeliver", headers=tenant.headers)
    assert resp.status_code == 202
    logged = settle(stack, tenant, job["id"], count=2)
    assert [d["status"] for d in logged] == ["succeeded", "succeeded"]
    hits = receiver.to("/again")
    assert len(hits) == 2 and {h.headers["webhook-id"] for h in hits} == {delivery["webhook_id"]}
    assert all(h.verify_error is None for h in hits)


def test_a_tenant_with_a_slow_receiver_holds_only_its_share_of_the_sender(stack):
    """Six deliveries to a receiver that takes 1.5 s each, and one of another
    tenant: the first tenant never has more than its share (2) of POSTs in
    flight, whatever the sender's threads could take, and the other's event
    goes out beside them."""
    receiver = stack["receiver"]
    slow, other = (Tenant(h, stack["client"].get("/v1/webhooks/secret", headers=h).get_json()["key"])
                   for h in (make_key(stack["settings"], f"slow-{secrets.token_hex(4)}"),
                             make_key(stack["settings"], f"other-{secrets.token_hex(4)}")))
    receiver.script("/slow", Answer(200, delay=1.5), secret=slow.secret)
    receiver.script("/other", 200, secret=other.secret)
    slow_jobs = [submit(stack, slow, "/slow") for _ in range(6)]
    other_job = submit(stack, other, "/other")
    for job in slow_jobs:
        settle(stack, slow, job["id"], timeout=60)
    [delivered] = settle(stack, other, other_job["id"], timeout=60)
    assert delivered["status"] == "succeeded"
    assert len(receiver.to("/slow")) >= 6
    assert receiver.most_busy["/slow"] <= 2, receiver.most_busy


def test_redeliver_is_refused_while_the_event_is_on_its_way(stack, tenant):
    receiver = stack["receiver"]
    receiver.script("/busy-again", Answer(200, delay=1.0), secret=tenant.secret)
    job = submit(stack, tenant, "/busy-again")
    finished(stack, tenant, job)
    [delivery] = settle(stack, tenant, job["id"])
    url = f"/v1/jobs/{job['id']}/webhook-deliveries/{delivery['id']}/redeliver"
    assert stack["client"].post(url, headers=tenant.headers).status_code == 202
    again = stack["client"].post(url, headers=tenant.headers)
    assert again.status_code == 409 and "still on its way" in again.get_json()["detail"]
    settle(stack, tenant, job["id"], count=2)
