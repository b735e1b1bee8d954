"""The API on the embedded settings (SQLite, local storage), as most API tests use it."""
from __future__ import annotations

import pytest

from api.app import create_app
from tests.conftest import WEBHOOK_KEYS


@pytest.fixture
def app(embedded_settings):
    return create_app(embedded_settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, embedded_settings):
    """The embedded settings, on SQLite and again on the run's Postgres database."""
    if request.param == "postgres":
        return embedded_settings.replace(database_url=request.getfixturevalue("pg_url"), webhook_secret_keys=WEBHOOK_KEYS)
    return embedded_settings
