"""The client's errors: one class per kind of answer a caller handles differently,
made from the API's problem+json (RFC 9457) bodies."""
from __future__ import annotations

import email.utils
import json
import time
from typing import Any


class GenqError(Exception):
    """Every error the client raises."""


class APIConnectionError(GenqError):
    """The API could not be reached, or the connection dropped, after the retries."""


class WaitTimeout(GenqError, TimeoutError):
    """A job did not end within the time `wait` was given."""

    def __init__(self, message: str, job=None):
        super().__init__(message)
        self.job = job


class JobFailed(GenqError):
    """`run` got a job that failed or was canceled; `job` is it, `job.error` says why."""

    def __init__(self, job):
        error = job.error or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
        self.job = job


class APIError(GenqError):
    """An error answer. `status`, `title`, `detail` and `errors` (a list of
    {"field", "message"}) are the problem+json body's; `body` is all of it."""

    def __init__(self, status: int, detail: str, *, title: str = "", errors: list[dict] | None = None,
                 body: dict | None = None, headers: dict | None = None):
        super().__init__(f"{status} {title}: {detail}" if title else f"{status}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.body = body or {}
        self.headers = headers or {}
        self.request_id = self.headers.get("x-request-id")


class BadRequest(APIError):
    """400: a malformed request (not JSON, a bad header)."""


class AuthenticationError(APIError):
    """401: no API key, or not a valid one."""


class PermissionDenied(APIError):
    """403: the key's role may not do this (admin routes)."""


class NotFound(APIError):
    """404: no such object, or not yours."""


class Conflict(APIError):
    """409: the object's state refuses this (cancelling a finished job)."""


class PayloadTooLarge(APIError):
    """413: the body (or file) is past the API's limit, or past your stored-files quota."""


class ValidationError(APIError):
    """422: invalid fields; `errors` names each, `fields` maps field -> message."""

    @property
    def fields(self) -> dict[str, str]:
        return {e.get("field", ""): e.get("message", "") for e in self.errors}


class RetryableError(APIError):
    """An answer that says "later": `retry_after` is the seconds the API asked for (or None)."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """429: over a rate limit, the active-jobs cap or the held-request cap."""


class Unavailable(RetryableError):
    """503: a dependency is down, or the server is holding its most streams."""


class ServerError(APIError):
    """Any other 5xx."""


BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 422: ValidationError, 429: RateLimited, 503: Unavailable,
}


def retry_after(headers) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    raw = next((str(v).strip() for k, v in headers.items() if k.lower() == "retry-after"), "")
    if not raw:
        return None
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def from_response(status: int, headers, content: bytes) -> APIError:
    """The error for an answer with status >= 400. A body that is not
    problem+json (a proxy's HTML page) still gives the right class."""
    body: dict[str, Any] = {}
    try:
        parsed = json.loads(content) if content else {}
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    detail = str(body.get("detail") or content[:300].decode("utf-8", "replace") or "no detail")
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    kwargs: dict[str, Any] = dict(title=str(body.get("title", "")), errors=body.get("errors") or [], body=body,
                                  headers={k.lower(): v for k, v in headers.items()})
    if issubclass(cls, RetryableError):
        kwargs["retry_after"] = retry_after(headers)
    return cls(status, detail, **kwargs)
