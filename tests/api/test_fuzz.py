"""Schemathesis against the app, from its own OpenAPI document, with every
default check, plus one of ours: a tenant's key never reads another tenant's
objects. Runs on the embedded stack (SQLite, local storage, file broker)."""
from __future__ import annotations

import io
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from genq.settings import Settings
from genq.migrate import upgrade
from models import image_finetune
from tests.helpers import make_key

CASES = {"count": 0}


def build_world() -> dict:
    """The app and two tenants, built at import: schemathesis needs the schema
    when it collects the test."""
    import tempfile
    from pathlib import Path

    home = Path(tempfile.mkdtemp(prefix="genq-fuzz-"))
    # No rate limit or job quota here: the fuzzer sends thousands of requests on one key.
    # No worker runs: an OpenAI-compatible request's wait ends (504) almost at once.
    s = Settings.from_env({}, home=home, rate_limit="", max_active_jobs=0, openai_wait_seconds=0.05)
    upgrade(s.database_url)
    app = create_app(s)
    client = app.test_client()
    mine, theirs = make_key(s, "fuzz-me", "user"), make_key(s, "fuzz-them", "user")
    # The other tenant owns a job and a file we must never see.
    job = client.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "secret of them"}}, headers=theirs).get_json()
    f = client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(b'{"text": "their data"}'), "t.jsonl")},
                    headers=theirs, content_type="multipart/form-data").get_json()
    return {"app": app, "client": client, "mine": mine, "theirs": theirs, "foreign_ids": [job["id"], f["id"]]}


WORLD = build_world()
schema = schemathesis.openapi.from_wsgi("/openapi.json", WORLD["app"])


@schema.auth()
class TenantKey:
    """Our tenant's key on every case, except those testing a missing key
    (schemathesis skips programmatic auth for them)."""

    def get(self, case, ctx):
        return WORLD["mine"]["Authorization"]

    def set(self, case, data, ctx):
        case.headers = {**(case.headers or {}), "Authorization": data}


@pytest.fixture
def world():
    return WORLD


@schemathesis.check
def never_another_tenants_object(ctx, response, case):
    """A response to tenant A never carries an id of tenant B's objects."""
    body = response.content or b""
    for foreign in FOREIGN:
        if foreign.encode() in body:
            raise AssertionError(f"response to {case.method} {case.path} leaks another tenant's object {foreign}")


FOREIGN: list[str] = []


@schemathesis.check
def no_server_error_but_the_wait_timeout(ctx, response, case):
    """An OpenAI-compatible request with no worker to run it: 504 (its wait ran out), never another 5xx."""
    if response.status_code >= 500 and response.status_code != 504:
        raise AssertionError(f"{case.method} {case.path} answered {response.status_code}: {response.text[:300]}")


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, world):
    FOREIGN[:] = world["foreign_ids"]
    CASES["count"] += 1
    excluded = []
    if case.operation.label in ("POST /v1/files", "POST /openai/v1/files"):
        # The schema can say "a file", not "UTF-8 JSONL of prompt/completion rows":
        # random bytes are schema-valid and rightly refused (422 naming the line).
        excluded.append(positive_data_acceptance)
    if (case.operation.label == "POST /v1/jobs" and isinstance(case.body, dict)
            and isinstance(case.body.get("input"), dict) and "messages" in case.body["input"]):
        # The model's prompt bound covers chat messages' text together, which no schema can say.
        excluded.append(positive_data_acceptance)
    checks = [never_another_tenants_object]
    if case.operation.label.endswith(("/completions", "/images/generations")):
        # No worker runs here: a valid request waits GENQ_OPENAI_WAIT_SECONDS and is 504 by design
        # (documented); any other 5xx still fails.
        excluded += [positive_data_acceptance, not_a_server_error]
        checks.append(no_server_error_but_the_wait_timeout)
    if case.operation.label in ("POST /v1/jobs", "POST /openai/v1/batches") and isinstance(case.body, dict) \
            and case.body.get("webhook"):
        # Whether a webhook host is allowed depends on what it resolves to
        # (no loopback, private, link-local...), which no schema can say.
        excluded.append(positive_data_acceptance)
    body_input = case.body.get("input") if isinstance(case.body, dict) else None
    if case.operation.label == "POST /v1/jobs" and isinstance(body_input, dict) and (
            "image" in body_input or "mask_image" in body_input):
        # The schema can say "a file id or a data URI", not "an image that decodes":
        # a random string there is schema-valid and rightly refused (422 naming the field).
        excluded.append(positive_data_acceptance)
    hyper = body_input.get("hyperparameters") if isinstance(body_input, dict) else None
    if case.operation.label == "POST /v1/jobs" and isinstance(hyper, dict) and hyper.get("train_text_encoder") is True \
            and image_finetune.text_encoder_lora_problem():
        # Whether this machine's libraries can put LoRA on a text encoder is not the schema's to say
        # (the reference documents the API, not one install): refused 422 naming the field.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(additional_checks=checks,
                           excluded_checks=excluded)


def test_report_case_count():
    print(f"\nschemathesis generated cases run: {CASES['count']}")
    assert CASES["count"] > 100


@pytest.mark.parametrize("method, path", [
    ("get", "/v1/jobs/{job}"), ("post", "/v1/jobs/{job}/cancel"), ("get", "/v1/jobs/{job}/events"),
    ("get", "/v1/jobs/{job}/outputs/0.png"), ("get", "/v1/jobs/{job}/webhook-deliveries"),
    ("post", "/v1/jobs/{job}/webhook-deliveries/x/redeliver"),
    ("get", "/v1/files/{file}"), ("get", "/v1/files/{file}/content"),
])
def test_every_route_answers_404_for_a_foreign_id(world, method, path):
    job, file = world["foreign_ids"]
    resp = getattr(world["client"], method)(path.format(job=job, file=file), headers=world["mine"])
    assert resp.status_code == 404 and resp.mimetype == "application/problem+json"
    assert job.encode() not in resp.data or "no job" in json.loads(resp.data)["detail"]
