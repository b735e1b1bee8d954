"""The side thread of a running batch (BatchTracker) on Postgres and SQLite: a
progress write the database refuses is logged and dropped, and never holds up
the cancel checks or the lease renewal beside it, so it never makes a live
worker look dead."""
from __future__ import annotations

import logging
import secrets
import time

import pytest
import yaml

from genq import jobs as joblib
from genq.keys import get_or_create_tenant
from genq.migrate import upgrade
from genq.schema import Job
from genq.settings import Settings
from tests.faults.harness import wait_for
from worker.build import build_runner
from worker.batch import BatchTracker, Row, Stop

LEASE = 3


@pytest.fixture(params=["postgres", "sqlite"])
def runner(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'tracker.db'}"
        upgrade(url)
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {f"tracked-{secrets.token_hex(3)}": {
        "family": "tests.faults.family", "checkpoint": "none", "pool": f"tracker-{secrets.token_hex(3)}"}}}))
    # Progress due at every beat of the tracker's loop, as a trainer reporting each step makes it.
    settings = Settings.from_env({}, home=tmp_path / "home", registry_path=registry, database_url=url, device="cpu",
                                 storage_url=(tmp_path / "storage").as_uri(), progress_interval=0.02,
                                 cancel_poll_interval=0.05, lease_seconds=LEASE)
    runner = build_runner(settings)
    yield runner
    runner.sessions.kw["bind"].dispose()


def claim_one(runner) -> Job:
    [spec] = runner.registry
    with runner.sessions.begin() as session:
        tenant = get_or_create_tenant(session, f"tracker-{secrets.token_hex(3)}")
        joblib.submit(session, tenant_id=tenant.id, type_=spec.family, model=spec.name, pool=spec.pool,
                      batch_key="k", input_={"prompt": "x"})
    with runner.sessions.begin() as session:
        [job] = joblib.claim_batch(session, model=spec.name, batch_key="k", limit=1, owner=runner.owner,
                                   lease_seconds=LEASE)
    return job


def test_a_progress_write_that_keeps_failing_neither_lets_the_lease_lapse_nor_hides_a_cancel(runner, caplog):
    job = claim_one(runner)
    claimed_until = job.lease_until
    row = Row(job)
    tracker = BatchTracker(runner, [row], unit="step", finish_cancelled=False)
    caplog.set_level(logging.WARNING, logger="worker.batch")
    try:
        # As a trainer reports every step: each report one the database cannot
        # store (a set is no JSON), for two leases' time.
        started, step = time.monotonic(), 0
        while time.monotonic() - started < 2 * LEASE:
            step += 1
            tracker.on_progress(0, step, 10**6, unstorable={step})
            time.sleep(0.005)
        assert row.stop is not Stop.LEASE_LOST, "the lease was given up while only progress writes failed"
        with runner.sessions.begin() as session:
            joblib.cancel(session, session.get(Job, job.id))
        wait_for(lambda: row.stop is Stop.CANCEL, 10, "the cancel to reach the running job")
    finally:
        tracker.close()
    with runner.sessions() as session:
        now = session.get(Job, job.id)
        assert (now.status, now.lease_owner) == ("running", runner.owner)
        assert now.lease_until > claimed_until  # renewed while the progress writes failed
        assert now.progress is None
    assert "progress" in caplog.text
    assert row.stop is not Stop.LEASE_LOST


def test_a_row_joining_a_tracker_that_held_nothing_for_a_lease_keeps_its_lease(runner):
    """A continuous batch's tracker can hold no row for longer than a lease
    (every job came and went between its beats). A job claimed then has a
    fresh lease: it is renewed, not stopped as if its lease were lost."""
    tracker = BatchTracker(runner, [], unit="token", finish_cancelled=False)
    try:
        time.sleep(LEASE)  # more than LEASE_SAFE_SHARE of a lease with nothing to renew
        job = claim_one(runner)
        row = Row(job)
        tracker.rows = [row]
        time.sleep(LEASE)
        assert row.stop is None
    finally:
        tracker.close()
    with runner.sessions() as session:
        now = session.get(Job, job.id)
        assert (now.status, now.lease_owner) == ("running", runner.owner) and now.lease_until > job.lease_until
