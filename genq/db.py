"""Engine and session factory for the record of truth (Postgres or SQLite)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker


def private_sqlite_file(url: str) -> None:
    """An SQLite database file holds every tenant's jobs, files' records and
    key hashes: when genq makes it, its folder (GENQ_HOME by default) is made
    0700 and the file 0600. SQLite gives its -wal and -shm files the main
    file's mode. Existing files and folders keep the mode they have."""
    if not url.startswith("sqlite"):
        return
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # an empty file is an empty database
    except FileExistsError:
        pass


def redact(url: str) -> str:
    """A database URL without its password, for printing."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """`pool_size`: connections kept open (Postgres). A process whose threads
    use more at once opens more, up to as many again, but closes each extra
    one as it is returned: an API process keeps one per thread, or every
    request past the pool pays a new connection (a server process forked)."""
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        # API threads and worker processes share one file: WAL lets readers run
        # beside the writer, and busy_timeout waits for the write lock instead
        # of failing at once.
        engine = sqlalchemy.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # connect_timeout: a database host that does not answer fails a request
    # in seconds (a 503) instead of hanging it; libpq's default waits forever.
    # Through the module: tracing (genq.tracing) wraps sqlalchemy.create_engine.
    engine = sqlalchemy.create_engine(url, pool_size=pool_size, max_overflow=max(10, pool_size),
                           connect_args={"connect_timeout": 5})
    ping_when_idle(engine)
    return engine


# A pooled connection idle longer than this is pinged before it is handed out.
PING_IDLE_SECONDS = 2.0


def ping_when_idle(engine: Engine, idle_seconds: float = PING_IDLE_SECONDS) -> None:
    """pool_pre_ping, but only for connections idle past `idle_seconds`.

    pool_pre_ping costs a round trip on every checkout, as much as the one
    statement a poll needs. A connection checked in moments ago is alive unless
    the server went away in those moments, which a request then meets as a 503
    (and the pool drops its connections); one idle longer (a restart, a proxy's
    idle cut) is pinged, and a dead one is replaced before anyone uses it."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since <= idle_seconds:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool replaces it, up to three times
            raise DisconnectionError(str(exc)) from exc
        if alive is False:
            raise DisconnectionError("ping failed")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def temporary_database(admin_url: str, name: str) -> Iterator[str]:
    """A Postgres database of its own named `name`, created through `admin_url`
    (a server the caller may create databases on) and dropped afterwards, with
    whatever is still connected to it. For tests and benchmarks."""
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
