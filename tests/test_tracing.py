"""Traces (genq/tracing.py) with the SDK's in-memory exporter: one trace from
`POST /v1/jobs` to the job's finish on the worker, the batch's span linked to
each of its jobs' requests, the trace id in JSON logs; and with traces off,
nothing stored on the job."""
from __future__ import annotations

import io
import json
import logging
import secrets

import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from api.app import create_app
from genq import tracing
from genq.logs import JsonFormatter
from genq.migrate import upgrade
from genq.schema import Job
from genq.settings import Settings
from tests.helpers import make_key
from worker.build import build_runner


def settings_for(tmp_path, batching: str) -> Settings:
    """Embedded (SQLite, local storage, the filesystem broker), one model of
    the fault-test family on a pool of its own."""
    pool = f"traced-{secrets.token_hex(3)}"
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"m": {
        "family": "tests.faults.family", "checkpoint": "none", "pool": pool, "max_batch_size": 4,
        "max_wait_ms": 0, "batching": batching}}}))
    settings = Settings.from_env({}, home=tmp_path / "home", registry_path=registry, device="cpu", lease_seconds=30,
                                 worker_name=f"{pool}@test")
    upgrade(settings.database_url)
    return settings


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    # Set up before the app and the runner: their engines must be made traced.
    tracing.setup(Settings.from_env({}), "genq-test", exporter=spans)
    yield spans
    tracing.shutdown()


def submit_and_run(settings: Settings, prompts: list[str]) -> tuple[list[str], str]:
    """Submit one job per prompt through the API, then let a runner in this
    process answer one doorbell (it claims them all, as one batch). Returns
    the job ids and what the runner logged, as JSON lines."""
    client = create_app(settings).test_client()
    key = make_key(settings, f"t-{secrets.token_hex(3)}")
    ids = []
    for prompt in prompts:
        resp = client.post("/v1/jobs", headers=key, json={"model": "m", "input": {"prompt": prompt}})
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    runner = build_runner(settings)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("worker.runner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert runner.on_doorbell(ids[0]) == len(ids)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        runner.sessions.kw["bind"].dispose()
    return ids, lines.getvalue()


def stored_contexts(settings: Settings, ids: list[str]) -> dict[str, dict | None]:
    from genq.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        out = {job_id: session.get(Job, job_id).trace_context for job_id in ids}
    engine.dispose()
    return out


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_one_trace_from_the_request_to_the_jobs_finish(tmp_path, exporter, batching):
    settings = settings_for(tmp_path, batching)
    ids, logged = submit_and_run(settings, ["a", "b"])
    spans = exporter.get_finished_spans()

    requests = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("http.route") == "/v1/jobs"]
    assert len(requests) == 2 and requests[0].context.trace_id != requests[1].context.trace_id
    jobs = {s.attributes["genq.job_id"]: s for s in spans if s.name == "genq.job"}
    assert set(jobs) == set(ids)
    [batch] = [s for s in spans if s.name == "genq.batch"]
    contexts = stored_contexts(settings, ids)
    for job_id, request in zip(ids, requests):
        job = jobs[job_id]
        # The job row keeps its request's context; the worker's span is that request's child.
        assert contexts[job_id]["traceparent"].split("-")[1] == format(request.context.trace_id, "032x")
        assert job.context.trace_id == request.context.trace_id
        assert job.parent.span_id == request.context.span_id
        assert job.attributes["genq.status"] == "succeeded" and job.attributes["genq.model"] == "m"
        assert request.start_time < job.start_time <= job.end_time
        # ... and links to the batch it ran in, which is a trace of its own.
        assert [link.context.span_id for link in job.links] == [batch.context.span_id]
        # The request's SQL is in its trace (SQLAlchemy instrumented).
        assert any(s.context.trace_id == request.context.trace_id and s.name.startswith("INSERT")
                   for s in spans), [s.name for s in spans]
        # The trace id is on the log line of the job's finish.
        [line] = [json.loads(x) for x in logged.splitlines() if json.loads(x)["message"] == f"job {job_id} succeeded"]
        assert line["trace_id"] == format(request.context.trace_id, "032x")
    assert batch.context.trace_id not in {r.context.trace_id for r in requests}
    if batching == "static":
        # Claimed together: the batch links to both requests.
        assert {link.context.span_id for link in batch.links} == {r.context.span_id for r in requests}
        assert batch.attributes["genq.batch_size"] == 2
    else:
        assert not batch.links  # jobs join a continuous batch as it runs


def test_the_celery_doorbell_is_traced_in_the_request(tmp_path, exporter):
    settings = settings_for(tmp_path, "static")
    submit_and_run(settings, ["a"])
    spans = exporter.get_finished_spans()
    [request] = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("http.route") == "/v1/jobs"]
    assert any(s.kind == SpanKind.PRODUCER and s.context.trace_id == request.context.trace_id for s in spans), \
        [(s.name, s.kind) for s in spans]


def test_traces_off_store_nothing_and_log_no_trace_id(tmp_path):
    assert not tracing.enabled()
    settings = settings_for(tmp_path, "static")
    ids, logged = submit_and_run(settings, ["a"])
    assert stored_contexts(settings, ids) == {ids[0]: None}
    assert all("trace_id" not in json.loads(x) for x in logged.splitlines())


def test_an_endpoint_set_sends_spans_over_otlp_http(tmp_path):
    """GENQ_OTEL_ENDPOINT alone turns traces on: spans are POSTed to
    <endpoint>/v1/traces as OTLP protobuf (a collector stands in here)."""
    import http.server
    import threading

    received: list[tuple[str, str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings.from_env({"GENQ_OTEL_ENDPOINT": f"http://127.0.0.1:{server.server_port}/"})
        provider = tracing.setup(settings, "genq-test")
        assert provider is not None and tracing.enabled()
        with tracing.batch_span("m", "p"):
            pass
        assert provider.force_flush(10_000)
    finally:
        tracing.shutdown()
        server.shutdown()
    assert received, "no spans reached the collector"
    path, content_type, body = received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    assert b"genq.batch" in body and b"genq-test" in body
