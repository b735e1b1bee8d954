"""The record of truth on both backends: each test that asks for `sessions`
runs on the run's Postgres database and on a fresh SQLite file."""
from __future__ import annotations

import pytest

from genq.db import make_engine, make_sessionmaker
from genq.migrate import upgrade


@pytest.fixture(params=["postgres", "sqlite"])
def sessions(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'genq.db'}"
        upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()
