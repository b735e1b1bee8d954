"""`genq worker` logs as production runs it (Postgres, Redis, S3): with
GENQ_LOG_FORMAT=json every line is one JSON object, from the start to the
shutdown, in the main process and in prefork children (which load their
model while serving: no progress bar, no library chatter), and every line
about a job names it."""
from __future__ import annotations

import json
import secrets

import pytest
import yaml

from api.app import create_app
from tests.helpers import WorkerProcess, make_key, wait_job


def test_a_worker_logs_json_on_every_line_with_job_ids(service_settings):
    pool = yaml.safe_load(service_settings.registry_path.read_text())["models"]["demo-text"]["pool"]
    client = create_app(service_settings).test_client()
    tenant = make_key(service_settings, f"logs-{secrets.token_hex(3)}")
    worker = WorkerProcess(service_settings, [pool], preload=False, extra_env={"GENQ_LOG_FORMAT": "json"},
                           extra_args=["--concurrency", "2"])
    with worker:
        ids = [client.post("/v1/jobs", headers=tenant, json={"model": "demo-text", "input": {
            "prompt": f"json {i}", "max_new_tokens": 4}}).get_json()["id"] for i in range(3)]
        for job_id in ids:
            assert wait_job(client.get, job_id, tenant, timeout=120)["status"] == "succeeded"
    lines = worker.read_to_the_end()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}\n" + "\n".join(lines))
    assert any(r["message"].endswith(" ready.") for r in records)
    assert any(r["message"] == "worker: Warm shutdown (MainProcess)" for r in records)
    assert not [r for r in records if r["level"] not in ("INFO", "DEBUG")], lines
    for job_id in ids:
        about = [r for r in records if job_id in r["message"]]
        assert about and all(r.get("job_id") == job_id or job_id in r.get("job_ids", []) for r in about), about
