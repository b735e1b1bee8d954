"""Dependencies that cannot be reached: the database or storage down is a 503
problem with Retry-After (never a 500); a broker down at publish is no failure,
the job is recorded and queued. Real refused connections, nothing mocked."""
from __future__ import annotations

import io
import socket

import pytest
from sqlalchemy import select

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import Job
from tests.conftest import WEBHOOK_KEYS
from tests.helpers import make_key

PROBLEM = "application/problem+json"


def closed_port() -> int:
    """A port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_503(resp, down: str) -> None:
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    assert int(resp.headers["Retry-After"]) > 0
    body = resp.get_json()
    assert body["unavailable"] == down and f"the {down} is unreachable" in body["detail"]


def test_database_down_is_503_on_every_route(embedded_settings):
    key = make_key(embedded_settings, "alice")
    down = embedded_settings.replace(database_url=f"postgresql+psycopg://genq@127.0.0.1:{closed_port()}/genq",
                                     webhook_secret_keys=WEBHOOK_KEYS)
    client = create_app(down).test_client()
    assert_503(client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "x"}}, headers=key), "database")
    assert_503(client.get("/v1/jobs", headers=key), "database")
    assert_503(client.get(f"/v1/jobs/{'0' * 32}", headers=key), "database")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["database"] == "down"


def test_storage_down_is_503_and_no_file_is_recorded(embedded_settings):
    key = make_key(embedded_settings, "alice")
    down = embedded_settings.replace(storage_url="s3://bucket", s3_endpoint_url=f"http://127.0.0.1:{closed_port()}",
                                     s3_access_key_id="t", s3_secret_access_key="t")
    client = create_app(down).test_client()
    resp = client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(b'{"text": "x"}\n'), "d.jsonl")},
                       headers=key, content_type="multipart/form-data")
    assert_503(resp, "storage")
    assert client.get("/v1/files", headers=key).get_json()["data"] == []
    ready = client.get("/readyz").get_json()
    assert ready["checks"]["storage"] == "down" and ready["checks"]["database"] == "ok"
    assert "storage" in ready["detail"]


@pytest.mark.timeout(60)
def test_broker_down_at_publish_still_accepts_and_records_the_job(embedded_settings):
    key = make_key(embedded_settings, "alice")
    down = embedded_settings.replace(broker_url=f"redis://127.0.0.1:{closed_port()}/0")
    client = create_app(down).test_client()
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "x"}}, headers=key)
    # Recorded and queued: the reconciler beside every worker rings for it later.
    assert resp.status_code == 202, resp.get_json()
    engine = make_engine(embedded_settings.database_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(Job.status).where(Job.id == resp.get_json()["id"])) == "queued"
    engine.dispose()
    assert client.get("/readyz").get_json()["checks"]["broker"] == "down"
