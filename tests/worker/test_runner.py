"""The runner's claim path, in this process on Postgres and SQLite: what a
doorbell costs before its claim (database sessions, reads of the drain flag),
and fine-tunes told apart by the job's type."""
from __future__ import annotations

import re
import secrets

import pytest
import yaml
from sqlalchemy import event

from genq import jobs as joblib
from genq.keys import get_or_create_tenant
from genq.migrate import upgrade
from genq.schema import Job
from genq.settings import Settings
from genq.states import JobType
from worker.build import build_runner


@pytest.fixture(params=["postgres", "sqlite"])
def runner(request, tmp_path):
    """A runner named as `genq worker` names it (so it reads its drain flag), for
    one model of the fault-test family on a pool of the test's own."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'runner.db'}"
        upgrade(url)
    pool = f"runner-{secrets.token_hex(3)}"
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {f"m-{pool}": {
        "family": "tests.faults.family", "checkpoint": "none", "pool": pool, "max_batch_size": 4}}}))
    settings = Settings.from_env({}, home=tmp_path / "home", registry_path=registry, database_url=url, device="cpu",
                                 storage_url=(tmp_path / "storage").as_uri(), lease_seconds=30,
                                 worker_name=f"{pool}@test")
    runner = build_runner(settings)
    [spec] = runner.registry
    runner.cache.get(spec)  # loaded, as after the worker's first batch of this model
    yield runner
    runner.sessions.kw["bind"].dispose()


def submit(runner, type_: str, batch_key: str, input_: dict) -> str:
    [spec] = runner.registry
    with runner.sessions.begin() as session:
        tenant = get_or_create_tenant(session, f"t-{spec.pool}")
        return joblib.submit(session, tenant_id=tenant.id, type_=type_, model=spec.name, pool=spec.pool,
                             batch_key=batch_key, input_=input_).id


def job(runner, job_id: str) -> Job:
    with runner.sessions() as session:
        return session.get(Job, job_id)


CLAIM = re.compile(r"^\s*UPDATE jobs SET status=.*lease_owner=", re.S)


def test_a_doorbell_opens_two_sessions_and_reads_the_drain_flag_once_before_its_claim(runner):
    job_id = submit(runner, "fault-test", "", {"prompt": "x"})
    engine = runner.sessions.kw["bind"]
    seen: list[str] = []

    def on_begin(conn):
        seen.append("session")

    def on_statement(conn, cursor, statement, *args):
        if CLAIM.match(statement):
            seen.append("claim")
        elif re.search(r"\bFROM workers\b", statement):
            seen.append("drain flag")

    event.listen(engine, "begin", on_begin)
    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        assert runner.on_doorbell(job_id) == 1
    finally:
        event.remove(engine, "begin", on_begin)
        event.remove(engine, "before_cursor_execute", on_statement)
    assert job(runner, job_id).status == "succeeded"
    before_claim = seen[:seen.index("claim")]
    # The claim's own session is the last one begun before it.
    assert before_claim.count("session") - 1 == 2, seen
    # Once for the whole doorbell: this one ran one batch, and found nothing more in line.
    assert seen.count("drain flag") == 1, seen


def test_a_fine_tune_is_told_by_its_type_not_by_its_batch_key(runner):
    """A job typed fine-tune goes to the trainer whatever its batch key (the
    trainer wants a training file); an inference job whose batch key happens to
    read "fine-tune" runs as inference."""
    fine_tune = submit(runner, JobType.FINE_TUNE.value, "", {"prompt": "x"})
    runner.on_doorbell(fine_tune)
    ft = job(runner, fine_tune)
    assert (ft.status, ft.error["code"]) == ("failed", "invalid_input"), ft.error
    assert "input.training_file" in ft.error["message"], ft.error
    inference = submit(runner, "fault-test", "fine-tune", {"prompt": "x"})
    runner.on_doorbell(inference)
    done = job(runner, inference)
    assert (done.status, done.output["text"]) == ("succeeded", "x after 1 steps"), done.error
