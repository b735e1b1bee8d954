"""Claims, leases and finishes on the record of truth, on Postgres and SQLite."""
from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import func, select, update

from genq import jobs as joblib
from genq.keys import get_or_create_tenant
from genq.schema import Job, JobEvent, WebhookDelivery
from genq.states import JobStatus


@pytest.fixture(autouse=True)
def _fresh_model_name(monkeypatch):
    # The Postgres database is shared by the run: each test claims its own model's jobs.
    monkeypatch.setitem(MODEL, "name", f"m-{uuid.uuid4().hex[:8]}")


MODEL = {"name": "m"}


def add_jobs(sessions, n, *, model=None, batch_key="k", priority=0, tenant="t", pool="p", webhook=None) -> list[str]:
    model = model or MODEL["name"]
    ids = []
    with sessions.begin() as s:
        t = get_or_create_tenant(s, f"{tenant}-{MODEL['name']}")
        for _ in range(n):
            job = joblib.submit(s, tenant_id=t.id, type_="text-generation", model=model, pool=pool, batch_key=batch_key,
                                input_={}, priority=priority, webhook=webhook)
            ids.append(job.id)
    return ids


def claim(sessions, owner="w1", limit=10, model=None, batch_key="k"):
    model = model or MODEL["name"]
    with sessions.begin() as s:
        return [j.id for j in joblib.claim_batch(s, model=model, batch_key=batch_key, limit=limit, owner=owner, lease_seconds=30)]


def test_claim_takes_priority_then_age_within_one_batch_key(sessions):
    low = add_jobs(sessions, 2)
    other_key = add_jobs(sessions, 1, batch_key="other")
    high = add_jobs(sessions, 1, priority=5)
    first = claim(sessions, limit=2)
    assert first == [high[0], low[0]]
    assert claim(sessions, limit=10) == [low[1]]
    assert claim(sessions, limit=10) == []
    assert claim(sessions, batch_key="other") == other_key


def test_claim_sets_lease_attempt_and_start_event(sessions):
    [jid] = add_jobs(sessions, 1)
    claim(sessions, owner="w9")
    with sessions() as s:
        job = s.get(Job, jid)
        assert (job.status, job.lease_owner, job.attempts) == ("running", "w9", 1)
        assert job.lease_until > job.started_at
        assert [e.type for e in joblib.events(s, jid)] == ["queued", "start"]


def test_finish_counts_only_under_the_lease(sessions):
    [jid] = add_jobs(sessions, 1)
    claim(sessions, owner="w1")
    with sessions.begin() as s:
        assert not joblib.finish(s, jid, "intruder", JobStatus.SUCCEEDED, output={"text": "no"})
    with sessions.begin() as s:
        assert joblib.finish(s, jid, "w1", JobStatus.SUCCEEDED, output={"text": "yes"})
    with sessions.begin() as s:
        # A second finish (a duplicate message's run) changes nothing.
        assert not joblib.finish(s, jid, "w1", JobStatus.FAILED, error={"code": "x"})
    with sessions() as s:
        job = s.get(Job, jid)
        assert (job.status, job.output) == ("succeeded", {"text": "yes"})
        assert [e.type for e in joblib.events(s, jid)] == ["queued", "start", "output", "completed"]


def test_renew_reports_lost_leases(sessions):
    a, b = add_jobs(sessions, 2)
    claim(sessions, owner="w1")
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == b).values(lease_owner="someone-else"))
    with sessions.begin() as s:
        assert joblib.renew_leases(s, [a, b], "w1", 30) == {a}


def test_cancel_queued_running_and_terminal(sessions):
    queued, running = add_jobs(sessions, 2)
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == running).values(status="running", lease_owner="w"))
    with sessions.begin() as s:
        assert joblib.cancel(s, s.get(Job, queued)).status == "canceled"
        job = joblib.cancel(s, s.get(Job, running))
        assert (job.status, job.cancel_requested) == ("running", True)
    with sessions.begin() as s:
        assert joblib.cancel_requested(s, [queued, running]) == {queued, running}
        with pytest.raises(Exception, match="already canceled"):
            joblib.cancel(s, s.get(Job, queued))


def test_concurrent_claimers_never_take_the_same_job(sessions):
    ids = add_jobs(sessions, 60)
    taken: dict[str, list[str]] = {}

    def worker(name):
        mine = taken.setdefault(name, [])
        while True:
            got = claim(sessions, owner=name, limit=4)
            if not got:
                return
            mine.extend(got)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [j for mine in taken.values() for j in mine]
    assert sorted(claimed) == sorted(ids)
    with sessions() as s:
        starts = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.type == "start", JobEvent.job_id.in_(ids)))
    assert starts == 60


def test_ids_sort_by_creation_time():
    from genq.schema import new_id

    a = new_id()
    import time

    time.sleep(0.002)
    assert new_id() > a and len(a) == 32


def expire(sessions, job_ids):
    import datetime as dt

    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(lease_until=joblib.utcnow() - dt.timedelta(seconds=1)))


def test_a_job_whose_worker_died_runs_alone_next_time(sessions):
    suspect, *mates = add_jobs(sessions, 4)
    assert claim(sessions, owner="w1") == [suspect, *mates]
    expire(sessions, [suspect, *mates])
    with sessions.begin() as s:
        assert sorted(j for j, _ in joblib.requeue_expired(s, ["p"])) == sorted([suspect, *mates])
    fresh = add_jobs(sessions, 2)
    # Oldest first, each alone: any of them may be what killed the worker.
    assert claim(sessions, owner="w2") == [suspect]
    with sessions.begin() as s:
        # Topping up a batch takes only jobs on their first attempt.
        assert [j.id for j in joblib.claim_batch(s, model=MODEL["name"], batch_key="k", limit=10, owner="w2",
                                                 lease_seconds=30, top_up=True)] == fresh
    assert claim(sessions, owner="w2") == [mates[0]]


def test_requeue_counts_attempts_and_fails_past_max_attempts_saying_why(sessions):
    [jid] = add_jobs(sessions, 1)
    for attempt in (1, 2, 3):
        assert claim(sessions, owner=f"w{attempt}") == [jid]
        expire(sessions, [jid])
        with sessions.begin() as s:
            requeued = joblib.requeue_expired(s, ["p"])
        assert requeued == ([(jid, "p")] if attempt < 3 else [])
    with sessions() as s:
        job = s.get(Job, jid)
        assert (job.status, job.attempts, job.error["code"]) == ("failed", 3, "attempts_exhausted")
        assert "on each of 3 attempts;" in job.error["message"] and "w3" not in job.error["message"]
        # The worker is the operators' to see, in the recorded event; the API shows tenants none.
        assert joblib.events(s, jid)[-1].data["worker"] == "w3"


def test_hand_back_requeues_without_counting_the_attempt_and_only_under_the_lease(sessions):
    a, b = add_jobs(sessions, 2)
    claim(sessions, owner="w1")
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == b).values(lease_owner="w2"))
    with sessions.begin() as s:
        assert joblib.hand_back(s, [a, b], "w1", "shutting down") == [a]
    with sessions() as s:
        job = s.get(Job, a)
        assert (job.status, job.attempts, job.lease_owner, job.lease_until) == ("queued", 0, None, None)
        assert joblib.events(s, a)[-1].data == {"message": "shutting down", "worker": "w1"}
        assert s.get(Job, b).status == "running"
    # Back to a first attempt: it batches again like any fresh job.
    assert claim(sessions, owner="w3") == [a]


def own_pool() -> str:
    # The Postgres database is shared by the run: a pool of the test's own has only its jobs in line.
    return f"p-{MODEL['name']}"


def run_pool(sessions, pool, limit=10) -> list[list[str]]:
    """As a worker serves a pool: take the pool's first job in line, fill its
    batch, and again, until the line is empty. Returns the batches in order."""
    batches = []
    while True:
        with sessions() as s:
            head = joblib.pool_head(s, pool)
        if head is None:
            return batches
        with sessions.begin() as s:
            batch = joblib.claim_batch(s, pool=pool, first=head.id, model=head.model, batch_key=head.batch_key,
                                       limit=limit, owner="w", lease_seconds=30)
        assert batch and batch[0].id == head.id, "a batch starts with the job first in line"
        batches.append([j.id for j in batch])


def test_the_pools_first_job_in_line_runs_first_whatever_its_model_or_batch_key(sessions):
    pool = own_pool()
    small = add_jobs(sessions, 2, batch_key="32x32", pool=pool)
    large = add_jobs(sessions, 1, batch_key="64x64", priority=50, pool=pool)
    other_model = add_jobs(sessions, 1, model=f"{MODEL['name']}-b", priority=10, pool=pool)
    assert run_pool(sessions, pool) == [large, other_model, small]


@pytest.mark.parametrize("limit", [10, 1])
def test_priority_orders_a_tenants_own_jobs_and_tenants_take_turns(sessions, limit):
    a = add_jobs(sessions, 3, priority=100, tenant="a")
    b_low = add_jobs(sessions, 1, priority=0, tenant="b")
    b_high = add_jobs(sessions, 1, priority=5, tenant="b")
    c = add_jobs(sessions, 1, priority=-5, tenant="c")
    # Each tenant's first job in line (by its own priority, then age), oldest
    # first; then each one's second; and so on. Priority 100 jumps no one else.
    line = [a[0], b_high[0], c[0], a[1], b_low[0], a[2]]
    claimed = []
    while batch := claim(sessions, limit=limit):
        claimed += batch
    assert claimed == line


def test_a_batch_fills_with_the_next_jobs_in_line_that_share_its_model_and_batch_key(sessions):
    pool = own_pool()
    a = add_jobs(sessions, 3, priority=100, tenant="a", pool=pool)
    b_other_key = add_jobs(sessions, 1, tenant="b", pool=pool, batch_key="other")
    b = add_jobs(sessions, 2, tenant="b", pool=pool)
    # a0 heads the line; its batch takes turns among the jobs that can share
    # it: a0, b0, then a1. Both tenants last started a job at the same moment,
    # so the older of their first jobs heads the line next: a2, then b1 with it.
    assert run_pool(sessions, pool, limit=3) == [[a[0], b[0], a[1]], [a[2], b[1]], b_other_key]


def test_a_batch_starts_with_the_pools_head_even_when_another_job_of_its_key_is_older(sessions):
    pool = own_pool()
    older_x = add_jobs(sessions, 1, batch_key="x", tenant="c", pool=pool)
    head = add_jobs(sessions, 1, batch_key="x", tenant="h", pool=pool)
    c_first = add_jobs(sessions, 1, batch_key="y", priority=10, tenant="c", pool=pool)
    # c's first job in line is its y job, newer than h's: h's job heads the
    # line, and c's older x job, c's second, does not take its place.
    assert run_pool(sessions, pool, limit=1) == [head, c_first, older_x]


@pytest.mark.parametrize("attempt", [1, 3])
def test_a_cancel_requested_job_whose_lease_ran_out_ends_canceled(sessions, attempt):
    [jid] = add_jobs(sessions, 1, webhook="https://hooks.example.com/genq")
    claim(sessions, owner="w1")
    with sessions.begin() as s:
        # attempt 3 of 3: without the cancel, the requeue would fail it as attempts_exhausted.
        s.execute(update(Job).where(Job.id == jid).values(attempts=attempt))
        assert joblib.cancel(s, s.get(Job, jid)).cancel_requested
    expire(sessions, [jid])
    with sessions.begin() as s:
        assert joblib.requeue_expired(s, ["p"]) == []
    with sessions() as s:
        job = s.get(Job, jid)
        assert (job.status, job.lease_until, job.error) == ("canceled", None, None)
        assert job.completed_at is not None
        last = joblib.events(s, jid)[-1]
        assert (last.type, last.data) == ("completed", {"status": "canceled"})
        assert s.scalars(select(WebhookDelivery.event).where(WebhookDelivery.job_id == jid)).all() == ["completed"]
    assert claim(sessions, owner="w2") == []


@pytest.mark.parametrize("owner, process", [
    ("gpu-text+training.4242@box:4242:a1b2c3", ("box", 4242)),
    ("gpu-text.4242@box.example.com:4243:a1b2c3", ("box.example.com", 4242)),  # a prefork child of 4242
    ("box:4242:a1b2c3", None),  # a runner without a node name
    ("w1", None),
])
def test_node_process_reads_host_and_pid_from_a_lease_owner(owner, process):
    assert joblib.node_process(owner) == process


def test_a_dead_workers_jobs_are_taken_back_at_once_by_the_rules_of_an_expired_lease(sessions):
    pool = own_pool()
    dead, alive = f"{pool}.4242@box", f"{pool}.42420@box"
    done_for, cancelled, last_try, elsewhere = add_jobs(sessions, 4, pool=pool)
    for job, owner in ((done_for, dead), (cancelled, dead), (last_try, dead), (elsewhere, alive)):
        claim(sessions, owner=f"{owner}:4242:{job[-6:]}", limit=1)
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == last_try).values(attempts=3))
        joblib.cancel(s, s.get(Job, cancelled))
    with sessions.begin() as s:
        assert joblib.requeue_dead_worker(s, "box", 4242) == [(done_for, pool)]
    with sessions() as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_([done_for, cancelled, last_try, elsewhere])))}
        # Leases of 30 s, not waited for: the attempt counts, as for a lease that lapsed.
        assert (jobs[done_for].status, jobs[done_for].attempts, jobs[done_for].lease_owner) == ("queued", 1, None)
        assert jobs[cancelled].status == "canceled"
        assert (jobs[last_try].status, jobs[last_try].error["code"]) == ("failed", "attempts_exhausted")
        assert jobs[elsewhere].status == "running" and jobs[elsewhere].lease_until > joblib.utcnow()
        said = [e.data for e in joblib.events(s, done_for) if e.type == "log"]
        assert said[0] == {"message": "its worker process died; its lease ended at once", "worker": "pid 4242 on box"}
    with sessions.begin() as s:
        assert joblib.requeue_dead_worker(s, "box", 4242) == []
