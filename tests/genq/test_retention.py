"""Deletes and retention (genq.retention) on both stacks: SQLite with local
storage, Postgres with S3 (moto's server over HTTP)."""
from __future__ import annotations

import datetime as dt

import pytest
import requests
from sqlalchemy import select, update

from genq import jobs as joblib
from genq import retention
from genq.db import make_engine, make_sessionmaker
from genq.errors import IllegalTransition
from genq.keys import create_key
from genq.migrate import upgrade
from genq.schema import File, Job, JobEvent, StorageDelete, Tenant, utcnow
from genq.settings import Settings
from genq.states import JobStatus
from genq.storage import NotFound, make_storage
from tests.conftest import new_bucket, temp_pg_database

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def own_pg():
    """A Postgres database of this module's own: a sweep here expires every
    old job it finds, and the run's shared database holds other tests' jobs."""
    with temp_pg_database("_retention") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite-local", "postgres-s3"])
def stack(request, tmp_path):
    if request.param == "sqlite-local":
        settings = Settings.from_env({}, home=tmp_path)
        upgrade(settings.database_url)
    else:
        settings = Settings.from_env({}, home=tmp_path, database_url=request.getfixturevalue("own_pg"),
                                     **new_bucket(request.getfixturevalue("s3_endpoint")))
    engine = make_engine(settings.database_url)
    yield settings, make_sessionmaker(engine), make_storage(settings)
    engine.dispose()


def tenant(sessions, name: str) -> str:
    import secrets

    with sessions.begin() as session:
        owner, _ = create_key(session, f"{name}-{secrets.token_hex(3)}", "user")
        return owner.id


def finished_job(sessions, storage, tenant_id: str, ended: dt.datetime, status=JobStatus.SUCCEEDED) -> str:
    """A job that ended at `ended`, with one output object in storage."""
    with sessions.begin() as session:
        job = joblib.submit(session, tenant_id=tenant_id, type_="image-generation", model="demo-image", pool="p",
                            batch_key="k", input_={"prompt": "x"})
        job_id = job.id
    key = f"jobs/{job_id}/0.png"
    storage.put(key, b"png bytes", "image/png")
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            status=status.value, output={"images": [{"key": key}]}, completed_at=ended, updated_at=ended))
    return job_id


def gone(storage, key: str) -> bool:
    try:
        storage.get(key)
    except NotFound:
        return True
    return False


def test_a_job_that_has_not_ended_cannot_be_deleted(stack):
    settings, sessions, storage = stack
    t = tenant(sessions, "del")
    with sessions.begin() as session:
        job = joblib.submit(session, tenant_id=t, type_="text-generation", model="demo-text", pool="p",
                            batch_key="k", input_={})
        with pytest.raises(IllegalTransition, match="cancel it first"):
            retention.delete_job(session, job)


def test_deleting_a_job_removes_its_row_events_and_outputs(stack):
    settings, sessions, storage = stack
    job_id = finished_job(sessions, storage, tenant(sessions, "del"), utcnow())
    with sessions.begin() as session:
        owed = retention.delete_job(session, session.get(Job, job_id))
    assert not gone(storage, f"jobs/{job_id}/0.png")  # the row's delete committed; storage is next
    assert retention.settle_deletes(sessions, storage, ids=owed) == 1
    assert gone(storage, f"jobs/{job_id}/0.png")
    with sessions() as session:
        assert session.get(Job, job_id) is None
        assert session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all() == []
        assert session.scalars(select(StorageDelete).where(StorageDelete.key == f"jobs/{job_id}/")).all() == []
    # Idempotent: deleting what is gone is no error.
    storage.delete(f"jobs/{job_id}/")
    storage.delete(f"jobs/{job_id}/0.png")


def test_a_crash_between_the_row_and_the_storage_delete_is_healed_by_the_sweep(stack):
    """The row's delete and the debt it leaves commit together; the process
    dies before storage is touched; the next sweep pays the debt."""
    settings, sessions, storage = stack
    job_id = finished_job(sessions, storage, tenant(sessions, "crash"), utcnow())
    with sessions.begin() as session:
        retention.delete_job(session, session.get(Job, job_id))
    # ... killed here ...
    assert not gone(storage, f"jobs/{job_id}/0.png")
    counts = retention.sweep(sessions, storage, settings)
    assert counts["storage"] >= 1 and gone(storage, f"jobs/{job_id}/0.png")
    with sessions() as session:
        assert session.scalars(select(StorageDelete).where(StorageDelete.key == f"jobs/{job_id}/")).all() == []


class Refusing:
    """Storage that is down for deletes."""

    def delete(self, key):
        raise OSError("storage is down")


def test_a_storage_delete_that_fails_is_kept_and_tried_later(stack):
    settings, sessions, storage = stack
    job_id = finished_job(sessions, storage, tenant(sessions, "down"), utcnow())
    with sessions.begin() as session:
        owed = retention.delete_job(session, session.get(Job, job_id))
    assert retention.settle_deletes(sessions, Refusing(), ids=owed) == 0
    with sessions() as session:
        debt = session.scalars(select(StorageDelete).where(StorageDelete.key == f"jobs/{job_id}/")).one()
    assert debt.attempts == 1 and "storage is down" in debt.last_error and debt.next_attempt_at > utcnow()
    # Not due yet: a sweep now leaves it; one past its time pays it.
    retention.sweep(sessions, storage, settings)
    assert not gone(storage, f"jobs/{job_id}/0.png")
    later = utcnow() + dt.timedelta(seconds=retention.FIRST_PAUSE * 2)
    assert retention.sweep(sessions, storage, settings, now=later)["storage"] >= 1
    assert gone(storage, f"jobs/{job_id}/0.png")


def test_retention_expires_outputs_then_rows_and_leaves_younger_jobs(stack):
    settings, sessions, storage = stack
    settings = settings.replace(output_retention_seconds=3600, job_retention_seconds=7 * 24 * 3600)
    t = tenant(sessions, "ret")
    now = utcnow()
    old, older, young = (finished_job(sessions, storage, t, now - 2 * DAY),
                         finished_job(sessions, storage, t, now - 8 * DAY, JobStatus.FAILED),
                         finished_job(sessions, storage, t, now - dt.timedelta(minutes=5)))
    presigned = storage.presigned_url(f"jobs/{old}/0.png")
    if presigned:  # S3: a URL handed out before the expiry works until it
        assert requests.get(presigned, timeout=10).status_code == 200
    # (Counts cover every tenant on the database: other tests' jobs may be swept too.)
    counts = retention.sweep(sessions, storage, settings, now=now)
    assert counts["outputs"] >= 2 and counts["jobs"] >= 1  # the older job: its outputs, then its row
    with sessions() as session:
        kept = session.get(Job, old)
        assert kept.output is None and kept.expired_at is not None and kept.status == JobStatus.SUCCEEDED.value
        assert session.get(Job, older) is None
        assert session.get(Job, young).output is not None
    assert gone(storage, f"jobs/{old}/0.png") and gone(storage, f"jobs/{older}/0.png")
    assert not gone(storage, f"jobs/{young}/0.png")
    if presigned:  # ... and not after: the object is gone
        assert requests.get(presigned, timeout=10).status_code == 404
    # A second sweep changes nothing more of these.
    expired = kept.expired_at
    retention.sweep(sessions, storage, settings, now=now)
    with sessions() as session:
        assert session.get(Job, old).expired_at == expired and session.get(Job, young).output is not None


def test_a_tenants_own_retention_wins_over_the_settings(stack):
    settings, sessions, storage = stack
    settings = settings.replace(output_retention_seconds=3600)
    keeps, quick = tenant(sessions, "keeps"), tenant(sessions, "quick")
    with sessions.begin() as session:
        session.get(Tenant, keeps).retention = {"outputs": 0}          # keeps its outputs
        session.get(Tenant, quick).retention = {"outputs": 60}         # a minute
    now = utcnow()
    kept = finished_job(sessions, storage, keeps, now - 2 * DAY)
    fast = finished_job(sessions, storage, quick, now - dt.timedelta(minutes=5))
    default = finished_job(sessions, storage, tenant(sessions, "plain"), now - dt.timedelta(minutes=5))
    retention.sweep(sessions, storage, settings, now=now)
    with sessions() as session:
        assert session.get(Job, kept).expired_at is None
        assert session.get(Job, fast).expired_at is not None
        assert session.get(Job, default).expired_at is None


def test_sweeps_work_in_bounded_batches(stack):
    settings, sessions, storage = stack
    settings = settings.replace(output_retention_seconds=60, sweep_batch=2)
    t = tenant(sessions, "many")
    ids = [finished_job(sessions, storage, t, utcnow() - DAY) for _ in range(5)]
    assert retention.sweep(sessions, storage, settings)["outputs"] >= 5
    assert all(gone(storage, f"jobs/{i}/0.png") for i in ids)


def test_a_file_in_use_by_a_fine_tune_is_kept_until_it_ends(stack):
    settings, sessions, storage = stack
    settings = settings.replace(file_retention_seconds=60)
    t = tenant(sessions, "files")
    with sessions.begin() as session:
        f = File(tenant_id=t, purpose="fine-tune", filename="d.jsonl", bytes=3, storage_key="files/x/content",
                 created_at=utcnow() - DAY)
        session.add(f)
        session.flush()
        f.storage_key = f"files/{f.id}/content"
        file_id = f.id
        job = joblib.submit(session, tenant_id=t, type_="fine-tune", model="demo-text", pool="p", batch_key="ft",
                            input_={"training_file": file_id})
        job_id = job.id
    storage.put(f"files/{file_id}/content", b"{}\n", "application/jsonl")
    with sessions.begin() as session:
        with pytest.raises(IllegalTransition, match="fine-tune"):
            retention.delete_file(session, session.get(File, file_id))
    retention.sweep(sessions, storage, settings)
    assert not gone(storage, f"files/{file_id}/content")
    with sessions.begin() as session:
        joblib.cancel(session, session.get(Job, job_id))
    assert retention.sweep(sessions, storage, settings)["files"] >= 1
    assert gone(storage, f"files/{file_id}/content")
    with sessions() as session:
        assert session.get(File, file_id) is None
