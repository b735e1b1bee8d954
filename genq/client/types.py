"""What the client returns: a Job (with shortcuts back to its client), an Event, a File."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


@dataclass
class Job:
    """A job as `GET /v1/jobs/<id>` shows it; `raw` is that JSON. The methods
    call back into the client that made it: with an AsyncClient they return
    awaitables (`await job.wait()`)."""

    id: str
    status: str
    model: str
    type: str
    input: dict
    output: Any
    error: dict | None
    progress: dict | None
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    raw: dict = field(repr=False)
    # A queued job's place in line ({"position", "position_is_lower_bound",
    # "eta_seconds"}) on a job read by id; when its outputs go (retention).
    queue: dict | None = None
    expires_at: str | None = None
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict, client=None) -> "Job":
        return cls(id=body["id"], status=body["status"], model=body.get("model", ""), type=body.get("type", ""),
                   input=body.get("input") or {}, output=body.get("output"), error=body.get("error"),
                   progress=body.get("progress"), created_at=body.get("created_at"),
                   started_at=body.get("started_at"), completed_at=body.get("completed_at"), raw=body,
                   queue=body.get("queue"), expires_at=body.get("expires_at"), _client=client)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def reload(self):
        return self._client.jobs.get(self.id)

    def wait(self, **kwargs):
        return self._client.jobs.wait(self.id, **kwargs)

    def cancel(self):
        return self._client.jobs.cancel(self.id)

    def stream(self, **kwargs):
        return self._client.jobs.stream(self.id, **kwargs)

    def download(self, directory):
        """Save the output in `directory`: each file it links (images,
        checkpoints) as `<job id>-<name>`, a text output as `<job id>.txt`.
        Returns the paths written."""
        return self._client.jobs.download(self, directory)


@dataclass(frozen=True)
class Event:
    """One event of a stream. `type`: queued, start, progress, output, log,
    checkpoint, completed. A running text job's live output is
    `type == "output"` with `data == {"delta": ..., "index": k}`; `id` is the
    stream's cursor (`N` or `N.k`); `job_id` is set on the tenant-wide stream."""

    id: str | None
    type: str
    data: Any
    at: str | None = None
    job_id: str | None = None

    @property
    def delta(self) -> str | None:
        """The text a live output event adds, else None."""
        return self.data.get("delta") if self.type == "output" and isinstance(self.data, dict) else None


@dataclass(frozen=True)
class File:
    id: str
    filename: str
    bytes: int
    purpose: str
    rows: int | None
    created_at: str | None
    raw: dict = field(repr=False)

    @classmethod
    def from_json(cls, body: dict) -> "File":
        return cls(id=body["id"], filename=body.get("filename", ""), bytes=body.get("bytes", 0),
                   purpose=body.get("purpose", ""), rows=body.get("rows"), created_at=body.get("created_at"), raw=body)
