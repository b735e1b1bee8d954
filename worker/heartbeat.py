"""A worker's heartbeat: "still alive" in the database, for /v1/admin/workers."""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from genq.db import make_engine, make_sessionmaker
from genq.pools import forget_gone_workers, heartbeat
from genq.schema import utcnow
from genq.settings import Settings

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Beside every worker: "still alive" in the database every
    heartbeat_interval, which /v1/admin/workers and the pools' worker counts
    read. Rows silent for a day are removed (replicas scaled away)."""

    def __init__(self, settings: Settings, name: str, pools: list[str], model_errors=lambda: {}):
        super().__init__(name="heartbeat", daemon=True)
        self.settings, self.worker, self.pools = settings, name, pools
        self.model_errors = model_errors

    def run(self) -> None:
        sessions = make_sessionmaker(make_engine(self.settings.database_url))
        while True:
            try:
                with sessions.begin() as session:
                    heartbeat(session, self.worker, self.pools, model_errors=self.model_errors())
                    forget_gone_workers(session, utcnow() - dt.timedelta(days=1))
            except Exception:  # the database may be down: try again next beat
                log.exception("heartbeat failed")
            time.sleep(self.settings.heartbeat_interval)
