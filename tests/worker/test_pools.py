"""Pools as operators run them, through the whole service (Postgres, Redis,
worker subprocesses): routing by model, pause and resume, drain, retry,
admin-only routes, and /metrics that parse and count the jobs run."""
from __future__ import annotations

import secrets
import time

import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import Job, JobEvent
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import WorkerProcess, free_port, make_key, wait_job

TEXT = {"prompt": "pools", "max_new_tokens": 4, "seed": 1}
IMAGE = {"prompt": "a square", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 1}



@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_dir, registry_path, pg_url):
    """Two pools of this module's own, one model each."""
    doc = yaml.safe_load(registry_path.read_text())
    tag = secrets.token_hex(3)
    doc["models"] = {"demo-text": {**doc["models"]["demo-text"], "pool": f"text-{tag}", "max_wait_ms": 0},
                     "demo-image": {**doc["models"]["demo-image"], "pool": f"image-{tag}", "max_wait_ms": 0}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    home = tmp_path_factory.mktemp("home")
    return Settings.from_env({}, home=home, model_dir=model_dir, registry_path=reg, database_url=pg_url,
                             broker_url=REDIS_URL, storage_url=(home / "storage").as_uri(), lease_seconds=30,
                             heartbeat_interval=0.5, reconcile_interval=30.0, webhook_secret_keys=WEBHOOK_KEYS)


def pools(settings) -> dict[str, str]:
    return {name: m["pool"] for name, m in yaml.safe_load(settings.registry_path.read_text())["models"].items()}


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings).test_client()


@pytest.fixture(scope="module")
def admin(settings):
    return make_key(settings, f"ops-{secrets.token_hex(3)}", "admin")


@pytest.fixture
def tenant(settings):
    return make_key(settings, f"t-{secrets.token_hex(4)}")


def post(client, tenant, model, inp):
    resp = client.post("/v1/jobs", json={"model": model, "input": inp}, headers=tenant)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def status(client, job_id, tenant) -> str:
    return client.get(f"/v1/jobs/{job_id}", headers=tenant).get_json()["status"]


def starts(settings, job_id) -> list[str]:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        out = [d["worker"] for d in s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id,
                                                                            JobEvent.type == "start"))]
    engine.dispose()
    return out


def worker_named(client, admin, pool, timeout=10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [w for w in client.get("/v1/admin/workers", headers=admin).get_json()["data"]
                if w["alive"] and w["pools"] == [pool] and not w["draining"]]
        if live:
            return live[-1]["name"]
        time.sleep(0.2)
    raise AssertionError(f"no live worker reported for pool {pool}")


def test_each_model_lands_on_its_pools_queue_and_only_that_pools_worker_runs_it(client, tenant, settings):
    p = pools(settings)
    with WorkerProcess(settings, [p["demo-text"]]) as text_worker:
        text_id = post(client, tenant, "demo-text", TEXT)
        image_id = post(client, tenant, "demo-image", IMAGE)
        assert wait_job(client.get, text_id, tenant)["status"] == "succeeded"
        time.sleep(1)
        # The image doorbell waits in its own pool's Redis list; the text worker never took it.
        assert status(client, image_id, tenant) == "queued"
        assert redis.Redis.from_url(REDIS_URL).llen(p["demo-image"]) >= 1
        text_log = text_worker.log()
    with WorkerProcess(settings, [p["demo-image"]]):
        assert wait_job(client.get, image_id, tenant, timeout=120)["status"] == "succeeded"
    assert [w.split(".")[0] for w in starts(settings, text_id)] == [p["demo-text"]]
    assert [w.split(".")[0] for w in starts(settings, image_id)] == [p["demo-image"]]
    assert image_id not in text_log


def test_a_paused_pool_accepts_jobs_but_starts_none_until_resumed(client, tenant, admin, settings):
    pool = pools(settings)["demo-text"]
    with WorkerProcess(settings, [pool]):
        paused = client.post(f"/v1/admin/pools/{pool}/pause", headers=admin)
        assert paused.status_code == 200 and paused.get_json()["paused"] is True
        job_id = post(client, tenant, "demo-text", TEXT)
        time.sleep(2)
        assert status(client, job_id, tenant) == "queued"
        row = next(p for p in client.get("/v1/admin/pools", headers=admin).get_json()["data"] if p["name"] == pool)
        assert row["paused"] and row["queued"] >= 1 and row["oldest_queued_seconds"] >= 1.5
        assert row["workers"] == 1 and row["models"] == ["demo-text"]
        resumed = client.post(f"/v1/admin/pools/{pool}/resume", headers=admin).get_json()
        assert resumed["paused"] is False and resumed["paused_at"] is None
        assert wait_job(client.get, job_id, tenant)["status"] == "succeeded"


def test_a_drained_worker_claims_nothing_and_another_takes_its_work(client, tenant, admin, settings):
    pool = pools(settings)["demo-text"]
    with WorkerProcess(settings, [pool]) as first:
        name = worker_named(client, admin, pool)
        drained = client.post(f"/v1/admin/workers/{name}/drain", headers=admin)
        assert drained.status_code == 200 and drained.get_json()["draining"] is True
        job_id = post(client, tenant, "demo-text", TEXT)
        time.sleep(2.5)
        assert status(client, job_id, tenant) == "queued"
        assert first.proc.poll() is None  # drained, not stopped: the operator stops it
        with WorkerProcess(settings, [pool]):
            assert wait_job(client.get, job_id, tenant, timeout=60)["status"] == "succeeded"
    assert [w.split(":")[0] for w in starts(settings, job_id)] != [name]
    assert client.post("/v1/admin/workers/no-such-worker/drain", headers=admin).status_code == 404


def test_retry_queues_a_failed_job_again_and_only_a_failed_one(client, tenant, admin, settings):
    pool = pools(settings)["demo-text"]
    job_id = post(client, tenant, "demo-text", TEXT)
    assert client.post(f"/v1/admin/jobs/{job_id}/retry", headers=admin).status_code == 409
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as s:
        # As the reconciler leaves a job whose worker kept dying.
        s.execute(update(Job).where(Job.id == job_id).values(status="failed", attempts=3,
                                                              error={"code": "attempts_exhausted", "message": "x"}))
    engine.dispose()
    again = client.post(f"/v1/admin/jobs/{job_id}/retry", headers=admin)
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["status"] == "queued" and again.get_json()["attempts"] == 0
    with WorkerProcess(settings, [pool]):
        done = wait_job(client.get, job_id, tenant)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert client.post(f"/v1/admin/jobs/{'0' * 32}/retry", headers=admin).status_code == 404


@pytest.mark.parametrize("method, path", [
    ("get", "/v1/admin/pools"), ("get", "/v1/admin/workers"), ("post", "/v1/admin/pools/{pool}/pause"),
    ("post", "/v1/admin/pools/{pool}/resume"), ("post", "/v1/admin/workers/w/drain"),
    ("post", f"/v1/admin/jobs/{'0' * 32}/retry"),
])
def test_admin_routes_refuse_user_keys(client, tenant, settings, method, path):
    resp = getattr(client, method)(path.format(pool=pools(settings)["demo-text"]), headers=tenant)
    assert resp.status_code == 403 and resp.mimetype == "application/problem+json"
    assert getattr(client, method)(path.format(pool="x")).status_code == 401


def test_metrics_parse_and_count_the_jobs_run(client, tenant, settings):
    pool = pools(settings)["demo-text"]
    port = free_port()
    with WorkerProcess(settings, [pool], extra_env={"GENQ_METRICS_PORT": str(port)}):
        ids = [post(client, tenant, "demo-text", {**TEXT, "seed": i}) for i in range(5)]
        assert [wait_job(client.get, i, tenant)["status"] for i in ids] == ["succeeded"] * 5
        worker = {f.name: f for f in text_string_to_metric_families(requests.get(f"http://127.0.0.1:{port}/metrics").text)}
    ran = sum(s.value for s in worker["genq_worker_jobs"].samples
              if s.name == "genq_worker_jobs_total" and s.labels == {"model": "demo-text", "pool": pool, "status": "succeeded"})
    assert ran == 5
    queue = [s for s in worker["genq_job_queue_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in queue) == 5
    assert any(s.value >= 1 for s in worker["genq_batch_size"].samples if s.name.endswith("_count"))
    assert any(s.labels["result"] == "miss" for s in worker["genq_model_cache_lookups"].samples)
    api = client.get("/metrics")
    assert api.status_code == 200 and api.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(api.get_data(as_text=True))}
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        succeeded = len(s.scalars(select(Job.id).where(Job.pool == pool, Job.status == "succeeded")).all())
    engine.dispose()
    by_state = {s.labels["state"]: s.value for s in families["genq_jobs"].samples if s.labels["pool"] == pool}
    assert by_state["succeeded"] == succeeded >= 5
    assert {s.labels["pool"] for s in families["genq_queue_depth"].samples} >= set(pools(settings).values())
