"""A submit's doorbell is sent by the API process's doorbell thread after the
answer (api/doorbell.py): the answer never waits for the broker, the doorbell
still goes out, and a broker that fails stops neither submits nor the thread."""
from __future__ import annotations

import secrets
import threading

from api.app import create_app
from tests.helpers import make_key

TEXT_JOB = {"model": "demo-text", "input": {"prompt": "hi", "max_new_tokens": 4}}


class Broker:
    """A Celery stand-in: records each doorbell; holds each send until let go."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str]] = []
        self.go = threading.Event()
        self.fail = fail

    def send_task(self, name, args, queue, **kwargs):
        self.go.wait(30)
        if self.fail:
            raise ConnectionError("the broker is down")
        self.sent.append((args[0], queue))


def test_the_answer_does_not_wait_for_the_doorbell_and_the_doorbell_follows(embedded_settings):
    broker = Broker()
    app = create_app(embedded_settings, celery=broker)
    client = app.test_client()
    headers = make_key(embedded_settings, f"bell-{secrets.token_hex(3)}")
    # The broker holds every send: the answers come all the same.
    ids = [client.post("/v1/jobs", json=TEXT_JOB, headers=headers) for _ in range(3)]
    assert [r.status_code for r in ids] == [202] * 3 and broker.sent == []
    broker.go.set()
    assert app.extensions["genq"].doorbells.flush(30)
    pool = app.extensions["genq"].registry.get("demo-text").pool
    assert broker.sent == [(r.get_json()["id"], pool) for r in ids]


def test_a_broker_that_fails_stops_neither_submits_nor_the_doorbells(embedded_settings):
    broker = Broker(fail=True)
    broker.go.set()
    app = create_app(embedded_settings, celery=broker)
    client = app.test_client()
    headers = make_key(embedded_settings, f"bell-{secrets.token_hex(3)}")
    assert client.post("/v1/jobs", json=TEXT_JOB, headers=headers).status_code == 202
    doorbells = app.extensions["genq"].doorbells
    assert doorbells.flush(30)
    broker.fail = False
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=headers).get_json()["id"]
    assert doorbells.flush(30) and [j for j, _ in broker.sent] == [job_id]
    # The job the failed doorbell was for is queued, for the reconciler to ring.
    assert client.get("/v1/jobs?status=queued", headers=headers).get_json()["data"][1]["status"] == "queued"
