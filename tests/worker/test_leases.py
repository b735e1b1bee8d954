"""A running batch and its leases, with the runner in this process on Postgres
(reached through a proxy that can be cut): a lease taken away stops the job and
writes nothing; a database out of reach stops the batch before its leases
lapse; a short outage of the database or of S3 at the end is waited out and
the result kept."""
from __future__ import annotations

import secrets
import threading
import time

import pytest
import yaml
from sqlalchemy import update
from sqlalchemy.engine import make_url

from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import get_or_create_tenant
from genq.schema import Job
from genq.settings import Settings
from models.registry import Registry
from tests.faults.harness import TcpProxy, wait_for
from worker import executions
from worker.build import build_runner


@pytest.fixture
def proxy(pg_url):
    p = TcpProxy(make_url(pg_url).port or 5432).start()
    yield p
    p.cut()


@pytest.fixture
def make_settings(tmp_path, pg_url, proxy):
    def make(**changes) -> Settings:
        model, pool = f"lease-{secrets.token_hex(3)}", f"leases-{secrets.token_hex(3)}"
        registry = tmp_path / f"{model}.yaml"
        registry.write_text(yaml.safe_dump({"models": {model: {"family": "tests.faults.family", "checkpoint": "none",
                                                               "pool": pool}}}))
        through_proxy = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
        values = dict(home=tmp_path / "home", registry_path=registry, database_url=through_proxy, device="cpu",
                      storage_url=(tmp_path / "storage").as_uri(), execution_log=tmp_path / f"{model}.jsonl",
                      progress_interval=0.05, cancel_poll_interval=0.05, lease_seconds=2)
        return Settings.from_env({}, **{**values, **changes})

    return make


@pytest.fixture
def direct(pg_url):
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def submit(direct, settings: Settings, steps: int, step_seconds: float) -> str:
    [spec] = Registry.load(settings.registry_path)
    with direct.begin() as session:
        tenant = get_or_create_tenant(session, f"leases-{secrets.token_hex(3)}")
        job = joblib.submit(session, tenant_id=tenant.id, type_=spec.family, model=spec.name, pool=spec.pool,
                            batch_key=spec.batch_key(spec.validate({"prompt": "x"})),
                            input_={"prompt": "lease", "steps": steps, "step_seconds": step_seconds})
        return job.id


def run_in_thread(runner, job_id: str) -> threading.Thread:
    """The doorbell's task, as Celery runs it; an error it raises (the next
    claim while the database is still away) is kept, as Celery would log it."""
    thread = threading.Thread(target=lambda: _keep_error(thread, runner.on_doorbell, job_id), daemon=True)
    thread.error = None
    thread.start()
    return thread


def _keep_error(thread, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:
        thread.error = exc


def job(direct, job_id: str) -> Job:
    with direct() as session:
        return session.get(Job, job_id)


def ended(settings: Settings, job_id: str) -> dict:
    [end] = [r for r in executions.read(settings.execution_log) if r["job"] == job_id and r["event"] == "end"]
    return end


def test_a_lease_taken_away_stops_the_job_and_writes_nothing(make_settings, direct):
    settings = make_settings()
    job_id = submit(direct, settings, steps=60, step_seconds=0.05)  # 3 s if left alone
    started = time.time()
    thread = run_in_thread(build_runner(settings), job_id)
    wait_for(lambda: job(direct, job_id).status == "running", 10, "the job running")
    with direct.begin() as session:  # as a reconciler that thought this worker dead, and another worker's claim
        session.execute(update(Job).where(Job.id == job_id).values(lease_owner="another-worker"))
    thread.join(10)
    j = job(direct, job_id)
    assert (j.status, j.lease_owner, j.output) == ("running", "another-worker", None)
    end = ended(settings, job_id)
    # Stopped at the model's next step after the next renewal (every lease/3), long before the 3 s it would take.
    assert end["outcome"] == "lease_lost" and end["at"] - started < 2


def test_cut_off_from_the_database_the_batch_stops_before_its_lease_lapses(make_settings, direct, proxy):
    settings = make_settings()
    job_id = submit(direct, settings, steps=100, step_seconds=0.05)  # 5 s if left alone
    thread = run_in_thread(build_runner(settings), job_id)
    wait_for(lambda: job(direct, job_id).status == "running", 10, "the job running")
    time.sleep(0.3)
    proxy.cut()
    thread.join(10)
    assert thread.error is None or "Connection refused" in str(thread.error)
    lease_until = job(direct, job_id).lease_until.timestamp()
    end = ended(settings, job_id)
    assert end["outcome"] == "lease_lost"
    # No longer running here when the lease ran out, so another worker taking it
    # then never runs it beside this one.
    assert end["at"] < lease_until, (end["at"], lease_until)
    pool = job(direct, job_id).pool
    wait_for(lambda: time.time() > lease_until, 5, "the lease to lapse")
    with direct.begin() as session:
        assert joblib.requeue_expired(session, [pool]) == [(job_id, pool)]


def test_a_short_outage_at_the_finish_is_waited_out(make_settings, direct, proxy):
    settings = make_settings(lease_seconds=4)
    job_id = submit(direct, settings, steps=20, step_seconds=0.05)  # 1 s
    thread = run_in_thread(build_runner(settings), job_id)
    wait_for(lambda: job(direct, job_id).status == "running", 10, "the job running")
    time.sleep(0.6)
    proxy.cut()  # the job ends while the database is out of reach
    time.sleep(1.5)
    proxy.restore()
    thread.join(15)
    assert thread.error is None
    j = job(direct, job_id)
    assert (j.status, j.attempts) == ("succeeded", 1)
    assert j.output["text"] == "lease after 20 steps"
    assert ended(settings, job_id)["outcome"] == "succeeded"


def test_a_storage_outage_at_the_store_is_waited_out(make_settings, direct, s3_settings, caplog):
    from urllib.parse import urlparse

    endpoint = urlparse(s3_settings["s3_endpoint_url"])
    s3 = TcpProxy(endpoint.port, endpoint.hostname).start()
    settings = make_settings(lease_seconds=6, **{**s3_settings, "s3_endpoint_url": f"http://127.0.0.1:{s3.port}"})
    job_id = submit(direct, settings, steps=20, step_seconds=0.05)  # 1 s
    s3.cut()  # down before the job ends, up again a moment after
    thread = run_in_thread(build_runner(settings), job_id)
    wait_for(lambda: job(direct, job_id).status == "running", 10, "the job running")
    time.sleep(2)
    s3.restore()
    thread.join(15)
    s3.cut()
    assert thread.error is None
    j = job(direct, job_id)
    assert (j.status, j.attempts) == ("succeeded", 1), j.error
    assert j.output["artifact"]["key"] == f"jobs/{job_id}/out.txt"
    assert f"storing the outputs of job {job_id}: the storage is unreachable" in caplog.text


def test_an_outage_right_after_the_claim_does_not_fail_the_batch(make_settings, direct, proxy):
    """The database goes away between the claim and the model's start (where the
    runner reads cancel requests once): the batch runs, and is written when it is back."""
    settings = make_settings(lease_seconds=4)
    job_id = submit(direct, settings, steps=10, step_seconds=0.05)
    runner = build_runner(settings)
    claim = runner.claim

    def claim_then_cut(*args, **kwargs):
        batch = claim(*args, **kwargs)
        if batch:
            proxy.cut()
            threading.Timer(1.0, proxy.restore).start()
        return batch

    runner.claim = claim_then_cut
    thread = run_in_thread(runner, job_id)
    thread.join(15)
    j = job(direct, job_id)
    assert (j.status, j.error, j.attempts) == ("succeeded", None, 1)
    assert ended(settings, job_id)["outcome"] == "succeeded"


def test_an_outage_while_a_batch_waits_for_company_runs_the_jobs_in_hand(make_settings, direct, proxy, monkeypatch):
    """The first claim took a job; the database goes away while the worker waits
    up to max_wait_ms for more: it runs the job it holds instead of stranding it
    until its lease lapses."""
    settings = make_settings(lease_seconds=4)
    spec = yaml.safe_load(settings.registry_path.read_text())
    [entry] = spec["models"].values()
    entry.update(max_batch_size=4, max_wait_ms=3000)
    settings.registry_path.write_text(yaml.safe_dump(spec))
    job_id = submit(direct, settings, steps=10, step_seconds=0.05)
    claim_batch = joblib.claim_batch

    def claim_then_cut(session, **kwargs):
        claimed = claim_batch(session, **kwargs)
        if claimed and not kwargs.get("top_up"):
            session.commit()  # the claim lands; then the connection goes
            proxy.cut()
            threading.Timer(1.5, proxy.restore).start()
        return claimed

    monkeypatch.setattr(joblib, "claim_batch", claim_then_cut)  # the runner's claims, on the real database
    started = time.monotonic()
    thread = run_in_thread(build_runner(settings), job_id)
    thread.join(15)
    j = job(direct, job_id)
    assert (j.status, j.attempts, j.metrics["batch_size"]) == ("succeeded", 1, 1)
    # Not after the 4 s lease and a requeue: once the database was back.
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_cold_shutdown_landing_before_the_model_starts_hands_the_batch_back(make_settings, direct, monkeypatch,
                                                                               batching):
    """Celery's cold shutdown raises from its signal handler wherever the main
    thread is; there, between the claim and the forward pass, the batch is
    handed back (queued, attempt uncounted), not left running until its lease lapses."""
    from worker import continuous
    from worker import runner as runner_module

    settings = make_settings()
    spec = yaml.safe_load(settings.registry_path.read_text())
    [entry] = spec["models"].values()
    entry["batching"] = batching
    settings.registry_path.write_text(yaml.safe_dump(spec))
    job_id = submit(direct, settings, steps=10, step_seconds=0.05)
    runner = build_runner(settings)

    def signal_lands_here(*args, **kwargs):
        runner.shutdown.begin()
        raise NotImplementedError("<class 'celery.concurrency.solo.TaskPool'> does not implement kill_job")

    if batching == "static":
        monkeypatch.setattr(runner_module, "BatchTracker", signal_lands_here)
    else:
        # Claimed and started, its prefill not yet run.
        monkeypatch.setattr(continuous.ContinuousBatch, "join", signal_lands_here)
    runner.on_doorbell(job_id)
    j = job(direct, job_id)
    assert (j.status, j.attempts, j.lease_owner) == ("queued", 0, None)


def unreachable_s3(make_settings, s3_settings, **changes):
    """Settings whose S3 endpoint is a proxy in front of moto's server, cut:
    storage as a worker sees it when S3 is down."""
    from urllib.parse import urlparse

    endpoint = urlparse(s3_settings["s3_endpoint_url"])
    s3 = TcpProxy(endpoint.port, endpoint.hostname).start()
    s3.cut()
    settings = make_settings(**{**s3_settings, "s3_endpoint_url": f"http://127.0.0.1:{s3.port}", **changes})
    spec = yaml.safe_load(settings.registry_path.read_text())
    [entry] = spec["models"].values()
    entry.update(max_batch_size=4)
    settings.registry_path.write_text(yaml.safe_dump(spec))
    return settings, s3


def test_storage_down_past_half_a_lease_hands_the_job_back_and_the_retry_runs_alone(make_settings, direct,
                                                                                     s3_settings):
    """The job did nothing wrong: it goes back to the queue (the attempt
    counted, so a storage down for good still ends it) and another worker is
    rung. Run again, on its second attempt, it runs alone."""
    settings, s3 = unreachable_s3(make_settings, s3_settings, lease_seconds=4)
    job_id = submit(direct, settings, steps=2, step_seconds=0.05)
    rung = []
    runner = build_runner(settings, ring=lambda job_id, pool: rung.append((job_id, pool)))
    try:
        assert runner.on_doorbell(job_id) == 1
        j = job(direct, job_id)
        assert (j.status, j.attempts, j.lease_owner, j.error) == ("queued", 1, None, None)
        assert rung == [(job_id, j.pool)]
        assert ended(settings, job_id)["outcome"] == "handed_back"
        with direct() as session:
            assert joblib.events(session, job_id)[-1].data["message"] == \
                "its outputs could not be stored; queued again, the attempt counted"
        s3.restore()
        mates = [submit(direct, settings, steps=2, step_seconds=0.05) for _ in range(2)]
        assert runner.on_doorbell(job_id) == 3
    finally:
        s3.cut()
    done = {i: job(direct, i) for i in [job_id, *mates]}
    assert {j.status for j in done.values()} == {"succeeded"}
    assert (done[job_id].attempts, done[job_id].metrics["batch_size"]) == (2, 1)
    assert [done[m].metrics["batch_size"] for m in mates] == [2, 2]


def test_storage_down_on_a_jobs_last_attempt_fails_it_saying_why(make_settings, direct, s3_settings):
    settings, s3 = unreachable_s3(make_settings, s3_settings, lease_seconds=4)
    [spec] = Registry.load(settings.registry_path)
    with direct.begin() as session:
        tenant = get_or_create_tenant(session, f"leases-{secrets.token_hex(3)}")
        job_id = joblib.submit(session, tenant_id=tenant.id, type_=spec.family, model=spec.name, pool=spec.pool,
                               batch_key="", input_={"prompt": "last", "steps": 2}, max_attempts=1).id
    rung = []
    assert build_runner(settings, ring=lambda *a: rung.append(a)).on_doorbell(job_id) == 1
    j = job(direct, job_id)
    assert (j.status, j.attempts, j.error["code"]) == ("failed", 1, "storage_error")
    assert "could not store the outputs on its last attempt (1 of 1): Could not connect" in j.error["message"]
    assert rung == [] and ended(settings, job_id)["outcome"] == "failed"
