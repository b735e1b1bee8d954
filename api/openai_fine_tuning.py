"""OpenAI's fine-tuning jobs over genq's fine-tune (models/finetune.py,
worker/training.py), at /openai/v1/fine_tuning/jobs: create, read, list,
cancel, events. Each is a genq fine-tune job (in /v1/jobs); its datasets are
uploaded with POST /openai/v1/files, purpose "fine-tune" (prompt/completion,
text, chat-message or preference rows, as genq's own POST /v1/files takes).
OpenAI's `method` picks supervised fine-tuning (genq's method lora) or DPO
(genq's dpo), each with its hyperparameters."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from flask import Blueprint, request
from sqlalchemy import select

from api.auth import caller, require_key
from api.context import ctx
from api.jobs import FINE_TUNE, ID_RE, JobCreate, fine_tune_request, json_body
from api.limits import lock_for_active_jobs, too_many_active
from api.openai_compat import PREFIX, OpenAIError, parse_body, register_errors
from genq import jobs as joblib
from genq.queue import publish
from genq.schema import Job, JobEvent
from models.base import InputInvalid
from models.finetune import SUFFIX_PATTERN

bp = Blueprint("openai_fine_tuning", __name__)
register_errors(bp)

STATUS = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
          "canceled": "cancelled"}
# OpenAI's hyperparameter names for genq's (models.finetune.Hyperparameters).
HYPER = {"n_epochs": "epochs", "batch_size": "batch_size", "learning_rate": "learning_rate", "beta": "beta"}
# OpenAI's method types for genq's methods.
METHODS = {"supervised": "lora", "dpo": "dpo"}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # genq's own bounds (models.finetune.Hyperparameters), so the schema says what is taken.
    n_epochs: int | None = Field(None, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=64)
    # Not OpenAI's multiplier: genq trains with an absolute rate (AdamW), so it is taken as that.
    learning_rate: float | None = Field(None, gt=0, le=1)


class DpoHyperparameters(Hyperparameters):
    # genq's bound (models.finetune.Hyperparameters.beta).
    beta: float | None = Field(None, gt=0, le=10)


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's method: supervised fine-tuning (prompt/completion, text or
    chat rows) or DPO (preference rows), hyperparameters under the type's name."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None


class FineTuningCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(pattern=r"^[0-9a-f]{32}$")
    validation_file: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


def _epoch(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def describe(job: Job) -> dict:
    inp = job.input or {}
    hyper = inp.get("hyperparameters", {})
    kind = "dpo" if inp.get("method", "lora").startswith("dpo") else "supervised"
    shown = {"n_epochs": hyper.get("epochs"), "batch_size": hyper.get("batch_size"),
             "learning_rate_multiplier": hyper.get("learning_rate")}
    error = None
    if job.error:
        error = {"code": job.error.get("code"), "message": job.error.get("message"), "param": None}
    return {"id": job.id, "object": "fine_tuning.job", "model": job.model, "created_at": _epoch(job.created_at),
            "finished_at": _epoch(job.completed_at), "status": STATUS[job.status],
            "fine_tuned_model": (job.output or {}).get("model") if job.status == "succeeded" else None,
            "organization_id": caller().tenant_name, "result_files": [],
            "validation_file": inp.get("validation_file"), "training_file": inp.get("training_file"),
            "hyperparameters": shown,
            "method": {"type": kind, kind: {"hyperparameters": {**shown, **(
                {"beta": hyper.get("beta")} if kind == "dpo" else {})}}},
            # genq's own: every hyperparameter the fine-tune runs with, by genq's names.
            "genq_method": inp.get("method"), "genq_hyperparameters": hyper,
            "trained_tokens": None, "error": error, "seed": hyper.get("seed")}


def own_fine_tune(session, job_id: str) -> Job:
    job = session.get(Job, job_id) if ID_RE.match(job_id) else None
    if job is None or job.tenant_id != caller().tenant_id or job.type != FINE_TUNE:
        raise OpenAIError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "not_found")
    return job


@bp.post("/fine_tuning/jobs")
@require_key
def create():
    c = ctx()
    req = parse_body(FineTuningCreate, json_body())
    # OpenAI's fine-tunes are of text models; an image model's (a LoRA with a trigger word) is genq's own.
    if getattr(c.registry.get(req.model), "family", None) != "text-generation":
        raise OpenAIError(404, f"The model {req.model!r} does not exist or cannot be fine-tuned; GET {PREFIX}/models "
                               "lists them", "model", "model_not_found")
    given = req.hyperparameters.model_dump(exclude_none=True) if req.hyperparameters else {}
    method = "lora"
    if req.method is not None:
        method = METHODS[req.method.type]
        chosen = getattr(req.method, req.method.type)
        if chosen is not None and chosen.hyperparameters is not None:
            given.update(chosen.hyperparameters.model_dump(exclude_none=True))
    hyper = {HYPER[k]: v for k, v in given.items()}
    if req.seed is not None:
        hyper["seed"] = req.seed
    inp: dict = {"training_file": req.training_file, "method": method, "hyperparameters": hyper}
    if req.validation_file:
        inp["validation_file"] = req.validation_file
    if req.suffix:
        inp["suffix"] = req.suffix
    try:
        spec, validated, pool, batch_key = fine_tune_request(
            JobCreate(model=req.model, type=FINE_TUNE, input=inp))
    except InputInvalid as exc:
        # Fields as OpenAI names them: input.hyperparameters.epochs is hyperparameters.n_epochs.
        field = exc.errors[0]["field"].removeprefix("input.") if exc.errors else None
        for theirs, ours in HYPER.items():
            field = field.replace(f"hyperparameters.{ours}", f"hyperparameters.{theirs}") if field else field
        raise OpenAIError(400, str(exc), field, "invalid_value") from None
    with c.session() as session, session.begin():
        most = lock_for_active_jobs(session, caller().tenant_id, c.settings)
        try:
            job = joblib.submit(session, tenant_id=caller().tenant_id, type_=FINE_TUNE, model=spec.name, pool=pool,
                                batch_key=batch_key, input_=validated.model_dump(mode="json"),
                                max_attempts=c.settings.max_attempts, max_active=most)
        except joblib.TooManyActive as exc:
            raise too_many_active(exc, c.settings) from None
    publish(c.celery, job.id, pool)
    with c.session() as session:
        return describe(session.get(Job, job.id))


@bp.get("/fine_tuning/jobs")
@require_key
def list_jobs():
    raw_limit, after = request.args.get("limit", "20"), request.args.get("after")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise OpenAIError(400, f"limit must be an integer from 1 to 100, got {raw_limit!r:.40}", "limit",
                          "invalid_value")
    if after is not None and not ID_RE.match(after):
        raise OpenAIError(400, f"after must be a fine-tuning job id, got {after!r:.40}", "after", "invalid_value")
    limit = int(raw_limit)
    query = select(Job).where(Job.tenant_id == caller().tenant_id, Job.type == FINE_TUNE)
    if after:
        query = query.where(Job.id < after)
    with ctx().session() as session:
        rows = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
        return {"object": "list", "data": [describe(j) for j in rows[:limit]], "has_more": len(rows) > limit}


@bp.get("/fine_tuning/jobs/<job_id>")
@require_key
def get_job(job_id: str):
    with ctx().session() as session:
        return describe(own_fine_tune(session, job_id))


@bp.post("/fine_tuning/jobs/<job_id>/cancel")
@require_key
def cancel(job_id: str):
    with ctx().session() as session, session.begin():
        job = own_fine_tune(session, job_id)
        if job.status in ("succeeded", "failed", "canceled"):
            raise OpenAIError(409, f"fine-tuning job {job.id} is already {STATUS[job.status]}", None,
                              "not_cancellable")
        joblib.cancel(session, job)
    with ctx().session() as session:
        return describe(own_fine_tune(session, job_id))


@bp.get("/fine_tuning/jobs/<job_id>/events")
@require_key
def events(job_id: str):
    with ctx().session() as session:
        job = own_fine_tune(session, job_id)
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                                    .order_by(JobEvent.id.desc()).limit(100)))
    # Progress (step, loss, for DPO preference margin and accuracy) and
    # validation results are OpenAI's "metrics" events; the rest are messages.
    data = [{"object": "fine_tuning.job.event", "id": f"ftevent-{e.id}", "created_at": _epoch(e.at),
             "level": "error" if (e.data or {}).get("status") == "failed" else "info",
             "message": e.type if not e.data else f"{e.type}: {e.data}",
             "type": "metrics" if e.type in ("progress", "metrics") else "message",
             "data": e.data or {}} for e in rows]
    return {"object": "list", "data": data, "has_more": False}


def openapi_paths(schemas: dict, ref_template: str, op) -> dict:
    """These routes' paths for /openapi.json; `op` builds an operation as api/openai_compat.py does."""
    ref = lambda name: {"$ref": ref_template.format(model=name)}  # noqa: E731
    # The nested models under names of their own, as their references name them.
    schema = FineTuningCreate.model_json_schema(ref_template=ref_template.replace("{model}", "OpenAIFineTuning{model}"))
    for sub, sub_schema in schema.pop("$defs", {}).items():
        schemas.setdefault(f"OpenAIFineTuning{sub}", sub_schema)
    schemas["OpenAIFineTuningCreate"] = schema
    schemas["OpenAIFineTuningJob"] = {"type": "object", "required": ["id", "object", "model", "status"],
                                      "properties": {"id": {"type": "string"}, "object": {"const": "fine_tuning.job"},
                                                     "model": {"type": "string"}, "status": {"enum": sorted(
                                                         set(STATUS.values()))}}}
    listing = {"type": "object", "required": ["object", "data"],
               "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}}}
    json_ok = lambda schema: {"application/json": {"schema": schema}}  # noqa: E731
    job_param = [{"name": "job_id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}]
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
            {"name": "after", "in": "query", "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}]
    not_found = {404: "No such fine-tuning job, or not yours."}
    return {
        f"{PREFIX}/fine_tuning/jobs": {
            "post": op("Fine-tune a model: a genq fine-tune job.", json_ok(ref("OpenAIFineTuningJob")),
                       {404: "No such training file, or not yours.", 413: "Body too large."},
                       body=ref("OpenAIFineTuningCreate")),
            "get": op("Your fine-tuning jobs, newest first.", json_ok(listing), {}, params=page)},
        f"{PREFIX}/fine_tuning/jobs/{{job_id}}": {"get": op(
            "A fine-tuning job.", json_ok(ref("OpenAIFineTuningJob")), not_found, params=job_param)},
        f"{PREFIX}/fine_tuning/jobs/{{job_id}}/cancel": {"post": op(
            "Cancel a fine-tuning job.", json_ok(ref("OpenAIFineTuningJob")),
            {**not_found, 409: "It has already ended."}, params=job_param)},
        f"{PREFIX}/fine_tuning/jobs/{{job_id}}/events": {"get": op(
            "A fine-tuning job's events, newest first (at most 100).", json_ok(listing), not_found,
            params=job_param)},
    }


def register(app) -> None:
    app.register_blueprint(bp, url_prefix=PREFIX)
