"""The webhook routes on the embedded stack with no worker or sender running:
secrets and rotation, URLs refused at submit, the delivery log, redelivery,
and tenant isolation."""
from __future__ import annotations

import pytest
from sqlalchemy import update

from genq.schema import WebhookDelivery

from tests.helpers import make_key

PROBLEM = "application/problem+json"


@pytest.fixture
def alice(embedded_settings):
    return make_key(embedded_settings, "alice")


@pytest.fixture
def bob(embedded_settings):
    return make_key(embedded_settings, "bob")


def submit(client, headers, webhook, **extra):
    return client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}, "webhook": webhook, **extra},
                       headers=headers)


def test_secret_is_made_once_per_tenant_and_rotation_returns_a_new_one(client, alice, bob):
    first = client.get("/v1/webhooks/secret", headers=alice).get_json()["key"]
    assert first.startswith("whsec_")
    assert client.get("/v1/webhooks/secret", headers=alice).get_json()["key"] == first
    assert client.get("/v1/webhooks/secret", headers=bob).get_json()["key"] != first
    rotated = client.post("/v1/webhooks/secret/rotate", headers=alice).get_json()
    assert rotated["key"].startswith("whsec_") and rotated["key"] != first
    assert rotated["previous_key_expires_at"].endswith("Z")
    assert client.get("/v1/webhooks/secret", headers=alice).get_json()["key"] == rotated["key"]
    assert client.get("/v1/webhooks/secret").status_code == 401


@pytest.mark.parametrize("webhook", [
    "https://127.0.0.1/hook",
    "https://2130706433/hook",
    "https://0x7f.1/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::1]/hook",
    "https://localhost/hook",
    "https://10.0.0.1/hook",
    "https://172.16.0.1/hook",
    "https://192.168.0.1/hook",
    "https://100.64.0.1/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://[fe80::1]/hook",
    "https://224.0.0.1/hook",
    "https://240.0.0.1/hook",
    "https://0.0.0.0/hook",
    "http://93.184.216.34/hook",
    "https://user:secret@93.184.216.34/hook",
])
def test_refused_webhook_urls_are_422_naming_webhook(client, alice, webhook):
    resp = submit(client, alice, webhook)
    assert resp.status_code == 422, resp.get_json()
    assert resp.mimetype == PROBLEM
    assert [e["field"] for e in resp.get_json()["errors"]] == ["webhook"]
    assert client.get("/v1/jobs", headers=alice).get_json()["data"] == []


def test_a_public_https_webhook_is_accepted(client, alice):
    resp = submit(client, alice, "https://93.184.216.34/hook", webhook_events_filter=["start", "completed"])
    assert resp.status_code == 202
    assert resp.get_json()["webhook_events_filter"] == ["start", "completed"]


def test_cancel_enqueues_a_completed_delivery_that_the_log_shows_and_redeliver_repeats(app, client, alice, bob):
    job = submit(client, alice, "https://93.184.216.34/hook").get_json()
    assert client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=alice).get_json() == {"data": [], "next_cursor": None}
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    log = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=alice).get_json()
    [delivery] = log["data"]
    assert (delivery["event"], delivery["status"], delivery["attempts"]) == ("completed", "pending", [])
    assert delivery["url"] == "https://93.184.216.34/hook" and delivery["webhook_id"].startswith("msg_")
    assert delivery["next_attempt_at"].endswith("Z")
    # Still on its way (no sender runs here): a redelivery would only add load.
    early = client.post(f"/v1/jobs/{job['id']}/webhook-deliveries/{delivery['id']}/redeliver", headers=alice)
    assert early.status_code == 409 and early.mimetype == PROBLEM and "still on its way" in early.get_json()["detail"]
    with app.extensions["genq"].session() as session, session.begin():  # its schedule ran out
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery["id"]).values(status="failed"))
    again = client.post(f"/v1/jobs/{job['id']}/webhook-deliveries/{delivery['id']}/redeliver", headers=alice)
    assert again.status_code == 202
    assert again.get_json()["webhook_id"] == delivery["webhook_id"] and again.get_json()["id"] != delivery["id"]
    listed = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries?limit=1", headers=alice).get_json()
    assert [d["id"] for d in listed["data"]] == [again.get_json()["id"]]
    rest = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries?limit=1&cursor={listed['next_cursor']}", headers=alice)
    assert [d["id"] for d in rest.get_json()["data"]] == [delivery["id"]]
    # Another tenant sees no job, no log, and cannot redeliver.
    assert client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=bob).status_code == 404
    other = client.post(f"/v1/jobs/{job['id']}/webhook-deliveries/{delivery['id']}/redeliver", headers=bob)
    assert other.status_code == 404 and other.mimetype == PROBLEM
    missing = client.post(f"/v1/jobs/{job['id']}/webhook-deliveries/{'0' * 32}/redeliver", headers=alice)
    assert missing.status_code == 404


def test_a_job_without_webhook_has_an_empty_log(client, alice):
    job = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}}, headers=alice).get_json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=alice).get_json()["data"] == []
    bad = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries?cursor=nope", headers=alice)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "cursor"
