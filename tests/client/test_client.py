"""genq.client against a real `genq up`: every method, the typed errors, retries
that honour Retry-After, a create retried after a dropped connection, and a
stream resumed after the server closed it mid-job."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from genq.client import (AsyncClient, AuthenticationError, Client, Conflict, NotFound, PayloadTooLarge,
                         RateLimited, Unavailable, ValidationError)
from tests.client.conftest import STREAM_SECONDS, new_tenant

TEXT = {"prompt": "Once upon a time", "max_new_tokens": 8, "seed": 7}
IMAGE = {"prompt": "a red square", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 7}


@pytest.fixture
def client(up):
    with Client(up["url"], new_tenant(up)) as c:
        yield c


def test_url_and_key_come_from_the_environment(up, monkeypatch):
    monkeypatch.setenv("GENQ_URL", up["url"] + "/")
    monkeypatch.setenv("GENQ_API_KEY", up["key"])
    with Client() as c:
        assert c.base_url == up["url"]
        assert {"demo-image", "demo-text"} <= {m["name"] for m in c.models.list()}
        assert c.models.get("demo-text")["type"] == "text-generation"


def test_run_returns_the_output_and_the_same_seed_the_same_text(client):
    first = client.run("demo-text", TEXT, timeout=60)
    assert first["tokens"] == 8 and first["finish_reason"] == "length"
    assert client.run("demo-text", TEXT, timeout=60)["text"] == first["text"]


def test_create_wait_get_download_an_image(client, tmp_path):
    job = client.jobs.create("demo-image", IMAGE)
    assert job.status in ("queued", "running", "succeeded") and job.model == "demo-image"
    done = job.wait(timeout=60)
    assert done.succeeded and client.jobs.get(job.id).status == "succeeded"
    [path] = done.download(tmp_path / "out")
    assert path.name == f"{job.id}-0.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list_iterates_every_page_with_filters(client):
    ids = {client.jobs.create("demo-text", {**TEXT, "seed": i}).id for i in range(3)}
    for job_id in ids:
        client.jobs.wait(job_id, timeout=60)
    listed = [j.id for j in client.jobs.list(page_size=1)]
    assert set(listed) == ids and len(listed) == 3  # three pages of one
    assert {j.id for j in client.jobs.list(model="demo-text", status="succeeded", page_size=2)} == ids
    assert list(client.jobs.list(model="demo-image")) == []


def test_cancel_then_409_for_a_finished_job(up, client):
    pause(up, "gpu-text")
    try:
        job = client.jobs.create("demo-text", TEXT)
        canceled = client.jobs.cancel(job.id)
        assert canceled.status == "canceled" and client.jobs.wait(job.id, timeout=5).status == "canceled"
    finally:
        pause(up, "gpu-text", resume=True)
    with pytest.raises(Conflict) as conflict:
        client.jobs.cancel(job.id)
    assert conflict.value.status == 409 and "already canceled" in conflict.value.detail


def test_delete_a_finished_job_and_a_file(up, client, tmp_path):
    job = client.jobs.wait(client.jobs.create("demo-text", TEXT), timeout=60)
    client.jobs.delete(job.id)
    with pytest.raises(NotFound):
        client.jobs.get(job.id)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a row"}\n')
    f = client.files.upload(data)
    client.files.delete(f)
    assert list(client.files.list()) == []
    with pytest.raises(NotFound):
        client.models.delete("demo-text:ft-none-000000")


def test_typed_errors_401_404_413_422(up, client):
    with Client(up["url"], "gq_not-a-key", max_retries=0) as stranger:
        with pytest.raises(AuthenticationError) as e401:
            stranger.jobs.get("0" * 32)
    assert e401.value.status == 401
    with pytest.raises(NotFound):
        client.jobs.get("0" * 32)
    with pytest.raises(PayloadTooLarge) as e413:
        client.jobs.create("demo-text", {"prompt": "x" * 1_100_000})
    assert "limit" in e413.value.detail
    with pytest.raises(ValidationError) as e422:
        client.jobs.create("demo-image", {"prompt": "x", "width": 100000})
    assert "input.width" in e422.value.fields
    with pytest.raises(ValidationError) as unknown:
        client.jobs.create("no-such-model", TEXT)
    assert set(unknown.value.fields) == {"model"}


def hold_streams(up, key: str, count: int) -> list:
    """`count` open tenant-wide streams of `key` (the server ends each after
    GENQ_EVENT_STREAM_SECONDS); returns the open responses. Streams an
    earlier test held end within that time: until then, tried again."""
    http = httpx.Client(base_url=up["url"], timeout=30)
    held, deadline = [], time.monotonic() + 10
    while len(held) < count:
        resp = http.send(http.build_request("GET", "/v1/events", headers={"Authorization": f"Bearer {key}",
                                                                          "Accept": "text/event-stream"}), stream=True)
        if resp.status_code == 503 and time.monotonic() < deadline:
            resp.close()
            time.sleep(0.2)
            continue
        assert resp.status_code == 200, resp.read()
        held.append(resp)
    return held


def while_held(up, keys: list[str], action):
    """`action()` while each of `keys` holds 2 streams; what it returned or
    raised. The server ends a stream after STREAM_SECONDS: when opening them
    all took the machine too long for them to be surely open still, they are
    let lapse and opened again (3 tries)."""
    for _ in range(3):
        held, started = [], time.monotonic()
        try:
            for key in keys:
                held += hold_streams(up, key, 2)
            if time.monotonic() - started < STREAM_SECONDS - 1:
                try:
                    return action()
                except Exception as exc:  # what the action raised is what the test looks at
                    return exc
        finally:
            for resp in held:
                resp.close()
        time.sleep(STREAM_SECONDS)
    pytest.fail("the machine was too slow to hold the streams open together, three times")


def test_429_is_retried_after_the_retry_after_the_api_sent(up):
    key = new_tenant(up)
    with Client(up["url"], key) as c:
        job = c.jobs.wait(c.jobs.create("demo-text", TEXT), timeout=60)
        waits = []
        # The holders are gone when the retry goes: they lapse within STREAM_SECONDS.
        c._sleep = lambda seconds: (waits.append(seconds), time.sleep(STREAM_SECONDS + 0.5))
        events = while_held(up, [key], lambda: list(c.jobs.stream(job.id)))  # the tenant's cap
    assert waits and set(waits) == {5.0}  # api/held.py's Retry-After, not the backoff's 0.5 s
    assert [e.type for e in events][-1] == "completed"
    with Client(up["url"], key, max_retries=0) as c:
        e429 = while_held(up, [key], lambda: list(c.jobs.stream(job.id)))
    assert isinstance(e429, RateLimited) and e429.status == 429 and e429.retry_after == 5.0


def test_503_with_retry_after_when_the_server_holds_its_most_streams(up):
    with Client(up["url"], new_tenant(up), max_retries=0) as c:
        job = c.jobs.create("demo-text", TEXT)
        e503 = while_held(up, [new_tenant(up), new_tenant(up)], lambda: list(c.jobs.stream(job.id)))  # the server's 4
    assert isinstance(e503, Unavailable) and e503.status == 503 and e503.retry_after == 5.0


def test_a_create_retried_after_a_dropped_connection_makes_one_job(up, proxy):
    key = new_tenant(up)
    proxy.drops = 1
    with Client(proxy.url, key) as c:
        c._sleep = lambda seconds: None
        job = c.jobs.create("demo-text", TEXT)
    assert proxy.dropped == 1
    with Client(up["url"], key) as c:
        assert [j.id for j in c.jobs.list()] == [job.id]


def test_a_create_not_retried_fails_as_a_connection_error(up, proxy):
    from genq.client import APIConnectionError

    proxy.drops = 1
    with Client(proxy.url, new_tenant(up), max_retries=0) as c:
        with pytest.raises(APIConnectionError):
            c.jobs.create("demo-text", TEXT)


def pause(up, pool: str, resume: bool = False) -> None:
    resp = httpx.post(f"{up['url']}/v1/admin/pools/{pool}/{'resume' if resume else 'pause'}", headers=up["headers"],
                      timeout=30)
    assert resp.status_code == 200, resp.text


def test_stream_resumes_after_the_server_ends_it_mid_job(up, client):
    pause(up, "gpu-text")
    try:
        job = client.jobs.create("demo-text", {**TEXT, "max_new_tokens": 48})
        events = []
        reader = threading.Thread(target=lambda: events.extend(client.jobs.stream(job.id)))
        reader.start()
        time.sleep(STREAM_SECONDS + 1)  # the server ends the stream at least once; the job waits
    finally:
        pause(up, "gpu-text", resume=True)
    reader.join(60)
    types = [e.type for e in events]
    assert types[0] == "queued" and types.count("queued") == 1 and types[-1] == "completed", types
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))  # resumed after the last id: nothing replayed
    final = client.jobs.get(job.id)
    deltas = "".join(e.delta for e in events if e.delta is not None)
    assert final.output["text"].startswith(deltas)


def test_files_upload_and_fine_tune_create(client, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "row {i} of the dataset"}}\n' for i in range(8)))
    uploaded = client.files.upload(data)
    assert uploaded.rows == 8 and uploaded.filename == "train.jsonl"
    assert client.files.get(uploaded.id).id == uploaded.id
    assert [f.id for f in client.files.list()] == [uploaded.id]
    job = client.fine_tunes.create("demo-text", uploaded, hyperparameters={"epochs": 1, "max_steps": 2})
    assert job.type == "fine-tune" and job.input["training_file"] == uploaded.id
    with pytest.raises(NotFound):
        client.fine_tunes.create("demo-text", "f" * 32)
    client.jobs.cancel(job.id)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "q{i}", "chosen": " yes", "rejected": " no"}}\n' for i in range(4)))
    train, held_out = client.files.upload(pairs), client.files.upload(pairs)
    assert train.raw["format"] == "preference"
    dpo = client.fine_tunes.create("demo-text", train, method="dpo", validation_file=held_out,
                                   hyperparameters={"beta": 0.2, "max_steps": 2})
    assert (dpo.input["method"], dpo.input["validation_file"], dpo.input["hyperparameters"]["beta"]) == (
        "dpo", held_out.id, 0.2)
    client.jobs.cancel(dpo.id)


def test_async_client_has_the_same_surface(up):
    key = new_tenant(up)

    async def main():
        async with AsyncClient(up["url"], key) as c:
            output = await c.run("demo-text", TEXT, timeout=60)
            job = await c.jobs.create("demo-text", TEXT)
            events = [e.type async for e in c.jobs.stream(job.id)]
            done = await job.wait(timeout=60)
            listed = [j.id async for j in c.jobs.list(page_size=1)]
            with pytest.raises(NotFound):
                await c.jobs.get("0" * 32)
            return output, events, done, listed

    output, events, done, listed = asyncio.run(main())
    assert output["tokens"] == 8
    assert events[-1] == "completed" and done.output["text"] == output["text"]
    assert len(listed) == 2
