"""What Client and AsyncClient share: where the API is, which failures are
retried and after how long, how each call is built and its answer read.
The two clients differ only in how they wait for I/O."""
from __future__ import annotations

import json
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from genq.client import errors
from genq.client.types import Event, File, Job

# The API `genq up` (and `make up`) serves by default.
DEFAULT_URL = "http://127.0.0.1:8000"
# The client's own variables; the server's settings (genq/settings.py) know
# them so that they do not refuse them as misspelt.
URL_VARIABLE = "GENQ_URL"
KEY_VARIABLE = "GENQ_API_KEY"


def resolve(base_url: str | None, api_key: str | None, env=os.environ) -> tuple[str, str | None]:
    """The URL and key given, else GENQ_URL / GENQ_API_KEY, else the local default URL and no key."""
    url = (base_url or env.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError(f"base_url must be an http(s) URL like {DEFAULT_URL}, got {url!r}")
    return url, api_key or env.get(KEY_VARIABLE) or None


@dataclass(frozen=True)
class Retries:
    """Retries of 429, 503 and dropped connections: at most `max_retries`
    after the first try, each after the Retry-After the API sent, else an
    exponential backoff (0.5 s, 1 s, 2 s ... at most 8 s, jittered). A
    Retry-After longer than `max_wait` is not waited for: the error is raised
    at once, with its `retry_after`, for the caller to decide. With the
    defaults a call gives up after about 3 tries and at most a minute."""

    max_retries: int = 2
    max_wait: float = 30.0
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before retry number `attempt` (1, 2, ...), or None: give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_wait else None
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)


@dataclass
class Call:
    """One request. `idempotent`: sending it twice does no harm (GETs, and
    POSTs carrying an Idempotency-Key), so a dropped connection is retried;
    any call is retried on 429 and 503, which mean it was not carried out."""

    method: str
    path: str
    params: dict | list | None = None
    json: Any = None
    headers: dict = field(default_factory=dict)
    files: dict | None = None
    data: dict | None = None
    idempotent: bool = False
    timeout: float | None = None


RETRY_STATUSES = (429, 503)


def build(http: httpx.Client | httpx.AsyncClient, call: Call, headers: dict, anonymous: bool = False) -> httpx.Request:
    """The request for `call` on `http` (both clients build alike); `anonymous`: no Authorization header."""
    request = http.build_request(
        call.method, call.path, params=call.params, json=call.json, files=call.files, data=call.data,
        headers={**headers, **call.headers},
        timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT)
    if anonymous:
        request.headers.pop("Authorization", None)
    return request


def retry_delay(retries: Retries, call: Call, attempt: int, *, response: httpx.Response | None = None,
                exc: httpx.TransportError | None = None) -> float:
    """How long to wait before trying `call` again after its `attempt`-th try
    ended in an error answer (`response`) or no answer (`exc`); raises the
    error to give the caller when it is not to be tried again."""
    if exc is not None:
        # A connection never made was never sent: always safe to retry. Otherwise only what is idempotent.
        never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
        delay = retries.delay(attempt, None) if never_sent or call.idempotent else None
        if delay is None:
            raise connection_error(call, exc) from exc
        return delay
    error = failure(response)
    delay = retries.delay(attempt, error.retry_after) if response.status_code in RETRY_STATUSES else None
    if delay is None:
        raise error
    return delay


def failure(response: httpx.Response) -> errors.APIError:
    return errors.from_response(response.status_code, response.headers, response.content)


def connection_error(call: Call, exc: Exception) -> errors.APIConnectionError:
    return errors.APIConnectionError(f"{call.method} {call.path}: {type(exc).__name__}: {exc}")


def headers(api_key: str | None, user_agent: str) -> dict:
    out = {"User-Agent": user_agent, "Accept": "application/json"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"genq-python/{version('genq')}"
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "genq-python"


# --- calls -------------------------------------------------------------------

def create_job(model: str, input: dict, *, type: str | None = None, priority: int | None = None,
               webhook: str | None = None, webhook_events_filter: list[str] | None = None,
               wait: int | None = None, idempotency_key: str | None = None) -> Call:
    body: dict[str, Any] = {"model": model, "input": input}
    for name, value in (("type", type), ("priority", priority), ("webhook", webhook),
                        ("webhook_events_filter", webhook_events_filter)):
        if value is not None:
            body[name] = value
    # The same key on every retry of this call: the API answers a retry with
    # the job the first try made, never a second job.
    hdrs = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    if wait:
        hdrs["Prefer"] = f"wait={int(wait)}"
    return Call("POST", "/v1/jobs", json=body, headers=hdrs, idempotent=True,
                timeout=(wait + 30) if wait else None)


def get_job(job_id: str, wait: int | None = None) -> Call:
    hdrs = {"Prefer": f"wait={int(wait)}"} if wait else {}
    return Call("GET", f"/v1/jobs/{_segment(job_id)}", headers=hdrs, idempotent=True,
                timeout=(wait + 30) if wait else None)


def list_jobs(status: str | None, model: str | None, type: str | None, page_size: int | None,
              cursor: str | None) -> Call:
    params = {k: v for k, v in (("status", status), ("model", model), ("type", type), ("limit", page_size),
                                ("cursor", cursor)) if v is not None}
    return Call("GET", "/v1/jobs", params=params, idempotent=True)


def cancel_job(job_id: str) -> Call:
    # Not retried on a dropped connection: a second cancel of a job the first
    # one ended would be a 409.
    return Call("POST", f"/v1/jobs/{_segment(job_id)}/cancel")


def delete(path: str) -> Call:
    # Not retried on a dropped connection: a second delete of what the first removed would be a 404.
    return Call("DELETE", path)


def upload_file(content: bytes, filename: str, purpose: str, idempotency_key: str | None) -> Call:
    return Call("POST", "/v1/files", files={"file": (filename, content, "application/jsonl")},
                data={"purpose": purpose}, headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex},
                idempotent=True)


def fine_tune_input(training_file: str, method: str | None, hyperparameters: dict | None, suffix: str | None,
                    validation_file: str | None = None) -> dict:
    out: dict[str, Any] = {"training_file": training_file}
    for name, value in (("method", method), ("hyperparameters", hyperparameters), ("suffix", suffix),
                        ("validation_file", validation_file)):
        if value is not None:
            out[name] = value
    return out


def read_upload(file) -> tuple[bytes, str]:
    """(content, name) of a path or an open binary file: read whole, so that a retry can send it again."""
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return path.read_bytes(), path.name
    return file.read(), Path(getattr(file, "name", "dataset.jsonl")).name


def _segment(value: str) -> str:
    """A path segment from the caller: anything that would leave its place
    in the URL (a slash, `..`) is refused here rather than sent."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", "..") or "?" in value or "#" in value:
        raise ValueError(f"not an id: {value!r}")
    return value


# --- answers -----------------------------------------------------------------

def page(body: dict) -> tuple[list[dict], str | None]:
    return body.get("data") or [], body.get("next_cursor")


def to_file(body: dict) -> File:
    return File.from_json(body)


def event_from_sse(event: str, data: str, id_: str | None) -> Event | None:
    """An Event from one SSE message, None for one with no data."""
    if not data:
        return None
    body = json.loads(data)
    if isinstance(body, dict) and "delta" in body:
        return Event(id=id_ or None, type=event or "output", data=body)
    if isinstance(body, dict):
        return Event(id=id_ or None, type=body.get("type") or event, data=body.get("data"), at=body.get("at"),
                     job_id=body.get("job_id"))
    return Event(id=id_ or None, type=event, data=body)


def stream_headers(last_event_id: str | None) -> dict:
    out = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id:
        out["Last-Event-ID"] = last_event_id
    return out


# --- downloads ---------------------------------------------------------------

def links(output: Any) -> list[str]:
    """Every {"url": ...} in an output, in order: images, checkpoints."""
    found: list[str] = []
    if isinstance(output, dict):
        if isinstance(output.get("url"), str):
            found.append(output["url"])
        for value in output.values():
            found += links(value)
    elif isinstance(output, list):
        for value in output:
            found += links(value)
    return found


def download_plan(job: Job, directory) -> tuple[list[tuple[str, Path]], list[tuple[Path, str]]]:
    """What `job.download(directory)` fetches ((url, path) pairs) and writes
    ((path, text) pairs). Names are the job id and the URL's last segment,
    made safe for a file name."""
    directory = Path(directory)
    fetch = []
    for i, url in enumerate(links(job.output)):
        name = Path(urlsplit(url).path).name or f"output-{i}"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or f"output-{i}"
        fetch.append((url, directory / f"{job.id}-{name}"))
    write = []
    if isinstance(job.output, dict) and isinstance(job.output.get("text"), str):
        write.append((directory / f"{job.id}.txt", job.output["text"]))
    return fetch, write


def same_origin(url: str, base_url: str) -> bool:
    """The API's own URL (send the key), or another host's (a presigned S3
    URL: the key must not travel there, and S3 refuses a second credential)."""
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)

