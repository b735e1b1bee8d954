"""genq.client against the production shape: `genq api` (gunicorn, streams
handed to its asyncio server) on Postgres, Redis and moto's S3, and a real
`genq worker`. Streams resume through the fan-out server; images come from
presigned S3 URLs, fetched without the API key."""
from __future__ import annotations

import secrets
import threading
import time

import httpx
import pytest
import yaml

from genq.client import AsyncClient, Client
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS, new_bucket
from tests.helpers import WorkerProcess, genq_api, make_key


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_dir, registry_path, pg_url, s3_endpoint):
    settings = Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=model_dir, registry_path=registry_path,
        database_url=pg_url, broker_url=REDIS_URL, progress_interval=0.2, cancel_poll_interval=0.1,
        lease_seconds=30, webhook_secret_keys=WEBHOOK_KEYS, **new_bucket(s3_endpoint))
    pools = sorted({m["pool"] for m in yaml.safe_load(registry_path.read_text())["models"].values()})
    with WorkerProcess(settings, pools), genq_api(settings, {"GENQ_EVENT_STREAM_SECONDS": "1"}) as api:
        yield {**api, "settings": settings}


@pytest.fixture
def client(service):
    key = make_key(service["settings"], f"c-{secrets.token_hex(4)}")["Authorization"].split()[1]
    with Client(service["url"], key) as c:
        yield c


def test_a_text_stream_resumes_through_the_stream_server(service, client, registry_path):
    admin = make_key(service["settings"], f"ops-{secrets.token_hex(3)}", "admin")
    pool = yaml.safe_load(registry_path.read_text())["models"]["demo-text"]["pool"]
    http = httpx.Client(base_url=service["url"], headers=admin, timeout=30)
    assert http.post(f"/v1/admin/pools/{pool}/pause").status_code == 200
    try:
        job = client.jobs.create("demo-text", {"prompt": "Once upon a time", "max_new_tokens": 96, "seed": 5})
        events = []
        reader = threading.Thread(target=lambda: events.extend(client.jobs.stream(job.id)))
        reader.start()
        time.sleep(2.5)  # the stream server ends the stream every second; the job waits
    finally:
        assert http.post(f"/v1/admin/pools/{pool}/resume").status_code == 200
    reader.join(120)
    types = [e.type for e in events]
    assert types[0] == "queued" and types[-1] == "completed" and types.count("queued") == 1, types
    # Nothing replayed: every event with an id came once. The place in line (`queue`)
    # has no id by design: a stream opened again may say it again, as it may have changed.
    ids = [e.id for e in events if e.id is not None]
    assert len(set(ids)) == len(ids), ids
    assert {e.type for e in events if e.id is None} <= {"queue"}, types
    final = client.jobs.get(job.id).output["text"]
    assert final.startswith("".join(e.delta for e in events if e.delta is not None))


def test_an_image_from_s3_is_downloaded_without_the_key(client, tmp_path):
    job = client.jobs.create("demo-image", {"prompt": "a red square", "width": 64, "height": 64, "seed": 7})
    job = job.wait(timeout=120)
    url = job.output["images"][0]["url"]
    assert "X-Amz-Signature" in url and not url.startswith(client.base_url)
    [path] = job.download(tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_async_run_on_the_service(service):
    import asyncio

    key = make_key(service["settings"], f"a-{secrets.token_hex(4)}")["Authorization"].split()[1]

    async def main():
        async with AsyncClient(service["url"], key) as c:
            return await c.run("demo-text", {"prompt": "hi", "max_new_tokens": 4, "seed": 1}, timeout=120)

    assert asyncio.run(main())["tokens"] <= 4
