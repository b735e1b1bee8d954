"""Image LoRA fine-tunes end to end on the embedded default (SQLite, a storage
folder, the filesystem broker) with `genq worker` as a real process: upload a
zip of captioned images, train on demo-image, and use the new version at
once; another tenant cannot see it; a bad zip is 422 naming the entry."""
from __future__ import annotations

import io
import secrets
import shutil

import pytest
import yaml

from api.app import create_app
from genq.settings import Settings
from tests.helpers import WorkerProcess, make_key, wait_job
from tests.models.test_image_finetune import TRIGGER, balls, make_zip, png


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir, registry_path):
    from genq.migrate import upgrade

    tag = secrets.token_hex(3)
    models = tmp_path_factory.mktemp("ftmodels")
    shutil.copytree(model_dir / "demo-image", models / "demo-image")  # the base, built once per run
    doc = yaml.safe_load(registry_path.read_text())
    doc["models"] = {"demo-image": {**doc["models"]["demo-image"], "pool": f"image-{tag}"}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    settings = Settings.from_env({}, home=tmp_path_factory.mktemp("home"), model_dir=models, registry_path=reg,
                                 training_pool=f"training-{tag}", checkpoint_every=2, progress_interval=0.2)
    upgrade(settings.database_url)
    worker = WorkerProcess(settings, [settings.training_pool, f"image-{tag}"], preload=False).start()
    yield {"settings": settings, "client": create_app(settings).test_client()}
    worker.stop()


def upload(client, tenant, data: bytes):
    return client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(data), "balls.zip")},
                       headers=tenant, content_type="multipart/form-data")


def test_an_image_lora_trains_and_its_version_draws_for_its_tenant_only(stack):
    client = stack["client"]
    alice, bob = (make_key(stack["settings"], f"img-{secrets.token_hex(4)}") for _ in range(2))
    f = upload(client, alice, balls())
    assert f.status_code == 201, f.get_json()
    assert (f.get_json()["rows"], f.get_json()["format"]) == (4, "image_captions")
    body = {"model": "demo-image", "type": "fine-tune", "input": {
        "training_file": f.get_json()["id"], "trigger_word": TRIGGER, "suffix": "balls",
        "hyperparameters": {"max_steps": 4, "batch_size": 2, "resolution": 16, "learning_rate": 1e-2}}}
    created = client.post("/v1/jobs", json=body, headers=alice)
    assert created.status_code == 202, created.get_json()
    job = wait_job(client.get, created.get_json()["id"], alice, timeout=240)
    assert job["status"] == "succeeded", job
    assert job["progress"]["current"] == job["progress"]["total"] == 4
    assert [c["step"] for c in job["output"]["checkpoints"]] == [2]
    assert job["output"]["metrics"]["trigger_word"] == TRIGGER
    name = job["output"]["model"]
    assert name in {m["name"] for m in client.get("/v1/models", headers=alice).get_json()["data"]}
    assert name not in {m["name"] for m in client.get("/v1/models", headers=bob).get_json()["data"]}
    draw = {"model": name, "input": {"prompt": f"{TRIGGER} a ball", "width": 32, "height": 32,
                                     "num_inference_steps": 2, "seed": 1}}
    done = wait_job(client.get, client.post("/v1/jobs", json=draw, headers=alice).get_json()["id"], alice, timeout=120)
    assert done["status"] == "succeeded", done
    assert done["output"]["images"][0]["width"] == 32
    refused = client.post("/v1/jobs", json=draw, headers=bob)
    assert refused.status_code == 404, refused.get_json()  # another tenant's version does not exist for Bob
    # Bob cannot train on Alice's images either.
    other = client.post("/v1/jobs", json={**body, "input": {**body["input"]}}, headers=bob)
    assert other.status_code == 404


def test_a_bad_zip_is_refused_at_upload_naming_the_entry_and_text_rows_cannot_train_an_image_model(stack):
    client = stack["client"]
    alice = make_key(stack["settings"], f"img-{secrets.token_hex(4)}")
    bad = make_zip({"a.png": png(0), "b.png": b"not an image"},
                   [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}])
    resp = upload(client, alice, bad)
    assert resp.status_code == 422
    assert [e["field"] for e in resp.get_json()["errors"]] == ["file.entry[b.png]"]
    assert client.get("/v1/files", headers=alice).get_json()["data"] == []
    rows = client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(b'{"text": "hello"}\n'), "t.jsonl")},
                       headers=alice, content_type="multipart/form-data").get_json()
    resp = client.post("/v1/jobs", json={"model": "demo-image", "type": "fine-tune", "input": {
        "training_file": rows["id"], "trigger_word": TRIGGER}}, headers=alice)
    assert resp.status_code == 422
    assert [e["field"] for e in resp.get_json()["errors"]] == ["input.training_file"]
