"""The OpenAI-compatible routes (api/openai_compat.py) driven by the real
`openai` package against a real `genq up` (API and worker, embedded defaults)."""
from __future__ import annotations

import base64
import io
import json
import shutil
import time

import openai
import pytest
import requests
import yaml
from PIL import Image

from genq.settings import DEFAULT_REGISTRY, Settings
from tests.helpers import make_key
from tests.test_up import start_up, stop_up


@pytest.fixture(scope="module")
def up(tmp_path_factory, model_dir):
    """`genq up` with the shipped registry plus `plain-text`: the demo text
    model with no chat template (its tokenizer's template file removed)."""
    root = tmp_path_factory.mktemp("openai")
    plain = root / "plain-text"
    shutil.copytree(model_dir / "demo-text", plain)
    (plain / "chat_template.jinja").unlink()
    doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    doc["models"]["plain-text"] = {**doc["models"]["demo-text"], "checkpoint": str(plain),
                                   "description": "The demo text model without a chat template."}
    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    started = start_up(root / "home", model_dir, ready_lines=2, GENQ_REGISTRY=str(registry))
    yield started
    stop_up(started)


@pytest.fixture(scope="module")
def client(up):
    key = up["headers"]["Authorization"].removeprefix("Bearer ")
    # No retries: an error must reach the test as it was answered.
    return openai.OpenAI(base_url=f"{up['url']}/openai/v1", api_key=key, max_retries=0, timeout=120)


def jobs_of(up) -> list[dict]:
    return requests.get(f"{up['url']}/v1/jobs", headers=up["headers"], params={"limit": 100}, timeout=10).json()["data"]


def test_completion_is_a_job_with_usage(up, client):
    out = client.completions.create(model="demo-text", prompt="Once upon a time", max_tokens=6, seed=3,
                                    temperature=0.7, top_p=0.9)
    assert out.object == "text_completion" and out.model == "demo-text"
    assert len(out.choices) == 1 and out.choices[0].finish_reason in ("stop", "length")
    job_id = out.id.removeprefix("cmpl-")
    job = requests.get(f"{up['url']}/v1/jobs/{job_id}", headers=up["headers"], timeout=10).json()
    # The same job in genq's own API, with the OpenAI parameters as its input.
    assert job["status"] == "succeeded" and job["output"]["text"] == out.choices[0].text
    assert (job["input"]["prompt"], job["input"]["max_new_tokens"], job["input"]["seed"]) == ("Once upon a time", 6, 3)
    assert (job["input"]["temperature"], job["input"]["top_p"]) == (0.7, 0.9)
    assert out.usage.completion_tokens == job["output"]["tokens"] >= 1
    assert out.usage.prompt_tokens == job["output"]["prompt_tokens"] >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # The same seed, the same text; also at /v1 (the generation routes are mounted there too).
    again = requests.post(f"{up['url']}/v1/completions", headers=up["headers"], timeout=60,
                          json={"model": "demo-text", "prompt": "Once upon a time", "max_tokens": 6, "seed": 3,
                                "temperature": 0.7, "top_p": 0.9}).json()
    assert again["choices"][0]["text"] == out.choices[0].text


def test_n_choices_and_stop(up, client):
    out = client.completions.create(model="demo-text", prompt="The weather", max_tokens=5, n=3, seed=11, stop=["\n"])
    assert [c.index for c in out.choices] == [0, 1, 2]
    seeds = sorted(j["input"]["seed"] for j in jobs_of(up) if j["input"].get("prompt") == "The weather")
    assert seeds == [11, 12, 13]
    assert all(j["input"]["stop"] == ["\n"] for j in jobs_of(up) if j["input"].get("prompt") == "The weather")
    assert out.usage.completion_tokens == sum(
        j["output"]["tokens"] for j in jobs_of(up) if j["input"].get("prompt") == "The weather")


def test_chat_completion_through_the_template(up, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    out = client.chat.completions.create(model="demo-text", messages=messages, max_tokens=5, seed=4)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    job_id = out.id.removeprefix("chatcmpl-")
    job = requests.get(f"{up['url']}/v1/jobs/{job_id}", headers=up["headers"], timeout=10).json()
    assert job["input"]["messages"] == messages and job["input"].get("prompt") is None
    assert out.choices[0].message.content == job["output"]["text"]
    # The rendered prompt is what a completion of the same text gets: the worker used the template.
    rendered = "<s>system\nBe brief.</s>\n<s>user\nWhat is the capital?</s>\n<s>assistant\n"
    plain = client.completions.create(model="demo-text", prompt=rendered, max_tokens=5, seed=4)
    assert plain.choices[0].text == out.choices[0].message.content
    assert plain.usage.prompt_tokens == out.usage.prompt_tokens


def test_chat_stream_ends_with_done_and_adds_up(up, client):
    stream = client.chat.completions.create(model="demo-text", messages=[{"role": "user", "content": "Once"}],
                                            max_tokens=12, seed=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)  # the client stops at `data: [DONE]`
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    whole = client.chat.completions.create(model="demo-text", messages=[{"role": "user", "content": "Once"}],
                                           max_tokens=12, seed=5)
    assert text == whole.choices[0].message.content


def test_completion_stream_raw_ends_with_done(up):
    resp = requests.post(f"{up['url']}/openai/v1/completions", headers=up["headers"], stream=True, timeout=60,
                         json={"model": "demo-text", "prompt": "Once upon", "max_tokens": 8, "seed": 2, "stream": True})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
    # SSE comments (": ...") aside, every line is a data line, the last [DONE].
    events = [line for line in lines if not line.startswith(":")]
    assert events[-1] == "data: [DONE]" and lines[0] == ": queued"
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_model_without_a_chat_template_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="plain-text", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.body["param"] == "messages" and err.value.body["code"] == "no_chat_template"
    # Streamed, the headers went out before the job failed: the error is the stream's last chunk.
    stream = client.chat.completions.create(model="plain-text", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2, stream=True)
    with pytest.raises(openai.APIError) as err:
        list(stream)
    assert "no chat template" in str(err.value)
    # Its prompts still work.
    assert client.completions.create(model="plain-text", prompt="hi", max_tokens=2).choices


def test_images_as_urls_and_base64(up, client):
    out = client.images.generate(model="demo-image", prompt="a red square", n=2, size="32x48")
    assert len(out.data) == 2
    png = requests.get(out.data[0].url, headers=up["headers"], timeout=10)
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (32, 48)
    out = client.images.generate(model="demo-image", prompt="a red square", size="32x32", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (32, 32)


def test_models_in_openais_list_shape(up, client):
    ids = [m.id for m in client.models.list()]
    assert {"demo-text", "demo-image", "plain-text"} <= set(ids)
    assert client.models.retrieve("demo-text").owned_by == "genq"
    # genq's own list is unchanged at /v1/models.
    own = requests.get(f"{up['url']}/v1/models", headers=up["headers"], timeout=10).json()
    assert "input_schema" in own["data"][0] and "next_cursor" in own


def test_typed_errors(up, client):
    bad = openai.OpenAI(base_url=client.base_url, api_key="gq_not_a_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model="demo-text", prompt="hi")
    assert err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="hi")
    assert (err.value.body["param"], err.value.body["code"]) == ("model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    for kwargs, param in (({"max_tokens": 100_000}, "max_tokens"), ({"temperature": 3}, "temperature"),
                          ({"n": 99}, "n"), ({"presence_penalty": 1.0}, "presence_penalty"),
                          ({"model": "demo-image"}, "model")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"model": "demo-text", "prompt": "hi", **kwargs})
        assert err.value.body["param"] == param, err.value.body
        assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="demo-image", prompt="x", size="1000x1000")
    assert err.value.body["param"] == "size"
    # A body that is no JSON: OpenAI's shape too.
    resp = requests.post(f"{up['url']}/v1/chat/completions", headers=up["headers"], data=b"{", timeout=10)
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_another_tenants_requests_are_its_own(up, client):
    other = make_key(Settings.from_env({}, home=up["home"]), "someone-else")
    other_client = openai.OpenAI(base_url=client.base_url, api_key=other["Authorization"].removeprefix("Bearer "),
                                 max_retries=0)
    out = other_client.completions.create(model="demo-text", prompt="hi", max_tokens=2)
    # The other tenant's job is not among this tenant's.
    assert out.id.removeprefix("cmpl-") not in {j["id"] for j in jobs_of(up)}


def test_a_batch_through_the_openai_package(up, client):
    rows = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "demo-text", "messages": [{"role": "user", "content": f"Question {k}"}],
                      "max_tokens": 4, "seed": k}} for k in range(4)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data)
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts.total == 4
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.25)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 0)
    results = [json.loads(r) for r in client.files.content(batch.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in results] == ["q0", "q1", "q2", "q3"]
    for r in results:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        # Each line's answer is the chat completion the same request gets on its own.
        alone = client.chat.completions.create(model="demo-text", max_tokens=4, seed=int(r["custom_id"][1:]),
                                               messages=[{"role": "user", "content": f"Question {r['custom_id'][1:]}"}])
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.files.create(file=("bad.jsonl", data + b"{broken\n"), purpose="batch")
    assert "line 5" in err.value.body["message"]


def test_a_fine_tuning_job_through_the_openai_package(up, client):
    # OpenAI's own dataset format: chat messages, learned on the assistant turns.
    rows = [{"messages": [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"Q{k}"},
                          {"role": "assistant", "content": "yes"}]} for k in range(4)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="demo-text", training_file=f.id, suffix="oa",
                                         hyperparameters={"n_epochs": 1, "batch_size": 2})
    assert job.status in ("queued", "running") and job.training_file == f.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
    deadline = time.monotonic() + 180
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("demo-text:ft-oa-") and job.hyperparameters.n_epochs == 1
    kinds = [e.message.split(":")[0] for e in client.fine_tuning.jobs.list_events(job.id)]
    assert kinds[0] == "completed" and kinds[-1] == "queued"
    # The new model answers chat completions (and plain completions).
    assert client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                          messages=[{"role": "user", "content": "Q1"}]).choices
    assert client.completions.create(model=job.fine_tuned_model, prompt="Q1:", max_tokens=2).choices
    # A parameter out of range is named as OpenAI names it; an ended job cannot be cancelled.
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="demo-text", training_file=f.id, hyperparameters={"n_epochs": 1000})
    assert err.value.body["param"] == "hyperparameters.n_epochs"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("0" * 32)
