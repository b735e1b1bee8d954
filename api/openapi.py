"""The OpenAPI 3.1 document of the API, built from the registry and the same
pydantic models the routes validate with (so it cannot drift from them), and
/docs, which renders it with Swagger UI 5 (flask-swagger-ui's assets, served from here: no internet)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, redirect, request, send_from_directory
from pydantic import TypeAdapter

from api.admin import KeyCreate, PoolView, RetentionSet
from api.catalog import ModelView
from api.context import ctx
from api.errors import ApiError
from api.files import FileView
from api.jobs import JobCreate, job_types
from api.serialize import EventView, TenantEventView
from genq.serialize import JobView
from genq.settings import Settings
from models import finetune, image_finetune
from models.registry import Registry

bp = Blueprint("docs", __name__)

REF = "#/components/schemas/{model}"
ID = {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "An id this API returned."}
TIME = {"type": "string", "format": "date-time"}
TIME_OR_NULL = {"anyOf": [TIME, {"type": "null"}]}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _typed(schemas: dict, shape, name: str) -> dict:
    """The JSON schema of a pydantic model or typed dict as a component; the ones it holds too."""
    schema = TypeAdapter(shape).json_schema(ref_template=REF)
    for sub, sub_schema in schema.pop("$defs", {}).items():
        schemas.setdefault(sub, sub_schema)
    schemas[name] = schema
    return ref(name)


def input_schemas(schemas: dict, registry: Registry, max_train_steps: int = 0) -> list[dict]:
    """One POST /v1/jobs body per model, its input schema bounded by the
    model's registry limits; plus fine-tune (one body per set of bounds its
    base models' limits make) and tenants' fine-tuned versions."""
    variants = []
    for spec in sorted(registry, key=lambda s: s.name):
        name = f"Input_{spec.name}".replace("-", "_")
        schemas[name] = spec.input_schema()
        variants.append(_job_body(schemas, f"JobCreate_{spec.name}".replace("-", "_"),
                                  {"type": "string", "const": spec.name}, ref(name),
                                  {"type": "string", "const": spec.family}))
    text_models = sorted(s.name for s in registry if s.family == "text-generation")
    if text_models:
        groups: dict[str, tuple[list[str], dict]] = {}
        for name in text_models:
            ft = finetune.input_schema(registry.get(name).limits, max_train_steps)
            groups.setdefault(json.dumps(ft, sort_keys=True), ([], ft))[0].append(name)
        for i, (names, ft) in enumerate(groups.values()):
            suffix = "" if len(groups) == 1 else f"_{i + 1}"
            schemas[f"Input_fine_tune{suffix}"] = ft
            variants.append(_job_body(schemas, f"JobCreate_fine_tune{suffix}", {"type": "string", "enum": names},
                                      ref(f"Input_fine_tune{suffix}"), {"type": "string", "const": "fine-tune"},
                                      type_required=True))
    # Image LoRA fine-tunes (models/image_finetune.py) of the text-to-image models.
    image_models = sorted(s.name for s in registry if s.family == "image-generation")
    for name in image_models:
        limits = registry.get(name).limits
        ft = image_finetune.input_schema(limits, max_train_steps)
        schemas[f"Input_fine_tune_{name}".replace("-", "_")] = ft
        variants.append(_job_body(schemas, f"JobCreate_fine_tune_{name}".replace("-", "_"),
                                  {"type": "string", "const": name},
                                  ref(f"Input_fine_tune_{name}".replace("-", "_")),
                                  {"type": "string", "const": "fine-tune"}, type_required=True))
    tuned_inputs, tuned_types = [], []
    if text_models:
        base = next(s for s in registry if s.name == text_models[0])
        schemas["Input_fine_tuned_text"] = base.input_schema()
        tuned_inputs.append(ref("Input_fine_tuned_text"))
        tuned_types.append("text-generation")
    if image_models:
        base = next(s for s in registry if s.name == image_models[0])
        schemas["Input_fine_tuned_image"] = base.input_schema()
        tuned_inputs.append(ref("Input_fine_tuned_image"))
        tuned_types.append("image-generation")
    if tuned_inputs:
        variants.append(_job_body(
            schemas, "JobCreate_fine_tuned",
            {"type": "string", "pattern": r"^[A-Za-z0-9._-]+:ft-[a-z0-9-]+$",
             "description": "A fine-tuned version you own (GET /v1/models); others' are 404."},
            tuned_inputs[0] if len(tuned_inputs) == 1 else {"anyOf": tuned_inputs},
            {"type": "string", "const": tuned_types[0]} if len(tuned_types) == 1 else
            {"type": "string", "enum": tuned_types}))
    return variants


def _job_body(schemas, name, model_schema, input_ref, type_schema, type_required=False) -> dict:
    base = JobCreate.model_json_schema(ref_template=REF)
    props = dict(base["properties"])
    # `type` may be left out or null, except for fine-tune where it says what is meant.
    props.update(model=model_schema, input=input_ref,
                 type=type_schema if type_required else {"anyOf": [type_schema, {"type": "null"}]})
    schema = {"type": "object", "title": name, "additionalProperties": False, "properties": props,
              "required": ["model", "input"] + (["type"] if type_required else [])}
    schemas[name] = schema
    return ref(name)


def _no_nul(schema) -> None:
    """Request strings may not hold NUL (the API refuses it, naming the field):
    say so in every string schema that has no stricter pattern of its own."""
    if isinstance(schema, dict):
        if schema.get("type") == "string" and "pattern" not in schema and "const" not in schema and "enum" not in schema:
            schema["pattern"] = "^[^\\x00]*$"
        if isinstance(schema.get("additionalProperties"), dict) and "propertyNames" not in schema:
            # A map's keys are request strings too (a batch's metadata).
            schema["propertyNames"] = {"pattern": "^[^\\x00]*$"}
        for value in schema.values():
            _no_nul(value)
    elif isinstance(schema, list):
        for value in schema:
            _no_nul(value)


def problem_schema() -> dict:
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "required": ["field", "message"],
                                                   "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }


def listing(item: dict) -> dict:
    return {"type": "object", "required": ["data", "next_cursor"],
            "properties": {"data": {"type": "array", "items": item},
                           "next_cursor": {"anyOf": [ID, {"type": "null"}]}}}


def build(registry: Registry, settings: Settings | None = None) -> dict:
    schemas: dict = {"Problem": problem_schema()}
    # The answers' shapes are the typed dicts their serializers return.
    for name, shape in (("Job", JobView), ("Event", EventView), ("TenantEvent", TenantEventView),
                        ("Model", ModelView), ("File", FileView), ("Pool", PoolView)):
        _typed(schemas, shape, name)
    schemas["JobList"] = listing(ref("Job"))
    schemas["EventList"] = {"type": "object", "required": ["data"],
                            "properties": {"data": {"type": "array", "items": ref("Event")}}}
    schemas["TenantEventList"] = {"type": "object", "required": ["data"],
                                  "properties": {"data": {"type": "array", "items": ref("TenantEvent")}}}
    schemas["ModelList"] = listing(ref("Model"))
    schemas["FileList"] = listing(ref("File"))
    schemas["WebhookSecret"] = {"type": "object", "required": ["key"],
                                "properties": {"key": {"type": "string", "pattern": "^whsec_"},
                                               "previous_key_expires_at": TIME_OR_NULL}}
    schemas["Delivery"] = {"type": "object", "required": ["id", "event", "status", "attempts"],
                           "properties": {"id": {"type": "string"}, "event": {"type": "string"},
                                          "webhook_id": {"type": "string"}, "url": {"type": "string"},
                                          "status": {"type": "string"}, "attempts": {"type": "array", "items": {"type": "object"}},
                                          "next_attempt_at": TIME_OR_NULL,
                                          "last_status_code": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                          "last_error": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                          "created_at": TIME, "updated_at": TIME}}
    schemas["DeliveryList"] = listing(ref("Delivery"))
    _typed(schemas, KeyCreate, "KeyCreate")
    _typed(schemas, RetentionSet, "RetentionSet")
    seconds = {"type": "object", "properties": {f"{k}_seconds": {"anyOf": [{"type": "integer"}, {"type": "null"}]}
                                                for k in ("outputs", "jobs", "files")}}
    schemas["Retention"] = {"type": "object", "required": ["tenant", "own", "effective"],
                            "properties": {"tenant": {"type": "string"}, "own": seconds, "effective": seconds}}
    schemas["Key"] = {"type": "object", "required": ["key", "prefix", "tenant", "role"],
                      "properties": {"key": {"type": "string"}, "prefix": {"type": "string"},
                                     "tenant": {"type": "string"}, "role": {"type": "string"}}}
    schemas["KeyInfo"] = {"type": "object", "required": ["prefix", "tenant", "role", "created_at", "revoked_at"],
                          "properties": {"prefix": {"type": "string"}, "tenant": {"type": "string"},
                                         "role": {"type": "string", "enum": ["user", "admin"]},
                                         "created_at": TIME, "revoked_at": TIME_OR_NULL}}
    schemas["KeyInfoList"] = listing(ref("KeyInfo"))
    schemas["Revoked"] = {"type": "object", "required": ["revoked"], "properties": {"revoked": {"type": "integer"}}}
    schemas["TenantList"] = listing({"type": "object"})
    schemas["Index"] = {"type": "object", "required": ["name", "version", "docs", "openapi", "console"],
                        "properties": {k: {"type": "string"} for k in ("name", "version", "docs", "openapi", "console")}}
    schemas["Health"] = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "const": "ok"}}}
    schemas["Ready"] = {"type": "object", "required": ["status", "checks"],
                        "properties": {"status": {"type": "string", "const": "ready"},
                                       "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schemas["PoolList"] = listing(ref("Pool"))
    schemas["Worker"] = {"type": "object", "required": ["name", "pools", "hostname", "pid", "alive", "draining",
                                                        "running_jobs", "started_at", "last_seen_at", "drain_requested_at"],
                         "properties": {"name": {"type": "string", "description": "The Celery node name (-n)."},
                                        "pools": {"type": "array", "items": {"type": "string"}},
                                        "hostname": {"type": "string"}, "pid": {"type": "integer"},
                                        "alive": {"type": "boolean"}, "draining": {"type": "boolean"},
                                        "running_jobs": {"type": "integer"}, "started_at": TIME,
                                        "last_seen_at": TIME, "drain_requested_at": TIME_OR_NULL}}
    schemas["WorkerList"] = listing(ref("Worker"))
    job_bodies = input_schemas(schemas, registry, settings.max_train_steps if settings else 0)
    schemas["JobCreate"] = {"oneOf": job_bodies}

    def resp(code: int, schema_name: str | None, description: str, headers: dict | None = None) -> tuple[str, dict]:
        out: dict = {"description": description}
        if schema_name:
            media = "application/problem+json" if schema_name == "Problem" else "application/json"
            out["content"] = {media: {"schema": ref(schema_name)}}
        if headers:
            out["headers"] = headers
        return str(code), out

    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    problems = {
        400: "Malformed JSON or body, or an API key in the URL.", 401: "No API key, or not a valid one.",
        403: "The key's role may not do this.", 404: "Unknown, or not yours.", 409: "The object's state does not allow this.",
        413: "Body too large (a file: or past your stored-files quota).",
        415: "Wrong content type.", 422: "Invalid fields; `errors` names each.",
    }

    def op(summary: str, ok: list[tuple[str, dict]], errors: list[int], *, params=None, body=None, tag: str,
           auth: bool = True) -> dict:
        responses = dict(ok)
        # Any route: 400 for a key in the query string; with parameters, 422 for a NUL in one.
        params_in_url = [p for p in params or [] if p["in"] in ("path", "query")]
        for p in params_in_url:
            _no_nul(p["schema"])
        for code in sorted({400, *errors, *([422] if params_in_url else [])}):
            responses[str(code)] = {"description": problems[code],
                                    "content": {"application/problem+json": {"schema": ref("Problem")}}}
        if auth:
            responses["429"] = {"description": "Over a rate limit or quota.", "headers": retry_after,
                                "content": {"application/problem+json": {"schema": ref("Problem")}}}
        responses["503"] = {"description": "A dependency is down.", "headers": retry_after,
                            "content": {"application/problem+json": {"schema": ref("Problem")}}}
        # The first sentence is the one-line summary a viewer shows in the operation's bar; all of it, the description.
        first, sep, _ = summary.partition(". ")
        out = {"summary": first + "." if sep else summary, "tags": [tag], "responses": responses}
        if sep:
            out["description"] = summary
        if params:
            out["parameters"] = params
        if body:
            out["requestBody"] = body
        if not auth:
            out["security"] = []
        return out

    def path_param(name: str, schema: dict | None = None) -> dict:
        return {"name": name, "in": "path", "required": True, "schema": schema or ID}

    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
            {"name": "cursor", "in": "query", "schema": ID}]
    # RFC 7240: preferences a server does not know are ignored, so any value is valid.
    prefer = {"name": "Prefer", "in": "header", "schema": {"type": "string"},
              "description": "wait=N: hold the request up to N s (at most 60) for the job to end; other preferences "
                             "are ignored. Honoured only while the tenant and the server have a held-request slot "
                             "free (Preference-Applied says so); otherwise answered at once."}
    applied = {"Preference-Applied": {"schema": {"type": "string"},
                                      "description": "wait=N when the request was held for Prefer: wait=N."}}
    validators = {
        "ETag": {"schema": {"type": "string"},
                 "description": "A weak tag of what GET shows of the job: it changes with its status, progress, "
                                "output, error or update time. Send it back in If-None-Match."},
        "Retry-After": {"schema": {"type": "integer"},
                        "description": "While the job is queued or running: seconds before polling again is useful "
                                       "(a hint, not a limit). Absent once the job has ended."}}
    if_none_match = {"name": "If-None-Match", "in": "header", "schema": {"type": "string"},
                     "description": "An ETag this route sent: 304 with no body while the job is unchanged. "
                                    "Only the job's owner ever gets a 304."}
    event_id = {"type": "string", "pattern": r"^[0-9]{1,18}(\.[0-9]{1,18})?$"}
    last_event_id = {"name": "Last-Event-ID", "in": "header", "schema": event_id,
                     "description": "Resume a stream after this event id (an EventSource sends it on reconnecting): "
                                    "`N` or `N.k`, as the stream sent it. Wins over `after`."}
    after_event = {"name": "after", "in": "query", "schema": event_id,
                   "description": "Last-Event-ID for clients that cannot set headers: resume after this event id. "
                                  "The JSON list reads only its `N`."}
    json_body = lambda name: {"required": True, "content": {"application/json": {"schema": ref(name)}}}  # noqa: E731
    std = [401, 404]

    paths = {
        "/": {"get": op("Where things are; a browser (Accept: text/html) is redirected to the web console, /console.",
                        [resp(200, "Index", "Links."), resp(302, None, "To /console.", {"Location": {"schema": {"type": "string"}}})],
                        [], tag="service", auth=False)},
        "/healthz": {"get": op("The process is up.", [resp(200, "Health", "Up.")], [], tag="service", auth=False)},
        "/readyz": {"get": op("Database, broker and storage answer.", [resp(200, "Ready", "Ready.")], [], tag="service",
                              auth=False)},
        "/openapi.json": {"get": op("This document.", [resp(200, None, "The OpenAPI document.")], [], tag="service",
                                    auth=False)},
        "/v1/jobs": {
            "post": op("Submit a job.", [resp(202, "Job", "Accepted; poll Location.",
                                              {"Location": {"schema": {"type": "string"}}, **applied}),
                                         resp(200, "Job", "Finished within Prefer: wait.", applied)],
                       [400, 401, 404, 413, 422], params=[prefer], body=json_body("JobCreate"), tag="jobs"),
            "get": op("List your jobs, newest first.", [resp(200, "JobList", "A page of jobs.")], [401, 422],
                      params=page + [
                          {"name": "status", "in": "query",
                           "schema": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]}},
                          {"name": "model", "in": "query", "schema": {"type": "string"}},
                          {"name": "type", "in": "query", "schema": {"type": "string", "enum": job_types(registry)}}],
                      tag="jobs"),
        },
        "/v1/jobs/{job_id}": {"get": op("A job.", [resp(200, "Job", "The job.", {**applied, **validators}),
                                                   resp(304, None, "Not modified since the ETag sent in If-None-Match; "
                                                                   "no body.", validators)],
                                        std, params=[path_param("job_id"), prefer, if_none_match], tag="jobs"),
                              "delete": op("Delete a job that has ended: its row, events, webhook deliveries and "
                                           "outputs. 409 while it is queued or running: cancel it first.",
                                           [resp(204, None, "Deleted.")], std + [409], params=[path_param("job_id")],
                                           tag="jobs")},
        "/v1/jobs/{job_id}/cancel": {"post": op("Cancel a job.", [resp(200, "Job", "Canceled, or cancel requested.")],
                                                std + [409], params=[path_param("job_id")], tag="jobs")},
        "/v1/jobs/{job_id}/events": {"get": op(
            "A job's events; with Accept: text/event-stream, streamed until it ends or for at most "
            "GENQ_EVENT_STREAM_SECONDS (then reconnect with Last-Event-ID). A stream holds one of the tenant's "
            "held-request slots: past them 429; where streams hold a server thread (an embedded server), past "
            "the server's share 503. A stream also carries a running "
            "job's live output as it grows: `event: output` with `data: {\"delta\": \"...\", \"index\": k}`, k "
            "0, 1, 2..., the deltas concatenating to the final output's text, all sent before the durable `output` "
            "event (the whole output, no `delta`) and `completed`. Live output is best-effort (it is dropped while "
            "its store is down); `completed`'s output is the record. Each SSE event id is the stream's cursor: "
            "`N`, the last durable event id sent, or `N.k` once live output k has been sent; resuming after it "
            "(Last-Event-ID or `after`) replays nothing. The JSON list is durable events only.",
            [("200", {"description": "Events.", "content": {"application/json": {"schema": ref("EventList")},
                                                            "text/event-stream": {"schema": {"type": "string"}}}}),
             resp(204, None, "Resumed after the job's completed event: nothing more will come.")],
            std + [422], params=[path_param("job_id"), last_event_id, after_event], tag="jobs")},
        "/v1/events": {"get": op(
            "Every event of your jobs on one connection; with Accept: text/event-stream, streamed for at most "
            "GENQ_EVENT_STREAM_SECONDS (then reconnect with Last-Event-ID). Each event is a job's durable event "
            "with its `job_id`; its SSE id is the event's id, which only grows: resuming after it (Last-Event-ID "
            "or `after`) replays nothing. Without either the stream starts now. `job` (repeated) or `jobs` "
            "(comma-separated) keeps the events of those jobs only, at most 100 ids. Live output deltas are on "
            "each job's own stream. A stream holds one of the tenant's held-request slots: past them 429. The "
            "JSON list is up to 100 events after `after`.",
            [("200", {"description": "Events.", "content": {"application/json": {"schema": ref("TenantEventList")},
                                                            "text/event-stream": {"schema": {"type": "string"}}}})],
            [401, 422], params=[
                {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": r"^[0-9]{1,18}$"},
                 "description": "Resume after this event id (an EventSource sends it on reconnecting). Wins over `after`."},
                {"name": "after", "in": "query", "schema": {"type": "string", "pattern": r"^[0-9]{1,18}$"},
                 "description": "Last-Event-ID for clients that cannot set headers."},
                {"name": "job", "in": "query", "schema": ID, "description": "Only this job's events; repeat for more."},
                {"name": "jobs", "in": "query", "schema": {"type": "string", "pattern": r"^[0-9a-f]{32}(,[0-9a-f]{32})*$"},
                 "description": "Only these jobs' events: ids separated by commas (with `job`, at most 100 in all)."}],
            tag="jobs")},
        "/v1/jobs/{job_id}/outputs/{name}": {"get": op(
            "An output file (local storage; S3 outputs are presigned URLs).",
            [("200", {"description": "The file.", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                                              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})],
            std, params=[path_param("job_id"), path_param("name", {"type": "string", "pattern": "^[A-Za-z0-9._/-]+$"})],
            tag="jobs")},
        "/v1/jobs/{job_id}/webhook-deliveries": {"get": op(
            "Every delivery of the job's webhook events, with every attempt.", [resp(200, "DeliveryList", "Deliveries.")],
            std + [422], params=[path_param("job_id")] + page, tag="webhooks")},
        "/v1/jobs/{job_id}/webhook-deliveries/{delivery_id}/redeliver": {"post": op(
            "Send an event again (409 while the same event is still on its way, or past the job's redelivery limit).",
            [resp(202, "Delivery", "Queued again.")], std + [409],
            params=[path_param("job_id"), path_param("delivery_id", {"type": "string"})], tag="webhooks")},
        "/v1/webhooks/secret": {"get": op("Your webhook signing key.", [resp(200, "WebhookSecret", "The key.")], [401],
                                          tag="webhooks")},
        "/v1/webhooks/secret/rotate": {"post": op("A new signing key; the old signs beside it for a grace period.",
                                                  [resp(200, "WebhookSecret", "The new key.")], [401], tag="webhooks")},
        "/v1/files": {
            "post": op("Upload a fine-tuning dataset (JSONL, checked row by row) or an input image (PNG, JPEG or "
                       "WebP, its type, bytes and pixels checked).", [resp(201, "File", "Stored.")],
                       [400, 401, 413, 415, 422], tag="files", body={"required": True, "content": {"multipart/form-data": {"schema": {
                           "type": "object", "required": ["file", "purpose"],
                           "properties": {"file": {"type": "string", "format": "binary"},
                                          "purpose": {"type": "string", "enum": ["fine-tune", "image"]}}}}}}),
            "get": op("List your files.", [resp(200, "FileList", "A page of files.")], [401, 422], params=page, tag="files"),
        },
        "/v1/files/{file_id}": {"get": op("A file's record.", [resp(200, "File", "The file.")], std,
                                          params=[path_param("file_id")], tag="files"),
                                "delete": op("Delete a file and its content; 409 while a queued or running "
                                             "fine-tune trains on it.", [resp(204, None, "Deleted.")], std + [409],
                                             params=[path_param("file_id")], tag="files")},
        "/v1/files/{file_id}/content": {"get": op(
            "A file's content.", [("200", {"description": "JSONL.", "content": {"application/jsonl": {"schema": {"type": "string"}}}})],
            std, params=[path_param("file_id")], tag="files")},
        "/v1/models": {"get": op("Models you can run, yours included.", [resp(200, "ModelList", "Models.")], [401],
                                 tag="models")},
        "/v1/models/{name}": {"get": op("A model.", [resp(200, "Model", "The model.")], std,
                                        params=[path_param("name", {"type": "string"})], tag="models"),
                              "delete": op("Delete one of your fine-tuned models: its weights and its fine-tune's "
                                           "checkpoints. Jobs still queued for it fail (unknown_model). 403 for a "
                                           "shared model.", [resp(204, None, "Deleted.")], std + [403],
                                           params=[path_param("name", {"type": "string"})], tag="models")},
        "/v1/admin/tenants": {"get": op("Tenants (admin).", [resp(200, "TenantList", "Tenants.")], [401, 403],
                                        tag="admin")},
        "/v1/admin/tenants/{name}/retention": {
            "get": op("A tenant's retention: its own values and those in effect (admin).",
                      [resp(200, "Retention", "Retention.")], [401, 403, 404],
                      params=[path_param("name", {"type": "string"})], tag="admin"),
            "put": op("Set a tenant's own retention, in place of the service's settings (admin).",
                      [resp(200, "Retention", "Retention.")], [400, 401, 403, 404, 422],
                      params=[path_param("name", {"type": "string"})], body=json_body("RetentionSet"), tag="admin")},
        "/v1/admin/keys": {
            "post": op("Create an API key (admin); shown once.", [resp(201, "Key", "The new key.")],
                       [400, 401, 403, 422], body=json_body("KeyCreate"), tag="admin"),
            "get": op("Every API key by its prefix, newest first, revoked ones too (admin).",
                      [resp(200, "KeyInfoList", "Keys.")], [401, 403], tag="admin")},
        "/v1/admin/keys/{prefix}/revoke": {"post": op(
            "Revoke keys by prefix (admin).", [resp(200, "Revoked", "Revoked.")], [401, 403, 404],
            params=[path_param("prefix", {"type": "string"})], tag="admin")},
        "/v1/admin/pools": {"get": op("Pools: queue, workers, throughput (admin).", [resp(200, "PoolList", "Pools.")],
                                      [401, 403], tag="admin")},
        "/v1/admin/pools/{name}/pause": {"post": op(
            "Pause a pool: jobs are accepted and queued, none starts (admin).", [resp(200, "Pool", "Paused.")],
            [401, 403, 404], params=[path_param("name", {"type": "string"})], tag="admin")},
        "/v1/admin/pools/{name}/resume": {"post": op(
            "Resume a pool and ring for its queued jobs (admin).", [resp(200, "Pool", "Running.")],
            [401, 403, 404], params=[path_param("name", {"type": "string"})], tag="admin")},
        "/v1/admin/workers": {"get": op("Workers by heartbeat, with the jobs they hold (admin).",
                                        [resp(200, "WorkerList", "Workers.")], [401, 403], tag="admin")},
        "/v1/admin/workers/{name}/drain": {"post": op(
            "Drain a worker: it finishes its batch and claims nothing new (admin).", [resp(200, "Worker", "Draining.")],
            [401, 403, 404], params=[path_param("name", {"type": "string"})], tag="admin")},
        "/v1/admin/jobs/{job_id}/retry": {"post": op(
            "Queue a failed job again with fresh attempts (admin).", [resp(200, "Job", "Queued again.")],
            [401, 403, 404, 409], params=[path_param("job_id")], tag="admin")},
        "/metrics": {"get": op(
            "Prometheus metrics: jobs by state and pool, queue depth and age, API requests. Needs "
            "'Authorization: Bearer <GENQ_METRICS_TOKEN>' when that is set.",
            [("200", {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}})],
            [401], tag="service", auth=False)},
    }
    # The OpenAI-compatible routes document themselves (api/openai_compat.py).
    from api import openai_compat
    paths.update(openai_compat.openapi_paths(schemas, REF))
    for name in [n for n in schemas if n.startswith(("Input_", "JobCreate", "KeyCreate", "Hyperparameters"))
                 or n in ("OpenAIBatchCreate", "OpenAIChatRequest", "OpenAICompletionRequest", "OpenAIFineTuningCreate",
                          "OpenAIImageRequest")]:
        _no_nul(schemas[name])
    for name, schema in schemas.items():
        # Generators name a class after each title: one title per component,
        # never pydantic's class name (four inputs are each a class `Input`).
        schema["title"] = name
        _drop_null_bounds(schema)
    for path, operations in paths.items():
        for method, operation in list(operations.items()):
            # A copy: one route served at two paths (/v1 and /openai/v1) shares its operation.
            operations[method] = {**operation, "operationId": operation_id(method, path)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "genq", "version": _version(),
                 "description": "A job queue for generative models. Every 4xx/5xx is application/problem+json."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": schemas},
        "paths": paths,
    }


# One name per operation, as generated clients call it (genq_client.api.jobs.create_job...).
OPERATION_IDS = {
    ("get", "/"): "index", ("get", "/healthz"): "healthz", ("get", "/readyz"): "readyz", ("get", "/openapi.json"): "get_openapi",
    ("post", "/v1/jobs"): "create_job", ("get", "/v1/jobs"): "list_jobs", ("get", "/v1/jobs/{job_id}"): "get_job",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancel_job", ("get", "/v1/jobs/{job_id}/events"): "list_job_events",
    ("get", "/v1/events"): "list_events", ("get", "/v1/jobs/{job_id}/outputs/{name}"): "get_job_output",
    ("get", "/v1/jobs/{job_id}/webhook-deliveries"): "list_webhook_deliveries",
    ("post", "/v1/jobs/{job_id}/webhook-deliveries/{delivery_id}/redeliver"): "redeliver_webhook",
    ("get", "/v1/webhooks/secret"): "get_webhook_secret", ("post", "/v1/webhooks/secret/rotate"): "rotate_webhook_secret",
    ("post", "/v1/files"): "upload_file", ("get", "/v1/files"): "list_files", ("get", "/v1/files/{file_id}"): "get_file",
    ("get", "/v1/files/{file_id}/content"): "get_file_content", ("get", "/v1/models"): "list_models",
    ("get", "/v1/models/{name}"): "get_model", ("get", "/v1/admin/tenants"): "list_tenants",
    ("post", "/v1/admin/keys"): "create_key", ("get", "/v1/admin/keys"): "list_keys",
    ("post", "/v1/admin/keys/{prefix}/revoke"): "revoke_key", ("get", "/v1/admin/pools"): "list_pools",
    ("post", "/v1/admin/pools/{name}/pause"): "pause_pool", ("post", "/v1/admin/pools/{name}/resume"): "resume_pool",
    ("get", "/v1/admin/workers"): "list_workers", ("post", "/v1/admin/workers/{name}/drain"): "drain_worker",
    ("post", "/v1/admin/jobs/{job_id}/retry"): "retry_job", ("get", "/metrics"): "get_metrics",
    ("delete", "/v1/jobs/{job_id}"): "delete_job", ("delete", "/v1/files/{file_id}"): "delete_file",
    ("delete", "/v1/models/{name}"): "delete_model", ("get", "/v1/admin/tenants/{name}/retention"): "get_retention",
    ("put", "/v1/admin/tenants/{name}/retention"): "set_retention",
}


def operation_id(method: str, path: str) -> str:
    """The name given above, else one made from the route (`delete_v1_jobs_job_id`): unique either way."""
    return OPERATION_IDS.get((method, path)) or "_".join([method, *re.findall(r"[a-z0-9]+", path.lower())])


def _drop_null_bounds(schema) -> None:
    """A bound pydantic left as null (`"minimum": null`) bounds nothing and is
    not valid JSON Schema: drop it."""
    if isinstance(schema, dict):
        for key in [k for k in BOUNDS if k in schema and schema[k] is None]:
            del schema[key]
        for value in schema.values():
            _drop_null_bounds(value)
    elif isinstance(schema, list):
        for value in schema:
            _drop_null_bounds(value)


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genq")
    except PackageNotFoundError:  # a source tree never installed
        return "0.0.0"


def document() -> dict:
    doc = current_app.extensions.get("genq_openapi")
    if doc is None:
        doc = current_app.extensions["genq_openapi"] = build(ctx().registry, ctx().settings)
    return doc


@bp.get("/openapi.json")
def openapi():
    return document()


def check_query_params() -> None:
    """Unknown query parameters are refused (422 naming them), as unknown body
    fields are; what each route takes is read from this document."""
    rule = request.url_rule
    if rule is None or not request.args:
        return
    path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
    operation = document()["paths"].get(path, {}).get(request.method.lower())
    if operation is None:
        return
    known = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
    unknown = sorted(set(request.args) - known)
    if unknown:
        raise ApiError(422, f"unknown query parameter(s) {unknown}; this route takes {sorted(known) or 'none'}",
                       errors=[{"field": name, "message": "is not a known query parameter"} for name in unknown])


# Swagger UI 5 reads OpenAPI 3.1. validatorUrl null: the page asks nothing of
# any host but this one (by default it would fetch a badge from swagger.io).
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>genq API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", deepLinking: true, validatorUrl: null,
  displayOperationId: true, presets: [SwaggerUIBundle.presets.apis]});</script>
</body></html>"""


def _assets() -> Path:
    # flask-swagger-ui ships Swagger UI 5's built assets; only its files are used, not its blueprint.
    import flask_swagger_ui

    return Path(flask_swagger_ui.__file__).parent / "dist"


@bp.get("/")
def index():
    """A browser is sent to the console; any other client gets where things are."""
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        return redirect("/console", 302)
    return {"name": "genq", "version": _version(), "docs": "/docs", "openapi": "/openapi.json", "console": "/console"}


@bp.get("/docs")
def docs():
    return Response(DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/assets/<name>")
def docs_asset(name: str):
    if name not in ("swagger-ui.css", "swagger-ui-bundle.js"):
        abort(404)
    return send_from_directory(_assets(), name)
