"""OpenAI's Batch API over genq's queue, at /openai/v1: batch input files
(POST /files, purpose "batch", checked line by line before anything is
stored), batches made of them (POST /batches: every line a job, inserted in
bulk at the lowest priority; genq.batches), their state, cancel and result
files. Errors in OpenAI's shape (api/openai_compat.py's handlers)."""
from __future__ import annotations

import datetime as dt
import json

from typing import Literal

from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api import idempotency
from api.auth import caller, require_key
from api.context import ctx
from api.files import display_name
from api.jobs import ID_RE, json_body
from api.limits import check_file_quota
from api.openai_compat import PREFIX, OpenAIError, param_name, parse_body, register_errors, text_inputs
from genq import batches
from genq.queue import publish
from genq.schema import Batch, File, new_id, utcnow
from genq.webhook_guard import Policy, WebhookRefused, check_at_submit
from models.base import InputInvalid
from models.finetune import parse_dataset

bp = Blueprint("openai_batches", __name__)
register_errors(bp)

# Lines one batch file may hold (OpenAI's own bound).
MAX_LINES = 50_000
ENDPOINTS = batches.KINDS
# Doorbells rung for a new batch: a worker serves its pool until nothing is
# queued (worker/runner.py), so a few wake the pool's workers; the rest are
# found in line. More would cost a broker round trip per line.
DOORBELLS = 16


def _epoch(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


# ---- files -------------------------------------------------------------------------------------------------

def describe_file(f: File) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": _epoch(f.created_at),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "status_details": None}


def own_file(session, file_id: str) -> File:
    f = session.get(File, file_id) if ID_RE.match(file_id) else None
    if f is None or f.tenant_id != caller().tenant_id:
        # Another tenant's file looks exactly like no file.
        raise OpenAIError(404, f"No such File object: {file_id}", "file_id", "file_not_found")
    return f


def parse_batch_file(data: bytes) -> list[tuple[str, str, dict]]:
    """(custom_id, endpoint, body) per line; OpenAIError (422) naming the
    first bad line and field. Only shape is checked here: see check_lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _line_error(None, "file", f"is not UTF-8 (byte {exc.start})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _line_error(None, "file", "has no lines; send one JSON request per line")
    if len(lines) > MAX_LINES:
        raise _line_error(None, "file", f"has {len(lines)} lines, more than the {MAX_LINES} a batch may hold")
    out, seen = [], set()
    for n, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise _line_error(n, "line", f"is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(row, dict):
            raise _line_error(n, "line", "must be a JSON object")
        unknown = sorted(set(row) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise _line_error(n, unknown[0], "is not a known field (custom_id, method, url, body)")
        custom_id = row.get("custom_id")
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 512:
            raise _line_error(n, "custom_id", "must be a string of 1 to 512 characters")
        if custom_id in seen:
            raise _line_error(n, "custom_id", f"{custom_id!r:.80} is used by an earlier line; each must be unique")
        seen.add(custom_id)
        if row.get("method") != "POST":
            raise _line_error(n, "method", f"must be 'POST', got {row.get('method')!r:.40}")
        if row.get("url") not in ENDPOINTS:
            raise _line_error(n, "url", f"must be one of {sorted(ENDPOINTS)}, got {row.get('url')!r:.80}")
        if not isinstance(row.get("body"), dict):
            raise _line_error(n, "body", "must be a JSON object: the request's body")
        out.append((custom_id, row["url"], row["body"]))
    return out


def check_lines(lines: list[tuple[str, str, dict]], endpoint: str | None = None) -> list[tuple[int, object, object]]:
    """Every line's body checked as its route would check it, the model's own
    limits included: (line index, model spec, validated job input) each, or
    OpenAIError (422) naming the first bad line and field."""
    specs: dict = {}
    rows = []
    for n, (_, url, body) in enumerate(lines, 1):
        if endpoint is not None and url != endpoint:
            raise _line_error(n, "url", f"is {url!r}, but the batch's endpoint is {endpoint!r}")
        if body.get("stream"):
            raise _line_error(n, "body.stream", "must be false: a batch's results are files")
        if body.get("n") not in (None, 1):
            raise _line_error(n, "body.n", "must be 1 in a batch: one result per line")
        try:
            spec, inputs, _ = text_inputs(ENDPOINTS[url], body, specs)
            rows.append((n - 1, spec, spec.validate(inputs[0])))
        except OpenAIError as exc:
            raise _line_error(n, f"body.{exc.param}" if exc.param else "body", exc.detail) from None
        except InputInvalid as exc:
            field = param_name(exc.errors[0]["field"]) if exc.errors else None
            raise _line_error(n, f"body.{field}" if field else "body", exc.errors[0]["message"] if exc.errors
                              else str(exc)) from None
    return rows


def _line_error(line: int | None, field: str, message: str) -> OpenAIError:
    where = f"line {line}, {field}" if line is not None else field
    return OpenAIError(422, f"{where}: {message}; nothing was stored or queued", "file", "invalid_batch_file")


@bp.post("/files")
@require_key
def upload():
    c = ctx()
    request.max_content_length = c.settings.max_file_bytes
    if not request.mimetype.startswith("multipart/form-data"):
        raise OpenAIError(415, "send the file as multipart/form-data with fields 'file' and 'purpose'", "file")
    purpose = request.form.get("purpose")
    if purpose not in ("batch", "fine-tune"):
        raise OpenAIError(400, f"purpose must be 'batch' or 'fine-tune', got {purpose!r:.40}", "purpose",
                          "invalid_value")
    upload_ = request.files.get("file")
    if upload_ is None:
        raise OpenAIError(400, "file is required: a JSONL file of requests", "file", "missing_required_parameter")
    data = upload_.read()
    name = display_name(upload_.filename)
    with c.session() as session:
        check_file_quota(session, caller().tenant_id, len(data), c.settings)
    if purpose == "batch":
        rows, format_ = len(check_lines(parse_batch_file(data))), "batch"
    else:  # a dataset for POST /openai/v1/fine_tuning/jobs, checked as genq's own upload checks it
        try:
            dataset = parse_dataset(data, max_rows=c.settings.max_dataset_rows)
        except InputInvalid as exc:
            raise OpenAIError(422, f"{exc}; nothing was stored", "file", "invalid_file") from None
        rows, format_ = len(dataset.rows), dataset.format
    file_id = new_id()
    key = f"files/{file_id}/content"
    c.storage.put(key, data, "application/jsonl")
    with c.session() as session, session.begin():
        check_file_quota(session, caller().tenant_id, len(data), c.settings, lock=True)
        f = File(id=file_id, tenant_id=caller().tenant_id, purpose=purpose, filename=name, bytes=len(data),
                 rows=rows, format=format_, storage_key=key)
        session.add(f)
    return describe_file(f)


@bp.get("/files/<file_id>")
@require_key
def get_file(file_id: str):
    with ctx().session() as session:
        return describe_file(own_file(session, file_id))


@bp.get("/files/<file_id>/content")
@require_key
def file_content(file_id: str):
    with ctx().session() as session:
        f = own_file(session, file_id)
    return Response(ctx().storage.get(f.storage_key), mimetype="application/jsonl")


# ---- batches -----------------------------------------------------------------------------------------------

class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=16)
    # genq's own: where the batch's end is posted (the `openai` package sends it
    # with extra_body={"webhook": ...}); checked like a job's webhook.
    webhook: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^/?#@\s]+(?:[/?#]\S*)?$")


describe = batches.describe


def own_batch(session, batch_id: str, lock: bool = False) -> Batch:
    batch = session.get(Batch, batch_id, with_for_update=lock) if ID_RE.match(batch_id) else None
    if batch is None or batch.tenant_id != caller().tenant_id:
        raise OpenAIError(404, f"No such batch: {batch_id}", "batch_id", "batch_not_found")
    return batch


def settle(batch_id: str) -> None:
    """Move the batch along (genq.batches.settle) under its row's lock; also
    done by the workers' reconciler, whichever comes first."""
    c = ctx()
    with c.session() as session, session.begin():
        batch = own_batch(session, batch_id, lock=True)
        batches.settle(session, c.storage, batch)


@bp.post("/batches")
@require_key
def create_batch():
    c = ctx()
    body = json_body()
    idem = idempotency.from_request("batch", body)
    if idem is not None and (earlier := idem.earlier()) is not None:
        return _show(earlier), 200, idempotency.REPLAYED
    # The endpoints and the window (only OpenAI's "24h") are checked by the body's schema.
    req = parse_body(BatchCreate, body)
    if req.webhook is not None:
        try:
            check_at_submit(req.webhook, Policy.from_settings(c.settings))
        except WebhookRefused as exc:
            raise OpenAIError(400, exc.message, "webhook", "invalid_value") from None
    with c.session() as session:
        f = own_file(session, req.input_file_id)
        if f.purpose != "batch":
            raise OpenAIError(400, f"file {f.id} has purpose {f.purpose!r}, not 'batch'", "input_file_id",
                              "invalid_value")
        key = f.storage_key
    # Checked at upload; again here, since the registry (or a fine-tuned model) may have changed since.
    rows = check_lines(parse_batch_file(c.storage.get(key)), req.endpoint)
    now = utcnow()
    batch_id = new_id()
    with idempotency.race(idem) as race, c.session() as session, session.begin():
        batch = Batch(id=batch_id, tenant_id=caller().tenant_id, endpoint=req.endpoint, status="in_progress",
                      input_file_id=req.input_file_id, completion_window=req.completion_window, total=len(rows),
                      metadata_=req.metadata, webhook=req.webhook, created_at=now, in_progress_at=now,
                      expires_at=now + batches.WINDOWS[req.completion_window])
        session.add(batch)
        session.flush()
        queued = batches.insert_jobs(session, tenant_id=caller().tenant_id, batch_id=batch_id, rows=rows,
                                     max_attempts=c.settings.max_attempts)
        race.record(session, batch_id)
    if race.winner is not None:
        return _show(race.winner), 200, idempotency.REPLAYED
    for job_id, pool in queued[:DOORBELLS]:
        publish(c.celery, job_id, pool)
    return describe(batch, {"queued": len(rows)})


def _show(batch_id: str) -> dict:
    with ctx().session() as session:
        batch = own_batch(session, batch_id)
        return describe(batch, batches.counts(session, batch.id))


@bp.get("/batches/<batch_id>")
@require_key
def get_batch(batch_id: str):
    settle(batch_id)
    return _show(batch_id)


@bp.get("/batches")
@require_key
def list_batches():
    raw_limit, after = request.args.get("limit", "20"), request.args.get("after")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise OpenAIError(400, f"limit must be an integer from 1 to 100, got {raw_limit!r:.40}", "limit",
                          "invalid_value")
    if after is not None and not ID_RE.match(after):
        raise OpenAIError(400, f"after must be a batch id, got {after!r:.40}", "after", "invalid_value")
    limit = int(raw_limit)
    query = select(Batch).where(Batch.tenant_id == caller().tenant_id)
    if after:
        query = query.where(Batch.id < after)
    with ctx().session() as session:
        rows = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)))
        data = [describe(b, batches.counts(session, b.id)) for b in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


@bp.post("/batches/<batch_id>/cancel")
@require_key
def cancel_batch(batch_id: str):
    c = ctx()
    with c.session() as session, session.begin():
        batch = own_batch(session, batch_id, lock=True)
        if batch.status == "in_progress":
            now = utcnow()
            batch.status, batch.cancelling_at = "cancelling", now
            batches.cancel_jobs(session, batch.id, now)
            batches.settle(session, c.storage, batch)
        elif batch.status not in ("cancelling", "cancelled"):
            raise OpenAIError(409, f"batch {batch.id} is {batch.status} and cannot be cancelled", None,
                              "batch_not_cancellable")
    return _show(batch_id)


def register(app) -> None:
    app.register_blueprint(bp, url_prefix=PREFIX)


def openapi_paths(schemas: dict, ref_template: str, op) -> dict:
    """These routes' paths for /openapi.json; `op` builds an operation as api/openai_compat.py does."""
    ref = lambda name: {"$ref": ref_template.format(model=name)}  # noqa: E731
    id_param = lambda name: {"name": name, "in": "path", "required": True,  # noqa: E731
                             "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
    schemas["OpenAIFile"] = {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
                             "properties": {"id": {"type": "string"}, "object": {"const": "file"},
                                            "bytes": {"type": "integer"}, "created_at": {"type": "integer"},
                                            "filename": {"type": "string"}, "purpose": {"type": "string"}}}
    schemas["OpenAIBatch"] = {"type": "object", "required": ["id", "object", "endpoint", "status", "request_counts"],
                              "properties": {"id": {"type": "string"}, "object": {"const": "batch"},
                                             "endpoint": {"type": "string"}, "status": {"enum": [
                                                 "validating", "in_progress", "finalizing", "completed", "failed",
                                                 "cancelling", "cancelled", "expired"]},
                                             "request_counts": {"type": "object"}}}
    schemas["OpenAIBatchList"] = {"type": "object", "required": ["object", "data", "has_more"],
                                  "properties": {"object": {"const": "list"},
                                                 "data": {"type": "array", "items": ref("OpenAIBatch")},
                                                 "has_more": {"type": "boolean"}}}
    body = BatchCreate.model_json_schema(ref_template=ref_template)
    schemas["OpenAIBatchCreate"] = body
    upload_body = {"type": "object", "required": ["purpose", "file"],
                   "properties": {"purpose": {"enum": ["batch", "fine-tune"]},
                                  "file": {"type": "string", "format": "binary",
                                           "description": f"JSONL, at most {MAX_LINES} lines of "
                                                          "{custom_id, method, url, body}."}}}
    json_ok = lambda name: {"application/json": {"schema": ref(name)}}  # noqa: E731
    file_errors = {404: "No such file, or not yours."}
    batch_errors = {404: "No such batch, or not yours."}
    return {
        f"{PREFIX}/files": {"post": op(
            "Upload a batch input file or a fine-tuning dataset, every line checked before it is stored.",
            json_ok("OpenAIFile"),
            {413: "Too large, or past your stored-files quota.", 415: "Not multipart/form-data.",
             422: "A bad line: the message names the line and the field."},
            body_content={"multipart/form-data": {"schema": upload_body}})},
        f"{PREFIX}/files/{{file_id}}": {"get": op("A file.", json_ok("OpenAIFile"), file_errors,
                                                  params=[id_param("file_id")])},
        f"{PREFIX}/files/{{file_id}}/content": {"get": op(
            "A file's content (batch results: JSONL, one line per request).",
            {"application/jsonl": {"schema": {"type": "string"}}}, file_errors, params=[id_param("file_id")])},
        f"{PREFIX}/batches": {
            "post": op("Create a batch: every line of the file a job, at the lowest priority.", json_ok("OpenAIBatch"),
                       {404: "No such file, or not yours.", 422: "A line no longer valid (the model changed)."},
                       body=ref("OpenAIBatchCreate")),
            "get": op("Your batches, newest first.", json_ok("OpenAIBatchList"), {},
                      params=[{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                           "maximum": 100}},
                              {"name": "after", "in": "query", "schema": {"type": "string",
                                                                         "pattern": "^[0-9a-f]{32}$"}}])},
        f"{PREFIX}/batches/{{batch_id}}": {"get": op(
            "A batch: its status and request counts; once ended, its output and error files.",
            json_ok("OpenAIBatch"), batch_errors, params=[id_param("batch_id")])},
        f"{PREFIX}/batches/{{batch_id}}/cancel": {"post": op(
            "Cancel a batch: its queued lines end, running ones are asked to stop.", json_ok("OpenAIBatch"),
            {**batch_errors, 409: "The batch has already ended."}, params=[id_param("batch_id")])},
    }
