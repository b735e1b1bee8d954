"""Jobs and events as the REST contract shows them. The job's shape lives in
genq.serialize, shared with the webhook payloads."""
from __future__ import annotations

from typing import Any, Callable

from genq.schema import JobEvent
from genq.serialize import job, rfc3339, with_urls

__all__ = ["event", "job", "rfc3339", "with_urls"]


# Which worker ran a job is for operators (the events in the database, logs,
# /v1/admin/workers), never for tenants: a worker's name holds its host name
# and process id.
WORKER_ONLY = ("worker",)


def event(e: JobEvent, url_for_key: Callable[[str], str]) -> dict[str, Any]:
    data = e.data
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in WORKER_ONLY}
    return {"id": e.id, "type": e.type, "at": rfc3339(e.at), "data": with_urls(data, url_for_key)}
