"""Static batching through the whole service (Postgres, Redis, S3, worker
subprocesses): batches form, jobs keep their own results inside them, progress
shows, cancel reaches one row of a running batch, and two workers never share
a job. Continuous batching (the text default) is tests/worker/test_continuous.py."""
from __future__ import annotations

import secrets
import time

import pytest
import yaml
from sqlalchemy import func, select

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import JobEvent
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS, new_bucket
from tests.helpers import WorkerProcess, make_key, wait_job

# Greedy, so the random demo model runs to max_new_tokens instead of sampling
# its end-of-text token early: batch-mates then run for a known length.
LONG = {"temperature": 0, "max_new_tokens": 250}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_dir, registry_path, pg_url, s3_endpoint):
    """A registry of this module's own: one text pool whose batches wait long
    enough (400 ms) for a test's quick submissions to land in one batch."""
    doc = yaml.safe_load(registry_path.read_text())
    pool = f"batch-{secrets.token_hex(3)}"
    doc["models"] = {"demo-text": {**doc["models"]["demo-text"], "pool": pool, "max_batch_size": 4, "max_wait_ms": 400,
                                   "batching": "static"}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    return Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=model_dir, registry_path=reg, database_url=pg_url,
        broker_url=REDIS_URL, progress_interval=0.1, cancel_poll_interval=0.05, lease_seconds=30,
        webhook_secret_keys=WEBHOOK_KEYS, **new_bucket(s3_endpoint),
    )


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings).test_client()


@pytest.fixture
def tenant(settings):
    return make_key(settings, f"t-{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
def worker(settings):
    with WorkerProcess(settings, [pool_of(settings)]) as w:
        yield w


def pool_of(settings) -> str:
    return yaml.safe_load(settings.registry_path.read_text())["models"]["demo-text"]["pool"]


def post(client, tenant, **inp):
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": inp}, headers=tenant)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def test_a_job_gives_the_same_text_alone_and_in_a_mixed_batch(client, tenant, worker):
    job = {"prompt": "The lighthouse keeper", "max_new_tokens": 24, "seed": 99, "temperature": 0.8, "top_k": 40}
    alone = wait_job(client.get, post(client, tenant, **job), tenant)
    assert alone["metrics"]["batch_size"] == 1
    # Submitted with the worker held: three posts can take longer than the
    # batch's 400 ms wait on a loaded machine, and then two of them would batch.
    with worker.held():
        ids = [post(client, tenant, prompt="A much longer prompt about something else entirely", max_new_tokens=40,
                    seed=1),
               post(client, tenant, **job),
               post(client, tenant, prompt="x", max_new_tokens=8, temperature=1.3, top_p=0.5, seed=5)]
    batch = [wait_job(client.get, i, tenant) for i in ids]
    assert [j["status"] for j in batch] == ["succeeded"] * 3
    assert batch[1]["metrics"]["batch_size"] == 3, [j["metrics"] for j in batch]
    assert batch[1]["output"] == alone["output"]


def test_progress_rises_while_a_job_runs(client, tenant, worker):
    job_id = post(client, tenant, prompt="progress", **LONG)
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant).get_json()
        if job["status"] == "running" and job["progress"]:
            seen.append(job["progress"]["current"])
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.05)
    assert job["status"] == "succeeded"
    # How many reports a poller catches depends on how fast the model runs
    # (250 tokens take about 0.3 s on this CPU, three progress intervals): the
    # invariants are that one was caught part way, and none goes backwards.
    assert any(0 < c < 250 for c in seen), seen
    assert seen == sorted(seen), "progress never goes backwards"
    assert job["progress"] == {"current": 250, "total": 250, "unit": "token"}
    events = client.get(f"/v1/jobs/{job_id}/events", headers=tenant).get_json()["data"]
    currents = [e["data"]["current"] for e in events if e["type"] == "progress"]
    # Each report is written once, and only when the count moved.
    assert currents and currents == sorted(set(currents)) and currents[0] < 250, currents


def test_cancel_one_running_job_in_a_batch_of_four(client, tenant, worker):
    ids = [post(client, tenant, prompt=f"row {i}", seed=i, **LONG) for i in range(4)]
    victim = ids[2]
    deadline = time.monotonic() + 30
    # Cancel once the row is generating (progress shows), not merely claimed.
    while not client.get(f"/v1/jobs/{victim}", headers=tenant).get_json()["progress"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    canceled_at = time.monotonic()
    resp = client.post(f"/v1/jobs/{victim}/cancel", headers=tenant).get_json()
    assert resp["cancel_requested"] is True
    done = wait_job(client.get, victim, tenant)
    stop_latency = time.monotonic() - canceled_at
    assert done["status"] == "canceled", done
    assert done["progress"]["current"] < 250
    mates = [wait_job(client.get, i, tenant) for i in ids if i != victim]
    assert [m["status"] for m in mates] == ["succeeded"] * 3
    assert all(m["metrics"]["batch_size"] == 4 for m in mates), [m["metrics"] for m in mates]
    assert all(m["output"]["tokens"] == 250 for m in mates)
    print(f"\ncancel -> canceled for a running row: {stop_latency:.3f}s; batch-mates ran to 250 tokens")


def test_two_workers_on_one_pool_run_each_of_40_jobs_once(client, tenant, settings, worker):
    with WorkerProcess(settings, [pool_of(settings)]) as second:
        ids = [post(client, tenant, prompt=f"job {i}", max_new_tokens=16, seed=i) for i in range(40)]
        jobs = [wait_job(client.get, i, tenant, timeout=120) for i in ids]
        log_second = second.log()
    assert [j["status"] for j in jobs] == ["succeeded"] * 40
    assert all(j["attempts"] == 1 for j in jobs)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        starts = dict(s.execute(select(JobEvent.job_id, func.count()).where(JobEvent.job_id.in_(ids), JobEvent.type == "start")
                                .group_by(JobEvent.job_id)).all())
        owners = [row[0]["worker"] for row in s.execute(select(JobEvent.data).where(JobEvent.job_id.in_(ids), JobEvent.type == "start"))]
    engine.dispose()
    assert starts == {i: 1 for i in ids}
    by_worker = {w: owners.count(w) for w in set(owners)}
    assert len(by_worker) == 2, (by_worker, log_second)
    print(f"\n40 jobs over two workers: {sorted(by_worker.values())}; batch sizes {sorted({j['metrics']['batch_size'] for j in jobs})}")
