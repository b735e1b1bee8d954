"""OpenAI-compatible routes: completions, chat completions, image generations
and the model list, as genq jobs (same keys, tenants, queue; each visible in
/v1/jobs), answered and refused in OpenAI's shapes so the `openai` package and
the tools built on it work with only a `base_url`.

Two mounts. `/openai/v1` holds the whole surface: point a client's base_url
there. The generation routes are also at `/v1` (nothing of genq's own lives
at those paths); `GET /v1/models` stays genq's own list, OpenAI's is
`GET /openai/v1/models`.

A request waits for its jobs, holding one of its tenant's held-request slots
(api/held.py) for at most GENQ_OPENAI_WAIT_SECONDS; past it the answer is 504
and the jobs are canceled (the client retries 5xx by default: a retry must not
leave the first attempt's jobs running).
"""
from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Literal

from flask import Blueprint, Response, stream_with_context
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from werkzeug.exceptions import HTTPException

from api import held
from api.auth import caller, require_key
from api.context import ctx
from api.errors import ApiError
from api.jobs import json_body
from api.limits import lock_for_active_jobs, too_many_active
from genq import catalog
from genq import jobs as joblib
from genq.errors import IllegalTransition
from genq.openai_shapes import completion_body, usage
from genq.queue import publish
from genq.schema import Job
from genq.serialize import output_urls
from genq.states import JobStatus
from models.base import InputInvalid, pydantic_errors

# The generation routes: mounted at /v1 and at /openai/v1.
bp = Blueprint("openai", __name__)
# What collides with genq's own routes: only at /openai/v1.
only_prefixed = Blueprint("openai_only", __name__)
PREFIX = "/openai/v1"

# Choices one request may ask for: each is a job.
MAX_N = 8
# How often a waiting request reads its jobs (seconds).
POLL = 0.1
# A quiet stream sends a comment this often, so proxies keep it open (seconds).
KEEP_ALIVE = 15.0
# OpenAI's error `type` by status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout"}
# genq's input fields by the OpenAI parameter they came from, to name the right param in an error.
PARAMS = {"input.prompt": "prompt", "input.messages": "messages", "input.max_new_tokens": "max_tokens",
          "input.temperature": "temperature", "input.top_p": "top_p", "input.stop": "stop", "input.seed": "seed",
          "input.width": "size", "input.height": "size", "input.num_images": "n"}


class OpenAIError(ApiError):
    """An error answered in OpenAI's shape: `param` is the request field at fault, `code` a short reason."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers=headers)
        self.param, self.code = param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                                  "invalid_request_error"),
                      "param": param, "code": code}}
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = str(v)
    return resp


def param_name(field: str | None) -> str | None:
    if not field:
        return None
    if field in PARAMS:
        return PARAMS[field]
    head = ".".join(field.split(".")[:2])
    return PARAMS.get(head, field.removeprefix("input."))


def register_errors(blueprint: Blueprint) -> None:
    """Every refusal on these routes in OpenAI's shape (the app's own handlers answer problem+json)."""

    @blueprint.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        if isinstance(exc, OpenAIError):
            return error_response(exc.status, exc.detail, exc.param, exc.code, exc.headers)
        field = (exc.errors or [{}])[0].get("field")
        status = 400 if exc.status == 422 else exc.status
        return error_response(status, exc.detail, param_name(field), None, exc.headers)

    @blueprint.errorhandler(InputInvalid)
    def _input_invalid(exc: InputInvalid):
        field = exc.errors[0]["field"] if exc.errors else None
        message = "; ".join(f"{param_name(e['field'])}: {e['message']}" for e in exc.errors)
        return error_response(400, message, param_name(field), "invalid_value")

    @blueprint.errorhandler(ValidationError)
    def _body_invalid(exc: ValidationError):
        errors = pydantic_errors(exc, prefix="")
        return error_response(400, "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                              errors[0]["field"] if errors else None, "invalid_value")

    @blueprint.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or "error")


register_errors(bp)
register_errors(only_prefixed)


# ---- request bodies ----------------------------------------------------------------------------------------

class _Sampling(BaseModel):
    """What completions and chat completions share. Fields OpenAI has and genq
    cannot honour are refused when set to anything but their no-op value."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    user: str | None = None
    # Accepted only as no-ops.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None


NO_OPS = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False, 0)}


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and the like: not part of a chat template's input

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str = Field("demo-image", min_length=1, max_length=200)
    n: int | None = Field(None, ge=1)
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$")
    response_format: Literal["url", "b64_json"] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    user: str | None = None
    quality: str | None = None
    style: str | None = None


def parse_body(model: type[BaseModel], body: dict):
    try:
        req = model.model_validate(body, strict=True)
    except ValidationError as exc:
        errors = pydantic_errors(exc, prefix="")
        raise OpenAIError(400, "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                          _body_param(errors[0]["field"]) if errors else None, "invalid_value") from None
    for name, allowed in NO_OPS.items():
        value = getattr(req, name, None)
        if value is not None and value not in allowed:
            raise OpenAIError(400, f"{name}: genq does not support it; leave it unset (got {value!r:.80})", name,
                              "unsupported_parameter")
    return req


# What pydantic puts in an error's location after a field for a union's member, not a field of a nested object.
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _body_param(field: str) -> str:
    """The request parameter an error's location names: the top-level field
    (`stop`, `messages`), or a nested object's field (`hyperparameters.n_epochs`)."""
    parts = field.split(".")
    if len(parts) > 1 and parts[1].isidentifier() and parts[1] not in UNION_TAGS:
        return ".".join(parts[:2])
    return parts[0]


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


def _spec(model: str):
    c = ctx()
    with c.session() as session:
        spec = catalog.resolve(session, c.registry, model, caller().tenant_id)
    if spec is None:
        raise OpenAIError(404, f"The model {model!r} does not exist; GET {PREFIX}/models lists them", "model",
                          "model_not_found")
    return spec


def _seeds(seed: int | None, n: int) -> list[int]:
    # Choice k uses seed + k, so one seed reproduces every choice; none chosen: one is, and recorded on the jobs.
    first = seed if seed is not None else secrets.randbelow(2**32 - MAX_N)
    return [(first + k) % 2**32 for k in range(n)]


def _submit(spec, inputs: list[dict]) -> list[str]:
    """Validate each input as the model's, then queue one job each in one transaction (all or none)."""
    c = ctx()
    validated = [spec.validate(raw) for raw in inputs]
    tenant_id = caller().tenant_id
    ids = []
    with c.session() as session, session.begin():
        most = lock_for_active_jobs(session, tenant_id, c.settings)
        for inp in validated:
            try:
                job = joblib.submit(session, tenant_id=tenant_id, type_=spec.family, model=spec.name, pool=spec.pool,
                                    batch_key=spec.batch_key(inp), input_=inp.model_dump(mode="json"),
                                    max_attempts=c.settings.max_attempts, max_active=most,
                                    batch_model=spec.batch_model)
            except joblib.TooManyActive as exc:
                raise too_many_active(exc, c.settings) from None
            ids.append(job.id)
    for job_id in ids:
        publish(c.celery, job_id, spec.pool)
    return ids


def _read(ids: list[str]) -> list[Job]:
    with ctx().session() as session:
        jobs = {j.id: j for j in session.query(Job).filter(Job.id.in_(ids))}
        for j in jobs.values():
            session.expunge(j)
    if missing := [i for i in ids if i not in jobs]:
        # Deleted (DELETE /v1/jobs/<id>) once it had ended, before this request read it.
        raise OpenAIError(404, f"job {missing[0]} was deleted", None, "job_deleted")
    return [jobs[i] for i in ids]


def _cancel(ids: list[str]) -> None:
    """Cancel those of `ids` still queued or running (a timeout, a client gone)."""
    with ctx().session() as session, session.begin():
        for job in session.query(Job).filter(Job.id.in_(ids)):
            if not JobStatus(job.status).terminal:
                try:
                    joblib.cancel(session, job)
                except IllegalTransition:  # it ended meanwhile: nothing to cancel
                    pass


def _wait(ids: list[str], hold: held.Hold) -> list[Job]:
    """The jobs once all have ended; past GENQ_OPENAI_WAIT_SECONDS they are canceled and 504 is raised."""
    deadline = time.monotonic() + ctx().settings.openai_wait_seconds
    while True:
        jobs = _read(ids)
        if all(JobStatus(j.status).terminal for j in jobs):
            return jobs
        if time.monotonic() >= deadline:
            _cancel(ids)
            raise _timeout(ids)
        hold.renew()
        time.sleep(POLL)


def _timeout(ids: list[str]) -> OpenAIError:
    return OpenAIError(504, f"the request's jobs did not finish within {ctx().settings.openai_wait_seconds:g}s "
                            f"(GENQ_OPENAI_WAIT_SECONDS) and were canceled: {', '.join(ids)}", None, "timeout")


def _hold() -> held.Hold:
    try:
        return held.slots().take(caller().tenant_id, "completion")
    except held.Refused as exc:
        raise OpenAIError(exc.status, exc.detail, None, "too_many_held_requests", exc.headers) from None


def _check_ended(jobs: list[Job]) -> None:
    """A failed or canceled job is the request's error: the first one found."""
    for job in jobs:
        if job.status == JobStatus.SUCCEEDED.value:
            continue
        error = job.error or {}
        if error.get("code") == "no_chat_template":
            raise OpenAIError(422, f"model {job.model!r} has no chat template; use POST /v1/completions with a "
                                   f"prompt", "messages", "no_chat_template")
        if error.get("code") == "invalid_input":
            raise OpenAIError(400, error.get("message", "invalid input"), None, "invalid_value")
        if job.status == JobStatus.CANCELED.value:
            raise OpenAIError(409, f"job {job.id} was canceled", None, "canceled")
        # The model failed: a server error, the job's own code and message.
        raise OpenAIError(500, f"job {job.id} failed: {error.get('message', 'unknown error')}", None,
                          error.get("code", "job_failed"))


# ---- completions and chat completions ----------------------------------------------------------------------

def text_inputs(kind: Literal["completion", "chat"], body: dict, specs: dict | None = None):
    """An OpenAI completion or chat body as (model spec, one genq job input per
    choice, the parsed request); OpenAIError or InputInvalid name what is wrong.
    `specs` caches model lookups across calls (a batch file's lines)."""
    req = parse_body(CompletionRequest if kind == "completion" else ChatRequest, body)
    if specs is not None and req.model in specs:
        spec = specs[req.model]
    else:
        spec = _spec(req.model)
        if specs is not None:
            specs[req.model] = spec
    if spec.family != "text-generation":
        raise OpenAIError(400, f"model {req.model!r} makes {spec.family!r}, not text; "
                               f"use POST {PREFIX}/images/generations", "model", "wrong_model_type")
    base: dict = {}
    if kind == "completion":
        if req.echo or (req.best_of not in (None, 1)) or req.suffix:
            name = "echo" if req.echo else "best_of" if req.best_of not in (None, 1) else "suffix"
            raise OpenAIError(400, f"{name}: genq does not support it; leave it unset", name, "unsupported_parameter")
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise OpenAIError(400, "prompt: send one prompt per request (a list of exactly one)", "prompt",
                                  "invalid_value")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        base["prompt"] = prompt
        max_tokens = req.max_tokens or 16  # OpenAI's default for completions
    else:
        messages = []
        for k, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):  # content parts: text only
                if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                    raise OpenAIError(400, f"messages.{k}.content: only text parts are supported",
                                      f"messages.{k}.content", "invalid_value")
                content = "".join(p["text"] for p in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        base["messages"] = messages
        max_tokens = req.max_completion_tokens or req.max_tokens or spec.limits.get("max_new_tokens") or 256
    base["max_new_tokens"] = max_tokens
    if req.temperature is not None:
        base["temperature"] = req.temperature
    if req.top_p is not None:
        base["top_p"] = req.top_p
    if stops := _stops(req.stop):
        base["stop"] = stops
    return spec, [{**base, "seed": seed} for seed in _seeds(req.seed, req.n or 1)], req


def _text_request(kind: Literal["completion", "chat"]):
    spec, inputs, req = text_inputs(kind, json_body())
    ids = _submit(spec, inputs)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return spec, ids, bool(req.stream), include_usage


def _held(submit):
    """A held-request slot, then `submit()`: a request that cannot wait queues nothing."""
    hold = _hold()
    try:
        return hold, submit()
    except BaseException:
        hold.release()
        raise


def _answer(kind: Literal["completion", "chat"]):
    hold, (spec, ids, stream, include_usage) = _held(lambda: _text_request(kind))
    if stream:
        resp = Response(stream_with_context(_stream(kind, spec.name, ids, hold, include_usage)),
                        mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        resp.call_on_close(hold.release)
        return resp
    with hold:
        jobs = _wait(ids, hold)
    _check_ended(jobs)
    return completion_body(kind, jobs, spec.name)


def _chunk(kind: str, ids: list[str], created: int, model: str, index: int, text: str | None,
           finish: str | None, first: bool = False) -> str:
    if kind == "completion":
        body = {"id": f"cmpl-{ids[0]}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}]}
    else:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        body = {"id": f"chatcmpl-{ids[0]}", "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def _stream(kind: str, model: str, ids: list[str], hold: held.Hold, include_usage: bool):
    """OpenAI's server-sent chunks: each choice's live deltas (genq.live) as
    they come, its finish, then `data: [DONE]`. A job that fails mid-stream
    ends the stream with an error chunk in OpenAI's error shape. A client that
    goes away cancels the jobs it left."""
    c = ctx()
    tenant_id = caller().tenant_id
    created = int(time.time())
    sent = {job_id: -1 for job_id in ids}  # the last live delta index sent per job
    text = {job_id: "" for job_id in ids}
    finished: set[str] = set()
    deadline = time.monotonic() + c.settings.openai_wait_seconds
    completed = False
    quiet_since = time.monotonic()
    try:
        # A comment (clients skip it) sends the headers now, whatever the queue's wait.
        yield ": queued\n\n"
        if kind == "chat":
            for k in range(len(ids)):
                yield _chunk(kind, ids, created, model, k, "", None, first=True)
        while True:
            jobs = _read([i for i in ids if i not in finished])
            for job in jobs:
                k = ids.index(job.id)
                terminal = JobStatus(job.status).terminal
                # Read after the status: a job seen ended has published its every delta.
                for index, delta in c.live.read(tenant_id, job.id, after=sent[job.id], block_seconds=0):
                    sent[job.id] = index
                    text[job.id] += delta
                    quiet_since = time.monotonic()
                    yield _chunk(kind, ids, created, model, k, delta, None)
                if not terminal:
                    continue
                finished.add(job.id)
                if job.status != JobStatus.SUCCEEDED.value:
                    _check_ended([job])  # raises: the stream ends with its error
                final = job.output["text"]
                if final.startswith(text[job.id]) and len(final) > len(text[job.id]):
                    # Live output is best-effort: what was not streamed comes now.
                    yield _chunk(kind, ids, created, model, k, final[len(text[job.id]):], None)
                yield _chunk(kind, ids, created, model, k, None if kind == "chat" else "",
                             job.output.get("finish_reason"))
            if len(finished) == len(ids):
                if include_usage:
                    body = {"id": f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{ids[0]}",
                            "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
                            "created": created, "model": model, "choices": [], "usage": usage(_read(ids))}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                completed = True
                return
            if time.monotonic() >= deadline:
                raise _timeout(ids)
            hold.renew()
            if time.monotonic() - quiet_since >= KEEP_ALIVE:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            # Wait for the next delta of one running job (or POLL), then look at them all again.
            running = [i for i in ids if i not in finished]
            c.live.read(tenant_id, running[0], after=sent[running[0]], block_seconds=POLL)
    except OpenAIError as exc:
        # The headers went out long ago: the error is the stream's last chunk, in OpenAI's shape.
        yield "data: " + json.dumps({"error": {"message": exc.detail, "type": ERROR_TYPES.get(
            exc.status, "server_error"), "param": exc.param, "code": exc.code}}) + "\n\n"
    finally:
        if not completed:
            _cancel(ids)  # the client went away
        hold.release()


@bp.post("/completions")
@require_key
def completions():
    return _answer("completion")


@bp.post("/chat/completions")
@require_key
def chat_completions():
    return _answer("chat")


# ---- images ------------------------------------------------------------------------------------------------

@bp.post("/images/generations")
@require_key
def image_generations():
    c = ctx()
    req = parse_body(ImageRequest, json_body())
    spec = _spec(req.model)
    if spec.family != "image-generation":
        raise OpenAIError(400, f"model {req.model!r} makes {spec.family!r}, not images", "model", "wrong_model_type")
    inp: dict = {"prompt": req.prompt, "seed": _seeds(req.seed, 1)[0]}
    if req.n is not None:
        inp["num_images"] = req.n
    if req.size is not None:
        width, height = (int(v) for v in req.size.split("x"))
        inp["width"], inp["height"] = width, height
    hold, ids = _held(lambda: _submit(spec, [inp]))
    with hold:
        jobs = _wait(ids, hold)
    _check_ended(jobs)
    job = jobs[0]
    url_for = output_urls(c.storage, c.settings.api_base_url, job.id)
    data = []
    for image in job.output.get("images", []):
        if req.response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(c.storage.get(image["key"])).decode()})
        else:
            data.append({"url": url_for(image["key"])})
    return {"created": int(job.created_at.timestamp()), "data": data}


# ---- models ------------------------------------------------------------------------------------------------

def _model(spec, owned: bool) -> dict:
    return {"id": spec.name, "object": "model", "created": 0, "owned_by": "you" if owned else "genq"}


@only_prefixed.get("/models")
@require_key
def list_models():
    c = ctx()
    with c.session() as session:
        versions = catalog.tenant_versions(session, c.registry, caller().tenant_id)
    shared = sorted(c.registry, key=lambda s: s.name)
    return {"object": "list", "data": [_model(s, False) for s in shared] + [_model(v, True) for v in versions]}


@only_prefixed.get("/models/<path:name>")
@require_key
def get_model(name: str):
    c = ctx()
    with c.session() as session:
        spec = catalog.resolve(session, c.registry, name, caller().tenant_id)
    if spec is None:
        raise OpenAIError(404, f"The model {name!r} does not exist", "model", "model_not_found")
    return _model(spec, owned=c.registry.get(name) is None)


def register(app) -> None:
    app.register_blueprint(bp, url_prefix="/v1")
    app.register_blueprint(bp, url_prefix=PREFIX, name="openai_prefixed")
    app.register_blueprint(only_prefixed, url_prefix=PREFIX)


# ---- the OpenAPI document's part (api/openapi.py adds it) ----------------------------------------------------

def openapi_paths(schemas: dict, ref_template: str) -> dict:
    """These routes' paths for /openapi.json, their schemas added to `schemas`."""

    def body_schema(model: type[BaseModel], name: str) -> dict:
        schema = model.model_json_schema(ref_template=ref_template)
        for sub, sub_schema in schema.pop("$defs", {}).items():
            schemas.setdefault(f"OpenAI{sub}", sub_schema)
        schemas[name] = json.loads(json.dumps(schema).replace(ref_template.format(model=""), ref_template.format(
            model="OpenAI")))
        return {"$ref": ref_template.format(model=name)}

    def obj(required: list[str], **props) -> dict:
        return {"type": "object", "required": required, "properties": props}

    nullable = lambda t: {"anyOf": [{"type": t}, {"type": "null"}]}  # noqa: E731
    schemas["OpenAIError"] = obj(["error"], error=obj(["message", "type", "param", "code"],
                                                      message={"type": "string"}, type={"type": "string"},
                                                      param=nullable("string"), code=nullable("string")))
    usage = obj(["prompt_tokens", "completion_tokens", "total_tokens"], prompt_tokens={"type": "integer"},
                completion_tokens={"type": "integer"}, total_tokens={"type": "integer"})
    schemas["OpenAICompletion"] = obj(["id", "object", "created", "model", "choices", "usage"],
                                      id={"type": "string"}, object={"const": "text_completion"},
                                      created={"type": "integer"}, model={"type": "string"},
                                      choices={"type": "array", "items": obj(["text", "index", "finish_reason"])},
                                      usage=usage)
    schemas["OpenAIChatCompletion"] = obj(["id", "object", "created", "model", "choices", "usage"],
                                          id={"type": "string"}, object={"const": "chat.completion"},
                                          created={"type": "integer"}, model={"type": "string"},
                                          choices={"type": "array", "items": obj(["index", "message", "finish_reason"])},
                                          usage=usage)
    schemas["OpenAIImages"] = obj(["created", "data"], created={"type": "integer"},
                                  data={"type": "array", "items": {"type": "object"}})
    schemas["OpenAIModel"] = obj(["id", "object", "created", "owned_by"], id={"type": "string"},
                                 object={"const": "model"}, created={"type": "integer"}, owned_by={"type": "string"})
    schemas["OpenAIModelList"] = obj(["object", "data"], object={"const": "list"},
                                     data={"type": "array", "items": {"$ref": ref_template.format(model="OpenAIModel")}})
    bodies = {"completions": body_schema(CompletionRequest, "OpenAICompletionRequest"),
              "chat/completions": body_schema(ChatRequest, "OpenAIChatRequest"),
              "images/generations": body_schema(ImageRequest, "OpenAIImageRequest")}
    error = {"application/json": {"schema": {"$ref": ref_template.format(model="OpenAIError")}}}
    either = {**error, "application/problem+json": {"schema": {"$ref": ref_template.format(model="Problem")}}}
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    sse = {"text/event-stream": {"schema": {"type": "string"},
                                 "description": "With `stream: true`: OpenAI's chunks, then `data: [DONE]`."}}

    def op(summary: str, ok: dict, errors: dict[int, str], body: dict | None = None, params=None,
           body_content: dict | None = None) -> dict:
        responses = {"200": {"description": "OK.", "content": ok}}
        for code, why in {400: "Invalid parameter (`param` names it), bad JSON or an API key in the URL.",
                          401: "No API key, or not a valid one.", **errors}.items():
            # A path no route matches (a model name with a stray character) is genq's own 404.
            responses[str(code)] = {"description": why, "content": either if code == 404 else error}
        # The rate limiter and an unreachable dependency answer in genq's own shape.
        responses["429"] = {"description": "A rate limit, the job quota, or all held-request slots in use.",
                            "headers": retry_after, "content": either}
        responses["503"] = {"description": "A dependency is down, or this process holds its most waiting requests.",
                            "headers": retry_after, "content": either}
        out = {"summary": summary, "tags": ["openai"], "responses": responses}
        if body or body_content:
            out["requestBody"] = {"required": True,
                                  "content": body_content or {"application/json": {"schema": body}}}
        if params:
            out["parameters"] = params
        return out

    wait = ("Waits for its jobs at most GENQ_OPENAI_WAIT_SECONDS, then 504 and the jobs are canceled. "
            "Each choice is a genq job, listed in GET /v1/jobs.")
    generation = {
        "completions": op(f"OpenAI's completions: one job per choice. {wait}",
                          {"application/json": {"schema": {"$ref": ref_template.format(model="OpenAICompletion")}},
                           **sse},
                          {404: "Unknown model.", 409: "A job was canceled meanwhile.", 413: "Body too large.",
                           500: "The model failed the job.", 504: "Not finished in time; the jobs were canceled."},
                          bodies["completions"]),
        "chat/completions": op(f"OpenAI's chat completions, rendered with the model's chat template. {wait}",
                               {"application/json": {"schema": {"$ref": ref_template.format(
                                   model="OpenAIChatCompletion")}}, **sse},
                               {404: "Unknown model.", 409: "A job was canceled meanwhile.", 413: "Body too large.",
                                422: "The model has no chat template.", 500: "The model failed the job.",
                                504: "Not finished in time; the jobs were canceled."},
                               bodies["chat/completions"]),
        "images/generations": op(f"OpenAI's image generations: one job, `n` images. {wait}",
                                 {"application/json": {"schema": {"$ref": ref_template.format(model="OpenAIImages")}}},
                                 {404: "Unknown model.", 409: "The job was canceled meanwhile.",
                                  413: "Body too large.", 500: "The model failed the job.",
                                  504: "Not finished in time; the job was canceled."},
                                 bodies["images/generations"]),
    }
    paths = {}
    for route, operation in generation.items():
        paths[f"/v1/{route}"] = {"post": operation}
        paths[f"{PREFIX}/{route}"] = {"post": operation}
    paths[f"{PREFIX}/models"] = {"get": op(
        "Models in OpenAI's list shape (genq's own, with input schemas, is GET /v1/models).",
        {"application/json": {"schema": {"$ref": ref_template.format(model="OpenAIModelList")}}}, {})}
    paths[f"{PREFIX}/models/{{name}}"] = {"get": op(
        "One model in OpenAI's shape.", {"application/json": {"schema": {"$ref": ref_template.format(
            model="OpenAIModel")}}}, {404: "Unknown model."},
        params=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}])}
    from api import openai_batches, openai_fine_tuning

    paths.update(openai_batches.openapi_paths(schemas, ref_template, op))
    paths.update(openai_fine_tuning.openapi_paths(schemas, ref_template, op))
    return paths
