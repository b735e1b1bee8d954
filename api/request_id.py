"""A request id on every API request: the caller's X-Request-Id when it is a
sane one, else a new one. Every log line written while the request is served
carries it (genq.logs.REQUEST_ID), the server's access line too (it is kept in
the WSGI environ, which both servers hand their access log), and the response
says it in X-Request-Id, so a client's report can be found in the logs."""
from __future__ import annotations

import random
import re

from flask import Flask, Response, g, request

from genq.logs import REQUEST_ID

HEADER = "X-Request-Id"
# Where the id waits for the server's access line (api/serve.py), after the app is done.
ENVIRON_KEY = "genq.request_id"
# What a caller's id may be: uuids, hex, base64 and trace ids fit; nothing that
# could break a log line (spaces, quotes, control characters) or bloat it.
SANE = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")


def init_request_ids(app: Flask) -> None:
    """Register first: the id must exist before any other hook logs or answers."""
    app.before_request(_assign)
    app.after_request(_answer)
    app.teardown_request(_forget)


def _assign() -> None:
    given = request.headers.get(HEADER, "")
    # 128 random bits from the process's generator: an id must be unique, not
    # secret, and uuid4 costs a getrandom system call per request.
    request_id = given if SANE.fullmatch(given) else f"{random.getrandbits(128):032x}"
    request.environ[ENVIRON_KEY] = request_id
    g.request_id_token = REQUEST_ID.set(request_id)


def _answer(response: Response) -> Response:
    if ENVIRON_KEY in request.environ:
        response.headers[HEADER] = request.environ[ENVIRON_KEY]
    return response


def _forget(exc: BaseException | None) -> None:
    # A server thread serves many requests: the next one must not inherit this id.
    token = g.pop("request_id_token", None)
    if token is not None:
        try:
            REQUEST_ID.reset(token)
        except ValueError:  # torn down in another context than it was set in
            REQUEST_ID.set(None)
