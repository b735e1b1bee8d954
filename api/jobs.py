"""The /v1/jobs routes: submit, read, list, cancel, events, and output files."""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Literal

from flask import Blueprint, Response, request, stream_with_context
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from werkzeug.http import parse_etags

from api import fanout, held, idempotency, serialize
from api.auth import caller, require_key
from api.context import ctx
from api.errors import ApiError, invalid
from api.limits import lock_for_active_jobs, too_many_active
from genq import catalog
from genq import jobs as joblib
from genq import position, retention
from genq.schema import File, Job, Tenant
from genq.serialize import output_urls
from genq.states import JobStatus, JobType
from genq.storage import NotFound, UnsafeKey, job_key
from genq.webhook_guard import Policy, WebhookRefused, check_at_submit
from models import finetune, image_finetune

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

EVENT_TYPES = ("start", "progress", "completed")
FINE_TUNE = JobType.FINE_TUNE.value
ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Output files' content types by extension, as the families write them.
OUTPUT_TYPES = {"png": "image/png", "wav": "audio/wav", "webp": "image/webp"}
# A stream's event ids: `N` (a durable event) or `N.k` (N, then live output k).
EVENT_ID_RE = re.compile(r"^([0-9]{1,18})(?:\.([0-9]{1,18}))?$")


class JobCreate(BaseModel):
    """The body of POST /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="A model name from GET /v1/models.")
    type: str | None = Field(default=None, description="Must match the model's type if given; 'fine-tune' trains a new version of the model.")
    input: dict = Field(description="The model's input; its schema is in GET /v1/models/<name>.")
    priority: int = Field(default=0, ge=-100, le=100,
                          description="Orders your own jobs: higher runs first, then older. Across tenants the queue "
                                      "takes turns (each tenant's first job, then each one's second, ...), so a "
                                      "priority never jumps another tenant's jobs.")
    webhook: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^/?#@\s]+(?:[/?#]\S*)?$",
                                   description="URL to POST job events to: https, a public host (checked again when sending).")
    webhook_events_filter: list[Literal["start", "progress", "completed"]] | None = Field(default=None, max_length=3)


MAX_DEPTH = 32


def json_body() -> dict:
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_tree(body, "", 0)
    return _integral_floats(body)


def _integral_floats(value):
    """JSON has one number type: 104.0 is the integer 104 to JSON Schema, so
    integer fields must accept it. Strict validation rejects floats for ints,
    so integral floats become ints first (float fields take ints as they are)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats(v) for v in value]
    return value


def _check_tree(value, path: str, depth: int) -> None:
    """Refuse what no model input needs and some backends choke on: nesting
    past MAX_DEPTH, and NUL characters (Postgres text cannot hold them)."""
    if depth > MAX_DEPTH:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels (at {path or 'the top'})")
    if isinstance(value, str):
        if "\x00" in value:
            raise invalid(path or "body", "must not contain NUL (\\u0000) characters")
    elif isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                raise invalid(path or "body", "has a key containing a NUL character")
            _check_tree(v, f"{path}.{k}" if path else k, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_tree(v, f"{path}.{i}", depth + 1)


def url_for_key(job_id: str):
    # The configured public URL, never the request's Host header: a client
    # must not be able to choose where the links in its answer point.
    return output_urls(ctx().storage, ctx().settings.api_base_url, job_id)


def render(job: Job) -> dict:
    # A job read by read_own has no tenant_id: it is the caller's.
    return serialize.job(job, url_for_key(job.id), retention_of(getattr(job, "tenant_id", None))["outputs"])


def queue_of(job, context) -> dict | None:
    """A queued job's place in line (genq.position), or None."""
    if job.status != JobStatus.QUEUED.value:
        return None
    return queue_of_id(job.id, context)


def queue_of_id(job_id: str, context) -> dict | None:
    """The place in line of the job `job_id` if it is queued, or None."""
    fresh, place = context.line.kept(job_id)
    if not fresh:
        # A connection only when the place is not in memory: a poll of a queued
        # job then makes its one statement (the job's) most of the time.
        with context.read() as conn:
            place = context.line.place(conn, job_id)
    return place.shown() if place is not None else None


def retention_of(tenant_id: str | None) -> dict[str, int]:
    """A tenant's retention (genq.retention): the caller's came with its key
    (cached with it, GENQ_KEY_CACHE_SECONDS); another tenant's (an admin's
    view) is read."""
    c, who = ctx(), caller()
    if tenant_id is None or tenant_id == who.tenant_id:
        return retention.effective(c.settings, who.retention)
    with c.session() as session:
        return retention.effective(c.settings, session.scalar(select(Tenant.retention).where(Tenant.id == tenant_id)))


def own_job(session, job_id: str) -> Job:
    job = session.get(Job, job_id) if ID_RE.match(job_id) else None
    if job is None or job.tenant_id != caller().tenant_id:
        # Someone else's job looks exactly like no job at all.
        raise ApiError(404, f"no job {job_id!r}")
    return job


def prefer_wait() -> float:
    prefer = request.headers.get("Prefer", "")
    match = re.search(r"\bwait=(\d+)", prefer)
    if not match:
        return 0.0
    return float(min(int(match.group(1)), ctx().settings.max_prefer_wait))


def waited(job: Job) -> tuple[Job, dict]:
    """Honour `Prefer: wait=N` if a held-request slot is free: the job once it
    ended or N s passed, and a Preference-Applied header. Without a slot the
    preference is ignored, as RFC 7240 allows: a submit never fails because its
    wait could not be granted; the client polls instead."""
    wait = prefer_wait()
    if not wait:
        return job, {}
    applied = {"Preference-Applied": f"wait={int(wait)}"}
    if JobStatus(job.status).terminal:
        return job, applied
    try:
        hold = held.slots().take(caller().tenant_id, "wait")
    except held.Refused:
        return job, {}
    with hold:
        return wait_for_terminal(job, wait, hold), applied


def wait_for_terminal(job: Job, seconds: float, hold: held.Hold) -> Job:
    deadline = time.monotonic() + seconds
    while not JobStatus(job.status).terminal and time.monotonic() < deadline:
        time.sleep(0.1)
        hold.renew()
        with ctx().session() as session:
            job = session.get(Job, job.id)
    return job


@bp.post("")
@require_key
def create_job():
    c = ctx()
    body = json_body()
    # A retry with the same Idempotency-Key gets the job the first request made.
    idem = idempotency.from_request("job", body)
    if idem is not None and (earlier := idem.earlier()) is not None:
        return respond(earlier, idempotency.REPLAYED)
    req = JobCreate.model_validate(body, strict=True)
    if req.type == FINE_TUNE:
        spec, inp, pool, batch_key = fine_tune_request(req)
    else:
        with c.session() as session:
            spec = catalog.resolve(session, c.registry, req.model, caller().tenant_id)
        if spec is None:
            if catalog.FT_MARK in req.model:
                # Another tenant's fine-tuned model does not exist for this caller.
                raise ApiError(404, f"no model {req.model!r}")
            raise invalid("model", f"unknown model {req.model!r}; GET /v1/models lists them")
        if req.type is not None and req.type != spec.family:
            raise invalid("type", f"model {req.model!r} runs {spec.family!r} jobs, not {req.type!r}")
        inp = spec.validate(req.input)
        check_input_files(spec, inp)
        if getattr(inp, "seed", "absent") is None:
            # Record the seed we chose so the job can be reproduced exactly.
            inp = inp.model_copy(update={"seed": secrets.randbelow(2**32)})
        pool, batch_key = spec.pool, spec.batch_key(inp)
    if req.webhook is not None:
        try:
            check_at_submit(req.webhook, Policy.from_settings(c.settings))
        except WebhookRefused as exc:
            raise invalid("webhook", exc.message) from None
    job_args = dict(
        tenant_id=caller().tenant_id,
        type_=req.type or spec.family,
        model=spec.name,
        pool=pool,
        batch_key=batch_key,
        input_=inp.model_dump(mode="json"),
        priority=req.priority,
        webhook=req.webhook,
        webhook_events_filter=list(req.webhook_events_filter) if req.webhook_events_filter is not None else None,
        max_attempts=c.settings.max_attempts,
        # A fine-tune runs on its own; a job for a LoRA fine-tune, on the base it is served on.
        batch_model=spec.name if req.type == FINE_TUNE else spec.batch_model,
    )
    if idem is None and c.driver_reads:
        # Postgres, no Idempotency-Key: one pipelined transaction at the driver,
        # holding the tenant's lock no longer than the server runs it.
        try:
            with c.driver(autocommit=False) as conn:
                job = joblib.submit_pipelined(conn, joblib.new_job_values(**job_args), c.settings.max_active_jobs)
        except joblib.TooManyActive as exc:
            raise too_many_active(exc, c.settings) from None
        c.doorbells.ring(job.id, job.pool, notify=True)
        return respond(job)
    with idempotency.race(idem) as race, c.session() as session, session.begin():
        most = lock_for_active_jobs(session, caller().tenant_id, c.settings)
        try:
            job = joblib.submit(session, **job_args, max_active=most)
        except joblib.TooManyActive as exc:
            raise too_many_active(exc, c.settings) from None
        race.record(session, job.id)
    if race.winner is not None:  # a concurrent request with the same key committed first
        return respond(race.winner, idempotency.REPLAYED)
    # Ring only after the commit: a worker must find the row it is told about.
    # Sent by a thread of this process after the answer (api/doorbell.py): a
    # doorbell is a hint, and a broker that is down, or a process that dies
    # before sending it, loses nothing: the reconciler beside every worker
    # rings for a job queued past its grace period.
    c.doorbells.ring(job.id, job.pool)
    return respond(job)


def respond(job: Job | str, headers: dict | None = None):
    """The reply to a submit: the job (after `Prefer: wait`), 200 once terminal, else 202."""
    if isinstance(job, str):
        with ctx().session() as session:
            job = session.get(Job, job)
    job, applied = waited(job)
    status = 200 if JobStatus(job.status).terminal else 202
    return render(job), status, {"Location": f"/v1/jobs/{job.id}", **applied, **(headers or {})}


def check_input_files(spec, inp) -> None:
    """Each file id in the input's file fields (an image-to-image job's
    `image`) names an image of the caller's: another tenant's, or none, is
    404. The upload was checked against the service's bounds; the model's own
    (max_input_bytes, max_input_pixels) may be tighter, so it is read once
    more against them (a decode, bounded by the upload's bytes and pixels)."""
    from models.image_input import MAX_BYTES, MAX_PIXELS, ImageRefused, check, is_file_id

    ids = {name: getattr(inp, name) for name in getattr(spec.module, "FILE_FIELDS", ())}
    ids = {name: value for name, value in ids.items() if isinstance(value, str) and is_file_id(value)}
    if not ids:
        return
    with ctx().session() as session:
        for name, file_id in ids.items():
            f = session.get(File, file_id)
            if f is None or f.tenant_id != caller().tenant_id:
                message = f"no file {file_id!r}; upload one with POST /v1/files and purpose=image"
                raise ApiError(404, f"input.{name}: {message}", errors=[{"field": f"input.{name}", "message": message}])
            if f.purpose != "image":
                raise invalid(f"input.{name}", f"file {f.id} has purpose {f.purpose!r}, not 'image'")
            try:
                check(ctx().storage.get(f.storage_key), spec.limits.get("max_input_bytes", MAX_BYTES),
                      spec.limits.get("max_input_pixels", MAX_PIXELS))
            except ImageRefused as exc:
                raise invalid(f"input.{name}", f"file {f.id} {exc}") from None


def fine_tune_request(req: JobCreate):
    """Check a fine-tune job: a text model from the registry as base, a valid
    input, a training file of the caller's, and no more work than the limits allow."""
    c = ctx()
    spec = c.registry.get(req.model)
    if spec is None:
        raise invalid("model", f"unknown base model {req.model!r}; fine-tune a model from GET /v1/models")
    if spec.family not in ("text-generation", "image-generation"):
        raise invalid("model", f"only text-generation and image-generation models can be fine-tuned; {req.model!r} "
                               f"is {spec.family!r}")
    trainer = image_finetune if spec.family == "image-generation" else finetune
    inp = trainer.validate(req.input, spec.limits)
    with c.session() as session:
        f = own_dataset(session, "input.training_file", inp.training_file)
        if (f.format == image_finetune.FORMAT) != (trainer is image_finetune):
            raise invalid("input.training_file", f"file {f.id} is a {f.format} dataset; a {spec.family} model trains "
                                                 f"on " + ("a zip of captioned images" if trainer is image_finetune
                                                           else "JSONL rows"))
        validation_file = getattr(inp, "validation_file", None)
        v = own_dataset(session, "input.validation_file", validation_file) if validation_file else None
        rows, fmt = f.rows, f.format
        validation = (v.format, v.rows) if v is not None else None
    # The dataset's size is known from its upload: bound the whole run now, not after hours of it.
    trainer.check_workload(inp, rows, spec.limits, max_train_steps=c.settings.max_train_steps,
                            max_train_examples=c.settings.max_train_examples)
    if trainer is finetune:
        chat_template = finetune.chat_template_known(spec.checkpoint, c.settings.model_dir) if fmt == "chat" else None
        finetune.check_datasets(inp, fmt, rows, validation, chat_template)
    # Never batched: one training job per claim, on the training pool.
    return spec, inp, c.settings.training_pool, FINE_TUNE


def own_dataset(session, field: str, file_id: str) -> File:
    """The caller's fine-tuning dataset `file_id`: another tenant's, or none, is 404."""
    f = session.get(File, file_id)
    if f is None or f.tenant_id != caller().tenant_id:
        # Unknown or not yours: 404, like any object the caller cannot see.
        message = f"no file {file_id!r}; upload one with POST /v1/files"
        raise ApiError(404, f"{field}: {message}", errors=[{"field": field, "message": message}])
    if f.purpose != "fine-tune":
        raise invalid(field, f"file {f.id} has purpose {f.purpose!r}, not 'fine-tune'")
    return f


@bp.get("/<job_id>")
@require_key
def get_job(job_id: str):
    job = read_own_job(job_id)
    job, applied = waited(job)
    c = ctx()
    status, headers, body = poll_answer(job, request.headers.get("If-None-Match"), c,
                                        retention.effective(c.settings, caller().retention)["outputs"])
    headers.update(applied)
    if status == 304:
        return Response(status=304, headers=headers)
    return body, headers


# Seconds a client had best wait before polling a job again, by status.
POLL_HINT = {JobStatus.QUEUED.value: "2", JobStatus.RUNNING.value: "1"}


def poll_answer(job, if_none_match: str | None, context, output_retention: int) -> tuple[int, dict, dict | None]:
    """What a poll of its owner's job answers (the view's and api/fastpoll.py's
    alike): 304 and no body when `If-None-Match` names the job's ETag, else
    200 and the job (with its place in line while queued, and when its outputs
    expire given `output_retention`); with the ETag, and Retry-After while the
    job has not ended."""
    queue = queue_of(job, context)
    headers = {"ETag": etag(job, queue), "Cache-Control": "private, no-cache"}
    if not JobStatus(job.status).terminal:
        # When to poll again: a hint, not a limit.
        headers["Retry-After"] = POLL_HINT[job.status]
    if if_none_match and parse_etags(if_none_match).contains_weak(headers["ETag"][3:-1]):
        # The caller's copy is current: no body. Only the owner gets this far.
        return 304, headers, None
    return 200, headers, serialize.job(job, output_urls(context.storage, context.settings.api_base_url, job.id),
                                       output_retention, queue)


def read_own_job(job_id: str):
    """The caller's job by id, in one statement outside any transaction; 404
    when there is none or it is another tenant's. A connection the database
    dropped since it was last used is replaced and the read tried once more
    (it changes nothing, so it may be repeated)."""
    if not ID_RE.match(job_id):
        raise ApiError(404, f"no job {job_id!r}")
    tenant_id = caller().tenant_id
    for attempt in (1, 2):
        try:
            if ctx().driver_reads:
                with ctx().driver() as conn:
                    job = joblib.read_own_driver(conn, job_id, tenant_id)
            else:
                with ctx().read() as conn:
                    job = joblib.read_own(conn, job_id, tenant_id)
            break
        except DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated:
                raise
    if job is None:
        # Someone else's job looks exactly like no job at all.
        raise ApiError(404, f"no job {job_id!r}")
    return job


_ETAG_JSON = json.JSONEncoder(sort_keys=True, default=str, separators=(",", ":"))


def etag(job, queue: dict | None = None) -> str:
    """A weak validator of what GET shows of the job: it changes whenever
    its status, progress, output, error, update time or place in line do.
    Weak, because the output's presigned URLs are signed anew on each answer."""
    # One encoding of all the parts by an encoder made once: json.dumps with
    # arguments builds an encoder per call, and seven calls were a third of a
    # poll's CPU when it reads the database.
    parts = [job.id, job.status, job.updated_at.isoformat(), job.attempts, job.cancel_requested,
             job.progress, job.output, job.error, job.metrics, job.started_at, job.completed_at, queue]
    return f'W/"{hashlib.blake2b(_ETAG_JSON.encode(parts).encode(), digest_size=12).hexdigest()}"'


def job_types(registry) -> list[str]:
    """The job types there are: the registry's model families, and fine-tune."""
    return sorted({spec.family for spec in registry} | {FINE_TUNE})


def page_args() -> tuple[int, str | None]:
    """?limit= (1-100, default 20) and ?cursor= (an id this API returned)."""
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise invalid("limit", f"must be an integer from 1 to 100, got {raw!r}")
    cursor = request.args.get("cursor")
    if cursor is not None and not ID_RE.match(cursor):
        raise invalid("cursor", "is not a cursor this API returned")
    return int(raw), cursor


@bp.get("")
@require_key
def list_jobs():
    limit, cursor = page_args()
    # Core rows, not ORM objects: a page is read, rendered and forgotten.
    query = select(*joblib.SHOWN).where(Job.tenant_id == caller().tenant_id)
    status = request.args.get("status")
    if status is not None:
        if status not in {s.value for s in JobStatus}:
            raise invalid("status", f"must be one of {[s.value for s in JobStatus]}, got {status!r}")
        query = query.where(Job.status == status)
    if (model := request.args.get("model")) is not None:
        query = query.where(Job.model == model)
    if (type_ := request.args.get("type")) is not None:
        if type_ not in (types := job_types(ctx().registry)):
            raise invalid("type", f"must be one of {types}, got {type_!r}")
        query = query.where(Job.type == type_)
    if cursor:
        query = query.where(Job.id < cursor)
    with ctx().read() as conn:
        rows = conn.execute(query.order_by(Job.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    return {
        "data": [render(j) for j in page],
        "next_cursor": page[-1].id if len(rows) > limit else None,
    }


@bp.post("/<job_id>/cancel")
@require_key
def cancel_job(job_id: str):
    with ctx().session() as session, session.begin():
        job = joblib.cancel(session, own_job(session, job_id))
    return render(job)


@bp.delete("/<job_id>")
@require_key
def delete_job(job_id: str):
    """A finished job goes, with its events, webhook deliveries and outputs;
    then GET says 404. A job that has not ended: 409, cancel it first."""
    with ctx().session() as session, session.begin():
        owed = retention.delete_job(session, own_job(session, job_id))
    ctx().settle_deletes(owed)
    return Response(status=204)


@bp.get("/<job_id>/events")
@require_key
def job_events(job_id: str):
    streaming = request.accept_mimetypes.best_match(["application/json", "text/event-stream"]) == "text/event-stream"
    after, after_delta = resume_point()
    tenant_id = caller().tenant_id
    with ctx().session() as session:
        # The job before its events: a job seen ended has its completed event among them.
        job = own_job(session, job_id)
        events = joblib.events(session, job.id, after_id=after)
    to_url = url_for_key(job.id)
    if not streaming:
        # Durable events only: live output is for streams.
        return {"data": [serialize.event(e, to_url) for e in events]}
    if after and not events and JobStatus(job.status).terminal:
        # Resumed after the completed event: 204 tells an EventSource to stop reconnecting.
        return "", 204
    if (server := handoff_server()) is not None:
        # Served by the stream server from here on: no thread, no poll (api/fanout.py).
        hold = held.slots().take(tenant_id, "event stream", thread=False)
        request.environ[fanout.ENV_PLAN] = fanout.Plan(
            tenant_id=tenant_id, hold=hold, job_id=job.id, after=after, after_delta=after_delta,
            running=job.status == JobStatus.RUNNING.value, seconds=ctx().settings.event_stream_seconds)
        return stream_response()
    hold = held.slots().take(tenant_id, "event stream")
    resp = Response(stream_with_context(_sse(tenant_id, job.id, events, after, after_delta, to_url, hold)),
                    mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # The WSGI server closes the response however the stream ends, even before
    # its first event (the generator's own `finally` runs only once started).
    resp.call_on_close(hold.release)
    return resp


def handoff_server() -> "fanout.StreamServer | None":
    """The stream server a stream is handed to (gunicorn's StreamWorker, with
    Redis for notifications), or None: the stream is served from this thread."""
    server = request.environ.get(fanout.ENV_SERVER)
    if server is None:
        return None
    if server.streams >= fanout.MAX_STREAMS:
        raise ApiError(503, f"this API process holds its most event streams ({fanout.MAX_STREAMS}); retry in "
                            f"{held.RETRY_AFTER}s", headers={"Retry-After": held.RETRY_AFTER})
    return server


def stream_response() -> Response:
    return Response("", mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def resume_point() -> tuple[int, int]:
    """Where a stream resumes: (the last durable event id seen, the last live
    output index seen, -1 for none), from the SSE Last-Event-ID a reconnecting
    client sends or else the `after` query parameter, both an id this stream
    sent: `N` or `N.k`. The header wins: an EventSource reconnecting sends it
    while its URL still holds the first `after`. The JSON list uses only N."""
    for field, raw in (("Last-Event-ID", request.headers.get("Last-Event-ID", "")),
                       ("after", request.args.get("after", ""))):
        raw = raw.strip()
        if not raw:
            continue
        match = EVENT_ID_RE.fullmatch(raw)
        if not match:
            raise invalid(field, f"must be the id of an event this stream sent (N or N.k), got {raw[:40]!r}")
        return int(match[1]), int(match[2]) if match[2] is not None else -1
    return 0, -1


# Sent first: how long an EventSource waits before reconnecting (ms), and the
# response's headers go out at once even when a resumed stream has nothing new.
RECONNECT_MS = 2000
# A comment this often keeps proxies from closing a quiet stream (seconds).
KEEP_ALIVE = 15.0
# Durable events a job's finish writes (its whole output, then completed):
# every live delta is sent before them.
END_EVENTS = ("output", "completed")
# The database is asked for new durable events at most this often (seconds);
# between asks the stream waits on live output, which wakes it at once.
POLL = 0.25


def _sse(tenant_id: str, job_id: str, first: list, last_id: int, last_delta: int, to_url, hold: held.Hold):
    """Stream a job's events as Server-Sent Events until it completes, or for
    GENQ_EVENT_STREAM_SECONDS: then the client reconnects with Last-Event-ID
    and misses nothing. Holds a held-request slot throughout.

    Durable events (from the database) and live output (genq.live: `output`
    events with {"delta", "index"}) are merged. An event's id is the stream's
    cursor: `N`, the last durable event id sent, and once live output has been
    sent `N.k`, k its last index; so resuming after any event replays nothing."""
    c = ctx()
    live = c.live

    def cursor() -> str:
        return f"{last_id}.{last_delta}" if last_delta >= 0 else str(last_id)

    def outputs(deltas):
        nonlocal last_delta
        for index, delta in deltas:
            last_delta = index
            yield f"id: {cursor()}\nevent: output\ndata: {json.dumps({'delta': delta, 'index': index})}\n\n"

    try:
        yield f"retry: {RECONNECT_MS}\n\n"
        pending = first
        now = time.monotonic()
        deadline, next_poll, quiet_since = now + c.settings.event_stream_seconds, now + POLL, now
        # While the job is queued: its place in line when it changes (genq.position), no id.
        place, next_place = None, now + position.POOL_SECONDS / 2
        while True:
            if next_place is not None and time.monotonic() >= next_place:
                shown = queue_of_id(job_id, c)
                if shown is None:
                    next_place = None  # started (or ended): no place any more
                else:
                    next_place = time.monotonic() + position.POOL_SECONDS / 2
                    if shown != place:
                        place = shown
                        quiet_since = time.monotonic()
                        yield f"event: queue\ndata: {json.dumps(shown)}\n\n"
            for e in pending:
                if e.type in END_EVENTS:
                    # The worker publishes a job's last delta before it finishes
                    # the job: read now, every delta precedes the end.
                    yield from outputs(live.read(tenant_id, job_id, after=last_delta, block_seconds=0))
                last_id = e.id
                yield f"id: {cursor()}\nevent: {e.type}\ndata: {json.dumps(serialize.event(e, to_url))}\n\n"
                if e.type == "completed":
                    return
            if pending:
                quiet_since = time.monotonic()
            pending = []
            now = time.monotonic()
            if now >= deadline:
                return
            deltas = live.read(tenant_id, job_id, after=last_delta,
                               block_seconds=max(0.0, min(next_poll, deadline) - now))
            if deltas:
                yield from outputs(deltas)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEP_ALIVE:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            hold.renew()
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL
                with c.session() as session:
                    pending = joblib.events(session, job_id, after_id=last_id)
    finally:
        hold.release()


@bp.get("/<job_id>/outputs/<path:name>")
@require_key
def job_output(job_id: str, name: str):
    """Output files, for local storage (S3 outputs are presigned URLs) — owner only."""
    with ctx().session() as session:
        own_job(session, job_id)
    try:
        # job_key keeps the name under this job's prefix: `..` and the like
        # name no output, rather than another job's (or tenant's) object.
        data = ctx().storage.get(job_key(job_id, name))
    except (NotFound, UnsafeKey):
        raise ApiError(404, f"job {job_id} has no output {name!r}") from None
    mimetype = OUTPUT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")
    return Response(data, mimetype=mimetype)
