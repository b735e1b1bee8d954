"""DELETE for jobs, files and fine-tuned models, and retention as the API
shows it (`expires_at`, an admin's per-tenant override), on the embedded
stack: tenant-scoped, problem+json, the bytes gone from storage."""
from __future__ import annotations

import datetime as dt
import io

from sqlalchemy import update

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import Job, ModelVersion, utcnow
from genq.storage import NotFound, make_storage
from tests.helpers import make_key

PROBLEM = "application/problem+json"
TEXT_JOB = {"model": "demo-text", "input": {"prompt": "hello", "max_new_tokens": 4}}


def gone(storage, key: str) -> bool:
    try:
        storage.get(key)
    except NotFound:
        return True
    return False


def end(settings, job_id: str, key: str | None = None, ended: dt.datetime | None = None) -> None:
    """Mark the job succeeded (as a worker would), with one output object."""
    output = {"text": "done"}
    if key:
        make_storage(settings).put(key, b"bytes", "image/png")
        output = {"images": [{"key": key}]}
    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded", output=output,
                                                                   completed_at=ended or utcnow()))


def test_a_job_is_deleted_once_it_has_ended_with_its_outputs(client, embedded_settings):
    alice, bob = make_key(embedded_settings, "alice"), make_key(embedded_settings, "bob")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=alice).get_json()["id"]
    # Queued: refused, and the job is untouched.
    refused = client.delete(f"/v1/jobs/{job_id}", headers=alice)
    assert refused.status_code == 409 and refused.mimetype == PROBLEM and "cancel it first" in refused.get_json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).get_json()["status"] == "queued"
    key = f"jobs/{job_id}/0.png"
    end(embedded_settings, job_id, key)
    # Another tenant's job is no job at all, for a delete too.
    assert client.delete(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert not gone(make_storage(embedded_settings), key)
    resp = client.delete(f"/v1/jobs/{job_id}", headers=alice)
    assert resp.status_code == 204 and resp.data == b""
    assert gone(make_storage(embedded_settings), key)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/events", headers=alice).status_code == 404
    again = client.delete(f"/v1/jobs/{job_id}", headers=alice)
    assert again.status_code == 404 and again.mimetype == PROBLEM


def test_a_file_in_use_by_a_fine_tune_is_kept_then_deleted(client, embedded_settings):
    alice, bob = make_key(embedded_settings, "alice"), make_key(embedded_settings, "bob")
    rows = b"".join(b'{"prompt": "a", "completion": "b"}\n' for _ in range(4))
    f, v = (client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(rows), "d.jsonl")},
                        headers=alice, content_type="multipart/form-data").get_json() for _ in range(2))
    job = client.post("/v1/jobs", json={"model": "demo-text", "type": "fine-tune",
                                        "input": {"training_file": f["id"], "validation_file": v["id"]}}, headers=alice)
    assert job.status_code == 202, job.get_json()
    for used in (f, v):  # the validation file too
        refused = client.delete(f"/v1/files/{used['id']}", headers=alice)
        assert refused.status_code == 409 and refused.mimetype == PROBLEM
        assert job.get_json()["id"] in refused.get_json()["detail"]
    assert client.delete(f"/v1/files/{f['id']}", headers=bob).status_code == 404
    client.post(f"/v1/jobs/{job.get_json()['id']}/cancel", headers=alice)
    assert client.delete(f"/v1/files/{f['id']}", headers=alice).status_code == 204
    assert client.delete(f"/v1/files/{v['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/files/{f['id']}", headers=alice).status_code == 404
    assert gone(make_storage(embedded_settings), f"files/{f['id']}/content")


def test_only_your_own_fine_tuned_model_can_be_deleted(client, embedded_settings):
    alice, bob = make_key(embedded_settings, "alice"), make_key(embedded_settings, "bob")
    shared = client.delete("/v1/models/demo-text", headers=alice)
    assert shared.status_code == 403 and shared.mimetype == PROBLEM
    storage = make_storage(embedded_settings)
    alice_id = client.post("/v1/jobs", json=TEXT_JOB, headers=alice).get_json()["id"]
    with make_sessionmaker(make_engine(embedded_settings.database_url)).begin() as session:
        tenant_id = session.get(Job, alice_id).tenant_id
        session.add(ModelVersion(id="ab" * 16, tenant_id=tenant_id, name="demo-text:ft-mine-abcdef", base_model="demo-text",
                                 family="text-generation", method="lora", storage_prefix=f"models/{'ab' * 16}",
                                 job_id="cd" * 16))
    storage.put(f"models/{'ab' * 16}/adapter_model.safetensors", b"w", "application/octet-stream")
    storage.put(f"jobs/{'cd' * 16}/checkpoints/step-000002.pt", b"c", "application/octet-stream")
    assert client.get("/v1/models/demo-text:ft-mine-abcdef", headers=alice).status_code == 200
    assert client.delete("/v1/models/demo-text:ft-mine-abcdef", headers=bob).status_code == 404
    assert client.delete("/v1/models/demo-text:ft-mine-abcdef", headers=alice).status_code == 204
    assert client.get("/v1/models/demo-text:ft-mine-abcdef", headers=alice).status_code == 404
    assert gone(storage, f"models/{'ab' * 16}/adapter_model.safetensors")
    assert gone(storage, f"jobs/{'cd' * 16}/checkpoints/step-000002.pt")


def test_expires_at_follows_the_settings_and_a_tenants_own_retention(embedded_settings):
    settings = embedded_settings.replace(output_retention_seconds=3600, file_retention_seconds=86400)
    client = create_app(settings).test_client()
    admin, alice = make_key(settings, "ops", "admin"), make_key(settings, "alice")
    job_id = client.post("/v1/jobs", json=TEXT_JOB, headers=alice).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).get_json()["expires_at"] is None  # still queued
    ended = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    end(settings, job_id, ended=ended)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).get_json()["expires_at"] == "2026-01-01T13:00:00Z"
    f = client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(b'{"text": "x"}\n'), "d.jsonl")},
                    headers=alice, content_type="multipart/form-data").get_json()
    created = dt.datetime.fromisoformat(f["created_at"].replace("Z", "+00:00"))
    assert f["expires_at"] == (created + dt.timedelta(days=1)).isoformat().replace("+00:00", "Z")

    # An admin gives alice her own: outputs kept a minute, files kept.
    bad = client.put("/v1/admin/tenants/alice/retention", json={"outputs_seconds": -1}, headers=admin)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "outputs_seconds"
    assert client.put("/v1/admin/tenants/alice/retention", json={"outputs_seconds": 60}, headers=alice).status_code == 403
    assert client.put("/v1/admin/tenants/nobody/retention", json={}, headers=admin).status_code == 404
    resp = client.put("/v1/admin/tenants/alice/retention", json={"outputs_seconds": 60, "files_seconds": 0},
                      headers=admin)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["effective"] == {"outputs_seconds": 60, "jobs_seconds": settings.job_retention_seconds,
                                            "files_seconds": 0}
    # A fresh process (no key cached) shows it at once; others within GENQ_KEY_CACHE_SECONDS.
    fresh = create_app(settings).test_client()
    assert fresh.get(f"/v1/jobs/{job_id}", headers=alice).get_json()["expires_at"] == "2026-01-01T12:01:00Z"
    assert fresh.get(f"/v1/files/{f['id']}", headers=alice).get_json()["expires_at"] is None
    # Cleared: the settings' values again.
    cleared = client.put("/v1/admin/tenants/alice/retention", json={}, headers=admin).get_json()
    assert cleared["own"] == {"outputs_seconds": None, "jobs_seconds": None, "files_seconds": None}
    assert client.get("/v1/admin/tenants/alice/retention", headers=admin).get_json() == cleared
    # No override left behind, not even a JSON null: the sweep sees none.
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        from sqlalchemy import select

        from genq.schema import Tenant

        assert session.scalar(select(Tenant.id).where(Tenant.name == "alice", Tenant.retention.is_not(None))) is None
