"""GET /v1/events: every event of the caller's jobs, on one connection.

A dashboard or CLI watching many jobs holds one stream instead of one per job.
Each event is a job's durable event (queued, start, progress, log, output,
completed) with its `job_id`; its SSE id is the event's id, which only grows,
so `Last-Event-ID: N` (or `?after=N`) resumes after it. Without either the
stream starts now: only events written after it opened. `?job=<id>` (repeated)
or `?jobs=<id>,<id>` keeps the events of those jobs only (at most MAX_JOBS;
ids of other tenants' jobs simply match nothing). Live output deltas are on
each job's own stream (/v1/jobs/<id>/events), not here.

The JSON form (Accept: application/json) lists up to 100 events after `after`.
"""
from __future__ import annotations

import json
import re
import time

from flask import Blueprint, Response, request, stream_with_context

from api import fanout, held, serialize
from api.auth import caller, require_key
from api.context import ctx
from api.errors import invalid
from api.jobs import ID_RE, POLL, KEEP_ALIVE, RECONNECT_MS, handoff_server, stream_response, url_for_key
from genq import jobs as joblib

bp = Blueprint("events", __name__, url_prefix="/v1/events")

# The most jobs one stream may name in ?job= / ?jobs=.
MAX_JOBS = 100
# The JSON form's page.
PAGE = 100
EVENT_ID_RE = re.compile(r"^[0-9]{1,18}$")


def job_filter() -> frozenset[str] | None:
    ids: list[tuple[str, str]] = [("job", v) for v in request.args.getlist("job")]
    for raw in request.args.getlist("jobs"):
        ids += [("jobs", v.strip()) for v in raw.split(",") if v.strip()]
    if not request.args.getlist("job") and not request.args.getlist("jobs"):
        return None
    if not ids:
        raise invalid("jobs", "names no job; give job ids separated by commas, or leave it out for every job")
    for field, job_id in ids:
        if not ID_RE.match(job_id):
            raise invalid(field, f"must be job ids this API returned, got {job_id[:40]!r}")
    chosen = frozenset(job_id for _, job_id in ids)
    if len(chosen) > MAX_JOBS:
        raise invalid("jobs", f"names {len(chosen)} jobs; at most {MAX_JOBS} (open another stream, or none: every job)")
    return chosen


def resume_after() -> int | None:
    """The event id to resume after: Last-Event-ID, else ?after=; None for
    neither. Each given is checked, even when the header wins."""
    found = []
    for field, raw in (("Last-Event-ID", request.headers.get("Last-Event-ID")), ("after", request.args.get("after"))):
        if raw is None:
            continue
        if not EVENT_ID_RE.fullmatch(raw.strip()):
            raise invalid(field, f"must be the id of an event this stream sent (an integer), got {raw[:40]!r}")
        found.append(int(raw))
    return found[0] if found else None


def frame(e) -> str:
    body = {"job_id": e.job_id, **serialize.event(e, url_for_key(e.job_id))}
    return f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(body)}\n\n"


@bp.get("")
@require_key
def tenant_events():
    streaming = request.accept_mimetypes.best_match(["application/json", "text/event-stream"]) == "text/event-stream"
    jobs = job_filter()
    after = resume_after()
    tenant_id = caller().tenant_id
    c = ctx()
    if not streaming:
        with c.session() as session:
            events = joblib.tenant_events(session, tenant_id, after or 0, jobs, limit=PAGE)
        return {"data": [{"job_id": e.job_id, **serialize.event(e, url_for_key(e.job_id))} for e in events]}
    if after is None:
        with c.session() as session:
            after = joblib.last_event_id(session)
    if handoff_server() is not None:
        hold = held.slots().take(tenant_id, "event stream", thread=False)
        request.environ[fanout.ENV_PLAN] = fanout.Plan(tenant_id=tenant_id, hold=hold, after=after, jobs=jobs,
                                                       seconds=c.settings.event_stream_seconds)
        return stream_response()
    hold = held.slots().take(tenant_id, "event stream")
    resp = Response(stream_with_context(_poll(tenant_id, jobs, after, hold)), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.call_on_close(hold.release)
    return resp


def _poll(tenant_id: str, jobs: frozenset[str] | None, after: int, hold: held.Hold):
    """The stream from this thread, polling the database (embedded: SQLite
    commits one writer at a time, so ids arrive in order)."""
    c = ctx()
    try:
        yield f"retry: {RECONNECT_MS}\n\n"
        now = time.monotonic()
        deadline, quiet_since = now + c.settings.event_stream_seconds, now
        while time.monotonic() < deadline:
            with c.session() as session:
                events = joblib.tenant_events(session, tenant_id, after, jobs)
            for e in events:
                after = e.id
                yield frame(e)
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEP_ALIVE:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            hold.renew()
            time.sleep(POLL)
    finally:
        hold.release()
