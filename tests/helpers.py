"""Test helpers: API keys, `genq api` and a worker as real subprocesses, waiting on jobs.

The benches in bench/ use the server helpers too."""
from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from genq.db import make_engine, make_sessionmaker
from genq.keys import create_key
from genq.settings import Settings

TERMINAL = {"succeeded", "failed", "canceled"}


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free on every interface now, for a
    server that binds the second later (`genq up`'s webhook sender serves its
    metrics on GENQ_METRICS_PORT + 1). Picked below the kernel's ephemeral
    range: a port from free_port() is one of those, and its neighbour may be
    taken meanwhile by any outgoing connection's local end (CI saw the
    sender's bind refused, EADDRINUSE)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low - 1)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no two free consecutive ports below the ephemeral range")


def wait_serving(url: str, proc: subprocess.Popen, output, timeout: float = 60, path: str = "/healthz") -> None:
    """Until `url` + `path` answers 200. A server that exits or takes longer
    than `timeout` raises, with `output()` (what it printed) in the message."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not start (exit {proc.poll()}):\n{output()}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def genq_api(settings: Settings, extra_env: dict | None = None, timeout: float = 60):
    """`genq api --workers 1` with `settings` (and `extra_env` over them) on a
    free port, its output collected line by line; yields {"url", "port",
    "proc", "lines"} once it answers /healthz, and stops it after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(settings.as_env(), PYTHONUNBUFFERED="1", **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "genq.cli", "api", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: deque[str] = deque(maxlen=5000)
    threading.Thread(target=lambda: [lines.append(line.rstrip()) for line in proc.stdout], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(url, proc, lambda: "\n".join(lines), timeout)
        yield {"url": url, "port": port, "proc": proc, "lines": lines}
    finally:
        stop_process(proc)


def make_key(settings: Settings, tenant: str, role: str = "user") -> dict[str, str]:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        _, raw = create_key(session, tenant, role)
    engine.dispose()
    return {"Authorization": f"Bearer {raw}"}


class WorkerProcess:
    """`genq worker --pool ...` in its own process, as production runs it."""

    def __init__(self, settings: Settings, pools: list[str], *, preload: bool = True, extra_env: dict | None = None,
                 extra_args: list[str] | None = None):
        self.settings = settings
        self.pools = pools
        self.preload = preload
        self.extra_env = extra_env or {}
        self.extra_args = extra_args or []
        self.lines: deque[str] = deque(maxlen=2000)
        self.ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "WorkerProcess":
        env = {**os.environ, **self.settings.as_env(), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "genq.cli", "worker", "--pool", ",".join(self.pools)]
        if self.preload:
            cmd.append("--preload")
        cmd += self.extra_args
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # A test killed by its timeout skips fixture teardown: never leave a worker behind.
        atexit.register(self.stop, "kill", 5)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.ready.wait(timeout):
            self.stop()
            raise RuntimeError("worker did not become ready:\n" + self.log())
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if " ready." in line:
                self.ready.set()

    def log(self) -> str:
        return "\n".join(self.lines)

    def read_to_the_end(self, timeout: float = 30) -> list[str]:
        """Every line of a stopped worker's output."""
        self._reader.join(timeout)
        return list(self.lines)

    @contextlib.contextmanager
    def held(self):
        """The worker stopped (SIGSTOP) for the block: jobs submitted meanwhile
        are all queued when it goes on, whatever the machine's load."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self, sig: str = "terminate", timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        getattr(self.proc, sig)()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wait_job(get, job_id: str, headers: dict, timeout: float = 60, until=TERMINAL) -> dict:
    """Poll GET /v1/jobs/<id> through `get` (a test client's or requests') until
    the job's status is in `until`."""
    deadline = time.monotonic() + timeout
    while True:
        resp = get(f"/v1/jobs/{job_id}", headers=headers)
        body = resp.get_json() if hasattr(resp, "get_json") else resp.json()
        if body["status"] in until:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {body['status']} after {timeout}s: {body}")
        time.sleep(0.1)


def finish_with_outputs(settings: Settings, job_id: str, owner: str) -> None:
    """Claim a queued image job and finish it with one output key, as a
    worker would, without running a model."""
    from genq import jobs as joblib
    from genq.schema import Job
    from genq.states import JobStatus

    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        job = session.get(Job, job_id)
        [claimed] = joblib.claim_batch(session, model=job.model, batch_key=job.batch_key, limit=1, owner=owner,
                                       lease_seconds=30)
        joblib.finish(session, claimed.id, owner, JobStatus.SUCCEEDED,
                      output={"images": [{"key": f"jobs/{job_id}/0.png", "content_type": "image/png"}]})
    engine.dispose()
