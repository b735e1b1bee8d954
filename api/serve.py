"""The API's two HTTP servers as genq runs them: gunicorn (`genq api`) and
werkzeug's (`genq up`). Both answer `Server: genq`, naming no versions, and
keep API keys out of their access logs: the API refuses a key in a URL, but
the server logs the refused request line all the same."""
from __future__ import annotations

import logging
import os
import sys

import gunicorn.http.wsgi
from flask import Flask
from gunicorn.glogging import Logger
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.urls import uri_to_iri

from api.app import create_app
from api.fanout import Handoff, StreamServer
from api.request_id import ENVIRON_KEY
from genq.logs import REQUEST_ID, Context, RedactKeys, formatter
from genq.settings import Settings

SERVER = "genq"
# werkzeug's server logs here; so does its request handler below.
access_log = logging.getLogger("werkzeug")


def main(settings: Settings, args) -> int:
    """`genq api`: gunicorn in this process's place, serving gunicorn_app."""
    from genq.webhook_secrets import Sealer

    # What create_app refuses in each gunicorn worker (a ConfigError there is a
    # worker boot failure with a traceback), refused here once, plainly.
    Sealer.from_settings(settings)
    bind = args.bind or f"{settings.api_host}:{settings.api_port}"
    host, _, port = bind.rpartition(":")
    changes: dict = {}
    if settings.public_url is None and port.isdigit():
        # Without GENQ_PUBLIC_URL, the URLs the API hands out name the port it
        # listens on, and its host unless that is every interface.
        changes["api_port"] = int(port)
        if host not in ("", "0.0.0.0", "[::]"):
            changes["api_host"] = host
    workers = args.workers or settings.workers
    # The app factory's arguments are literals gunicorn parses and passes on
    # (its import_app): how what was learned here reaches each gunicorn worker.
    factory = f"api.serve:gunicorn_app({', '.join(f'{k}={v!r}' for k, v in changes.items())})"
    # gthread: a request holds one of --threads while it is served; the API
    # keeps all but GENQ_API_HELD_THREADS of them for short requests. Event
    # streams are handed from those threads to an asyncio loop in the same
    # process (api/fanout.py: StreamWorker is gthread plus that hand-over).
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers),
                               "--worker-class", "api.fanout.StreamWorker", "--threads", str(settings.api_threads),
                               *(["--access-logfile", "-"] if settings.api_access_log else []),
                               "--logger-class", "api.serve.GunicornLogger", factory])


def gunicorn_app(**changes) -> Flask:
    """The app each gunicorn worker serves: the settings of the environment
    `genq api` ran in, with `changes` (the bound port) over them."""
    settings = Settings.from_env(**changes)
    app = create_app(settings)
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Event streams are held by the stream server, fed by Redis notifications;
        # without Redis they are served from request threads, polling.
        app.wsgi_app = Handoff(app.wsgi_app, StreamServer(app.extensions["genq"]))
    return app


class GunicornLogger(Logger):
    """gunicorn's logger (`--logger-class api.serve.GunicornLogger`) with
    key-like strings redacted from every access and error line, the request
    id on each access line, and JSON lines under GENQ_LOG_FORMAT=json."""

    @classmethod
    def install(cls) -> None:
        # gunicorn calls this once, in the master before it forks workers.
        # It has no setting for its Server header: each response takes the
        # SERVER of the module that makes it.
        gunicorn.http.wsgi.SERVER = SERVER

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for logger in (self.access_log, self.error_log):
            if not any(isinstance(f, RedactKeys) for f in logger.filters):
                logger.addFilter(RedactKeys())
        # gunicorn's loggers write through handlers of their own (they do not
        # propagate): GENQ_LOG_FORMAT=json makes their lines JSON too, and a
        # line written while a request is served carries its id.
        settings = Settings.from_env()
        for handler in self.access_log.handlers + self.error_log.handlers:
            if settings.log_format == "json":
                handler.setFormatter(formatter(settings))
            if not any(isinstance(f, Context) for f in handler.filters):
                handler.addFilter(Context())

    def access(self, resp, req, environ, request_time) -> None:
        # The request is done: its id waits in the environ for this line.
        token = REQUEST_ID.set(environ.get(ENVIRON_KEY))
        try:
            super().access(resp, req, environ, request_time)
        finally:
            REQUEST_ID.reset(token)


class RequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, saying `Server: genq` instead of
    `Werkzeug/<version> Python/<version>`, with a plain access line that
    carries the request's id."""

    def version_string(self) -> str:
        return SERVER

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # werkzeug's own wraps the line of every 3xx-5xx answer in ANSI colour
        # codes, whatever the output is: a terminal, a file or a log pipeline.
        try:
            line = f"{self.command} {uri_to_iri(self.path)} {self.request_version}"
        except AttributeError:  # a request line too broken to parse
            line = self.requestline
        environ = getattr(self, "environ", None) or {}
        access_log.info('%s "%s" %s %s', self.address_string(), line.translate(self._control_char_table), code, size,
                        extra={"request_id": environ.get(ENVIRON_KEY)})


def bind_dev_server(host: str, port: int) -> BaseWSGIServer:
    """werkzeug's threaded server listening on host:port (port 0: any free
    one), its app not yet set: build the app once `server.server_port` is
    known, so the URLs it hands out name the port actually bound."""
    server = make_server(host, port, _no_app, threaded=True, request_handler=RequestHandler)
    if not any(isinstance(f, RedactKeys) for f in access_log.filters):
        access_log.addFilter(RedactKeys())
    return server


def _no_app(environ, start_response):
    """The app until the real one is set; nothing is served before serve_forever, so in practice never."""
    start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
    return [b"starting\n"]
