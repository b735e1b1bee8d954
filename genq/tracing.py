"""OpenTelemetry traces, optional: off unless GENQ_OTEL_ENDPOINT is set (and
the `otel` extra installed). Off, nothing here imports OpenTelemetry and every
function is a cheap no-op, so the hot paths pay one global read.

On, each process (the API, each worker) has one tracer provider exporting
over OTLP/HTTP, and Flask, SQLAlchemy, Celery and botocore are instrumented.
A Celery message's trace context is no use for a job: the message is a
doorbell, and the worker that answers it may claim other jobs in its batch.
So the job row keeps its creating request's context (`jobs.trace_context`,
W3C traceparent), and the worker makes each job's span a child of it: one
trace from `POST /v1/jobs` to the job's finish. The batch a job ran in is a
span of its own that links to every job it holds."""
from __future__ import annotations

import datetime as dt
import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from genq.errors import ConfigError
from genq.settings import Settings

log = logging.getLogger(__name__)

# The tracer provider of this process, once set up; None while traces are off.
_provider = None
_instrumented: list = []


def enabled() -> bool:
    return _provider is not None


def setup(settings: Settings, service: str, exporter=None):
    """Trace this process as `service` when settings.otel_endpoint is set, or
    into `exporter` (a SpanExporter; tests pass the SDK's in-memory one).
    Returns the tracer provider, or None when traces are off. Once per
    process: later calls return the first provider."""
    global _provider
    if _provider is not None:
        return _provider
    if exporter is None and not settings.otel_endpoint:
        return None
    try:
        from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise ConfigError(f"GENQ_OTEL_ENDPOINT is set but OpenTelemetry is not installed ({exc}): "
                          "pip install 'genq[otel]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Batched and sent from a thread: a slow collector must not slow a request.
        exporter = OTLPSpanExporter(endpoint=f"{settings.otel_endpoint.rstrip('/')}/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The provider is handed to each instrumentor rather than made global:
    # OpenTelemetry lets the global one be set only once per process.
    # SQLAlchemy's wraps create_engine, so engines made from now on are traced
    # (genq.db makes them through the module, after this runs).
    # skip_dep_check for SQLAlchemy: its instrumentation declares "< 2.1" while
    # genq runs 2.1, whose engine events it hooks are unchanged
    # (tests/test_tracing.py sees the statements' spans); the check would
    # otherwise log an error and instrument nothing.
    for instrumentor, options in ((SQLAlchemyInstrumentor(), {"skip_dep_check": True}), (CeleryInstrumentor(), {}),
                                  (BotocoreInstrumentor(), {})):
        instrumentor.instrument(tracer_provider=provider, **options)
        _instrumented.append(instrumentor)
    _provider = provider
    log.info("tracing on: %s sends spans to %s", service, settings.otel_endpoint or type(exporter).__name__)
    return provider


def shutdown() -> None:
    """Flush what is pending and stop tracing (tests; a process exits anyway)."""
    global _provider
    while _instrumented:
        _instrumented.pop().uninstrument()
    if _provider is not None:
        _provider.shutdown()
    _provider = None


def tracer():
    from opentelemetry import trace

    return trace.get_tracer("genq", tracer_provider=_provider)


def instrument_flask(app) -> None:
    """Trace the app's requests (a server span each), when traces are on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls="healthz,readyz,metrics")


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers ({"traceparent": ...}), to
    store on a job; None when traces are off or nothing is being traced."""
    if _provider is None:
        return None
    from opentelemetry.propagate import inject

    out: dict[str, str] = {}
    inject(out)
    return out or None


@contextmanager
def attached(stored: dict | None) -> Iterator[None]:
    """Run the block in the trace context `stored` (carrier()'s), as work
    handed to another thread is: its spans join the request that handed it."""
    if _provider is None or not stored:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(_context(stored))
    try:
        yield
    finally:
        otel_context.detach(token)


def _context(stored: dict | None):
    from opentelemetry.propagate import extract

    return extract(stored) if stored else None


def _span_context(stored: dict | None):
    from opentelemetry import trace

    context = _context(stored)
    span_context = trace.get_current_span(context).get_span_context() if context is not None else None
    return span_context if span_context is not None and span_context.is_valid else None


def _ns(at: dt.datetime | None) -> int | None:
    return int(at.timestamp() * 1e9) if at is not None else None


@contextmanager
def batch_span(model: str, pool: str, contexts: Iterable[dict | None] = ()) -> Iterator[Any]:
    """A span for one batch, current while it runs, linked to the request
    that created each of its jobs (a batch's jobs come from many traces)."""
    if _provider is None:
        yield None
        return
    from opentelemetry.trace import Link

    contexts = list(contexts)
    links = [Link(sc) for sc in map(_span_context, contexts) if sc is not None]
    attributes = {"genq.model": model, "genq.pool": pool}
    if contexts:
        attributes["genq.batch_size"] = len(contexts)
    with tracer().start_as_current_span("genq.batch", links=links, attributes=attributes) as span:
        yield span


@contextmanager
def job_span(job, status: str, error: dict | None = None, batch=None) -> Iterator[None]:
    """The span of one job on its worker, from its start to its finish,
    made a child of the request that created it (the context stored on the
    job) and linked to `batch`, its batch's span (handed over rather than
    taken as the current span: a continuous batch finishes its rows on a
    thread of its own). Current while the caller records the finish, so its
    log lines carry the job's trace id."""
    if _provider is None:
        yield
        return
    from opentelemetry import trace
    from opentelemetry.trace import Link, Status, StatusCode

    links = [Link(batch.get_span_context())] if batch is not None and batch.get_span_context().is_valid else []
    span = tracer().start_span("genq.job", context=_context(job.trace_context), links=links,
                               start_time=_ns(job.started_at), kind=trace.SpanKind.CONSUMER,
                               attributes={"genq.job_id": job.id, "genq.model": job.model, "genq.pool": job.pool,
                                           "genq.attempt": job.attempts, "genq.status": status})
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, (error or {}).get("code")))
    with trace.use_span(span, end_on_exit=True):
        yield


def current_ids() -> dict[str, str]:
    """{"trace_id", "span_id"} of the span current in this thread, as hex,
    for log lines; empty when traces are off or no span is current."""
    if _provider is None:
        return {}
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return {}
    return {"trace_id": format(sc.trace_id, "032x"), "span_id": format(sc.span_id, "016x")}
