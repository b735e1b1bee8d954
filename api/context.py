"""What the API's request handlers share: settings, sessions, registry, storage,
the Celery app, the webhook secrets' sealer, live output. Built once by the app
factory and kept in app.extensions."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from celery import Celery
from flask import current_app
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from genq.keys import KeyCache
from genq.live import Live, live_for
from genq.position import Line
from genq.settings import Settings
from genq.storage import Storage
from genq.webhook_secrets import Sealer
from models.registry import Registry


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    registry: Registry
    storage: Storage
    celery: Celery
    sealer: Sealer
    # Verified API keys, for GENQ_KEY_CACHE_SECONDS (made from settings when not given).
    keys: KeyCache | None = None
    _live: Live | None = field(default=None, repr=False)
    _live_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def live(self) -> Live:
        """Live output (genq.live), one per process, made on first use: after a
        pre-forking server has forked, and never for an API that streams nothing."""
        if self._live is None:
            with self._live_lock:
                if self._live is None:
                    self._live = live_for(self.settings)
        return self._live

    def __post_init__(self):
        if self.keys is None:
            self.keys = KeyCache(self.settings.key_cache_seconds)
        # Queued jobs' places in line, each pool's counts and each job's place
        # kept a few seconds (genq.position).
        self.line = Line()
        # Reads of one statement need no transaction: in autocommit a read is
        # its one round trip, without a BEGIN before it and a ROLLBACK after.
        engine: Engine = self.sessions.kw["bind"]
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for a single-statement read, outside any transaction."""
        with self._reads.connect() as conn:
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def settle_deletes(self, owed: list[int]) -> None:
        """Delete from storage what a delete just committed owes. Best effort:
        what fails here stays owed, and the workers' retention sweep retries it."""
        from genq.retention import settle_deletes

        try:
            settle_deletes(self.sessions, self.storage, ids=owed)
        except Exception:
            logging.getLogger(__name__).warning("storage deletes %s left to the sweep", owed, exc_info=True)


def ctx() -> Context:
    return current_app.extensions["genq"]
