"""Where a queued job stands: how many jobs of its pool would start before
it, and about when it should start.

The line (genq.line) is a round robin across tenants: every tenant's first
job (by its own priority, then age) goes before any tenant's second, and
within a round the tenant whose last job in the pool started longest ago
goes first. So a job that is its tenant's r-th in line (r jobs of its own
ahead of it) has ahead of it

    r of its own
    + for each other tenant U with n_U jobs queued: min(n_U, r) from the rounds before
    + one more from each other tenant with more than r queued that goes before
      its tenant in the round order (the longer since its last start).

Costs: the job's own rank is one index range count on ix_jobs_line, bounded
by RANK_CAP (a job further back is shown as at least that far). Each
tenant's queued count and last start per pool are read by one grouped
statement per pool, kept POOL_SECONDS in the process: no poll scans the
queue, one statement every POOL_SECONDS per pool per process does
(bench/position.py shows the plans and timings at 100,000 queued).

The ETA is the pool's pace: jobs of the pool that ended in the last
PACE_WINDOW seconds, per second; `eta_seconds` = (position + 1) / pace.
None when nothing ended in the window (an idle or new pool): no pace to
go by. It ignores batching (a batch starts several jobs at once) and the
jobs of other models sharing the pool's workers' time, so it is an estimate.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import NamedTuple

from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.engine import Connection

from genq.schema import Job, utcnow
from genq.states import TERMINAL, JobStatus

RANK_CAP = 1_000
NEVER = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
NO_PRIORITY = 2**63
POOL_SECONDS = 5.0
PACE_WINDOW = 300.0

_J = Job.__table__
_QUEUED = JobStatus.QUEUED.value
_ENDED = tuple(s.value for s in TERMINAL)

# The job, if queued; then how many of its tenant's jobs in its pool are
# ahead of it, counted up to RANK_CAP (one index range on ix_jobs_line).
_ME = select(_J.c.tenant_id, _J.c.pool, _J.c.priority, _J.c.created_at).where(
    _J.c.id == bindparam("job_id"), _J.c.status == _QUEUED)
def _bounded_count(*where):
    # In ix_jobs_line's own order: the planner then walks that index and stops
    # at RANK_CAP, where without it a sequential scan "finds 1,000 soon" and
    # reads past every finished job first.
    ranked = select(_J.c.id).where(*where).order_by(_J.c.priority.desc(), _J.c.created_at, _J.c.id)
    return select(func.count()).select_from(ranked.limit(RANK_CAP).subquery()).scalar_subquery()


# Two ranges of the index, not one OR (which no index range serves): its
# tenant's jobs of a higher priority, then those of its own priority made before it.
_SAME = (_J.c.status == _QUEUED, _J.c.pool == bindparam("pool"), _J.c.tenant_id == bindparam("tenant_id"))
_AHEAD = select(_bounded_count(*_SAME, _J.c.priority > bindparam("priority"))
                + _bounded_count(*_SAME, _J.c.priority == bindparam("priority"),
                                 or_(_J.c.created_at < bindparam("created_at"),
                                     and_(_J.c.created_at == bindparam("created_at"), _J.c.id < bindparam("job_id")))))
# By priority too: a tenant's first job in line is its oldest of its highest priority.
_TENANTS = (select(_J.c.tenant_id, _J.c.priority, func.count().label("queued"),
                   func.min(_J.c.created_at).label("oldest"))
            .where(_J.c.status == _QUEUED, _J.c.pool == bindparam("pool")).group_by(_J.c.tenant_id, _J.c.priority))
_LAST_START = (select(_J.c.tenant_id, func.max(_J.c.started_at).label("last_start"))
               .where(_J.c.pool == bindparam("pool"), _J.c.started_at.is_not(None),
                      _J.c.tenant_id.in_(bindparam("tenants", expanding=True)))
               .group_by(_J.c.tenant_id))
_PACE = (select(func.count()).select_from(_J)
         .where(_J.c.completed_at > bindparam("since"), _J.c.pool == bindparam("pool"), _J.c.status.in_(_ENDED),
                _J.c.started_at.is_not(None)))


class Pool(NamedTuple):
    queued: dict[str, int]                       # tenant -> queued jobs in the pool
    first: dict[str, dt.datetime]                # tenant -> when its first job in line was made
    last_start: dict[str, dt.datetime | None]    # tenant -> its last start in the pool
    pace: float                                  # jobs ended per second, recently
    read_at: float


class Place(NamedTuple):
    position: int          # jobs that would start before it
    at_least: bool         # past RANK_CAP of its own: the position is a lower bound
    eta_seconds: float | None

    def shown(self) -> dict:
        return {"position": self.position, "position_is_lower_bound": self.at_least,
                "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1)}


class Line:
    """Per-process reader of queue places, with each pool's counts cached."""

    def __init__(self, seconds: float = POOL_SECONDS):
        self.seconds = seconds
        self._pools: dict[str, Pool] = {}
        self._lock = threading.Lock()
        self._sql: tuple[str, dict] | None = None
        self._places: dict[str, tuple[float, Place | None]] = {}

    def kept(self, job_id: str) -> tuple[bool, Place | None]:
        """(True, the place) if the job's place was read within `seconds`,
        else (False, None): a caller can skip opening a connection."""
        kept = self._places.get(job_id)
        if kept is not None and time.monotonic() - kept[0] < self.seconds:
            return True, kept[1]
        return False, None

    def place(self, conn: Connection, job_id: str) -> Place | None:
        """The job's place, or None if it is not queued (any more). A job's
        place is kept `seconds` too: a client polling one queued job pays for
        it once per `seconds`, not on every poll."""
        now = time.monotonic()
        fresh, place = self.kept(job_id)
        if fresh:
            return place
        found = self._place(conn, job_id)
        with self._lock:
            if len(self._places) > 10_000:
                self._places = {k: v for k, v in self._places.items() if now - v[0] < self.seconds}
            self._places[job_id] = (now, found)
        return found

    def _place(self, conn: Connection, job_id: str) -> Place | None:
        me = conn.execute(_ME, {"job_id": job_id}).first()
        if me is None:
            return None
        params = {"job_id": job_id, "pool": me.pool, "tenant_id": me.tenant_id, "priority": me.priority,
                  "created_at": me.created_at}
        return place_in(self.pool(conn, me.pool), me.tenant_id, min(RANK_CAP, self._rank(conn, params)))

    def _rank(self, conn: Connection, params: dict) -> int:
        if conn.dialect.name != "postgresql":
            return conn.scalar(_AHEAD, params)
        # Never a prepared statement here: psycopg prepares a statement run five
        # times, and Postgres then settles on one generic plan for every tenant,
        # a sequential scan that suits the tenant with most of the queue (the
        # rank of a small tenant's job took 24 ms with it, 2.5 ms without).
        if self._sql is None:
            compiled = _AHEAD.compile(dialect=conn.dialect)
            self._sql = (str(compiled), compiled.params)  # the LIMITs are parameters too
        sql, fixed = self._sql
        cursor = conn.connection.driver_connection.execute(sql, {**fixed, **params}, prepare=False)
        return cursor.fetchone()[0]

    def pool(self, conn: Connection, name: str) -> Pool:
        now = time.monotonic()
        found = self._pools.get(name)
        if found is not None and now - found.read_at < self.seconds:
            return found
        queued: dict[str, int] = {}
        first: dict[str, tuple] = {}
        for r in conn.execute(_TENANTS, {"pool": name}):
            queued[r.tenant_id] = queued.get(r.tenant_id, 0) + r.queued
            first[r.tenant_id] = min(first.get(r.tenant_id, (NO_PRIORITY, NEVER)), (-r.priority, r.oldest))
        last = dict(conn.execute(_LAST_START, {"pool": name, "tenants": list(queued)}).tuples().all()) if queued else {}
        ended = conn.scalar(_PACE, {"pool": name, "since": utcnow() - dt.timedelta(seconds=PACE_WINDOW)}) or 0
        found = Pool(queued, {t: made for t, (_, made) in first.items()}, last, ended / PACE_WINDOW, now)
        with self._lock:
            self._pools[name] = found
        return found


def place_in(pool: Pool, tenant: str, rank: int) -> Place:
    """The arithmetic of the module docstring."""
    def turn(t: str) -> tuple:
        # A round's order (genq.line): the tenant whose last start is longest ago
        # (or never) first, then the older first job in line. Once a round has
        # run, the tenants' last starts are in this same order: it holds for the
        # later rounds too.
        return (pool.last_start.get(t) or NEVER, pool.first.get(t) or NEVER, t)

    mine = turn(tenant)
    ahead = rank
    for other, n in pool.queued.items():
        if other == tenant:
            continue
        ahead += min(n, rank)
        if n > rank and turn(other) < mine:
            ahead += 1
    eta = (ahead + 1) / pool.pace if pool.pace > 0 else None
    return Place(ahead, rank >= RANK_CAP, eta)
