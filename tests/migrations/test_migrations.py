"""The Alembic migrations build exactly the schema the models describe, on
Postgres and on SQLite, and can be walked down and up again."""
from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from genq.migrate import alembic_config, upgrade
from genq.schema import Base
from tests.conftest import temp_pg_database


def diff(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        result = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return result


def test_postgres_migrations_match_models(pg_url):
    assert diff(pg_url) == []


def test_sqlite_migrations_match_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'genq.db'}"
    upgrade(url)
    assert diff(url) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_downgrade_then_upgrade_round_trips(tmp_path, backend):
    if backend == "sqlite":
        round_trip(f"sqlite:///{tmp_path / 'rt.db'}")
    else:
        with temp_pg_database("_rt") as url:
            round_trip(url)


def round_trip(url: str) -> None:
    upgrade(url)
    cfg = alembic_config(url)
    command.downgrade(cfg, "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    assert {"tenants", "api_keys", "jobs", "job_events"} <= set(inspect(engine).get_table_names())
    engine.dispose()
    assert diff(url) == []
