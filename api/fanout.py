"""Event streams that cost no thread and no database poll each.

`genq api` serves every request with gunicorn's gthread worker, as before: a
request holds a thread while Flask answers it. An event stream is answered by
Flask too (auth, tenant scoping, 404, the tenant's cap on held requests, the
resume point, 204 after the end, every problem+json error), but once Flask has
said 200 the connection is handed over: the socket is detached from gunicorn
and adopted by one asyncio loop per API process (a thread of its own), which
writes the stream. An idle stream is then a socket and a few objects in that
loop, not a thread: one process holds thousands.

The loop's Hub keeps ONE Redis subscription per process (the pattern
`genq-events:*`, published by genq.notify after each commit that wrote job
events). On a notification it reads the job's new durable events once, for
every watcher of that job or of its tenant (`GET /v1/events`), in a thread
pool (the rare database read), and writes each to every watcher. Live output
deltas (genq.live's Redis streams) are read by one XREAD over the streams of
every watched running job. Nothing is polled per watcher: a slow re-check of
every watched job and tenant (RESYNC_SECONDS, and at once after the
subscription reconnects) makes up for a notification lost to a Redis restart.

Without Redis (embedded `genq up`, werkzeug's server, tests' clients) nothing
is handed over: api/jobs.py streams from the request's thread, polling.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import resource
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Callable

import redis
import redis.asyncio as aioredis
from gunicorn.workers.gthread import ThreadWorker
from sqlalchemy import select

from api import held
from api import serialize
from genq import notify, position
from genq.live import decode_entries, stream_cursor, stream_key
from genq.schema import Job, JobEvent
from genq.serialize import output_urls

log = logging.getLogger(__name__)

# Sent first: how long an EventSource waits before reconnecting (ms).
RECONNECT_MS = 2000
# A comment this often keeps proxies from closing a quiet stream (seconds).
KEEP_ALIVE = 15.0
# Every watched job and tenant is read again this often (seconds), whatever
# was notified: a lost notification delays an event by at most this long.
RESYNC_SECONDS = 15.0
# The live-output read waits at most this long before looking again at which
# jobs are watched (ms).
LIVE_BLOCK_MS = 250
# A watcher whose unsent output passes this many bytes is too slow: closed.
MAX_BUFFER = 1 << 20
# Queued jobs whose place in line one round reads, at most (genq.position).
MAX_PLACES = 200
# Events read in one query of a re-check; more are read in further pages.
PAGE = 1000
# A tenant-wide re-check reads from the highest event id seen at least this
# long ago (seconds): a transaction that took an id earlier but committed
# later than a read is still found.
LAG_SECONDS = 30.0
END_EVENTS = ("output", "completed")
# The most streams one API process holds; past it a stream is 503.
MAX_STREAMS = 20000
# Environ keys: the stream server (set by Handoff), and a view's plan.
ENV_SERVER = "genq.fanout"
ENV_PLAN = "genq.fanout.plan"


@dataclass
class Plan:
    """What a view decided about a stream, for the loop to carry out."""

    tenant_id: str
    hold: held.Hold
    # A job's stream: its id, where it resumes (N, k), and whether it runs now.
    job_id: str | None = None
    after: int = 0
    after_delta: int = -1
    running: bool = False
    # A tenant's stream (`job_id` None): the jobs it shows (None: all).
    jobs: frozenset[str] | None = None
    seconds: float = 300.0


@dataclass(eq=False)
class Watcher:
    plan: Plan
    writer: asyncio.StreamWriter
    deadline: float
    last_write: float
    # A job's stream: its cursor. A tenant's stream: the last event id sent per job.
    last_id: int = 0
    last_delta: int = -1
    seen: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    place: dict | None = None  # the job's place in line last sent (a queued job's stream)

    def write(self, data: str) -> bool:
        if self.closed:
            return False
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > MAX_BUFFER:
            return False
        self.writer.write(data.encode())
        self.last_write = time.monotonic()
        return True

    def cursor(self) -> str:
        return f"{self.last_id}.{self.last_delta}" if self.last_delta >= 0 else str(self.last_id)


class Hub:
    """The watchers of one API process and the one subscription that feeds them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sessions, storage, base_url: str, redis_url: str) -> None:
        self.loop = loop
        self.sessions, self.storage, self.base_url = sessions, storage, base_url
        self.redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2)
        self.by_job: dict[str, set[Watcher]] = {}
        self.by_tenant: dict[str, set[Watcher]] = {}  # tenant streams only
        self.tenant_of: dict[str, str] = {}  # watched job -> tenant
        self.count = 0
        # The highest durable event id read per job, and the live delta index.
        self.read_upto: dict[str, int] = {}
        self.delta_upto: dict[str, int] = {}
        self.running: set[str] = set()
        # Tenant streams' re-check floors: the id to read after, and (time, max id) of recent reads.
        self.tenant_floor: dict[str, int] = {}
        self.catchup: dict[str, int] = {}  # tenant -> the lowest resume point of streams not yet read for
        self.marks: list[tuple[float, int]] = []
        self.dirty_jobs: set[str] = set()
        self.dirty_tenants: set[str] = set()
        self.wake = asyncio.Event()
        self.live_wake = asyncio.Event()
        # Counters a test (or an operator) can read: database reads the hub made.
        self.reads = 0
        self.notifications = 0
        self.subscribed = False
        self.releasing: list[held.Hold] = []
        self.release_wake = asyncio.Event()
        self.line = position.Line()
        self.tasks = [loop.create_task(t()) for t in (self.subscribe, self.dispatch, self.live, self.maintain,
                                                          self.releaser, self.places)]

    # --- watchers ---------------------------------------------------------------

    async def adopt(self, sock: socket.socket, head: bytes, plan: Plan) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            await self.release(plan.hold)
            return
        now = time.monotonic()
        w = Watcher(plan, writer, deadline=now + plan.seconds, last_write=now,
                    last_id=plan.after, last_delta=plan.after_delta)
        writer.write(head + f"retry: {RECONNECT_MS}\n\n".encode())
        self.count += 1
        if plan.job_id is not None:
            self.by_job.setdefault(plan.job_id, set()).add(w)
            self.tenant_of[plan.job_id] = plan.tenant_id
            self.read_upto[plan.job_id] = min(self.read_upto.get(plan.job_id, plan.after), plan.after)
            self.delta_upto[plan.job_id] = min(self.delta_upto.get(plan.job_id, plan.after_delta), plan.after_delta)
            if plan.running:
                self.running.add(plan.job_id)
                self.live_wake.set()
            self.dirty_jobs.add(plan.job_id)  # what happened since the view looked
        else:
            self.by_tenant.setdefault(plan.tenant_id, set()).add(w)
            self.tenant_floor.setdefault(plan.tenant_id, plan.after)
            # Its first read starts at its own resume point, whatever the re-checks' floor is by then.
            self.catchup[plan.tenant_id] = min(self.catchup.get(plan.tenant_id, plan.after), plan.after)
            self.dirty_tenants.add(plan.tenant_id)
        self.wake.set()
        # The client's side: a closed connection ends the watcher at once.
        try:
            while await reader.read(4096):
                pass
        except (OSError, asyncio.CancelledError):
            pass
        self.close(w)

    def close(self, w: Watcher) -> None:
        """Forget a watcher and close its connection (what was written still
        goes out); its held slot is released in the background, in batches,
        so that ending a thousand streams at once writes to them all first."""
        if w.closed:
            return
        w.closed = True
        self.count -= 1
        plan = w.plan
        if plan.job_id is not None:
            watchers = self.by_job.get(plan.job_id, set())
            watchers.discard(w)
            if not watchers:
                self.by_job.pop(plan.job_id, None)
                self.forget_job(plan.job_id)
        else:
            watchers = self.by_tenant.get(plan.tenant_id, set())
            watchers.discard(w)
            if not watchers:
                self.by_tenant.pop(plan.tenant_id, None)
                self.tenant_floor.pop(plan.tenant_id, None)
                self.catchup.pop(plan.tenant_id, None)
                for job_id in [j for j, t in self.tenant_of.items() if t == plan.tenant_id]:
                    if job_id not in self.by_job:
                        self.forget_job(job_id)
        try:
            w.writer.close()
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.releasing.append(plan.hold)
        self.release_wake.set()

    def forget_job(self, job_id: str) -> None:
        if job_id in self.by_job or self.tenant_of.get(job_id) in self.by_tenant:
            return
        for d in (self.tenant_of, self.read_upto, self.delta_upto):
            d.pop(job_id, None)
        self.running.discard(job_id)

    async def release(self, hold: held.Hold) -> None:
        await self.loop.run_in_executor(None, hold.release)

    async def releaser(self) -> None:
        while True:
            await self.release_wake.wait()
            self.release_wake.clear()
            holds, self.releasing = self.releasing, []
            if holds:
                await self.loop.run_in_executor(None, _release, holds)

    def watched_tenants(self) -> set[str]:
        return set(self.by_tenant) | {self.tenant_of[j] for j in self.by_job}

    # --- notifications ----------------------------------------------------------

    async def subscribe(self) -> None:
        """The process's one subscription; after it (re)connects, everything
        watched is read again, so nothing published meanwhile is lost."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(notify.PATTERN)
                self.subscribed = True
                self.dirty_jobs.update(self.by_job)
                self.dirty_tenants.update(self.by_tenant)
                self.wake.set()
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    job_id = message["channel"].decode().partition(":")[2]
                    self.notifications += 1
                    # A job of a watched tenant may be new to this process: read it if any tenant streams.
                    if job_id in self.by_job or self.by_tenant:
                        self.dirty_jobs.add(job_id)
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the re-check carries on
                self.subscribed = False
                log.warning("event notifications: subscription lost, reconnecting: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass

    async def dispatch(self) -> None:
        next_resync = time.monotonic() + RESYNC_SECONDS
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.0, next_resync - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            if time.monotonic() >= next_resync:
                next_resync = time.monotonic() + RESYNC_SECONDS
                self.dirty_jobs.update(self.by_job)
                self.dirty_tenants.update(self.by_tenant)
            jobs, self.dirty_jobs = self.dirty_jobs, set()
            tenants, self.dirty_tenants = self.dirty_tenants, set()
            if not jobs and not tenants:
                continue
            try:
                await self.read_and_send(jobs, tenants)
            except Exception as exc:  # noqa: BLE001 - the database away: try again at the next re-check
                log.warning("event streams: reading new events failed: %s", exc)
                self.dirty_jobs |= jobs
                self.dirty_tenants |= tenants
                await asyncio.sleep(1.0)

    async def read_and_send(self, jobs: set[str], tenants: set[str]) -> None:
        watched = self.watched_tenants()
        if not watched:
            return
        # A job not read before (a new job of a watched tenant) is read from
        # its tenant's floor, or the lowest of them while its tenant is unknown.
        lowest = min(self.tenant_floor.values(), default=0)
        floors = {j: self.read_upto.get(j, self.tenant_floor.get(self.tenant_of.get(j, ""), lowest)) for j in jobs}
        if tenants:
            self.advance_tenant_floors()
        catchup = {t: self.catchup.pop(t) for t in tenants if t in self.catchup}
        tenant_floors = {t: min(self.tenant_floor[t], catchup.get(t, self.tenant_floor[t]))
                         for t in tenants if t in self.tenant_floor}
        try:
            rows, mark = await self.loop.run_in_executor(None, self.read, jobs, floors, watched, tenant_floors)
        except Exception:
            for t, after in catchup.items():  # read again next time, from there
                self.catchup[t] = min(self.catchup.get(t, after), after)
            raise
        if mark:
            self.marks.append((time.monotonic(), mark))
        # Watchers skip what they were sent already (a re-check reads it again).
        for tenant_id, e, frame in rows:
            job_id = e.job_id
            self.tenant_of.setdefault(job_id, tenant_id)
            await self.send(tenant_id, e, frame)
            self.read_upto[job_id] = max(self.read_upto.get(job_id, 0), e.id)
            if e.type == "start":
                self.running.add(job_id)
                self.live_wake.set()
            elif e.type == "completed":
                self.running.discard(job_id)
                if job_id not in self.by_job:
                    self.forget_job(job_id)

    def read(self, jobs: set[str], floors: dict[str, int], tenants: set[str], tenant_floors: dict[str, int]):
        """In a pool thread: the new events of these jobs (of watched tenants
        only) and of these tenants, once each, with their frames made once."""
        self.reads += 1
        out: dict[int, tuple[str, JobEvent]] = {}
        with self.sessions() as session:
            if jobs:
                q = (select(JobEvent, Job.tenant_id).join(Job, Job.id == JobEvent.job_id)
                     .where(JobEvent.job_id.in_(list(jobs)), Job.tenant_id.in_(list(tenants)),
                            JobEvent.id > min(floors.values())).order_by(JobEvent.id))
                for e, tenant_id in session.execute(q):
                    if e.id > floors[e.job_id]:
                        out[e.id] = (tenant_id, e)
            for tenant_id, floor in tenant_floors.items():
                after = floor
                while True:
                    q = (select(JobEvent).join(Job, Job.id == JobEvent.job_id)
                         .where(Job.tenant_id == tenant_id, JobEvent.id > after).order_by(JobEvent.id).limit(PAGE))
                    page = list(session.scalars(q))
                    for e in page:
                        out[e.id] = (tenant_id, e)
                    if len(page) < PAGE:
                        break
                    after = page[-1].id
        rows = []
        for event_id in sorted(out):
            tenant_id, e = out[event_id]
            body = serialize.event(e, output_urls(self.storage, self.base_url, e.job_id))
            rows.append((tenant_id, e, body))
        return rows, max(out, default=0)

    def advance_tenant_floors(self) -> None:
        """Tenant re-checks read after the highest id seen LAG_SECONDS ago, not from their start."""
        now = time.monotonic()
        old = [m for t, m in self.marks if now - t >= LAG_SECONDS]
        self.marks = [(t, m) for t, m in self.marks if now - t < LAG_SECONDS]
        if old:
            horizon = max(old)
            self.marks.append((now - LAG_SECONDS, horizon))
            for tenant_id, floor in self.tenant_floor.items():
                self.tenant_floor[tenant_id] = max(floor, horizon)

    async def send(self, tenant_id: str, e: JobEvent, body: dict) -> None:
        job_watchers = [w for w in self.by_job.get(e.job_id, ()) if e.id > w.last_id]
        if job_watchers:
            if e.type in END_EVENTS:
                # The worker publishes a job's last delta before it finishes it:
                # every delta goes before the end.
                await self.read_live({e.job_id}, block=None)
            data = f"event: {e.type}\ndata: {json.dumps(body)}\n\n"
            for w in job_watchers:
                if e.id <= w.last_id:
                    continue
                w.last_id = e.id
                if not w.write(f"id: {w.cursor()}\n{data}") or e.type == "completed":
                    # The end of the job ends its stream (what was written still goes out).
                    self.close(w)
        tenant_watchers = self.by_tenant.get(tenant_id)
        if tenant_watchers:
            data = f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps({'job_id': e.job_id, **body})}\n\n"
            for w in list(tenant_watchers):
                if w.plan.jobs is not None and e.job_id not in w.plan.jobs:
                    continue
                if e.id <= w.seen.get(e.job_id, w.plan.after):
                    continue
                w.seen[e.job_id] = e.id
                if not w.write(data):
                    self.close(w)

    # --- live output ------------------------------------------------------------

    async def live(self) -> None:
        while True:
            jobs = {j for j in self.running if j in self.by_job}
            if not jobs:
                self.live_wake.clear()
                await self.live_wake.wait()
                continue
            try:
                await self.read_live(jobs, block=LIVE_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - deltas are best-effort
                log.warning("event streams: live output unreadable: %s", exc)
                await asyncio.sleep(1.0)

    async def read_live(self, jobs: set[str], block: int | None) -> None:
        keys = {}
        for job_id in jobs:
            tenant_id = self.tenant_of.get(job_id)
            if tenant_id is not None:
                keys[stream_key(tenant_id, job_id)] = (job_id, stream_cursor(self.delta_upto.get(job_id, -1)))
        if not keys:
            return
        try:
            answer = await self.redis.xread({k: c for k, (_, c) in keys.items()}, block=block)
        except redis.RedisError:
            if block is None:
                return  # before a job's end: deltas are best-effort
            raise
        for key, entries in answer or []:
            job_id = keys[key.decode() if isinstance(key, bytes) else key][0]
            deltas = decode_entries(entries)
            if not deltas:
                continue
            self.delta_upto[job_id] = max(self.delta_upto.get(job_id, -1), deltas[-1][0])
            for w in list(self.by_job.get(job_id, ())):
                for index, delta in deltas:
                    if index <= w.last_delta:
                        continue
                    w.last_delta = index
                    if not w.write(f"id: {w.cursor()}\nevent: output\ndata: "
                                   f"{json.dumps({'delta': delta, 'index': index})}\n\n"):
                        self.close(w)
                        break

    # --- keep-alives, deadlines, held slots -----------------------------------

    async def maintain(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            watchers = [w for ws in (*self.by_job.values(), *self.by_tenant.values()) for w in ws]
            for w in watchers:
                if now >= w.deadline:
                    # The client reconnects with Last-Event-ID and misses nothing.
                    self.close(w)
                elif now - w.last_write >= KEEP_ALIVE and not w.write(": keep-alive\n\n"):
                    self.close(w)
            holds = [w.plan.hold for w in watchers if not w.closed]
            if holds:
                await self.loop.run_in_executor(None, _renew, holds)


    # --- places in line -----------------------------------------------------------

    async def places(self) -> None:
        """A queued job's watchers hear where it stands whenever that changes,
        and on joining: `event: queue` with genq.position's place, and no id
        (a place is no event to resume from). Read every POOL_SECONDS, for
        at most MAX_PLACES watched jobs a round."""
        while True:
            await asyncio.sleep(position.POOL_SECONDS / 2)
            jobs = [j for j in self.by_job if j not in self.running][:MAX_PLACES]
            if not jobs:
                continue
            try:
                found = await self.loop.run_in_executor(None, self.read_places, jobs)
            except Exception as exc:  # noqa: BLE001 - a place is a hint: try again next round
                log.warning("event streams: places in line unreadable: %s", exc)
                continue
            for job_id, shown in found.items():
                # A job whose start was sent while its place was read has left
                # the line: the place is stale, and sent after the start it would
                # come with the start's id (an SSE client keeps the last id for an
                # event without one) and read as that event replayed.
                if shown is None or job_id in self.running:
                    continue
                data = f"event: queue\ndata: {json.dumps(shown)}\n\n"
                for w in list(self.by_job.get(job_id, ())):
                    if w.place != shown:
                        w.place = shown
                        if not w.write(data):
                            self.close(w)

    def read_places(self, jobs: list[str]) -> dict[str, dict | None]:
        with self.sessions() as session:
            conn = session.connection()
            return {j: (p.shown() if (p := self.line.place(conn, j)) is not None else None) for j in jobs}


def _release(holds: list[held.Hold]) -> None:
    for hold in holds:
        hold.release()


def _renew(holds: list[held.Hold]) -> None:
    for hold in holds:
        hold.renew()  # acts every RENEW_SECONDS


class StreamServer:
    """The asyncio loop (a thread) that holds this process's handed-over streams."""

    def __init__(self, context) -> None:
        self.context = context
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None

    def start(self) -> None:
        """On first use: in the gunicorn worker, after the fork."""
        with self._lock:
            if self.loop is not None:
                return
            raise_fd_limit()
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                c = self.context
                self.hub = Hub(loop, c.sessions, c.storage, c.settings.api_base_url, c.settings.broker_url)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="event-streams", daemon=True).start()
            ready.wait()
            self.loop = loop
            # A worker that exits (a restart, a deploy) frees its streams' slots
            # now rather than when they lapse; their clients reconnect.
            atexit.register(self.release_all)

    def release_all(self) -> None:
        hub = self.hub
        if hub is None:
            return
        holds = [w.plan.hold for ws in (*list(hub.by_job.values()), *list(hub.by_tenant.values())) for w in list(ws)]
        _release(holds + list(hub.releasing))

    @property
    def streams(self) -> int:
        return self.hub.count if self.hub else 0

    def adopt(self, fd: int, head: bytes, plan: Plan) -> None:
        self.start()
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        asyncio.run_coroutine_threadsafe(self.hub.adopt(sock, head, plan), self.loop)


def raise_fd_limit() -> None:
    """Each stream is a socket: let this process hold as many as the system allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


class Handoff:
    """WSGI middleware: gives views the stream server (in `environ[ENV_SERVER]`)
    when served by StreamWorker, and hands a stream a view planned over to it:
    the response's status line and headers, then the socket."""

    def __init__(self, app, server: StreamServer) -> None:
        self.app, self.server = app, server

    def __call__(self, environ, start_response):
        if environ.get("gunicorn.socket") is None or not environ.get(StreamWorker.MARK):
            return self.app(environ, start_response)
        environ[ENV_SERVER] = self.server
        captured: dict[str, Any] = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return start_response(status, headers, exc_info)

        result = self.app(environ, capture)
        plan: Plan | None = environ.get(ENV_PLAN)
        if plan is None:
            return result
        if hasattr(result, "close"):
            result.close()
        lines = [f"HTTP/1.1 {captured['status']}", "Server: genq", f"Date: {formatdate(usegmt=True)}",
                 "Connection: close"]
        lines += [f"{k}: {v}" for k, v in captured["headers"] if k.lower() not in HOP_BY_HOP]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # gunicorn is left a closed socket object: its own write fails at once
        # and StreamWorker forgets the connection; the descriptor is the loop's.
        fd = environ["gunicorn.socket"].detach()
        try:
            self.server.adopt(fd, head, plan)
        except Exception:
            socket.socket(fileno=fd).close()
            plan.hold.release()
            raise
        return []


DETACHED = "detached"


class StreamWorker(ThreadWorker):
    """gunicorn's gthread worker, letting go of a connection whose socket a
    view handed to the stream server (Handoff). Everything else is gthread's."""

    MARK = "genq.stream_worker"

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = marking(self.wsgi)

    def handle_request(self, req, conn):
        try:
            keep = super().handle_request(req, conn)
        except OSError:
            if conn.sock.fileno() == -1:  # gunicorn's write to the socket it no longer has
                return DETACHED
            raise
        return DETACHED if conn.sock.fileno() == -1 else keep

    def _keepalive_after(self, conn, keepalive):
        if keepalive == DETACHED:
            return DETACHED
        return super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn, fs):
        if not fs.cancelled() and fs.exception() is None and fs.result() == DETACHED:
            self.nr_conns -= 1  # the stream server has it now
            return
        super().finish_request(conn, fs)


def marking(app: Callable) -> Callable:
    """The WSGI app StreamWorker serves: its environ says so."""

    def wrapped(environ, start_response):
        environ[StreamWorker.MARK] = True
        return app(environ, start_response)

    return wrapped
