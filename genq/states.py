"""Job states and the one function every status change goes through."""
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


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# running -> queued is a hand-back: a lease expired or a worker shut down mid-job.
ALLOWED = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED},
    JobStatus.RUNNING: {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED},
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
