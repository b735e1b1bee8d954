"""`genq up`: the whole service on one machine. SQLite, a local storage folder
and a broker in files (unless GENQ_* says otherwise), the API in this process
on werkzeug's server, a worker for every pool and the webhook sender beside it
as child processes, started again when they die (api/supervise.py)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from api.app import create_app
from api.serve import bind_dev_server
from api.supervise import Child
from genq.db import make_engine, make_sessionmaker, redact
from genq.jobs import requeue_dead_worker
from genq.keys import authenticate, create_key
from genq.migrate import upgrade
from genq.queue import publish
from genq.settings import Settings

log = logging.getLogger("genq")
# In GENQ_HOME: the key of tenant 'local', made by the first `genq up`.
KEY_FILE = "api-key"


def main(settings: Settings, args) -> int:
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
    url = f"http://{host}:{port}"
    if settings.log_format == "json":
        # A log pipeline gets one line, without the key: it is for the person
        # who started genq up, who finds it in GENQ_HOME/api-key.
        log.info("genq is up at %s; its API key is in %s", url, settings.home / KEY_FILE, extra={"url": url})
    else:
        print(banner(settings, url, key), flush=True)

    context = server.app.extensions["genq"]

    def take_back(pid: int) -> str | None:
        # The worker is dead (just reaped): its jobs need not wait out their leases.
        with context.sessions.begin() as session:
            ring = requeue_dead_worker(session, socket.gethostname(), pid)
        for job_id, pool in ring:
            publish(context.celery, job_id, pool)
        return f"{len(ring)} of its jobs queued again at once" if ring else None

    stopping = threading.Event()

    def stop(signum=None, frame=None):
        # Ctrl-C, SIGTERM, or a child given up on: the children first, so that
        # one ending now (a terminal's Ctrl-C reaches them too) is not started again.
        if not stopping.is_set():
            stopping.set()
            for child in children:
                child.stop()
            threading.Thread(target=server.shutdown, daemon=True).start()

    cli = [sys.executable, "-m", "genq.cli", "worker"]
    children = [
        Child("genq worker", cli + ["--pool", "all", "--preload"], env, on_death=take_back, on_give_up=stop),
        # Its own process: a webhook must not wait behind a batch on the model worker.
        Child("webhook sender", cli + ["--pool", settings.webhook_queue], sender_env, on_give_up=stop),
    ]
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for child in children:
            child.start()
        server.serve_forever()
    finally:
        for child in children:
            child.stop()
        for child in children:
            child.join(timeout=30)
    return 1 if any(child.gave_up for child in children) else 0


def banner(settings: Settings, url: str, key: str) -> str:
    """What `genq up` says to the person who started it, once it listens."""
    host = url.rsplit(":", 1)[0]
    return f"""
genq is up (embedded: {redact(settings.database_url)}, {settings.storage_url}, broker {settings.broker_url.split(':')[0]})
  API:      {url}
  API key:  {key}
  try:      curl -s -H 'Authorization: Bearer {key}' -H 'Prefer: wait=30' \\
              -d '{{"model": "demo-text", "input": {{"prompt": "Once upon a time", "seed": 7}}}}' {url}/v1/jobs
  Ctrl-C stops API, worker and webhook sender.
""" + (f"""  metrics:  {url}/metrics (API), {host}:{settings.metrics_port}/metrics (worker), \
            {host}:{settings.metrics_port + 1}/metrics (webhook sender)
""" if settings.metrics_port else "")


def _local_key(settings: Settings) -> str:
    """The embedded default's API key: made once for tenant 'local', kept in
    GENQ_HOME/api-key (mode 600) so `genq up` can show it again."""
    path = Path(settings.home) / KEY_FILE
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
