"""RFC 9457 problem+json for every error the API returns; no stack trace ever
reaches a client."""
from __future__ import annotations

import logging

from flask import Flask, Response, json
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from genq.errors import IllegalTransition
from genq.outage import RETRY_AFTER, unavailable
from genq.webhooks import RedeliveryRefused
from models.base import InputInvalid, pydantic_errors

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, detail: str, *, errors: list[dict] | None = None, headers: dict | None = None, type_: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.type = type_


def problem(status: int, detail: str, *, errors: list[dict] | None = None, headers: dict | None = None,
            type_: str | None = None, extra: dict | None = None) -> Response:
    body = {
        "type": type_ or f"https://genq.dev/problems/{status}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    body.update(extra or {})
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM)
    for k, v in (headers or {}).items():
        resp.headers[k] = str(v)
    return resp


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", errors=[{"field": field, "message": message}])


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return problem(exc.status, exc.detail, errors=exc.errors, headers=exc.headers, type_=exc.type)

    @app.errorhandler(InputInvalid)
    def _input_invalid(exc: InputInvalid):
        # A job input, a dataset or a fine-tune's workload, checked by models/.
        return problem(422, str(exc), errors=exc.errors)

    @app.errorhandler(ValidationError)
    def _body_invalid(exc: ValidationError):
        # A request body model (JobCreate, KeyCreate); model inputs are turned
        # into InputInvalid with their "input." prefix before they get here.
        errors = pydantic_errors(exc, prefix="")
        return problem(422, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)

    @app.errorhandler(IllegalTransition)
    @app.errorhandler(RedeliveryRefused)
    def _conflict(exc: IllegalTransition | RedeliveryRefused):
        # The request is well formed, the object's state refuses it.
        return problem(409, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        detail = exc.description or TITLES.get(exc.code or 500, "Error")
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            detail = f"the request body is larger than the {limit}-byte limit"
        headers = {}
        if exc.code == 405 and exc.valid_methods:
            headers["Allow"] = ", ".join(exc.valid_methods)
        return problem(exc.code or 500, detail, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # A dependency that cannot be reached is not our bug: 503 and when to
        # come back, never a 500. A job is accepted only once its row is
        # committed; if the database went away before the commit's answer
        # came back, it may be recorded all the same, which is why a retry
        # should carry the same Idempotency-Key.
        if (down := unavailable(exc)) is not None:
            log.warning("503, the %s is unreachable: %s", down, (str(exc) or type(exc).__name__).splitlines()[0][:300])
            return problem(503, f"the {down} is unreachable; retry in {RETRY_AFTER} seconds (with the same "
                                f"Idempotency-Key, a retry never makes a second job)",
                           headers={"Retry-After": RETRY_AFTER}, extra={"unavailable": down})
        # The one broad catch in the API: log the trace, tell the client nothing of it.
        log.exception("unhandled error")
        return problem(500, "an internal error occurred; it has been logged")
