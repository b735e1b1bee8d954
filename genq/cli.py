"""The `genq` command: up, api, worker, migrate, keys."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from genq.logs import configure as configure_logging
from genq.settings import Settings

log = logging.getLogger("genq")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genq", description="A job queue for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run API and worker together on this machine, no services needed")
    up.add_argument("--port", type=int, help="API port (default GENQ_API_PORT or 8000)")
    up.add_argument("--host", help="API host (default GENQ_API_HOST or 127.0.0.1)")

    api = sub.add_parser("api", help="serve the REST API with gunicorn")
    api.add_argument("--bind", help="host:port (default GENQ_API_HOST:GENQ_API_PORT)")
    api.add_argument("--workers", type=int, help="gunicorn worker processes (default GENQ_API_WORKERS or 2)")

    worker = sub.add_parser("worker", help="run a worker for one or more pools, or the webhook sender")
    worker.add_argument("--pool", required=True, help="pool name(s), comma-separated; 'all' for every pool in the registry; "
                                                      "the webhook queue (GENQ_WEBHOOK_QUEUE, 'webhooks') for the sender")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="processes; 1 (the default) runs in-process (one GPU, one process). "
                             "The webhook sender alone runs this many threads (default 8)")
    worker.add_argument("--preload", action="store_true", help="load the pools' models before taking jobs")

    sub.add_parser("migrate", help="bring the database schema up to date")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant (made if new) and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", default="user", choices=["user", "admin"])
    revoke = keys_sub.add_parser("revoke", help="revoke keys by the prefix shown when they were made")
    revoke.add_argument("prefix")

    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings)
    return COMMANDS[args.command](settings, args) or 0


def cmd_migrate(settings: Settings, args) -> int:
    from genq.migrate import upgrade

    upgrade(settings.database_url)
    print(f"database at {redact(settings.database_url)} is up to date")
    return 0


def cmd_keys(settings: Settings, args) -> int:
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import create_key, revoke

    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions.begin() as session:
        if args.keys_command == "create":
            tenant, raw = create_key(session, args.tenant, args.role)
            print(raw)
            print(f"# tenant {tenant.name} ({args.role}); shown once, stored hashed", file=sys.stderr)
        else:
            count = revoke(session, args.prefix)
            print(f"revoked {count} key(s)")
            return 0 if count else 1
    return 0


def cmd_worker(settings: Settings, args) -> int:
    from models.registry import Registry

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
    # Set before worker.app reads the environment, and inherited by prefork children.
    node = f"{'+'.join(pools)}.{os.getpid()}@{socket.gethostname()}"
    os.environ["GENQ_WORKER_NAME"] = node
    settings = settings.replace(worker_name=node)
    from worker.app import app
    from worker import metrics

    metrics.serve(settings.metrics_port)
    if pools == [settings.webhook_queue]:
        # Posting is waiting on the network: threads, so one slow receiver does not hold up the rest.
        concurrency, pool_kind = args.concurrency or 8, "threads"
    else:
        concurrency = args.concurrency or 1
        pool_kind = "solo" if concurrency == 1 else "prefork"
    if settings.webhook_queue in pools:
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
        # SIGTERM: claim nothing new, bound the batch in hand, hand it back past the timeout.
        begin_on_signals()
        if pool_kind == "solo":
            # Celery's soft-shutdown wait would run in the signal handler, on the
            # thread running the batch: it would pause the batch, not let it finish.
            app.conf.worker_soft_shutdown_timeout = 0.0
    Heartbeat(settings, node, pools, model_errors).start()
    argv = ["worker", "-Q", ",".join(pools), "--loglevel", settings.log_level,
            "-n", node, "-c", str(concurrency), "--pool", pool_kind]
    if settings.embedded_broker:
        # The filesystem transport has no fanout exchange for worker gossip.
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    app.worker_main(argv)
    return 0


def _sweep_when_ready(settings: Settings, app) -> None:
    """The webhook sender's sweep runs beside the worker, started once the
    worker is up (after any pool processes are forked, so none inherits it)."""
    from celery.signals import worker_ready

    from genq.db import make_engine, make_sessionmaker
    from worker.webhook_sender import Sweep

    def start(**_):
        Sweep(settings, make_sessionmaker(make_engine(settings.database_url)), app).start()

    worker_ready.connect(start, weak=False)


class Reconciler(threading.Thread):
    """Beside every worker: jobs whose lease expired in these pools (a killed
    worker) are queued again, or failed past max_attempts; queued jobs that
    have waited past a grace period get their doorbell rung again (a lost
    publish, a broker restart); Idempotency-Key records past their TTL are
    purged. Duplicate doorbells are harmless; the job row decides. A round
    that fails (the database or the broker is down) is tried again next
    interval, so the thread outlives any outage."""

    def __init__(self, settings: Settings, pools: list[str]):
        super().__init__(name="reconciler", daemon=True)
        self.settings, self.pools = settings, pools

    def run(self) -> None:
        from genq.db import make_engine, make_sessionmaker
        from genq.queue import make_celery

        sessions = make_sessionmaker(make_engine(self.settings.database_url))
        app = make_celery(self.settings)
        first = True
        while True:
            try:
                self.round(sessions, app, first)
                first = False
            except Exception as exc:
                from genq.outage import unavailable

                if (down := unavailable(exc)) is None:
                    log.exception("reconciler round failed; trying again in %ss", self.settings.reconcile_interval)
                else:
                    log.warning("reconciler round failed, the %s is unreachable; trying again in %ss",
                                down, self.settings.reconcile_interval)
            time.sleep(self.settings.reconcile_interval)

    def round(self, sessions, app, first: bool = False) -> None:
        import datetime as dt

        from genq import idempotency
        from genq.jobs import queued_heads, requeue_expired
        from genq.queue import publish
        from genq.schema import utcnow

        with sessions.begin() as session:
            ring = requeue_expired(session, self.pools)
        requeued = len(ring)
        # The first round after a start rings for everything queued: the
        # broker may have lost every message while no worker was up.
        grace = dt.timedelta(seconds=0 if first else 2 * self.settings.reconcile_interval)
        with sessions() as session:
            ring += queued_heads(session, self.pools, older_than=utcnow() - grace)
        for job_id, pool in ring:
            publish(app, job_id, pool)
        if ring:
            log.info("reconciler: rang %d doorbell(s), %d for jobs queued again after their lease expired",
                     len(ring), requeued)
        with sessions.begin() as session:
            if purged := idempotency.purge(session, dt.timedelta(seconds=self.settings.idempotency_ttl)):
                log.info("purged %d idempotency keys older than %ss", purged, self.settings.idempotency_ttl)


class Heartbeat(threading.Thread):
    """Beside every worker: "still alive" in the database every
    heartbeat_interval, which /v1/admin/workers and the pools' worker counts
    read. Rows silent for a day are removed (replicas scaled away)."""

    def __init__(self, settings: Settings, name: str, pools: list[str], model_errors=lambda: {}):
        super().__init__(name="heartbeat", daemon=True)
        self.settings, self.worker, self.pools = settings, name, pools
        self.model_errors = model_errors

    def run(self) -> None:
        import datetime as dt

        from genq.db import make_engine, make_sessionmaker
        from genq.pools import forget_gone_workers, heartbeat
        from genq.schema import utcnow

        sessions = make_sessionmaker(make_engine(self.settings.database_url))
        while True:
            try:
                with sessions.begin() as session:
                    heartbeat(session, self.worker, self.pools, model_errors=self.model_errors())
                    forget_gone_workers(session, utcnow() - dt.timedelta(days=1))
            except Exception:  # the database may be down: try again next beat
                log.exception("heartbeat failed")
            time.sleep(self.settings.heartbeat_interval)


def cmd_api(settings: Settings, args) -> int:
    bind = args.bind or f"{settings.api_host}:{settings.api_port}"
    host, _, port = bind.rpartition(":")
    if settings.public_url is None and port.isdigit():
        # Without GENQ_PUBLIC_URL, the URLs the API hands out name the port it
        # listens on, and its host unless that is every interface.
        os.environ["GENQ_API_PORT"] = port
        if host not in ("", "0.0.0.0", "[::]"):
            os.environ["GENQ_API_HOST"] = host
    workers = args.workers or settings.api_workers
    # gthread: a request holds one of --threads while it is served; the API
    # keeps all but GENQ_API_HELD_THREADS of them for short requests.
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers),
                               "--worker-class", "gthread", "--threads", str(settings.api_threads),
                               "--access-logfile", "-", "--logger-class", "genq.serving.GunicornLogger",
                               "api.app:create_app()"])


def cmd_up(settings: Settings, args) -> int:
    """Everything on one machine: SQLite, a local storage folder and a broker in
    files (unless GENQ_* says otherwise), the API in this process, a worker
    for every pool and the webhook sender beside it."""
    from api.app import create_app
    from genq.migrate import upgrade
    from genq.serving import bind_dev_server

    host = args.host or settings.api_host
    port = args.port if args.port is not None else settings.api_port
    # GENQ_HOME holds the database, the API key and the storage: the owner's only.
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    upgrade(settings.database_url)
    key = _local_key(settings)
    try:
        server = bind_dev_server(host, port)
    except OSError as exc:
        print(f"genq up: cannot listen on {host}:{port}: {exc}. Pass --port or set GENQ_API_PORT.", file=sys.stderr)
        return 1
    # The port actually bound (port 0 picks one), so the URLs the API and the
    # webhook payloads hand out point at this API.
    port = server.server_port
    settings = settings.replace(api_host=host, api_port=port)
    server.app = create_app(settings)
    env = {**os.environ, **settings.as_env()}
    # Two processes, two metrics ports: the model worker on GENQ_METRICS_PORT,
    # the webhook sender on the next one.
    sender_env = {**env, "GENQ_METRICS_PORT": str(settings.metrics_port + 1)} if settings.metrics_port else env
    workers = [
        subprocess.Popen([sys.executable, "-m", "genq.cli", "worker", "--pool", "all", "--preload"], env=env),
        # Its own process: a webhook must not wait behind a batch on the model worker.
        subprocess.Popen([sys.executable, "-m", "genq.cli", "worker", "--pool", settings.webhook_queue], env=sender_env),
    ]
    url = f"http://{host}:{port}"
    print(f"""
genq is up (embedded: {redact(settings.database_url)}, {settings.storage_url}, broker {settings.broker_url.split(':')[0]})
  API:      {url}
  API key:  {key}
  try:      curl -s -H 'Authorization: Bearer {key}' -H 'Prefer: wait=30' \\
              -d '{{"model": "demo-text", "input": {{"prompt": "Once upon a time", "seed": 7}}}}' {url}/v1/jobs
  Ctrl-C stops API, worker and webhook sender.
""" + (f"""  metrics:  {url}/metrics (API), http://{host}:{settings.metrics_port}/metrics (worker), \
            http://{host}:{settings.metrics_port + 1}/metrics (webhook sender)
""" if settings.metrics_port else ""), flush=True)

    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for worker in workers:
        threading.Thread(target=_watch_worker, args=(worker, stop), daemon=True).start()
    try:
        server.serve_forever()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _watch_worker(worker: subprocess.Popen, stop) -> None:
    code = worker.wait()
    log.error("worker exited with code %s; stopping", code)
    stop(None, None)


def _local_key(settings: Settings) -> str:
    """The embedded default's API key: made once for tenant 'local', kept in
    GENQ_HOME/api-key (mode 600) so `genq up` can show it again."""
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import authenticate, create_key

    path = Path(settings.home) / "api-key"
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions.begin() as session:
        if path.exists():
            raw = path.read_text().strip()
            if authenticate(session, raw):
                return raw
        _, raw = create_key(session, "local", "admin")
    path.write_text(raw + "\n")
    path.chmod(0o600)
    return raw


def redact(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


COMMANDS = {"up": cmd_up, "api": cmd_api, "worker": cmd_worker, "migrate": cmd_migrate, "keys": cmd_keys}

if __name__ == "__main__":
    sys.exit(main())
