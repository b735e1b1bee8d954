"""The order a worker runs a pool's jobs in, with the runner in this process on
Postgres and SQLite: each batch starts with the pool's first job in line,
whatever its model or batch key, and the worker picks the line's head again
after every batch."""
from __future__ import annotations

import secrets

import pytest
import yaml
from sqlalchemy import select

from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import get_or_create_tenant
from genq.migrate import upgrade
from genq.schema import Job, JobEvent
from genq.settings import Settings
from worker.build import build_runner


@pytest.fixture(params=["postgres", "sqlite"])
def settings(request, tmp_path) -> Settings:
    """Two models of the fault-test family in one pool of the test's own (the
    Postgres database is shared by the run), batches of up to 4."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'order.db'}"
        upgrade(url)
    pool = f"order-{secrets.token_hex(3)}"
    entry = {"family": "tests.faults.family", "checkpoint": "none", "pool": pool, "max_batch_size": 4}
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"squares": entry, "circles": entry}}))
    return Settings.from_env({}, home=tmp_path / "home", registry_path=registry, database_url=url, device="cpu",
                             storage_url=(tmp_path / "storage").as_uri(), lease_seconds=30)


@pytest.fixture
def sessions(settings):
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def submit(sessions, settings, model: str, batch_key: str, priority: int = 0) -> str:
    """A job as the API queues it; the batch key stands for what the input
    fixes (an image's size, say)."""
    pool = yaml.safe_load(settings.registry_path.read_text())["models"][model]["pool"]
    with sessions.begin() as session:
        tenant = get_or_create_tenant(session, f"order-{pool}")
        return joblib.submit(session, tenant_id=tenant.id, type_="fault-test", model=model, pool=pool,
                             batch_key=batch_key, input_={"prompt": batch_key}, priority=priority).id


def started(sessions, ids: list[str]) -> list[str]:
    """The jobs in the order they started."""
    with sessions() as session:
        return list(session.scalars(select(JobEvent.job_id).where(JobEvent.job_id.in_(ids), JobEvent.type == "start")
                                    .order_by(JobEvent.id)))


def test_the_pools_first_job_runs_first_whatever_its_batch_key_or_model(settings, sessions):
    small = [submit(sessions, settings, "squares", "float32|32x32") for _ in range(2)]
    large = submit(sessions, settings, "squares", "float32|64x64", priority=50)
    circle = submit(sessions, settings, "circles", "float32|32x32", priority=10)
    # The doorbell names the oldest job; the line decides what runs first.
    assert build_runner(settings).on_doorbell(small[0]) == 4
    assert started(sessions, [*small, large, circle]) == [large, circle, *small]
    with sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_([*small, large, circle])))}
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert [jobs[i].metrics["batch_size"] for i in (large, circle, *small)] == [1, 1, 2, 2]


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_job_queued_mid_run_ahead_in_line_runs_next(settings, sessions, monkeypatch, batching):
    """After each batch the worker takes the line's head again, rather than
    draining the batch key it was on. A continuous batch stops admitting once
    the head is another model's: it drains, and the head runs next."""
    from worker.continuous import ContinuousBatch

    doc = yaml.safe_load(settings.registry_path.read_text())
    for entry in doc["models"].values():
        entry["batching"] = batching
    settings.registry_path.write_text(yaml.safe_dump(doc))
    first = [submit(sessions, settings, "squares", "float32|32x32") for _ in range(4)]
    later = [submit(sessions, settings, "squares", "float32|32x32") for _ in range(2)]
    runner = build_runner(settings)
    urgent: list[str] = []

    def then_submit(claim):
        def claim_then_submit(*args, **kwargs):
            batch = claim(*args, **kwargs)
            if batch and not urgent:
                urgent.append(submit(sessions, settings, "circles", "float32|64x64", priority=90))
            return batch
        return claim_then_submit

    if batching == "static":
        runner.claim = then_submit(runner.claim)
    else:
        monkeypatch.setattr(ContinuousBatch, "claim", then_submit(ContinuousBatch.claim))
    assert runner.on_doorbell(first[0]) == 7
    assert started(sessions, [*first, *later, *urgent]) == [*first, *urgent, *later]
