"""The API's two HTTP servers as genq runs them: gunicorn (`genq api`) and
werkzeug's (`genq up`). Both answer `Server: genq`, naming no versions, and
keep API keys out of their access logs: the API refuses a key in a URL, but
the server logs the refused request line all the same."""
from __future__ import annotations

import logging

import gunicorn.http.wsgi
from gunicorn.glogging import Logger
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from genq.logs import RedactKeys

SERVER = "genq"


class GunicornLogger(Logger):
    """gunicorn's logger (`--logger-class genq.serving.GunicornLogger`) with
    key-like strings redacted from every access and error line."""

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


class RequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, saying `Server: genq` instead of
    `Werkzeug/<version> Python/<version>`."""

    def version_string(self) -> str:
        return SERVER


def bind_dev_server(host: str, port: int) -> BaseWSGIServer:
    """werkzeug's threaded server listening on host:port (port 0: any free
    one), its app not yet set: build the app once `server.server_port` is
    known, so the URLs it hands out name the port actually bound."""
    server = make_server(host, port, _no_app, threaded=True, request_handler=RequestHandler)
    werkzeug_log = logging.getLogger("werkzeug")
    if not any(isinstance(f, RedactKeys) for f in werkzeug_log.filters):
        werkzeug_log.addFilter(RedactKeys())
    return server


def _no_app(environ, start_response):
    """The app until the real one is set; nothing is served before serve_forever, so in practice never."""
    start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
    return [b"starting\n"]
