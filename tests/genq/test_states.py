"""The state table is true: every status change genq makes goes through one
helper (genq.jobs.transition) that checks it against the table, the table
allows exactly the changes genq makes (the admin's retry, failed -> queued,
included), and a change it forbids raises IllegalTransition."""
from __future__ import annotations

import ast
import datetime as dt
import uuid
from pathlib import Path

import pytest
from sqlalchemy import update

from genq import jobs as joblib
from genq import pools as poollib
from genq.errors import IllegalTransition
from genq.keys import get_or_create_tenant
from genq.schema import Job
from genq.states import ALLOWED, JobStatus

ROOT = Path(__file__).resolve().parents[2]
S = JobStatus


def _updates_jobs(node: ast.AST) -> bool:
    """`node` is a chain of calls that starts with update(Job)."""
    while isinstance(node, (ast.Call, ast.Attribute)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "update"
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "Job"):
            return True
        node = node.func if isinstance(node, ast.Call) else node.value
    return False


def status_writes(path: Path) -> list[str]:
    """Where in `path` an UPDATE of the jobs table sets `status`: the enclosing functions."""
    found = []

    class Visit(ast.NodeVisitor):
        def __init__(self):
            self.scope: list[str] = []

        def visit_FunctionDef(self, node):
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()

        def visit_Call(self, node):
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "values"
                    and any(k.arg == "status" for k in node.keywords) and _updates_jobs(node.func.value)):
                found.append(f"{path.relative_to(ROOT)}:{'.'.join(self.scope)}")
            self.generic_visit(node)

    Visit().visit(ast.parse(path.read_text(), str(path)))
    return found


def test_every_status_change_goes_through_the_one_helper():
    writes = [w for package in ("genq", "api", "worker") for path in sorted((ROOT / package).rglob("*.py"))
              for w in status_writes(path)]
    assert writes == ["genq/jobs.py:transition"]


def test_a_change_the_table_forbids_raises_before_anything_is_written():
    for current in S:
        for new in S:
            if new in ALLOWED.get(current, ()):
                joblib.transition(current, new, Job.id == "x")
            else:
                with pytest.raises(IllegalTransition, match=f"from {current.value} to {new.value}"):
                    joblib.transition(current, new, Job.id == "x")


# --- the table allows exactly what genq does -----------------------------------------------

POOL = f"states-{uuid.uuid4().hex[:6]}"


def new_job(s, max_attempts: int = 3) -> str:
    tenant = get_or_create_tenant(s, "states")
    return joblib.submit(s, tenant_id=tenant.id, type_="text-generation", model=f"m-{uuid.uuid4().hex[:8]}",
                         pool=POOL, batch_key="k", input_={}, max_attempts=max_attempts).id


def claim(s, job_id: str) -> None:
    job = s.get(Job, job_id)
    [claimed] = joblib.claim_batch(s, model=job.model, batch_key="k", limit=1, owner="w", lease_seconds=30)
    assert claimed.id == job_id


def lapse(s, job_id: str) -> None:
    s.execute(update(Job).where(Job.id == job_id).values(lease_until=joblib.utcnow() - dt.timedelta(seconds=1)))


def cancel(s, job_id: str) -> None:
    joblib.cancel(s, s.get(Job, job_id))


def finish(status: JobStatus):
    return lambda s, job_id: joblib.finish(s, job_id, "w", status, webhook=False)


def reconcile(s, job_id: str) -> None:
    lapse(s, job_id)
    joblib.requeue_expired(s, [POOL])


def exhaust(s, job_id: str) -> None:
    s.execute(update(Job).where(Job.id == job_id).values(attempts=Job.max_attempts))
    reconcile(s, job_id)


def cancel_then_reconcile(s, job_id: str) -> None:
    cancel(s, job_id)
    reconcile(s, job_id)


def retry(s, job_id: str) -> None:
    poollib.retry(s, s.get(Job, job_id))


# What each kernel operation does to a job in the state it finds it in: (set-up, operation).
OPERATIONS = {
    "the owner cancels a queued job": ([], cancel),
    "a worker claims it": ([], claim),
    "its worker finishes it succeeded": ([claim], finish(S.SUCCEEDED)),
    "its worker finishes it failed": ([claim], finish(S.FAILED)),
    "its worker finishes it canceled": ([claim], finish(S.CANCELED)),
    "its worker hands it back": ([claim], lambda s, j: joblib.hand_back(s, [j], "w", "leaving")),
    "its worker hands it back, counted": ([claim], lambda s, j: joblib.hand_back(s, [j], "w", "no storage",
                                                                                counted=True)),
    "the reconciler queues it again": ([claim], reconcile),
    "the reconciler fails it, out of attempts": ([claim], exhaust),
    "the reconciler ends it canceled, as asked": ([claim], cancel_then_reconcile),
    "an admin retries a failed job": ([claim, finish(S.FAILED)], retry),
}


def test_the_table_allows_exactly_the_changes_genq_makes(sessions):
    made = set()
    for name, (setup, operation) in OPERATIONS.items():
        with sessions.begin() as s:
            job_id = new_job(s)
        for step in setup:
            with sessions.begin() as s:
                step(s, job_id)
        with sessions() as s:
            before = S(s.get(Job, job_id).status)
        with sessions.begin() as s:
            operation(s, job_id)
        with sessions() as s:
            after = S(s.get(Job, job_id).status)
        assert after != before, name
        made.add((before, after))
    allowed = {(current, new) for current, news in ALLOWED.items() for new in news}
    assert made == allowed


def test_only_a_failed_job_can_be_retried(sessions):
    with sessions.begin() as s:
        job_id = new_job(s)
        claim(s, job_id)
        finish(S.SUCCEEDED)(s, job_id)
    with sessions.begin() as s, pytest.raises(IllegalTransition, match="only a failed job can be retried"):
        retry(s, job_id)
    with sessions() as s:
        assert s.get(Job, job_id).status == "succeeded"
