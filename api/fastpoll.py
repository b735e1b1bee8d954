"""The poll's fast lane: `GET /v1/jobs/<id>` answered below Flask when nothing
about the request is unusual, the hottest route at a fraction of its cost.

Flask's request context, URL routing, hooks and response object cost a poll
more CPU than the poll's own work (its one prepared statement and its JSON).
A poll this lane takes: no query string, no `Prefer`, a key this process
verified within GENQ_KEY_CACHE_SECONDS (genq.keys.KeyCache) and a rate-limit
token this process leased already (api.limits.Limiter.spend_leased), and the
caller's job found. It answers exactly as the Flask view does (one function,
api.jobs.poll_answer, makes both answers), with the request id, and counts
the request in the metrics under the view's route. Anything else, a 404, a
database error included, goes to Flask as if this lane were not there (its
token already counted), which answers it with everything it does.
"""
from __future__ import annotations

import json
import random
import re
import time

from flask import Flask

from api.jobs import poll_answer
from api.limits import COUNTED
from api.request_id import ENVIRON_KEY, HEADER, SANE
from genq.jobs import read_own_driver

JOB_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})\Z")
ROUTE = "/v1/jobs/<job_id>"


class FastPoll:
    """WSGI middleware in front of the Flask app (api.app.create_app installs
    it on Postgres, where the poll's read is the driver's)."""

    def __init__(self, app: Flask) -> None:
        self.flask = app.wsgi_app
        self.context = app.extensions["genq"]
        self.limiter = app.extensions.get("genq_limiter")
        self.observe = app.extensions["genq_observe"]
        self.ensure_ascii = app.json.ensure_ascii
        self.served = 0  # polls this lane answered (tests read it)

    def __call__(self, environ, start_response):
        answer = self.answer(environ) if environ.get("REQUEST_METHOD") == "GET" else None
        if answer is None:
            return self.flask(environ, start_response)
        status, headers, body = answer
        start_response(status, headers)
        return [body] if body else []

    def answer(self, environ) -> tuple[str, list, bytes] | None:
        started = time.monotonic()
        match = JOB_PATH.match(environ.get("PATH_INFO", ""))
        if match is None or environ.get("QUERY_STRING") or "HTTP_PREFER" in environ:
            return None
        scheme, _, raw = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        caller = self.context.keys.get(raw.strip())
        if caller is None:
            return None
        if self.limiter is not None:
            if not self.limiter.spend_leased(f"tenant:{caller.tenant_id}"):
                return None
            environ[COUNTED] = True  # Flask, if it answers after all, does not count it again
        try:
            with self.context.driver() as conn:
                job = read_own_driver(conn, match[1], caller.tenant_id)
        except Exception:  # noqa: BLE001 - Flask reads again, and answers 503 or whatever it is
            return None
        if job is None:
            return None
        code, headers, data = poll_answer(job, environ.get("HTTP_IF_NONE_MATCH"), self.context)
        given = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = given if SANE.fullmatch(given) else f"{random.getrandbits(128):032x}"
        environ[ENVIRON_KEY] = request_id  # for the access line
        headers[HEADER] = request_id
        body = b""
        if data is not None:
            body = (json.dumps(data, ensure_ascii=self.ensure_ascii, separators=(",", ":")) + "\n").encode()
            headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
        self.observe("GET", ROUTE, code, time.monotonic() - started)
        self.served += 1
        return ("200 OK" if code == 200 else "304 NOT MODIFIED"), list(headers.items()), body
