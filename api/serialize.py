"""Jobs and events as the REST contract shows them. The job's shape lives in
genq.serialize, shared with the webhook payloads."""
from __future__ import annotations

from typing import Any, Callable

from genq.schema import JobEvent
from genq.serialize import job, rfc3339, with_urls

__all__ = ["event", "job", "rfc3339", "with_urls"]


def event(e: JobEvent, url_for_key: Callable[[str], str]) -> dict[str, Any]:
    return {"id": e.id, "type": e.type, "at": rfc3339(e.at), "data": with_urls(e.data, url_for_key)}
