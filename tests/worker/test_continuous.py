"""Continuous batching through the whole service (Postgres, Redis, S3, a
worker subprocess): a job that arrives while a long one decodes joins it and
finishes first, keeps the tokens it has alone, streams deltas that add up to
its output, and one row can be canceled while its batch-mates run on; with
the engine in the worker's process and in a process of its own."""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.live import live_for
from genq.schema import Job
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS, new_bucket
from tests.helpers import WorkerProcess, make_key, wait_job

# Greedy, so the random demo model runs to max_new_tokens instead of sampling
# its end-of-text token early.
LONG = {"temperature": 0, "max_new_tokens": 250}


@pytest.fixture(scope="module", params=[False, True], ids=["engine-in-worker", "engine-process"])
def settings(request, tmp_path_factory, model_dir, registry_path, pg_url, s3_endpoint):
    # Each test runs with the engine in the worker's process and in a process of its own.
    doc = yaml.safe_load(registry_path.read_text())
    pool = f"cont-{secrets.token_hex(3)}"
    doc["models"] = {"demo-text": {**doc["models"]["demo-text"], "pool": pool, "max_batch_size": 4,
                                   "batching": "continuous"}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    return Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=model_dir, registry_path=reg, database_url=pg_url,
        broker_url=REDIS_URL, progress_interval=0.1, cancel_poll_interval=0.05, lease_seconds=30,
        webhook_secret_keys=WEBHOOK_KEYS, engine_process=request.param, **new_bucket(s3_endpoint),
    )


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings).test_client()


@pytest.fixture
def tenant(settings):
    return make_key(settings, f"t-{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
def worker(settings):
    pool = yaml.safe_load(settings.registry_path.read_text())["models"]["demo-text"]["pool"]
    with WorkerProcess(settings, [pool]) as w:
        yield w


def post(client, tenant, **inp):
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": inp}, headers=tenant)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def generating(client, tenant, job_id, timeout=60):
    """Wait until the job's row is decoding (its progress shows)."""
    deadline = time.monotonic() + timeout
    while not (job := client.get(f"/v1/jobs/{job_id}", headers=tenant).get_json())["progress"]:
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def finished_at(settings, ids) -> dict[str, object]:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        rows = dict(s.execute(select(Job.id, Job.completed_at).where(Job.id.in_(ids))).all())
    engine.dispose()
    return rows


def engine_processes(worker) -> list[int]:
    """The worker's children that are text engine processes (models/engine_process.py)."""
    found = []
    for task in Path(f"/proc/{worker.proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"models.engine_process" in cmdline:
                found.append(int(pid))
    return found


def tenant_of(settings, job_id) -> str:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
    engine.dispose()
    return tenant_id


def test_a_short_job_joins_a_long_one_mid_flight_and_finishes_first(client, tenant, settings, worker):
    short = {"prompt": "A short one", "max_new_tokens": 16, "seed": 3, "temperature": 0.9, "top_k": 20}
    long_ = {"prompt": "The long one", "seed": 1, **LONG}
    alone = [wait_job(client.get, post(client, tenant, **job), tenant) for job in (short, long_)]
    long_id = post(client, tenant, **long_)
    generating(client, tenant, long_id)
    short_id = post(client, tenant, **short)
    joined = [wait_job(client.get, i, tenant) for i in (short_id, long_id)]
    assert [j["status"] for j in joined] == ["succeeded", "succeeded"], joined
    at = finished_at(settings, [short_id, long_id])
    # Rows step together: 16 tokens end long before the long row's remaining ones.
    assert at[short_id] < at[long_id]
    assert joined[0]["metrics"]["batch_size"] == 2
    # And each job's tokens are the ones it has alone.
    assert [j["output"] for j in joined] == [j["output"] for j in alone]
    assert alone[0]["metrics"]["batch_size"] == 1
    # Where the rows decoded: the worker's own process, or one child of it.
    assert len(engine_processes(worker)) == (1 if settings.engine_process else 0)


def test_output_deltas_add_up_to_the_output(client, tenant, settings, worker):
    job_id = post(client, tenant, prompt="Streaming", max_new_tokens=120, seed=11, temperature=0.8)
    job = wait_job(client.get, job_id, tenant)
    assert job["status"] == "succeeded"
    deltas = live_for(settings).read(tenant_of(settings, job_id), job_id, -1, 0)
    assert [i for i, _ in deltas] == list(range(len(deltas)))
    assert "".join(d for _, d in deltas) == job["output"]["text"]
    # Coalesced: at most one delta per PUBLISH_EVERY of the run, plus the last.
    assert len(deltas) <= job["metrics"]["run_seconds"] / 0.05 + 2


def test_cancel_one_row_while_its_batch_mates_run_on(client, tenant, worker):
    ids = [post(client, tenant, prompt=f"row {i}", seed=i, **LONG) for i in range(3)]
    victim = ids[1]
    generating(client, tenant, victim)
    assert client.post(f"/v1/jobs/{victim}/cancel", headers=tenant).get_json()["cancel_requested"] is True
    done = wait_job(client.get, victim, tenant)
    assert done["status"] == "canceled", done
    assert done["progress"]["current"] < 250
    mates = [wait_job(client.get, i, tenant) for i in ids if i != victim]
    assert [m["status"] for m in mates] == ["succeeded"] * 2
    assert all(m["output"]["tokens"] == 250 for m in mates)
