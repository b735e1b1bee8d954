"""`genq worker`: a worker for one or more pools, or the webhook sender, as
one Celery worker process with its reconciler and heartbeat beside it."""
from __future__ import annotations

import logging
import os
import socket
import sys

from genq.db import make_engine, make_sessionmaker
from genq.settings import Settings
from models.registry import Registry
from worker import app as worker_app
from worker.heartbeat import Heartbeat
from worker.reconciler import Reconciler
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)


def main(settings: Settings, args) -> int:
    registry = Registry.load(settings.registry_path)
    known = registry.pools() + [settings.training_pool]
    pools = known if args.pool == "all" else [p.strip() for p in args.pool.split(",") if p.strip()]
    unknown = [p for p in pools if p not in known and p != settings.webhook_queue]
    if unknown:
        print(f"genq worker: no model in the registry uses pool(s) {unknown}; pools: {known}, "
              f"and {settings.webhook_queue!r} for the webhook sender", file=sys.stderr)
        return 2

    # The Celery node name (-n) is the worker's name for operators: heartbeats,
    # /v1/admin/workers and drain use it, and lease owners start with it.
    node = f"{'+'.join(pools)}.{os.getpid()}@{socket.gethostname()}"
    settings = settings.replace(worker_name=node)
    # First, so the engines, Celery and boto3 clients made below are traced
    # (when GENQ_OTEL_ENDPOINT is set). Prefork children (--concurrency > 1)
    # inherit the instrumentation; their span exporter's thread is restarted
    # after the fork by the SDK.
    from genq import tracing

    tracing.setup(settings, "genq-webhooks" if pools == [settings.webhook_queue] else "genq-worker")
    # The app and its tasks take these settings, not the environment's; made
    # before any pool process is forked, so every one inherits them.
    app = worker_app.make(settings)
    from worker import metrics

    metrics.serve(settings.metrics_port)
    if pools == [settings.webhook_queue]:
        # Posting is waiting on the network: threads, so one slow receiver does not hold up the rest.
        concurrency, pool_kind = args.concurrency or 8, "threads"
    else:
        concurrency = args.concurrency or 1
        pool_kind = "solo" if concurrency == 1 else "prefork"
    if settings.webhook_queue in pools:
        # The sender opens the tenants' sealed secrets: without a key it could
        # send nothing, so it says so now (a ConfigError: genq exits 2), not
        # at its first delivery.
        from genq.webhook_secrets import Sealer

        Sealer.from_settings(settings)
        _sweep_when_ready(settings, app)
    model_errors = lambda: {}  # noqa: E731 - models this process could not load, for the heartbeat
    if concurrency == 1 and pools != [settings.webhook_queue]:
        # In-process pool: the runner (and its model cache) is this process's.
        from worker import tasks
        from worker.tasks import runner

        model_errors = lambda: dict(tasks._runner.cache.load_errors) if tasks._runner else {}  # noqa: E731
        if args.preload:
            # Models loaded now serve every job of this process. One that cannot
            # load must not take the others down: its jobs fail with the reason
            # when they are claimed, and operators see it in /v1/admin/workers.
            for spec in registry.in_pools(pools):
                try:
                    runner().cache.get(spec)
                except Exception as exc:
                    log.error("model %s could not be loaded (%s); its jobs will fail with model_load_failed, "
                              "the other models run on", spec.name, getattr(exc, "message", exc))
    model_pools = [p for p in pools if p != settings.webhook_queue]
    if model_pools:
        from worker.shutdown import begin_on_signals

        Reconciler(settings, model_pools).start()
        Sweeper(settings).start()
        # SIGTERM: claim nothing new, bound the batch in hand, hand it back past the timeout.
        begin_on_signals()
        if pool_kind == "solo":
            # Celery's soft-shutdown wait would run in the signal handler, on the
            # thread running the batch: it would pause the batch, not let it finish.
            app.conf.worker_soft_shutdown_timeout = 0.0
    Heartbeat(settings, node, pools, model_errors).start()
    _leave_logging_to_genq()
    # Celery's banner (its ASCII art and configuration, printed past the log)
    # gives way to one line; its "ready." line follows once it consumes.
    log.info("worker %s: queues %s, %d %s, broker %s", node, ",".join(pools), concurrency,
             "thread(s)" if pool_kind == "threads" else f"process(es) ({pool_kind})",
             app.connection_for_read().as_uri())
    argv = ["--quiet", "--no-color", "worker", "-Q", ",".join(pools), "--loglevel", settings.log_level,
            "-n", node, "-c", str(concurrency), "--pool", pool_kind]
    if settings.embedded_broker:
        # The filesystem transport has no fanout exchange for worker gossip.
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    app.worker_main(argv)
    return 0


def _leave_logging_to_genq() -> None:
    """Celery sets up logging of its own unless a receiver of setup_logging
    does: handlers for its task loggers, colours at a terminal, and stdout
    and stderr redirected into the log at WARNING (so a library's progress
    bar became a stream of warnings). genq.logs has set up this process's
    logging already; this receiver keeps Celery from touching it, in prefork
    children too. What Celery says to the person at the terminal from its
    signal handlers ("worker: Warm shutdown (MainProcess)") it writes past
    any log, straight to the file descriptor: it goes to the log instead."""
    import celery.apps.worker
    from celery.signals import setup_logging

    setup_logging.connect(lambda **_: None, weak=False)
    said = logging.getLogger("celery.apps.worker")
    celery.apps.worker.safe_say = lambda msg, f=None: said.info("%s", msg.strip())


def _sweep_when_ready(settings: Settings, app) -> None:
    """The webhook sender's sweep runs beside the worker, started once the
    worker is up (after any pool processes are forked, so none inherits it)."""
    from celery.signals import worker_ready

    from worker.webhook_sender import Sweep

    def start(**_):
        Sweep(settings, make_sessionmaker(make_engine(settings.database_url)), app).start()

    worker_ready.connect(start, weak=False)
