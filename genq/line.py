"""The order queued jobs leave a pool in: fair share across tenants.

A tenant's priority orders its own jobs only. Across tenants the line is a
round robin: every tenant's first job (by its priority, then age) goes before
any tenant's second, and so on; within a round, the tenant whose last job in
the pool started longest ago (or never) goes first, then the older job. So
`priority: 100` jumps no one else's jobs, and a tenant with a thousand jobs
queued delays a newcomer by one job, not a thousand, even where batches run
one job at a time (the last start is what remembers whose turn it was).

A worker takes the pool's first job in line (`head`), then fills its batch
with jobs of the same batch model (genq.schema.Job: the model, or the base a
LoRA fine-tune is served on) and batch key, taking turns the same way among
the tenants that have such jobs (`batch`): each one's first, then each one's
second, and so on.

Both are index probes per tenant with jobs in line, never a sort of the whole
queue: the tenants are found with a loose index scan (the next tenant id after
the last one found), a tenant's first jobs with an ordered index scan, its
last start with one more (ix_jobs_line, ix_jobs_claim, ix_jobs_served). A
window function over the queue (`row_number() over (partition by tenant)`)
says the same in fewer words and costs a sort of the whole queue on every
claim (bench/claims.py has the figures). The queries are plain SQL that
Postgres and SQLite both run; they lock nothing (Postgres refuses FOR UPDATE
beside aggregates), so the claim locks the rows it picks with a second
statement. Each is built once per process, with bound parameters: building
one takes longer than running it.
"""
from __future__ import annotations

import functools
from typing import Callable, Collection

from sqlalchemy import Row, Select, Table, and_, bindparam, case, func, literal, or_, select, text
from sqlalchemy.orm import Session

from genq.schema import Job, Pool
from genq.states import JobStatus

JOBS: Table = Job.__table__
POOLS: Table = Pool.__table__

# Which rows of (an alias of) the jobs table are in line: a list of conditions.
Claimable = Callable[[Table], list]


def head(session: Session, pool: str) -> Row | None:
    """(id, model, batch_key, type, batch_model) of the pool's first job in line, or None."""
    _without_jit(session)
    return session.execute(_head(), {"pool": pool, "passed_over": []}).first()


def batch(session: Session, *, model: str, batch_key: str, limit: int, pool: str | None = None,
          first: str | None = None, passed_over: Collection[str] = (), only_model: str | None = None) -> list[Row]:
    """(id, attempts) of up to `limit` jobs of one batch model (`model`) and batch key, in
    line: the tenants take turns, each one's jobs in its own order. `first`
    (the pool's head the batch is built around) leads if it is among them.
    Without `pool`, the jobs of every pool (a tenant's last start counted in
    the pool of its first such job). `passed_over`: ids left out. `only_model`:
    of that model exactly (among the batch model's)."""
    _without_jit(session)
    params = {"model": model, "batch_key": batch_key, "limit": limit, "pool": pool, "first": first,
              "passed_over": list(passed_over), "only_model": only_model}
    return list(session.execute(_batch(pool is not None, first is not None, only_model is not None), params))


def _without_jit(session: Session) -> None:
    """Postgres compiles a plan with JIT once its estimated cost passes
    jit_above_cost. The planner cannot know how few rows the recursive parts
    yield (a handful of tenants, `limit` jobs each), estimates a batch far
    above that mark, and compiling took 100 ms of a 2 ms query. For the rest
    of the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL jit = off"))


def _claimable(*, pool: bool, model: bool, only_model: bool = False) -> Claimable:
    """Queued, in a pool that is not paused, not passed over, and where asked,
    of the pool, of the batch model and batch key the parameters name, and of one model."""
    paused = select(POOLS.c.name).where(POOLS.c.paused.is_(True))

    def conditions(t) -> list:
        found = [t.c.status == JobStatus.QUEUED.value, t.c.pool.not_in(paused),
                 t.c.id.not_in(bindparam("passed_over", expanding=True))]
        if pool:
            found.append(t.c.pool == bindparam("pool"))
        if model:
            found += [t.c.batch_model == bindparam("model"), t.c.batch_key == bindparam("batch_key")]
        if only_model:
            found.append(t.c.model == bindparam("only_model"))
        return found

    return conditions


def _ahead(t) -> tuple:
    """A tenant's own order: priority, then age."""
    return t.c.priority.desc(), t.c.created_at.asc(), t.c.id.asc()


def _after(t, job_id):
    """Job t comes after job `job_id` in their tenant's order (`_ahead`). The
    bare `priority <= ...` bounds the index scan; the rest settles ties."""
    priority, created_at = _column("priority", job_id), _column("created_at", job_id)
    return and_(t.c.priority <= priority,
                or_(t.c.priority < priority, t.c.created_at > created_at,
                    and_(t.c.created_at == created_at, t.c.id > job_id)))


def _column(name: str, job_id):
    """One column of the job `job_id`, by its primary key. Lookups like this
    one, rather than joins, keep every plan to index probes: the planner
    cannot tell how few rows the recursive parts yield, and would rather
    hash the whole table to join them."""
    t = JOBS.alias()
    # Correlated to wherever `job_id` comes from, however deep that is.
    return select(t.c[name]).where(t.c.id == job_id).correlate_except(t).scalar_subquery()


def _tenants(claimable: Claimable):
    """The tenants with a job in line, one index probe each; ends with a NULL."""
    first, after = JOBS.alias(), JOBS.alias()
    found = select(func.min(first.c.tenant_id).label("tenant_id")).where(*claimable(first)) \
        .cte("tenants", recursive=True)
    return found.union_all(
        select(select(func.min(after.c.tenant_id)).where(*claimable(after), after.c.tenant_id > found.c.tenant_id)
               .scalar_subquery())
        .where(found.c.tenant_id.is_not(None)))


def _firsts(claimable: Claimable, in_pool: Callable):
    """(tenant_id, id, last_start) of each tenant's first job in line, and when
    its last job in the pool `in_pool(job id)` started (NULL: never)."""
    tenants = _tenants(claimable)
    t, s = JOBS.alias(), JOBS.alias()
    first = select(t.c.id).where(*claimable(t), t.c.tenant_id == tenants.c.tenant_id).order_by(*_ahead(t)) \
        .limit(1).scalar_subquery()
    firsts = select(tenants.c.tenant_id, first.label("id")).where(tenants.c.tenant_id.is_not(None)).cte("firsts")
    last_start = select(func.max(s.c.started_at)).where(
        s.c.pool == in_pool(firsts.c.id), s.c.tenant_id == firsts.c.tenant_id, s.c.started_at.is_not(None),
    ).scalar_subquery()
    return select(firsts.c.tenant_id, firsts.c.id, last_start.label("last_start")).subquery("firsts_started")


@functools.cache
def _head() -> Select:
    firsts = _firsts(_claimable(pool=True, model=False), lambda _: bindparam("pool"))
    return (select(firsts.c.id, _column("model", firsts.c.id).label("model"),
                   _column("batch_key", firsts.c.id).label("batch_key"), _column("type", firsts.c.id).label("type"),
                   _column("batch_model", firsts.c.id).label("batch_model"))
            .order_by(firsts.c.last_start.asc().nulls_first(), _column("created_at", firsts.c.id).asc(),
                      firsts.c.id.asc())
            .limit(1))


@functools.cache
def _batch(with_pool: bool, with_first: bool, only_model: bool = False) -> Select:
    claimable = _claimable(pool=with_pool, model=True, only_model=only_model)
    in_pool = (lambda _: bindparam("pool")) if with_pool else (lambda job_id: _column("pool", job_id))
    firsts = _firsts(claimable, in_pool)
    # Each tenant's first `limit` jobs, one ordered index probe each: no other can make the batch.
    walk = select(firsts.c.tenant_id, firsts.c.id, literal(1).label("turn"), firsts.c.last_start) \
        .cte("walk", recursive=True)
    t = JOBS.alias()
    following = select(t.c.id).where(*claimable(t), t.c.tenant_id == walk.c.tenant_id, _after(t, walk.c.id)) \
        .order_by(*_ahead(t)).limit(1).scalar_subquery()
    walk = walk.union_all(select(walk.c.tenant_id, following, walk.c.turn + 1, walk.c.last_start)
                          .where(walk.c.id.is_not(None), walk.c.turn < bindparam("limit")))
    order = [walk.c.turn.asc(), walk.c.last_start.asc().nulls_first(), _column("created_at", walk.c.id).asc(),
             walk.c.id.asc()]
    if with_first:
        order.insert(0, case((walk.c.id == bindparam("first"), 0), else_=1))
    return (select(walk.c.id, _column("attempts", walk.c.id).label("attempts"))
            .where(walk.c.id.is_not(None)).order_by(*order).limit(bindparam("limit")))
