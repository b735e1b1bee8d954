"""Logging for every genq process: plain text at a terminal, or one JSON object
a line (GENQ_LOG_FORMAT=json) carrying the job id on every line about a job
and the request id on every line about a request.

Every process logs through one handler on the root logger, the libraries'
lines included (Python warnings, Celery, alembic, werkzeug, transformers,
diffusers); gunicorn's own two loggers get the same formatting
(api/serve.py). What the libraries say on every start, the same each time,
is kept to DEBUG."""
from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re

from genq import tracing
from genq.keys import KEY_IN_TEXT, KEY_PARAMS
from genq.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Fields callers attach with `extra=`, copied into the JSON object when present.
CONTEXT_FIELDS = ("job_id", "job_ids", "model", "pool", "worker", "delivery_id", "request_id", "url")

# The id of the API request this thread is serving (api/request_id.py sets it);
# every line logged meanwhile carries it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Libraries whose warnings are about themselves (deprecations, optional extras
# not installed, "running as root") and come again on every start: at DEBUG.
QUIET_LIBRARIES = ("py.warnings", "transformers", "diffusers", "peft", "huggingface_hub", "accelerate")
# Library loggers that say at INFO what genq says better, or nothing an
# operator acts on, and the level they are kept at unless GENQ_LOG_LEVEL=DEBUG.
QUIET_LOGGERS = {
    "alembic": logging.WARNING,  # plugins and the migration context, on every start
    # Each doorbell: "Task genq.run_job[<task id>] received" and "... succeeded in
    # 0.1s: 1". The runner logs each batch with its job ids; failures stay ERROR.
    "celery.worker.strategy": logging.WARNING,
    "celery.app.trace": logging.WARNING,
}


# The value of a query parameter named like a key, whatever it looks like.
_KEY_PARAM_VALUE = re.compile(r"(?i)([?&](?:%s)=)[^&\s\"]*" % "|".join(KEY_PARAMS))


def redact_keys(text: str) -> str:
    """`text` with anything that looks like an API key replaced: a genq key
    anywhere, and the value of a query parameter named like one."""
    return _KEY_PARAM_VALUE.sub(r"\1[redacted]", KEY_IN_TEXT.sub("gq_[redacted]", text))


class RedactKeys(logging.Filter):
    """Keeps API keys out of a log: on a handler, every record it writes; on a
    logger (gunicorn's and werkzeug's access logs), every record made there.
    The API refuses keys in URLs, but a refused request is logged all the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact_keys(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is not None:
                out[name] = getattr(record, name)
        # The trace and span this line was written in, when traces are on:
        # a log pipeline can jump from a line to its trace.
        out.update(tracing.current_ids())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Context(logging.Filter):
    """Puts the current request id (REQUEST_ID) on every record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class LibraryWarnings(logging.Filter):
    """A WARNING from one of QUIET_LIBRARIES is written as DEBUG, and only
    where DEBUG lines are (`level`, the root logger's)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and any(
                record.name == name or record.name.startswith(name + ".") for name in QUIET_LIBRARIES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


def formatter(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(settings: Settings) -> None:
    """Set up the root logger once per process (a second call changes nothing,
    as logging.basicConfig would not)."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.setLevel(settings.log_level)
    handler = logging.StreamHandler()
    for f in (RedactKeys(), Context(), LibraryWarnings(root.level)):
        handler.addFilter(f)
    handler.setFormatter(formatter(settings))
    root.addHandler(handler)
    # Python warnings become log lines (py.warnings), formatted like the rest;
    # by default each is shown once per place it is raised from.
    logging.captureWarnings(True)
    if root.level > logging.DEBUG:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
