"""The retention sweeper beside every model worker: once every
GENQ_SWEEP_INTERVAL, outputs, finished jobs and files past their retention
go, and storage deletes still owed (a crash between a row's delete and its
objects', or storage that was down) are carried out (genq.retention)."""
from __future__ import annotations

import logging
import threading

from genq import retention
from genq.db import make_engine, make_sessionmaker
from genq.outage import unavailable
from genq.settings import Settings
from genq.storage import make_storage

log = logging.getLogger(__name__)


class Sweeper(threading.Thread):
    """Every worker sweeps: each step is a bounded transaction and every
    storage delete is idempotent, so two workers sweeping at once do the same
    work twice at worst, never harm. A round that fails is tried again next
    interval, so the thread outlives any outage."""

    def __init__(self, settings: Settings):
        super().__init__(name="sweeper", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        sessions = make_sessionmaker(make_engine(self.settings.database_url))
        storage = make_storage(self.settings)
        while not self.stopped.wait(self.settings.sweep_interval):
            try:
                retention.sweep(sessions, storage, self.settings)
            except Exception as exc:
                if (down := unavailable(exc)) is None:
                    log.exception("retention sweep failed; trying again in %ss", self.settings.sweep_interval)
                else:
                    log.warning("retention sweep failed, the %s is unreachable; trying again in %ss",
                                down, self.settings.sweep_interval)
