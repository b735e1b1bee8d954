"""Job states and the table of the changes between them. Every status change
is checked against it (genq.jobs.transition makes them all)."""
from __future__ import annotations

import enum

from genq.errors import IllegalTransition


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# Where a job's run ends: nothing its owner or a worker does moves it on (an
# admin's retry alone reopens a failed job).
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# Each change genq makes, and where (genq.jobs unless said):
# queued -> running      a worker claims it
# queued -> canceled     its owner cancels it before it runs
# running -> succeeded, failed, canceled   its worker finishes it; or the reconciler, once the
#                        lease lapsed, fails it (attempts exhausted) or ends it canceled (cancel asked)
# running -> queued      a hand-back: its worker shut down, could not store its outputs,
#                        or the reconciler found its lease lapsed
# failed -> queued       an admin retries it (genq.pools.retry), with a fresh set of attempts
ALLOWED = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELED},
    JobStatus.RUNNING: {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED},
    JobStatus.FAILED: {JobStatus.QUEUED},
}


def check_transition(current: str | JobStatus, new: str | JobStatus) -> JobStatus:
    current, new = JobStatus(current), JobStatus(new)
    if new not in ALLOWED.get(current, ()):
        raise IllegalTransition(f"a job cannot go from {current.value} to {new.value}")
    return new


class JobType(str, enum.Enum):
    TEXT = "text-generation"
    IMAGE = "image-generation"
    FINE_TUNE = "fine-tune"
