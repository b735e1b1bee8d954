"""genq.logs in a process of its own (the root logger is set up once per
process): library warnings kept to DEBUG, chatty library loggers quiet, the
request id on every line logged while a request is served, keys redacted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import logging, warnings
from genq.logs import REQUEST_ID, configure
from genq.settings import Settings

configure(Settings.from_env())
for _ in range(3):  # the same warning from the same place: written once at most
    warnings.warn("peft would like a word", FutureWarning)
logging.getLogger("transformers.models.clip").warning("torchvision is not installed")
logging.getLogger("transformers.models.clip").error("this one matters")
logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
logging.getLogger("celery.worker.strategy").info("Task genq.run_job[1] received")
token = REQUEST_ID.set("req-1")
logging.getLogger("api.jobs").info("while serving, key gq_" + "a" * 43, extra={"job_id": "j1"})
REQUEST_ID.reset(token)
logging.getLogger("genq").info("after it")
"""


def run(level: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_LOG_FORMAT="json", GENQ_LOG_LEVEL=level, GENQ_HOME="/nonexistent")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stderr.splitlines()]


def test_at_info_library_chatter_is_not_written():
    records = run("INFO")
    said = [(r["level"], r["logger"], r["message"]) for r in records]
    assert said == [
        ("ERROR", "transformers.models.clip", "this one matters"),
        ("INFO", "api.jobs", "while serving, key gq_[redacted]"),
        ("INFO", "genq", "after it"),
    ]
    assert (records[1]["request_id"], records[1]["job_id"]) == ("req-1", "j1")
    assert "request_id" not in records[2]


def test_at_debug_library_warnings_are_debug_lines_shown_once():
    records = run("DEBUG")
    warned = [r for r in records if r["logger"] == "py.warnings"]
    assert len(warned) == 1 and warned[0]["level"] == "DEBUG" and "FutureWarning: peft" in warned[0]["message"]
    clip = [(r["level"], r["message"]) for r in records if r["logger"] == "transformers.models.clip"]
    assert clip == [("DEBUG", "torchvision is not installed"), ("ERROR", "this one matters")]
    assert {r["logger"] for r in records} >= {"alembic.runtime.migration", "celery.worker.strategy"}
