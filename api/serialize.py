"""Jobs and events as the REST contract shows them."""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from genq.schema import Job, JobEvent


def rfc3339(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def with_urls(value: Any, url_for_key: Callable[[str], str]) -> Any:
    """Swap every stored {"key": ...} in an output for a {"url": ...} the client can GET."""
    if isinstance(value, dict):
        out = {k: with_urls(v, url_for_key) for k, v in value.items() if k != "key"}
        if "key" in value:
            out = {"url": url_for_key(value["key"]), **out}
        return out
    if isinstance(value, list):
        return [with_urls(v, url_for_key) for v in value]
    return value


def job(j: Job, url_for_key: Callable[[str], str]) -> dict[str, Any]:
    return {
        "id": j.id,
        "type": j.type,
        "model": j.model,
        "status": j.status,
        "input": j.input,
        "output": with_urls(j.output, url_for_key) if j.output is not None else None,
        "error": j.error,
        "progress": j.progress,
        "priority": j.priority,
        "attempts": j.attempts,
        "cancel_requested": j.cancel_requested,
        "webhook": j.webhook,
        "webhook_events_filter": j.webhook_events_filter,
        "metrics": j.metrics or {},
        "created_at": rfc3339(j.created_at),
        "started_at": rfc3339(j.started_at),
        "completed_at": rfc3339(j.completed_at),
    }


def event(e: JobEvent, url_for_key: Callable[[str], str]) -> dict[str, Any]:
    return {"id": e.id, "type": e.type, "at": rfc3339(e.at), "data": with_urls(e.data, url_for_key)}
