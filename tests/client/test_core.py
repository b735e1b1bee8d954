"""The client's pure parts, with no server: retry timing, Retry-After, problem
bodies to error classes, SSE messages to events, download names, -i parsing."""
from __future__ import annotations

import email.utils
import time

import pytest

from genq.client import _core as core
from genq.client import errors
from genq.client.commands import UsageError, parse_inputs
from genq.client.types import Job


def test_retries_honour_retry_after_up_to_a_bound_and_back_off_without_it():
    r = core.Retries(max_retries=3, max_wait=30)
    assert r.delay(1, 5.0) == 5.0
    assert r.delay(1, 31.0) is None  # longer than we wait: raised at once, with its retry_after
    assert 0.4 <= r.delay(1, None) <= 0.6 and 0.8 <= r.delay(2, None) <= 1.2 and 1.6 <= r.delay(3, None) <= 2.4
    assert r.delay(4, None) is None and r.delay(4, 1.0) is None
    assert core.Retries(max_retries=10).delay(10, None) <= 8 * 1.2


def test_retry_after_reads_seconds_and_dates():
    assert errors.retry_after({"retry-after": "7"}) == 7.0
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= errors.retry_after({"retry-after": later}) <= 61
    assert errors.retry_after({}) is None and errors.retry_after({"retry-after": "soon"}) is None


@pytest.mark.parametrize("status, cls", [(400, errors.BadRequest), (401, errors.AuthenticationError),
                                         (403, errors.PermissionDenied), (404, errors.NotFound),
                                         (409, errors.Conflict), (413, errors.PayloadTooLarge),
                                         (422, errors.ValidationError), (429, errors.RateLimited),
                                         (503, errors.Unavailable), (502, errors.ServerError), (418, errors.APIError)])
def test_each_status_has_its_error_class(status, cls):
    body = b'{"title": "T", "status": %d, "detail": "d", "errors": [{"field": "input.width", "message": "m"}]}' % status
    error = errors.from_response(status, {"Retry-After": "3", "X-Request-Id": "r1"}, body)
    assert type(error) is cls and error.status == status and error.detail == "d" and error.request_id == "r1"
    assert error.errors == [{"field": "input.width", "message": "m"}]
    if isinstance(error, errors.RetryableError):
        assert error.retry_after == 3.0
    if isinstance(error, errors.ValidationError):
        assert error.fields == {"input.width": "m"}


def test_an_error_page_that_is_not_json_still_gives_its_class():
    error = errors.from_response(502, {}, b"<html>Bad Gateway</html>")
    assert isinstance(error, errors.ServerError) and "Bad Gateway" in error.detail


def test_sse_messages_become_events():
    durable = core.event_from_sse("progress", '{"id": 7, "type": "progress", "at": "t", "data": {"current": 2}}', "7")
    assert (durable.id, durable.type, durable.data, durable.at, durable.delta) == ("7", "progress", {"current": 2}, "t", None)
    live = core.event_from_sse("output", '{"delta": "ab", "index": 3}', "7.3")
    assert live.delta == "ab" and live.id == "7.3"
    tenant = core.event_from_sse("start", '{"job_id": "j", "id": 9, "type": "start", "at": "t", "data": {}}', "9")
    assert tenant.job_id == "j"
    assert core.event_from_sse("", "", None) is None


def test_downloads_are_named_by_job_and_only_the_api_gets_the_key(tmp_path):
    job = Job.from_json({"id": "abc", "status": "succeeded", "output": {"images": [
        {"url": "http://api:8000/v1/jobs/abc/outputs/0.png"},
        {"url": "https://bucket.s3.example/jobs/abc/1.png?X-Amz-Signature=..%2F"}]}})
    fetch, write = core.download_plan(job, tmp_path)
    assert [p.name for _, p in fetch] == ["abc-0.png", "abc-1.png"] and write == []
    assert core.same_origin(fetch[0][0], "http://api:8000") and not core.same_origin(fetch[1][0], "http://api:8000")
    text = Job.from_json({"id": "t", "status": "succeeded", "output": {"text": "hi"}})
    assert core.download_plan(text, tmp_path) == ([], [(tmp_path / "t.txt", "hi")])


def test_ids_that_would_leave_their_place_in_the_url_are_refused():
    for bad in ("../admin", "a/b", "", "x?y=1"):
        with pytest.raises(ValueError):
            core.get_job(bad)


def test_inputs_parse_json_files_and_dotted_keys(tmp_path):
    (tmp_path / "p.txt").write_text("from a file\n")
    assert parse_inputs(["prompt=a red fox", "seed=7", "stop=[\"x\"]", "flag=true", f"text=@{tmp_path / 'p.txt'}",
                         "hyperparameters.epochs=2", "hyperparameters.learning_rate=0.01"]) == {
        "prompt": "a red fox", "seed": 7, "stop": ["x"], "flag": True, "text": "from a file",
        "hyperparameters": {"epochs": 2, "learning_rate": 0.01}}
    for bad in (["noequals"], ["=x"], [f"x=@{tmp_path / 'missing'}"], ["a=1", "a.b=2"]):
        with pytest.raises(UsageError):
            parse_inputs(bad)


def test_the_url_and_key_resolve_from_the_environment():
    assert core.resolve(None, None, env={}) == ("http://127.0.0.1:8000", None)
    assert core.resolve(None, None, env={"GENQ_URL": "http://h:1/", "GENQ_API_KEY": "k"}) == ("http://h:1", "k")
    assert core.resolve("http://given:2", "g", env={"GENQ_URL": "http://h:1"}) == ("http://given:2", "g")
    with pytest.raises(ValueError):
        core.resolve("ftp://nope", None, env={})


def test_model_output_reaches_a_terminal_without_its_control_characters(monkeypatch):
    import io

    from genq.client import commands

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    text = "ok\tline\n\x1b]0;owned\x07\x08\x9bend"
    monkeypatch.setattr("sys.stdout", Terminal())
    assert commands._for_terminal(text) == "ok\tline\n\ufffd]0;owned\ufffd\ufffd\ufffdend"
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert commands._for_terminal(text) == text  # a pipe gets the output as it is


def test_what_is_tried_again_after_no_answer_or_an_error_answer():
    import httpx

    retries = core.Retries(max_retries=2, max_wait=30)
    post, get = core.Call("POST", "/v1/jobs"), core.Call("GET", "/v1/jobs/x", idempotent=True)
    never_sent, cut = httpx.ConnectError("refused"), httpx.ReadError("reset")
    # Never sent: any call is tried again, until the retries are spent.
    assert core.retry_delay(retries, post, 1, exc=never_sent) > 0
    with pytest.raises(errors.APIConnectionError):
        core.retry_delay(retries, post, 3, exc=never_sent)
    # Sent and cut off: only an idempotent call.
    assert core.retry_delay(retries, get, 1, exc=cut) > 0
    with pytest.raises(errors.APIConnectionError):
        core.retry_delay(retries, post, 1, exc=cut)
    # 429 and 503 wait as told; other errors are raised at once, as their class.
    request = httpx.Request("POST", "http://x/v1/jobs")
    busy = httpx.Response(429, headers={"Retry-After": "2"}, request=request,
                          json={"title": "Too Many Requests", "detail": "slow down"})
    assert core.retry_delay(retries, post, 1, response=busy) == 2.0
    with pytest.raises(errors.RateLimited):
        core.retry_delay(retries, post, 3, response=busy)
    with pytest.raises(errors.ValidationError):
        core.retry_delay(retries, post, 1, response=httpx.Response(
            422, request=request, json={"title": "Unprocessable", "detail": "input.prompt: required"}))
