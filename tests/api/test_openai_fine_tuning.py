"""OpenAI-style fine-tuning jobs (api/openai_fine_tuning.py) in process with
no worker: cancel, tenant isolation, bad datasets. One trained to its end
through the `openai` package: tests/test_openai.py."""
from __future__ import annotations

import io
import json
import secrets

import pytest

from api.app import create_app
from tests.helpers import make_key


@pytest.fixture
def app(embedded_settings):
    return create_app(embedded_settings)


@pytest.fixture
def alice(embedded_settings):
    return make_key(embedded_settings, f"alice-{secrets.token_hex(3)}")


def upload(client, headers, data: bytes):
    return client.post("/openai/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": "fine-tune", "file": (io.BytesIO(data), "train.jsonl")})


DATASET = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'


def test_cancel_and_another_tenant_sees_nothing(app, embedded_settings, alice):
    client = app.test_client()
    f = upload(client, alice, DATASET).get_json()
    assert (f["purpose"], f["bytes"]) == ("fine-tune", len(DATASET))
    job = client.post("/openai/v1/fine_tuning/jobs", headers=alice,
                      json={"model": "demo-text", "training_file": f["id"]}).get_json()
    assert job["status"] == "queued" and job["object"] == "fine_tuning.job"
    bob = make_key(embedded_settings, f"bob-{secrets.token_hex(3)}")
    for method, path in (("get", f"/openai/v1/fine_tuning/jobs/{job['id']}"),
                         ("post", f"/openai/v1/fine_tuning/jobs/{job['id']}/cancel"),
                         ("get", f"/openai/v1/fine_tuning/jobs/{job['id']}/events")):
        resp = getattr(client, method)(path, headers=bob)
        assert resp.status_code == 404 and "error" in resp.get_json(), path
    assert client.get("/openai/v1/fine_tuning/jobs", headers=bob).get_json()["data"] == []
    resp = client.post("/openai/v1/fine_tuning/jobs", headers=bob, json={"model": "demo-text", "training_file": f["id"]})
    assert resp.status_code == 404 and resp.get_json()["error"]["param"] == "training_file"
    cancelled = client.post(f"/openai/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice).get_json()
    assert cancelled["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).get_json()["status"] == "canceled"


def test_a_bad_dataset_is_refused_naming_the_line(app, alice):
    client = app.test_client()
    resp = upload(client, alice, DATASET + b'{"prompt": 5}\n')
    assert resp.status_code == 422 and "line 3" in resp.get_json()["error"]["message"]
    assert client.get("/v1/files", headers=alice).get_json()["data"] == []


def test_a_batch_file_is_no_training_file(app, alice):
    client = app.test_client()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "demo-text", "prompt": "x"}}
    f = client.post("/openai/v1/files", headers=alice, content_type="multipart/form-data",
                    data={"purpose": "batch", "file": (io.BytesIO(json.dumps(line).encode()), "b.jsonl")}).get_json()
    resp = client.post("/openai/v1/fine_tuning/jobs", headers=alice, json={"model": "demo-text", "training_file": f["id"]})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "training_file"


CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
PAIRS = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e", "rejected": "f"}\n'


def test_dpo_through_the_method_object_with_a_validation_file(app, alice):
    client = app.test_client()
    pairs, held_out = upload(client, alice, PAIRS).get_json(), upload(client, alice, PAIRS.splitlines()[0]).get_json()
    job = client.post("/openai/v1/fine_tuning/jobs", headers=alice, json={
        "model": "demo-text", "training_file": pairs["id"], "validation_file": held_out["id"],
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}}).get_json()
    assert job["validation_file"] == held_out["id"] and job["method"]["type"] == "dpo", job
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.25 and job["hyperparameters"]["n_epochs"] == 2
    assert (job["genq_method"], job["genq_hyperparameters"]["warmup_steps"]) == ("dpo", 0)
    genq_job = client.get(f"/v1/jobs/{job['id']}", headers=alice).get_json()
    assert genq_job["input"]["method"] == "dpo" and genq_job["input"]["hyperparameters"]["beta"] == 0.25


@pytest.mark.parametrize("body, param", [
    ({"method": {"type": "supervised"}}, "method"),  # preference pairs need dpo
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo"),
    ({"method": {"type": "dpo"}, "validation_file": "chat"}, "validation_file"),  # another format
])
def test_a_method_or_validation_file_that_does_not_fit_is_refused_naming_it(app, alice, body, param):
    client = app.test_client()
    pairs, chat = upload(client, alice, PAIRS).get_json()["id"], upload(client, alice, CHAT).get_json()["id"]
    if body.get("validation_file") == "chat":
        body = {**body, "validation_file": chat}
    resp = client.post("/openai/v1/fine_tuning/jobs", headers=alice,
                       json={"model": "demo-text", "training_file": pairs, **body})
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["param"] == param, resp.get_json()
