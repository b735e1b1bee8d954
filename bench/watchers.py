"""What do idle event-stream watchers cost the API? Opens N event streams
(`GET /v1/jobs/<id>/events`, Accept: text/event-stream) on an API and measures:

(a) the GET /v1/jobs/<id> request rate without, with, and again without the
    N watchers open (the same short load generator each time; the cost is
    against the mean of the two without), and the API's CPU per request;
(b) the time from a state change (a cancel of the queued job every watcher
    watches) to its `completed` event at each watcher: the last (N-th) one
    must see it within 1 s;
(c) the resident memory of the API's processes before and after.

    .venv/bin/python bench/watchers.py [--watchers 1000] [--seconds 5] [--connections 16]
    .venv/bin/python bench/watchers.py --url http://host:port --key KEY [--job ID]

Without --url it starts `genq api --workers 1` (one API process) on Postgres
and Redis on 127.0.0.1 (a database of its own, dropped afterwards), with the
rate limit and the tenant's cap on held requests raised past what the bench
uses. With --url the API must allow that much itself: GENQ_MAX_HELD_REQUESTS
at least N (one tenant holds every stream) and a GENQ_RATE_LIMIT the load
does not reach, and no worker may run the watched job (it must stay queued
until the bench cancels it).

`measure(base_url, api_key, job_ids=None, n=1000, ...)` is the function
bench/api.py calls under `--watchers N`; `api_key` is a key or the request
headers carrying it. The load generator and the watchers share one asyncio
loop in this process, on the same cores as the server: compare the two rates,
not absolute figures across machines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Every watcher must see a state change within this long (seconds).
TARGET_SECONDS = 1.0
# Streams being opened at once.
OPENING = 64


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        raise SystemExit(f"need {need} file descriptors, the hard limit is {hard}: raise it (ulimit -Hn)")


def server_pids(port: int) -> list[int]:
    """The processes holding the socket that listens on `port`: gunicorn's master and workers."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.append(int(proc.name))
                    break
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return sorted(pids)


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / tick


def request(method: str, path: str, headers: dict, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench"] + [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


async def call(host: str, port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


async def load(host: str, port: int, reqs: list[bytes], connections: int, seconds: float, pids: list[int]) -> dict:
    """Keep-alive connections, one request in flight each, for `seconds`."""
    done: dict[int, int] = {}
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = k
        try:
            while time.monotonic() < stop:
                t = time.perf_counter()
                writer.write(reqs[i % len(reqs)])
                status, _ = await read_response(reader)
                latencies.append(time.perf_counter() - t)
                done[status] = done.get(status, 0) + 1
                i += connections
        finally:
            writer.close()

    started, cpu = time.monotonic(), cpu_seconds(pids)
    await asyncio.gather(*(one(k) for k in range(connections)))
    elapsed, cpu = time.monotonic() - started, cpu_seconds(pids) - cpu
    latencies.sort()
    n = sum(done.values())
    return {"rps": n / elapsed, "statuses": done, "server_ms": cpu / n * 1000 if n else float("nan"),
            "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")}


class Watcher:
    """One idle event stream, noting when each event type first arrives."""

    def __init__(self) -> None:
        self.status = 0
        self.seen: dict[str, float] = {}
        self.live = asyncio.Event()
        self.ended = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, host: str, port: int, raw: bytes) -> None:
        try:
            reader, self.writer = await asyncio.open_connection(host, port)
            self.writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            self.status = int(head.split(b" ", 2)[1])
            if self.status != 200:
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                    self.seen.setdefault(kind, time.monotonic())
                    self.live.set()
        except OSError:
            return
        finally:
            self.live.set()
            self.ended.set()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _measure(host: str, port: int, headers: dict, job_ids: list[str] | None, n: int, seconds: float,
                   connections: int, warmup: float, out) -> dict:
    auth = {**headers, "Accept": "application/json"}
    if not job_ids:
        body = json.dumps({"model": "demo-text", "input": {"prompt": "watched"}}).encode()
        status, answer = await call(host, port, request("POST", "/v1/jobs", {**auth, "Content-Type": "application/json"},
                                                        body))
        if status != 202:
            raise SystemExit(f"could not submit a job to watch: {status} {answer[:300]!r}")
        job_ids = [json.loads(answer)["id"]]
    watched = job_ids[0]
    gets = [request("GET", f"/v1/jobs/{j}", auth) for j in job_ids]
    pids = server_pids(port)
    await load(host, port, gets, connections, warmup, pids)
    rss_before = rss_mib(pids)
    without = await load(host, port, gets, connections, seconds, pids)
    out(f"GET /v1/jobs/<id> without watchers: {without['rps']:.0f} req/s (p50 {without['p50_ms']:.1f} ms, "
        f"p99 {without['p99_ms']:.1f} ms, server CPU {without['server_ms']:.2f} ms/req) {without['statuses']}")

    watchers = [Watcher() for _ in range(n)]
    stream = request("GET", f"/v1/jobs/{watched}/events", {**headers, "Accept": "text/event-stream"})
    gate = asyncio.Semaphore(OPENING)
    tasks = []
    opened = time.monotonic()

    async def open_one(w: Watcher) -> None:
        async with gate:
            tasks.append(asyncio.create_task(w.run(host, port, stream)))
            await w.live.wait()

    await asyncio.gather(*(open_one(w) for w in watchers))
    open_seconds = time.monotonic() - opened
    refused: dict[int, int] = {}
    for w in watchers:
        if w.status != 200 or "queued" not in w.seen:
            refused[w.status] = refused.get(w.status, 0) + 1
    live = n - sum(refused.values())
    out(f"{live} of {n} watchers open in {open_seconds:.1f} s" + (f"; refused: {refused}" if refused else ""))
    await asyncio.sleep(1.0)
    rss_after = rss_mib(pids)
    idle_cpu = cpu_seconds(pids)
    await asyncio.sleep(2.0)
    idle_cpu = (cpu_seconds(pids) - idle_cpu) / 2.0
    out(f"API CPU while {live} watchers sit idle: {idle_cpu * 100:.1f}% of a core")
    with_watchers = await load(host, port, gets, connections, seconds, pids)
    out(f"GET /v1/jobs/<id> with {live} watchers: {with_watchers['rps']:.0f} req/s (p50 {with_watchers['p50_ms']:.1f} ms, "
        f"p99 {with_watchers['p99_ms']:.1f} ms, server CPU {with_watchers['server_ms']:.2f} ms/req) "
        f"{with_watchers['statuses']}")
    still = sum(1 for w in watchers if w.status == 200 and not w.ended.is_set())

    # (b) A state change: cancel the watched job; when does each watcher hear it?
    changed = time.monotonic()
    status, answer = await call(host, port, request("POST", f"/v1/jobs/{watched}/cancel", auth))
    if status != 200:
        raise SystemExit(f"could not cancel the watched job: {status} {answer[:300]!r}")
    await asyncio.wait([asyncio.create_task(w.ended.wait()) for w in watchers], timeout=30)
    delays = sorted(w.seen["completed"] - changed for w in watchers if "completed" in w.seen)
    for w in watchers:
        w.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Without them again: the machine's load drifts; the cost is against the mean of before and after.
    await asyncio.sleep(1.0)
    again = await load(host, port, gets, connections, seconds, pids)
    out(f"GET /v1/jobs/<id> without watchers again: {again['rps']:.0f} req/s (p50 {again['p50_ms']:.1f} ms, "
        f"p99 {again['p99_ms']:.1f} ms, server CPU {again['server_ms']:.2f} ms/req) {again['statuses']}")
    base = (without["rps"] + again["rps"]) / 2
    cost = 1 - with_watchers["rps"] / base if base else float("nan")
    result = {
        "watchers": live, "refused": refused, "open_seconds": open_seconds, "still_open_after_load": still,
        "get_rps_without": base, "get_rps_with": with_watchers["rps"], "get_rate_cost": cost,
        "server_ms_without": (without["server_ms"] + again["server_ms"]) / 2, "server_ms_with": with_watchers["server_ms"],
        "idle_cpu": idle_cpu,
        "heard": len(delays), "delay_p50_s": statistics.median(delays) if delays else float("nan"),
        "delay_last_s": delays[-1] if delays else float("nan"),
        "rss_before_mib": rss_before, "rss_after_mib": rss_after, "rss_per_watcher_kib":
            (rss_after - rss_before) * 1024 / live if live else float("nan"), "server_pids": pids,
    }
    ok_rate, ok_mem = cost <= 0.20, rss_after - rss_before <= 200
    ok_delay = len(delays) == live and live == n and result["delay_last_s"] <= TARGET_SECONDS
    out(f"state change heard by {len(delays)} of {live}: p50 {result['delay_p50_s'] * 1000:.0f} ms, "
        f"last {result['delay_last_s'] * 1000:.0f} ms (target <= {TARGET_SECONDS * 1000:.0f} ms: "
        f"{'ok' if ok_delay else 'MISSED'})")
    out(f"GET rate cost of {live} idle watchers: {cost * 100:.1f}% (target <= 20%: {'ok' if ok_rate else 'MISSED'})")
    out(f"API RSS ({len(pids)} processes): {rss_before:.0f} MiB before, {rss_after:.0f} MiB with watchers, "
        f"+{rss_after - rss_before:.0f} MiB = {result['rss_per_watcher_kib']:.0f} KiB each "
        f"(target <= 200 MB: {'ok' if ok_mem else 'MISSED'})")
    result["ok"] = ok_rate and ok_mem and ok_delay
    return result


def measure(base_url: str, api_key: str | dict, job_ids: list[str] | None = None, n: int = 1000, *,
            seconds: float = 5.0, connections: int = 16, warmup: float = 1.0, out=print) -> dict:
    """Open `n` idle streams on the job `job_ids[0]` (a new queued job when
    None) and measure (a) the GET rate over `job_ids` without and with them,
    (b) how soon each hears the job's cancel, (c) the API processes' RSS.
    Prints as it goes (`out`) and returns the figures."""
    headers = dict(api_key) if isinstance(api_key, dict) else {"Authorization": f"Bearer {api_key}"}
    url = urlsplit(base_url)
    raise_fd_limit(n + connections + 64)
    return asyncio.run(_measure(url.hostname or "127.0.0.1", url.port or 80, headers, list(job_ids or []), n,
                                seconds, connections, warmup, out))


def serve_and_measure(args) -> dict:
    """`genq api --workers 1` on a database of its own, then measure()."""
    import requests
    import yaml
    from cryptography.fernet import Fernet

    from bench.batching import postgres_db, services_up
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import create_key
    from genq.migrate import upgrade
    from genq.settings import DEFAULT_REGISTRY, Settings

    if not services_up():
        raise SystemExit("needs Postgres and Redis on 127.0.0.1")
    suffix = secrets.token_hex(4)
    with tempfile.TemporaryDirectory() as tmp, postgres_db() as pg:
        doc = yaml.safe_load(DEFAULT_REGISTRY.read_text())
        for entry in doc["models"].values():
            entry["pool"] = f"{entry['pool']}-{suffix}"  # no worker serves these: jobs stay queued
        registry = Path(tmp) / "registry.yaml"
        registry.write_text(yaml.safe_dump(doc))
        settings = Settings.from_env({}, home=Path(tmp) / "home", database_url=pg, broker_url="redis://127.0.0.1:6379/0",
                                     registry_path=registry, webhook_secret_keys=(Fernet.generate_key().decode(),),
                                     rate_limit="1000000000/minute", max_active_jobs=1_000_000_000,
                                     max_held_requests=args.watchers + 100)
        upgrade(settings.database_url)
        engine = make_engine(pg)
        with make_sessionmaker(engine).begin() as session:
            _, key = create_key(session, "bench-watchers")
        engine.dispose()
        from tests.helpers import genq_api

        with genq_api(settings) as api:
            print(f"{os.cpu_count()} cores; genq api, 1 gunicorn worker x {settings.api_threads} threads; "
                  f"{args.watchers} watchers; load: {args.connections} connections x {args.seconds:g} s", flush=True)
            ids = []
            for _ in range(20):
                r = requests.post(f"{api['url']}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "demo-text", "input": {"prompt": "watched"}}, timeout=10)
                ids.append(r.json()["id"])
            return measure(api["url"], key, ids, args.watchers, seconds=args.seconds,
                           connections=args.connections, warmup=args.warmup,
                           out=lambda line: print(line, flush=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds of GET load, each time")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16, help="load generator connections")
    parser.add_argument("--url", help="an API to measure instead of starting one")
    parser.add_argument("--key", help="with --url: an API key")
    parser.add_argument("--job", action="append", help="with --url: job ids to GET (the first is watched)")
    args = parser.parse_args()
    if args.url:
        if not args.key:
            parser.error("--url needs --key")
        result = measure(args.url, args.key, args.job, args.watchers, seconds=args.seconds,
                         connections=args.connections, warmup=args.warmup)
    else:
        result = serve_and_measure(args)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
