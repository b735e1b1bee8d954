"""Webhook deliveries on the record of truth, on Postgres and SQLite: enqueued
with the state change or not at all, claimed once, retried on schedule,
taken back from a dead sender; secrets, rotation and signatures."""
from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, select, update
from standardwebhooks import Webhook, WebhookVerificationError

from genq import jobs as joblib
from genq import webhook_secrets, webhooks
from genq.keys import get_or_create_tenant
from genq.schema import Job, WebhookAttempt, WebhookDelivery, WebhookSecret, utcnow
from genq.states import JobStatus
from genq.webhooks import Outcome

BACKOFF = (5.0, 300.0, 1800.0)
SEALER = webhook_secrets.Sealer([Fernet.generate_key()])


def add_job(sessions, events=None, webhook="https://hooks.example.com/h", tenant: str | None = None) -> str:
    # Each test its own model and tenant: the Postgres database is shared by the run.
    name = f"m-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as s:
        tenant = get_or_create_tenant(s, tenant or f"t-{name}")
        job = joblib.submit(s, tenant_id=tenant.id, type_="text-generation", model=name, pool="p", batch_key="k",
                            input_={"prompt": "hi"}, webhook=webhook, webhook_events_filter=events)
        return job.id


def run_to_end(sessions, job_id: str, owner="w1", progress_steps=0) -> None:
    with sessions.begin() as s:
        model = s.get(Job, job_id).model
        assert [j.id for j in joblib.claim_batch(s, model=model, batch_key="k", limit=1, owner=owner, lease_seconds=30)] == [job_id]
    for i in range(progress_steps):
        with sessions.begin() as s:
            assert joblib.set_progress(s, job_id, owner, {"current": i + 1, "total": 9, "unit": "token"})
    with sessions.begin() as s:
        assert joblib.finish(s, job_id, owner, JobStatus.SUCCEEDED, output={"text": "done", "tokens": 1})


def deliveries_of(sessions, job_id: str) -> list[WebhookDelivery]:
    with sessions() as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)))


def test_default_filter_enqueues_exactly_one_completed_delivery(sessions):
    job_id = add_job(sessions)
    run_to_end(sessions, job_id, progress_steps=3)
    [d] = deliveries_of(sessions, job_id)
    assert (d.event, d.status, d.attempts, d.url) == ("completed", "pending", 0, "https://hooks.example.com/h")
    # The payload is the job as GET shows it, frozen at the event.
    assert d.payload["id"] == job_id and d.payload["status"] == "succeeded"
    assert d.payload["output"] == {"text": "done", "tokens": 1}
    assert d.webhook_id.startswith("msg_")


def test_every_event_when_asked_with_progress_throttled_to_one_a_second(sessions):
    job_id = add_job(sessions, events=["start", "progress", "completed"])
    long_ago = utcnow() - dt.timedelta(seconds=10)
    # Three progress writes: the first two each back-dated past the throttle, the third within a second of the second.
    with sessions.begin() as s:
        model = s.get(Job, job_id).model
        joblib.claim_batch(s, model=model, batch_key="k", limit=1, owner="w1", lease_seconds=30)
    for i in range(3):
        with sessions.begin() as s:
            assert joblib.set_progress(s, job_id, "w1", {"current": i + 1, "total": 3, "unit": "token"})
            if i == 0:
                s.execute(update(WebhookDelivery).where(WebhookDelivery.event == "progress", WebhookDelivery.job_id == job_id)
                          .values(created_at=long_ago))
    with sessions.begin() as s:
        joblib.finish(s, job_id, "w1", JobStatus.SUCCEEDED, output={"text": "x"})
    found = deliveries_of(sessions, job_id)
    assert [d.event for d in found] == ["start", "progress", "progress", "completed"]
    assert found[0].payload["status"] == "running"
    assert [d.payload["progress"]["current"] for d in found[1:3]] == [1, 2]
    assert len({d.webhook_id for d in found}) == 4


def test_no_webhook_no_delivery_and_a_rolled_back_change_leaves_none(sessions):
    plain = add_job(sessions, webhook=None)
    run_to_end(sessions, plain)
    assert deliveries_of(sessions, plain) == []
    job_id = add_job(sessions)
    with sessions.begin() as s:
        joblib.claim_batch(s, model=s.get(Job, job_id).model, batch_key="k", limit=1, owner="w1", lease_seconds=30)
    s = sessions()
    with pytest.raises(RuntimeError):
        with s.begin():
            assert joblib.finish(s, job_id, "w1", JobStatus.SUCCEEDED, output={"text": "x"})
            assert len(list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))) == 1
            raise RuntimeError("the transaction fails after the write")
    s.close()
    assert deliveries_of(sessions, job_id) == []
    with sessions() as s:
        assert s.get(Job, job_id).status == "running"


def test_cancel_of_a_queued_job_is_a_completed_event(sessions):
    job_id = add_job(sessions)
    with sessions.begin() as s:
        joblib.cancel(s, s.get(Job, job_id))
    [d] = deliveries_of(sessions, job_id)
    assert d.event == "completed" and d.payload["status"] == "canceled"


def claim(sessions, delivery_id, now=None):
    with sessions.begin() as s:
        return webhooks.claim(s, delivery_id, lease_seconds=10, now=now)


def record(sessions, d, outcome, now=None):
    with sessions.begin() as s:
        return webhooks.record(s, d, outcome, BACKOFF, now=now, rng=lambda: 0.5)


def completed_delivery(sessions, tenant: str | None = None) -> WebhookDelivery:
    job_id = add_job(sessions, tenant=tenant)
    run_to_end(sessions, job_id)
    return deliveries_of(sessions, job_id)[0]


def test_a_delivery_is_claimed_once_and_retried_on_the_schedule_until_spent(sessions):
    d = completed_delivery(sessions)
    now = utcnow()
    first = claim(sessions, d.id, now)
    assert first.status == "delivering" and first.attempts == 1
    assert claim(sessions, d.id, now) is None  # a duplicate message finds it taken
    assert record(sessions, first, Outcome(500, "HTTP 500", 12), now) == "pending"
    [row] = deliveries_of(sessions, d.job_id)
    assert row.next_attempt_at == now + dt.timedelta(seconds=5)  # rng 0.5: no jitter
    assert claim(sessions, d.id, now) is None  # not due yet
    t = now
    for attempt, wait in zip(range(2, 5), (*BACKOFF[1:], None)):
        t = t + dt.timedelta(seconds=BACKOFF[attempt - 2])
        again = claim(sessions, d.id, t)
        assert again.attempts == attempt
        status = record(sessions, again, Outcome(None, "no answer within the 15 s timeout", 15000), t)
        assert status == ("failed" if wait is None else "pending")
    with sessions() as s:
        log = list(s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id).order_by(WebhookAttempt.id)))
    assert [(a.status_code, a.duration_ms) for a in log] == [(500, 12)] + [(None, 15000)] * 3


def test_a_late_record_after_the_lease_was_taken_back_does_not_count(sessions):
    d = completed_delivery(sessions)
    now = utcnow()
    mine = claim(sessions, d.id, now)
    later = now + dt.timedelta(seconds=11)
    with sessions.begin() as s:
        assert webhooks.take_back_stale(s, BACKOFF, now=later) == [d.id]
    theirs = claim(sessions, d.id, later)
    assert theirs.attempts == 2
    assert record(sessions, mine, Outcome(200, None, 5), later) is None
    assert record(sessions, theirs, Outcome(204, None, 5), later) == "succeeded"
    with sessions() as s:
        errors = [a.error for a in s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id).order_by(WebhookAttempt.id))]
    assert "the sender stopped before the receiver answered" in errors[0] and errors[1:] == [None, None]


def test_410_gives_up_on_the_job(sessions):
    job_id = add_job(sessions, events=["start", "completed"])
    run_to_end(sessions, job_id)
    start, completed = deliveries_of(sessions, job_id)
    taken = claim(sessions, start.id)
    assert record(sessions, taken, Outcome(410, "HTTP 410", 3)) == "gave_up"
    assert [d.status for d in deliveries_of(sessions, job_id)] == ["gave_up", "gave_up"]
    with sessions.begin() as s:
        assert webhooks.enqueue(s, job_id, "completed") is None


def test_retry_after_is_honoured_up_to_the_longest_wait():
    assert webhooks.next_delay(1, BACKOFF, retry_after=42, rng=lambda: 0.0) == 42
    assert webhooks.next_delay(1, BACKOFF, retry_after=10**6) == 1800
    assert webhooks.next_delay(4, BACKOFF, retry_after=1) is None  # the schedule is spent all the same
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert webhooks.parse_retry_after("120") == 120
    assert webhooks.parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30
    assert webhooks.parse_retry_after("soon") is None and webhooks.parse_retry_after(None) is None


def test_backoff_is_jittered_within_a_fifth():
    assert webhooks.next_delay(2, BACKOFF, rng=lambda: 0.0) == pytest.approx(240)
    assert webhooks.next_delay(2, BACKOFF, rng=lambda: 1.0) == pytest.approx(360)
    spec = (5, 300, 1800, 7200, 18000, 36000, 36000)
    from genq.settings import Settings

    assert Settings.from_env({}).webhook_backoff == spec


def test_due_rings_once_per_patience_and_skips_future_retries(sessions):
    d = completed_delivery(sessions)
    now = utcnow()
    with sessions.begin() as s:
        assert d.id in webhooks.due(s, now)
    with sessions.begin() as s:
        assert d.id not in webhooks.due(s, now + dt.timedelta(seconds=1))  # its doorbell is out
    with sessions.begin() as s:
        assert d.id in webhooks.due(s, now + webhooks.DOORBELL_PATIENCE + dt.timedelta(seconds=1))  # ...and lost


def test_redeliver_sends_the_same_event_again(sessions):
    d = completed_delivery(sessions)
    taken = claim(sessions, d.id)
    record(sessions, taken, Outcome(200, None, 4))
    with sessions.begin() as s:
        again = webhooks.redeliver(s, s.get(WebhookDelivery, d.id), max_redeliveries=10)
    assert (again.webhook_id, again.payload, again.status, again.attempts) == (d.webhook_id, d.payload, "pending", 0)


def test_redeliveries_are_bounded_one_at_a_time_and_per_job(sessions):
    d = completed_delivery(sessions)
    record(sessions, claim(sessions, d.id), Outcome(200, None, 4))
    with sessions.begin() as s:
        again = webhooks.redeliver(s, s.get(WebhookDelivery, d.id), max_redeliveries=2)
    # The same event is still on its way: another redelivery would add only load.
    with sessions.begin() as s, pytest.raises(webhooks.RedeliveryRefused, match="still on its way"):
        webhooks.redeliver(s, s.get(WebhookDelivery, d.id), max_redeliveries=2)
    record(sessions, claim(sessions, again.id), Outcome(200, None, 4))
    with sessions.begin() as s:
        third = webhooks.redeliver(s, s.get(WebhookDelivery, d.id), max_redeliveries=2)
    record(sessions, claim(sessions, third.id), Outcome(200, None, 4))
    with sessions.begin() as s, pytest.raises(webhooks.RedeliveryRefused, match="redelivered 2 times"):
        webhooks.redeliver(s, s.get(WebhookDelivery, d.id), max_redeliveries=2)
    with sessions() as s:
        assert webhooks.redeliveries(s, d.job_id) == 2


def test_rotating_in_a_loop_keeps_at_most_two_previous_keys(sessions):
    job_id = add_job(sessions)
    with sessions() as s:
        tenant_id = s.get(Job, job_id).tenant_id
    now = utcnow()
    made = []
    for i in range(60):
        with sessions.begin() as s:
            made.append(webhook_secrets.rotate(s, tenant_id, 3600, SEALER, now=now + dt.timedelta(seconds=i))[0])
    with sessions.begin() as s:
        keys = webhook_secrets.signing_keys(s, tenant_id, SEALER, now + dt.timedelta(seconds=60))
        stored = s.scalar(select(func.count()).select_from(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id))
    assert keys == [made[-1], made[-2], made[-3]] and stored == 3


def test_due_takes_tenants_round_robin_and_no_more_than_their_free_places(sessions):
    flood_tenant = f"flood-{uuid.uuid4().hex[:8]}"
    flood = [completed_delivery(sessions, tenant=flood_tenant) for _ in range(6)]
    lone = completed_delivery(sessions)  # another tenant's, due after all of the flood's
    now = utcnow() + dt.timedelta(seconds=1)
    with sessions.begin() as s:
        rung = webhooks.due(s, now, limit=500, tenant_limit=2)
    flood_ids = {d.id for d in flood}
    # The flood gets its 2 places; each tenant's first goes before anyone's second.
    flooded = [i for i in rung if i in flood_ids]
    assert len(flooded) == 2 and rung.index(lone.id) < rung.index(flooded[1])
    # Its two doorbells are out: no free place for the flood until one is answered.
    with sessions.begin() as s:
        assert flood_ids.isdisjoint(webhooks.due(s, now, limit=100, tenant_limit=2))
    # Without a limit, everything due is rung, still each tenant's first first.
    with sessions.begin() as s:
        assert set(webhooks.due(s, now + webhooks.DOORBELL_PATIENCE * 2, limit=100)) >= flood_ids


def test_a_tenant_at_its_limit_is_not_given_another_sender(sessions):
    tenant = f"busy-{uuid.uuid4().hex[:8]}"
    a, b, c = (completed_delivery(sessions, tenant=tenant) for _ in range(3))
    now = utcnow()
    with sessions.begin() as s:
        assert webhooks.claim(s, a.id, 10, now, tenant_limit=2) is not None
        assert webhooks.claim(s, b.id, 10, now, tenant_limit=2) is not None
        assert webhooks.claim(s, c.id, 10, now, tenant_limit=2) is None
    with sessions() as s:
        assert s.get(WebhookDelivery, c.id).status == "pending"
    # Another tenant is not held back by this one.
    other = completed_delivery(sessions)
    with sessions.begin() as s:
        assert webhooks.claim(s, other.id, 10, utcnow(), tenant_limit=2) is not None


def test_secret_made_once_rotated_with_grace_and_expired(sessions):
    job_id = add_job(sessions)
    with sessions() as s:
        tenant_id = s.get(Job, job_id).tenant_id
    with sessions.begin() as s:
        first = webhook_secrets.current(s, tenant_id, SEALER)
    with sessions.begin() as s:
        assert webhook_secrets.current(s, tenant_id, SEALER) == first
        assert first.startswith("whsec_")
    now = utcnow()
    with sessions.begin() as s:
        second, until = webhook_secrets.rotate(s, tenant_id, 3600, SEALER, now=now)
    assert until == now + dt.timedelta(hours=1)
    with sessions.begin() as s:
        assert webhook_secrets.signing_keys(s, tenant_id, SEALER, now) == [second, first]
        assert webhook_secrets.signing_keys(s, tenant_id, SEALER, until + dt.timedelta(seconds=1)) == [second]


def test_signatures_verify_with_standardwebhooks_and_tampering_or_age_fails():
    key, old_key = webhook_secrets.new_secret(), webhook_secrets.new_secret()
    body = webhook_secrets.encode({"id": "j1", "status": "succeeded", "output": {"text": "héllo"}})
    now = utcnow()
    headers = webhook_secrets.sign([key, old_key], "msg_1", body, now)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for k in (key, old_key):  # either key verifies during a rotation's grace
        assert Webhook(k).verify(body, headers)["output"]["text"] == "héllo"
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(key).verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(webhook_secrets.new_secret()).verify(body, headers)
    stale = webhook_secrets.sign([key], "msg_1", body, now - dt.timedelta(minutes=6))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(key).verify(body, stale)
    assert json.loads(body)["id"] == "j1"


def test_progress_of_a_job_with_no_progress_webhook_is_one_statement(sessions):
    """A running batch writes each row's progress every second beside the decode: the update brings back the
    job's webhook, and only a job whose webhook asks for progress is read again for its delivery."""
    from sqlalchemy import event

    from genq.schema import JobEvent

    quiet, loud = add_job(sessions, webhook=None), add_job(sessions, events=["progress", "completed"])
    statements = []
    for job_id in (quiet, loud):
        with sessions.begin() as s:
            model = s.get(Job, job_id).model
            joblib.claim_batch(s, model=model, batch_key="k", limit=1, owner="w1", lease_seconds=30)
    engine = sessions.kw["bind"]
    count = lambda *a, **k: statements.append(a[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", count)
    try:
        for job_id in (quiet, loud):
            statements.clear()
            with sessions.begin() as s:
                assert joblib.set_progress(s, job_id, "w1", {"current": 1, "total": 9, "unit": "token"})
                sent = list(statements)
            # quiet: the update alone (its event goes at the commit); loud: the delivery check and insert too.
            assert len(sent) == 1 if job_id == quiet else len(sent) > 1, sent
    finally:
        event.remove(engine, "before_cursor_execute", count)
    with sessions() as s:
        for job_id in (quiet, loud):
            assert [e.type for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))][-1] == "progress"
    assert [d.event for d in deliveries_of(sessions, loud)] == ["progress"] and deliveries_of(sessions, quiet) == []
