"""The API's /metrics: job gauges read from the database once per cache
window however often it is scraped, and the optional bearer token."""
from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from tests.helpers import make_key


def app_counting_statements(settings):
    """The app on an engine of our own, and a list of every statement it runs."""
    engine = make_engine(settings.database_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *a: statements.append(sql))
    return create_app(settings, sessions=make_sessionmaker(engine)), statements


def queued(resp) -> float:
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
    return sum(s.value for s in families["genq_jobs"].samples if s.labels["state"] == "queued")


def test_a_scrape_storm_reads_the_database_once_per_window(embedded_settings):
    app, statements = app_counting_statements(embedded_settings.replace(metrics_cache_seconds=3600))
    client = app.test_client()
    assert client.get("/metrics").status_code == 200
    one_scrape = len(statements)
    assert one_scrape >= 1 and any("GROUP BY" in s for s in statements)
    for _ in range(50):
        assert client.get("/metrics").status_code == 200
    assert len(statements) == one_scrape


def test_the_gauges_are_read_again_once_the_window_passed(embedded_settings):
    app, statements = app_counting_statements(embedded_settings.replace(metrics_cache_seconds=0.5))
    client = app.test_client()
    before = queued(client.get("/metrics"))
    client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}},
                headers=make_key(embedded_settings, "counted"))
    time.sleep(0.6)  # past the window: what matters is that it has passed, not by how much
    assert queued(client.get("/metrics")) == before + 1


def test_no_cache_reads_on_every_scrape(embedded_settings):
    app, statements = app_counting_statements(embedded_settings.replace(metrics_cache_seconds=0))
    client = app.test_client()
    client.get("/metrics")
    one_scrape = len(statements)
    client.get("/metrics")
    assert len(statements) == 2 * one_scrape


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer s3cret-token-x", "Basic s3cret-token",
                                           "Bearer s3cret-tokén"])
def test_a_metrics_token_is_required_when_set(embedded_settings, authorization):
    client = create_app(embedded_settings.replace(metrics_token="s3cret-token")).test_client()
    resp = client.get("/metrics", headers={"Authorization": authorization} if authorization else {})
    assert resp.status_code == 401 and resp.mimetype == "application/problem+json"
    assert "GENQ_METRICS_TOKEN" in resp.get_json()["detail"] and "s3cret" not in resp.get_data(as_text=True)
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and "genq_jobs" in ok.get_data(as_text=True)
