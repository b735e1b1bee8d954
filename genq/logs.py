"""Logging for every genq process: plain text at a terminal, or one JSON object
a line (GENQ_LOG_FORMAT=json) carrying the job id on every line about a job."""
from __future__ import annotations

import datetime as dt
import json
import logging

from genq.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Fields callers attach with `extra=`, copied into the JSON object when present.
CONTEXT_FIELDS = ("job_id", "job_ids", "model", "pool", "worker", "delivery_id")


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
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
