"""Dependencies that fail under a running service: Redis restarted with no
persistence, the API killed between commit and publish, Postgres unreachable
while clients submit."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import redis
import requests
from sqlalchemy import select
from sqlalchemy.engine import make_url

from genq.db import make_engine, make_sessionmaker
from genq.schema import Job
from tests.faults.harness import Figures, TcpProxy, free_port, statuses, wait_for


def by_status(stack, ids) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses(stack.settings, ids).values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def test_redis_restarted_without_persistence_loses_no_job(stack):
    stack.worker()
    stack.worker()
    # Both workers busy with one model; the other model's jobs wait on doorbells in Redis.
    running = [stack.submit(prompt=f"running {i}", steps=10, step_seconds=0.2) for i in range(8)]
    wait_for(lambda: by_status(stack, running).get("running") == 8, 30, "two batches running")
    queued = [stack.submit(prompt=f"queued {i}", model=stack.other_model) for i in range(16)]
    doorbells = stack.redis.messages()
    assert doorbells >= 16
    stack.redis.kill()
    killed = time.monotonic()
    # Accepted while the broker is down: recorded, the doorbell left to the reconciler.
    during = [stack.submit(prompt=f"during {i}", model=stack.other_model) for i in range(4)]
    time.sleep(1)
    stack.redis.start()  # the same port, empty: every queued message is gone
    # Restored from nothing (no persistence). Not "no messages": the workers and
    # the reconciler reconnect at once and may already have rung a doorbell.
    info = redis.Redis(port=stack.redis.port).info("persistence")
    assert info["rdb_last_load_keys_loaded"] == 0 and info.get("aof_enabled", 0) == 0
    ids = running + queued + during
    done = stack.wait(ids, 90)
    figures = stack.check(ids, Figures("Redis restarted (no persistence) with jobs queued and running",
                                       recovery_seconds=done - killed,
                                       notes={"at the restart": f"8 running, 16 queued, {doorbells} doorbells lost, "
                                                                f"4 accepted while Redis was down"}))
    assert figures.succeeded == 28 and figures.rerun == 0


def test_the_api_dies_between_commit_and_publish_and_the_job_still_runs(stack):
    stack.worker()
    port = free_port()
    env = {**os.environ, **stack.settings.as_env(), "PYTHONUNBUFFERED": "1"}
    api = subprocess.Popen([sys.executable, "-m", "tests.faults.api_dies_before_publish", str(port)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert api.stdout.readline().strip() == "listening"
        headers = {**stack.tenant, "Idempotency-Key": "after-the-crash"}
        # The doorbell is sent after the answer, by the process's doorbell
        # thread (api/doorbell.py): the answer may or may not have left first.
        try:
            answer = requests.post(f"http://127.0.0.1:{port}/v1/jobs", json=stack.body(prompt="orphan", steps=2,
                                                                                        step_seconds=0.1),
                                   headers=headers, timeout=30)
            assert answer.status_code == 202
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            pass  # it died before, or while, the answer went out
        died = time.monotonic()
        assert api.wait(10) == 137
    finally:
        api.kill()
    # The row was committed; no doorbell was ever published for it.
    engine = make_engine(stack.settings.database_url)
    with make_sessionmaker(engine)() as session:
        [job_id] = session.scalars(select(Job.id).where(Job.model == stack.model))
    engine.dispose()
    # The client, never having heard back, retries with the same key (to a
    # restarted API) and gets the job the dead one recorded.
    retry = stack.app.test_client().post("/v1/jobs", json=stack.body(prompt="orphan", steps=2, step_seconds=0.1),
                                         headers=headers)
    assert retry.status_code in (200, 202) and retry.get_json()["id"] == job_id
    assert retry.headers["Idempotent-Replayed"] == "true"
    done = stack.wait([job_id], 30)
    stack.check([job_id], Figures("API killed between commit and publish", recovery_seconds=done - died,
                                  notes={"client retry": "same key, same job"}))


def test_postgres_unreachable_during_submissions_gives_only_503s_or_finished_jobs(stack_factory, pg_url):
    """Clients submit without pause while Postgres is cut off for 3 s. How
    many submissions fall in the outage depends on the machine's speed, so
    nothing here counts them: every answer must be a 202 (or a replay) or a
    503 problem, and every submission, retried with its key until accepted,
    must be exactly one job that finishes."""
    proxy = TcpProxy(make_url(pg_url).port or 5432).start()
    # Every process reaches Postgres through the proxy. The lease (8 s) outlasts
    # the outage (3 s), so running jobs are not given up.
    stack = stack_factory(database_url=make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False),
                          lease_seconds=8)
    stack.worker()
    answers: list[tuple[str, int, str, dict]] = []
    accepted: dict[str, str] = {}  # Idempotency-Key -> the job it made
    failures: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def submit(client, key: str):
        resp = client.post("/v1/jobs", json=stack.body(prompt=key, steps=3, step_seconds=0.1),
                           headers={**stack.tenant, "Idempotency-Key": key})
        with lock:
            answers.append((key, resp.status_code, resp.mimetype, dict(resp.headers)))
            if resp.status_code in (200, 202):
                accepted[key] = resp.get_json()["id"]
        return resp

    def until_accepted(client, key: str) -> None:
        # A client in a hurry: retries a 503 with the same key after 0.2 s (a
        # real one would honour Retry-After). Anything else ends the retries;
        # the assertions below name it.
        deadline = time.monotonic() + 120
        while submit(client, key).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)

    def client_loop(name: str) -> None:
        try:
            client = stack.app.test_client()
            i = 0
            while not stop.is_set():
                until_accepted(client, f"{name}-{i}")
                i += 1
                time.sleep(0.05)
        except BaseException as exc:  # a failure in a thread must fail the test, not vanish
            failures.append(exc)

    clients = [threading.Thread(target=client_loop, args=(f"c{c}",)) for c in range(2)]
    for t in clients:
        t.start()
    wait_for(lambda: len(accepted) >= 6, 60, "some jobs accepted before the outage")
    proxy.cut()
    cut = time.monotonic()
    # Asked here rather than left to the clients' timing: the outage is felt.
    probe = stack.app.test_client()
    during = submit(probe, "probe")
    ready = probe.get("/readyz")
    time.sleep(3)
    proxy.restore()
    restored = time.monotonic()
    until_accepted(probe, "probe")
    # The clients go on until a few more of their submissions are in after the outage.
    before = len(accepted)
    wait_for(lambda: len(accepted) >= before + 4, 60, "submissions accepted after the outage")
    stop.set()
    for t in clients:
        t.join(150)
    assert not failures, failures
    assert not any(t.is_alive() for t in clients)
    assert during.status_code == 503
    assert ready.status_code == 503 and ready.get_json()["checks"]["database"].startswith("down")
    codes = [code for _, code, _, _ in answers]
    assert set(codes) <= {200, 202, 503}, codes
    assert all(m == "application/problem+json" and int(h["Retry-After"]) > 0
               for _, code, m, h in answers if code == 503)
    # Every submission was accepted, as exactly one job, whatever it heard on the way.
    keys = {key for key, _, _, _ in answers}
    assert set(accepted) == keys
    engine = make_engine(stack.settings.database_url)
    with make_sessionmaker(engine)() as session:
        recorded = set(session.scalars(select(Job.id).where(Job.model == stack.model)))
    engine.dispose()
    assert recorded == set(accepted.values()) and len(recorded) == len(keys)
    ids = sorted(recorded)
    done = stack.wait(ids, 90)
    figures = stack.check(ids, Figures("Postgres unreachable for 3 s during submissions",
                                       recovery_seconds=done - restored,
                                       notes={"answers": f"{codes.count(202)} x 202, {codes.count(200)} x 200, "
                                                         f"{codes.count(503)} x 503, 0 x 500",
                                              "outage": f"{restored - cut:.1f}s"}))
    assert figures.succeeded == len(keys)
