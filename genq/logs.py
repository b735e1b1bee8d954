"""Logging for every genq process: plain text at a terminal, or one JSON object
a line (GENQ_LOG_FORMAT=json) carrying the job id on every line about a job."""
from __future__ import annotations

import datetime as dt
import json
import logging
import re

from genq.keys import KEY_IN_TEXT, KEY_PARAMS
from genq.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Fields callers attach with `extra=`, copied into the JSON object when present.
CONTEXT_FIELDS = ("job_id", "job_ids", "model", "pool", "worker", "delivery_id")


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
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(settings: Settings) -> None:
    """Set up the root logger once per process (a second call changes nothing,
    as logging.basicConfig would not)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.addFilter(RedactKeys())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
