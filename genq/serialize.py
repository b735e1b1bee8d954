"""Jobs as the REST contract shows them, for the API's answers and for webhook
payloads alike, so a webhook body is exactly what `GET /v1/jobs/<id>` returns."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Callable, Literal

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from genq.retention import expires_at
from genq.schema import Job
from genq.storage import Storage

# The shapes the API answers with, as typed dicts: the serializers below build
# them, and api/openapi.py makes the document's response schemas from them.
ObjectId = Annotated[str, Field(pattern="^[0-9a-f]{32}$", description="An id this API returned.")]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"}, description="RFC 3339, UTC.")]


class JobError(TypedDict):
    code: str
    message: str


class JobProgress(TypedDict):
    """`current` of `total` units (token, step); a fine-tune's also has epoch and loss."""

    current: int
    total: int
    unit: str


class JobQueue(TypedDict):
    """Where a queued job stands (genq.position): jobs of its pool that would
    start before it, and when it should start at the pool's recent pace."""

    position: int
    position_is_lower_bound: Annotated[bool, Field(description=(
        "More of its own tenant's jobs are ahead of it than are counted (1,000): `position` is at least this."))]
    eta_seconds: Annotated[float | None, Field(description=(
        "Seconds until it should start: (position + 1) / the jobs of its pool that ended per second over the "
        "last 5 minutes; null when none did."))]


@with_config(ConfigDict(title="Job"))
class JobView(TypedDict):
    id: ObjectId
    type: Annotated[str, Field(description=(
        "The model's family (text-generation, image-generation, image-to-image, inpainting, text-to-audio, "
        "text-to-video, image-text-to-text, or a registry's own), or fine-tune."))]
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    input: dict[str, Any]
    output: Annotated[dict[str, Any] | None, Field(description=(
        "text: {text, tokens, finish_reason}; image: {images: [{url, content_type, width, height, seed}]}; "
        "fine-tune: {model, checkpoints, metrics}"))]
    error: JobError | None
    progress: JobProgress | None
    priority: int
    attempts: int
    cancel_requested: bool
    webhook: str | None
    webhook_events_filter: list[str] | None
    metrics: dict[str, Any]
    created_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None
    queue: Annotated[JobQueue | None, Field(description=(
        "A queued job's place in line, on GET /v1/jobs/<id> (refreshed at most every 5 s); null otherwise and "
        "in lists."))]
    expires_at: Annotated[Timestamp | None, Field(description=(
        "When the job's outputs were deleted, or will be (GENQ_OUTPUT_RETENTION after it ended); null while it "
        "runs, or when outputs are kept."))]

UrlForKey = Callable[[str], str]


def rfc3339(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def with_urls(value: Any, url_for_key: UrlForKey) -> Any:
    """Swap every stored {"key": ...} in an output for a {"url": ...} the client can GET."""
    if isinstance(value, dict):
        out = {k: with_urls(v, url_for_key) for k, v in value.items() if k != "key"}
        if "key" in value:
            out = {"url": url_for_key(value["key"]), **out}
        return out
    if isinstance(value, list):
        return [with_urls(v, url_for_key) for v in value]
    return value


def output_urls(storage: Storage, base_url: str, job_id: str) -> UrlForKey:
    """Output URLs of one job: presigned for S3; for local storage, the API's
    own route under `base_url`, which serves them to the job's owner."""
    base = base_url.rstrip("/")

    def url(key: str) -> str:
        presigned = storage.presigned_url(key)
        if presigned:
            return presigned
        name = key.removeprefix(f"jobs/{job_id}/")
        return f"{base}/v1/jobs/{job_id}/outputs/{name}"

    return url


def job(j: Job, url_for_key: UrlForKey | None, output_retention: int | None = None,
        queue: JobQueue | None = None) -> JobView:
    """The job as GET shows it. With url_for_key None, outputs keep their
    storage keys (a webhook payload frozen now, its URLs made when it is sent).
    `expires_at`: when its outputs were deleted, or will be given
    `output_retention` seconds (genq.retention); null while it runs, or kept."""
    output = j.output
    if output is not None and url_for_key is not None:
        output = with_urls(output, url_for_key)
    return {
        "id": j.id,
        "type": j.type,
        "model": j.model,
        "status": j.status,
        "input": j.input,
        "output": output,
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
        "queue": queue,
        "expires_at": rfc3339(j.expired_at or expires_at(j.completed_at, output_retention or 0)),
    }
