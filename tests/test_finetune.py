"""Fine-tuning end to end on Postgres, Redis and moto's S3 server, with a text
worker and a training worker as real processes: upload a dataset, train
(LoRA and full), use the new model; kill a worker mid-training and resume.
What can go wrong in training (rows with nothing to learn, a loss that is no
longer a number) is run on the embedded SQLite stack too."""
from __future__ import annotations

import io
import json
import math
import secrets
import shutil
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import JobEvent
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS, new_bucket
from tests.helpers import WorkerProcess, make_key, wait_job

PHRASE = " the purple walrus sings at midnight"
PROMPT = "Tell me the secret:"  # 11 tokens of the demo tokenizer
LONG_PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom:"  # 30 tokens
# Settings found to teach the random demo model the phrase in a few seconds on 2 cores.
LORA = {"epochs": 100, "max_steps": 80, "batch_size": 8, "learning_rate": 5e-3, "lora_rank": 16, "lora_alpha": 64}
FULL = {"epochs": 100, "max_steps": 30, "batch_size": 8, "learning_rate": 2e-3}


def nan_checkpoint(model_dir: Path, dest: Path) -> str:
    """The demo text model with one weight NaN: a base whose loss is NaN from
    the first step, as a diverging run's becomes later."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir / "demo-text", dest)
    weights = load_file(dest / "model.safetensors")
    weights["transformer.ln_f.weight"][0] = math.nan
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return str(dest)


def registry_for(tmp_path_factory, registry_path: Path, model_dir: Path, tag: str) -> Path:
    """demo-text on a pool of this module's own; on a pool no worker serves
    (only fine-tuned): `nan-text` (a base model whose loss is NaN) and
    `plain-text` (the demo without a chat template)."""
    doc = yaml.safe_load(registry_path.read_text())
    demo = doc["models"]["demo-text"]
    broken = nan_checkpoint(model_dir, tmp_path_factory.mktemp("nan") / "nan-text")
    plain = tmp_path_factory.mktemp("plain") / "plain-text"
    shutil.copytree(model_dir / "demo-text", plain)
    (plain / "chat_template.jinja").unlink()
    doc["models"] = {"demo-text": {**demo, "pool": f"text-{tag}"},
                     "nan-text": {**demo, "checkpoint": broken, "pool": f"idle-{tag}"},
                     "plain-text": {**demo, "checkpoint": str(plain), "pool": f"idle-{tag}"}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    return reg


# Short leases and quick reconciles: a job whose worker stops answering is seen at once.
QUICK = dict(checkpoint_every=5, lease_seconds=3, reconcile_interval=0.5, progress_interval=0.2, cancel_poll_interval=0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir, registry_path, pg_url, s3_endpoint):
    tag = secrets.token_hex(3)
    ft_models = tmp_path_factory.mktemp("ftmodels")
    # The demo base checkpoint, shared with the rest of the run (built once).
    shutil.copytree(model_dir / "demo-text", ft_models / "demo-text")
    settings = Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=ft_models,
        registry_path=registry_for(tmp_path_factory, registry_path, model_dir, tag),
        database_url=pg_url, broker_url=REDIS_URL, **new_bucket(s3_endpoint), training_pool=f"training-{tag}", **QUICK,
        webhook_secret_keys=WEBHOOK_KEYS,
    )
    text = WorkerProcess(settings, [f"text-{tag}"]).start()
    trainer = WorkerProcess(settings, [settings.training_pool], preload=False).start()
    stack = {"settings": settings, "client": create_app(settings).test_client(), "trainer": trainer}
    yield stack
    text.stop()
    stack["trainer"].stop()  # the kill test replaces the first trainer


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory, model_dir, registry_path):
    """The embedded default: SQLite, a storage folder, the filesystem broker,
    and a training worker as a real process."""
    from genq.migrate import upgrade

    tag = secrets.token_hex(3)
    ft_models = tmp_path_factory.mktemp("ftmodels")
    shutil.copytree(model_dir / "demo-text", ft_models / "demo-text")
    settings = Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=ft_models,
        registry_path=registry_for(tmp_path_factory, registry_path, model_dir, tag),
        training_pool=f"training-{tag}", **QUICK,
    )
    upgrade(settings.database_url)
    trainer = WorkerProcess(settings, [settings.training_pool], preload=False).start()
    yield {"settings": settings, "client": create_app(settings).test_client(), "trainer": trainer}
    trainer.stop()


@pytest.fixture(params=["postgres", "sqlite"])
def either(request):
    """Each backend's stack, with a fresh tenant's key."""
    stack = request.getfixturevalue("stack" if request.param == "postgres" else "sqlite_stack")
    return {**stack, "tenant": make_key(stack["settings"], f"ft-{secrets.token_hex(4)}")}


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


def fine_tune(client, tenant, file_id, method, hp, suffix="walrus", model="demo-text", **extra):
    resp = client.post("/v1/jobs", json={"type": "fine-tune", "model": model, "input": {
        "training_file": file_id, "method": method, "hyperparameters": hp, "suffix": suffix, **extra}}, headers=tenant)
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


# --- limits and what can go wrong in training -------------------------------------------------------


def strict_json(resp):
    """A body as a parser outside Python reads it: NaN and Infinity are not JSON."""
    def refuse(token):
        raise AssertionError(f"{token} in a JSON body: {resp.get_data(as_text=True)[:1000]}")

    return json.loads(resp.get_data(), parse_constant=refuse)


def finished(stack, job_id: str) -> tuple[dict, list[dict]]:
    """The job once it ended, and its events; both must be valid JSON."""
    client, tenant = stack["client"], stack["tenant"]
    wait_job(client.get, job_id, tenant, timeout=120)
    job = strict_json(client.get(f"/v1/jobs/{job_id}", headers=tenant))
    events = strict_json(client.get(f"/v1/jobs/{job_id}/events", headers=tenant))["data"]
    return job, events


def fine_tuned_models(stack) -> list[str]:
    models = strict_json(stack["client"].get("/v1/models", headers=stack["tenant"]))["data"]
    return [m["name"] for m in models if ":ft-" in m["name"]]


def test_a_fine_tune_past_the_workload_limits_is_refused_naming_the_field(client, tenant):
    small = dataset(client, tenant)  # 16 rows
    big = upload(client, tenant, [{"prompt": f"Row {i}:", "completion": PHRASE} for i in range(3_000)])
    assert big.status_code == 201, big.get_json()
    big = big.get_json()["id"]
    for file_id, hp, field, numbers in [
        (small, {"max_steps": 10_000_000}, "input.hyperparameters.max_steps", ["1000000"]),  # the schema's bound
        (small, {"max_steps": 20_000}, "input.hyperparameters.max_steps", ["10000", "20000"]),  # GENQ_MAX_TRAIN_STEPS
        # 3,000 rows × 4 epochs at batch 1: 12,000 steps.
        (big, {"epochs": 4, "batch_size": 1}, "input.hyperparameters.epochs", ["12000", "10000", "3000 rows"]),
        # 3,000 rows × 100 epochs: 300,000 examples (GENQ_MAX_TRAIN_EXAMPLES), in 4,700 steps of 64.
        (big, {"epochs": 100, "batch_size": 64}, "input.hyperparameters.epochs", ["300000", "200000"]),
        # The demo model holds 512 positions; its registry entry says so.
        (small, {"max_seq_len": 1024}, "input.hyperparameters.max_seq_len", ["512", "1024"]),
    ]:
        resp = client.post("/v1/jobs", json={"type": "fine-tune", "model": "demo-text", "input": {
            "training_file": file_id, "hyperparameters": hp}}, headers=tenant)
        assert resp.status_code == 422 and resp.mimetype == "application/problem+json", (hp, resp.get_json())
        [error] = resp.get_json()["errors"]
        assert error["field"] == field, (hp, error)
        for number in numbers:
            assert number in error["message"], (hp, error)
    assert client.get("/v1/jobs?type=fine-tune", headers=tenant).get_json()["data"] == []


def test_a_fine_tune_with_nothing_to_learn_fails_saying_why_and_writes_no_nan(either):
    """Every prompt fills max_seq_len: no completion token is left to learn
    from. The job fails at once, on its first attempt, with a reason that
    names the field; no NaN loss is written and no model is made."""
    client, tenant = either["client"], either["tenant"]
    file_id = upload(client, tenant, [{"prompt": LONG_PROMPT, "completion": PHRASE}] * 4).get_json()["id"]
    job = fine_tune(client, tenant, file_id, "lora", {"max_seq_len": 8, "max_steps": 5}, suffix="nothing")
    done, events = finished(either, job["id"])
    assert (done["status"], done["attempts"]) == ("failed", 1), (done, either["trainer"].log()[-3000:])
    assert done["error"]["code"] == "nothing_to_learn", done["error"]
    assert "none of the 4 rows" in done["error"]["message"]
    assert "input.hyperparameters.max_seq_len" in done["error"]["message"] and "8" in done["error"]["message"]
    assert not [e for e in events if e["type"] == "progress"]
    assert fine_tuned_models(either) == []


def test_rows_with_nothing_to_learn_are_skipped_and_the_job_says_so(either):
    client, tenant = either["client"], either["tenant"]
    rows = [{"prompt": PROMPT, "completion": PHRASE}, {"prompt": LONG_PROMPT, "completion": PHRASE}] * 3
    file_id = upload(client, tenant, rows).get_json()["id"]
    job = fine_tune(client, tenant, file_id, "lora", {"max_seq_len": 16, "max_steps": 4, "batch_size": 2},
                    suffix="skipping")
    done, events = finished(either, job["id"])
    assert done["status"] == "succeeded", (done, either["trainer"].log()[-3000:])
    metrics = done["output"]["metrics"]
    assert (metrics["rows"], metrics["skipped_rows"]) == (3, 3)
    assert all(math.isfinite(e["data"]["loss"]) for e in events if e["type"] == "progress")
    [notice] = [e["data"]["message"] for e in events if e["type"] == "log"]
    assert "skipped 3 of 6 rows" in notice and "max_seq_len" in notice
    assert fine_tuned_models(either) == [done["output"]["model"]]


def test_a_loss_that_becomes_nan_fails_the_job_and_publishes_no_model(either):
    client, tenant = either["client"], either["tenant"]
    job = fine_tune(client, tenant, dataset(client, tenant), "lora", {"max_steps": 5}, suffix="nan", model="nan-text")
    done, events = finished(either, job["id"])
    assert (done["status"], done["attempts"]) == ("failed", 1), (done, either["trainer"].log()[-3000:])
    assert done["error"]["code"] == "loss_not_finite"
    assert "the loss became NaN at step 1" in done["error"]["message"]
    assert "learning_rate" in done["error"]["message"]
    assert done["output"] is None and fine_tuned_models(either) == []


# --- chat rows, preference tuning, validation, cancel -----------------------------------------------

CHAT_ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT},
                         {"role": "assistant", "content": PHRASE.strip()}]}
PAIR = {"prompt": PROMPT, "chosen": PHRASE, "rejected": " go away now"}


def file_of(client, tenant, rows) -> str:
    resp = upload(client, tenant, rows)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def test_chat_and_preference_files_are_checked_and_must_fit_the_method(client, tenant):
    bad = upload(client, tenant, [CHAT_ROW, {"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "bot", "content": "yo"}]}])
    assert bad.status_code == 422 and bad.mimetype == "application/problem+json"
    [error] = bad.get_json()["errors"]
    assert error["field"] == "file.line[2]" and "messages[1].role 'bot'" in error["message"]
    chat, pairs = file_of(client, tenant, [CHAT_ROW] * 4), file_of(client, tenant, [PAIR] * 4)
    assert client.get(f"/v1/files/{pairs}", headers=tenant).get_json()["format"] == "preference"
    for file_id, method, model, extra, field in [
        (pairs, "lora", "demo-text", {}, "input.method"),
        (chat, "dpo", "demo-text", {}, "input.method"),
        (chat, "lora", "demo-text", {"validation_file": pairs}, "input.validation_file"),
        (chat, "lora", "plain-text", {}, "input.training_file"),  # no chat template to render the rows with
    ]:
        resp = client.post("/v1/jobs", json={"type": "fine-tune", "model": model, "input": {
            "training_file": file_id, "method": method, **extra}}, headers=tenant)
        assert resp.status_code == 422 and resp.mimetype == "application/problem+json", resp.get_json()
        assert [e["field"] for e in resp.get_json()["errors"]] == [field], resp.get_json()
    assert client.get("/v1/jobs?type=fine-tune", headers=tenant).get_json()["data"] == []


def test_preference_tuning_reports_margin_accuracy_and_validation_and_publishes_a_model(client, tenant, stack):
    train = file_of(client, tenant, [{**PAIR, "prompt": f"{name} asks:"} for name in ("Ann", "Ben", "Cy", "Di")])
    held_out = file_of(client, tenant, [{**PAIR, "prompt": "Eve asks:"}, {**PAIR, "prompt": "Fay asks:"}])
    hp = {"max_steps": 4, "batch_size": 2, "learning_rate": 5e-3, "beta": 0.1, "eval_every": 2, "warmup_steps": 2}
    job = fine_tune(client, tenant, train, "dpo", hp, suffix="polite", validation_file=held_out)
    assert job["input"]["hyperparameters"]["beta"] == 0.1 and job["input"]["validation_file"] == held_out
    done = wait_job(client.get, job["id"], tenant, timeout=180)
    assert done["status"] == "succeeded", (done, stack["trainer"].log()[-3000:])
    progress = done["progress"]
    assert progress["current"] == 4 and 0 <= progress["preference_accuracy"] <= 1
    assert "preference_margin" in progress and progress["loss"] < math.log(2)
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant).get_json()["data"]
    measured = [e["data"] for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in measured] == [2, 4]
    assert all({"validation_loss", "validation_preference_accuracy", "validation_preference_margin"} <= set(m)
               for m in measured)
    metrics = done["output"]["metrics"]
    assert metrics["method"] == "dpo" and metrics["validation_loss"] == measured[-1]["validation_loss"]
    name = done["output"]["model"]
    assert name.startswith("demo-text:ft-polite-")
    assert name in [m["name"] for m in client.get("/v1/models", headers=tenant).get_json()["data"]]


def test_a_chat_fine_tune_with_a_validation_file_runs_on_the_embedded_stack(sqlite_stack):
    client, settings = sqlite_stack["client"], sqlite_stack["settings"]
    tenant = make_key(settings, f"ft-{secrets.token_hex(4)}")
    train, held_out = file_of(client, tenant, [CHAT_ROW] * 4), file_of(client, tenant, [CHAT_ROW])
    job = fine_tune(client, tenant, train, "lora", {"max_steps": 3, "batch_size": 2, "eval_every": 3},
                    suffix="chat", validation_file=held_out)
    done = wait_job(client.get, job["id"], tenant, timeout=180)
    assert done["status"] == "succeeded", (done, sqlite_stack["trainer"].log()[-3000:])
    metrics = done["output"]["metrics"]
    assert metrics["rows"] == 4 and metrics["validation_rows"] == 1 and math.isfinite(metrics["validation_loss"])
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant).get_json()["data"]
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [3]


def test_a_running_fine_tune_canceled_stops_at_the_next_step_and_keeps_its_last_checkpoint(sqlite_stack):
    client, settings = sqlite_stack["client"], sqlite_stack["settings"]
    tenant = make_key(settings, f"ft-{secrets.token_hex(4)}")
    # 3,200 steps (64 rows, 2 a step, 100 epochs): far more than the cancel needs to land in,
    # however slow or fast the machine (4 rows and the default 3 epochs ran out first once).
    job = fine_tune(client, tenant, file_of(client, tenant, [CHAT_ROW] * 64), "lora",
                    {"max_steps": 5_000, "batch_size": 2, "epochs": 100}, suffix="canceled")
    running = wait_job(client.get, job["id"], tenant, timeout=120, until=("running", "succeeded", "failed"))
    deadline = time.monotonic() + 120
    while not (running.get("progress") or {}).get("current"):
        assert time.monotonic() < deadline and running["status"] == "running", running
        time.sleep(0.1)
        running = client.get(f"/v1/jobs/{job['id']}", headers=tenant).get_json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant).status_code in (200, 202)
    done = wait_job(client.get, job["id"], tenant, timeout=60)
    assert done["status"] == "canceled", (done, sqlite_stack["trainer"].log()[-3000:])
    checkpoints = done["output"]["checkpoints"]
    # The checkpoint saved on the way out is at the step it stopped at: at or past
    # the step seen before the cancel, far short of the 5,000.
    assert checkpoints and running["progress"]["current"] <= checkpoints[-1]["step"] < 5_000
    assert "url" in checkpoints[-1]
    assert fine_tuned_models({"client": client, "tenant": tenant}) == []
