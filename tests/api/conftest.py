"""The API on the embedded settings (SQLite, local storage), as most API tests use it."""
from __future__ import annotations

import pytest

from api.app import create_app


@pytest.fixture
def app(embedded_settings):
    return create_app(embedded_settings)


@pytest.fixture
def client(app):
    return app.test_client()
