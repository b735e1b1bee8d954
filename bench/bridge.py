"""What would serving the API from an ASGI server cost its plain requests?
The same Flask app and the same GET /v1/jobs/<id> load against:

- `stream`: `genq api`'s worker (gthread plus the stream hand-over, api/fanout.py);
- `gthread`: gunicorn's plain gthread worker;
- `asgi`: gunicorn's ASGI worker (`-k asgi`) with the WSGI app behind
  a2wsgi's WSGIMiddleware (a thread pool of the same size), the shape where
  asyncio serves the streams natively and every other route crosses a bridge.

Each server has one worker process and 8 threads; the rounds are interleaved
(stream, gthread, asgi, then again) because this machine's load drifts.

    pip install --target /tmp/bridge-pkgs a2wsgi   # not a genq dependency
    PYTHONPATH=/tmp/bridge-pkgs .venv/bin/python bench/bridge.py [--seconds 5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.watchers import load, request, server_pids  # noqa: E402
from tests.helpers import free_port, stop_process, wait_serving  # noqa: E402


def asgi_app():
    """gunicorn -k asgi 'bench.bridge:asgi_app()': the genq app behind a2wsgi."""
    from a2wsgi import WSGIMiddleware

    from api.serve import gunicorn_app

    return WSGIMiddleware(gunicorn_app(), workers=int(os.environ.get("GENQ_API_THREADS", "8")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    import requests
    import yaml
    from cryptography.fernet import Fernet

    from bench.batching import postgres_db
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import create_key
    from genq.migrate import upgrade
    from genq.settings import DEFAULT_REGISTRY, Settings

    suffix = secrets.token_hex(4)
    with tempfile.TemporaryDirectory() as tmp, postgres_db() as pg:
        doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
        for entry in doc["models"].values():
            entry["pool"] = f"{entry['pool']}-{suffix}"
        registry = Path(tmp) / "registry.yaml"
        registry.write_text(yaml.safe_dump(doc))
        settings = Settings.from_env({}, home=Path(tmp) / "home", database_url=pg, broker_url="redis://127.0.0.1:6379/0",
                                     registry_path=registry, webhook_secret_keys=(Fernet.generate_key().decode(),),
                                     rate_limit="1000000000/minute", max_active_jobs=1_000_000_000, api_threads=8)
        upgrade(pg)
        engine = make_engine(pg)
        with make_sessionmaker(engine).begin() as session:
            _, key = create_key(session, "bench-bridge")
        engine.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        env.update(settings.as_env(), PYTHONUNBUFFERED="1")
        common = ["--workers", "1", "--threads", "8", "--logger-class", "api.serve.GunicornLogger"]
        shapes = {
            "stream": ["-k", "api.fanout.StreamWorker", *common, "api.serve:gunicorn_app()"],
            "gthread": ["-k", "gthread", *common, "api.serve:gunicorn_app()"],
            "asgi": ["-k", "asgi", *common, "bench.bridge:asgi_app()"],
        }
        auth = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        results: dict[tuple[str, str], list[dict]] = {}
        ids: list[str] = []
        for _ in range(args.rounds):
            for name, argv in shapes.items():
                port = free_port()
                log = open(Path(tmp) / f"{name}.log", "w")
                proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", *argv],
                                        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                try:
                    try:
                        wait_serving(f"http://127.0.0.1:{port}", proc, lambda: (Path(tmp) / f"{name}.log").read_text()[-3000:])
                    except RuntimeError as exc:
                        raise SystemExit(f"{name}: {exc}") from None
                    if not ids:
                        for _ in range(20):
                            r = requests.post(f"http://127.0.0.1:{port}/v1/jobs", headers=auth, timeout=10,
                                              json={"model": "demo-text", "input": {"prompt": "bridge"}})
                            ids.append(r.json()["id"])
                    pids = server_pids(port)
                    for route, reqs in (("get", [request("GET", f"/v1/jobs/{j}", auth) for j in ids]),
                                        ("healthz", [request("GET", "/healthz", {})])):

                        async def run():
                            await load("127.0.0.1", port, reqs, args.connections, 1.0, pids)
                            return await load("127.0.0.1", port, reqs, args.connections, args.seconds, pids)

                        r = asyncio.run(run())
                        results.setdefault((name, route), []).append(r)
                        print(f"{name:8} {route:8} {r['rps']:6.0f} req/s  p50 {r['p50_ms']:5.1f} ms  "
                              f"p99 {r['p99_ms']:6.1f} ms  server CPU {r['server_ms']:.2f} ms/req  {r['statuses']}",
                              flush=True)
                finally:
                    stop_process(proc)
                    log.close()
    print(f"\n{'shape':8} {'route':8} {'req/s':>7} {'vs gthread':>10} {'CPU ms/req':>10} {'vs gthread':>10}")
    for (name, route), runs in results.items():
        base = statistics.mean(r["rps"] for r in results[("gthread", route)])
        base_cpu = statistics.mean(r["server_ms"] for r in results[("gthread", route)])
        rps = statistics.mean(r["rps"] for r in runs)
        cpu = statistics.mean(r["server_ms"] for r in runs)
        print(f"{name:8} {route:8} {rps:7.0f} {rps / base:9.2f}x {cpu:10.2f} {cpu / base_cpu:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
