"""What the API's request handlers share: settings, sessions, registry,
storage, the Celery app and its doorbells, the webhook secrets' sealer, live
output. Built once by the app factory and kept in app.extensions."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from celery import Celery
from flask import current_app
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from api.doorbell import Doorbells
from genq.keys import KeyCache
from genq.notify import Notifier
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
    # Event notifications (genq.notify) on the broker's Redis; None without one.
    notifier: Notifier | None = None
    # Submits' doorbells, sent after the answer (made from `celery` when not given).
    doorbells: Doorbells | None = None
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
        if self.doorbells is None:
            self.doorbells = Doorbells(self.celery, self.notifier)
        # Reads of one statement need no transaction: in autocommit a read is
        # its one round trip, without a BEGIN before it and a ROLLBACK after.
        engine: Engine = self.sessions.kw["bind"]
        self._engine = engine
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Postgres: the poll's read goes to psycopg itself (see `driver`).
        self.driver_reads = engine.dialect.name == "postgresql"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for a single-statement read, outside any transaction."""
        with self._reads.connect() as conn:
            yield conn

    @contextmanager
    def driver(self, autocommit: bool = True) -> Iterator[Any]:
        """A pooled psycopg connection, in autocommit for a single-statement
        read on the hot path with no SQLAlchemy between it and its row: its
        statement and result machinery cost a poll more CPU than the read
        (0.15 ms against 0.04 ms, measured); or not, for a transaction the
        caller commits (genq.jobs.submit_pipelined), rolled back if it did not.
        The pool's checkout (and its ping of a connection idle too long) still
        applies. A driver error leaves as SQLAlchemy's DBAPIError, as from any
        other statement: with `connection_invalidated` when the connection
        died (it is then dropped from the pool), and mapped to 503 when the
        database is down."""
        fairy = self._engine.raw_connection()
        conn = fairy.driver_connection
        try:
            conn.autocommit = autocommit
            yield conn
            conn.rollback()  # a transaction left open (none is, normally): no round trip when idle
            conn.autocommit = False
        except BaseException as exc:
            dropped = conn.broken or conn.closed
            if not dropped:
                try:
                    conn.rollback()
                    conn.autocommit = False
                except Exception:  # noqa: BLE001 - it died meanwhile
                    dropped = True
            if dropped:
                # As SQLAlchemy does on a disconnect: every connection pooled
                # before now is suspect (a database restart drops them all),
                # and each is replaced at its next checkout.
                self._engine.pool._invalidate(fairy, exc)
            if isinstance(exc, self._engine.dialect.loaded_dbapi.Error):
                raise DBAPIError.instance(None, None, exc, self._engine.dialect.loaded_dbapi.Error,
                                          connection_invalidated=dropped, dialect=self._engine.dialect) from exc
            raise
        finally:
            fairy.close()

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
