"""/healthz (the process is up) and /readyz (its dependencies answer)."""
from __future__ import annotations

import logging

from flask import Blueprint
from sqlalchemy import text

from api.context import ctx
from api.errors import problem
from genq.outage import RETRY_AFTER

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


def _check_database() -> None:
    with ctx().session() as session:
        session.execute(text("SELECT 1"))


def _check_broker() -> None:
    with ctx().celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_storage() -> None:
    ctx().storage.check()


CHECKS = {"database": _check_database, "broker": _check_broker, "storage": _check_storage}


@bp.get("/readyz")
def readyz():
    results, down = {}, []
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:  # any failure means not ready
            # Up or down to anyone who asks (no key needed); why, only to the log:
            # an error's text can name hosts, users and paths.
            log.warning("readyz: the %s is down: %s: %s", name, type(exc).__name__, str(exc)[:300])
            results[name] = "down"
            down.append(name)
    if down:
        return problem(503, f"not ready: {', '.join(down)} unreachable", headers={"Retry-After": RETRY_AFTER}, extra={"checks": results})
    return {"status": "ready", "checks": results}
