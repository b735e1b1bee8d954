"""A client generated from /openapi.json with openapi-python-client (what
tool users reach for) generates with no warning, imports, and reads a real job."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_key

# The one content type the generator does not know: a file's JSONL content, read as bytes.
CONFIG = "content_type_overrides:\n  application/jsonl: application/octet-stream\npost_hooks: []\n"

READ_A_JOB = """
import json, sys
sys.path.insert(0, sys.argv[1])
from genq_api.models import Job, JobList, Problem, File
from genq_api.api.jobs import create_job, get_job, list_jobs, cancel_job
from genq_api.api.files import upload_file
job = Job.from_dict(json.loads(sys.argv[2]))
print(job.id, job.status, job.model)
"""


@pytest.mark.skipif(importlib.util.find_spec("openapi_python_client") is None,
                    reason="openapi-python-client is not installed (it is in the test extra)")
def test_a_generated_client_imports_and_reads_a_job(client, embedded_settings, tmp_path):
    doc = client.get("/openapi.json").get_json()
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) and all(ids)
    titles = [s.get("title") for s in doc["components"]["schemas"].values()]
    assert len(titles) == len(set(titles)) and all(titles)
    (tmp_path / "openapi.json").write_text(json.dumps(doc))
    (tmp_path / "config.yaml").write_text(CONFIG)
    tool = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    out = subprocess.run([tool, "generate", "--path", "openapi.json", "--output-path", "genq_api", "--meta", "none",
                          "--config", "config.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    said = out.stdout + out.stderr
    assert out.returncode == 0 and "Warning" not in said and "Unable" not in said, said

    headers = make_key(embedded_settings, "generated")
    job = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi", "seed": 1}}, headers=headers)
    assert job.status_code == 202
    read = subprocess.run([sys.executable, "-c", READ_A_JOB, str(tmp_path), job.get_data(as_text=True)],
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    assert read.stdout.split() == [job.get_json()["id"], "queued", "demo-text"]


def test_openapi_names_every_operation_and_its_version(client):
    from importlib.metadata import version

    doc = client.get("/openapi.json").get_json()
    assert doc["info"]["version"] == version("genq")
    assert doc["paths"]["/v1/jobs"]["post"]["operationId"] == "create_job"
    assert doc["components"]["schemas"]["Input_demo_text"]["title"] == "Input_demo_text"


def test_a_browser_is_sent_to_the_console_and_a_client_told_where_things_are(client):
    resp = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/console")
    body = client.get("/", headers={"Accept": "application/json"}).get_json()
    assert body["docs"] == "/docs" and body["openapi"] == "/openapi.json" and body["console"] == "/console"


def test_answers_are_the_shapes_the_document_declares(client, embedded_settings):
    """The response schemas are made from these typed dicts: a real answer of each validates."""
    import io

    from pydantic import TypeAdapter

    from api.catalog import ModelView
    from api.files import FileView
    from api.serialize import EventView
    from genq.serialize import JobView

    headers = make_key(embedded_settings, "shapes")
    job = client.post("/v1/jobs", json={"model": "demo-image", "input": {"prompt": "x"}}, headers=headers).get_json()
    TypeAdapter(JobView).validate_python(job, strict=True)
    [queued] = client.get(f"/v1/jobs/{job['id']}/events", headers=headers).get_json()["data"]
    TypeAdapter(EventView).validate_python(queued, strict=True)
    f = client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(b'{"text": "a"}\n'), "d.jsonl")},
                    headers=headers, content_type="multipart/form-data").get_json()
    TypeAdapter(FileView).validate_python(f, strict=True)
    for model in client.get("/v1/models", headers=headers).get_json()["data"]:
        TypeAdapter(ModelView).validate_python(model, strict=True)
