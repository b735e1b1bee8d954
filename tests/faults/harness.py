"""The parts the fault tests break, and the one check each test ends with.

Real processes and servers only: a Redis server of the test's own (so
restarting it touches nobody else), a TCP proxy in front of Postgres that can
be cut (new connections refused, open ones closed: an unreachable database as
its clients see it), `genq worker` processes that are killed and restarted,
and the execution log every worker appends to (worker/executions.py).
"""
from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import redis
from sqlalchemy import func, select

from genq.db import make_engine, make_sessionmaker
from genq.schema import Job, JobEvent
from genq.settings import Settings
from genq.storage import make_storage
from tests.helpers import TERMINAL, WorkerProcess, free_port
from worker import executions



class RedisServer:
    """redis-server on a free port with no persistence (as the shared one is
    configured): a restart starts empty, every message gone."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH: the fault tests start and restart a Redis of their own")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def messages(self) -> int:
        """Messages waiting in every queue (lists) of this server."""
        client = redis.Redis(port=self.port)
        return sum(client.llen(k) for k in client.keys("*") if client.type(k) == b"list")


class TcpProxy:
    """127.0.0.1:port forwarding to a target; cut() closes the listener and
    every open connection, restore() listens again on the same port.
    hold(marker) stalls the first request that carries `marker` (its bytes
    wait in the proxy, the client waits for an answer) until release(): a
    request stuck on the network, at a point of the test's choosing."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._marker: bytes | None = None
        self.holding = threading.Event()
        self._released = threading.Event()

    def hold(self, marker: bytes) -> None:
        self._marker = marker
        self._released.clear()

    def release(self) -> None:
        self._marker = None
        self._released.set()

    def start(self) -> "TcpProxy":
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.05)
        self._listening.set()
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    restore = start

    def cut(self) -> None:
        self._listening.clear()
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listening.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if self._marker is not None and self._marker in data:
                        self._marker = None  # the first such request only
                        self.holding.set()
                        self._released.wait()
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            for s in (a, b):
                with self._lock:
                    self._conns.discard(s)
                s.close()


class Worker(WorkerProcess):
    """A `genq worker` whose pid and time of death are kept: a killed worker's
    executions end when it did."""

    def start(self, timeout: float = 60) -> "Worker":
        super().start(timeout)
        self.pid = self.proc.pid
        return self

    @property
    def exited_at(self) -> float | None:
        return getattr(self, "_exited_at", None)

    def _read(self) -> None:
        super()._read()
        self.proc.wait()
        self._exited_at = time.time()

    def wait_exit(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + 5
        while self.exited_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return code


class Supervisor:
    """Restarts a worker whenever it exits, as Kubernetes or Compose would."""

    def __init__(self, make):
        self.make = make
        self.workers: list[Worker] = []
        self._stop = threading.Event()

    def start(self) -> "Supervisor":
        self.workers.append(self.make().start())
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            current = self.workers[-1]
            if current.proc.poll() is not None and not self._stop.is_set():
                current.wait_exit(5)
                self.workers.append(self.make().start())
            time.sleep(0.05)

    def deaths(self) -> int:
        return sum(1 for w in self.workers if w.proc.poll() is not None)

    def stop(self) -> None:
        self._stop.set()
        for w in self.workers:
            w.stop()


def wait_terminal(settings: Settings, ids: list[str], timeout: float) -> float:
    """Wait until every job is terminal; returns when that happened (monotonic)."""
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with sessions() as session:
                open_ = session.scalar(select(func.count()).select_from(Job)
                                       .where(Job.id.in_(ids), Job.status.not_in(TERMINAL)))
            if not open_:
                return time.monotonic()
            if time.monotonic() > deadline:
                with sessions() as session:
                    rows = session.execute(select(Job.id, Job.status, Job.attempts, Job.lease_owner)
                                           .where(Job.id.in_(ids), Job.status.not_in(TERMINAL)).limit(10)).all()
                raise AssertionError(f"{open_} of {len(ids)} jobs still not terminal after {timeout}s, e.g. {rows}")
            time.sleep(0.1)
    finally:
        engine.dispose()


@dataclass
class Figures:
    """What a scenario did, for the report."""

    scenario: str
    accepted: int = 0
    completed: int = 0
    succeeded: int = 0
    failed: int = 0
    duplicated: int = 0
    executions: int = 0
    rerun: int = 0
    recovery_seconds: float | None = None
    notes: dict = field(default_factory=dict)

    def line(self) -> str:
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}s"
        extra = "".join(f", {k} {v}" for k, v in self.notes.items())
        return (f"{self.scenario}: accepted {self.accepted}, completed {self.completed} "
                f"({self.succeeded} succeeded, {self.failed} failed), duplicated {self.duplicated}, "
                f"executions {self.executions} ({self.rerun} jobs run again after a fault), recovery {recovery}{extra}")


def check_nothing_lost(settings: Settings, accepted: list[str], workers: list[Worker], figures: Figures) -> Figures:
    """The invariant every fault test ends with, from the record and from
    evidence of what actually ran:

    - every accepted job is terminal, with exactly one `completed` event;
    - each succeeded job has exactly one set of outputs: one `output` event,
      its files in storage and nothing else under its prefix;
    - no job ever ran on two workers at once: the execution log's intervals
      (a killed worker's open ones closed at its death) never overlap, and at
      most one execution of a job had its result written.
    """
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(accepted)))}
        events = Counter(session.execute(select(JobEvent.job_id, JobEvent.type)
                                         .where(JobEvent.job_id.in_(accepted),
                                                JobEvent.type.in_(("completed", "output")))).all())
    engine.dispose()
    problems = []
    missing = set(accepted) - set(jobs)
    if missing:
        problems.append(f"{len(missing)} accepted jobs are not recorded: {sorted(missing)[:5]}")
    open_ = [j.id for j in jobs.values() if j.status not in TERMINAL]
    if open_:
        problems.append(f"{len(open_)} jobs are not terminal: {open_[:5]}")
    storage = make_storage(settings)
    for job in jobs.values():
        if events[(job.id, "completed")] != 1:
            problems.append(f"job {job.id} has {events[(job.id, 'completed')]} completed events")
        if job.status == "succeeded":
            if events[(job.id, "output")] != 1 or not job.output:
                problems.append(f"job {job.id} has {events[(job.id, 'output')]} output events")
                continue
            keys, expected = storage.list(f"jobs/{job.id}"), outputs(job)
            if sorted(keys) != sorted(expected) or any(
                    text is not None and storage.get(k).decode() != text for k, text in expected.items()):
                problems.append(f"job {job.id}: storage holds {keys}, output says {job.output}")

    death = {w.pid: w.exited_at for w in workers if w.exited_at is not None}
    runs = intervals(executions.read(settings.execution_log), death, problems)
    written = Counter()
    for job_id, spans in runs.items():
        spans.sort()
        for (s1, e1, w1, _), (s2, e2, w2, _) in zip(spans, spans[1:]):
            if s2 < e1:
                problems.append(f"job {job_id} ran on {w1} and {w2} at once ({s2:.3f} < {e1:.3f})")
        written[job_id] = sum(1 for *_, outcome in spans if outcome in TERMINAL)
    duplicated = [j for j, n in written.items() if n > 1]
    never_ran = [j.id for j in jobs.values() if j.status == "succeeded" and written[j.id] != 1]
    if never_ran:
        problems.append(f"succeeded jobs without exactly one written execution: {never_ran[:5]}")
    assert not problems, "\n".join(problems)

    figures.accepted = len(accepted)
    figures.completed = sum(1 for j in jobs.values() if j.status in TERMINAL)
    figures.succeeded = sum(1 for j in jobs.values() if j.status == "succeeded")
    figures.failed = sum(1 for j in jobs.values() if j.status == "failed")
    figures.duplicated = len(duplicated)
    figures.executions = sum(len(s) for j, s in runs.items() if j in jobs)
    figures.rerun = sum(1 for j, s in runs.items() if j in jobs and len(s) > 1)
    return figures


def outputs(job: Job) -> dict[str, str | None]:
    """The keys under a succeeded job's prefix its output names, each with the
    text it must hold (None: any bytes). A fault-family job: its one artifact;
    a fine-tune: every checkpoint it recorded, across its attempts; a text
    job: none (its text is in its output)."""
    if job.type == "fine-tune":
        return {c["key"]: None for c in job.output["checkpoints"]}
    if job.type == "text-generation":
        return {}
    return {job.output["artifact"]["key"]: job.output["text"]}


def intervals(records: list[dict], death: dict[int, float], problems: list[str]):
    """job id -> [(start, end, worker, outcome)], pairing each start with the
    next end of the same job in the same process."""
    open_: dict[tuple[int, str], dict] = {}
    runs: dict[str, list] = defaultdict(list)
    for r in records:
        k = (r["pid"], r["job"])
        if r["event"] == "start":
            if k in open_:
                problems.append(f"job {r['job']} started twice in process {r['pid']} without ending")
            open_[k] = r
        else:
            start = open_.pop(k, None)
            if start is None:
                problems.append(f"job {r['job']} ended in process {r['pid']} without starting")
                continue
            runs[r["job"]].append((start["at"], r["at"], r["worker"], r["outcome"]))
    for (pid, job_id), start in open_.items():
        if pid not in death:
            problems.append(f"job {job_id} is still executing in live process {pid}")
            continue
        runs[job_id].append((start["at"], death[pid], start["worker"], "killed"))
    return runs


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value


def statuses(settings: Settings, ids: list[str]) -> dict[str, str]:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        out = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    engine.dispose()
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
