"""How close does the API's hot path come to a Flask hello-world? In one run,
under the same gunicorn settings and the same load generator:

- a Flask JSON hello-world (the ceiling: what gunicorn + Flask cost alone);
- `genq api` on Postgres + Redis (a database of its own, dropped afterwards):
  GET a job, GET a job with If-None-Match (304), list jobs, POST a job; the
  GETs poll 100 unchanged jobs, which each API process answers from memory
  once it has read them (GENQ_POLL_CACHE_SECONDS); `getdb` is the same GET on
  a second `genq api` with that cache off, every poll read from the database.

    .venv/bin/python bench/api.py [--seconds 5] [--connections 32] [--workers N] [--threads 8]
                                  [--routes hello,get,getdb,get304,list,post] [--watchers N] [--queue]

It prints requests/s, p50 and p99 latency per route, each route's ratio to
hello (measured before and after the genq routes, the mean of both), and the
resident memory of each server's processes.

The load generator is built in (wrk is not installed on these machines):
asyncio protocol clients on raw sockets, HTTP/1.1 keep-alive, one request in
flight per connection. It runs in this process, on the same cores as the
servers, as wrk would: on a 2-core machine its own cost shows in every figure
alike, so compare ratios, not absolute rates, across machines. "client CPU"
says how much of a core it used; near 100% it would be the bottleneck.

Each server is measured once all its workers have booted and gone idle
(`settle`): otherwise the first worker up takes the first connections, kept
alive for the whole route.

POST submits small text jobs under the default active-jobs quota (200),
locked and counted on every submit. No worker runs: a stand-in marks the
submitted jobs succeeded every 0.1 s, as workers would finish them, so the
quota's count reads what it reads in production (at most the quota's rows)
and nothing is refused. `--queue` measures as before this stand-in: the jobs
pile up queued, the quota lifted, and each submit counts all of them
(thousands by the end of a run, inside the tenant's lock). Their doorbells
go to a queue of the bench's own on Redis, purged afterwards.

--watchers N is where the event-stream measurement plugs in: it calls
bench.watchers.measure(base_url, headers, job_ids, n) when that module exists.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genq.settings import DEFAULT_REGISTRY, Settings  # noqa: E402
from tests.helpers import free_port, stop_process, wait_serving  # noqa: E402

ROUTES = ("hello", "get", "getdb", "get304", "list", "post")


# ---- the ceiling: a Flask JSON hello-world, served by gunicorn as genq is

def hello_app():
    from flask import Flask

    app = Flask("hello")

    @app.get("/")
    def hello():
        return {"hello": "world"}

    return app


# ---- the load generator

class Client(asyncio.Protocol):
    """One keep-alive connection: sends the next request as soon as the last
    answer is complete, and records each answer's latency and status."""

    def __init__(self, run: "Run"):
        self.run = run
        self.buf = bytearray()
        self.sent_at = 0.0
        self.transport = None
        self.n = 0

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send()

    def send(self):
        if self.run.stopping:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.run.request(self.n))
        self.n += 1

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            status = int(head[9:12])
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0 and status not in (204, 304):
                length = int(head[at + 17:head.find(b"\r\n", at + 2) if head.find(b"\r\n", at + 2) > 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            self.run.record(status, time.perf_counter() - self.sent_at)
            self.send()

    def connection_lost(self, exc):
        self.run.closed += 1


class Run:
    def __init__(self, requests: list[bytes], warmup: float):
        self.requests = requests
        self.stopping = False
        self.closed = 0
        self.measuring_from = time.perf_counter() + warmup
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}

    def request(self, n: int) -> bytes:
        return self.requests[n % len(self.requests)]

    def record(self, status: int, latency: float):
        if time.perf_counter() >= self.measuring_from:
            self.latencies.append(latency)
            self.statuses[status] = self.statuses.get(status, 0) + 1


async def drive(port: int, requests: list[bytes], connections: int, seconds: float, warmup: float) -> dict:
    loop = asyncio.get_running_loop()
    run = Run(requests, warmup)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(connections):
        # Each connection starts at a different request of the list. They open
        # a little apart, as clients do: gunicorn's workers share one listening
        # socket and a keep-alive connection stays with the worker that
        # accepted it, so a burst of connects would mostly land on one worker.
        await loop.create_connection(lambda i=i: _offset(Client(run), i), "127.0.0.1", port)
        await asyncio.sleep(0.01)
    await asyncio.sleep(warmup + seconds)
    run.stopping = True
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + 10
    while run.closed < connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lat = sorted(run.latencies)
    n = len(lat)
    return {
        "rps": n / seconds,
        "p50": lat[n // 2] * 1000 if n else float("nan"),
        "p99": lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan"),
        "statuses": run.statuses,
        "client_cpu": ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / (warmup + seconds),
    }


def _offset(client: Client, i: int) -> Client:
    client.n = i * 7
    return client


def http_request(method: str, path: str, headers: dict | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---- servers

@contextmanager
def server(argv: list[str], env: dict, port: int, ready_path: str, workers: int):
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"http://127.0.0.1:{port}", proc, lambda: "(output not kept: rerun the command by hand)",
                     path=ready_path)
        settle(proc.pid, workers)
        yield proc
    finally:
        stop_process(proc)


def settle(pid: int, workers: int, quiet: float = 0.02, limit: float = 60.0) -> None:
    """Wait until the server's `workers` worker processes are all up and idle
    (each used under `quiet` s of CPU in the last 0.5 s). The first worker to
    boot answers the readiness probe while the others may still be importing
    the app; connections opened then all land on the ones that are up and,
    kept alive, stay there for the whole route: the slower an app boots, the
    more one worker serves alone (genq's first route measured at up to 100% of
    the CPU in one of four workers). Both servers are waited for alike."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        children = [p for p in family(pid) if p != pid]
        before = cpu_seconds(children)
        time.sleep(0.5)
        after = cpu_seconds(children)
        if len(before) >= workers and all(after.get(p, 0) - used < quiet for p, used in before.items()):
            return
    print(f"(workers still busy after {limit:g} s; measuring anyway)", flush=True)


def family(pid: int) -> list[int]:
    """A process and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU time (user + system) of each process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn's master and workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


# ---- the genq side

def genq_settings(tmp: Path, pg_url: str, pool_suffix: str, watchers: int = 0, lift_quota: bool = False) -> Settings:
    from cryptography.fernet import Fernet

    doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    for entry in doc["models"].values():
        entry["pool"] = f"{entry['pool']}-{pool_suffix}"
    registry = tmp / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    return Settings.from_env({}, home=tmp / "home", database_url=pg_url, broker_url="redis://127.0.0.1:6379/0",
                             registry_path=registry, webhook_secret_keys=(Fernet.generate_key().decode(),),
                             # Counted (leased from Redis, as for every request), never reached.
                             rate_limit="1000000000/minute",
                             # The default quota, locked and counted on every submit; `finishing` keeps the
                             # tenant under it. Lifted for --queue, where jobs pile up.
                             **({"max_active_jobs": 1_000_000_000} if lift_quota else {}),
                             # --watchers N: one tenant holds all N streams, past the default cap of 4.
                             **({"max_held_requests": watchers + 16} if watchers else {}))


def seed(settings: Settings, n: int) -> tuple[dict, list[str], dict, str]:
    """A tenant, its key and `n` jobs of its own, to read; and a second
    tenant's key and id, to submit as (its quota counts only what it submits)."""
    from genq import jobs as joblib
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import create_key

    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        tenant, raw = create_key(session, "bench")
        ids = [joblib.submit(session, tenant_id=tenant.id, type_="text-generation", model="demo-text",
                             pool="bench", batch_key="k", input_={"prompt": "hi", "max_new_tokens": 8}).id
               for _ in range(n)]
        submitter, submitter_raw = create_key(session, "bench-submits")
    engine.dispose()
    return {"Authorization": f"Bearer {raw}"}, ids, {"Authorization": f"Bearer {submitter_raw}"}, submitter.id


def etags(port: int, headers: dict, ids: list[str]) -> dict[str, str]:
    import http.client

    out = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for job_id in ids:
        conn.request("GET", f"/v1/jobs/{job_id}", headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        out[job_id] = resp.getheader("ETag")
    conn.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per route")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: genq api's default)")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: GENQ_API_THREADS)")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--watchers", type=int, default=0, help="also open N event streams (bench/watchers.py)")
    parser.add_argument("--queue", action="store_true",
                        help="POST: let submitted jobs pile up, queued, with the active-jobs quota lifted "
                             "(before: every submit counts them all); default: they finish as they would with workers")
    args = parser.parse_args()
    routes = [r for r in args.routes.split(",") if r]

    from genq.db import temporary_database
    from genq.migrate import upgrade

    admin_url = os.environ.get("GENQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    suffix = secrets.token_hex(4)
    with tempfile.TemporaryDirectory() as tmp, temporary_database(admin_url, f"genq_bench_{suffix}") as pg:
        settings = genq_settings(Path(tmp), pg, suffix, args.watchers, lift_quota=args.queue)
        workers = args.workers or settings.workers
        threads = args.threads or settings.api_threads
        settings = settings.replace(api_workers=workers, api_threads=threads)
        upgrade(settings.database_url)
        headers, ids, submit_headers, submitter = seed(settings, 100)
        gunicorn = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "gthread",
                    "--threads", str(threads)]
        print(f"{os.cpu_count()} cores; gunicorn {workers} workers x gthread {threads} threads; "
              f"{args.connections} connections; {args.seconds:g} s per route after {args.warmup:g} s warm-up",
              flush=True)
        results: dict[str, dict] = {}
        rss: dict[str, float] = {}

        def measure(name: str, port: int, reqs: list[bytes], pid: int):
            pids = family(pid)
            before = cpu_seconds(pids)
            r = asyncio.run(drive(port, reqs, args.connections, args.seconds, args.warmup))
            after = cpu_seconds(pids)
            used = [after[p] - before[p] for p in after if p in before]
            served = sum(r["statuses"].values()) * (args.warmup + args.seconds) / args.seconds
            # Server CPU per request (every gunicorn process; not the database's or Redis'),
            # and the busiest process's share: keep-alive connections stay with the worker that accepted them.
            r["server_ms"] = sum(used) / served * 1000 if served else float("nan")
            r["busiest"] = max(used) / sum(used) if sum(used) else float("nan")
            results.setdefault(name, []).append(r)

        hello_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        with server([*gunicorn, "--bind", f"127.0.0.1:{hello_port}", "bench.api:hello_app()"], env, hello_port,
                    "/", workers) as hello:
            hello_req = [http_request("GET", "/")]
            if "hello" in routes:
                measure("hello", hello_port, hello_req, hello.pid)
            rss["hello"] = rss_mib(hello.pid)

            port = free_port()
            genq_env = {**env, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
            with server([sys.executable, "-m", "genq.cli", "api", "--bind", f"127.0.0.1:{port}"], genq_env, port,
                        "/healthz", workers) as api:
                auth = {**headers, "Accept": "application/json"}
                if "get" in routes:
                    measure("get", port, [http_request("GET", f"/v1/jobs/{i}", auth) for i in ids], api.pid)
                if "get304" in routes:
                    tags = etags(port, headers, ids)
                    measure("get304", port, [http_request("GET", f"/v1/jobs/{i}", {**auth, "If-None-Match": tags[i]})
                                             for i in ids], api.pid)
                if "list" in routes:
                    measure("list", port, [http_request("GET", "/v1/jobs?limit=20", auth)], api.pid)
                if "post" in routes:
                    body = json.dumps({"model": "demo-text", "input": {"prompt": "hello", "max_new_tokens": 8}}).encode()
                    with finishing(settings, submitter, args.queue):
                        measure("post", port, [http_request("POST", "/v1/jobs", {
                            **submit_headers, "Accept": "application/json", "Content-Type": "application/json"}, body)],
                                api.pid)
                if args.watchers:
                    try:
                        import bench.watchers as watchers
                    except ImportError:
                        print("--watchers: bench/watchers.py is not here yet; skipped")
                    else:
                        watchers.measure(f"http://127.0.0.1:{port}", headers, ids, args.watchers)
                rss["genq"] = rss_mib(api.pid)
            if "getdb" in routes:
                # The same polls with the poll cache off: every one reads the database.
                port = free_port()
                with server([sys.executable, "-m", "genq.cli", "api", "--bind", f"127.0.0.1:{port}"],
                            {**genq_env, "GENQ_POLL_CACHE_SECONDS": "0"}, port, "/healthz", workers) as api:
                    measure("getdb", port, [http_request("GET", f"/v1/jobs/{i}", {**headers, "Accept": "application/json"})
                                            for i in ids], api.pid)
            if "hello" in routes:
                measure("hello", hello_port, hello_req, hello.pid)
        purge_queues(settings)

    hello_rps = statistics.mean(r["rps"] for r in results["hello"]) if "hello" in results else None
    print(f"\n{'route':8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'vs hello':>8} {'client CPU':>10} "
          f"{'server CPU ms/req':>17} {'busiest proc':>12}  statuses")
    for name in routes:
        if name not in results:
            continue
        runs = results[name]
        rps = statistics.mean(r["rps"] for r in runs)
        p50 = statistics.mean(r["p50"] for r in runs)
        p99 = statistics.mean(r["p99"] for r in runs)
        cpu = statistics.mean(r["client_cpu"] for r in runs)
        statuses = {}
        for r in runs:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        ratio = f"{rps / hello_rps:.2f}x" if hello_rps else "-"
        server_ms = statistics.mean(r["server_ms"] for r in runs)
        busiest = statistics.mean(r["busiest"] for r in runs)
        print(f"{name:8} {rps:8.0f} {p50:7.1f} {p99:7.1f} {ratio:>8} {cpu:10.0%} {server_ms:17.2f} {busiest:12.0%}  "
              f"{' '.join(f'{k}:{v}' for k, v in sorted(statuses.items()))}")
    print("\nRSS: " + ", ".join(f"{k} {v:.0f} MiB (all {workers + 1} processes)" for k, v in rss.items()))
    if "hello" in results and len(results["hello"]) > 1:
        print("hello before / after: " + " / ".join(f"{r['rps']:.0f}" for r in results["hello"]) + " req/s")
    return 0


@contextmanager
def finishing(settings: Settings, tenant_id: str, grow: bool):
    """While the submits run, a stand-in for workers: every FINISH_EVERY
    seconds the submitting tenant's jobs queued since are marked succeeded (one
    UPDATE), so that, as in production, its jobs queued or running stay under
    the active-jobs quota and the quota's count, inside the tenant's lock,
    reads at most that many rows. With --queue (the old behaviour) nothing
    finishes, the quota is lifted, and each submit counts every job queued
    before it, thousands by the end of a run."""
    import threading

    from sqlalchemy import text

    from genq.db import make_engine

    if grow:
        yield
        return
    engine = make_engine(settings.database_url)
    stop = threading.Event()

    def finish() -> None:
        while not stop.wait(FINISH_EVERY):
            with engine.begin() as conn:
                conn.execute(text("UPDATE jobs SET status = 'succeeded', completed_at = now(), updated_at = now() "
                                  "WHERE tenant_id = :tenant AND status = 'queued'"), {"tenant": tenant_id})

    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        engine.dispose()


# How often the stand-in for workers finishes the submitted jobs (seconds).
FINISH_EVERY = 0.1


def purge_queues(settings: Settings) -> None:
    """The POSTs' doorbells, in queues of this run's own."""
    import redis

    from models.registry import Registry

    client = redis.Redis.from_url(settings.broker_url)
    pools = {spec.pool for spec in Registry.load(settings.registry_path)}
    if pools:
        client.delete(*pools)


if __name__ == "__main__":
    sys.exit(main())
