"""Shared fixtures: real Postgres and Redis on 127.0.0.1, moto's S3 server over
HTTP, the demo checkpoints built once, and a registry whose pools are unique to
this test run (so two runs on one Redis never take each other's messages)."""
from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

from genq.db import temporary_database
from genq.settings import DEFAULT_REGISTRY, Settings

PG_ADMIN_URL = os.environ.get("GENQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]
# The key every API and webhook sender on a shared (Postgres) database seals
# webhook secrets with; embedded settings make their own in GENQ_HOME.
WEBHOOK_KEYS = (Fernet.generate_key().decode(),)
# No hub is reachable: fail at once rather than retry a download (worker
# subprocesses inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Demo checkpoints, built once per run with the real classes and loaded
    later through from_pretrained, as a real checkpoint would be."""
    from models.demo import ensure_checkpoint

    root = Path(os.environ.get("GENQ_TEST_MODEL_DIR") or tmp_path_factory.mktemp("models"))
    ensure_checkpoint("demo:text", root)
    ensure_checkpoint("demo:image", root)
    ensure_checkpoint("demo:image-xl", root)
    ensure_checkpoint("demo:audio", root)
    ensure_checkpoint("demo:video", root)
    ensure_checkpoint("demo:vision-text", root)
    ensure_checkpoint("demo:digits", root)
    return root


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory) -> Path:
    """The shipped registry with this run's own pool names (and small batches
    waiting little, so tests run fast)."""
    doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    for entry in doc["models"].values():
        entry["pool"] = f"{entry['pool']}-{RUN_ID}"
    path = tmp_path_factory.mktemp("registry") / "registry.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def temp_pg_database(suffix: str = ""):
    """A database of its own on the local Postgres server, dropped afterwards."""
    return temporary_database(PG_ADMIN_URL, f"genq_test_{RUN_ID}{suffix}")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh database for this run, migrated."""
    from genq.migrate import upgrade

    with temp_pg_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server over HTTP; boto3 talks to it like any endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def new_bucket(s3_endpoint: str) -> dict:
    """A fresh bucket on moto's server, as the Settings fields that point at it."""
    import boto3

    bucket = f"genq-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    return dict(storage_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint, s3_access_key_id="test",
                s3_secret_access_key="test")


@pytest.fixture
def s3_settings(s3_endpoint) -> dict:
    return new_bucket(s3_endpoint)


@pytest.fixture
def embedded_settings(tmp_path, model_dir, registry_path) -> Settings:
    """Everything local: SQLite, a storage folder, the filesystem broker."""
    from genq.migrate import upgrade

    settings = Settings.from_env({}, home=tmp_path / "home", model_dir=model_dir, registry_path=registry_path,
                                 progress_interval=0.2, cancel_poll_interval=0.1, lease_seconds=30)
    upgrade(settings.database_url)
    return settings


@pytest.fixture
def service_settings(tmp_path, model_dir, registry_path, pg_url, s3_settings) -> Settings:
    """Production-shaped: Postgres, Redis and S3 (moto) over the network."""
    return Settings.from_env({}, home=tmp_path / "home", model_dir=model_dir, registry_path=registry_path,
                             database_url=pg_url, broker_url=REDIS_URL, progress_interval=0.2,
                             cancel_poll_interval=0.1, lease_seconds=30, webhook_secret_keys=WEBHOOK_KEYS,
                             **s3_settings)
