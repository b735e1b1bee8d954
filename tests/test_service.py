"""End to end with real parts: the API (in process) on Postgres, Redis and moto's
S3 server over HTTP, and `genq worker` as a real subprocess."""
from __future__ import annotations

import base64
import io
import secrets
import time

import pytest
import redis
import requests
import yaml
from PIL import Image

from api.app import create_app
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS, new_bucket
from tests.helpers import WorkerProcess, make_key, wait_job


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir, registry_path, pg_url, s3_endpoint):
    """Settings for the production shape, with one extra model on a pool no
    worker serves (so a job can be caught while queued)."""
    doc = yaml.safe_load(registry_path.read_text())
    idle_pool = f"idle-{secrets.token_hex(3)}"
    doc["models"]["idle-text"] = {**doc["models"]["demo-text"], "pool": idle_pool}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    settings = Settings.from_env(
        {}, home=tmp_path_factory.mktemp("home"), model_dir=model_dir, registry_path=reg, database_url=pg_url,
        broker_url=REDIS_URL, progress_interval=0.2, cancel_poll_interval=0.1, lease_seconds=30,
        webhook_secret_keys=WEBHOOK_KEYS, **new_bucket(s3_endpoint),
    )
    pools = sorted({m["pool"] for name, m in doc["models"].items() if name != "idle-text"})
    # At DEBUG: a doorbell that finds nothing to claim says so only there.
    worker = WorkerProcess(settings, pools, extra_env={"GENQ_LOG_LEVEL": "DEBUG"}).start()
    app = create_app(settings)
    yield {"settings": settings, "client": app.test_client(), "idle_pool": idle_pool, "worker": worker}
    worker.stop()


@pytest.fixture
def client(stack):
    return stack["client"]


@pytest.fixture
def tenant(stack):
    return make_key(stack["settings"], f"t-{secrets.token_hex(4)}")


def test_text_job_runs_to_succeeded(client, tenant, stack):
    started = time.monotonic()
    resp = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "Once upon a time", "max_new_tokens": 16, "seed": 7}},
                       headers=tenant)
    assert resp.status_code == 202
    job = wait_job(client.get, resp.get_json()["id"], tenant)
    elapsed = time.monotonic() - started
    assert job["status"] == "succeeded", (job, stack["worker"].log())
    out = job["output"]
    assert out["finish_reason"] in ("length", "stop") and 1 <= out["tokens"] <= 16
    assert isinstance(out["text"], str)
    assert job["metrics"]["batch_size"] >= 1 and job["metrics"]["run_seconds"] > 0
    assert job["attempts"] == 1
    assert job["started_at"] and job["completed_at"]
    events = [e["type"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=tenant).get_json()["data"]]
    assert events[0] == "queued" and events[1] == "start" and events[-1] == "completed"
    print(f"\nPOST -> succeeded for one text job on an idle worker: {elapsed:.3f}s")


def test_same_text_input_and_seed_give_the_same_text(client, tenant):
    body = {"model": "demo-text", "input": {"prompt": "The cat", "max_new_tokens": 12, "seed": 123, "temperature": 0.9}}
    a, b = (wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant) for _ in range(2))
    assert a["status"] == b["status"] == "succeeded"
    assert a["output"]["text"] == b["output"]["text"]


def fetch_png(url: str) -> bytes:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.content


def test_image_to_image_job_starts_from_an_uploaded_image(client, tenant):
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (220, 20, 20)).save(buf, "PNG")
    upload = client.post("/v1/files", data={"purpose": "image", "file": (io.BytesIO(buf.getvalue()), "red.png")},
                         headers=tenant, content_type="multipart/form-data")
    assert upload.status_code == 201, upload.get_data(as_text=True)
    body = {"model": "demo-image-to-image", "input": {"prompt": "a fox", "image": upload.get_json()["id"],
                                                     "width": 48, "height": 32, "num_inference_steps": 4,
                                                     "strength": 0.5, "seed": 9}}
    job = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert job["status"] == "succeeded", job
    assert job["progress"]["total"] == 2  # strength 0.5 of 4 steps
    img = Image.open(io.BytesIO(fetch_png(job["output"]["images"][0]["url"])))
    assert (img.format, img.size) == ("PNG", (48, 32))


def test_inpainting_job_repaints_only_the_mask(client, tenant):
    def data_uri(img) -> str:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    body = {"model": "demo-inpainting", "input": {"prompt": "a door", "image": data_uri(Image.new("RGB", (32, 32), (9, 99, 199))),
                                                 "mask_image": data_uri(mask), "width": 32, "height": 32,
                                                 "num_inference_steps": 2, "seed": 3}}
    job = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert job["status"] == "succeeded", job
    img = Image.open(io.BytesIO(fetch_png(job["output"]["images"][0]["url"]))).convert("RGB")
    assert img.size == (32, 32)
    assert {img.getpixel((x, y)) for x in range(16, 32) for y in range(32)} == {(9, 99, 199)}


def test_audio_job_stores_a_wav_of_the_asked_duration(client, tenant):
    import wave

    body = {"model": "demo-audio", "input": {"prompt": "rain", "duration_s": 0.5, "num_inference_steps": 2, "seed": 4}}
    job = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert job["status"] == "succeeded", job
    clip = job["output"]["audio"]
    assert (clip["content_type"], clip["duration_s"], clip["seed"]) == ("audio/wav", 0.5, 4)
    with wave.open(io.BytesIO(fetch_png(clip["url"]))) as w:
        assert (w.getframerate(), w.getnframes()) == (16000, 8000)


def test_video_job_stores_an_animated_webp_of_the_asked_frames(client, tenant):
    body = {"model": "demo-video", "input": {"prompt": "a cat", "num_frames": 3, "width": 32, "height": 32,
                                            "num_inference_steps": 2, "seed": 4}}
    job = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert job["status"] == "succeeded", job
    clip = Image.open(io.BytesIO(fetch_png(job["output"]["video"]["url"])))
    assert (clip.format, clip.n_frames, clip.size) == ("WEBP", 3, (32, 32))
    assert job["progress"]["total"] == 2


def test_vision_text_job_answers_about_an_uploaded_image(client, tenant):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (20, 200, 20)).save(buf, "PNG")
    file_id = client.post("/v1/files", data={"purpose": "image", "file": (io.BytesIO(buf.getvalue()), "g.png")},
                          headers=tenant, content_type="multipart/form-data").get_json()["id"]
    body = {"model": "demo-vision-text", "input": {"prompt": "what is it?", "image": file_id, "max_new_tokens": 5,
                                                  "seed": 2}}
    first, second = (wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
                     for _ in range(2))
    assert first["status"] == second["status"] == "succeeded", first
    assert first["output"] == second["output"] and first["output"]["tokens"] <= 5
    assert first["progress"]["unit"] == "token"


def test_digits_job_draws_the_asked_digit_at_the_asked_scale(client, tenant):
    body = {"model": "demo-digits", "input": {"label": 7, "seed": 3, "num_images": 2, "scale": 4,
                                             "num_inference_steps": 10}}
    job = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert job["status"] == "succeeded", job
    images = job["output"]["images"]
    assert [(m["label"], m["seed"], m["width"], m["height"]) for m in images] == [(7, 3, 32, 32), (7, 4, 32, 32)]
    img = Image.open(io.BytesIO(fetch_png(images[0]["url"])))
    assert (img.format, img.size) == ("PNG", (32, 32))
    refused = client.post("/v1/jobs", json={"model": "demo-digits", "input": {"label": 10}}, headers=tenant)
    assert refused.status_code == 422
    assert [e["field"] for e in refused.get_json()["errors"]] == ["input.label"]


def test_any_diffusers_pipeline_serves_jobs_each_with_its_scheduler(client, tenant):
    """demo-image-xl is an SDXL pipeline: the same family loads it, and each job may pick its scheduler."""
    body = {"model": "demo-image-xl", "input": {"prompt": "a red square", "width": 32, "height": 40,
                                               "num_inference_steps": 2, "seed": 5, "scheduler": "dpm++"}}
    ids = [client.post("/v1/jobs", json=b, headers=tenant).get_json()["id"]
           for b in (body, {**body, "input": {**body["input"], "scheduler": "euler"}})]
    dpm, euler = (wait_job(client.get, i, tenant) for i in ids)
    assert dpm["status"] == euler["status"] == "succeeded", (dpm, euler)
    pngs = [fetch_png(job["output"]["images"][0]["url"]) for job in (dpm, euler)]
    for png in pngs:
        img = Image.open(io.BytesIO(png))
        assert (img.format, img.size) == ("PNG", (32, 40))
    assert pngs[0] != pngs[1]


def test_image_job_stores_a_png_at_the_requested_size_and_seed_repeats(client, tenant, stack):
    body = {"model": "demo-image", "input": {"prompt": "a red square", "width": 64, "height": 48,
                                            "num_inference_steps": 3, "seed": 42, "num_images": 2}}
    first = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert first["status"] == "succeeded", (first, stack["worker"].log())
    images = first["output"]["images"]
    assert [i["seed"] for i in images] == [42, 43]
    for image in images:
        # A presigned S3 URL: plain HTTP GET, no API key.
        assert "X-Amz-Signature" in image["url"]
        png = Image.open(io.BytesIO(fetch_png(image["url"])))
        assert png.format == "PNG" and png.size == (64, 48)
    second = wait_job(client.get, client.post("/v1/jobs", json=body, headers=tenant).get_json()["id"], tenant)
    assert [fetch_png(i["url"]) for i in second["output"]["images"]] == [fetch_png(i["url"]) for i in images]
    other_seed = {**body, "input": {**body["input"], "seed": 41}}
    third = wait_job(client.get, client.post("/v1/jobs", json=other_seed, headers=tenant).get_json()["id"], tenant)
    assert fetch_png(third["output"]["images"][0]["url"]) != fetch_png(images[0]["url"])


def test_cancel_of_a_queued_job(client, tenant):
    job = client.post("/v1/jobs", json={"model": "idle-text", "input": {"prompt": "never runs"}}, headers=tenant).get_json()
    assert job["status"] == "queued"
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant).get_json()
    assert canceled["status"] == "canceled" and canceled["cancel_requested"] is True


def test_a_second_tenant_cannot_see_the_first_tenants_job(client, tenant, stack):
    other = make_key(stack["settings"], f"other-{secrets.token_hex(4)}")
    job = client.post("/v1/jobs", json={"model": "idle-text", "input": {"prompt": "mine"}}, headers=tenant).get_json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=other).status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/v1/jobs?limit=100", headers=other).get_json()["data"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenant).status_code == 200


def test_bad_input_is_refused_with_the_field_named_and_nothing_queued(client, tenant, stack):
    r = redis.Redis.from_url(REDIS_URL)
    pool = stack["idle_pool"]
    before = r.llen(pool)
    listed_before = len(client.get("/v1/jobs?limit=100", headers=tenant).get_json()["data"])
    resp = client.post("/v1/jobs", json={"model": "idle-text", "input": {"prompt": "x", "top_p": 7}}, headers=tenant)
    assert resp.status_code == 422
    assert resp.mimetype == "application/problem+json"
    assert [e["field"] for e in resp.get_json()["errors"]] == ["input.top_p"]
    assert r.llen(pool) == before
    assert len(client.get("/v1/jobs?limit=100", headers=tenant).get_json()["data"]) == listed_before
    # The same body, made valid, does queue a doorbell on that pool's Redis list.
    ok = client.post("/v1/jobs", json={"model": "idle-text", "input": {"prompt": "x", "top_p": 0.7}}, headers=tenant)
    # The doorbell is sent after the answer, by the process's doorbell thread.
    assert ok.status_code == 202 and client.application.extensions["genq"].doorbells.flush(10)
    assert r.llen(pool) == before + 1


def test_a_duplicate_doorbell_is_a_no_op(client, tenant, stack):
    from genq.queue import make_celery, publish

    job = wait_job(client.get, client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "dup", "max_new_tokens": 4}},
                                           headers=tenant).get_json()["id"], tenant)
    assert job["status"] == "succeeded"
    celery = make_celery(stack["settings"])
    assert publish(celery, job["id"], _pool_of(stack, "demo-text"))
    deadline = time.monotonic() + 20
    while f"doorbell for job {job['id']}: nothing to claim" not in stack["worker"].log():
        assert time.monotonic() < deadline, stack["worker"].log()
        time.sleep(0.1)
    again = client.get(f"/v1/jobs/{job['id']}", headers=tenant).get_json()
    assert again["attempts"] == 1 and again["completed_at"] == job["completed_at"] and again["output"] == job["output"]


def _pool_of(stack, model: str) -> str:
    return yaml.safe_load(stack["settings"].registry_path.read_text())["models"][model]["pool"]
