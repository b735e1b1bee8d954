"""The poll's fast lane: `GET /v1/jobs/<id>` answered below Flask when nothing
about the request is unusual, the hottest route at a fraction of its cost.

Flask's request context, URL routing, hooks and response object cost a poll
more CPU than the poll's own work (its one prepared statement and its JSON).
A poll this lane takes: no query string, no `Prefer`, a key this process
verified within GENQ_KEY_CACHE_SECONDS (genq.keys.KeyCache) and a rate-limit
token this process leased already (api.limits.Limiter.spend_leased), and the
caller's job found; a poll of a job this process read within
GENQ_POLL_CACHE_SECONDS and heard no change of since is answered with no
statement at all (api/pollcache.py): a 304 when it names the job's ETag, the
body this process sent before when not. It answers exactly as the Flask view does (one function,
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
from werkzeug.http import parse_etags

from api.jobs import poll_answer
from api.limits import COUNTED
from api.pollcache import PollCache
from api.request_id import ENVIRON_KEY, HEADER, SANE
from genq.jobs import read_own_driver
from genq.retention import effective

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
        settings = self.context.settings
        # Conditional polls of unchanged jobs, answered from memory while this
        # process hears the job event notifications (Redis only).
        self.cache = PollCache(settings.broker_url, settings.poll_cache_seconds) \
            if settings.poll_cache_seconds > 0 and settings.broker_url.startswith(("redis://", "rediss://")) else None
        self.served = 0  # polls this lane answered (for tests; not exact under concurrent threads)

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
        job_id, if_none_match = match[1], environ.get("HTTP_IF_NONE_MATCH")
        cache = self.cache
        entry = cache.lookup(job_id, caller.tenant_id) if cache is not None else None
        body = None
        if entry is not None and if_none_match and parse_etags(if_none_match).contains_weak(entry.etag[3:-1]):
            # Unchanged since this process read it (api/pollcache.py): no statement.
            code, headers, data = 304, dict(entry.headers), None
        elif entry is not None and entry.body is not None:
            # Unchanged too, and the caller has not seen it: the body this process sent, again.
            code, headers, data, body = 200, dict(entry.headers), None, entry.body
        else:
            read_at = cache.clock() if cache is not None else 0.0
            try:
                with self.context.driver() as conn:
                    job = read_own_driver(conn, job_id, caller.tenant_id)
                if job is None:
                    return None
                kept = effective(self.context.settings, caller.retention)["outputs"]
                code, headers, data = poll_answer(job, if_none_match, self.context, kept)
            except Exception:  # noqa: BLE001 - Flask does it again, and answers 503 or whatever it is
                return None
            if data is not None:
                body = (json.dumps(data, ensure_ascii=self.ensure_ascii, separators=(",", ":")) + "\n").encode()
            if cache is not None:
                cache.put(job_id, caller.tenant_id, headers["ETag"], dict(headers), read_at, body)
        given = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = given if SANE.fullmatch(given) else f"{random.getrandbits(128):032x}"
        environ[ENVIRON_KEY] = request_id  # for the access line
        headers[HEADER] = request_id
        if body is not None:
            headers["Content-Type"] = "application/json"
        else:
            body = b""
        headers["Content-Length"] = str(len(body))
        self.observe("GET", ROUTE, code, time.monotonic() - started)
        self.served += 1
        return ("200 OK" if code == 200 else "304 NOT MODIFIED"), list(headers.items()), body
