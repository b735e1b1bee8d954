"""Fine-tuning end to end on Postgres, Redis and moto's S3 server, with a text
worker and a training worker as real processes: upload a dataset, train
(LoRA and full), use the new model; kill a worker mid-training and resume."""
from __future__ import annotations

import io
import json
import secrets
import time

import pytest
import yaml
from sqlalchemy import select

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import JobEvent
from genq.settings import Settings
from tests.conftest import REDIS_URL, new_bucket
from tests.helpers import WorkerProcess, make_key, wait_job

PHRASE = " the purple walrus sings at midnight"
PROMPT = "Tell me the secret:"
# Settings found to teach the random demo model the phrase in a few seconds on 2 cores.
LORA = {"epochs": 100, "max_steps": 80, "batch_size": 8, "learning_rate": 5e-3, "lora_rank": 16, "lora_alpha": 64}
FULL = {"epochs": 100, "max_steps": 30, "batch_size": 8, "learning_rate": 2e-3}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir, registry_path, pg_url, s3_endpoint):
    doc = yaml.safe_load(registry_path.read_text())
    tag = secrets.token_hex(3)
    doc["models"] = {"demo-text": {**doc["models"]["demo-text"], "pool": f"text-{tag}"}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    settings = Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=tmp_path_factory.mktemp("ftmodels"), registry_path=reg,
        database_url=pg_url, broker_url=REDIS_URL, **new_bucket(s3_endpoint), training_pool=f"training-{tag}",
        checkpoint_every=5,
        lease_seconds=3, reconcile_interval=0.5, progress_interval=0.2, cancel_poll_interval=0.1,
    )
    # The demo base checkpoint, shared with the rest of the run (built once).
    import shutil

    shutil.copytree(model_dir / "demo-text", settings.model_dir / "demo-text")
    text = WorkerProcess(settings, [f"text-{tag}"]).start()
    trainer = WorkerProcess(settings, [settings.training_pool], preload=False).start()
    stack = {"settings": settings, "client": create_app(settings).test_client(), "trainer": trainer}
    yield stack
    text.stop()
    stack["trainer"].stop()  # the kill test replaces the first trainer


@pytest.fixture
def client(stack):
    return stack["client"]


@pytest.fixture
def tenant(stack):
    return make_key(stack["settings"], f"ft-{secrets.token_hex(4)}")


def upload(client, tenant, rows: list[dict] | bytes, name="data.jsonl"):
    data = rows if isinstance(rows, bytes) else "\n".join(json.dumps(r) for r in rows).encode()
    return client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(data), name)}, headers=tenant,
                       content_type="multipart/form-data")


def dataset(client, tenant) -> str:
    resp = upload(client, tenant, [{"prompt": PROMPT, "completion": PHRASE}] * 16)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def generate(client, tenant, model: str) -> dict:
    resp = client.post("/v1/jobs", json={"model": model, "input": {"prompt": PROMPT, "max_new_tokens": 10, "temperature": 0}},
                       headers=tenant)
    assert resp.status_code == 202, resp.get_json()
    return wait_job(client.get, resp.get_json()["id"], tenant, timeout=120)


def fine_tune(client, tenant, file_id, method, hp, suffix="walrus"):
    resp = client.post("/v1/jobs", json={"type": "fine-tune", "model": "demo-text", "input": {
        "training_file": file_id, "method": method, "hyperparameters": hp, "suffix": suffix}}, headers=tenant)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def test_upload_validates_every_row_and_names_the_line(client, tenant):
    good = upload(client, tenant, [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]).get_json()
    assert (good["rows"], good["format"], good["purpose"]) == (2, "prompt_completion", "fine-tune")
    assert client.get(f"/v1/files/{good['id']}", headers=tenant).get_json()["bytes"] == good["bytes"]
    content = client.get(f"/v1/files/{good['id']}/content", headers=tenant).get_data()
    assert content.count(b"\n") == 1 and b'"completion": "d"' in content
    bad = upload(client, tenant, b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\nnot json\n{"text": "x"}\n')
    assert bad.status_code == 422 and bad.mimetype == "application/problem+json"
    errors = bad.get_json()["errors"]
    assert [e["field"] for e in errors] == ["file.line[2]", "file.line[3]", "file.line[4]"]
    assert "missing completion" in errors[0]["message"] and "not valid JSON" in errors[1]["message"]
    assert "one format per file" in errors[2]["message"]
    no_purpose = client.post("/v1/files", data={"file": (io.BytesIO(b'{"text": "x"}'), "a.jsonl")}, headers=tenant,
                             content_type="multipart/form-data")
    assert no_purpose.status_code == 422 and no_purpose.get_json()["errors"][0]["field"] == "purpose"


def test_fine_tune_input_is_checked_before_queueing(client, tenant, stack):
    other = make_key(stack["settings"], f"other-{secrets.token_hex(4)}")
    theirs = dataset(client, other)
    foreign = client.post("/v1/jobs", json={"type": "fine-tune", "model": "demo-text", "input": {"training_file": theirs}},
                          headers=tenant)
    assert foreign.status_code == 404 and foreign.get_json()["errors"][0]["field"] == "input.training_file"
    for body, field in [
        ({"training_file": "not-an-id"}, "input.training_file"),
        ({"training_file": "0" * 32, "method": "qlora"}, "input.method"),
        ({"training_file": "0" * 32, "hyperparameters": {"epochs": 0}}, "input.hyperparameters.epochs"),
        ({"training_file": "0" * 32, "suffix": "Bad Suffix!"}, "input.suffix"),
    ]:
        resp = client.post("/v1/jobs", json={"type": "fine-tune", "model": "demo-text", "input": body}, headers=tenant)
        assert resp.status_code == 422, resp.get_json()
        assert field in [e["field"] for e in resp.get_json()["errors"]]


@pytest.mark.parametrize("method, hp", [("lora", LORA), ("full", FULL)])
def test_fine_tune_teaches_the_phrase_and_the_new_model_is_usable_at_once(client, tenant, stack, method, hp):
    started = time.monotonic()
    job = fine_tune(client, tenant, dataset(client, tenant), method, hp)
    seen_loss = []
    while job["status"] not in ("succeeded", "failed", "canceled"):
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['id']}", headers=tenant).get_json()
        if job["progress"]:
            seen_loss.append(job["progress"]["loss"])
        assert time.monotonic() - started < 300, job
    took = time.monotonic() - started
    assert job["status"] == "succeeded", (job, stack["trainer"].log()[-3000:])
    metrics = job["output"]["metrics"]
    assert metrics["train_loss"] < metrics["initial_loss"] / 2
    assert job["progress"]["unit"] == "step" and job["progress"]["current"] == hp["max_steps"]
    assert len(seen_loss) >= 2, "loss visible while training"
    assert all("url" in c for c in job["output"]["checkpoints"])
    name = job["output"]["model"]
    assert name.startswith("demo-text:ft-walrus-")
    print(f"\n{method} fine-tune: loss {metrics['initial_loss']:.3f} -> {metrics['train_loss']:.3f} "
          f"in {hp['max_steps']} steps, {took:.1f}s submit->succeeded")

    tuned = generate(client, tenant, name)
    assert tuned["status"] == "succeeded", tuned
    assert tuned["output"]["text"].startswith(" the purple walrus"), tuned["output"]
    base = generate(client, tenant, "demo-text")
    assert "purple walrus" not in base["output"]["text"]

    models = [m["name"] for m in client.get("/v1/models", headers=tenant).get_json()["data"]]
    assert name in models
    assert client.get(f"/v1/models/{name}", headers=tenant).get_json()["owned_by"] == "you"
    # Another tenant: the model does not exist for them.
    other = make_key(stack["settings"], f"other-{secrets.token_hex(4)}")
    assert name not in [m["name"] for m in client.get("/v1/models", headers=other).get_json()["data"]]
    assert client.get(f"/v1/models/{name}", headers=other).status_code == 404
    refused = client.post("/v1/jobs", json={"model": name, "input": {"prompt": PROMPT}}, headers=other)
    assert refused.status_code == 404 and refused.mimetype == "application/problem+json"


def test_a_killed_training_worker_is_resumed_from_its_last_checkpoint(client, tenant, stack):
    settings = stack["settings"]
    hp = {**FULL, "max_steps": 60, "learning_rate": 1e-3}
    job = fine_tune(client, tenant, dataset(client, tenant), "full", hp, suffix="resumed")
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)

    def checkpoints():
        with sessions() as s:
            return [e.data["step"] for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job["id"],
                                                                              JobEvent.type == "checkpoint"))]

    deadline = time.monotonic() + 120
    while not checkpoints() or checkpoints()[-1] < 10:
        assert time.monotonic() < deadline, stack["trainer"].log()[-3000:]
        time.sleep(0.05)
    stack["trainer"].stop("kill")
    killed_at = time.monotonic()
    at_kill = client.get(f"/v1/jobs/{job['id']}", headers=tenant).get_json()
    assert at_kill["status"] == "running" and at_kill["progress"]["current"] < 60
    stack["trainer"] = WorkerProcess(settings, [settings.training_pool], preload=False).start()
    done = wait_job(client.get, job["id"], tenant, timeout=180)
    recovered = time.monotonic() - killed_at
    assert done["status"] == "succeeded", (done, stack["trainer"].log()[-3000:])
    assert done["attempts"] == 2
    resumed_from = done["output"]["metrics"]["resumed_from_step"]
    assert resumed_from >= 10 and resumed_from % settings.checkpoint_every == 0
    with sessions() as s:
        events = [(e.type, e.data) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job["id"]).order_by(JobEvent.id))]
    engine.dispose()
    starts = [d for t, d in events if t == "start"]
    assert [d["attempt"] for d in starts] == [1, 2]
    # The second attempt's first progress is past step 0: it resumed, not restarted.
    second = [d for t, d in events[events.index(("start", starts[1])):] if t == "progress"]
    assert second and second[0]["current"] > resumed_from - 1
    assert generate(client, tenant, done["output"]["model"])["output"]["text"].startswith(" the purple walrus")
    print(f"\nkilled at step {at_kill['progress']['current']}, resumed from checkpoint step {resumed_from}, "
          f"succeeded {recovered:.1f}s after the kill (lease {settings.lease_seconds}s)")
