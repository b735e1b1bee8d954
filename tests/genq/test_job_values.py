"""What the kernel writes into a job's JSON columns stays JSON, on Postgres and
SQLite: a non-finite number in progress, output, metrics or an event (a NaN
loss) is written as null and logged, never as `NaN` (which SQLite would store
and hand to every reader, and Postgres refuses, failing the whole write)."""
from __future__ import annotations

import json
import logging
import math
import uuid

from sqlalchemy import select, text

from genq import jobs as joblib
from genq.keys import get_or_create_tenant
from genq.schema import JobEvent
from genq.states import JobStatus


def running_job(sessions) -> str:
    model = f"m-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as s:
        tenant = get_or_create_tenant(s, f"t-{model}")
        job = joblib.submit(s, tenant_id=tenant.id, type_="fine-tune", model=model, pool="p", batch_key="k", input_={})
    with sessions.begin() as s:
        joblib.claim_batch(s, model=model, batch_key="k", limit=1, owner="w1", lease_seconds=30)
    return job.id


def strict(raw: str | None):
    """Parse as any JSON parser outside Python would: NaN and Infinity are not JSON."""
    def refuse(token):
        raise AssertionError(f"{token} stored in a JSON column: {raw}")

    return None if raw is None else json.loads(raw, parse_constant=refuse)


def stored(sessions, job_id: str) -> dict:
    """The job's JSON columns and its events' data, as the database holds them (text)."""
    with sessions() as s:
        row = s.execute(text("SELECT CAST(progress AS TEXT), CAST(output AS TEXT), CAST(metrics AS TEXT) "
                             "FROM jobs WHERE id = :id"), {"id": job_id}).one()
        events = s.execute(text("SELECT type, CAST(data AS TEXT) FROM job_events WHERE job_id = :id ORDER BY id"),
                           {"id": job_id}).all()
    return {"progress": strict(row[0]), "output": strict(row[1]), "metrics": strict(row[2]),
            "events": [(t, strict(d)) for t, d in events]}


def test_a_non_finite_progress_value_is_written_as_null(sessions, caplog):
    job_id = running_job(sessions)
    caplog.set_level(logging.WARNING, logger="genq.jobs")
    with sessions.begin() as s:
        assert joblib.set_progress(s, job_id, "w1", {"current": 3, "total": 10, "loss": math.nan,
                                                     "history": [1.5, math.inf, -math.inf]})
    expected = {"current": 3, "total": 10, "loss": None, "history": [1.5, None, None]}
    got = stored(sessions, job_id)
    assert got["progress"] == expected
    assert ("progress", expected) in got["events"]
    assert job_id in caplog.text and "progress.loss" in caplog.text and "progress.history[1]" in caplog.text


def test_a_non_finite_value_in_a_finish_is_written_as_null_and_the_finish_counts(sessions):
    job_id = running_job(sessions)
    with sessions.begin() as s:
        assert joblib.finish(s, job_id, "w1", JobStatus.SUCCEEDED, output={"metrics": {"train_loss": math.nan}},
                             metrics={"loss": math.inf, "steps": 4}, progress={"loss": -math.inf})
    got = stored(sessions, job_id)
    assert got["output"] == {"metrics": {"train_loss": None}}
    assert (got["metrics"], got["progress"]) == ({"loss": None, "steps": 4}, {"loss": None})
    assert ("output", {"metrics": {"train_loss": None}}) in got["events"]
    with sessions() as s:
        assert s.scalar(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "completed")) == \
            {"status": "succeeded"}
