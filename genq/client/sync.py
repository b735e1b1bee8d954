"""Client: the blocking client. AsyncClient (aio.py) is the same, line for line, with awaits."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
from httpx_sse import connect_sse

from genq.client import _core as core
from genq.client import errors
from genq.client.types import Event, File, Job

# The longest `Prefer: wait` one request asks for; the API holds it at most its
# GENQ_MAX_PREFER_WAIT and answers at once when it has no slot free.
LONGEST_HOLD = 60
# An open stream hears a keep-alive every 15 s: silence this long is a dead connection.
STREAM_READ_TIMEOUT = 60.0


class Client:
    """genq's REST API. `base_url` and `api_key` default to GENQ_URL and
    GENQ_API_KEY (then http://127.0.0.1:8000). 429, 503 and dropped
    connections are retried as `Retries` says (`max_retries`, and the longest
    Retry-After waited for, `max_retry_wait`)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 2, max_retry_wait: float = 30.0, http_client: httpx.Client | None = None):
        self.base_url, self.api_key = core.resolve(base_url, api_key)
        self.retries = core.Retries(max_retries=max_retries, max_wait=max_retry_wait)
        self._http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout)
        self._headers = core.headers(self.api_key, core.user_agent())
        self._sleep = time.sleep
        self.jobs = Jobs(self)
        self.files = Files(self)
        self.fine_tunes = FineTunes(self)
        self.models = Models(self)

    def run(self, model: str, input: dict, *, timeout: float | None = None, **options) -> Any:
        """Submit a job, wait for it, return its output (like `replicate.run`).
        A job that fails or is canceled raises JobFailed; `timeout` passing
        first raises WaitTimeout. `options` are `jobs.create`'s."""
        started = time.monotonic()
        job = self.jobs.create(model, input, wait=_hold(timeout), **options)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        job = self.jobs.wait(job, timeout=left)
        if not job.succeeded:
            raise errors.JobFailed(job)
        return job.output

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, call: core.Call, *, anonymous: bool = False) -> httpx.Response:
        """Send `call`, retrying what Retries allows; an error answer raises its APIError."""
        attempt = 0
        while True:
            request = core.build(self._http, call, self._headers, anonymous)
            attempt += 1
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = core.retry_delay(self.retries, call, attempt, exc=exc)
            else:
                if response.status_code < 400:
                    return response
                delay = core.retry_delay(self.retries, call, attempt, response=response)
            self._sleep(delay)

    def _json(self, call: core.Call) -> dict:
        return self._send(call).json()


def _hold(timeout: float | None) -> int:
    return LONGEST_HOLD if timeout is None else max(0, min(LONGEST_HOLD, int(timeout)))


def _id(job) -> str:
    return job.id if isinstance(job, Job) else job


class Jobs:
    def __init__(self, client: Client):
        self._client = client

    def create(self, model: str, input: dict, *, type: str | None = None, priority: int | None = None,
               webhook: str | None = None, webhook_events_filter: list[str] | None = None,
               wait: int | None = None, idempotency_key: str | None = None) -> Job:
        """Submit a job. An Idempotency-Key is sent (one made up unless given),
        so a create retried after a dropped connection makes one job.
        `wait`: hold the request up to that many seconds for the job to end."""
        call = core.create_job(model, input, type=type, priority=priority, webhook=webhook,
                               webhook_events_filter=webhook_events_filter, wait=wait, idempotency_key=idempotency_key)
        return Job.from_json(self._client._json(call), self._client)

    def get(self, job_id: str) -> Job:
        return Job.from_json(self._client._json(core.get_job(_id(job_id))), self._client)

    def list(self, *, status: str | None = None, model: str | None = None, type: str | None = None,
             page_size: int | None = None) -> Iterator[Job]:
        """Every job of yours that matches, newest first, page after page."""
        cursor = None
        while True:
            data, cursor = core.page(self._client._json(core.list_jobs(status, model, type, page_size, cursor)))
            for body in data:
                yield Job.from_json(body, self._client)
            if not cursor:
                return

    def delete(self, job_id: str) -> None:
        """A finished job goes, with its events and outputs (409 while it runs: cancel it first)."""
        self._client._send(core.delete(f"/v1/jobs/{core._segment(_id(job_id))}"))

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._client._json(core.cancel_job(_id(job_id))), self._client)

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """The job once it has ended (succeeded, failed or canceled). Each
        request asks the API to hold it until the job ends (`Prefer: wait`);
        where it cannot, polls as often as the API's Retry-After hint says."""
        job_id = _id(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            response = self._client._send(core.get_job(job_id, wait=_hold(left) or None))
            job = Job.from_json(response.json(), self._client)
            if job.done:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise errors.WaitTimeout(f"job {job_id} is still {job.status} after {timeout} s", job)
            if "preference-applied" not in response.headers:
                hint = float(response.headers.get("retry-after") or 1)
                self._client._sleep(hint if left is None else min(hint, left))

    def stream(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events as they happen, until `completed`: durable events
        and a running text job's live output (`event.delta`). When the
        connection drops or the server ends the stream, it is opened again
        with Last-Event-ID: nothing is missed and nothing repeated."""
        return _stream(self._client, f"/v1/jobs/{core._segment(_id(job_id))}/events", last_event_id)

    def download(self, job, directory) -> list[Path]:
        job = job if isinstance(job, Job) else self.get(job)
        fetch, write = core.download_plan(job, directory)
        Path(directory).mkdir(parents=True, exist_ok=True)
        paths = []
        for url, path in fetch:
            own = core.same_origin(url, self._client.base_url)
            path.write_bytes(self._client._send(core.Call("GET", url, idempotent=True), anonymous=not own).content)
            paths.append(path)
        for path, text in write:
            path.write_text(text, encoding="utf-8")
            paths.append(path)
        return paths


def _stream(client: Client, path: str, last_event_id: str | None) -> Iterator[Event]:
    last, attempt = last_event_id, 0
    while True:
        heard = False
        try:
            with connect_sse(client._http, "GET", path, headers={**client._headers, **core.stream_headers(last)},
                             timeout=httpx.Timeout(client._http.timeout.connect, read=STREAM_READ_TIMEOUT)) as source:
                response = source.response
                if response.status_code == 204:  # resumed after the end: nothing more will come
                    return
                if response.status_code >= 400:
                    response.read()
                    error = core.failure(response)
                    delay = (client.retries.delay(attempt := attempt + 1, error.retry_after)
                             if response.status_code in core.RETRY_STATUSES else None)
                    if delay is None:
                        raise error
                    client._sleep(delay)
                    continue
                for message in source.iter_sse():
                    if message.id:
                        last = message.id
                    event = core.event_from_sse(message.event, message.data, message.id)
                    if event is None:
                        continue
                    heard, attempt = True, 0
                    yield event
                    if event.type == "completed":
                        return
        except httpx.TransportError as exc:
            delay = client.retries.delay(attempt := attempt + 1, None)
            if delay is None:
                raise core.connection_error(core.Call("GET", path), exc) from exc
            client._sleep(delay)
            continue
        # The server ended the stream (GENQ_EVENT_STREAM_SECONDS) before the
        # job did: resume after the last event. A quiet stream waits a little
        # first, as an EventSource would.
        if not heard:
            client._sleep(0.5)


class Files:
    def __init__(self, client: Client):
        self._client = client

    def upload(self, file, *, purpose: str = "fine-tune", idempotency_key: str | None = None) -> File:
        """Upload a dataset (a path or an open binary file; JSONL)."""
        content, name = core.read_upload(file)
        return core.to_file(self._client._json(core.upload_file(content, name, purpose, idempotency_key)))

    def delete(self, file_id: str) -> None:
        """The file and its content go (409 while a fine-tune trains on it)."""
        file_id = file_id.id if isinstance(file_id, File) else file_id
        self._client._send(core.delete(f"/v1/files/{core._segment(file_id)}"))

    def get(self, file_id: str) -> File:
        return core.to_file(self._client._json(core.Call("GET", f"/v1/files/{core._segment(file_id)}", idempotent=True)))

    def list(self) -> Iterator[File]:
        cursor = None
        while True:
            params = {"cursor": cursor} if cursor else None
            data, cursor = core.page(self._client._json(core.Call("GET", "/v1/files", params=params, idempotent=True)))
            yield from (core.to_file(body) for body in data)
            if not cursor:
                return


class FineTunes:
    def __init__(self, client: Client):
        self._client = client

    def create(self, model: str, training_file: str | File, *, method: str | None = None,
               hyperparameters: dict | None = None, suffix: str | None = None,
               validation_file: str | File | None = None, **options) -> Job:
        """A fine-tune job of `model` on an uploaded file (and a validation
        file in its format, if given); its output names the new model."""
        file_id = training_file.id if isinstance(training_file, File) else training_file
        if isinstance(validation_file, File):
            validation_file = validation_file.id
        inp = core.fine_tune_input(file_id, method, hyperparameters, suffix, validation_file)
        return self._client.jobs.create(model, inp, type="fine-tune", **options)


class Models:
    def __init__(self, client: Client):
        self._client = client

    def list(self) -> list[dict]:
        return self._client._json(core.Call("GET", "/v1/models", idempotent=True))["data"]

    def delete(self, name: str) -> None:
        """One of your fine-tuned models goes, with its weights (403 for a shared model)."""
        self._client._send(core.delete(f"/v1/models/{core._segment(name)}"))

    def get(self, name: str) -> dict:
        return self._client._json(core.Call("GET", f"/v1/models/{core._segment(name)}", idempotent=True))
