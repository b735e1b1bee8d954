"""GET /metrics: Prometheus text format. The job gauges are read from the
database (Postgres is the record of truth, so any API replica reports the same
numbers), at most once per GENQ_METRICS_CACHE_SECONDS per process; request
counts are this process's own. GENQ_METRICS_TOKEN, when set, guards the route."""
from __future__ import annotations

import hmac
import threading
import time

from flask import Blueprint, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from api.context import ctx
from api.errors import ApiError
from genq import pools as poollib
from genq.schema import Job

bp = Blueprint("metrics", __name__)


class JobsCollector:
    """Jobs by state and pool, queue depth, oldest queued age, paused pools and
    live workers, from the database when Prometheus scrapes — or from the last
    scrape's reading, if it is younger than metrics_cache_seconds."""

    def __init__(self, context):
        self.context = context
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._families: list = []

    def collect(self):
        # Under the lock, so a burst of concurrent scrapes runs one query, not one each.
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= self.context.settings.metrics_cache_seconds:
                self._families = list(self._read())
                self._read_at = now
            families = self._families
        yield from families

    def _read(self):
        c = self.context
        by_pool: dict[str, list[str]] = {c.settings.training_pool: []}
        for spec in c.registry:
            by_pool.setdefault(spec.pool, []).append(spec.name)
        jobs = GaugeMetricFamily("genq_jobs", "Jobs by state and pool.", labels=["state", "pool"])
        depth = GaugeMetricFamily("genq_queue_depth", "Jobs queued in a pool.", labels=["pool"])
        oldest = GaugeMetricFamily("genq_queue_oldest_age_seconds", "Age of the oldest queued job of a pool.", labels=["pool"])
        paused = GaugeMetricFamily("genq_pool_paused", "1 while a pool is paused.", labels=["pool"])
        workers = GaugeMetricFamily("genq_pool_workers", "Live workers serving a pool.", labels=["pool"])
        with c.session() as session:
            for pool, state, count in session.execute(
                    select(Job.pool, Job.status, func.count()).group_by(Job.pool, Job.status)):
                jobs.add_metric([state, pool], count)
            for row in poollib.stats(session, by_pool, c.settings.heartbeat_interval):
                depth.add_metric([row["name"]], row["queued"])
                oldest.add_metric([row["name"]], row["oldest_queued_seconds"] or 0.0)
                paused.add_metric([row["name"]], 1.0 if row["paused"] else 0.0)
                workers.add_metric([row["name"]], row["workers"])
        yield from (jobs, depth, oldest, paused, workers)


def init_metrics(app) -> None:
    """A registry per app (tests build many apps in one process)."""
    registry = CollectorRegistry()
    registry.register(JobsCollector(app.extensions["genq"]))
    requests = Counter("genq_http_requests", "API requests by route and status.", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("genq_http_request_seconds", "API request time by route.", ["method", "route"], registry=registry)
    app.extensions["genq_metrics"] = registry

    @app.before_request
    def _start():
        g.metrics_started = time.monotonic()

    def observe(method: str, route: str, status: int, seconds: float | None) -> None:
        requests.labels(method, route, str(status)).inc()
        if seconds is not None:
            latency.labels(method, route).observe(seconds)

    # For what answers below Flask (api/fastpoll.py).
    app.extensions["genq_observe"] = observe

    @app.after_request
    def _count(response):
        # The URL rule, not the path: ids in paths would make a series per job.
        route = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("metrics_started")
        observe(request.method, route, response.status_code, None if started is None else time.monotonic() - started)
        return response


@bp.get("/metrics")
def metrics():
    token = ctx().settings.metrics_token
    if token:
        scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
        # Constant time: how far a guess matched must not show in the answer's timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(raw.strip().encode(), token.encode()):
            raise ApiError(401, "/metrics needs 'Authorization: Bearer <GENQ_METRICS_TOKEN>'",
                           headers={"WWW-Authenticate": 'Bearer realm="genq-metrics"'})
    return Response(generate_latest(current_app.extensions["genq_metrics"]), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
