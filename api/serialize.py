"""Jobs and events as the REST contract shows them. The job's shape lives in
genq.serialize, shared with the webhook payloads."""
from __future__ import annotations

from typing import Any, Callable

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from genq.schema import JobEvent
from genq.serialize import ObjectId, Timestamp, job, rfc3339, with_urls

__all__ = ["event", "job", "rfc3339", "with_urls", "EventView", "TenantEventView"]


@with_config(ConfigDict(title="Event"))
class EventView(TypedDict):
    id: int
    type: str
    at: Timestamp
    data: dict[str, Any]


@with_config(ConfigDict(title="TenantEvent"))
class TenantEventView(EventView):
    """An event on GET /v1/events: a job's event with the job's id."""

    job_id: ObjectId


# Which worker ran a job is for operators (the events in the database, logs,
# /v1/admin/workers), never for tenants: a worker's name holds its host name
# and process id.
WORKER_ONLY = ("worker",)


def event(e: JobEvent, url_for_key: Callable[[str], str]) -> EventView:
    data = e.data
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in WORKER_ONLY}
    return {"id": e.id, "type": e.type, "at": rfc3339(e.at), "data": with_urls(data, url_for_key)}
