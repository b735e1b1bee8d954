"""The embedded database file is its owner's only."""
from __future__ import annotations

import stat

from sqlalchemy import text

from genq.db import make_engine
from genq.migrate import upgrade


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_database_and_its_folder_are_private(tmp_path):
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'genq.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:  # a write, with the connection open: the -wal and -shm files exist
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
        files = {p.name: mode(p) for p in home.iterdir()}
    engine.dispose()
    assert mode(home) == 0o700
    assert {"genq.db", "genq.db-wal", "genq.db-shm"} <= set(files)
    assert set(files.values()) == {0o600}, files


def test_an_existing_folder_keeps_its_mode(tmp_path):
    tmp_path.chmod(0o755)
    make_engine(f"sqlite:///{tmp_path / 'x.db'}").dispose()
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "x.db") == 0o600


def kill_backends(pg_url: str, pids) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()


def test_a_pooled_connection_idle_past_the_bound_is_pinged_and_replaced(pg_url):
    """Postgres gone and back (a restart, a proxy's idle cut) while a pooled
    connection sat idle: the pool pings it on checkout and hands out a new one."""
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    kill_backends(pg_url, [first])
    try:
        for record in list(engine.pool._pool.queue):  # as if idle past the bound
            record.info["idle_since"] -= 60
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != first
    finally:
        engine.dispose()
